"""``advshield study patches PIPELINE.toml``: the thesis's patch-replacement study
(``advshield.studies.study_patches``; the sweep is ``advshield.attacks.patch_study``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from advshield import studies


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="reproduce the source thesis's experiments (patch replacement sweep)")
    kinds = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    q = kinds.add_parser("patches", help="sweep patch replacement (codebook size, patch size, stride, strategy, "
                                         "layer) against adaptive attacks, beside bit depth, median and JPEG")
    q.add_argument("pipeline")
    q.add_argument("--dataset", choices=["pipeline", "mnist-5k"], default="pipeline",
                   help="the pipeline's model and [data] (default), or MNIST-5k with a small CNN trained here")
    q.add_argument("--grid", action="store_true", help="the full sweep (hours on 2 CPU cores) instead of the default points")
    q.add_argument("--smooth", action="store_true",
                   help="also sC&W examples: adaptive, and DDN/C&W/sC&W transfer from the undefended model")
    q.add_argument("--samples", type=int, default=50, help="test images attacked (default: %(default)s)")
    q.add_argument("--clean", type=int, default=1000, help="test images for clean accuracy (default: %(default)s)")
    q.add_argument("--steps", type=int, default=100, help="DDN and BP iterations (default: %(default)s)")
    q.add_argument("--smooth-steps", type=int, default=20, help="sC&W/C&W steps per binary-search step (default: %(default)s)")
    q.add_argument("--fit-images", type=int, default=5000, help="training images the codebooks learn from")
    q.add_argument("--sample", type=int, default=65536, help="training patches per slice for k-means")
    q.add_argument("--iterations", type=int, default=10, help="k-means iterations")
    q.add_argument("--feature-layer", default="", help="tensor of the 'first feature layer' (default: first ReLU)")
    q.add_argument("--only", action="append", default=[], metavar="LABEL", help="run only this configuration (repeatable)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    q.add_argument("--out", default=None, help="output folder (default: runs/study/<pipeline>)")
    q.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_study_patches)


def cmd_study_patches(args: argparse.Namespace) -> int:
    result = studies.study_patches(
        args.pipeline, out=args.out, dataset=args.dataset, grid=args.grid, samples=args.samples, clean=args.clean,
        attack_steps=args.steps, smooth=args.smooth, smooth_steps=args.smooth_steps, fit_images=args.fit_images,
        sample=args.sample, iterations=args.iterations, feature_layer=args.feature_layer, seed=args.seed,
        threads=args.threads, only=tuple(args.only), progress=not args.quiet)
    if args.json:
        print(Path(result["paths"]["json"]).read_text())
        return 0
    print(Path(result["paths"]["markdown"]).read_text())
    print(f"done in {result['seconds']} s; wrote {', '.join(result['paths'].values())}")
    return 0
