"""Generate a Triton model repository from a pipeline file.

For a pipeline named ``P`` (``[pipeline] name``) the repository holds::
    P/                      ensemble: the public model, same name, tensors and config parameters as
                            advshield serve (advshield.plugin.protocol), so one client fits both
    P__preprocess/          Python backend: IMAGE (BYTES) or PIXELS -> decode, validate, image-layer
                            defenses -> DEFENDED, plus SQUEEZED_<i> per detector squeezer
    P__classifier/          model.onnx: backend "onnxruntime" (GPU servers) or ONNX Runtime inside
                            the Python backend (servers without that backend, e.g. the pytriton wheel)
    P__segment<k>/          instead of P__classifier when defenses run on feature layers: the model
    P__features<k>/         cut at those tensors, head -> feature-layer defenses -> ... -> tail
    P__postprocess/         Python backend: logits (+ the squeezed passes' logits) -> PROBS, LABEL,
                            DETECTOR_SCORE, FLAGGED

The ensemble runs the classifier chain once on DEFENDED and once per squeezed copy (the detector's
extra passes). Every config.pbtxt is built as a ``tritonclient.grpc.model_config_pb2.ModelConfig``
and written with ``google.protobuf.text_format``. Each Python model gets its ``model.py`` (from
``deploy/python_models/``), a ``pipeline.toml`` restricted to what it runs, and the artifacts it
reads, copied with their sha256 pinned in that file (verified when the model loads).
``P/advshield-manifest.json`` lists every generated file with its sha256 (``verify_repository``).

Settings come from the pipeline's ``[deploy]`` section (``DeploySpec``); command-line flags
override them.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from advshield.core.errors import ArtifactError, ConfigError, ModelError
from advshield.core.hashing import sha256_file
from advshield.core.validation import check, from_mapping, to_mapping
from advshield.core.version import __version__
from advshield.defenses.registry import build_defense, build_detector
from advshield.deploy.tritonserver import TritonError, start_triton
from advshield.plugin import protocol as P
from advshield.plugin.config import PipelineConfig, load_pipeline
from advshield.plugin.endpoint import Endpoint
from advshield.plugin.served import (
    Declared,
    apply_served,
    check_served,
    from_model_config,
    read_declared,
    served_to_dict,
)
from advshield.plugin.served import read_config_file as read_served_config
from advshield.plugin.split import candidate_tensors, split_model

from . import runtime as R

PYTHON_MODELS = Path(__file__).resolve().parent / "python_models"
MANIFEST = "advshield-manifest.json"
CACHE_BYTES = 64 << 20  # local response cache of a server started by serve_repository, when a model uses it
VERSION = P.MODEL_VERSION


log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DeploySpec:
    """``[deploy]`` of the pipeline file."""
    max_batch_size: int = 64  # images per request and per batch of every generated model
    max_queue_delay_us: int = 2000  # dynamic batching: how long a request waits for company
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1  # instances of each Python model (preprocess, features, postprocess)
    classifier_instances: int = 1  # instances of the classifier (or of each segment)
    classifier_backend: Literal["onnxruntime", "python"] = "onnxruntime"
    gpu: bool = False  # target server has GPUs: classifier instances KIND_GPU
    gpus: tuple[int, ...] = ()  # GPU ids for the instance groups (empty: all)
    defenses_on_gpu: bool = True  # with gpu: preprocess and features instances on the GPU too
    threads: int = 1  # torch / ONNX Runtime threads per Python-model instance
    response_cache: bool = False  # cache responses of a deterministic pipeline (never a random one)

    def __post_init__(self) -> None:
        check(1 <= self.max_batch_size <= 4096, f"deploy.max_batch_size: must be within [1, 4096], got {self.max_batch_size}")
        check(0 <= self.max_queue_delay_us <= 10_000_000,
              f"deploy.max_queue_delay_us: must be within [0, 10000000], got {self.max_queue_delay_us}")
        check(all(1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes),
              f"deploy.preferred_batch_sizes: each must be within [1, max_batch_size = {self.max_batch_size}], "
              f"got {list(self.preferred_batch_sizes)}")
        check(self.instances >= 1, f"deploy.instances: must be >= 1, got {self.instances}")
        check(self.classifier_instances >= 1, f"deploy.classifier_instances: must be >= 1, got {self.classifier_instances}")
        check(all(g >= 0 for g in self.gpus), f"deploy.gpus: GPU ids must be >= 0, got {list(self.gpus)}")
        check(not self.gpus or self.gpu, f"deploy.gpus: {list(self.gpus)} given but gpu = false")
        check(1 <= self.threads <= 64, f"deploy.threads: must be within [1, 64], got {self.threads}")


def deploy_spec(cfg: PipelineConfig, **overrides: Any) -> DeploySpec:
    """The pipeline's ``[deploy]`` table with the non-None ``overrides`` applied."""
    spec = from_mapping(DeploySpec, dict(cfg.extra.get("deploy", {})), "deploy")
    changes: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    try:
        return replace(spec, **changes)
    except TypeError as e:
        raise ConfigError(f"deploy: {e}") from None


