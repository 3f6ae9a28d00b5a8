"""Classifiers behind one protocol: a float32 NCHW batch in [0, 1] -> logits [N, K].

Both run the model as ``plugin/model_io.py`` wraps it (normalization, NHWC layout and output kind
inside the graph), in chunks of its batch when the model has a fixed one.

* ``OnnxClassifier``: ONNX Runtime, CUDA provider when present, explicit thread settings.
* ``TwinClassifier``: the same wrapped graph converted to torch (onnx2torch), differentiable, pinned
  to it by a parity check (max |logit difference|) that fails loudly.
* ``classifier_from_config`` / ``twin_from_config``: both for a pipeline's model.
* ``default_threads``: the CPUs the process really has (affinity, cgroup quota).

Both take and return torch tensors (the twin keeps the autograd graph; ONNX Runtime does not).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from advshield.core.errors import ConfigError, InputError, ModelError, ParityError
from advshield.plugin.model_io import load_model

if TYPE_CHECKING:
    from advshield.plugin.config import ModelSpec

log = logging.getLogger(__name__)


@runtime_checkable
class Classifier(Protocol):
    """A batch [N, C, H, W] float32 in [0, 1] -> logits [N, K]."""

    input_shape: tuple[int, int, int]
    num_classes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def validate_batch(x: torch.Tensor | np.ndarray, input_shape: tuple[int, ...], what: str = "input") -> None:
    """Check the pixel contract: float32, [N, C, H, W] with C, H, W = input_shape, finite, in [0, 1]."""
    dtype = x.dtype
    if dtype not in (torch.float32, np.float32):
        raise InputError(f"{what}: expected float32 pixels in [0, 1], got dtype {dtype}")
    shape = tuple(x.shape)
    if len(shape) != 4 or shape[1:] != tuple(input_shape):
        c, h, w = input_shape
        raise InputError(f"{what}: expected shape [N, {c}, {h}, {w}] (NCHW), got {list(shape)}")
    if shape[0] == 0:
        raise InputError(f"{what}: empty batch")
    t = torch.as_tensor(x).detach()
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what}: contains NaN or infinite values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(f"{what}: pixels must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def _cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup and its ancestors, or None without one:
    cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), cgroup v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (quota -1 = none). The smallest quota found on the way to the root counts."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v2, v1 = "/", "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2] or "/"
        elif "cpu" in parts[1].split(","):
            v1 = parts[2] or "/"

    def chain(base: Path, rel: str) -> list[Path]:
        rel_parts = [x for x in rel.split("/") if x]
        return [base.joinpath(*rel_parts[:i]) for i in range(len(rel_parts), -1, -1)]

    quotas = []
    for d in chain(root, v2):
        try:
            text = (d / "cpu.max").read_text().split()
        except OSError:
            continue
        if len(text) >= 2 and text[0] != "max" and float(text[1]) > 0:
            quotas.append(float(text[0]) / float(text[1]))
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for d in chain(root / name, v1):
            try:
                quota = float((d / "cpu.cfs_quota_us").read_text())
                period = float((d / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                quotas.append(quota / period)
    return min(quotas) if quotas else None


def default_threads(*, cgroup_root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """Threads for torch and ONNX Runtime: the CPUs this process may really use, the smaller of its
    CPU affinity (``os.sched_getaffinity``) and its cgroup CPU quota (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, rounded down), at least 1. ``ADVSHIELD_THREADS``
    overrides. Oversubscribing a busy or quota-limited CPU slows torch 5-9x (ENVIRONMENT.md)."""
    env = os.environ.get("ADVSHIELD_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"ADVSHIELD_THREADS: expected a positive integer, got {env!r}")
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root), Path(proc_cgroup))
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def set_torch_threads(threads: int = 0) -> int:
    """torch's intra-op threads: ``threads`` when > 0, else at most ``default_threads()`` (torch's
    own default counts every core and ignores the cgroup quota). Returns the count now in use."""
    n = threads if threads > 0 else min(torch.get_num_threads(), default_threads())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def run_in_chunks(run, x, batch: int | None, cat, pad):
    """``run`` on ``x`` in chunks of a fixed ``batch`` (the last one padded), or whole."""
    if batch is None or len(x) == batch:
        return run(x)
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        outs.append(run(pad(chunk, batch - n) if n < batch else chunk)[:n])
    return cat(outs)


def pad_numpy(chunk: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate([chunk, np.zeros((k, *chunk.shape[1:]), chunk.dtype)])


def pad_torch(chunk: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([chunk, chunk.new_zeros((k, *chunk.shape[1:]))])


ModelSource = str | Path | bytes | Any  # a file, its bytes, an onnx.ModelProto or a WrappedModel


class OnnxClassifier:
    """ONNX Runtime inference of the wrapped model (``plugin/model_io.py``): float32 NCHW pixels in
    [0, 1] -> logits. ``model``: an ONNX file, its bytes, an ``onnx.ModelProto`` or a
    ``WrappedModel``; ``spec``: the ``ModelSpec`` saying how the model was exported (normalization,
    layout, output kind; None: none, detected). A fixed-batch model runs in chunks of its batch.
    ``device``: 'auto' (CUDA when its provider is present), 'cpu', 'cuda'."""

    def __init__(self, model: ModelSource, *, spec: ModelSpec | None = None,
                 input_shape: tuple[int, int, int] | None = None, device: str = "auto", threads: int = 0,
                 validate: bool = True) -> None:
        import onnxruntime as ort

        self.model = load_model(model, spec, input_shape=input_shape)
        self.path = self.model.path
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise ModelError(f"device 'cuda' asked for, but ONNX Runtime offers only {available} (install onnxruntime-gpu)")
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        source = str(self.model.path) if self.model.external_data else self.model.data
        try:
            self.session = ort.InferenceSession(source, sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {self.model.name}: {e}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if inputs[0].type != "tensor(float)":
            raise ModelError(f"{self.model.name}: input {inputs[0].name!r} must be float32, is {inputs[0].type}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_shape = self.model.input_shape
        self.num_classes = self.model.num_classes
        self.batch = self.model.batch
        self.providers = self.session.get_providers()
        self.validate = validate

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        """numpy in, numpy out (no validation); a fixed-batch model runs in chunks of its batch."""
        x = np.ascontiguousarray(x, np.float32)
        if len(x) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        return run_in_chunks(self._run, x, self.batch, np.concatenate, pad_numpy)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate:
            validate_batch(x, self.input_shape)
        out = self.run(x.detach().cpu().numpy())
        return torch.from_numpy(out).to(x.device)

    def __repr__(self) -> str:
        return f"OnnxClassifier({self.model.name}, providers={self.providers})"


def classifier_from_config(cfg, *, device: str | None = None, threads: int | None = None,
                           validate: bool = True) -> OnnxClassifier:
    """The ONNX Runtime classifier of a ``PipelineConfig``'s model, wrapped as its [model] says."""
    return OnnxClassifier(cfg.wrapped_model(), device=cfg.model.device if device is None else device,
                          threads=cfg.model.threads if threads is None else threads, validate=validate)


