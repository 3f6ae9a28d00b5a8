"""Cut an ONNX classifier at named intermediate tensors, for defenses on feature layers.

Patch replacement on an early layer (thesis ch. 6) runs *inside* the model: the graph is split
at the layer's tensor into a head (image -> feature) and a tail (feature -> logits), and the
defense runs in between. Several cuts give several segments (image -> t1 -> t2 -> logits), which
is how two layers are stacked.

* ``candidate_tensors``: the 4-D intermediate tensors a model can be cut at, in graph order.
* ``split_model``: the segments as ONNX models (``onnx.utils.Extractor``); a tensor that does not
  separate the graph (a later node also reads something from before the cut) is an error.
* ``SplitClassifier``: segments with defense steps between them; satisfies the ``Classifier``
  protocol. Built on ONNX Runtime (``split_onnx_classifier``) or, for white-box attacks, on the
  differentiable twin of each segment (``split_twin``, onnx2torch), with a parity check.
* ``twin_of_split``: the differentiable twin of an ONNX Runtime ``SplitClassifier`` (what the audit
  attacks): each segment converted with onnx2torch and checked against its ONNX Runtime segment on
  the tensors the serving path feeds it; the same defense objects between them (BPDA on).
* ``check_split``: head then tail must equal the full model (max |logit difference|).
* ``bind_feature_extractors``: gives each feature-layer defense the model's head, so that its
  ``fit`` learns on that layer's features of the clean training images (each layer's codebook is
  learnt independently on the unmodified network, as in the thesis, section 6.4.4).
* ``attach_feature_defenses``: what ``DefendedClassifier.from_config`` uses to move the
  feature-layer steps of a pipeline into the classifier.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advshield.core.errors import ConfigError, ModelError, ParityError
from advshield.defenses.base import Defense
from advshield.plugin.classifiers import (
    OnnxClassifier,
    TwinClassifier,
    default_threads,
    onnx_to_torch,
    pad_numpy,
    pad_torch,
    parity,
    parity_batch,
    pick_device,
    run_in_chunks,
    validate_batch,
)
from advshield.plugin.model_io import WrappedModel

IMAGE_LAYER = "image"


def layer_of(defense: Defense) -> str:
    """Where a defense runs: ``config.layer`` when it has one, else on the image."""
    return getattr(defense.config, "layer", IMAGE_LAYER) or IMAGE_LAYER


def _load(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, WrappedModel):  # the model as a pipeline wraps it (pixels in [0, 1], NCHW)
        return model.proto()
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise ModelError(f"cannot read ONNX model {path}: {e}") from None


def fixed_batch(model) -> int | None:
    """The batch size a graph fixes on its (first) input, or None for a dynamic batch."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


class Chunked(torch.nn.Module):
    """A torch segment of a fixed-batch model, run in chunks of that batch (the last one padded)."""

    def __init__(self, net: torch.nn.Module, batch: int | None) -> None:
        super().__init__()
        self.net, self.batch = net, batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_in_chunks(self.net, x, self.batch, torch.cat, pad_torch)


def _inferred(model):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as e:
        raise ModelError(f"ONNX shape inference failed: {e}") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int | str, ...]  # symbolic dimensions (the batch) as strings
    op_type: str  # the node that writes it


def _dims(value_info) -> tuple[int | str, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in value_info.type.tensor_type.shape.dim)


def candidate_tensors(model: Any, *, rank: int = 4) -> list[TensorInfo]:
    """Intermediate tensors of rank ``rank`` (NCHW feature maps) in graph order: the layers a
    feature-level defense can run on."""
    m = _inferred(_load(model))
    infos = {v.name: v for v in m.graph.value_info}
    outputs = {o.name for o in m.graph.output}
    out = []
    for node in m.graph.node:
        for name in node.output:
            if name in infos and name not in outputs and len(_dims(infos[name])) == rank:
                out.append(TensorInfo(name, _dims(infos[name]), node.op_type))
    return out


