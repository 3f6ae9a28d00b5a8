"""Certification runs: randomized smoothing over the whole defended pipeline, per-sample records,
certified accuracy as a function of radius, and the certified distortion budget.

The base classifier for sigma is the pipeline's defenses followed by its classifier (a
noise-trained model for that sigma when the ``[certify]`` section names one); Gaussian noise is
added to the input before the defenses. A remote classifier (Triton or advshield's server over
gRPC) can stand in for the whole pipeline, since smoothing needs only labels.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from advshield.attacks.audit.records import derive_seed
from advshield.core.errors import ConfigError
from advshield.core.progress import progress as progress_bar
from advshield.core.validation import check, from_mapping
from advshield.plugin.classifiers import OnnxClassifier
from advshield.plugin.client import RemoteClassifier, parse_target
from advshield.plugin.config import PipelineConfig
from advshield.plugin.datasets import evaluated, load_data
from advshield.plugin.pipeline import DefendedClassifier
from advshield.plugin.served import resolve_served
from advshield.plugin.smoothing import (
    ABSTAIN,
    SmoothedClassifier,
    SmoothingConfig,
    certified_accuracy,
    certified_budget,
)

DEFAULT_RADII = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5)


@dataclass(frozen=True)
class CertifySpec:
    """The pipeline file's ``[certify]`` section."""

    sigmas: tuple[float, ...] = (0.25,)
    models: tuple[str, ...] = ()  # noise-trained base model per sigma (same order); default: [model]
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    samples: int = 100  # test images certified (from the start of the test split)
    start: int = 0
    batch_size: int = 500
    seed: int = 0
    radii: tuple[float, ...] = DEFAULT_RADII
    clip: bool = False

    def __post_init__(self) -> None:
        check(len(self.sigmas) >= 1, "certify.sigmas: give at least one sigma")
        check(all(s > 0 for s in self.sigmas), f"certify.sigmas: must be > 0, got {list(self.sigmas)}")
        check(not self.models or len(self.models) == len(self.sigmas),
              f"certify.models: {len(self.models)} models for {len(self.sigmas)} sigmas")
        check(self.samples >= 1, f"certify.samples: must be >= 1, got {self.samples}")
        check(self.start >= 0, f"certify.start: must be >= 0, got {self.start}")
        check(list(self.radii) == sorted(self.radii) and all(r >= 0 for r in self.radii),
              f"certify.radii: must be increasing and >= 0, got {list(self.radii)}")
        SmoothingConfig(sigma=self.sigmas[0], n0=self.n0, n=self.n, alpha=self.alpha, batch_size=self.batch_size)

    def smoothing(self, sigma: float) -> SmoothingConfig:
        return SmoothingConfig(sigma=sigma, n0=self.n0, n=self.n, alpha=self.alpha,
                               batch_size=self.batch_size, seed=self.seed, clip=self.clip)


def certify_spec(cfg: PipelineConfig, **overrides) -> CertifySpec:
    table = dict(cfg.extra.get("certify", {}))
    table.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(CertifySpec, table, "certify")


@dataclass(frozen=True)
class CertRecord:
    sigma: float
    index: int  # index in the test split
    label: int
    predicted: int  # ABSTAIN = -1
    radius: float
    p_lower: float
    correct: bool
    seconds: float


def run_certification(
    base_for_sigma: Callable[[float], Callable[[torch.Tensor], torch.Tensor]],
    num_classes: int,
    images: np.ndarray,
    labels: np.ndarray,
    spec: CertifySpec,
    out: Path | None = None,
    progress: bool = True,
) -> dict:
    """Certify ``images`` at every sigma of ``spec``; write records (JSONL) and a summary."""
    records: list[CertRecord] = []
    summary: dict = {"spec": asdict(spec), "sigmas": {}}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        sink = (out / "certify_records.jsonl").open("w")
    for sigma in spec.sigmas:
        smoothed = SmoothedClassifier(base_for_sigma(sigma), num_classes, spec.smoothing(sigma))
        t_sigma = time.perf_counter()
        rows = []
        for i in progress_bar(range(len(images)), desc=f"certify sigma={sigma:g}", enabled=progress, unit="img"):
            rec = certify_one(smoothed, sigma, images[i], int(labels[i]), spec.start + i)
            rows.append(rec)
            if out is not None:
                sink.write(json.dumps(asdict(rec)) + "\n")
                sink.flush()
        seconds = time.perf_counter() - t_sigma
        records += rows
        summary["sigmas"][f"{sigma:g}"] = summarize(rows, spec.radii, seconds, smoothed.samples_drawn)
    if out is not None:
        sink.close()
        (out / "certify_summary.json").write_text(json.dumps(summary, indent=2))
    summary["records"] = records
    return summary


