"""A classifier that Triton already serves (``[model] served``), as advshield's Classifier.

* ``ServedModel``: the model's one input and one output as its server declares them (ModelMetadata
  and ModelConfig over gRPC: ``read_served``) or as its ``config.pbtxt`` does (``from_model_config``,
  for ``deploy triton``, which needs no running server), checked against ``[model]`` and
  ``[input]`` by ``check_served``: every field the pipeline gives and the model contradicts is
  named in one ``ConfigError``; what the pipeline leaves out is filled in (tensor names, datatype,
  layout from the config's ``format`` or the dims, channels/height/width, classes, batch).
* ``to_model_input`` / ``to_logits``: advshield's pixels (float32 NCHW in [0, 1]) -> what the
  model takes (``scale``, ``mean``, ``std``, NHWC, its datatype), and what it answers -> logits
  (log of probabilities). The same functions run in ``ServedClassifier`` and in the generated
  Triton preprocessing / post-processing models (``deploy/runtime.py``), so both paths feed the
  model the same tensors; the ONNX twin's wrapped graph applies the same arithmetic in float32.
* ``ServedClassifier``: the model over gRPC through ``advshield.plugin.endpoint.Endpoint`` (one
  channel reused, a deadline per request, retries of UNAVAILABLE, ``concurrency`` requests in
  flight), a classifier call cut into requests of the model's ``max_batch_size``.
* ``resolve_served(cfg)``: the pipeline with its served model read from the server and checked.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advshield.core.errors import ConfigError, ModelError
from advshield.plugin.classifiers import parity_batch, validate_batch
from advshield.plugin.config import SERVED_INPUT_TYPES, SERVED_OUTPUT_TYPES, PipelineConfig
from advshield.plugin.endpoint import Endpoint, RemoteError
from advshield.plugin.model_io import TINY, looks_like_probabilities

log = logging.getLogger(__name__)

NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8}


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # KServe name: FP32, FP16, UINT8, ...
    dims: tuple[int, ...]  # without the batch dimension when the model batches; -1: variable


@dataclass(frozen=True)
class ServedModel:
    """The served model as advshield will call it (``check_served``'s result)."""

    name: str
    version: str  # "" = the server's policy
    platform: str  # backend or platform (onnxruntime, tensorrt_plan, python, ...)
    source: str  # where the description came from, for messages
    max_batch_size: int  # 0: the model does not batch (then ``fixed_batch`` is its first dim)
    fixed_batch: int  # > 0: every request carries exactly this many images (padded); 0: any
    input: Tensor
    output: Tensor
    layout: str  # nchw | nhwc
    shape: tuple[int, int, int]  # C, H, W of the pixels
    num_classes: int

    @property
    def request_dims(self) -> tuple[int, ...]:
        """The input's dims as the ensemble's tensors carry them (no batch dimension)."""
        return self.input.dims

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version or "latest", "platform": self.platform,
                "source": self.source, "max_batch_size": self.max_batch_size,
                "input": f"{self.input.name} {self.input.datatype} {list(self.input.dims)}",
                "output": f"{self.output.name} {self.output.datatype} {list(self.output.dims)}",
                "layout": self.layout, "classes": self.num_classes}


# --- what the model declares ---------------------------------------------------------------------

def _type_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _format_name(fmt: int) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.ModelInput.Format.Name(fmt).removeprefix("FORMAT_").lower()  # none | nchw | nhwc


@dataclass(frozen=True)
class Declared:
    """The model's tensors as its config (or metadata) declares them, before checking."""

    name: str
    platform: str
    source: str
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    formats: dict[str, str]  # input name -> nchw | nhwc | none
    version: str = ""


