"""Patch replacement speed: the whole defense (extract, search, strategy, reconstruct) next to
raw faiss search on the same patches and a brute-force torch distance search, measured side by
side in one run, with ratios; on the GPU too when one is present.

    python benchmarks/patches.py [--layer image] [--codewords 4096] [--radius 1] [--stride 1]
                                 [--batch 64] [--seconds 3] [--threads 2] [--json out.json]

The codebook is fitted first on Fashion-MNIST training images (the fit time is reported too).
``--layer relu --depth 4`` measures the first feature layer of the embedded model (its features
come from the model's head, on ONNX Runtime).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from advshield.core.data import load_fashion_mnist
from advshield.defenses.patches import (
    PatchReplacementConfig,
    build,
    configure_faiss,
    extract_patches,
    faiss_has_gpu,
    torch_nearest,
)

MODEL = Path(__file__).resolve().parents[1] / "advshield" / "models" / "fashion_cnn.onnx"


def rate(fn, seconds: float, sync=lambda: None) -> float:
    """Calls per second from the median call time (after one warm-up call): robust to the pauses
    of a machine whose cores are shared."""
    fn()
    sync()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", default="image", help="'image' or a tensor of the model (e.g. relu)")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--radius", type=int, default=1)
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--codewords", type=int, default=4096)
    ap.add_argument("--sample", type=int, default=262_144)
    ap.add_argument("--fit-images", type=int, default=20_000)
    ap.add_argument("--strategy", default="plain")
    ap.add_argument("--eps", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--faiss-threads", type=int, default=1, help="faiss search threads (the defense's `threads`)")
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = PatchReplacementConfig(
        layer=args.layer, depth=args.depth, radius=args.radius, stride=args.stride, codewords=args.codewords,
        sample=args.sample, fit_images=args.fit_images, strategy=args.strategy, eps=args.eps, threads=args.faiss_threads,
        artifact="codebook",
    )
    defense = build(cfg)
    features = None
    if cfg.layer != "image":
        from advshield.plugin.split import feature_extractor

        features = feature_extractor(args.model, cfg.layer, device="cpu", threads=args.threads)
        defense.bind_features(features)
    train = torch.from_numpy(load_fashion_mnist("train").as_float())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        defense.fit(train, {"codebook": Path(tmp) / "codebook.npy"}, seed=0)
        fit_s = time.perf_counter() - t0
    x_cpu = torch.from_numpy(load_fashion_mnist("test").as_float(0, args.batch))
    if features is not None:
        x_cpu = features(x_cpu)
    patches_cpu = extract_patches(x_cpu, cfg).contiguous()
    n_patches = patches_cpu.shape[0] * patches_cpu.shape[1]
    results: dict = {
        "config": {k: getattr(cfg, k) for k in ("layer", "depth", "radius", "stride", "codewords", "sample", "strategy", "eps")},
        "batch": args.batch, "threads": args.threads, "faiss_threads": args.faiss_threads, "torch": torch.__version__,
        "feature_shape": list(x_cpu.shape), "patches_per_batch": n_patches, "patch_dim": cfg.dim,
        "slices": patches_cpu.shape[0], "fit_seconds": round(fit_s, 2), "fit": defense.meta.get("seconds"),
        "devices": {},
    }
    print(f"torch {torch.__version__}, {args.threads} torch thread(s), {args.faiss_threads} faiss search thread(s)")
    print(f"layer {cfg.layer}: feature {list(x_cpu.shape)}, {patches_cpu.shape[0]} slice(s) x {patches_cpu.shape[1]} "
          f"patches of dim {cfg.dim} per batch of {args.batch}; K = {cfg.codewords}; fit {fit_s:.1f} s "
          f"(sampling {defense.meta['seconds']['sampling']} s, k-means {defense.meta['seconds']['kmeans']} s)")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        results["devices"][dev] = bench_device(dev, defense, x_cpu, patches_cpu, n_patches, args)
    if len(devices) == 1:
        print("\n(no CUDA device visible: GPU rows not measured)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def bench_device(dev: str, defense, x_cpu: torch.Tensor, patches_cpu: torch.Tensor, n_patches: int, args) -> dict:
    cb = defense.codebooks
    x = x_cpu.to(dev)
    patches = patches_cpu.to(dev)
    book = cb.tensor(torch.device(dev))
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rows: dict[str, float] = {}

    rows["defense"] = rate(lambda: defense.transform(x), args.seconds, sync)
    if dev == "cpu":
        configure_faiss(args.faiss_threads)
        host = [np.ascontiguousarray(p) for p in patches_cpu.numpy()]
        indexes = cb.cpu_indexes()
        rows["faiss search"] = rate(lambda: [ix.search(h, 1) for ix, h in zip(indexes, host)], args.seconds)
    elif faiss_has_gpu():
        indexes = cb.cuda_indexes()
        rows["faiss search"] = rate(lambda: [ix.search(p, 1) for ix, p in zip(indexes, patches)], args.seconds, sync)
    rows["torch brute force"] = rate(lambda: torch_nearest(patches, book), args.seconds, sync)
    backend = cb.backend(torch.device(dev))
    ref = "faiss search" if "faiss search" in rows else "torch brute force"
    print(f"\n[{dev}] defense search backend: {backend}; ratios against {ref}")
    print(f"{'':22s} {'patches/s':>12s} {'images/s':>10s} {'ratio':>7s}")
    out = {}
    for name, calls in rows.items():
        pps, ips = calls * n_patches, calls * args.batch
        ratio = calls / rows[ref]
        print(f"{name:22s} {pps:12,.0f} {ips:10,.0f} {ratio:7.2f}")
        out[name] = {"patches_per_s": round(pps), "images_per_s": round(ips, 1), "ratio": round(ratio, 3)}
    out["backend"] = backend  # type: ignore[assignment]
    return out


if __name__ == "__main__":
    main()