def twin_from_config(cfg, *, device: str | None = None, reference: OnnxClassifier | None = None,
                     check_with: torch.Tensor | None = None, validate: bool = True) -> TwinClassifier:
    """The differentiable twin of a ``PipelineConfig``'s (wrapped) model, parity-checked."""
    return TwinClassifier(cfg.wrapped_model(), device=cfg.model.device if device is None else device,
                          tolerance=cfg.model.parity_tolerance, reference=reference, check_with=check_with,
                          validate=validate)


# --- the differentiable twin -------------------------------------------------------------------

ONNX2TORCH_MAX_OPSET = 18  # onnx2torch 1.5 has converters up to this opset


@contextlib.contextmanager
def _torchvision_stub():
    """STUB for what cannot run here: onnx2torch imports torchvision at import time (for its NMS
    and RoIAlign converters, ops no image classifier uses). The PyPI torchvision wheel links CUDA
    libraries and fails to import next to a CPU build of torch. When the real torchvision cannot be
    imported, a placeholder whose ops raise NotImplementedError stands in during the import."""
    try:
        import torchvision  # noqa: F401

        yield
        return
    except Exception:
        pass
    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

    def unavailable(*args, **kwargs):
        raise NotImplementedError("torchvision is not importable with this torch build (NMS/RoIAlign unsupported)")

    ops.nms = ops.roi_align = ops.box_convert = unavailable  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _onnx2torch():
    if "onnx2torch" not in sys.modules:
        with _torchvision_stub():
            import onnx2torch  # noqa: F401
    return sys.modules["onnx2torch"]