def _check_closed(segment, where: str) -> None:
    """Every node input must come from the segment's inputs, initializers or earlier nodes."""
    known = {i.name for i in segment.graph.input} | {t.name for t in segment.graph.initializer} | {""}
    for node in segment.graph.node:
        missing = [i for i in node.input if i not in known]
        if missing:
            raise ModelError(
                f"{where}: node {node.name or node.op_type!r} also reads {missing}, from before the cut; "
                f"this tensor does not separate the graph (choose another layer)"
            )
        known.update(node.output)


def split_model(model: Any, cuts: Sequence[str]) -> list:
    """The model cut at the named tensors: len(cuts) + 1 ONNX models, segment i mapping cut i-1
    to cut i (the model's input first, its output last). Cuts are sorted into graph order."""
    import onnx
    from onnx.utils import Extractor

    full = _inferred(_load(model))
    g = full.graph
    if len(g.input) - len({t.name for t in g.initializer} & {i.name for i in g.input}) != 1 or len(g.output) != 1:
        raise ModelError("only models with one input and one output can be split")
    producer = {name: i for i, node in enumerate(g.node) for name in node.output}
    names = {v.name for v in g.value_info}
    for c in cuts:
        if c not in producer or c in (g.input[0].name, g.output[0].name):
            known = ", ".join(t.name for t in candidate_tensors(full)) or "none"
            raise ConfigError(f"layer: {c!r} is not an intermediate tensor of the model; 4-D candidates: {known}")
        if c not in names:
            raise ModelError(f"layer {c!r}: ONNX shape inference gives no type for this tensor; cannot cut there")
    order = sorted(dict.fromkeys(cuts), key=lambda c: producer[c])
    bounds = [g.input[0].name, *order, g.output[0].name]
    extractor = Extractor(full)
    segments = []
    for i, (src, dst) in enumerate(itertools.pairwise(bounds)):
        seg = extractor.extract_model([src], [dst])
        _check_closed(seg, f"segment {i} ({src} -> {dst})")
        try:
            onnx.checker.check_model(seg)
        except Exception as e:
            raise ModelError(f"segment {i} ({src} -> {dst}) is not a valid model: {e}") from None
        segments.append(seg)
    return segments


def split_at(model: Any, tensor: str) -> tuple[Any, Any]:
    """Head (input -> tensor) and tail (tensor -> output)."""
    head, tail = split_model(model, [tensor])
    return head, tail


# --- running segments ------------------------------------------------------------------------------

class OnnxSegment:
    """One segment on ONNX Runtime: torch tensor in, torch tensor out (on the input's device)."""

    def __init__(self, proto, *, device: str = "auto", threads: int = 0) -> None:
        import onnxruntime as ort

        self.batch = fixed_batch(proto)  # a fixed-batch model's segments keep its batch: run in chunks

        available = ort.get_available_providers()
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or default_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers = (["CUDAExecutionProvider"] if use_cuda else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=providers)
        except Exception as e:
            raise ModelError(f"ONNX Runtime cannot load a model segment: {e}") from None
        self.proto = proto  # kept for its differentiable twin (``twin_of_split``)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __repr__(self) -> str:
        return f"OnnxSegment({self.input_name} -> {self.output_name})"

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        return run_in_chunks(self._run, x, self.batch, np.concatenate, pad_numpy)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().cpu().numpy())).to(x.device)


