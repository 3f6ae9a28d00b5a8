"""``advshield fit PIPELINE.toml``: learn the pipeline's artifacts (``advshield.api.fit``; the data
split and settings are described in ``advshield.plugin.fitting``)."""

from __future__ import annotations

import argparse
import json
import sys

from advshield import api


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="learn the pipeline's artifacts (codebooks, detector threshold) on the train split")
    p.add_argument("pipeline")
    p.add_argument("--samples", type=int, default=None, help="training images for defenses that learn (default: [fit] or 20000)")
    p.add_argument("--calibration", type=int, default=None,
                   help="held-out training images for the detector threshold (default: [fit] or 10000)")
    p.add_argument("--seed", type=int, default=None, help="seed of the data split and of random steps (default: [fit] or 0)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a folder of images (one sub-folder per class), a folder of IDX files, or a .csv/.jsonl "
                        "manifest (path,label), in place of the pipeline's [data] set")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fit)


def cmd_fit(args: argparse.Namespace) -> int:
    summary = api.fit(args.pipeline, samples=args.samples, calibration=args.calibration, seed=args.seed,
                      batch_size=args.batch_size, data=args.data, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if "note" in summary:
        print(summary["note"])
        return 0
    if summary.get("data"):
        d = summary["data"]
        skipped = f", {d['skipped']} unreadable skipped" if d.get("skipped") else ""
        print(f"data: {d['dataset']} {d['source']}: {d['images']} training images ({d['split_by']}){skipped}")
    for d in summary["defenses"]:
        print(f"defense {d['index']} ({d['type']}): fitted on {d['images']} training images in {d['seconds']} s")
    det = summary["detector"]
    if det:
        print(f"detector ({det['type']}): threshold {det['threshold']:.6g} at target fpr {det['fpr_target']:g} "
              f"(fpr {det['fpr_calibration']:.4f} on {det['samples']} held-out training images)")
        if "warning" in det:
            print(f"  warning: {det['warning']}", file=sys.stderr)
    for name, a in summary["artifacts"].items():
        print(f"artifacts.{name:<20} sha256 {a['sha256']}  {a['path']}")
        if "warning" in a:
            print(f"  warning: {a['warning']}", file=sys.stderr)
    print(f"done in {summary['seconds']} s; pin the sha256s in the pipeline's [artifacts] entries to freeze them")
    return 0
