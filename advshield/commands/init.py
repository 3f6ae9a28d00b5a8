"""Getting started: ``advshield examples DIR`` (the shipped example pipelines and models, copied
into a working folder) and ``advshield init MODEL.onnx --data DIR`` (a pipeline file for a model
and an image folder). Each parses, calls ``advshield.api`` and prints."""

from __future__ import annotations

import argparse

from advshield import api


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("examples", help="copy the example pipelines and the reference models into a working folder")
    p.add_argument("dest", nargs="?", default="advshield-examples", help="folder to create (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite files already there")
    p.set_defaults(func=cmd_examples)


def cmd_examples(args) -> int:
    paths = api.copy_examples(args.dest, overwrite=args.force)
    print(f"copied {len(paths)} example pipelines and their models into {args.dest}:")
    for p in paths:
        print(f"  {p}")
    print(f"next: advshield fit {paths[0].parent}/fashion_mnist_squeeze.toml   (artifacts go next to the copy)")
    return 0
