"""The whole audit of a pipeline in one call (``advshield.audit``, ``advshield audit``).

The pipeline file's test images -> the attack models for the audit's mode -> the runner's
records (resumable) -> the masking probes -> the metrics -> the certification stage and its
sanity check (when asked) -> masking warnings -> the release gate -> ``report.json`` and the
rendered reports. Everything is written under ``out``; the result carries it all.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from advshield.attacks.adaptive import AttackModel
from advshield.attacks.audit import (
    PROBES,
    RECORDS,
    Auditor,
    AuditSpec,
    Setup,
    audit_spec,
    build_setup,
    certificate_check,
    derive_seed,
    run_probes,
    write_json,
)
from advshield.attacks.audit.shards import canonical, plan_shards, unit_order
from advshield.attacks.certify import (
    BaseForSigma,
    CertifySpec,
    certify_spec,
    in_process_bases,
    output_classes,
    run_certification,
)
from advshield.attacks.gate import GateResult, evaluate_gate
from advshield.attacks.masking import masking_warnings
from advshield.attacks.report import build_report, compute_metrics, distortion_budget, write_report
from advshield.core.errors import ConfigError
from advshield.core.hashing import sha256_file
from advshield.core.validation import to_mapping
from advshield.defenses.randomization import GaussianNoise, GaussianNoiseConfig
from advshield.plugin.classifiers import TwinClassifier
from advshield.plugin.client import RemoteClassifier, parse_target, serving_parity
from advshield.plugin.config import PipelineConfig
from advshield.plugin.datasets import DataSplit, evaluated, load_data
from advshield.plugin.pipeline import DefendedClassifier
from advshield.plugin.served import resolve_served


@dataclass
class AuditResult:
    """Everything an audit produced: per-sample records, metrics, masking warnings, the gate's
    verdict, the distortion budget (with certification) and the paths of the files written."""

    out: Path
    spec: AuditSpec
    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    warnings: list[dict[str, Any]]
    gate: GateResult
    report: dict[str, Any]
    probes: dict[str, Any]
    budget: dict[str, Any] | None = None
    paths: dict[str, Path] = field(default_factory=dict)  # records, probes, report_json, report_md, ...

    @property
    def passed(self) -> bool:
        return self.gate.passed

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 0 when the gate passes, 1 when it fails."""
        return 0 if self.gate.passed else 1


def _relative(path: Path, root: Path) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path.name


