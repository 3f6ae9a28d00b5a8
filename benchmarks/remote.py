"""The cost of a served classifier: the remote call against the same model in process.

A Triton repository holding a classifier advshield did not generate (tests/served_repo.py: the
reference CNN exported zoo-style, NHWC, normalized, softmax, served by a hand-written Python-backend
model running ONNX Runtime) is served by the nvidia-pytriton wheel's tritonserver on a free
loopback port. Two classifiers of the same pixels -> logits contract are then loaded by 1, 8 and
32 concurrent client threads for ``--seconds`` each:

* in process: ``OnnxClassifier`` on the same ONNX file, wrapped as the pipeline says (one ONNX
  Runtime session, one intra-op thread, shared by the threads);
* remote: ``ServedClassifier`` (``[model] served``): advshield's normalization and layout, then a
  gRPC ModelInfer to the served model, its probabilities read back as logits.

Printed per level: images/s and p50/p99 latency of one classifier call of ``--batch`` images, and
the ratios remote / in process; the load average before and after (2 shared cores: read the
ratios, the absolute rates move with the machine's other work).

    python benchmarks/remote.py [--seconds 4] [--batch 8] [--clients 1 8 32] [--json runs/bench/remote.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# triton.py in this folder would shadow the `triton` package torch._dynamo probes: keep it off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent / "tests"))

import numpy as np  # noqa: E402
import served_repo as S  # noqa: E402
import torch  # noqa: E402

from advshield.core.data import load_fashion_mnist  # noqa: E402
from advshield.deploy.tritonserver import start_triton  # noqa: E402
from advshield.plugin.classifiers import OnnxClassifier  # noqa: E402
from advshield.plugin.config import load_pipeline  # noqa: E402
from advshield.plugin.served import ServedClassifier  # noqa: E402

MODEL = HERE.parent / "advshield" / "models" / "fashion_cnn.onnx"


def load(clf, x: torch.Tensor, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads calling ``clf(x)`` back to back for ``seconds``: images/s, p50, p99 (ms)."""
    lat: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds
    start = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        start.wait()
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            clf(x)
            lat[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.concatenate([np.asarray(v) for v in lat]) * 1000
    return {"images_per_s": len(all_lat) * len(x) / wall, "p50_ms": float(np.percentile(all_lat, 50)),
            "p99_ms": float(np.percentile(all_lat, 99)), "calls": len(all_lat)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="per level and classifier")
    ap.add_argument("--batch", type=int, default=8, help="images per classifier call")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="advshield-remote-bench-"))
    zoo = S.zoo_onnx(MODEL, work / "zoo_cnn.onnx")
    S.write_served_model(work / "repo", zoo, max_batch_size=64)
    x = torch.from_numpy(load_fashion_mnist("test").as_float(0, args.batch))
    load_before = os.getloadavg()
    server = start_triton(work / "repo", [S.NAME], threads=1, timeout=90)
    try:
        path = work / "served.toml"
        path.write_text(S.pipeline_text(pipeline="bench", endpoint=server.url, twin=zoo))
        cfg = load_pipeline(path)
        local = OnnxClassifier(cfg.wrapped_model(), device="cpu", threads=1)
        remote = ServedClassifier(cfg)
        remote.concurrency = 1  # one request per call (batch <= max_batch_size): the wire, not fan-out
        diff = float((local(x) - remote(x)).abs().max())
        print(f"served model {remote!r}; max |logit difference| in process vs remote {diff:.2e}")
        print(f"load average before: {' '.join(f'{v:.2f}' for v in load_before)}")
        rows = []
        print(f"{'clients':>7} | {'in process img/s':>16} {'p50 ms':>8} {'p99 ms':>8} | {'remote img/s':>12} "
              f"{'p50 ms':>8} {'p99 ms':>8} | {'img/s ratio':>11} {'p99 ratio':>9}")
        for n in args.clients:
            a = load(local, x, n, args.seconds)
            b = load(remote, x, n, args.seconds)
            row = {"clients": n, "in_process": a, "remote": b,
                   "throughput_ratio": b["images_per_s"] / a["images_per_s"], "p99_ratio": b["p99_ms"] / a["p99_ms"]}
            rows.append(row)
            print(f"{n:>7} | {a['images_per_s']:>16.0f} {a['p50_ms']:>8.2f} {a['p99_ms']:>8.2f} | "
                  f"{b['images_per_s']:>12.0f} {b['p50_ms']:>8.2f} {b['p99_ms']:>8.2f} | "
                  f"{row['throughput_ratio']:>10.2f}x {row['p99_ratio']:>8.1f}x", flush=True)
        load_after = os.getloadavg()
        print(f"load average after: {' '.join(f'{v:.2f}' for v in load_after)} ({os.cpu_count()} CPUs)")
        print(f"remote client: {remote.stats()}")
        remote.close()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"batch": args.batch, "seconds": args.seconds, "rows": rows,
                                             "load_before": load_before, "load_after": load_after,
                                             "max_abs_logit_diff": diff}, indent=2))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
