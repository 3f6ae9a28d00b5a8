"""``advshield certify``: randomized-smoothing certification over the defended pipeline."""

from __future__ import annotations

import argparse

from advshield import api
from advshield.commands.audit import add_ray_arguments, ray_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certify", help="certify test images with randomized smoothing over the whole pipeline")
    p.add_argument("pipeline")
    p.add_argument("--sigma", type=float, action="append", help="noise level (repeatable; default: [certify] sigmas)")
    p.add_argument("--model", action="append", help="noise-trained base model per --sigma (repeatable, same order; "
                   "e.g. from `advshield train --noise-sigma S`)")
    p.add_argument("--n0", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--samples", type=int)
    p.add_argument("--start", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--target", default=None,
                   help="score through a live server instead of in process: grpc://HOST:PORT[/MODEL]")
    p.add_argument("--token", default=None, help="bearer token for --target")
    p.add_argument("--out", default=None, help="output folder (default: runs/certify/<pipeline name>)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a folder of images (one sub-folder per class), a folder of IDX files, or a .csv/.jsonl "
                        "manifest (path,label), in place of the pipeline's [data] set")
    p.add_argument("--quiet", action="store_true")
    add_ray_arguments(p, "samples")
    p.set_defaults(func=cmd_certify)


def cmd_certify(args) -> int:
    result = api.certify(args.pipeline, out=args.out, sigmas=args.sigma, models=args.model, n0=args.n0, n=args.n,
                         alpha=args.alpha, samples=args.samples, start=args.start, batch_size=args.batch_size,
                         seed=args.seed, target=args.target, token=args.token, data=args.data,
                         progress=not args.quiet, ray=ray_options(args))
    if args.target:
        print(f"certified through {result.scorer} (noise is clipped to [0, 1] on the wire)")
    summary, budgets, target = result.summary, result.budget, result.target
    spec = summary["spec"]
    samples = next(iter(summary["sigmas"].values()))["samples"]
    print(f"\ncertified accuracy ({samples} test images, n0={spec['n0']}, n={spec['n']}, alpha={spec['alpha']}):")
    print("sigma   " + "".join(f"r={r:<6g}" for r in spec["radii"]) + "  abstain  budget@" + f"{target:g}" + "  seconds")
    for sigma, v in summary["sigmas"].items():
        print(f"{sigma:<8}" + "".join(f"{a:<8.3f}" for a in v["certified_accuracy"])
              + f"  {v['abstain_rate']:<7.3f}  {budgets[sigma]:<9g}  {v['seconds']:.1f}")
    print(f"records: {result.records_path}\nplot:    {result.plot_path}")
    return 0
