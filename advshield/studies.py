"""Studies that reproduce the source thesis's experiments: ``study_patches`` (ch. 6, the patch
replacement sweep; the CLI's ``advshield study patches``).

The sweep itself is ``advshield.attacks.patch_study``; this module chooses the model and the data:

* ``dataset=None``: the pipeline's model and its ``[data]`` set (train split for the codebooks,
  test split for the evaluation);
* ``dataset="mnist-5k"``: no MNIST model ships with advshield, so a small CNN (the reference
  architecture of ``advshield.training``) is trained on 4,000 of the 5,000 digits (seeded) and
  exported to ONNX under ``out/models``; codebooks are learnt on those 4,000, the evaluation runs on
  the 1,000 held out.

The first feature layer is the first ReLU output of the model (``relu`` in the embedded CNN),
unless ``feature_layer`` names another tensor. Writes ``study.json``, ``study.md`` and ``study.png``
under ``out``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from advshield.attacks.patch_study import (
    StudySettings,
    default_configurations,
    grid_configurations,
    markdown_table,
    plot_study,
    run_patch_study,
)
from advshield.core.data import Dataset, load_mnist5k
from advshield.core.errors import ConfigError
from advshield.plugin.classifiers import set_torch_threads
from advshield.plugin.config import PipelineConfig, load_pipeline
from advshield.plugin.datasets import load_data
from advshield.plugin.split import candidate_tensors
from advshield.training import TrainConfig, accuracy, export_onnx, train

StudyDataset = Literal["pipeline", "mnist-5k"]
MNIST_TRAIN = 4000


def first_relu(model: Any) -> str:
    for t in candidate_tensors(model):
        if t.op_type == "Relu":
            return t.name
    raise ConfigError("study: the model has no ReLU feature map to cut at; pass feature_layer=...")


def mnist5k_model(out: Path, seed: int = 0, epochs: int = 4, threads: int = 1,
                  progress: bool = True) -> tuple[Path, Dataset, Dataset, dict[str, Any]]:
    """A small CNN trained on 4,000 random MNIST-5k digits, exported to ONNX; (path, train, held out, card)."""
    ds = load_mnist5k()
    perm = np.random.default_rng(seed).permutation(len(ds))
    part = lambda idx, tag: Dataset(ds.images[idx], ds.labels[idx], ds.classes, f"mnist-5k-{tag}")  # noqa: E731
    train_ds, test_ds = part(perm[:MNIST_TRAIN], "train"), part(perm[MNIST_TRAIN:], "test")
    t0 = time.perf_counter()
    net, result = train(train_ds, test_ds, TrainConfig(arch="cnn", epochs=epochs, threads=threads, seed=seed),
                        progress=progress)
    path = out / "models" / "mnist5k_cnn.onnx"
    parity = export_onnx(net, path, (1, 28, 28))
    card = {"path": str(path.relative_to(out)), "train_images": MNIST_TRAIN, "held_out": len(test_ds),
            "epochs": epochs, "seed": seed, "held_out_accuracy": accuracy(net, test_ds),
            "train_seconds": round(time.perf_counter() - t0, 1), "parity": parity,
            "history": list(result.history)}
    return path, train_ds, test_ds, card


def study_patches(pipeline: PipelineConfig | str | Path, *, out: str | Path | None = None,
                  dataset: StudyDataset = "pipeline", grid: bool = False, samples: int = 50, clean: int = 1000,
                  attack_steps: int = 100, smooth: bool = False, smooth_steps: int = 20, fit_images: int = 5000,
                  sample: int = 65_536, iterations: int = 10, feature_layer: str = "", seed: int = 0,
                  threads: int = 1, only: tuple[str, ...] = (), progress: bool = True) -> dict[str, Any]:
    """The patch-replacement study on the pipeline's model (or a trained MNIST-5k model): every
    configuration's fit time, clean accuracy, throughput and adaptive P_suc / D-bar beside the
    squeezers; with ``smooth``, sC&W adaptive and DDN/C&W/sC&W transfer. ``only``: run just the
    configurations with these labels. Returns {settings, model, rows, paths}."""
    cfg = pipeline if isinstance(pipeline, PipelineConfig) else load_pipeline(pipeline)
    if dataset not in ("pipeline", "mnist-5k"):
        raise ConfigError(f"study: dataset must be 'pipeline' or 'mnist-5k', got {dataset!r}")
    set_torch_threads(max(1, threads))
    out_dir = Path(out or f"runs/study/{cfg.pipeline.name}{'-mnist5k' if dataset == 'mnist-5k' else ''}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_info: dict[str, Any]
    if dataset == "mnist-5k":
        model, train_ds, test_ds, model_info = mnist5k_model(out_dir, seed=seed, threads=threads, progress=progress)
        model_source: Any = model
        data_name = "mnist-5k (4,000 train / 1,000 held out)"
    else:
        model_source = cfg.wrapped_model()
        train_ds, test_ds = load_data(cfg, "train").data, load_data(cfg, "test").data
        model_info = {"path": str(cfg.model.path), "pipeline": cfg.pipeline.name}
        data_name = f"{cfg.data.dataset} (train {len(train_ds)} / test {len(test_ds)})"
    layer = feature_layer or first_relu(model_source)
    settings = StudySettings(samples=samples, clean=clean, attack_steps=attack_steps, smooth=smooth,
                             smooth_steps=smooth_steps, sample=sample, fit_images=fit_images, iterations=iterations,
                             seed=seed, feature_layer=layer)
    configurations = grid_configurations(settings) if grid else default_configurations(settings)
    if only:
        known = {c.label for c in configurations}
        missing = sorted(set(only) - known)
        if missing:
            raise ConfigError(f"study: unknown configuration {missing}; known: {sorted(known)}")
        configurations = [c for c in configurations if c.label in only]
    rows = run_patch_study(model_source, train_ds.as_float(0, fit_images), (test_ds.as_float(), test_ds.labels),
                           configurations, settings, progress=progress)
    result = {
        "study": "patches", "dataset": data_name, "model": model_info, "feature_layer": layer, "grid": grid,
        "settings": {k: getattr(settings, k) for k in ("samples", "clean", "attack_steps", "smooth", "smooth_steps",
                                                       "sample", "fit_images", "iterations", "seed")},
        "threads": threads, "torch": torch.__version__, "machine": platform.machine(),
        "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
    }
    paths = {"json": out_dir / "study.json", "markdown": out_dir / "study.md", "plot": out_dir / "study.png"}
    paths["json"].write_text(json.dumps(_finite(result), indent=2, default=_jsonable, allow_nan=False) + "\n")
    header = (f"# Patch replacement study: {data_name}\n\nModel {model_info['path']}; first feature layer "
              f"`{layer}`; {samples} attacked test images, {clean} for clean accuracy; BPDA = best of DDN and BP "
              f"({attack_steps} steps) through BPDA, rounded to 8 bits, re-scored on the serving path.\n\n")
    paths["markdown"].write_text(header + markdown_table(rows, smooth=smooth))
    plot_study(rows, paths["plot"], title=f"{data_name}: clean accuracy vs BPDA distortion")
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result


def _finite(v: Any) -> Any:
    """Strict JSON: NaN (no success to average) and +inf (a median over mostly unbroken samples) as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return str(v)