class SplitClassifier(torch.nn.Module):
    """segment 0 -> steps 0 -> segment 1 -> ... -> last segment: pixels [N, C, H, W] -> logits.

    ``steps[i]`` are the defenses run on the tensor between segment i and i+1. A
    non-differentiable step under autograd raises unless ``bpda`` is on (argument, or the
    attribute for callers that only call ``clf(x)``): then its backward pass is its BPDA
    approximation (identity for patch replacement).
    """

    def __init__(self, segments: Sequence[Callable[[torch.Tensor], torch.Tensor]], steps: Sequence[Sequence[Defense]],
                 *, input_shape: tuple[int, int, int], num_classes: int, cuts: Sequence[str] = (),
                 validate: bool = True, bpda: bool = False, device: torch.device | None = None) -> None:
        super().__init__()
        if len(steps) != len(segments) - 1:
            raise ValueError(f"{len(segments)} segments need {len(segments) - 1} groups of steps, got {len(steps)}")
        self.segments = list(segments)
        for i, s in enumerate(self.segments):
            if isinstance(s, torch.nn.Module):
                self.add_module(f"segment{i}", s)
        self.steps = [list(s) for s in steps]
        self.cuts = tuple(cuts)
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.validate = validate
        self.bpda = bpda
        self.device = device  # torch segments: inputs are moved there
        self.parity: list[float] | None = None  # a twin's max |difference| per segment (``check_segments``)

    @property
    def random(self) -> bool:
        return any(d.random for group in self.steps for d in group)

    @property
    def differentiable(self) -> bool:
        """Every segment is a torch module (the twin), not an ONNX Runtime session."""
        return all(isinstance(s, torch.nn.Module) for s in self.segments)

    def layer_steps(self) -> dict[str, list[Defense]]:
        """cut -> the defenses run on it, in graph order."""
        return {c: list(g) for c, g in zip(self.cuts, self.steps)}

    def without_steps(self) -> SplitClassifier:
        """The same segments with nothing between them: the bare model (what the non-adaptive
        audit attacks)."""
        return SplitClassifier(self.segments, [[] for _ in self.cuts], input_shape=self.input_shape,
                               num_classes=self.num_classes, cuts=self.cuts, validate=self.validate,
                               bpda=self.bpda, device=self.device)

    def features(self, x: torch.Tensor, upto: int = 1) -> torch.Tensor:
        """The tensor at cut ``upto - 1`` (segments before it and their steps applied)."""
        h = self.segments[0](x if self.device is None else x.to(self.device))
        for i in range(1, upto):
            for d in self.steps[i - 1]:
                h = d(h, None, bpda=self.bpda)
            h = self.segments[i](h)
        return h

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                bpda: bool | None = None) -> torch.Tensor:
        if self.validate:
            validate_batch(x, self.input_shape)
        bpda = self.bpda if bpda is None else bpda
        h = self.segments[0](x if self.device is None else x.to(self.device))
        for group, segment in zip(self.steps, self.segments[1:]):
            for d in group:
                h = d(h, generator, bpda=bpda)
            h = segment(h)
        return h

    def __repr__(self) -> str:
        steps = ", ".join(f"{c}: [{', '.join(d.name for d in g)}]" for c, g in zip(self.cuts, self.steps))
        return f"SplitClassifier({len(self.segments)} segments; {steps})"


def _group(layer_steps: Mapping[str, Sequence[Defense]] | Sequence[str],
           model) -> tuple[list[str], list[list[Defense]], list]:
    """(cuts in graph order, the defenses at each cut, the segments)."""
    if isinstance(layer_steps, Mapping):
        items = {k: list(v) for k, v in layer_steps.items()}
    else:
        items = {k: [] for k in layer_steps}
    segments = split_model(model, list(items))
    producer = {name: i for i, node in enumerate(model.graph.node) for name in node.output}
    cuts = sorted(items, key=lambda c: producer[c])
    return cuts, [items[c] for c in cuts], segments


def split_onnx_classifier(model_path: str | Path | WrappedModel, layer_steps: Mapping[str, Sequence[Defense]] | Sequence[str], *,
                          device: str = "auto", threads: int = 0, validate: bool = True) -> SplitClassifier:
    """The ONNX model cut at the layers named in ``layer_steps`` (layer -> defenses), on ONNX Runtime."""
    model = _load(model_path)
    cuts, steps, segments = _group(layer_steps, model)
    ref = OnnxClassifier(model_path, device=device, threads=threads, validate=False)
    runs = [OnnxSegment(s, device=device, threads=threads) for s in segments]
    return SplitClassifier(runs, steps, input_shape=ref.input_shape, num_classes=ref.num_classes, cuts=cuts,
                           validate=validate)