def certify_one(smoothed: SmoothedClassifier, sigma: float, image: np.ndarray, label: int, index: int) -> CertRecord:
    """CERTIFY for the sample at ``index`` of the test split: its noise stream and the random
    defenses' draws are seeded by (seed, index) alone, so the record does not depend on which
    samples were certified before it, in this process or in another shard."""
    at = getattr(smoothed.base, "at", None)
    if at is not None:
        at(index)
    t0 = time.perf_counter()
    cert = smoothed.certify(torch.from_numpy(np.ascontiguousarray(image)), index=index)
    return CertRecord(sigma, index, int(label), cert.label, cert.radius, cert.p_lower, bool(cert.label == label),
                      time.perf_counter() - t0)


def summarize(rows: list[CertRecord], radii: tuple[float, ...], seconds: float, samples_drawn: int) -> dict:
    labels = np.array([r.label for r in rows])
    pred = np.array([r.predicted for r in rows])
    rad = np.array([r.radius for r in rows])
    acc = certified_accuracy(labels, pred, rad, np.array(radii))
    return {
        "samples": len(rows),
        "radii": list(radii),
        "certified_accuracy": [round(float(a), 4) for a in acc],
        "abstain_rate": float(np.mean(pred == ABSTAIN)),
        "clean_smoothed_accuracy": float(np.mean(pred == labels)),
        "median_radius_correct": float(np.median(rad[pred == labels])) if np.any(pred == labels) else 0.0,
        "seconds": round(seconds, 2),
        "noise_samples_per_second": round(samples_drawn / seconds, 1) if seconds > 0 else None,
    }


def budget(summary: dict, target: float) -> dict[str, float]:
    """Certified budget per sigma: largest radius whose certified accuracy meets ``target``."""
    return {s: certified_budget(np.array(v["radii"]), np.array(v["certified_accuracy"]), target)
            for s, v in summary["sigmas"].items()}


def plot_certified_accuracy(summary: dict, path: Path, target: float | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for sigma, v in summary["sigmas"].items():
        ax.step(v["radii"], v["certified_accuracy"], where="post", label=f"sigma = {sigma}")
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}")
    ax.set_xlabel("L2 radius (pixel units, [0,1] scale)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Randomized smoothing: certified accuracy vs radius")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the base classifiers and the whole certification run -----------------------------------------

def pipeline_base(cfg: PipelineConfig, model_path: str | None = None) -> DefendedClassifier:
    """The defended pipeline as a smoothing base classifier (noise goes in before the defenses)."""
    clf = None
    if model_path is not None:
        clf = OnnxClassifier(cfg.resolve(model_path), device=cfg.model.device, threads=cfg.model.threads, validate=False)
    defended = DefendedClassifier.from_config(cfg, classifier=clf)
    if clf is None and hasattr(defended.classifier, "validate"):
        defended.classifier.validate = False  # noisy inputs leave [0, 1] on purpose
    return defended


BaseForSigma = Callable[[float], Callable[[torch.Tensor], torch.Tensor]]


def output_classes(base_for_sigma: BaseForSigma, sigma: float, images: np.ndarray) -> int:
    """The base classifier's number of classes (its output's width), from one forward pass of the
    first image (its own call of ``base_for_sigma``: the certification's generators are untouched)."""
    with torch.no_grad():
        return int(base_for_sigma(sigma)(torch.from_numpy(np.ascontiguousarray(images[:1], np.float32))).shape[-1])


