"""Triton over gRPC: the bare classifier against the defended ensemble, same server, same run.

One tritonserver (the nvidia-pytriton wheel's, loopback) loads a repository generated from two
pipelines on the same ONNX model:

* ``bench_plain``: no defenses: the ensemble's own overhead (preprocess -> classifier -> postprocess);
* ``bench_defended``: the pipeline given with ``--pipeline`` (default: bit depth 5 + 2x2 median +
  the squeeze detector, threshold fitted on 2,000 training images), i.e. what is deployed;

and the bare classifier is ``bench_plain__classifier`` (the same model.onnx, ONNX Runtime in the
Python backend: the wheel has no onnxruntime backend) called directly with its own tensors.
For each target and each concurrency level, ``--seconds`` of closed-loop load from that many
client threads (one tritonclient gRPC client each): throughput (images/s), p50/p99 latency per
request, errors; then the defended/bare and plain/bare ratios.

    python benchmarks/triton.py [--pipeline PIPELINE.toml] [--concurrency 1,4,16] [--seconds 5]
        [--images-per-request 8] [--input pixels|image] [--threads 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from advshield.core.data import load_fashion_mnist
from advshield.plugin import protocol as P
from advshield.plugin.decode import encode_png

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "advshield" / "models" / "fashion_cnn.onnx"

HEADER = """
[pipeline]
name = "{name}"
[model]
path = "{model}"
[input]
channels = 1
height = 28
width = 28
[data]
dataset = "fashion-mnist"
[deploy]
max_batch_size = 64
max_queue_delay_us = {delay}
threads = {threads}
"""
DEFENDED = """
[[defenses]]
type = "bit_depth"
bits = 5
[[defenses]]
type = "median"
size = 2
[detector]
type = "squeeze"
fpr = 0.05
artifact = "threshold"
[artifacts.threshold]
path = "threshold.json"
[fit]
samples = 1
calibration = 2000
"""


def make_pipelines(folder: Path, args) -> dict[str, Path]:
    from advshield.plugin.config import load_pipeline
    from advshield.plugin.fitting import fit_pipeline, fit_spec

    head = {"model": MODEL.as_posix(), "delay": args.max_queue_delay_us, "threads": args.threads}
    plain = folder / "bench_plain.toml"
    plain.write_text(HEADER.format(name="bench_plain", **head))
    if args.pipeline:
        defended = Path(args.pipeline)
        print(f"defended pipeline: {defended} (ensemble {load_pipeline(defended).pipeline.name!r})")
    else:
        defended = folder / "bench_defended.toml"
        defended.write_text(HEADER.format(name="bench_defended", **head) + DEFENDED)
        cfg = load_pipeline(defended)
        fit_pipeline(cfg, fit_spec(cfg), progress=False)
    return {"plain": plain, "defended": defended}


def request_inputs(target: str, kind: str, pngs: list[bytes], pixels: np.ndarray, k: int, n: int):
    import tritonclient.grpc as grpcclient

    idx = [(k * n + j) % len(pixels) for j in range(n)]
    if target == "bare":
        inp = grpcclient.InferInput("images", [n, *pixels.shape[1:]], "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(pixels[idx]))
        return [inp]
    if kind == "image":
        data = np.empty((n, 1), dtype=np.object_)
        for j, i in enumerate(idx):
            data[j, 0] = pngs[i]
        inp = grpcclient.InferInput(P.INPUT_IMAGE, [n, 1], "BYTES")
    else:
        data = np.ascontiguousarray(pixels[idx])
        inp = grpcclient.InferInput(P.INPUT_PIXELS, list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return [inp]


def load(url: str, model: str, target: str, args, pngs, pixels, concurrency: int) -> dict:
    """Closed loop: ``concurrency`` threads, each sending its next request when the last returns."""
    import tritonclient.grpc as grpcclient

    n = args.images_per_request
    # pre-built requests (no encoding cost in the loop), 16 per thread
    payloads = [[request_inputs(target, args.input, pngs, pixels, c * 16 + k, n) for k in range(16)]
                for c in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(c: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        for k in range(2):  # warm-up
            client.infer(model, payloads[c][k])
        start.wait()
        k = 0
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                client.infer(model, payloads[c][k % 16])
                latencies[c].append(time.perf_counter() - t0)
            except grpcclient.InferenceServerException:
                errors[c] += 1
            k += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start.wait()
    t_begin = time.perf_counter()
    stop_at[0] = t_begin + args.seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_begin
    lat = np.array([x for per in latencies for x in per]) * 1000
    requests = len(lat)
    return {"target": target, "model": model, "concurrency": concurrency, "requests": requests,
            "errors": int(sum(errors)), "seconds": round(elapsed, 3),
            "images_per_s": round(requests * n / elapsed, 1), "requests_per_s": round(requests / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if requests else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if requests else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=None, help="the defended pipeline (default: built-in, see above)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--images-per-request", type=int, default=8)
    ap.add_argument("--input", choices=("pixels", "image"), default="pixels", help="ensemble input tensor")
    ap.add_argument("--max-queue-delay-us", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="threads per Python-model instance")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from advshield.deploy.triton import generate_repository, serve_repository
    from advshield.plugin.config import load_pipeline

    test = load_fashion_mnist("test")
    pixels = test.as_float(0, 512)
    pngs = [encode_png(x) for x in pixels]
    with tempfile.TemporaryDirectory(prefix="advshield-bench-") as tmp:
        folder = Path(tmp)
        print("fitting and generating the repository ...", flush=True)
        paths = make_pipelines(folder, args)
        names = {k: load_pipeline(p).pipeline.name for k, p in paths.items()}
        for p in paths.values():
            generate_repository(p, folder / "models", classifier_backend="python", threads=args.threads,
                                max_queue_delay_us=args.max_queue_delay_us)
        t0 = time.perf_counter()
        server = serve_repository(folder / "models", list(names.values()), threads=args.threads)
        print(f"tritonserver ready in {time.perf_counter() - t0:.1f} s at {server.url}", flush=True)
        targets = [("bare", f"{names['plain']}__classifier"), ("plain", names["plain"]),
                   ("defended", names["defended"])]
        rows = []
        try:
            for c in levels:
                for target, model in targets:
                    row = load(server.url, model, target, args, pngs, pixels, c)
                    rows.append(row)
                    print(f"{target:<9} {model:<28} c={c:<3} {row['images_per_s']:>9.1f} img/s "
                          f"{row['requests_per_s']:>8.1f} req/s  p50 {row['p50_ms']:>7.2f} ms  "
                          f"p99 {row['p99_ms']:>7.2f} ms  errors {row['errors']}", flush=True)
        finally:
            server.stop()
    ratios = []
    for c in levels:
        by = {r["target"]: r for r in rows if r["concurrency"] == c}
        bare = by["bare"]
        for target in ("plain", "defended"):
            r = by[target]
            ratios.append({"concurrency": c, "target": target,
                           "throughput_vs_bare": round(r["images_per_s"] / bare["images_per_s"], 3),
                           "p50_vs_bare": round(r["p50_ms"] / bare["p50_ms"], 2),
                           "p99_vs_bare": round(r["p99_ms"] / bare["p99_ms"], 2)})
    print("\nratios to the bare classifier (throughput: higher is better; latency: lower is better)")
    for r in ratios:
        print(f"  c={r['concurrency']:<3} {r['target']:<9} throughput x{r['throughput_vs_bare']:<6} "
              f"p50 x{r['p50_vs_bare']:<6} p99 x{r['p99_vs_bare']}")
    result = {"settings": {**vars(args), "python": sys.version.split()[0], "machine": platform.machine()},
              "rows": rows, "ratios": ratios}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