def split_twin(model_path: str | Path | WrappedModel, layer_steps: Mapping[str, Sequence[Defense]] | Sequence[str], *,
               device: str = "auto", tolerance: float = 1e-3, check_with: torch.Tensor | None = None,
               validate: bool = True) -> SplitClassifier:
    """The differentiable twin, cut the same way: each segment converted with onnx2torch. Without
    steps in between, the composition must match ONNX Runtime on the full model (``ParityError``)."""
    model = _load(model_path)
    cuts, steps, segments = _group(layer_steps, model)
    dev = pick_device(device)
    modules = [Chunked(onnx_to_torch(s), fixed_batch(s)).to(dev) for s in segments]
    ref = OnnxClassifier(model_path, device="cpu", validate=False)
    plain = SplitClassifier(modules, [[] for _ in cuts], input_shape=ref.input_shape, num_classes=ref.num_classes,
                            cuts=cuts, validate=False, device=dev)
    check_split(ref, plain, tolerance, check_with)
    return SplitClassifier(modules, steps, input_shape=ref.input_shape, num_classes=ref.num_classes, cuts=cuts,
                           validate=validate, device=dev)


def twin_of_split(split: SplitClassifier, *, device: str = "auto", tolerance: float = 1e-3,
                  check_with: torch.Tensor | None = None, validate: bool = False, bpda: bool = True) -> SplitClassifier:
    """The differentiable twin of an ONNX Runtime split classifier: each segment (head, tail, ...)
    converted with onnx2torch, the *same* defense objects between them (codebooks as loaded).

    Each twin segment is pinned to its ONNX Runtime segment (``check_segments``) on the tensors
    the serving path feeds it: the parity probe batch plus ``check_with`` (real images) through the
    ONNX Runtime segments and the steps. ``bpda`` (default on, what the audit attacks): the
    non-differentiable steps run forward as themselves, backward through their approximation;
    off, such a step under autograd raises ``NonDifferentiableError``."""
    if split.differentiable:
        return split
    onnx_segments = [s for s in split.segments if isinstance(s, OnnxSegment)]
    if len(onnx_segments) != len(split.segments):
        kinds = sorted({type(s).__name__ for s in split.segments})
        raise ModelError(f"cannot build a differentiable twin of a split model with segments {kinds}: "
                         f"expected ONNX Runtime segments (split_onnx_classifier) or torch modules")
    dev = pick_device(device)
    modules = [Chunked(onnx_to_torch(s.proto), s.batch).to(dev) for s in onnx_segments]
    twin = SplitClassifier(modules, split.steps, input_shape=split.input_shape, num_classes=split.num_classes,
                           cuts=split.cuts, validate=validate, bpda=bpda, device=dev)
    twin.parity = check_segments(split, twin, tolerance, check_with)
    return twin


@torch.no_grad()
def check_segments(reference: SplitClassifier, twin: SplitClassifier, tolerance: float = 1e-3,
                   x: torch.Tensor | None = None) -> list[float]:
    """Segment by segment, the twin's must equal the reference's (max |difference| of its output)
    on the inputs the reference's serving path gives it: the probe batch plus ``x``, through the
    reference's segments and steps (random steps drawn from a fixed seed). Comparing segment by
    segment keeps a discontinuous step (nearest codeword) from turning a float-level difference
    upstream into a different replacement. Returns the max difference per segment; ``ParityError``
    names the first segment above ``tolerance``."""
    if len(reference.segments) != len(twin.segments):
        raise ValueError(f"{len(reference.segments)} reference segments, {len(twin.segments)} twin segments")
    h = parity_batch(reference.input_shape)
    if x is not None:
        h = torch.cat([h, x.detach().float().cpu()])
    first, last = reference.segments[0], reference.segments[-1]
    bounds = [getattr(first, "input_name", "input"), *reference.cuts, getattr(last, "output_name", "output")]
    g = torch.Generator().manual_seed(0)
    diffs = []
    for i, (ref, mine) in enumerate(zip(reference.segments, twin.segments)):
        want = ref(h).float().cpu()
        got = mine(h.to(twin.device) if twin.device is not None else h).float().cpu()
        if got.shape != want.shape:
            raise ParityError(f"segment {i} ({bounds[i]} -> {bounds[i + 1]}): twin gives shape {list(got.shape)}, "
                              f"ONNX Runtime {list(want.shape)}")
        diffs.append(float((got - want).abs().max()))
        if diffs[-1] > tolerance:
            raise ParityError(
                f"segment {i} ({bounds[i]} -> {bounds[i + 1]}): the twin disagrees with ONNX Runtime by "
                f"max |difference| {diffs[-1]:.3g} > tolerance {tolerance:.3g} on {len(h)} inputs"
            )
        h = want
        if i < len(reference.steps):
            for d in reference.steps[i]:
                h = d(h, g)
    return diffs