def normalize_for_conversion(model):
    """Rewrite an ONNX graph into the form onnx2torch converts, without changing its function:
    opset lowered to ``ONNX2TORCH_MAX_OPSET`` (onnx's version converter) and ``Reshape`` with
    ``allowzero=1`` (what torch's dynamo exporter writes) set to 0 where the target shape is a
    constant with no zero (then both settings mean the same)."""
    import onnx
    from onnx import numpy_helper, version_converter

    model = onnx.ModelProto.FromString(model.SerializeToString())
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        for a in node.attribute:
            if a.name == "allowzero" and a.i == 1:
                shape = consts.get(node.input[1])
                if shape is None or (shape == 0).any():
                    raise ModelError(f"Reshape node {node.name!r} uses allowzero=1 with a non-constant or zero shape; not convertible")
                a.i = 0
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > ONNX2TORCH_MAX_OPSET:
        try:
            model = version_converter.convert_version(model, ONNX2TORCH_MAX_OPSET)
        except Exception as e:
            raise ModelError(f"cannot lower the model from opset {opset} to {ONNX2TORCH_MAX_OPSET} for conversion: {e}") from None
    return model


def onnx_to_torch(path_or_model) -> torch.nn.Module:
    """Convert an ONNX file (or ModelProto) to a torch module with onnx2torch."""
    import onnx

    model = onnx.load(str(path_or_model)) if isinstance(path_or_model, str | Path) else path_or_model
    model = normalize_for_conversion(model)
    try:
        module = _onnx2torch().convert(model)
    except Exception as e:
        raise ModelError(f"onnx2torch cannot convert the model: {e}") from None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    tolerance: float
    samples: int
    argmax_agreement: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def parity(reference: Classifier, candidate: Classifier, x: torch.Tensor, tolerance: float) -> ParityReport:
    """Max |logit difference| between two classifiers on batch ``x``."""
    with torch.no_grad():
        a = reference(x).float().cpu()
        b = candidate(x).float().cpu()
    return ParityReport(
        max_abs_diff=float((a - b).abs().max()),
        tolerance=tolerance,
        samples=len(x),
        argmax_agreement=float((a.argmax(1) == b.argmax(1)).float().mean()),
    )


def parity_batch(input_shape: tuple[int, int, int], n: int = 32, seed: int = 0) -> torch.Tensor:
    """A fixed probe batch: uniform noise, constant images and a smooth ramp, all in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *input_shape), generator=g)
    x[0] = 0.0
    x[1] = 1.0
    ramp = torch.linspace(0, 1, input_shape[1] * input_shape[2]).reshape(1, input_shape[1], input_shape[2])
    x[2] = ramp.expand(input_shape[0], -1, -1)
    return x


def pick_device(device: str = "auto") -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' asked for, but torch sees no CUDA device")
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class TwinClassifier(torch.nn.Module):
    """The wrapped model as a differentiable torch module (onnx2torch), checked against ONNX Runtime
    on the same wrapped graph when built.

    ``model``: as for ``OnnxClassifier`` (with ``spec``); None, or the reference's own file: the
    reference's wrapped model. ``check_with``: an extra batch (e.g. real images) for the parity
    check besides the probe batch. Raises ``ParityError`` when the max |logit difference| exceeds
    ``tolerance``. A fixed-batch model runs in chunks of its batch (the converted module may have
    the batch written into its Reshapes).
    """

    def __init__(
        self,
        model: ModelSource | None = None,
        *,
        spec: ModelSpec | None = None,
        input_shape: tuple[int, int, int] | None = None,
        device: str = "auto",
        tolerance: float = 1e-3,
        reference: OnnxClassifier | None = None,
        check_with: torch.Tensor | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if reference is not None and (model is None or (spec is None and isinstance(model, str | Path)
                                                         and reference.path is not None
                                                         and Path(model).resolve() == reference.path.resolve())):
            self.model = reference.model
        elif model is None:
            raise ModelError("TwinClassifier: give the model (or a reference classifier)")
        else:
            self.model = load_model(model, spec, input_shape=input_shape)
        self.path = self.model.path
        reference = reference or OnnxClassifier(self.model, device="cpu")
        self.input_shape = self.model.input_shape
        self.num_classes = self.model.num_classes
        self.batch = self.model.batch
        self.net = onnx_to_torch(self.model.proto())
        self.device = pick_device(device)
        self.net.to(self.device)
        self.validate = validate
        set_torch_threads()  # at most the CPUs this process has
        probe = parity_batch(self.input_shape)
        if check_with is not None:
            probe = torch.cat([probe, check_with.detach().float().cpu()])
        self.parity = parity(reference, self, probe.to(self.device), tolerance)
        if not self.parity.ok:
            raise ParityError(
                f"twin of {self.model.name} disagrees with ONNX Runtime: max |logit difference| "
                f"{self.parity.max_abs_diff:.3g} > tolerance {tolerance:.3g} on {self.parity.samples} inputs"
            )
        log.info("twin %s: parity max |dlogit| = %.3g", self.model.name, self.parity.max_abs_diff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate:
            validate_batch(x, self.input_shape)
        return run_in_chunks(self.net, x.to(self.device), self.batch, torch.cat, pad_torch)
