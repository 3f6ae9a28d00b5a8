"""Images/s of ONNX Runtime inference, twin forward and twin forward+backward (gradient w.r.t.
the input), batch 64, on the embedded model, measured side by side in one run; on the GPU too
when one is present.

    python benchmarks/classifier.py [--batch 64] [--seconds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from advshield.core.data import load_fashion_mnist
from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier

MODEL = Path(__file__).resolve().parents[1] / "advshield" / "models" / "fashion_cnn.onnx"


def rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(MODEL))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x_cpu = torch.from_numpy(load_fashion_mnist("test").as_float(0, args.batch))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"model {Path(args.model).name}, batch {args.batch}, {args.threads} CPU threads, torch {torch.__version__}")
    for dev in devices:
        bench_device(dev, args, x_cpu)
    if len(devices) == 1:
        print("\n(no CUDA device visible: GPU rows not measured)")


def bench_device(dev: str, args, x_cpu: torch.Tensor) -> None:
    ort_clf = OnnxClassifier(args.model, device=dev, threads=args.threads, validate=False)
    twin = TwinClassifier(args.model, device=dev, reference=ort_clf, validate=False)
    x = x_cpu.to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    x_np = x_cpu.numpy()

    def ort_fwd():
        ort_clf.run(x_np)

    def twin_fwd():
        with torch.no_grad():
            twin(x)
        sync()

    def twin_grad():
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(twin(xi).logsumexp(1).sum(), xi)
        sync()

    rows = [("onnxruntime inference", rate(ort_fwd, args.batch, args.seconds)),
            ("twin forward", rate(twin_fwd, args.batch, args.seconds)),
            ("twin forward+backward", rate(twin_grad, args.batch, args.seconds))]
    base = rows[0][1]
    print(f"\n[{dev}] providers={ort_clf.providers}  twin parity max|dlogit|={twin.parity.max_abs_diff:.2g}")
    print(f"{'path':<24}{'images/s':>12}{'vs onnxruntime':>16}")
    for name, r in rows:
        print(f"{name:<24}{r:>12,.0f}{r / base:>15.2f}x")
    print(f"gradient cost: forward+backward / forward = {rows[1][1] / rows[2][1]:.2f}x slower")


if __name__ == "__main__":
    main()
