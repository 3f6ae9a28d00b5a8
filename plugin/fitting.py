"""Fitting a pipeline (``advshield fit``, ``advshield.fit``): learn every artifact the pipeline's defenses and detector need.

Data: the TRAIN split of the pipeline's data set (``[data]``, ``advshield.plugin.datasets``: for a
folder or manifest its train/ sub-folder or the ``fit_fraction`` side of its seeded split), never
what the audit evaluates. A seeded
permutation of it gives, in this order, ``samples`` images for the defenses that learn from data
(``needs_fit``, e.g. patch-replacement codebooks) and then ``calibration`` further, disjoint
images on which the detector's threshold is calibrated at its target false-positive rate.

Each defense with ``needs_fit`` is fitted in pipeline order on the images as the serving path
hands them to it (passed through the image-layer steps before it). Feature-layer defenses see the
head's features of images passed through the image-layer steps that learn nothing: as in the
thesis (section 6.4.4), the codebooks of stacked layers are learnt independently, each on clean
data, not on the output of another replacement. The detector is
calibrated on scores of the whole pipeline (defenses, then the stacked squeezer call). Artifacts go
to the paths of the pipeline's ``[artifacts]`` entries, each with a ``.meta.json`` sidecar
(sha256, parameters, training-data sha256); their sha256s are printed to pin in the pipeline file.

Settings come from the optional ``[fit]`` section (samples, calibration, seed, batch_size);
keyword overrides (the command line's flags) win. A count left at its default shrinks to a smaller
training split (``fit_counts``); a count that was given and does not fit is an error.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advshield.core.data import Dataset
from advshield.core.errors import ArtifactError, ConfigError, ModelError
from advshield.core.hashing import sha256_file
from advshield.core.progress import progress as progress_bar
from advshield.core.resources import inside_package
from advshield.core.validation import check, from_mapping
from advshield.defenses.base import verify_artifact
from advshield.defenses.registry import build_defense, build_detector
from advshield.plugin.classifiers import classifier_from_config
from advshield.plugin.datasets import load_data
from advshield.plugin.pipeline import DefendedClassifier
from advshield.plugin.served import ServedClassifier, resolve_served, served_to_dict
from advshield.plugin.split import IMAGE_LAYER, attach_feature_defenses, bind_feature_extractors, layer_of


@dataclass(frozen=True)
class FitSpec:
    samples: int = 20000  # training images for defenses that learn (codebooks)
    calibration: int = 10000  # further held-out training images for the detector threshold
    seed: int = 0
    batch_size: int = 500

    def __post_init__(self) -> None:
        check(self.samples >= 1, f"fit.samples: must be >= 1, got {self.samples}")
        check(self.calibration >= 1, f"fit.calibration: must be >= 1, got {self.calibration}")
        check(self.batch_size >= 1, f"fit.batch_size: must be >= 1, got {self.batch_size}")


def fit_spec(cfg: Any, **overrides: Any) -> FitSpec:
    """The pipeline's ``[fit]`` section (defaults where absent), with overrides (None: keep)."""
    spec = from_mapping(FitSpec, cfg.extra.get("fit", {}), "fit")
    return replace(spec, **{k: v for k, v in overrides.items() if v is not None})


def _batches(n: int, size: int, progress: bool, desc: str):
    return progress_bar(range(0, n, size), desc=desc, unit="batch", enabled=progress)


def _apply(steps, images, spec: FitSpec, progress: bool, desc: str):
    """Images through ``steps`` (no autograd; random steps seeded per batch from spec.seed)."""
    if not steps:
        return images
    out = torch.empty_like(images)
    with torch.no_grad():
        for b, i in enumerate(_batches(len(images), spec.batch_size, progress, desc)):
            g = torch.Generator().manual_seed(spec.seed * 1_000_003 + b)
            x = images[i : i + spec.batch_size]
            for d in steps:
                x = d(x, g)
            out[i : i + spec.batch_size] = x
    return out


def refuse_package_artifacts(cfg: Any, names: list[str]) -> None:
    """advshield never writes inside its installed package: a shipped example pipeline is fitted
    after `advshield examples DIR` copied it into a working folder."""
    inside = [str(p) for p in map(cfg.artifact_path, names) if inside_package(p)]
    if inside:
        raise ConfigError(
            f"fit would write artifacts inside the installed advshield package ({inside[0]}); copy the "
            "example pipelines into a working folder first (`advshield examples DIR`) and fit the copy")


def fit_counts(cfg: Any, spec: FitSpec, n_fit: int, n_cal: int, train: Dataset) -> tuple[int, int]:
    """(samples, calibration) within a training split smaller than they ask: a count left at its
    default (not in [fit], not overridden) shrinks to what the given ones leave, 2:1 between the
    two when both are defaults (as 20,000:10,000); counts that were given are kept, or an error."""
    default = FitSpec()
    given = set(cfg.extra.get("fit", {})) | {k for k in ("samples", "calibration") if getattr(spec, k) != getattr(default, k)}
    flexible = [k for k, n in (("samples", n_fit), ("calibration", n_cal)) if n and k not in given]
    left = len(train) - (0 if "samples" in flexible else n_fit) - (0 if "calibration" in flexible else n_cal)
    if not flexible or left < len(flexible):
        raise ConfigError(f"fit: samples ({n_fit}) + calibration ({n_cal}) exceed the {len(train)} images of {train.name} "
                          "(set [fit] samples / calibration, or --samples / --calibration)")
    if len(flexible) == 2:
        n_fit = min(max(round(left * 2 / 3), 1), left - 1)
        return n_fit, left - n_fit
    return (left, n_cal) if flexible == ["samples"] else (n_fit, left)