@dataclass(frozen=True)
class Repository:
    """What ``generate_repository`` wrote."""
    root: Path
    ensemble: str  # the public model's name (= the pipeline's name)
    models: tuple[str, ...]  # every generated model, the ensemble last
    files: Mapping[str, str] = field(default_factory=dict)  # path relative to root -> sha256
    spec: DeploySpec = field(default_factory=DeploySpec)
    random: bool = False

    def config(self, model: str):
        return read_config(self.root / model / "config.pbtxt")


# --- protobuf configs --------------------------------------------------------------------------

def _mc():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def write_config(cfg, path: Path) -> Path:
    from google.protobuf import text_format

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(cfg))
    return path


def read_config(path: str | Path):
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), _mc().ModelConfig())


def _dtype(datatype: str) -> int:
    return _mc().DataType.Value(P.DATATYPES[datatype][1])


def _tensor(msgs, name: str, datatype: str, dims, optional: bool = False) -> None:
    t = msgs.add(name=name, data_type=_dtype(datatype), dims=[int(d) for d in dims])
    if optional:
        t.optional = True


def _base(name: str, backend: str, spec: DeploySpec, *, kind: str, count: int, params: Mapping[str, str],
          random: bool):
    mc = _mc()
    cfg = mc.ModelConfig(name=name, backend=backend, max_batch_size=spec.max_batch_size)
    cfg.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
    cfg.dynamic_batching.preferred_batch_size.extend(spec.preferred_batch_sizes)
    group = cfg.instance_group.add(count=count, kind=mc.ModelInstanceGroup.Kind.Value(kind))
    if kind == "KIND_GPU" and spec.gpus:
        group.gpus.extend(spec.gpus)
    for k, v in params.items():
        cfg.parameters[k].string_value = str(v)
    if random:
        cfg.response_cache.enable = False
    return cfg


# --- the model and the pipeline ----------------------------------------------------------------

@dataclass(frozen=True)
class _Onnx:
    input_name: str
    output_name: str
    input_dims: tuple[int, ...]
    output_dims: tuple[int, ...]


def _onnx_io(model, where: str, batching: bool) -> _Onnx:
    g = model.graph
    init = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in init]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelError(f"{where}: Triton deployment needs one input and one output, the model has "
                         f"{[i.name for i in inputs]} -> {[o.name for o in g.output]}")

    def dims(v) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]

    din, dout = dims(inputs[0]), dims(g.output[0])
    for name, d in ((inputs[0].name, din), (g.output[0].name, dout)):
        if batching and d and isinstance(d[0], int) and d[0] != 0:
            raise ModelError(f"{where}: tensor {name!r} has a fixed batch dimension {d[0]}; max_batch_size > 0 "
                             f"needs a dynamic one for the onnxruntime backend (export with a symbolic batch axis, "
                             f"or generate with classifier_backend = \"python\", which runs it in chunks)")
        if not all(isinstance(x, int) and x > 0 for x in d[1:]):
            raise ModelError(f"{where}: tensor {name!r} needs fixed non-batch dimensions, has {d}")
    return _Onnx(inputs[0].name, g.output[0].name, tuple(int(x) for x in din[1:]), tuple(int(x) for x in dout[1:]))


def _layer(entry) -> str:
    return getattr(entry.config, "layer", "image") or "image"


def _artifact_names(entries, detector_entry=None) -> list[str]:
    """Artifacts the given defense entries (and detector) load, as ``load_defenses`` reads them."""
    names: list[str] = []
    for e in entries:
        d = build_defense(e.type, e.config)
        if d.needs_fit:
            names += [n for n in d.artifact_names if n not in names]
    if detector_entry is not None:
        det = build_detector(detector_entry.type, detector_entry.config)
        names += [n for n in det.artifact_names if n not in names]
    return names


