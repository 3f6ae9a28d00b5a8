"""``advshield fit PIPELINE.toml``: learn every artifact the pipeline's defenses and detector need.

Data: the TRAIN split of the pipeline's data set (``[data]``), never the test split. A seeded
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
command-line flags override them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from advshield.configs import check, from_mapping


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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="learn the pipeline's artifacts (codebooks, detector threshold) on the train split")
    p.add_argument("pipeline")
    p.add_argument("--samples", type=int, default=None, help="training images for defenses that learn (default: [fit] or 20000)")
    p.add_argument("--calibration", type=int, default=None,
                   help="held-out training images for the detector threshold (default: [fit] or 10000)")
    p.add_argument("--seed", type=int, default=None, help="seed of the data split and of random steps (default: [fit] or 0)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fit)


def fit_spec(cfg: Any, args: argparse.Namespace | None = None) -> FitSpec:
    spec = from_mapping(FitSpec, cfg.extra.get("fit", {}), "fit")
    if args is not None:
        overrides = {k: getattr(args, k) for k in ("samples", "calibration", "seed", "batch_size")
                     if getattr(args, k, None) is not None}
        spec = replace(spec, **overrides)
    return spec


def _batches(n: int, size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, n, size)
    return tqdm(starts, desc=desc, unit="batch", disable=not progress, file=sys.stderr)


def _apply(steps, images, spec: FitSpec, progress: bool, desc: str):
    """Images through ``steps`` (no autograd; random steps seeded per batch from spec.seed)."""
    import torch

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


def fit_pipeline(cfg: Any, spec: FitSpec, *, progress: bool = True, classifier: Any = None) -> dict[str, Any]:
    """Fit every defense with ``needs_fit`` and calibrate the detector; returns a summary."""
    import torch

    from advshield.data import Dataset, load_dataset
    from advshield.defenses.base import sha256_file, verify_artifact
    from advshield.defenses.registry import build_defense, build_detector
    from advshield.errors import ArtifactError, ConfigError, ModelError
    from advshield.plugin.classifiers import OnnxClassifier
    from advshield.plugin.pipeline import DefendedClassifier
    from advshield.plugin.split import IMAGE_LAYER, attach_feature_defenses, bind_feature_extractors, layer_of

    t_start = time.perf_counter()
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

    directory = cfg.resolve(cfg.data.directory) if cfg.data.directory else None
    train = load_dataset(cfg.data.dataset, "train", directory)
    n_fit = spec.samples if learners else 0
    n_cal = spec.calibration if detector is not None else 0
    if n_fit + n_cal > len(train):
        raise ConfigError(f"fit: samples ({n_fit}) + calibration ({n_cal}) exceed the {len(train)} images of {train.name}")
    perm = np.random.default_rng(spec.seed).permutation(len(train))
    parts = {"fit": perm[:n_fit], "calibration": perm[n_fit : n_fit + n_cal]}

    def subset(idx: np.ndarray) -> tuple[Any, str]:
        ds = Dataset(train.images[idx], train.labels[idx], train.classes, train.name)
        x = ds.images[:, None] if ds.images.ndim == 3 else ds.images
        return torch.from_numpy(x.astype(np.float32) / np.float32(255.0)), ds.sha256()

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
        clf = classifier or OnnxClassifier(cfg.model_path, device=cfg.model.device, threads=cfg.model.threads)
        clf, image_steps = attach_feature_defenses(cfg, clf, steps)
        pipeline = DefendedClassifier(clf, image_steps, cfg.data.class_names, cfg, detector=detector)
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


def cmd_fit(args: argparse.Namespace) -> int:
    from advshield.plugin.config import load_pipeline

    cfg = load_pipeline(args.pipeline)
    spec = fit_spec(cfg, args)
    summary = fit_pipeline(cfg, spec, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if "note" in summary:
        print(summary["note"])
        return 0
    for d in summary["defenses"]:
        print(f"defense {d['index']} ({d['type']}): fitted on {d['images']} training images in {d['seconds']} s")
    det = summary["detector"]
    if det:
        print(f"detector ({det['type']}): threshold {det['threshold']:.6g} at target fpr {det['fpr_target']:g} "
              f"(fpr {det['fpr_calibration']:.4f} on {det['samples']} held-out training images)")
    for name, a in summary["artifacts"].items():
        print(f"artifacts.{name:<20} sha256 {a['sha256']}  {a['path']}")
        if "warning" in a:
            print(f"  warning: {a['warning']}", file=sys.stderr)
    print(f"done in {summary['seconds']} s; pin the sha256s in the pipeline's [artifacts] entries to freeze them")
    return 0
