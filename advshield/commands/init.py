"""Getting started: ``advshield examples DIR`` (the shipped example pipelines and models, copied
into a working folder) and ``advshield init MODEL.onnx --data DIR`` (a pipeline file for a model
and an image folder). Each parses, calls ``advshield.api`` and prints."""

from __future__ import annotations

import argparse
import json

from advshield import api


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("examples", help="copy the example pipelines and the reference models into a working folder")
    p.add_argument("dest", nargs="?", default="advshield-examples", help="folder to create (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite files already there")
    p.set_defaults(func=cmd_examples)

    p = sub.add_parser("init", help="write a pipeline file for an ONNX model and an image folder (or manifest)")
    p.add_argument("model", help="the ONNX classifier, as exported")
    p.add_argument("--data", default=None, help="image folder (one sub-folder per class) or a CSV/JSONL manifest")
    p.add_argument("--out", default=None, help="pipeline file to write (default: MODEL_STEM.toml here)")
    p.add_argument("--name", default=None, help="pipeline name (default: the model file's stem)")
    p.add_argument("--mean", type=float, nargs="+", default=(), help="per-channel mean the model subtracts")
    p.add_argument("--std", type=float, nargs="+", default=(), help="per-channel std the model divides by")
    p.add_argument("--scale", type=float, default=1.0, help="the model takes pixels * scale (255 for 0-255 models)")
    p.add_argument("--layout", choices=("auto", "nchw", "nhwc"), default="auto")
    p.add_argument("--force", action="store_true", help="overwrite the pipeline file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_init)


def cmd_examples(args) -> int:
    paths = api.copy_examples(args.dest, overwrite=args.force)
    print(f"copied {len(paths)} example pipelines and their models into {args.dest}:")
    for p in paths:
        print(f"  {p}")
    print(f"next: advshield fit {paths[0].parent}/fashion_mnist_squeeze.toml   (artifacts go next to the copy)")
    return 0


def cmd_init(args) -> int:
    result = api.init(args.model, args.data, args.out, name=args.name, mean=tuple(args.mean), std=tuple(args.std),
                      scale=args.scale, layout=args.layout, overwrite=args.force)
    if args.json:
        print(json.dumps(result.summary, indent=2))
        return 0
    s = result.summary
    c, h, w = s["input"]
    names = s["class_names"]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)})" if len(names) > 8 else "")
    print(f"wrote {result.path}: input {c}x{h}x{w} {s['layout'].upper()}, "
          f"{'batch ' + str(s['batch']) if s['batch'] else 'dynamic batch'}, output {s['output']}, classes {shown}")
    print(f"next:\n  advshield info {result.path}\n  advshield fit {result.path}      (when a defense or detector needs it)"
          f"\n  advshield audit {result.path}")
    return 0