def _model_toml(cfg: PipelineConfig, *, model_rel: str, defenses, detector: bool, artifacts: Mapping[str, str],
                role: str) -> str:
    import tomli_w

    doc: dict[str, Any] = {
        "pipeline": {"name": cfg.pipeline.name,
                     "description": f"{role} of pipeline {cfg.pipeline.name!r} (generated by advshield {__version__})"},
        # model.onnx in the repository is the wrapped graph: pixels in [0, 1], NCHW, logits; a served
        # model keeps its own normalization, layout and output kind (applied by the Python models)
        "model": ({**to_mapping(cfg.model), "path": "", "sha256": "", "surrogate": "",
                   "classes": list(cfg.class_names), "classes_file": ""} if cfg.served_model else
                  {**to_mapping(cfg.model), "path": model_rel, "sha256": "", "surrogate": "", "mean": [], "std": [],
                   "scale": 1.0, "layout": "nchw", "output": "logits", "classes": list(cfg.model_class_names),
                   "classes_file": ""}),
        "input": to_mapping(cfg.input),
        "data": to_mapping(cfg.data.standalone(cfg.root)),  # the class names, no data set: serving reads none
    }
    if defenses:
        doc["defenses"] = [{"type": e.type, **to_mapping(e.config)} for e in defenses]
    if detector and cfg.detector is not None:
        doc["detector"] = {"type": cfg.detector.type, **to_mapping(cfg.detector.config)}
    if artifacts:
        doc["artifacts"] = {k: {"path": f"artifacts/{Path(p).name}", "sha256": artifacts[k]}
                            for k, p in _artifact_files(cfg, artifacts).items()}
    return f"# generated by advshield deploy triton from {cfg.source.name if cfg.source else 'a pipeline'}; do not edit\n" \
           + tomli_w.dumps(doc)


def _artifact_files(cfg: PipelineConfig, artifacts: Mapping[str, str]) -> dict[str, str]:
    return {k: f"{k}{''.join(cfg.artifact_path(k).suffixes)}" for k in artifacts}


def _python_model(dest: Path, source: str, toml: str | None, cfg: PipelineConfig, artifacts: Mapping[str, str]) -> None:
    version = dest / VERSION
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PYTHON_MODELS / source, version / "model.py")
    if toml is not None:
        (version / "pipeline.toml").write_text(toml)
    for name, fname in _artifact_files(cfg, artifacts).items():
        src = cfg.artifact_path(name)
        (version / "artifacts").mkdir(exist_ok=True)
        shutil.copy2(src, version / "artifacts" / fname)
        sidecar = Path(str(src) + ".meta.json")
        if sidecar.is_file():
            shutil.copy2(sidecar, version / "artifacts" / f"{fname}.meta.json")


def _checksums(cfg: PipelineConfig) -> dict[str, str]:
    """sha256 of the model and every artifact (what the repository serves; not the surrogate),
    checked against the sha256 the pipeline declares."""
    out = {}
    for key, (path, declared) in cfg.files().items():
        if key == "surrogate":
            continue
        if not path.is_file():
            raise ArtifactError(f"{key}: file not found: {path}")
        digest = sha256_file(path)
        if declared and declared != digest:
            raise ArtifactError(f"{key}: sha256 mismatch for {path}: file has {digest}, pipeline declares {declared}")
        out[key] = digest
    return out


@dataclass(frozen=True)
class _Layout:
    """The generated models of one pipeline, as the ensemble wires them."""
    preprocess: str
    postprocess: str
    chain: tuple[str, ...]  # the classifier, or its segments head ... tail
    ios: tuple[_Onnx, ...]  # their tensors
    features: tuple[str, ...]  # the feature-layer defense model after chain[k]
    squeezers: int
    num_classes: int
    version: int = -1  # of the chain's models (-1: the server's policy); a served model's [model] served.version