def fit_pipeline(cfg: Any, spec: FitSpec, *, progress: bool = True, classifier: Any = None) -> dict[str, Any]:
    """Fit every defense with ``needs_fit`` and calibrate the detector; returns a summary."""
    t_start = time.perf_counter()
    if cfg.served_model and classifier is None and cfg.detector is not None:
        classifier = ServedClassifier(cfg)  # the model Triton serves scores the calibration images
        cfg = classifier.config
    elif cfg.served_model and cfg.served is None:
        cfg = resolve_served(cfg)  # its shape and classes, from its server
    if cfg.served_model and not cfg.has_onnx:  # no file: the served model's description identifies it
        described = json.dumps(served_to_dict(cfg.served), sort_keys=True) if cfg.served is not None else cfg.model.served.name
        model_sha = hashlib.sha256(described.encode()).hexdigest()
    else:
        model_sha = sha256_file(cfg.model_path) if cfg.model_path.is_file() else ""
    if not model_sha:
        raise ModelError(f"model not found: {cfg.model_path}")
    if cfg.model.sha256 and cfg.model.sha256 != model_sha:
        raise ArtifactError(f"model: sha256 mismatch for {cfg.model_path}: file has {model_sha}, pipeline declares {cfg.model.sha256}")

    steps = [build_defense(e.type, e.config) for e in cfg.defenses]
    detector = build_detector(cfg.detector.type, cfg.detector.config) if cfg.detector is not None else None
    learners = [d for d in steps if d.needs_fit]
    summary: dict[str, Any] = {"pipeline": str(cfg.source or cfg.root), "defenses": [], "detector": None, "artifacts": {}}
    if not learners and detector is None:
        summary["note"] = "nothing to fit: no defense needs fitting and there is no detector"
        return summary
    refuse_package_artifacts(cfg, [n for d in [*learners, *([detector] if detector else [])] for n in d.artifact_names])

    split = load_data(cfg, "train")
    train = split.data
    summary["data"] = split.description
    n_fit = spec.samples if learners else 0
    n_cal = spec.calibration if detector is not None else 0
    if n_fit + n_cal > len(train):
        n_fit, n_cal = fit_counts(cfg, spec, n_fit, n_cal, train)
        summary["scaled"] = (f"the training split holds {len(train)} images: samples {n_fit}, calibration {n_cal} "
                             "(the defaults left in [fit] shrink to the data)")
    perm = np.random.default_rng(spec.seed).permutation(len(train))
    parts = {"fit": perm[:n_fit], "calibration": perm[n_fit : n_fit + n_cal]}

    def subset(idx: np.ndarray) -> tuple[Any, str]:
        ds = Dataset(train.images[idx], train.labels[idx], train.classes, train.name)
        return torch.from_numpy(ds.as_float()), ds.sha256()

    def record(name: str) -> Path:
        path = cfg.artifact_path(name)
        meta = verify_artifact(path)  # the sidecar fit just wrote
        declared = cfg.artifacts[name].sha256
        summary["artifacts"][name] = {"path": str(path), "sha256": meta["sha256"]}
        if declared and declared != meta["sha256"]:
            summary["artifacts"][name]["warning"] = (
                f"the pipeline declares sha256 {declared}; update [artifacts.{name}] sha256 to the new file's")
        return path

    if learners:
        images, data_sha = subset(parts["fit"])
        bind_feature_extractors(cfg, steps)
        image_steps = [d for d in steps if layer_of(d) == IMAGE_LAYER]
        for i, d in enumerate(steps):
            if not d.needs_fit:
                continue
            if d in image_steps:
                before = image_steps[: image_steps.index(d)]
            else:  # feature layer: codebooks of stacked layers are learnt independently (thesis 6.4.4),
                before = [s for s in image_steps if not s.needs_fit]  # not on replaced images
            x = _apply(before, images, spec, progress, f"steps before {d.name}")
            paths = {name: cfg.artifact_path(name) for name in d.artifact_names}
            kwargs: dict[str, Any] = {"seed": spec.seed, "data_sha256": data_sha}
            if "progress" in inspect.signature(d.fit).parameters:
                kwargs["progress"] = progress
            t0 = time.perf_counter()
            d.fit(x, paths, **kwargs)
            summary["defenses"].append({"index": i, "type": d.name, "images": len(x), "data_sha256": data_sha,
                                        "seconds": round(time.perf_counter() - t0, 2),
                                        "artifacts": [str(p) for p in paths.values()]})
            for name in d.artifact_names:
                record(name)

    if detector is not None:
        clf = classifier or classifier_from_config(cfg)
        clf, image_steps = attach_feature_defenses(cfg, clf, steps)
        names = train.classes if len(train.classes) == clf.num_classes else ()  # only labels the scores
        pipeline = DefendedClassifier(clf, image_steps, names, cfg, detector=detector)
        images, data_sha = subset(parts["calibration"])
        scores = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for b, i in enumerate(_batches(len(images), spec.batch_size, progress, "detector scores")):
                g = torch.Generator().manual_seed(spec.seed * 1_000_003 + b)
                scores.append(pipeline.logits_and_score(images[i : i + spec.batch_size], g)[1].cpu())
        paths = {name: cfg.artifact_path(name) for name in detector.artifact_names}
        rec = detector.fit(torch.cat(scores).numpy(), paths, data_sha256=data_sha, model_sha256=model_sha,
                           seed=spec.seed, data=f"{train.name}: {n_cal} images held out of {len(train)}")
        summary["detector"] = {"type": detector.name, **rec, "data_sha256": data_sha,
                               "seconds": round(time.perf_counter() - t0, 2)}
        for name in detector.artifact_names:
            record(name)
    summary["seconds"] = round(time.perf_counter() - t_start, 2)
    return summary
