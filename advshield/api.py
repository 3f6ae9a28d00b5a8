"""advshield's Python API: what every command runs, as library calls.

    import advshield

    cfg = advshield.load_pipeline("pipeline.toml")
    advshield.fit(cfg)                                   # codebooks, detector threshold
    result = advshield.audit(cfg, out="runs/audit", samples=100)
    print(result.metrics["clean_accuracy"], result.gate.passed, result.paths["report_md"])
    cert = advshield.certify(cfg, sigmas=(0.25,), samples=50)
    pred = advshield.predict(cfg, images)                # numpy/torch batch, or image files/bytes
    advshield.serve(cfg, port=8001)                      # blocks until SIGINT/SIGTERM

Every function takes a pipeline as a path or as the ``PipelineConfig`` that ``load_pipeline``
returns. Keyword overrides left at None keep the pipeline file's value, exactly as the CLI's flags.
Errors a user can cause raise ``advshield.AdvshieldError`` subclasses with a message naming the
problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

from advshield.attacks.audit.shards import MergeResult, merge_shards
from advshield.attacks.audit_pipeline import AuditResult, audit_pipeline
from advshield.attacks.certify import CertifyResult, certify_pipeline, certify_spec, run_certification
from advshield.attacks.distributed import RayOptions, ShardResult, audit_shard, ray_audit, ray_certify
from advshield.core.errors import ImageError
from advshield.core.resources import copy_examples as _copy_examples
from advshield.deploy.triton import Repository, generate_repository
from advshield.init_pipeline import InitResult, init_pipeline
from advshield.plugin.classifiers import (
    classifier_from_config,
    parity_batch,
    set_torch_threads,
    twin_from_config,
)
from advshield.plugin.classifiers import parity as class_parity
from advshield.plugin.config import PipelineConfig
from advshield.plugin.config import load_pipeline as _load_pipeline
from advshield.plugin.datasets import with_data
from advshield.plugin.fitting import fit_pipeline, fit_spec
from advshield.plugin.pipeline import DefendedClassifier, Prediction
from advshield.plugin.served import ServedClassifier
from advshield.plugin.server import ScoringServer, build_server, serve_spec
from advshield.plugin.server import serve as _serve_forever
from advshield.training import train_models

PipelineLike: TypeAlias = PipelineConfig | str | Path


def load_pipeline(pipeline: PipelineLike) -> PipelineConfig:
    """The pipeline file, parsed and validated (relative paths resolve against the file's folder)."""
    return pipeline if isinstance(pipeline, PipelineConfig) else _load_pipeline(pipeline)


def fit(pipeline: PipelineLike, *, samples: int | None = None, calibration: int | None = None,
        seed: int | None = None, batch_size: int | None = None, data: str | Path | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Learn the pipeline's artifacts (codebooks, detector threshold) on its data set's TRAIN split;
    returns a summary (per defense and detector: images, seconds, artifacts and their sha256; the
    data's description). ``data``: a folder or manifest (``--data``) in place of ``[data]``."""
    cfg = with_data(load_pipeline(pipeline), data)
    spec = fit_spec(cfg, samples=samples, calibration=calibration, seed=seed, batch_size=batch_size)
    return fit_pipeline(cfg, spec, progress=progress)


def audit(pipeline: PipelineLike, *, out: str | Path | None = None, samples: int | None = None,
          start: int | None = None, batch_size: int | None = None, seed: int | None = None,
          attacks: Sequence[str] | None = None, adaptive: Literal["auto", "on", "off"] | None = None,
          eot_samples: int | None = None, detector_aware: bool | None = None,
          protocol: Literal["cascade", "independent"] | None = None, target: str | None = None,
          token: str | None = None, fresh: bool = False, certify: bool | None = None,
          certify_dir: str | Path | None = None, threads: int | None = None, data: str | Path | None = None,
          progress: bool = True, command: str = "", ray: str | RayOptions | None = None) -> AuditResult:
    """Attack the defended pipeline, write records and the report under ``out``, apply the gate.

    See ``advshield.attacks.audit_pipeline.audit_pipeline`` for the parameters; ``threads`` sets
    torch's thread count for the run (1 is best on a busy machine); ``data``: a folder or manifest
    (``--data``, see ``advshield.plugin.datasets.with_data``) in place of ``[data]``. ``ray``: run
    the batches as shards on a Ray cluster ("local", "auto", an address, or ``RayOptions`` with
    the shard count and each shard's CPUs/GPUs; ``advshield.attacks.distributed``): the same
    records and report as one process."""
    cfg = with_data(load_pipeline(pipeline), data)
    set_torch_threads(threads or 0)  # 0: at most the CPUs this process has (affinity, cgroup quota)
    shards = ray_audit(cfg, _ray_options(ray), progress=progress) if ray is not None else None
    certify_run = ray_certify(cfg, _ray_options(ray)) if ray is not None else None  # the certification stage too
    return audit_pipeline(cfg, out=out, samples=samples, start=start, batch_size=batch_size, seed=seed,
                          attacks=attacks, adaptive=adaptive, eot_samples=eot_samples, detector_aware=detector_aware,
                          protocol=protocol,
                          target=target, token=token, fresh=fresh, certify=certify, certify_dir=certify_dir,
                          progress=progress, command=command, shards=shards, certify_run=certify_run)


def _ray_options(ray: str | RayOptions) -> RayOptions:
    return ray if isinstance(ray, RayOptions) else RayOptions(address=ray)


def audit_shard_run(pipeline: PipelineLike, shard: tuple[int, int], *, out: str | Path | None = None,
                    fresh: bool = False, threads: int | None = None, data: str | Path | None = None,
                    progress: bool = True, **overrides: Any) -> ShardResult:
    """Shard ``shard`` = (I, N) of the audit, in this process, into a shard folder (``--shard I/N``,
    for a Kubernetes Indexed Job or any other scheduler; ``audit_merge`` joins the folders).
    ``overrides``: ``audit``'s (samples, start, batch_size, seed, attacks, adaptive, ...)."""
    cfg = with_data(load_pipeline(pipeline), data)
    set_torch_threads(threads or 0)
    return audit_shard(cfg, shard, out=out, fresh=fresh, progress=progress, **overrides)


def audit_merge(folders: Sequence[str | Path], out: str | Path) -> MergeResult:
    """Merge shard folders (from ``--shard``, any scheduler) into ``out``; refuses folders of
    different audits or with overlapping samples. ``audit(pipeline, out=out, ...)`` with the shards'
    settings then runs what is left (the sanity attack, missing batches), the probes and the report."""
    return merge_shards(folders, out)


def certify(pipeline: PipelineLike, *, out: str | Path | None = None, sigmas: Sequence[float] | None = None,
            models: Sequence[str | Path] | None = None, n0: int | None = None, n: int | None = None,
            alpha: float | None = None, samples: int | None = None, start: int | None = None,
            batch_size: int | None = None, seed: int | None = None, target: str | None = None,
            token: str | None = None, data: str | Path | None = None, progress: bool = True,
            ray: str | RayOptions | None = None) -> CertifyResult:
    """Randomized-smoothing certification over the whole pipeline (the ``[certify]`` section with
    these overrides). ``models``: a noise-trained base model per sigma; paths given here are taken
    as they are (relative to the working folder), those in the file relative to the file. Passing
    ``sigmas`` without ``models`` drops the file's models. ``data``: a folder or manifest in place of
    ``[data]`` (``--data``). ``ray``: certify in shards on a Ray cluster (as ``audit``'s)."""
    cfg = with_data(load_pipeline(pipeline), data)
    overrides: dict[str, Any] = {"n0": n0, "n": n, "alpha": alpha, "samples": samples, "start": start,
                                 "batch_size": batch_size, "seed": seed,
                                 "sigmas": tuple(sigmas) if sigmas else None,
                                 "models": tuple(str(Path(m).resolve()) for m in models) if models else None}
    if sigmas and not models and cfg.extra.get("certify", {}).get("models"):
        overrides["models"] = ()
    spec = certify_spec(cfg, **overrides)
    run = (ray_certify(cfg, _ray_options(ray), target=target, token=token) if ray is not None
           else run_certification)
    return certify_pipeline(cfg, spec, Path(out or f"runs/certify/{cfg.pipeline.name}"), target=target, token=token,
                            progress=progress, run=run)


def info(pipeline: PipelineLike, *, parity: bool = False) -> dict[str, Any]:
    """What the pipeline uses: input shape, the model as advshield wraps it (input CxHxW, layout,
    normalization, output kind, fixed or dynamic batch, classes, the wrapped graph's sha256),
    defenses, detector, randomness, every file with its sha256 (verified against the pins);
    ``parity``: also the twin's max |logit difference| (twin and ONNX Runtime on the wrapped graph)."""
    cfg = load_pipeline(pipeline)
    sums = cfg.checksums(verify=True)
    files = cfg.files()
    served = None
    if cfg.served_model and cfg.model.served.endpoint:  # ask its server (ModelMetadata, ModelConfig), check it
        served = ServedClassifier(cfg)
        cfg = served.config
    wrapped = cfg.wrapped_model() if cfg.has_onnx else None
    report: dict[str, Any] = {
        "pipeline": cfg.pipeline.name,
        "source": str(cfg.source),
        "input": list(cfg.input.shape) if cfg.input.resolved else None,
        "model": {**wrapped.describe(), "model_input": wrapped.graph.describe_input()} if wrapped is not None else None,
        "class_names": list(cfg.class_names),
        "defenses": [e.type for e in cfg.defenses],
        "detector": cfg.detector.type if cfg.detector else None,
        "random": cfg.random,
        "files": {k: {"path": str(files[k][0]), "sha256": v} for k, v in sums.items()},
    }
    if served is not None:
        report["served_model"] = {**served.model.describe(), "output_kind": served.output, "endpoint": served.url}
    elif cfg.served_model:
        report["served_model"] = {"name": cfg.model.served.name, "endpoint": None}
    if parity and wrapped is not None:
        twin = twin_from_config(cfg, device="cpu", reference=classifier_from_config(cfg, device="cpu"))
        report["twin_parity_max_abs_diff"] = twin.parity.max_abs_diff
        if served is not None:  # the twin against what the server answers: what a white-box audit needs
            x = parity_batch(cfg.input.shape)
            p = class_parity(served, twin, x, cfg.model.parity_tolerance)
            report["served_parity"] = {"max_abs_logit_diff": p.max_abs_diff, "tolerance": p.tolerance,
                                       "images": p.samples, "argmax_agreement": p.argmax_agreement, "ok": p.ok}
    if served is not None:
        served.close()
    return report


def classifier(pipeline: PipelineLike) -> DefendedClassifier:
    """The defended pipeline in process (defenses, classifier, detector), as ``serve`` runs it."""
    return DefendedClassifier.from_config(load_pipeline(pipeline))


def predict(pipeline: PipelineLike | DefendedClassifier, images: Any, *, seed: int | None = None) -> Prediction:
    """Classify ``images`` through the defended pipeline.

    ``images``: pixels as numpy or torch, float32 in [0, 1] (float64/float16 are cast) or uint8
    (divided by 255), NCHW or NHWC, or one image [C, H, W] / [H, W, C] (/ [H, W] for grey models)
    (rules: ``advshield.plugin.pixels.to_pixels``; anything else is an ``InputError`` naming the
    expected dtype and layout); or a sequence of image files (paths) or encoded PNG/JPEG bytes,
    decoded by the serving path's decoder (``ImageError`` names the image that fails)."""
    clf = pipeline if isinstance(pipeline, DefendedClassifier) else classifier(pipeline)
    if isinstance(images, list | tuple) and images and isinstance(images[0], str | Path | bytes):
        encoded = []
        for i, item in enumerate(images):
            try:
                encoded.append(item if isinstance(item, bytes) else Path(item).read_bytes())
            except OSError as e:
                raise ImageError(f"image {i} ({item}): cannot read file: {e.strerror}") from None
        return clf.predict_bytes(encoded, seed=seed)  # decode errors name the image's index
    return clf.predict(images, seed=seed)


def serve(pipeline: PipelineLike, *, block: bool = True, token: str | None = None,
          **overrides: Any) -> int | ScoringServer:
    """advshield's KServe v2 gRPC scoring server for the pipeline (the ``[serve]`` section with
    ``overrides``: host, port, max_batch_size, ...). ``block=True`` serves until SIGINT/SIGTERM and
    returns the exit status; ``block=False`` returns the started ``ScoringServer`` (a context
    manager; ``.port``, ``.stop()``)."""
    cfg = load_pipeline(pipeline)
    spec = serve_spec(cfg, **overrides)
    if block:
        return _serve_forever(cfg, spec, token)
    return build_server(cfg, spec, token).start()


def deploy_triton(pipeline: PipelineLike, out: str | Path, *, overwrite: bool = False, **options: Any) -> Repository:
    """Generate the Triton model repository (ensemble: preprocessing/defenses, classifier,
    post-processing) for the pipeline; ``options`` override its ``[deploy]`` section (gpu,
    classifier_backend, max_batch_size, instances...), see ``advshield.deploy.triton``."""
    return generate_repository(pipeline, out, overwrite=overwrite, **options)


def train(out: str | Path, *, data_dir: str | Path | None = None, epochs: int = 4, seed: int = 0,
          noise_sigma: float = 0.0, surrogate: bool = True, threads: int = 2,
          progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train the embedded default's models on Fashion-MNIST (reference CNN, transfer surrogate;
    ``noise_sigma`` > 0: a Gaussian-noise base model for smoothing) and export them to ONNX in
    ``out``; returns each model's card (accuracy, sha256, parity)."""
    return train_models(Path(out), data_dir=data_dir, epochs=epochs, seed=seed, noise_sigma=noise_sigma,
                        surrogate=surrogate, threads=threads, progress=progress)


def copy_examples(dest: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy the shipped example pipelines (``dest/pipelines``) and the models they use
    (``dest/models``) into a working folder, where ``fit`` may write their artifacts; returns the
    copied pipeline files. advshield never writes inside its installed package."""
    return _copy_examples(dest, overwrite=overwrite)


def init(model: str | Path, data: str | Path | None = None, out: str | Path | None = None, *,
         name: str | None = None, mean: tuple[float, ...] = (), std: tuple[float, ...] = (), scale: float = 1.0,
         layout: str = "auto", overwrite: bool = False) -> InitResult:
    """Write a pipeline file for an ONNX model and an image folder or manifest (input spec,
    layout, batch, output kind and classes read from the model and the folder; commented defense
    examples; a gate with a robustness threshold). The file is loaded back before returning."""
    return init_pipeline(model, data, out, name=name, mean=mean, std=std, scale=scale, layout=layout,
                         overwrite=overwrite)


__all__ = [
    "AuditResult",
    "CertifyResult",
    "MergeResult",
    "PipelineConfig",
    "Prediction",
    "RayOptions",
    "ShardResult",
    "audit",
    "audit_merge",
    "audit_shard_run",
    "certify",
    "classifier",
    "copy_examples",
    "deploy_triton",
    "fit",
    "info",
    "init",
    "load_pipeline",
    "predict",
    "serve",
    "train",
]