def in_process_bases(cfg: PipelineConfig, spec: CertifySpec) -> BaseForSigma:
    """``base_for_sigma(sigma)``: the defended pipeline (with the noise-trained model ``spec``
    names for that sigma, if any) as the smoothing base classifier; pipelines built once per model."""
    cache: dict[str | None, DefendedClassifier] = {}

    def base_for_sigma(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
        model = spec.models[spec.sigmas.index(sigma)] if spec.models else None
        if model not in cache:
            cache[model] = pipeline_base(cfg, model)
        return PipelineBase(cache[model], spec.seed)

    return base_for_sigma


class PipelineBase:
    """The defended pipeline as a smoothing base classifier: logits; a random pipeline draws from
    a generator that ``at(index)`` reseeds per sample (seed, index), as the noise is."""

    def __init__(self, defended: DefendedClassifier, seed: int) -> None:
        self.defended, self.seed = defended, seed
        self.generator = torch.Generator().manual_seed(seed)

    def at(self, index: int) -> None:
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, "certify defenses", index))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.defended.logits(x, self.generator if self.defended.random else None)


def remote_bases(remote: RemoteClassifier, spec: CertifySpec) -> BaseForSigma:
    """``base_for_sigma`` through a live endpoint (noise is clipped to [0, 1] on the wire)."""
    def base_for_sigma(sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: remote(x.clamp(0, 1)) if not spec.clip else remote(x)

    return base_for_sigma


@dataclass
class CertifyResult:
    """What ``certify_pipeline`` produced: the summary (per sigma: certified accuracy by radius,
    abstain rate...), the certified budget per sigma, and the files written."""

    summary: dict[str, Any]
    budget: dict[str, float]
    target: float
    out: Path
    records_path: Path
    summary_path: Path
    plot_path: Path
    scorer: str = "in process"
    records: list[CertRecord] = field(default_factory=list)


def certify_pipeline(cfg: PipelineConfig, spec: CertifySpec, out: Path, *, target: str | None = None,
                     token: str | None = None, progress: bool = True,
                     run: Callable[..., dict] = run_certification) -> CertifyResult:
    """Certify ``spec.samples`` test images of the pipeline's data set at every sigma, in process or
    through a live endpoint (``target`` = grpc://HOST:PORT[/MODEL]); write records, summary, plot.
    ``run``: what certifies the images, ``run_certification``'s signature (``attacks/distributed.py``:
    shards on a Ray cluster)."""
    if cfg.served_model and cfg.served is None:  # the served model's shape and classes, from its server
        cfg = resolve_served(cfg)
    test = load_data(cfg, "test")
    data = test.data
    stop = min(spec.start + spec.samples, len(data))
    if stop <= spec.start:
        raise ConfigError(f"certify.start: {spec.start} is past the end of the test split ({len(data)} images)")
    images, labels = data.as_float(spec.start, stop), data.labels[spec.start:stop]
    out = Path(out)
    scorer = "in process"
    if target:
        url, model = parse_target(target)
        remote = RemoteClassifier(url, model, token=token)
        num_classes = remote.num_classes
        base_for_sigma = remote_bases(remote, spec)
        scorer = repr(remote)
    else:
        base_for_sigma = in_process_bases(cfg, spec)
        num_classes = output_classes(base_for_sigma, spec.sigmas[0], images)
    summary = run(base_for_sigma, num_classes, images, labels, spec, out, progress=progress)
    records = summary.pop("records")
    summary["data"] = evaluated(test, spec.start, stop)
    goal = cfg.gate.certified_accuracy_target
    budgets = budget(summary, goal)
    summary["certified_budget"] = budgets
    summary["certified_accuracy_target"] = goal
    summary_path = out / "certify_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    plot = plot_certified_accuracy(summary, out / "certified_accuracy.png", goal)
    return CertifyResult(summary, budgets, goal, out, out / "certify_records.jsonl", summary_path, plot, scorer, records)