def pipeline_info(cfg: PipelineConfig, checksums: dict[str, str], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Name, description, sha256 and relative path of every file the pipeline uses, and the
    description of the evaluated data (``advshield.plugin.datasets``), for the report."""
    info: dict[str, Any] = {"name": cfg.pipeline.name, "description": cfg.pipeline.description, "sha256": {}, "paths": {}}
    if data is not None:
        info["data"] = data
    if cfg.source is not None:
        info["sha256"]["pipeline file"] = sha256_file(cfg.source)
        info["paths"]["pipeline file"] = cfg.source.name
    for name, (path, _) in cfg.files().items():
        info["sha256"][name] = checksums[name]
        info["paths"][name] = _relative(path, cfg.root)
    return info


def _certification(cfg: PipelineConfig, out: Path, *, certify: bool | None, certify_dir: str | Path | None,
                   fresh: bool, progress: bool, test: DataSplit, run: Callable[..., dict] = run_certification
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], BaseForSigma, CertifySpec] | None:
    """(certify summary, certify records, base_for_sigma, spec) or None: read ``certify_dir``, or
    run the stage when asked (``certify``, or None with a [certify] section) into OUT/certify
    (reused when done with the same settings on the same images)."""
    if certify is False or not (certify_dir or certify or "certify" in cfg.extra):
        return None
    spec = certify_spec(cfg)
    base_for_sigma = in_process_bases(cfg, spec)
    folder = Path(certify_dir) if certify_dir else out / "certify"
    summary_path, records_path = folder / "certify_summary.json", folder / "certify_records.jsonl"
    if certify_dir:
        if not summary_path.is_file():
            raise ConfigError(f"certify_dir: {summary_path} not found (run `advshield certify ... --out {folder}`)")
        summary = json.loads(summary_path.read_text())
        spec = certify_spec(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in summary["spec"].items()})
        return summary, _rows(records_path), base_for_sigma, spec
    data = test.data
    stop = min(spec.start + spec.samples, len(data))
    if stop <= spec.start:
        raise ConfigError(f"certify.start: {spec.start} is past the end of the test split ({len(data)} images)")
    data_info = evaluated(test, spec.start, stop)
    old = json.loads(summary_path.read_text()) if summary_path.is_file() and not fresh else {}
    if (old.get("spec") == json.loads(json.dumps(to_mapping(spec)))
            and old.get("data", {}).get("evaluated_sha256") == data_info["evaluated_sha256"]):
        summary = old
        print(f"certification: reusing {summary_path}")
    else:
        images = data.as_float(spec.start, stop)
        summary = run(base_for_sigma, output_classes(base_for_sigma, spec.sigmas[0], images), images,
                      data.labels[spec.start:stop], spec, folder, progress=progress)
        summary.pop("records", None)
        summary["data"] = data_info
        summary_path.write_text(json.dumps(summary, indent=2))
    return summary, _rows(records_path), base_for_sigma, spec


@dataclass
class AuditInputs:
    """What an audit starts from, whole, one shard of it or a Ray driver: the spec with its
    overrides, the verified checksums, the evaluated images and labels, the attack setup and the
    records' header (the settings every shard of the audit must share)."""

    spec: AuditSpec
    out: Path
    checksums: dict[str, str]
    test: DataSplit
    data_info: dict[str, Any]
    images: np.ndarray
    labels: np.ndarray
    setup: Setup
    header: dict[str, Any]
    target: str | None = None
    token: str | None = None
    parity: dict[str, Any] | None = None
    only: range | None = None  # a shard's batches (``shard``)


def audit_inputs(cfg: PipelineConfig, *, out: str | Path | None = None, samples: int | None = None,
                 start: int | None = None, batch_size: int | None = None, seed: int | None = None,
                 attacks: Sequence[str] | None = None, adaptive: Literal["auto", "on", "off"] | None = None,
                 eot_samples: int | None = None, detector_aware: bool | None = None,
                 protocol: Literal["cascade", "independent"] | None = None, target: str | None = None,
                 token: str | None = None, shard: tuple[int, int] | None = None) -> AuditInputs:
    """The inputs of ``audit_pipeline`` (same parameters). ``shard`` = (I, N): shard I of N of the
    audit's batches (``only``; ``attacks/audit/shards.py``): only its images and the first 16 (the
    randomness probe) are converted, the others stay zero, and a shard never reads them."""
    spec = audit_spec(cfg, samples=samples, start=start, batch_size=batch_size, seed=seed, adaptive=adaptive,
                      eot_samples=eot_samples, detector_aware=detector_aware, protocol=protocol)
    if attacks:
        spec = spec.select(attacks)
    spec = spec.with_gate_eps(cfg.gate.gate_eps)
    if cfg.served_model and cfg.served is None:  # the served model's shape and classes, from its server (checked)
        cfg = resolve_served(cfg)
    checksums = cfg.checksums(verify=True)
    test = load_data(cfg, "test")
    data = test.data
    stop = min(spec.start + spec.samples, len(data))
    if stop <= spec.start:
        raise ConfigError(f"audit.start: {spec.start} is past the end of the test split ({len(data)} images)")
    data_info = evaluated(test, spec.start, stop)
    only = None
    if shard is None:
        images = data.as_float(spec.start, stop)
    else:
        plan = plan_shards(-(-(stop - spec.start) // spec.batch_size), shard[1])
        if shard[0] >= len(plan):
            raise ConfigError(f"--shard {shard[0]}/{shard[1]}: the audit has only {len(plan)} batches of "
                              f"{spec.batch_size}; use at most {len(plan)} shards")
        only = plan[shard[0]]
        lo, hi = only.start * spec.batch_size, min(only.stop * spec.batch_size, stop - spec.start)
        first = data.as_float(spec.start, min(spec.start + 16, stop))
        images = np.zeros((stop - spec.start, *first.shape[1:]), np.float32)  # pages never written stay unallocated
        images[: len(first)] = first
        images[lo:hi] = data.as_float(spec.start + lo, spec.start + hi)
    labels = np.asarray(data.labels[spec.start:stop], np.int64)
    scorer = None
    parity = None
    if target:
        url, model = parse_target(target)
        scorer = RemoteClassifier(url, model, token=token, rate=spec.query_rate, concurrency=spec.query_concurrency,
                                  retries=spec.query_retries)
    setup = build_setup(cfg, spec, torch.from_numpy(images[:16]), scorer=scorer)
    if scorer is not None:
        parity = serving_parity(DefendedClassifier.from_config(cfg), scorer, torch.from_numpy(images[:16]), seed=spec.seed)
        print(f"scoring through {scorer!r}; parity with the in-process pipeline on 16 images: {parity}")
    header = {"pipeline.files": checksums, "target": target, "data": data_info}
    return AuditInputs(spec, Path(out or f"runs/audit/{cfg.pipeline.name}"), checksums, test, data_info, images,
                       labels, setup, header, target, token, parity, only)


def _rows(records_path: Path) -> list[dict[str, Any]]:
    return ([json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
            if records_path.is_file() else [])


def audit_pipeline(
    cfg: PipelineConfig,
    *,
    out: str | Path | None = None,
    samples: int | None = None,
    start: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    attacks: Sequence[str] | None = None,
    adaptive: Literal["auto", "on", "off"] | None = None,
    eot_samples: int | None = None,
    detector_aware: bool | None = None,
    protocol: Literal["cascade", "independent"] | None = None,
    target: str | None = None,
    token: str | None = None,
    fresh: bool = False,
    certify: bool | None = None,
    certify_dir: str | Path | None = None,
    progress: bool = True,
    command: str = "",
    shards: Callable[[Auditor, AuditInputs], None] | None = None,
    certify_run: Callable[..., dict] | None = None,
) -> AuditResult:
    """Audit ``cfg``: the ``[audit]`` section with these overrides (None keeps the file's value).

    ``out`` defaults to runs/audit/<pipeline name>; its records are resumed unless ``fresh``.
    ``target`` (grpc://HOST:PORT[/MODEL]) re-scores every example through a live server.
    ``certify``: True runs the certification stage, False skips it, None runs it when the
    pipeline has a [certify] section; ``certify_dir`` reads an ``advshield certify`` output folder.
    ``shards(auditor, inputs)`` runs units elsewhere and merges them into ``auditor`` before it runs
    what is left (``attacks/distributed.py``: shards on a Ray cluster); ``certify_run`` certifies
    in the certification stage (``run_certification``'s signature; there: ``ray_certify``).
    """
    t_start = time.perf_counter()
    if cfg.served_model and cfg.served is None:
        cfg = resolve_served(cfg)
    inputs = audit_inputs(cfg, out=out, samples=samples, start=start, batch_size=batch_size, seed=seed,
                          attacks=attacks, adaptive=adaptive, eot_samples=eot_samples, detector_aware=detector_aware,
                          protocol=protocol, target=target, token=token)
    spec, out, checksums, test, data_info = inputs.spec, inputs.out, inputs.checksums, inputs.test, inputs.data_info
    images, labels, setup, parity = inputs.images, inputs.labels, inputs.setup, inputs.parity
    auditor = Auditor(setup, spec, images, labels, out, fresh=fresh, progress=progress, header=inputs.header)
    if auditor.log.done:
        print(f"resuming: {len(auditor.log.done)} batches already in {out / RECORDS}")
    if shards is not None:
        shards(auditor, inputs)  # e.g. the shards on a Ray cluster, merged into auditor (attacks/distributed.py)
    records = auditor.run()  # the rest: everything (one process), or what the shards leave (the sanity unit)
    records = canonical(records, unit_order(auditor))  # one process's order, whoever ran the units

    # after the cascade: gradient and randomness probes, then the attack probes (independent runs on
    # probe_samples correct samples at the gate's eps) and the BPDA approximation error
    probes = run_probes(setup, images, labels, auditor.correct, spec.seed, auditor=auditor, gate_eps=cfg.gate.gate_eps)
    if parity is not None:
        probes["serving_parity"] = parity
    setup.mode["verdict_basis"] = verdict_basis({r["source"] for r in records} | {u.source for u in auditor.units()},
                                                setup)
    metrics = compute_metrics(records, spec, setup.mode)
    if "black_box" in metrics:  # who answered the black-box queries, and under which limit
        bb = metrics["black_box"]
        bb["endpoint"] = inputs.target or "in process"
        bb["rate_limit"] = spec.query_rate if inputs.target else None
        bb["concurrency"] = spec.query_concurrency if inputs.target else None
    if hasattr(setup.scorer, "stats"):
        probes["client"] = setup.scorer.stats()  # every request of the audit through the endpoint

    budget = None
    violations: list[dict[str, Any]] = []
    cert = _certification(cfg, out, certify=certify, certify_dir=certify_dir, fresh=fresh, progress=progress, test=test,
                          run=certify_run or run_certification)
    if cert is not None:
        summary, cert_rows, base_for_sigma, cspec = cert
        budget = distortion_budget(summary, metrics, cfg.gate.certified_accuracy_target)
        if spec.certify_checks and cert_rows and setup.white_box:  # the check attacks the twin
            check = _certificate_check(cfg, setup, spec, out, images, records, cert_rows, base_for_sigma, cspec, progress)
            budget["certificate_check"] = check
            violations = check["violations"]
    write_json(out / PROBES, probes)
    warnings = [w.to_dict() for w in masking_warnings(records, probes, spec.masking_tolerance, violations,
                                                      convergence_tolerance=spec.convergence_tolerance,
                                                      bpda_tolerance=spec.bpda_tolerance)]
    gate = evaluate_gate(cfg.gate, metrics, gate_norm=spec.gate_norm, warnings=len(warnings), budget=budget)
    report = build_report(pipeline=pipeline_info(cfg, checksums, data_info), spec=spec, probes=probes, metrics=metrics,
                          warnings=warnings, gate=gate.to_dict(), budget=budget, command=command,
                          seconds=time.perf_counter() - t_start)
    files = write_report(out, report)
    paths = {"records": out / RECORDS, "probes": out / PROBES, "report_json": files.json,
             "report_md": files.markdown, "report_html": files.html}
    return AuditResult(out, spec, records, metrics, warnings, gate, report, probes, budget, paths)


SOURCES = ("white-box", "transfer", "black-box")


def verdict_basis(ran: set[str], setup: Setup) -> dict[str, Any]:
    """Which kinds of attack the verdict rests on: the sources of the attacks the audit ran
    (``ran``: white-box on the twin, transfer from the surrogate, black-box on the serving path's
    answers; an attack whose samples earlier ones had all broken still counts), and why white-box
    attacks did not run when they did not (a served model without a twin)."""
    out: dict[str, Any] = {"sources": [s for s in SOURCES if s in ran], "white_box": bool(setup.white_box)}
    served = setup.mode.get("served_model")
    if served is not None:
        out["classifier"] = served.get("classifier", "")
        if not setup.white_box:
            out["reason"] = served.get("reason", "")
        if "twin_parity" in served:
            out["twin_parity"] = served["twin_parity"]
    return out


def _certificate_check(cfg: PipelineConfig, setup: Setup, spec: AuditSpec, out: Path, images: np.ndarray,
                       records: list[dict[str, Any]], cert_rows: list[dict[str, Any]],
                       base_for_sigma: BaseForSigma, cspec: CertifySpec, progress: bool) -> dict[str, Any]:
    """The certified-radius sanity check, attacking the smoothed classifier that was certified: the
    noise-trained base model of each sigma when ``[certify] models`` names one (its own twin), else
    the deployed model's twin; the pipeline's defenses in both cases."""
    twins: dict[str, TwinClassifier] = {}

    def twin_for(sigma: float) -> Any:
        if not cspec.models:
            return setup.twin
        path = str(cfg.resolve(cspec.models[cspec.sigmas.index(sigma)]))
        if path not in twins:
            twins[path] = TwinClassifier(path, device=cfg.model.device, tolerance=cfg.model.parity_tolerance,
                                         validate=False)
        return twins[path]

    def smoothed_model(sigma: float) -> AttackModel:
        noise = GaussianNoise(GaussianNoiseConfig(sigma=sigma, clip=False))
        return AttackModel(twin_for(sigma), [noise, *setup.defenses], eot_samples=16,
                           seed=derive_seed(spec.seed, "certificate attack", sigma))

    by_sample = {spec.start + i: images[i] for i in range(len(images))}
    return certificate_check(base_for_sigma, output_classes(base_for_sigma, cspec.sigmas[0], images), cert_rows,
                             cspec, out, records, by_sample,
                             attack_model_for_sigma=smoothed_model, checks=spec.certify_checks, seed=spec.seed,
                             progress=progress)