def _ensemble_config(cfg: PipelineConfig, spec: DeploySpec, layout: _Layout, model_sha256: str):
    """The public model: the wire contract's tensors and parameters (``protocol.model_config``),
    preprocess, then the classifier chain once on the defended batch and once per squeezed copy
    (head -> feature defenses -> ... -> tail when the model is split), then postprocess."""
    name, random = cfg.pipeline.name, cfg.random
    ens = P.model_config(name, channels=cfg.input.channels, height=cfg.input.height, width=cfg.input.width,
                         num_classes=layout.num_classes, max_batch_size=spec.max_batch_size,
                         class_names=cfg.class_names, detector=cfg.detector.type if cfg.detector else "",
                         random=random, platform="ensemble")
    # ensembles schedule; their composing models batch. The ensemble itself is not batching
    # (protocol.model_config: max_batch_size 0, so that Triton checks each tensor's full int64
    # shape against its bytes and no 32-bit batch wrap reaches a model); Triton hands the batching
    # composing models their batch from the full shape
    ens.ClearField("dynamic_batching")
    ens.response_cache.enable = bool(spec.response_cache and not random)
    ens.parameters["advshield_version"].string_value = __version__
    ens.parameters["model_sha256"].string_value = model_sha256
    steps = ens.ensemble_scheduling.step

    def step(model: str, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> None:
        s = steps.add(model_name=model, model_version=layout.version if model in layout.chain else -1)
        for k, v in inputs.items():
            s.input_map[k] = v
        for k, v in outputs.items():
            s.output_map[k] = v

    sources = ["defended"] + [f"squeezed_{i + 1}" for i in range(layout.squeezers)]
    step(layout.preprocess, {P.INPUT_IMAGE: P.INPUT_IMAGE, P.INPUT_PIXELS: P.INPUT_PIXELS},
         {R.DEFENDED: sources[0], **{R.SQUEEZED.format(i + 1): s for i, s in enumerate(sources[1:])}})
    logits = []
    for p, src in enumerate(sources):
        cur = src
        for k, (m, io) in enumerate(zip(layout.chain, layout.ios)):
            last = k == len(layout.chain) - 1
            out_t = f"logits_{p}" if last else f"pass{p}_cut{k}"
            step(m, {io.input_name: cur}, {io.output_name: out_t})
            cur = out_t
            if not last:
                step(layout.features[k], {R.FEATURE: cur}, {R.DEFENDED: f"{cur}_defended"})
                cur = f"{cur}_defended"
        logits.append(cur)
    step(layout.postprocess,
         {R.LOGITS: logits[0], **{R.LOGITS_SQUEEZED.format(i + 1): t for i, t in enumerate(logits[1:])}},
         {t.name: t.name for t in P.output_tensors(layout.num_classes)})
    return ens


def generate_repository(pipeline: PipelineConfig | str | Path, out: str | Path, *, overwrite: bool = False,
                        **overrides: Any) -> Repository:
    """Write the Triton model repository for ``pipeline`` into ``out`` (created if needed; other
    pipelines' models already there are kept, so one server can load several ensembles).
    ``overrides``: ``DeploySpec`` fields (e.g. ``classifier_backend="python"``, ``gpu=True``)."""
    import onnx


    cfg = pipeline if isinstance(pipeline, PipelineConfig) else load_pipeline(pipeline)
    if cfg.served_model:  # an ensemble around a model the repository holds already
        return _generate_served(cfg, Path(out), overwrite=overwrite, overrides=overrides)
    spec = deploy_spec(cfg, **overrides)
    sums = _checksums(cfg)
    name = cfg.pipeline.name
    root = Path(out)
    random = cfg.random

    # the pieces
    image_steps = [e for e in cfg.defenses if _layer(e) == "image"]
    by_layer: dict[str, list] = {}
    for e in cfg.defenses:
        if _layer(e) != "image":
            by_layer.setdefault(_layer(e), []).append(e)
    squeezers = 0
    if cfg.detector is not None:
        det = build_detector(cfg.detector.type, cfg.detector.config)
        if not hasattr(det, "squeezers") or not hasattr(det, "flag"):
            raise ConfigError(f"detector.type: {cfg.detector.type!r} has no squeezed classifier passes; the Triton "
                              f"generator supports the squeeze detector")
        squeezers = len(det.squeezers)
    wrapped = cfg.wrapped_model()  # what the classifier serves: pixels in [0, 1] NCHW (plugin/model_io.py)
    full = wrapped.proto()
    chosen = overrides.get("classifier_backend") is not None or "classifier_backend" in cfg.extra.get("deploy", {})
    if wrapped.batch and spec.classifier_backend == "onnxruntime" and not chosen:
        # Triton's onnxruntime backend batches requests; a fixed-batch export cannot take them, the
        # Python-backend classifier runs it in chunks of its batch
        log.warning("%s has a fixed batch of %d: the classifier step uses the Python backend (ONNX Runtime in chunks "
                    "of %d); export with a dynamic batch axis to use Triton's onnxruntime backend",
                    cfg.model_path.name, wrapped.batch, wrapped.batch)
        spec = replace(spec, classifier_backend="python")
    # the Python-backend classifier runs a fixed-batch model in chunks of its batch; the onnxruntime backend cannot
    batching = spec.classifier_backend == "onnxruntime"
    model_io = _onnx_io(full, str(cfg.model_path), batching=batching)
    if model_io.input_dims != cfg.input.shape:
        raise ConfigError(f"input: the pipeline says {list(cfg.input.shape)} but {cfg.model_path.name} takes "
                          f"{list(model_io.input_dims)}")
    num_classes = model_io.output_dims[-1]
    if len(model_io.output_dims) != 1:
        raise ModelError(f"{cfg.model_path}: output must be [batch, classes], is [batch, {list(model_io.output_dims)}]")
    shapes = {t.name: t.shape for t in candidate_tensors(full)} if by_layer else {}
    segments = split_model(full, list(by_layer)) if by_layer else []
    cuts = [s.graph.output[0].name for s in segments[:-1]]

    n_pre, n_post = f"{name}__preprocess", f"{name}__postprocess"
    chain = [f"{name}__segment{k}" for k in range(len(segments))] if segments else [f"{name}__classifier"]
    features = [f"{name}__features{k}" for k in range(len(cuts))]
    models = [n_pre, *chain, *features, n_post, name]
    existing = [m for m in models if (root / m).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{root}: models {existing} exist already; pass overwrite=True (--force) to replace them")
    for m in existing:
        shutil.rmtree(root / m)
    root.mkdir(parents=True, exist_ok=True)

    py_kind = "KIND_GPU" if spec.gpu and spec.defenses_on_gpu else "KIND_CPU"
    clf_kind = "KIND_GPU" if spec.gpu else "KIND_CPU"
    common = {"pipeline": name, "threads": str(spec.threads)}
    first_onnx = f"../../{chain[0]}/{VERSION}/model.onnx"

    # preprocess
    pre_art = {k: sums[f"artifacts.{k}"] for k in _artifact_names(image_steps)}
    _python_model(root / n_pre, "preprocess.py",
                  _model_toml(cfg, model_rel=first_onnx, defenses=image_steps, detector=squeezers > 0,
                              artifacts=pre_art, role="preprocessing"), cfg, pre_art)
    c = _base(n_pre, "python", spec, kind=py_kind, count=spec.instances, params=common, random=random)
    for t in P.input_tensors(*cfg.input.shape):
        _tensor(c.input, t.name, t.datatype, t.dims, optional=True)
    for out_name in [R.DEFENDED] + [R.SQUEEZED.format(i + 1) for i in range(squeezers)]:
        _tensor(c.output, out_name, "FP32", cfg.input.shape)
    write_config(c, root / n_pre / "config.pbtxt")

    # classifier, or segments with feature-layer defenses between them
    protos = segments or [full]
    ios = []
    for m, proto in zip(chain, protos):
        io = _onnx_io(proto, f"{m} (model.onnx)", batching=batching)
        ios.append(io)
        version = root / m / VERSION
        version.mkdir(parents=True, exist_ok=True)
        if segments:
            onnx.save(proto, str(version / "model.onnx"))
        elif wrapped.external_data:  # not wrapped, weights in separate files: the file as it is
            shutil.copy2(cfg.model_path, version / "model.onnx")
        else:
            (version / "model.onnx").write_bytes(wrapped.data)
        backend = spec.classifier_backend
        c = _base(m, backend, spec, kind=clf_kind, count=spec.classifier_instances,
                  params=common if backend == "python" else {"pipeline": name}, random=False)
        if backend == "python":
            shutil.copy2(PYTHON_MODELS / "classifier.py", version / "model.py")
        else:
            c.default_model_filename = "model.onnx"
        _tensor(c.input, io.input_name, "FP32", io.input_dims)
        _tensor(c.output, io.output_name, "FP32", io.output_dims)
        write_config(c, root / m / "config.pbtxt")
    for m, cut in zip(features, cuts):
        entries = by_layer.get(cut, [])
        dims = tuple(int(d) for d in shapes[cut][1:])
        art = {a: sums[f"artifacts.{a}"] for a in _artifact_names(entries)}
        _python_model(root / m, "features.py",
                      _model_toml(cfg, model_rel=first_onnx, defenses=entries, detector=False, artifacts=art,
                                  role=f"feature-layer defenses at {cut!r}"), cfg, art)
        c = _base(m, "python", spec, kind=py_kind, count=spec.instances, params={**common, "layer": cut}, random=random)
        _tensor(c.input, R.FEATURE, "FP32", dims)
        _tensor(c.output, R.DEFENDED, "FP32", dims)
        write_config(c, root / m / "config.pbtxt")

    # postprocess
    post_art = {k: sums[f"artifacts.{k}"] for k in _artifact_names([], cfg.detector)} if cfg.detector else {}
    _python_model(root / n_post, "postprocess.py",
                  _model_toml(cfg, model_rel=first_onnx, defenses=[], detector=True, artifacts=post_art,
                              role="post-processing"), cfg, post_art)
    c = _base(n_post, "python", spec, kind="KIND_CPU", count=spec.instances, params=common, random=random)
    for in_name in [R.LOGITS] + [R.LOGITS_SQUEEZED.format(i + 1) for i in range(squeezers)]:
        _tensor(c.input, in_name, "FP32", (num_classes,))
    for t in P.output_tensors(num_classes):
        _tensor(c.output, t.name, t.datatype, t.dims)
    write_config(c, root / n_post / "config.pbtxt")

    # the ensemble: the public model
    layout = _Layout(n_pre, n_post, tuple(chain), tuple(ios), tuple(features), squeezers, num_classes)
    ens = _ensemble_config(cfg, spec, layout, model_sha256=sums["model"])
    write_config(ens, root / name / "config.pbtxt")
    (root / name / VERSION).mkdir(parents=True, exist_ok=True)
    (root / name / VERSION / ".keep").write_text("")  # an ensemble needs an (empty) version folder

    files = {}
    for m in models:
        for f in sorted((root / m).rglob("*")):
            if f.is_file() and f.name != MANIFEST and "__pycache__" not in f.parts:
                files[f.relative_to(root).as_posix()] = sha256_file(f)
    manifest = {"format": "advshield.triton_repository/1", "advshield_version": __version__, "pipeline": name,
                "source": cfg.source.name if cfg.source else "", "random": random, "models": models,
                "spec": to_mapping(spec), "inputs_sha256": sums, "wrapped_model_sha256": wrapped.sha256,
                "files": files}
    (root / name / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Repository(root.resolve(), name, tuple(models), files, spec, random)


def _served_description(cfg: PipelineConfig, root: Path) -> tuple[Declared, Path]:
    """What the repository's own config.pbtxt of the served model declares (or, when that config
    leaves its tensors to Triton's auto-complete, what its server answers at [model] served.endpoint)."""
    served = cfg.model.served
    folder = root / served.name
    path = folder / "config.pbtxt"
    if not path.is_file():
        others = sorted(p.parent.name for p in root.glob("*/config.pbtxt")) if root.is_dir() else []
        raise ConfigError(f"model.served.name: {root} holds no model {served.name!r} (no {path}); deploy triton writes "
                          f"the ensemble into the repository that holds the served model, so --out must be that "
                          f"repository (models there: {', '.join(others) or 'none'})")
    if served.version and not (folder / served.version).is_dir():
        versions = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
        raise ConfigError(f"model.served.version: {served.name!r} in {root} has no version {served.version} "
                          f"(versions there: {', '.join(versions) or 'none'})")
    config = read_served_config(path)
    declared = from_model_config(config, str(path), served.version)
    if not (declared.inputs and declared.outputs):  # auto-completed by the server at load time
        if not served.endpoint:
            raise ConfigError(f"{path} declares no {'inputs' if not declared.inputs else 'outputs'} (Triton "
                              f"auto-completes them when it loads the model): give [model] served.endpoint of a "
                              f"server that runs it, so deploy triton can read its ModelConfig")
        with Endpoint(served.endpoint, timeout=served.timeout_s) as endpoint:
            declared = read_declared(endpoint, served.name, served.version)
    return declared, path


def _generate_served(cfg: PipelineConfig, root: Path, *, overwrite: bool, overrides: Mapping[str, Any]) -> Repository:
    """The ensemble around ``[model] served``, a model ``root`` holds already, referenced by name:
    ``P__preprocess`` (defenses, squeezers, then the model's normalization, layout and datatype)
    -> the served model, once on the defended batch and once per squeezed copy -> ``P__postprocess``
    (its scores as logits, softmax, label, detector). Nothing of the served model is copied or
    changed; its config is checked here (tensor names, dims, datatypes, max_batch_size)."""
    served = cfg.model.served
    name = cfg.pipeline.name
    declared, config_path = _served_description(cfg, root)
    model = check_served(cfg, declared)
    cfg = apply_served(cfg, model)
    bad = [e.type for e in cfg.defenses if _layer(e) != "image"]
    if bad:
        raise ConfigError(f"defenses: {bad} run on a feature layer; a served model is called whole (its graph is not "
                          f"advshield's to cut): use layer = \"image\"")
    output = cfg.model.output
    if output == "auto":
        if not cfg.has_onnx:
            raise ConfigError(f"model.output: say what {served.name!r} outputs (\"logits\", \"probabilities\" or "
                              f"\"log_probabilities\"); deploy triton does not run the model to find out")
        output = cfg.wrapped_model().output  # the twin's graph says it
    spec = deploy_spec(cfg, **overrides)
    if model.max_batch_size == 0:
        raise ConfigError(f"model.served: {served.name!r} has max_batch_size 0 ({config_path}); the generated ensemble "
                          f"batches requests ([N, ...] tensors), so the model must batch too (max_batch_size >= 1)")
    asked = overrides.get("max_batch_size") is not None or "max_batch_size" in cfg.extra.get("deploy", {})
    if spec.max_batch_size > model.max_batch_size:
        if asked:
            raise ConfigError(f"deploy.max_batch_size: {spec.max_batch_size} is more than {served.name!r} takes "
                              f"(max_batch_size {model.max_batch_size} in {config_path})")
        spec = replace(spec, max_batch_size=model.max_batch_size,
                       preferred_batch_sizes=tuple(b for b in spec.preferred_batch_sizes if b <= model.max_batch_size))
    squeezers = 0
    if cfg.detector is not None:
        det = build_detector(cfg.detector.type, cfg.detector.config)
        if not hasattr(det, "squeezers") or not hasattr(det, "flag"):
            raise ConfigError(f"detector.type: {cfg.detector.type!r} has no squeezed classifier passes; the Triton "
                              f"generator supports the squeeze detector")
        squeezers = len(det.squeezers)
    sums = _checksums(cfg)  # artifacts (and the twin, when given): nothing of the served model
    n_pre, n_post = f"{name}__preprocess", f"{name}__postprocess"
    models = [n_pre, n_post, name]
    if served.name in models:
        raise ConfigError(f"model.served.name: {served.name!r} is the name of a model deploy triton generates for "
                          f"pipeline {name!r}; rename the pipeline ([pipeline] name)")
    existing = [m for m in models if (root / m).exists()]
    if existing and not overwrite:
        raise ConfigError(f"{root}: models {existing} exist already; pass overwrite=True (--force) to replace them")
    for m in existing:
        shutil.rmtree(root / m)

    common = {"pipeline": name, "threads": str(spec.threads), "served_model": served.name}
    py_kind = "KIND_GPU" if spec.gpu and spec.defenses_on_gpu else "KIND_CPU"
    resolved = replace(cfg, model=replace(cfg.model, output=output, layout=model.layout,
                                          served=replace(served, input=model.input.name, output=model.output.name,
                                                         datatype=model.input.datatype, version=model.version,
                                                         endpoint="")))  # the ensemble calls it inside its server
    image_steps = list(cfg.defenses)
    pre_art = {k: sums[f"artifacts.{k}"] for k in _artifact_names(image_steps)}
    _python_model(root / n_pre, "preprocess.py",
                  _model_toml(resolved, model_rel="", defenses=image_steps, detector=squeezers > 0, artifacts=pre_art,
                              role="preprocessing"), cfg, pre_art)
    c = _base(n_pre, "python", spec, kind=py_kind, count=spec.instances, params=common, random=cfg.random)
    for t in P.input_tensors(*cfg.input.shape):
        _tensor(c.input, t.name, t.datatype, t.dims, optional=True)
    for out_name in [R.DEFENDED] + [R.SQUEEZED.format(i + 1) for i in range(squeezers)]:
        _tensor(c.output, out_name, model.input.datatype, model.input.dims)
    write_config(c, root / n_pre / "config.pbtxt")

    post_art = {k: sums[f"artifacts.{k}"] for k in _artifact_names([], cfg.detector)} if cfg.detector else {}
    _python_model(root / n_post, "postprocess.py",
                  _model_toml(resolved, model_rel="", defenses=[], detector=True, artifacts=post_art,
                              role="post-processing"), cfg, post_art)
    c = _base(n_post, "python", spec, kind="KIND_CPU", count=spec.instances, params=common, random=cfg.random)
    for in_name in [R.LOGITS] + [R.LOGITS_SQUEEZED.format(i + 1) for i in range(squeezers)]:
        _tensor(c.input, in_name, model.output.datatype, model.output.dims)
    for t in P.output_tensors(model.num_classes):
        _tensor(c.output, t.name, t.datatype, t.dims)
    write_config(c, root / n_post / "config.pbtxt")
    description = json.dumps(served_to_dict(model), indent=2, sort_keys=True) + "\n"
    for m in (n_pre, n_post):
        (root / m / VERSION / R.SERVED_JSON).write_text(description)

    io = _Onnx(model.input.name, model.output.name, model.input.dims, model.output.dims)
    layout = _Layout(n_pre, n_post, (served.name,), (io,), (), squeezers, model.num_classes,
                     version=int(model.version) if model.version else -1)
    config_sha = sha256_file(config_path)
    ens = _ensemble_config(cfg, spec, layout, model_sha256=sums.get("model", ""))
    ens.parameters["served_model"].string_value = served.name
    ens.parameters["served_model_config_sha256"].string_value = config_sha
    write_config(ens, root / name / "config.pbtxt")
    (root / name / VERSION).mkdir(parents=True, exist_ok=True)
    (root / name / VERSION / ".keep").write_text("")

    files = {}
    for m in models:
        for f in sorted((root / m).rglob("*")):
            if f.is_file() and f.name != MANIFEST and "__pycache__" not in f.parts:
                files[f.relative_to(root).as_posix()] = sha256_file(f)
    manifest = {"format": "advshield.triton_repository/1", "advshield_version": __version__, "pipeline": name,
                "source": cfg.source.name if cfg.source else "", "random": cfg.random, "models": models,
                "spec": to_mapping(spec), "inputs_sha256": sums,
                "served_model": {**model.describe(), "config": f"{served.name}/config.pbtxt",
                                 "config_sha256": config_sha, "output_kind": output},
                "files": files}
    (root / name / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.info("ensemble %s around the served model %s (%s): %s", name, served.name, model.platform, model.describe())
    return Repository(root.resolve(), name, tuple(models), files, spec, cfg.random)


def verify_repository(root: str | Path, ensemble: str) -> dict[str, Any]:
    """Check every file listed in ``<ensemble>/advshield-manifest.json`` against its sha256."""
    root = Path(root)
    path = root / ensemble / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: no manifest; not a repository generated by advshield deploy triton")
    manifest = json.loads(path.read_text())
    for rel, digest in manifest["files"].items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"{root}: {rel} is missing")
        got = sha256_file(f)
        if got != digest:
            raise ArtifactError(f"{root}: {rel} has sha256 {got}, the manifest says {digest}")
    return manifest


def serve_repository(repo: Repository | str | Path, models: list[str] | None = None, **kwargs: Any):
    """Start the wheel's tritonserver on a generated repository (``deploy.tritonserver.start_triton``).
    The wheel has no onnxruntime backend: generate with ``classifier_backend="python"`` for it."""

    root = repo.root if isinstance(repo, Repository) else Path(repo)
    names = models or ([repo.ensemble] if isinstance(repo, Repository) else [])
    if not names:
        raise TritonError("serve_repository: name the ensemble(s) to load")
    cached = False
    for n in names:
        if (root / n / "config.pbtxt").is_file():
            cached |= read_config(root / n / "config.pbtxt").response_cache.enable
        for f in root.glob(f"{n}__*/config.pbtxt"):
            if read_config(f).backend == "onnxruntime":
                raise TritonError(f"{f.parent.name} uses backend 'onnxruntime', which this tritonserver lacks; "
                                  f"generate the repository with --classifier-backend python to serve it here")
    if cached:
        kwargs.setdefault("cache_bytes", CACHE_BYTES)  # a model asks for the response cache: give it one
    return start_triton(root, names, **kwargs)
