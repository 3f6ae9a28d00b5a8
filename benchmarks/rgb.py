"""Speed at ImageNet scale: the ResNet-50-shaped model (bottlenecks [3, 4, 6, 3], 224x224x3, 1000
classes, random weights; tests/rgb_models.py builds and exports it) measured side by side in one run:

1. ONNX Runtime inference, images/s (CUDA provider when present);
2. the differentiable twin (onnx2torch): forward, and forward + backward (gradient with respect to
   the input, what white-box attacks pay per step), images/s;
3. patch replacement on the image (3x3x3 patches, dim 27): the whole defense with exact faiss
   search (IndexFlatL2, K = --codewords), and raw searches for a large codebook (K = --large,
   65,536 by default): exact flat search next to an IVF index (nlist, nprobe; its recall against the
   exact search is printed); the faiss GPU index when faiss has one, else torch brute force on CUDA;
4. the audit's gradient evaluations per second: a short APGD-CE (L-inf) run through
   advshield.attacks on the twin, counted by the attack itself, as a ratio of the twin's
   forward + backward rate (1.0 = the attack costs nothing beyond its gradients).

    python benchmarks/rgb.py [--width 64] [--batch 8] [--seconds 3] [--threads 2] [--device auto]
                             [--codewords 4096] [--large 65536] [--nlist 1024] [--nprobe 8]
                             [--apgd-steps 10] [--cache DIR] [--json out.json]

The model file (about 100 MB at width 64) is built once under --cache (default: the system tmp
dir); --width 16 is the slim variant the test suite uses. Codebooks are patches sampled from the
foolbox wheel's ImageNet images (or uniform noise without it): the search cost does not depend on
how the codebook was learnt. os.getloadavg() is printed before and after: on a shared machine,
compare the ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# This folder holds triton.py, which would shadow the `triton` package torch probes; the builders
# of the model live in tests/rgb_models.py.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from advshield.attacks import apgd  # noqa: E402
from advshield.attacks.primitives import Counted  # noqa: E402
from advshield.defenses.patches import (  # noqa: E402
    PatchReplacementConfig,
    build,
    configure_faiss,
    extract_patches,
    faiss_has_gpu,
    torch_nearest,
)
from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier, pick_device  # noqa: E402


def rate(fn, seconds: float, sync=lambda: None, min_calls: int = 3) -> float:
    """Calls per second from the median call time (after one warm-up call)."""
    fn()
    sync()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < min_calls:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def images(n: int, size: int = 224) -> torch.Tensor:
    """foolbox's ImageNet samples resized to size x size (repeated to n), else seeded noise."""
    from PIL import Image
    from rgb_models import foolbox_data_dir

    try:
        files = sorted(foolbox_data_dir().glob("imagenet_*.jpg"))
    except FileNotFoundError:
        files = []
    if not files:
        return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(0))
    arr = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]
    x = np.stack([arr[i % len(arr)] for i in range(n)]).transpose(0, 3, 1, 2)
    return torch.from_numpy(x.astype(np.float32) / 255)


