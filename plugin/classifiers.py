"""Classifiers behind one protocol: a float32 NCHW batch in [0, 1] -> logits [N, K].

* ``OnnxClassifier``: ONNX Runtime, CUDA provider when present, explicit thread settings.
* ``TwinClassifier``: the same ONNX file converted to torch (onnx2torch), differentiable, pinned to
  the ONNX file by a parity check (max |logit difference|) that fails loudly.

Both take and return torch tensors (the twin keeps the autograd graph; ONNX Runtime does not).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from advshield.core.errors import InputError, ModelError, ParityError

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


def default_threads() -> int:
    env = os.environ.get("ADVSHIELD_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(4, os.cpu_count() or 1))


def _onnx_input_shape(inp) -> tuple[int, int, int]:
    dims = inp.shape
    if len(dims) != 4:
        raise ModelError(f"model input {inp.name!r} must be 4-D NCHW, has shape {dims}")
    chw = dims[1:]
    if not all(isinstance(d, int) for d in chw):
        raise ModelError(f"model input {inp.name!r} must have fixed C, H, W, has {dims}")
    return (int(chw[0]), int(chw[1]), int(chw[2]))


class OnnxClassifier:
    """ONNX Runtime inference. ``device``: 'auto' (CUDA when its provider is present), 'cpu', 'cuda'."""

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int = 0, validate: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"ONNX model not found: {self.path}")
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
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load {self.path}: {e}") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected one input, model has {[i.name for i in inputs]}")
        if inputs[0].type != "tensor(float)":
            raise ModelError(f"{self.path}: input {inputs[0].name!r} must be float32, is {inputs[0].type}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_shape = _onnx_input_shape(inputs[0])
        k = outputs[0].shape[-1] if outputs[0].shape else None
        self.num_classes = int(k) if isinstance(k, int) else int(self.run(np.zeros((1, *self.input_shape), np.float32)).shape[1])
        self.providers = self.session.get_providers()
        self.validate = validate

    def run(self, x: np.ndarray) -> np.ndarray:
        """numpy in, numpy out (no validation)."""
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate:
            validate_batch(x, self.input_shape)
        out = self.run(x.detach().cpu().numpy())
        return torch.from_numpy(out).to(x.device)

    def __repr__(self) -> str:
        return f"OnnxClassifier({self.path.name}, providers={self.providers})"


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
    """The ONNX file as a differentiable torch module, checked against ONNX Runtime on load.

    ``check_with``: an extra batch (e.g. real images) for the parity check besides the probe batch.
    Raises ``ParityError`` when the max |logit difference| exceeds ``tolerance``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        tolerance: float = 1e-3,
        reference: OnnxClassifier | None = None,
        check_with: torch.Tensor | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        reference = reference or OnnxClassifier(self.path, device="cpu")
        self.input_shape = reference.input_shape
        self.num_classes = reference.num_classes
        self.net = onnx_to_torch(self.path)
        self.device = pick_device(device)
        self.net.to(self.device)
        self.validate = validate
        probe = parity_batch(self.input_shape)
        if check_with is not None:
            probe = torch.cat([probe, check_with.detach().float().cpu()])
        self.parity = parity(reference, self, probe.to(self.device), tolerance)
        if not self.parity.ok:
            raise ParityError(
                f"twin of {self.path.name} disagrees with ONNX Runtime: max |logit difference| "
                f"{self.parity.max_abs_diff:.3g} > tolerance {tolerance:.3g} on {self.parity.samples} inputs"
            )
        log.info("twin %s: parity max |dlogit| = %.3g", self.path.name, self.parity.max_abs_diff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.validate:
            validate_batch(x, self.input_shape)
        return self.net(x.to(self.device))
