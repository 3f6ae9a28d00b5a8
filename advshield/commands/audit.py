"""``advshield audit PIPELINE``: the adversarial audit, its report and the release gate.

Exit status: 0 when the gate passes, 1 when it fails, 2 on errors (bad configuration, missing
artifacts, unreachable server, any crash), so a CI job can tell a failed gate from a broken run.

Beyond one process (docs/scale.md): ``--ray [auto|ADDRESS] [--shards N]`` runs the batches as
shards on a Ray cluster; ``--shard I/N`` runs one shard into a folder (any scheduler) and
``advshield audit merge DIR... --out OUT`` joins such folders (then ``advshield audit PIPELINE
--out OUT`` with the shards' settings finishes: what is left, the probes, the report).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback

from advshield import api
from advshield.attacks.audit.shards import parse_shard
from advshield.core.errors import AdvshieldError, ConfigError
from advshield.demo import print_audit_summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="attack the defended pipeline, write the report, apply the release gate")
    p.add_argument("pipeline", help="the pipeline file; or `merge` and shard folders: advshield audit merge DIR... --out OUT")
    p.add_argument("folders", nargs="*", metavar="DIR", help="with `merge`: the shard folders to join")
    p.add_argument("--out", default=None, help="output folder (default: runs/audit/<pipeline name>)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a folder of images (one sub-folder per class), a folder of IDX files, or a .csv/.jsonl "
                        "manifest (path,label), in place of the pipeline's [data] set")
    p.add_argument("--samples", type=int, default=None, help="test images audited (default: [audit] samples or 200)")
    p.add_argument("--start", type=int, default=None, help="first test image (default: [audit] start or 0)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--attacks", nargs="+", default=None, metavar="ID", help="run only these attacks of the [audit] list")
    p.add_argument("--adaptive", choices=("auto", "on", "off"), default=None,
                   help="off: attacks ignore the defenses; auto/on: BPDA, EOT, detector-aware (default: [audit] or auto)")
    p.add_argument("--eot", type=int, default=None, help="EOT draws per gradient (default: [audit] eot_samples or 10 when random)")
    p.add_argument("--detector-aware", action=argparse.BooleanOptionalAction, default=None,
                   help="adaptive attacks include the detector's reject logit (default: [audit] detector_aware or yes)")
    p.add_argument("--protocol", choices=("cascade", "independent"), default=None,
                   help="cascade: each budget attack on the samples still robust; independent: the thesis's "
                        "protocol, every attack on every correct sample, judged with and without rounding "
                        "(default: [audit] protocol or cascade)")
    p.add_argument("--target", default=None, help="re-score through a live server: grpc://HOST:PORT[/MODEL]")
    p.add_argument("--token", default=None, help="bearer token for --target")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="fresh", action="store_false", help="keep the records already in --out (default)")
    g.add_argument("--fresh", dest="fresh", action="store_true", help="discard the records in --out and start over")
    c = p.add_mutually_exclusive_group()
    c.add_argument("--certify", action="store_true", help="run randomized-smoothing certification as a stage")
    c.add_argument("--certify-dir", default=None, help="read an `advshield certify` output folder instead")
    c.add_argument("--no-certify", action="store_true", help="skip certification even if the pipeline has [certify]")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice; 1 is best on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_ray_arguments(p, "batches")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N (0-based) of the batches into --out, for any scheduler "
                        "(e.g. a Kubernetes Indexed Job); join the folders with `advshield audit merge`")
    p.set_defaults(func=cmd_audit, fresh=False)


def add_ray_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """--ray, --shards, --shard-cpus, --shard-gpus (audit and certify)."""
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="auto|ADDRESS",
                   help=f"run the {what} as shards on a Ray cluster: no value starts a local one, `auto` joins "
                        "the running cluster (RAY_ADDRESS, a KubeRay head), else HOST:PORT or ray://HOST:PORT "
                        "(needs pip install 'advshield[ray]')")
    p.add_argument("--shards", type=int, default=0, help="with --ray: number of shards (default: one per "
                   "--shard-cpus of the cluster's CPUs)")
    p.add_argument("--shard-cpus", type=float, default=1.0, help="with --ray: CPUs of each shard task (default: 1)")
    p.add_argument("--shard-gpus", type=float, default=0.0, help="with --ray: GPUs of each shard task (default: 0)")


def ray_options(args) -> api.RayOptions | None:
    if args.ray is None:
        if args.shards:
            raise ConfigError("--shards: only with --ray (for one shard of a run elsewhere: --shard I/N)")
        return None
    return api.RayOptions(address=args.ray, shards=args.shards, cpus=args.shard_cpus, gpus=args.shard_gpus)


def cmd_audit(args) -> int:
    if args.pipeline == "merge":
        if not args.out:
            raise ConfigError("audit merge: give the merged folder with --out OUT")
        print(api.audit_merge(args.folders, args.out).describe())
        print(f"finish with: advshield audit PIPELINE --out {shlex.quote(args.out)} (the shards' settings)")
        return 0
    if args.folders:
        raise ConfigError(f"audit: unexpected arguments {' '.join(args.folders)} (to merge shard folders: "
                          f"advshield audit merge DIR... --out OUT)")
    options = ray_options(args)
    if args.shard is not None:
        if options is not None:
            raise ConfigError("--shard: runs one shard in this process; not with --ray, which runs them all")
        result = api.audit_shard_run(args.pipeline, parse_shard(args.shard), out=args.out, fresh=args.fresh,
                                     threads=args.threads, data=args.data, progress=not args.quiet,
                                     samples=args.samples, start=args.start, batch_size=args.batch_size,
                                     seed=args.seed, attacks=args.attacks, adaptive=args.adaptive,
                                     eot_samples=args.eot, detector_aware=args.detector_aware,
                                     protocol=args.protocol, target=args.target, token=args.token)
        print(result.describe())
        return 0
    try:
        command = "advshield audit " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["audit"] else ""
        certify = True if args.certify else (False if args.no_certify else None)
        result = api.audit(args.pipeline, out=args.out, samples=args.samples, start=args.start,
                           batch_size=args.batch_size, seed=args.seed, attacks=args.attacks, adaptive=args.adaptive,
                           eot_samples=args.eot, detector_aware=args.detector_aware, protocol=args.protocol,
                           target=args.target,
                           token=args.token, fresh=args.fresh, certify=certify, certify_dir=args.certify_dir,
                           threads=args.threads, data=args.data, progress=not args.quiet, command=command,
                           ray=options)
    except (AdvshieldError, KeyboardInterrupt):
        raise
    except Exception as e:  # a crash is an error (2), never a gate failure (1)
        traceback.print_exc()
        print(f"advshield audit: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print_audit_summary(result)
    return result.exit_code
