"""The ``advshield`` console command. Each command group lives in ``advshield.commands.<name>``
and exposes ``register(subparsers)``; the group adds its sub-commands with ``set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from advshield.core.errors import AdvshieldError
from advshield.core.version import __version__

COMMAND_MODULES = (
    "advshield.commands.core",  # train, info, predict, demo
    "advshield.commands.init",  # examples, init
    "advshield.commands.fit",  # fit
    "advshield.commands.serve",  # serve, score
    "advshield.commands.certify",  # certify
    "advshield.commands.audit",  # audit
    "advshield.commands.study",  # study patches
    "advshield.commands.deploy",  # deploy triton, deploy triton-env
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advshield",
        description="Defend, audit and certify image classifiers served by ONNX Runtime or Triton.",
    )
    parser.add_argument("--version", action="version", version=f"advshield {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AdvshieldError as e:
        print(f"advshield {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