def table(title: str, rows: dict[str, float], unit: str, ref: str) -> dict[str, dict[str, float]]:
    print(f"\n{title} (ratios against {ref})")
    out = {}
    for name, v in rows.items():
        ratio = v / rows[ref] if rows.get(ref) else float("nan")
        print(f"  {name:40s} {v:12,.1f} {unit:9s} {ratio:7.3f}")
        out[name] = {unit.replace("/", "_per_"): round(v, 2), "ratio": round(ratio, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64, help="64: ResNet-50 (25.6 M parameters); 16: the tests' slim one")
    ap.add_argument("--model", default="", help="an existing ONNX model instead (NCHW [0, 1] pixels)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    ap.add_argument("--faiss-threads", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--stride", type=int, default=2, help="patch stride (3x3x3 patches)")
    ap.add_argument("--codewords", type=int, default=4096, help="K of the defense's exact codebook")
    ap.add_argument("--large", type=int, default=65536, help="K of the large codebook (0: skip)")
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists for the large codebook")
    ap.add_argument("--nprobe", type=int, default=8, help="IVF lists searched per query")
    ap.add_argument("--large-images", type=int, default=1, help="images per call for the large-codebook searches")
    ap.add_argument("--apgd-steps", type=int, default=10)
    ap.add_argument("--cache", default="", help="folder for the built model (default: the system tmp dir)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    load_before = os.getloadavg()

    from rgb_models import cache_dir, resnet50_like

    t0 = time.perf_counter()
    path = Path(args.model) if args.model else resnet50_like(Path(args.cache) if args.cache else cache_dir(), width=args.width)
    build_s = time.perf_counter() - t0
    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    onnx_clf = OnnxClassifier(path, device="cuda" if cuda else "cpu", threads=args.threads)
    x_cpu = images(args.batch)
    x = x_cpu.to(dev)
    results: dict = {
        "model": str(path), "model_mb": round(path.stat().st_size / 1e6, 1), "build_or_load_s": round(build_s, 1),
        "batch": args.batch, "threads": args.threads, "device": str(dev), "torch": torch.__version__,
        "onnxruntime_providers": onnx_clf.providers, "loadavg_before": load_before,
    }
    print(f"{path.name}: {results['model_mb']} MB, input {onnx_clf.input_shape}, {onnx_clf.num_classes} classes; "
          f"batch {args.batch}, {args.threads} thread(s), device {dev}, ORT {onnx_clf.providers[0]}")
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    # 1-2. inference and the twin
    t0 = time.perf_counter()
    twin = TwinClassifier(path, device=str(dev), reference=onnx_clf, validate=False)
    results["twin_build_s"] = round(time.perf_counter() - t0, 1)
    results["twin_parity"] = twin.parity.max_abs_diff

    def fwd_bwd() -> None:
        xg = x.clone().requires_grad_(True)
        twin(xg).logsumexp(1).sum().backward()

    model_rows = {
        "onnxruntime forward": args.batch * rate(lambda: onnx_clf(x_cpu), args.seconds),
        "twin forward": args.batch * rate(lambda: torch.no_grad()(twin)(x), args.seconds, sync),
        "twin forward+backward": args.batch * rate(fwd_bwd, args.seconds, sync),
    }

    # 4. the audit's gradient evaluations: APGD-CE L-inf through advshield.attacks, counted
    counted = Counted(twin)
    labels = torch.no_grad()(twin)(x).argmax(1)

    def attack() -> None:
        apgd(counted, x, labels, eps=4 / 255, steps=args.apgd_steps, restarts=1, seed=0)

    attack()  # warm-up
    counted.reset()
    t0 = time.perf_counter()
    attack()
    sync()
    seconds = time.perf_counter() - t0
    model_rows[f"APGD-CE gradient evaluations ({args.apgd_steps} steps)"] = counted.gradients / seconds
    results["apgd"] = {"steps": args.apgd_steps, "gradients": counted.gradients, "forwards": counted.forwards,
                       "seconds": round(seconds, 2)}
    results["rates"] = table("model (images/s; APGD row: per-image gradients/s)", model_rows, "images/s",
                             "twin forward+backward")

    # 3. patch replacement on the image, 3x3x3 patches
    cfg = PatchReplacementConfig(depth=3, radius=1, stride=args.stride, codewords=args.codewords,
                                 sample=args.codewords, threads=args.faiss_threads, artifact="codebook")
    defense = build(cfg)
    pool = extract_patches(x_cpu, cfg)[0]  # [P, 27]
    g = torch.Generator().manual_seed(0)

    def sample_book(k: int) -> np.ndarray:
        take = torch.randint(0, len(pool), (k,), generator=g)
        return (pool[take] + 0.01 * torch.randn((k, cfg.dim), generator=g)).numpy().astype(np.float32)

    defense.set_codebooks(sample_book(args.codewords)[None])
    per_image = len(pool) // args.batch
    patch_rows = {f"defense, exact faiss K={args.codewords}": args.batch * rate(lambda: defense.transform(x_cpu), args.seconds)}
    if cuda:
        patch_rows[f"defense on {dev}, K={args.codewords} ({defense.codebooks.backend(dev)})"] = (
            args.batch * rate(lambda: defense.transform(x), args.seconds, sync))
    results["patches_per_image"] = per_image
    if args.large:
        import faiss

        configure_faiss(args.faiss_threads)
        big = sample_book(args.large)
        q = np.ascontiguousarray(pool[: per_image * args.large_images].numpy())
        flat = faiss.IndexFlatL2(cfg.dim)
        flat.add(big)
        quantizer = faiss.IndexFlatL2(cfg.dim)
        ivf = faiss.IndexIVFFlat(quantizer, cfg.dim, args.nlist)
        t0 = time.perf_counter()
        ivf.train(big)
        ivf.add(big)
        ivf.nprobe = args.nprobe
        results["ivf_build_s"] = round(time.perf_counter() - t0, 2)
        exact = flat.search(q, 1)[1][:, 0]
        approx = ivf.search(q, 1)[1][:, 0]
        results["ivf_recall_at_1"] = float((exact == approx).mean())
        n = args.large_images
        patch_rows[f"exact flat search K={args.large}"] = n * rate(lambda: flat.search(q, 1), args.seconds, min_calls=1)
        patch_rows[f"IVF search K={args.large} (nlist {args.nlist}, nprobe {args.nprobe})"] = (
            n * rate(lambda: ivf.search(q, 1), args.seconds))
        if faiss_has_gpu():
            res = faiss.StandardGpuResources()
            gflat = faiss.index_cpu_to_gpu(res, 0, flat)
            givf = faiss.index_cpu_to_gpu(res, 0, ivf)
            patch_rows[f"faiss GPU flat K={args.large}"] = n * rate(lambda: gflat.search(q, 1), args.seconds)
            patch_rows[f"faiss GPU IVF K={args.large}"] = n * rate(lambda: givf.search(q, 1), args.seconds)
        elif cuda:
            qt, bt = torch.from_numpy(q).to(dev)[None], torch.from_numpy(big).to(dev)[None]
            patch_rows[f"torch brute force on {dev} K={args.large}"] = n * rate(lambda: torch_nearest(qt, bt), args.seconds, sync)
    results["patches"] = table(f"patch replacement, 3x3x3 patches at stride {args.stride} ({per_image:,} per image; "
                               f"images/s)", patch_rows, "images/s", f"defense, exact faiss K={args.codewords}")
    if args.large:
        print(f"  IVF recall@1 against the exact search: {results['ivf_recall_at_1']:.3f} "
              f"(index built in {results['ivf_build_s']} s)")
    results["loadavg_after"] = os.getloadavg()
    la = results["loadavg_after"]
    print(f"\nload average after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; twin parity {results['twin_parity']:.2g}, "
          f"twin built in {results['twin_build_s']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
