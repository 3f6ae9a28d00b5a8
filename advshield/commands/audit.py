"""``advshield audit PIPELINE``: the adversarial audit, its report and the release gate.

Exit status: 0 when the gate passes, 1 when it fails, 2 on errors (bad configuration, missing
artifacts, unreachable server, any crash), so a CI job can tell a failed gate from a broken run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback

from advshield import api
from advshield.core.errors import AdvshieldError
from advshield.demo import print_audit_summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="attack the defended pipeline, write the report, apply the release gate")
    p.add_argument("pipeline")
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
    p.set_defaults(func=cmd_audit, fresh=False)


def cmd_audit(args) -> int:
    try:
        command = "advshield audit " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["audit"] else ""
        certify = True if args.certify else (False if args.no_certify else None)
        result = api.audit(args.pipeline, out=args.out, samples=args.samples, start=args.start,
                           batch_size=args.batch_size, seed=args.seed, attacks=args.attacks, adaptive=args.adaptive,
                           eot_samples=args.eot, detector_aware=args.detector_aware, protocol=args.protocol,
                           target=args.target,
                           token=args.token, fresh=args.fresh, certify=certify, certify_dir=args.certify_dir,
                           threads=args.threads, data=args.data, progress=not args.quiet, command=command)
    except (AdvshieldError, KeyboardInterrupt):
        raise
    except Exception as e:  # a crash is an error (2), never a gate failure (1)
        traceback.print_exc()
        print(f"advshield audit: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print_audit_summary(result)
    return result.exit_code
