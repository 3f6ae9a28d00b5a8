"""Randomized-smoothing throughput: noise samples per second through the whole pipeline (noise
drawn, defenses, classifier, vote counting) next to raw ONNX Runtime inference on the same noisy
batches, measured side by side in one run.

    python benchmarks/certify.py [--pipeline P.toml] [--images 4] [--n 2000] [--batch-size 500]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from advshield.core.data import load_fashion_mnist
from advshield.plugin.classifiers import OnnxClassifier
from advshield.plugin.config import load_pipeline
from advshield.plugin.pipeline import DefendedClassifier
from advshield.plugin.smoothing import SmoothedClassifier, SmoothingConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=str(ROOT / "advshield" / "pipelines" / "fashion_mnist.toml"))
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--n", type=int, default=2000, help="noise samples per image")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_pipeline(args.pipeline)
    x = torch.from_numpy(load_fashion_mnist("test").as_float(0, args.images))
    ort_clf = OnnxClassifier(cfg.model_path, threads=args.threads, validate=False)
    defended = DefendedClassifier.from_config(cfg, classifier=ort_clf)
    total = args.images * args.n

    # 1. the raw limit: ONNX Runtime on pre-drawn noisy batches of the same size
    g = torch.Generator().manual_seed(0)
    batches = [(xi.expand(args.batch_size, *xi.shape) + args.sigma * torch.randn((args.batch_size, *xi.shape), generator=g)).numpy()
               for xi in x for _ in range(args.n // args.batch_size)]
    ort_clf.run(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        np.bincount(ort_clf.run(b).argmax(1), minlength=10)
    raw = total / (time.perf_counter() - t0)

    # 2. the smoothing code over the whole pipeline (noise drawn inside, defenses, counting)
    smoothed = SmoothedClassifier(defended.logits, defended.num_classes,
                                  SmoothingConfig(sigma=args.sigma, n0=1, n=args.n, batch_size=args.batch_size))
    smoothed.sample_counts(x[0], args.batch_size, torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    for i, xi in enumerate(x):
        smoothed.sample_counts(xi, args.n, torch.Generator().manual_seed(i))
    ours = total / (time.perf_counter() - t0)

    steps = ", ".join(e.type for e in cfg.defenses) or "no defenses"
    print(f"pipeline {cfg.pipeline.name} ({steps}), sigma {args.sigma}, {args.images} images x {args.n} samples, "
          f"batch {args.batch_size}, {args.threads} threads")
    print(f"{'path':<44}{'samples/s':>12}{'ratio':>8}")
    print(f"{'onnxruntime on pre-drawn noisy batches':<44}{raw:>12,.0f}{1.0:>8.2f}")
    print(f"{'smoothing over the pipeline (draw+defend)':<44}{ours:>12,.0f}{ours / raw:>8.2f}")
    print(f"certifying one image with n={args.n}, n0=100 takes about {(args.n + 100) / ours:.2f} s here")


if __name__ == "__main__":
    main()