def check_split(full: Callable[[torch.Tensor], torch.Tensor], split: SplitClassifier, tolerance: float = 1e-4,
                x: torch.Tensor | None = None) -> float:
    """Head then tail must equal the full model: max |logit difference| on a probe batch plus
    ``x`` (real images); ``ParityError`` above ``tolerance``."""
    probe = parity_batch(split.input_shape)
    if x is not None:
        probe = torch.cat([probe, x.detach().float().cpu()])
    report = parity(full, split, probe, tolerance)  # type: ignore[arg-type]
    if not report.ok:
        raise ParityError(
            f"model cut at {list(split.cuts)}: segments composed differ from the full model by "
            f"{report.max_abs_diff:.3g} > {tolerance:.3g}"
        )
    return report.max_abs_diff


# --- pipeline glue -----------------------------------------------------------------------------------

def feature_extractor(model_path: str | Path | WrappedModel, layer: str, *, device: str = "auto", threads: int = 0,
                      batch: int = 1024) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pixels -> the features at ``layer`` (the model's head on ONNX Runtime), ``batch`` images a call."""
    head = OnnxSegment(split_model(model_path, [layer])[0], device=device, threads=threads)

    def features(x: torch.Tensor) -> torch.Tensor:
        x_np = x.detach().cpu().float().numpy()
        out = np.concatenate([head.run(x_np[i : i + batch]) for i in range(0, len(x_np), batch)])
        return torch.from_numpy(out)

    return features


def bind_feature_extractors(cfg, defenses: Sequence[Defense]) -> int:
    """Before ``fit``: give every feature-layer defense (with ``bind_features``) the model's head at
    its layer. ``cfg`` is a PipelineConfig (or a model path). Returns how many were bound."""
    model_path = cfg.wrapped_model() if hasattr(cfg, "wrapped_model") else cfg
    device = getattr(getattr(cfg, "model", None), "device", "auto")
    threads = getattr(getattr(cfg, "model", None), "threads", 0)
    n = 0
    for d in defenses:
        layer = layer_of(d)
        if layer != IMAGE_LAYER and hasattr(d, "bind_features"):
            d.bind_features(feature_extractor(model_path, layer, device=device, threads=threads))
            n += 1
    return n


def attach_feature_defenses(cfg, classifier, defenses: Sequence[Defense]) -> tuple[Any, list[Defense]]:
    """Split the pipeline's steps: image-layer defenses stay in front of the classifier; the others
    move into a ``SplitClassifier`` cut at their layers (pipeline order kept within a layer).

    ``classifier`` is the ``OnnxClassifier`` or ``TwinClassifier`` of ``cfg``'s model."""
    image = [d for d in defenses if layer_of(d) == IMAGE_LAYER]
    layer_steps: dict[str, list[Defense]] = {}
    for d in defenses:
        if layer_of(d) != IMAGE_LAYER:
            layer_steps.setdefault(layer_of(d), []).append(d)
    if not layer_steps:
        return classifier, list(defenses)
    threads = getattr(getattr(cfg, "model", None), "threads", 0)
    tolerance = getattr(getattr(cfg, "model", None), "parity_tolerance", 1e-3)
    if isinstance(classifier, TwinClassifier):
        split = split_twin(classifier.model, layer_steps, device=classifier.device.type, tolerance=tolerance)
    elif isinstance(classifier, OnnxClassifier):
        device = "cuda" if "CUDAExecutionProvider" in classifier.providers else "cpu"
        split = split_onnx_classifier(classifier.model, layer_steps, device=device, threads=threads,
                                      validate=classifier.validate)
    else:
        raise ConfigError(
            f"defenses on layers {sorted(layer_steps)} need the model split at those tensors; this works with the "
            f"ONNX Runtime classifier or the twin, not with {type(classifier).__name__}"
        )
    return split, image
