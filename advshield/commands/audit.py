"""``advshield audit PIPELINE``: the adversarial audit, its report and the release gate.

Exit status: 0 when the gate passes, 1 when it fails, 2 on errors (bad configuration, missing
artifacts, unreachable server, any crash), so a CI job can tell a failed gate from a broken run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from advshield.errors import AdvshieldError, ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="attack the defended pipeline, write the report, apply the release gate")
    p.add_argument("pipeline")
    p.add_argument("--out", default=None, help="output folder (default: runs/audit/<pipeline name>)")
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
        return _audit(args)
    except (AdvshieldError, KeyboardInterrupt):
        raise
    except Exception as e:  # a crash is an error (2), never a gate failure (1)
        traceback.print_exc()
        print(f"advshield audit: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _relative(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path.name


def pipeline_info(cfg: Any, checksums: dict[str, str]) -> dict[str, Any]:
    from advshield.plugin.config import sha256_file

    info = {"name": cfg.pipeline.name, "description": cfg.pipeline.description, "sha256": {}, "paths": {}}
    if cfg.source is not None:
        info["sha256"]["pipeline file"] = sha256_file(cfg.source)
        info["paths"]["pipeline file"] = cfg.source.name
    for name, (path, _) in cfg.files().items():
        info["sha256"][name] = checksums[name]
        info["paths"][name] = _relative(path, cfg.root)
    return info


def _certification(args, cfg, out: Path, images, labels, progress: bool):
    """(certify summary, certify records, base_for_sigma, spec) or Nones: read --certify-dir, or run
    the stage when asked (--certify, or a [certify] section) into OUT/certify (reused when done)."""
    from advshield.attacks.certify import certify_spec, run_certification
    from advshield.commands.certify import in_process_bases
    from advshield.data import load_dataset

    if args.no_certify or not (args.certify_dir or args.certify or "certify" in cfg.extra):
        return None
    spec = certify_spec(cfg)
    base_for_sigma = in_process_bases(cfg, spec)

    folder = Path(args.certify_dir) if args.certify_dir else out / "certify"
    summary_path, records_path = folder / "certify_summary.json", folder / "certify_records.jsonl"
    from advshield.configs import to_mapping

    if args.certify_dir:
        if not summary_path.is_file():
            raise ConfigError(f"--certify-dir: {summary_path} not found (run `advshield certify ... --out {folder}`)")
        summary = json.loads(summary_path.read_text())
        spec = certify_spec(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in summary["spec"].items()})
    elif summary_path.is_file() and not args.fresh and json.loads(summary_path.read_text()).get("spec") == json.loads(json.dumps(to_mapping(spec))):
        summary = json.loads(summary_path.read_text())
        print(f"certification: reusing {summary_path}")
    else:
        data = load_dataset(cfg.data.dataset, "test", cfg.data.directory or None)
        stop = min(spec.start + spec.samples, len(data))
        summary = run_certification(base_for_sigma, len(cfg.data.class_names), data.as_float(spec.start, stop),
                                    data.labels[spec.start:stop], spec, folder, progress=progress)
        summary.pop("records", None)
    rows = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()] if records_path.is_file() else []
    return summary, rows, base_for_sigma, spec


def _audit(args) -> int:
    import numpy as np
    import torch

    from advshield.attacks.audit import (
        PROBES,
        Auditor,
        audit_spec,
        build_setup,
        certificate_check,
        run_probes,
        write_json,
    )
    from advshield.attacks.gate import evaluate_gate
    from advshield.attacks.masking import masking_warnings
    from advshield.attacks.report import build_report, compute_metrics, distortion_budget, write_report
    from advshield.data import load_dataset
    from advshield.plugin.config import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cfg = load_pipeline(args.pipeline)
    spec = audit_spec(cfg, samples=args.samples, start=args.start, batch_size=args.batch_size, seed=args.seed,
                      adaptive=args.adaptive, eot_samples=args.eot, detector_aware=args.detector_aware)
    if args.attacks:
        spec = spec.select(args.attacks)
    spec = spec.with_gate_eps(cfg.gate.gate_eps)
    out = Path(args.out or f"runs/audit/{cfg.pipeline.name}")
    checksums = cfg.checksums(verify=True)
    data = load_dataset(cfg.data.dataset, "test", cfg.data.directory or None)
    stop = min(spec.start + spec.samples, len(data))
    if stop <= spec.start:
        raise ConfigError(f"audit.start: {spec.start} is past the end of the test split ({len(data)} images)")
    images, labels = data.as_float(spec.start, stop), np.asarray(data.labels[spec.start:stop], np.int64)
    progress = not args.quiet

    scorer = None
    parity = None
    if args.target:
        from advshield.commands.certify import parse_target
        from advshield.plugin.client import RemoteClassifier

        url, model = parse_target(args.target)
        scorer = RemoteClassifier(url, model, token=args.token)
    setup = build_setup(cfg, spec, torch.from_numpy(images[:16]), scorer=scorer)
    if scorer is not None:
        from advshield.deploy.triton import serving_parity
        from advshield.plugin.pipeline import DefendedClassifier

        parity = serving_parity(DefendedClassifier.from_config(cfg), scorer, torch.from_numpy(images[:16]), seed=spec.seed)
        print(f"scoring through {scorer!r}; parity with the in-process pipeline on 16 images: {parity}")
    header = {"pipeline.files": checksums, "target": args.target, "data": f"{cfg.data.dataset}:test[{spec.start}:{stop}]"}
    auditor = Auditor(setup, spec, images, labels, out, fresh=args.fresh, progress=progress, header=header)
    if auditor.log.done:
        print(f"resuming: {len(auditor.log.done)} batches already in {out / 'records.jsonl'}")
    records = auditor.run()

    probes = run_probes(setup, images, labels, auditor.correct, spec.seed)
    if parity is not None:
        probes["serving_parity"] = parity
    metrics = compute_metrics(records, spec, setup.mode)

    budget = None
    violations: list = []
    cert = _certification(args, cfg, out, images, labels, progress)
    if cert is not None:
        summary, cert_rows, base_for_sigma, cspec = cert
        budget = distortion_budget(summary, metrics, cfg.gate.certified_accuracy_target)
        if spec.certify_checks and cert_rows:
            from advshield.attacks.adaptive import AttackModel
            from advshield.defenses.randomization import GaussianNoise, GaussianNoiseConfig

            def smoothed_model(sigma: float):  # the smoothed pipeline, whatever the audit's mode
                noise = GaussianNoise(GaussianNoiseConfig(sigma=sigma, clip=False))
                return AttackModel(setup.twin, [noise, *setup.defenses], eot_samples=16, seed=spec.seed)

            by_sample = {spec.start + i: images[i] for i in range(len(images))}
            check = certificate_check(base_for_sigma, len(cfg.data.class_names), cert_rows, cspec, out, records, by_sample,
                                      attack_model_for_sigma=smoothed_model, checks=spec.certify_checks, seed=spec.seed,
                                      progress=progress)
            budget["certificate_check"] = check
            violations = check["violations"]
    write_json(out / PROBES, probes)
    warnings = [w.to_dict() for w in masking_warnings(records, probes, spec.masking_tolerance, violations)]
    gate = evaluate_gate(cfg.gate, metrics, gate_norm=spec.gate_norm, warnings=len(warnings), budget=budget)
    command = "advshield audit " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["audit"] else ""
    report = build_report(pipeline=pipeline_info(cfg, checksums), spec=spec, probes=probes, metrics=metrics,
                          warnings=warnings, gate=gate.to_dict(), budget=budget, command=command,
                          seconds=time.perf_counter() - t_start)
    json_path, md_path = write_report(out, report)
    _print_summary(metrics, warnings, gate, json_path, md_path)
    return 0 if gate.passed else 1


def _print_summary(metrics, warnings, gate, json_path: Path, md_path: Path) -> None:
    print(f"\nclean accuracy {metrics['clean_accuracy']:.3f} on {metrics['samples']} samples")
    for norm, t in metrics["robust_accuracy"].items():
        print(f"robust accuracy {norm}: " + "  ".join(f"{e:g}: {a:.3f}" for e, a in zip(t["eps"], t["all attacks"])))
    best = metrics.get("best_minimal")
    if best:
        print(f"best of {', '.join(best['attacks'])}: P_suc {best['p_suc']:.3f}, median L2 {best['median_distortion']:.3f}, "
              f"P_upp {best.get('p_upp', float('nan')):.3f}")
    for w in warnings:
        print(f"WARNING {w['code']}: {w['message']}")
    print(f"report: {md_path}\n        {json_path}")
    print(f"gate: {'PASS' if gate.passed else 'FAIL'}" + ("" if gate.passed else " (" + "; ".join(gate.reasons) + ")"))