def from_model_config(config: Any, source: str, version: str = "") -> Declared:
    """``Declared`` of a ``model_config_pb2.ModelConfig`` (a parsed config.pbtxt, or the config a
    server answers ModelConfig with)."""
    ins = tuple(Tensor(t.name, _type_name(t.data_type), tuple(int(d) for d in t.dims)) for t in config.input)
    outs = tuple(Tensor(t.name, _type_name(t.data_type), tuple(int(d) for d in t.dims)) for t in config.output)
    return Declared(config.name, config.backend or config.platform, source, int(config.max_batch_size), ins, outs,
                    {t.name: _format_name(t.format) for t in config.input}, version)


def read_config_file(path: str | Path) -> Any:
    """A config.pbtxt as a ``ModelConfig`` (a ``ConfigError`` naming the file when it does not parse)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    path = Path(path)
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, text_format.ParseError) as e:
        raise ConfigError(f"{path}: not a Triton model config ({e})") from None


def read_declared(endpoint: Endpoint, name: str, version: str = "") -> Declared:
    """``Declared`` of a model on a live server: its ModelMetadata (tensors, as the server accepts
    them) and ModelConfig (max_batch_size, platform, input formats). A model the server does not
    have, or that is not ready, is a ``ConfigError`` naming the ready models."""
    where = f"model {name!r}" + (f" version {version}" if version else "") + f" at {endpoint.url}"
    try:
        ready = endpoint._call(endpoint.client.is_model_ready, name, version)
    except RemoteError as e:
        raise ConfigError(f"model.served: cannot ask {where}: {e}") from None
    if not ready:
        index = endpoint._call(endpoint.client.get_model_repository_index, as_json=True).get("models", [])
        names = sorted(m["name"] for m in index if m.get("state") == "READY")
        raise ConfigError(f"model.served.name: {where} is not ready (or not there); ready models: "
                          f"{', '.join(names) or 'none'}")
    meta = endpoint._call(endpoint.client.get_model_metadata, name, version)
    config = endpoint._call(endpoint.client.get_model_config, name, version).config
    declared = from_model_config(config, f"ModelMetadata and ModelConfig of {where}", version)
    mbs = declared.max_batch_size

    def tensor(t: Any) -> Tensor:
        dims = tuple(int(d) for d in t.shape)
        return Tensor(t.name, t.datatype, dims[1:] if mbs > 0 and dims else dims)

    ins, outs = tuple(tensor(t) for t in meta.inputs), tuple(tensor(t) for t in meta.outputs)
    cfg_ins = {t.name: t for t in declared.inputs}
    for t in ins:  # the metadata is what the server accepts; the config must say the same
        c = cfg_ins.get(t.name)
        if c is not None and (c.datatype, c.dims) != (t.datatype, t.dims):
            raise ModelError(f"{where}: its ModelMetadata says {t.name} {t.datatype} {list(t.dims)} but its "
                             f"ModelConfig {c.datatype} {list(c.dims)}")
    return replace(declared, inputs=ins, outputs=outs, platform=meta.platform or declared.platform)


def served_to_dict(model: ServedModel) -> dict[str, Any]:
    d = asdict(model)
    d["shape"] = list(model.shape)
    return d


def served_from_dict(d: dict[str, Any]) -> ServedModel:
    """Inverse of ``served_to_dict`` (the served.json that ``deploy triton`` writes)."""
    t = {k: Tensor(v["name"], v["datatype"], tuple(int(x) for x in v["dims"])) for k, v in
         ((k, d[k]) for k in ("input", "output"))}
    s = d["shape"]
    return ServedModel(str(d["name"]), str(d["version"]), str(d["platform"]), str(d["source"]),
                       int(d["max_batch_size"]), int(d["fixed_batch"]), t["input"], t["output"], str(d["layout"]),
                       (int(s[0]), int(s[1]), int(s[2])), int(d["num_classes"]))


# --- checking it against the pipeline -----------------------------------------------------------

def _pick(tensors: tuple[Tensor, ...], wanted: str, what: str, key: str, errors: list[str]) -> Tensor | None:
    names = [t.name for t in tensors]
    if wanted:
        found = [t for t in tensors if t.name == wanted]
        if not found:
            errors.append(f"{what} name: [model] served.{key} = {wanted!r}, the model's {what}s are {names}")
            return None
        return found[0]
    if len(tensors) != 1:
        errors.append(f"{what}: the model has {len(tensors)} {what}s {names}; name the one advshield uses with "
                      f"[model] served.{key} = \"...\"" if tensors else f"{what}: the model declares none")
        return None
    return tensors[0]


def check_served(cfg: PipelineConfig, declared: Declared) -> ServedModel:
    """Check ``declared`` against the pipeline's ``[model]`` and ``[input]`` and fill in what the
    pipeline leaves out. Every contradiction is listed in one ``ConfigError``."""
    m, served, inp = cfg.model, cfg.model.served, cfg.input
    errors: list[str] = []
    if declared.name and declared.name != served.name:
        errors.append(f"name: [model] served.name = {served.name!r}, the config names {declared.name!r}")
    x = _pick(declared.inputs, served.input, "input", "input", errors)
    y = _pick(declared.outputs, served.output, "output", "output", errors)
    mbs = declared.max_batch_size
    fixed = 0
    layout = m.layout
    shape = (inp.channels, inp.height, inp.width)
    k = 0
    if x is not None:
        if served.datatype and x.datatype != served.datatype:
            errors.append(f"input datatype: [model] served.datatype = {served.datatype!r}, the model's input "
                          f"{x.name!r} is {x.datatype}")
        elif x.datatype not in SERVED_INPUT_TYPES:
            errors.append(f"input datatype: {x.name!r} is {x.datatype}; advshield feeds {', '.join(SERVED_INPUT_TYPES)}")
        dims = x.dims
        if mbs == 0 and len(dims) == 4:  # no batching: the first dim is the batch the model takes
            fixed = dims[0] if dims[0] > 0 else 0
            dims = dims[1:]
        if len(dims) != 3:
            errors.append(f"input dims: {x.name!r} is {list(x.dims)}" + (" with max_batch_size 0" if mbs == 0 else "")
                          + "; advshield feeds images, [C, H, W] or [H, W, C] per image")
        else:
            fmt = declared.formats.get(x.name, "none")
            guess = fmt if fmt in ("nchw", "nhwc") else ("nchw" if dims[0] in (1, 3) else
                                                         "nhwc" if dims[2] in (1, 3) else "")
            if layout == "auto":
                layout = guess or "auto"
                if layout == "auto":
                    errors.append(f"layout: cannot tell whether {x.name!r} {list(dims)} is NCHW or NHWC; set "
                                  f"[model] layout = \"nchw\" or \"nhwc\"")
            elif fmt in ("nchw", "nhwc") and fmt != layout:
                errors.append(f"layout: [model] layout = {layout!r}, the model's input {x.name!r} has format "
                              f"FORMAT_{fmt.upper()}")
            if layout in ("nchw", "nhwc"):
                c, h, w = dims if layout == "nchw" else (dims[2], dims[0], dims[1])
                got = []
                for key, have, want in (("channels", c, inp.channels), ("height", h, inp.height),
                                        ("width", w, inp.width)):
                    if have > 0 and want and have != want:
                        errors.append(f"input.{key}: the pipeline says {want}, the model's input {x.name!r} "
                                      f"{list(x.dims)} ({layout.upper()}) has {have}")
                    elif have <= 0 and not want:
                        errors.append(f"input.{key}: the model's input {x.name!r} has a variable {key}; give it "
                                      f"in [input]")
                    got.append(have if have > 0 else want)
                shape = (got[0], got[1], got[2])
                if got[0] not in (1, 3) and got[0] > 0:
                    errors.append(f"input.channels: the model takes {got[0]} channels; advshield handles 1 or 3")
                for key in ("mean", "std"):
                    values = getattr(m, key)
                    if len(values) not in (0, 1, got[0]):
                        errors.append(f"model.{key}: {len(values)} values for a {got[0]}-channel model")
    if y is not None:
        if y.datatype not in SERVED_OUTPUT_TYPES:
            errors.append(f"output datatype: {y.name!r} is {y.datatype}; advshield reads "
                          f"{', '.join(SERVED_OUTPUT_TYPES)} scores")
        dims = y.dims[1:] if mbs == 0 and len(y.dims) == 2 else y.dims
        if len(dims) != 1 or dims[0] <= 0:
            errors.append(f"output dims: {y.name!r} is {list(y.dims)}; advshield needs one score per class, [K]")
        else:
            k = dims[0]
            names = cfg.model_class_names or cfg.data.class_names_at(cfg.root)
            if names and len(names) != k:
                errors.append(f"classes: the pipeline names {len(names)} classes, the model's output {y.name!r} "
                              f"has {k}")
    if cfg.graph is not None and x is not None and not errors:  # the ONNX twin must take the same pixels
        twin = cfg.graph
        if cfg.input.resolved and cfg.input.shape != shape:
            errors.append(f"twin: {twin.name} takes {list(cfg.input.shape)} pixels, the served model {list(shape)}")
        if twin.num_classes and k and twin.num_classes != k:
            errors.append(f"twin: {twin.name} outputs {twin.num_classes} classes, the served model {k}")
    if errors:
        raise ConfigError(f"model.served: {served.name!r} ({declared.source}) does not match the pipeline:\n  - "
                          + "\n  - ".join(errors))
    assert x is not None and y is not None
    return ServedModel(served.name, served.version or declared.version, declared.platform, declared.source, mbs,
                       fixed, Tensor(x.name, x.datatype, x.dims), Tensor(y.name, y.datatype, y.dims), layout,
                       shape, k)


def apply_served(cfg: PipelineConfig, model: ServedModel) -> PipelineConfig:
    """The pipeline with ``[input]`` channels/height/width and the served model filled in."""
    c, h, w = model.shape
    out = replace(cfg, input=replace(cfg.input, channels=c, height=h, width=w), served=model)
    _ = out.class_names  # a class list of the wrong length is an error now
    return out


# --- the arithmetic both serving paths share -----------------------------------------------------

def _per_channel(values: tuple[float, ...], c: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(values, np.float32), (c,)).reshape(1, c, 1, 1)


def to_model_input(x: np.ndarray, spec: Any, model: ServedModel) -> np.ndarray:
    """float32 NCHW pixels in [0, 1] -> the served model's input: ``(x * scale - mean) / std`` in
    float32 (the wrapped ONNX graph's order), NHWC when the model takes it, cast to its datatype
    (UINT8: rounded and clipped to 0..255). ``spec``: the pipeline's ``ModelSpec``."""
    c = x.shape[1]
    y = np.asarray(x, np.float32)
    if spec.scale != 1.0:
        y = y * np.float32(spec.scale)
    if spec.mean:
        y = y - _per_channel(spec.mean, c)
    if spec.std:
        y = y / _per_channel(spec.std, c)
    if model.layout == "nhwc":
        y = y.transpose(0, 2, 3, 1)
    if model.input.datatype == "UINT8":
        return np.ascontiguousarray(np.clip(np.rint(y), 0, 255).astype(np.uint8))
    return np.ascontiguousarray(y.astype(NUMPY_TYPES[model.input.datatype], copy=False))


def to_logits(y: np.ndarray, output: str) -> np.ndarray:
    """The served model's scores -> float32 logits: the log of probabilities (clipped at the
    smallest float32, as the wrapped ONNX graph does), logits and log-probabilities as they are."""
    z = np.asarray(y).astype(np.float32, copy=False).reshape(len(y), -1)
    if output == "probabilities":
        return np.log(np.maximum(z, np.float32(TINY)))
    return np.ascontiguousarray(z)


# --- the classifier over gRPC -------------------------------------------------------------------

class ServedClassifier(Endpoint):
    """A model Triton already serves, as advshield's Classifier: float32 NCHW pixels in [0, 1] ->
    logits [N, K] (torch, on the input's device). ``cfg``: a pipeline with ``[model] served``; the
    model's ModelMetadata and ModelConfig are read and checked (``check_served``) when it connects.
    ``[model] output = "auto"`` probes one batch (probabilities when every row lies in [0, 1] and
    sums to 1). No gradients: the white-box audit needs the ONNX twin ([model] path)."""

    random = False

    def __init__(self, cfg: PipelineConfig, *, token: str | None = None, validate: bool = True) -> None:
        served = cfg.model.served
        if not served.enabled:
            raise ConfigError("ServedClassifier: the pipeline has no [model] served")
        if not served.endpoint:
            raise ConfigError(f"model.served.endpoint: give the HOST:PORT of the server that serves "
                              f"{served.name!r} (its gRPC port)")
        super().__init__(served.endpoint, token=token, timeout=served.timeout_s, concurrency=served.concurrency,
                         retries=served.retries)
        try:
            self.model = check_served(cfg, read_declared(self, served.name, served.version))
        except Exception:
            self.close()
            raise
        self.config = apply_served(cfg, self.model)
        self.spec = cfg.model
        self.input_shape = self.model.shape
        self.num_classes = self.model.num_classes
        self.validate = validate
        limit = self.model.fixed_batch or self.model.max_batch_size or 1
        self.batch_size = min(served.batch_size or limit, limit)
        self.output = cfg.model.output if cfg.model.output != "auto" else self._probe_output()

    def _probe_output(self) -> str:
        raw = self.raw(parity_batch(self.input_shape, n=8).numpy())
        if looks_like_probabilities(raw):
            log.warning("served model %s: the outputs look like probabilities (every row within [0, 1] and summing "
                        "to 1): treated as probabilities (set output in [model] to say so)", self.model.name)
            return "probabilities"
        return "logits"

    def _request(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        fixed = self.model.fixed_batch
        if fixed and n < fixed:  # a fixed-batch model: pad the last request, as OnnxClassifier does
            x = np.concatenate([x, np.zeros((fixed - n, *x.shape[1:]), x.dtype)])
        data = to_model_input(x, self.spec, self.model)
        inp = self._grpc.InferInput(self.model.input.name, list(data.shape), self.model.input.datatype)
        inp.set_data_from_numpy(data)
        out = [self._grpc.InferRequestedOutput(self.model.output.name)]
        res = self.send(self.model.name, [inp], out, images=n, version=self.model.version)
        y = res.as_numpy(self.model.output.name)
        if y is None or len(y) < n:
            raise RemoteError(f"{self.url}: model {self.model.name!r} answered {None if y is None else list(y.shape)} "
                              f"for a batch of {n}", "INTERNAL")
        return y[:n]

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The model's own output for pixels ``x`` (numpy, no validation), in requests of ``batch_size``."""
        t0 = time.perf_counter()
        chunks = [x[i : i + self.batch_size] for i in range(0, len(x), self.batch_size)]
        parts = self.map(self._request, chunks)
        self._busy += time.perf_counter() - t0
        return np.concatenate(parts)

    def run(self, x: np.ndarray) -> np.ndarray:
        """numpy in, logits out (as ``OnnxClassifier.run``)."""
        if len(x) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        return to_logits(self.raw(np.ascontiguousarray(x, np.float32)), self.output)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate:
            validate_batch(x, self.input_shape)
        out = self.run(x.detach().cpu().numpy())
        return torch.from_numpy(out).to(x.device)

    def __repr__(self) -> str:
        return f"ServedClassifier({self.url}, model={self.model.name!r}, {self.model.platform})"


def resolve_served(cfg: PipelineConfig, *, token: str | None = None) -> PipelineConfig:
    """The pipeline with its served model read from its server and checked (``[input]`` filled)."""
    with ServedClassifier(cfg, token=token) as clf:
        return clf.config
