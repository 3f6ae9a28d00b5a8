"""The model as users export it, wrapped into advshield's contract: float32 NCHW pixels in [0, 1] in,
logits out.

* ``read_graph``: what the ONNX graph declares (input name, dtype and dims, fixed or dynamic batch,
  layout, output dims, the node that computes the output), reading only the graph
  (``load_external_data=False``): what ``load_pipeline`` uses to fill in ``[input]``.
* ``resolve_shape``: the pixels' (C, H, W) from the graph and the ``[input]`` values given; a given
  value that disagrees with the graph is a ``ConfigError`` naming both sides.
* ``wrap_model`` / ``load_model``: one ``onnx.ModelProto`` (in memory; nothing is written next to the
  user's model) whose input is float32 NCHW pixels in [0, 1]::

      pixels -> Mul(scale) -> Sub(mean) -> Div(std) -> Transpose to NHWC -> the user's graph
             -> Log(Max(p, tiny)) when the graph outputs probabilities

  each step only when it is needed (``scale`` != 1, ``mean``/``std`` given, ``layout = "nhwc"``,
  ``output = "probabilities"``); softmax of the log-probabilities gives the probabilities back, so
  everything downstream keeps treating the output as logits. The wrapped graph is pinned by the
  sha256 of its serialized bytes; a model that needs no wrapping is used as it is (the sha256 of
  the file). The batch dimension is kept: a fixed-batch model (batch 1 or 8 exports) is run in
  chunks of its batch by the classifiers.

The output kind ``auto``: a final ``Softmax`` means probabilities, ``LogSoftmax`` log-probabilities;
otherwise one probe batch decides (every row within [0, 1] and summing to 1: probabilities, with a
warning). A declared ``logits`` whose outputs look like probabilities logs a warning that softmax
would be applied twice.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from advshield.core.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from advshield.plugin.config import ModelSpec

log = logging.getLogger(__name__)

Layout = Literal["nchw", "nhwc"]
OutputKind = Literal["logits", "probabilities", "log_probabilities"]
Dim = int | str  # str: a symbolic (dynamic) dimension

# ops that pass their input through unchanged in value (looked through to find the output's op)
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_MIN_OPSET = 8  # Max with broadcasting; Mul/Sub/Div/Transpose/Log are older
TINY = float(np.finfo(np.float32).tiny)  # Log(Max(p, TINY)): a probability of 0 stays finite


@dataclass(frozen=True)
class GraphInfo:
    """What the ONNX graph declares about its one input and its (first) output."""

    name: str  # the model file's name, for messages
    input_name: str
    input_type: str  # ONNX element type name: "float", "uint8", ...
    input_dims: tuple[Dim, ...]  # as declared; str = symbolic
    layout: Layout
    output_name: str
    output_dims: tuple[Dim, ...]
    final_op: str  # the op computing the output (looking through Identity/Reshape/Flatten/...)
    opset: int

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None for a dynamic batch dimension."""
        d = self.input_dims[0]
        return d if isinstance(d, int) and d > 0 else None

    @property
    def chw(self) -> tuple[int | None, int | None, int | None]:
        """(C, H, W) of the input as the graph fixes them (None: dynamic)."""
        d = [x if isinstance(x, int) and x > 0 else None for x in self.input_dims[1:]]
        return (d[0], d[1], d[2]) if self.layout == "nchw" else (d[2], d[0], d[1])

    @property
    def num_classes(self) -> int | None:
        """K of a [batch, K] output (None: not fixed in the graph, or not a classifier's output)."""
        k = self.output_dims[-1] if len(self.output_dims) == 2 else None
        return k if isinstance(k, int) and k > 0 else None

    def describe_input(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" if i == 0 else "?"
                         for i, d in enumerate(self.input_dims))
        return f"[{dims}] ({self.layout.upper()})"


def _dims(value_info) -> tuple[Dim, ...]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def _final_op(graph) -> str:
    producer = {out: node for node in graph.node for out in node.output}
    name = graph.output[0].name
    for _ in range(len(graph.node) + 1):
        node = producer.get(name)
        if node is None:
            return ""
        if node.op_type not in _PASS_THROUGH:
            return node.op_type
        name = node.input[0]
    return ""


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _layout(dims: tuple[Dim, ...], layout: str, name: str) -> Layout:
    if layout in ("nchw", "nhwc"):
        return layout  # type: ignore[return-value]
    if dims[1] in (1, 3):
        return "nchw"
    if dims[3] in (1, 3):
        return "nhwc"
    shown = [d if isinstance(d, int) else "?" for d in dims]
    raise ConfigError(f"model.layout: cannot tell whether the input {shown} of {name} is NCHW or NHWC (neither "
                      f"dimension 1 nor the last is 1 or 3 channels); set layout = \"nchw\" or \"nhwc\" in [model]")


def graph_info(model, name: str = "model", layout: str = "auto") -> GraphInfo:
    """``GraphInfo`` of a loaded ``ModelProto``."""
    g = model.graph
    init = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in init]
    if len(inputs) != 1:
        raise ModelError(f"{name}: an image classifier takes one input, this model has {[i.name for i in inputs]}")
    if not g.output:
        raise ModelError(f"{name}: the model has no output")
    inp = inputs[0]
    dims = _dims(inp)
    if len(dims) != 4:
        raise ModelError(f"{name}: input {inp.name!r} must be 4-D (a batch of images, NCHW or NHWC), has shape "
                         f"{list(dims) or 'unknown'}")
    elem = inp.type.tensor_type.elem_type
    return GraphInfo(
        name=name,
        input_name=inp.name,
        input_type=TensorProto.DataType.Name(elem).lower() if elem else "unknown",
        input_dims=dims,
        layout=_layout(dims, layout, name),
        output_name=g.output[0].name,
        output_dims=_dims(g.output[0]),
        final_op=_final_op(g),
        opset=_opset(model),
    )


_GRAPHS: OrderedDict[tuple, GraphInfo] = OrderedDict()


def read_graph(path: str | Path, layout: str = "auto") -> GraphInfo:
    """``GraphInfo`` of an ONNX file, reading the graph only (no external weight files)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ModelError(f"ONNX model not found: {path}") from None
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, layout)
    if key in _GRAPHS:
        return _GRAPHS[key]
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"cannot load ONNX model {path}: {e}") from None
    info = graph_info(model, path.name, layout)
    if info.num_classes is None:  # a symbolic class dimension: shape inference may know it
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            info = graph_info(inferred, path.name, layout)
        except Exception:
            pass
    _GRAPHS[key] = info
    while len(_GRAPHS) > 16:
        _GRAPHS.popitem(last=False)
    return info


def resolve_shape(graph: GraphInfo, given: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pixels' (C, H, W): the graph's, with the ``[input]`` values ``given`` (0 = not given)
    filling dynamic dimensions; a given value the graph contradicts is a ``ConfigError``."""
    out = []
    for key, have, want in zip(("channels", "height", "width"), graph.chw, given):
        if have is not None and want and want != have:
            raise ConfigError(f"input.{key}: the pipeline says {want} but {graph.name} takes {have} "
                              f"(input {graph.describe_input()})")
        value = have or want
        if not value:
            raise ConfigError(f"input.{key}: {graph.name} has a dynamic {key} (input {graph.describe_input()}); "
                              f"give it in [input]")
        out.append(value)
    if out[0] not in (1, 3):
        raise ConfigError(f"input.channels: {graph.name} takes {out[0]} channels (input {graph.describe_input()}); "
                          f"advshield handles 1 (grey) or 3 (RGB)")
    return (out[0], out[1], out[2])


# --- the wrapped model -----------------------------------------------------------------------------

@dataclass(frozen=True)
class WrappedModel:
    """The user's model wrapped to take float32 NCHW pixels in [0, 1] and give logits."""

    name: str  # file name (messages, repr)
    path: Path | None  # the user's file (None for a model given in memory)
    data: bytes = field(repr=False)  # the serialized (wrapped) graph; the file's bytes when not wrapped
    sha256: str  # of ``data``
    graph: GraphInfo  # the user's graph as declared
    input_shape: tuple[int, int, int]  # (C, H, W) of the pixels
    output: OutputKind  # what the user's graph outputs (resolved from "auto")
    steps: tuple[str, ...] = ()  # what wrapping added, in order; () = the file as it is
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    num_classes: int = 0
    external_data: bool = False  # weights in separate files: ONNX Runtime must load from ``path``

    @property
    def wrapped(self) -> bool:
        return bool(self.steps)

    @property
    def batch(self) -> int | None:
        """The fixed batch size of the model (run in chunks of it), or None."""
        return self.graph.batch

    @property
    def layout(self) -> Layout:
        return self.graph.layout

    def proto(self):
        """A fresh ``onnx.ModelProto`` of the wrapped graph (callers may modify it)."""
        if self.external_data and not self.wrapped and self.path is not None:
            return onnx.load(str(self.path))
        return onnx.load_from_string(self.data)

    def describe(self) -> dict[str, Any]:
        """What ``advshield info`` shows."""
        c, h, w = self.input_shape
        return {
            "input": f"{c}x{h}x{w}",
            "layout": self.layout,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "output": self.output,
            "batch": self.batch if self.batch is not None else "dynamic",
            "classes": self.num_classes,
            "wrapped": list(self.steps),
            "wrapped_sha256": self.sha256,
        }


def _per_channel(values: tuple[float, ...], c: int, key: str) -> np.ndarray:
    if len(values) not in (1, c):
        raise ConfigError(f"model.{key}: give one value or {c} (one per channel of the model's {c}), got {len(values)}")
    return np.broadcast_to(np.asarray(values, np.float32), (c,)).reshape(1, c, 1, 1).copy()


def _rename_uses(graph, old: str, new: str) -> None:
    """Every node input named ``old`` (in subgraphs too) reads ``new`` instead."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_uses(a.g, old, new)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _rename_uses(sub, old, new)


def _names(graph) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    names |= {v.name for v in graph.value_info} | {n.name for n in graph.node}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def build_wrapped(model, graph: GraphInfo, input_shape: tuple[int, int, int], *, scale: float = 1.0,
                  mean: tuple[float, ...] = (), std: tuple[float, ...] = (), output: OutputKind = "logits"):
    """A copy of ``model`` taking float32 NCHW pixels in [0, 1]; returns (ModelProto, steps added)."""
    c, h, w = input_shape
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    taken = _names(g)

    def fresh(base: str) -> str:
        name, i = f"advshield/{base}", 1
        while name in taken:
            i += 1
            name = f"advshield/{base}_{i}"
        taken.add(name)
        return name

    pre: list[tuple[str, str, Any]] = []  # (op, step description, constant or perm)
    if scale != 1.0:
        pre.append(("Mul", f"scale {scale:g}", np.asarray(scale, np.float32)))
    if mean:
        pre.append(("Sub", f"mean {list(mean)}", _per_channel(mean, c, "mean")))
    if std:
        pre.append(("Div", f"std {list(std)}", _per_channel(std, c, "std")))
    if graph.layout == "nhwc":
        pre.append(("Transpose", "NCHW -> NHWC", [0, 2, 3, 1]))
    post = output == "probabilities"
    declared = graph.input_dims[1:]
    fixes_dims = any(not (isinstance(d, int) and d > 0) for d in declared)
    steps = [s for _, s, _ in pre] + (["log of the probabilities"] if post else [])
    if not steps and not fixes_dims:
        return model, ()
    if (pre or post) and graph.opset < _MIN_OPSET:
        raise ModelError(f"{graph.name}: opset {graph.opset} is too old to wrap (normalization, layout or output "
                         f"conversion need opset >= {_MIN_OPSET}); re-export the model with a newer opset")
    if fixes_dims:
        steps.append(f"input fixed to {c}x{h}x{w}")

    nodes = []
    inp = graph.input_name
    if pre:
        internal = fresh("model_input")
        _rename_uses(g, inp, internal)
        cur = inp
        for k, (op, _, arg) in enumerate(pre):
            out = internal if k == len(pre) - 1 else fresh(f"{op.lower()}_out")
            if op == "Transpose":
                nodes.append(helper.make_node("Transpose", [cur], [out], name=fresh("to_nhwc"), perm=arg))
            else:
                const = fresh(op.lower())
                g.initializer.append(numpy_helper.from_array(arg, const))
                nodes.append(helper.make_node(op, [cur, const], [out], name=fresh(op.lower())))
            cur = out
    batch = graph.input_dims[0]
    new_input = helper.make_tensor_value_info(inp, TensorProto.FLOAT,
                                              [batch if isinstance(batch, int) and batch > 0 else "N", c, h, w])
    for i, vi in enumerate(g.input):
        if vi.name == inp:
            g.input[i].CopyFrom(new_input)
    if nodes:
        rest = list(g.node)
        del g.node[:]
        g.node.extend(nodes + rest)

    if post:
        out_name = graph.output_name
        probs = fresh("probabilities")
        for node in g.node:
            for i, name in enumerate(node.output):
                if name == out_name:
                    node.output[i] = probs
        _rename_uses(g, out_name, probs)
        for vi in g.value_info:
            if vi.name == out_name:
                vi.name = probs
        tiny, clipped = fresh("tiny"), fresh("clipped_probabilities")
        g.initializer.append(numpy_helper.from_array(np.asarray(TINY, np.float32), tiny))
        g.node.extend([
            helper.make_node("Max", [probs, tiny], [clipped], name=fresh("max")),
            helper.make_node("Log", [clipped], [out_name], name=fresh("log")),
        ])
    try:
        onnx.checker.check_model(m)
    except Exception as e:
        raise ModelError(f"{graph.name}: the wrapped model is not valid ONNX: {e}") from None
    return m, tuple(steps)


def _to_model_units(x: np.ndarray, graph: GraphInfo, scale: float, mean: tuple[float, ...],
                    std: tuple[float, ...]) -> np.ndarray:
    """NCHW [0, 1] pixels as the user's model takes them (for the output probe)."""
    c = x.shape[1]
    y = x * np.float32(scale)
    if mean:
        y = y - _per_channel(mean, c, "mean")
    if std:
        y = y / _per_channel(std, c, "std")
    if graph.layout == "nhwc":
        y = y.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(y, np.float32)


def _probe(source: Path | bytes, graph: GraphInfo, input_shape: tuple[int, int, int], scale: float,
           mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The user's model's outputs on a fixed batch of random pixels."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(source) if isinstance(source, Path) else source, sess_options=so,
                                       providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"ONNX Runtime cannot load {graph.name}: {e}") from None
    n = graph.batch or 4
    x = np.random.default_rng(0).random((n, *input_shape), dtype=np.float32)
    try:
        out = session.run([graph.output_name], {graph.input_name: _to_model_units(x, graph, scale, mean, std)})[0]
    except Exception as e:
        raise ModelError(f"ONNX Runtime cannot run {graph.name} on a batch of {n} {input_shape} images: {e}") from None
    if out.ndim != 2 or len(out) != n:
        raise ModelError(f"{graph.name}: output {graph.output_name!r} must be [batch, classes], is {list(out.shape)} "
                         f"for a batch of {n}")
    return out


def looks_like_probabilities(out: np.ndarray) -> bool:
    """Every row within [0, 1] and summing to 1 (what a softmax gives)."""
    out = np.asarray(out, np.float64)
    return bool(out.size and out.shape[-1] > 1 and np.all(out >= -1e-6) and np.all(out <= 1 + 1e-6)
                and np.allclose(out.sum(-1), 1.0, atol=1e-3))


def wrap_model(source: str | Path | bytes | Any, spec: ModelSpec | None = None, *,
               input_shape: tuple[int, int, int] | None = None) -> WrappedModel:
    """Wrap an ONNX model (a file, its bytes or a ``ModelProto``) as ``spec`` (a ``ModelSpec``;
    None: no normalization, layout and output detected) describes it. ``input_shape``: the
    resolved (C, H, W) (needed when the graph leaves them dynamic)."""
    layout = spec.layout if spec is not None else "auto"
    declared: str = spec.output if spec is not None else "auto"
    scale = spec.scale if spec is not None else 1.0
    mean = tuple(spec.mean) if spec is not None else ()
    std = tuple(spec.std) if spec is not None else ()
    path: Path | None = None
    external = False
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ModelError(f"ONNX model not found: {path}")
        raw = path.read_bytes()
        try:
            model = onnx.load_from_string(raw)
            external = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
            if external:
                onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise ModelError(f"cannot load ONNX model {path}: {e}") from None
        name = path.name
    elif isinstance(source, bytes):
        raw = source
        try:
            model = onnx.load_from_string(source)
        except Exception as e:
            raise ModelError(f"cannot load the ONNX model given as bytes: {e}") from None
        name = "model.onnx"
    elif isinstance(source, onnx.ModelProto):
        model, raw, name = source, source.SerializeToString(), "model.onnx"
    else:
        raise ModelError(f"expected an ONNX file, its bytes or an onnx.ModelProto, got {type(source).__name__}")
    graph = graph_info(model, name, layout)
    if graph.input_type != "float":
        raise ModelError(f"{name}: input {graph.input_name!r} is {graph.input_type}, advshield feeds the model float32 "
                         f"pixels; export the model with a float32 input (scale = 255.0 in [model] gives 0-255 "
                         f"values; a cast can go inside the model)")
    shape = resolve_shape(graph, input_shape or (0, 0, 0))

    out = None
    if declared == "auto" and graph.final_op in ("Softmax", "LogSoftmax"):
        kind: OutputKind = "probabilities" if graph.final_op == "Softmax" else "log_probabilities"
        log.info("%s: the output is computed by %s: treated as %s", name, graph.final_op, kind)
    else:
        out = _probe(path if external and path is not None else raw, graph, shape, scale, mean, std)
        if declared == "auto":
            kind = "probabilities" if looks_like_probabilities(out) else "logits"
            if kind == "probabilities":
                log.warning("%s: the outputs look like probabilities (every row within [0, 1] and summing to 1): "
                            "treated as probabilities (set output = \"probabilities\" or \"logits\" in [model] to "
                            "say so)", name)
        else:
            kind = declared  # type: ignore[assignment]
    if kind == "logits" and (graph.final_op == "Softmax" or (out is not None and looks_like_probabilities(out))):
        log.warning("%s: [model] output = \"logits\" but the model's outputs look like probabilities (%s): softmax "
                    "would be applied twice; set output = \"probabilities\" in [model]", name,
                    "its last op is Softmax" if graph.final_op == "Softmax" else "rows within [0, 1] summing to 1")
    k = graph.num_classes or (out.shape[1] if out is not None else 0)
    if not k:
        k = _probe(path if external and path is not None else raw, graph, shape, scale, mean, std).shape[1]

    wrapped, steps = build_wrapped(model, graph, shape, scale=scale, mean=mean, std=std, output=kind)
    data = wrapped.SerializeToString() if steps else raw
    return WrappedModel(name=name, path=path, data=data, sha256=hashlib.sha256(data).hexdigest(), graph=graph,
                        input_shape=shape, output=kind, steps=steps, scale=scale, mean=mean, std=std,
                        num_classes=int(k), external_data=external and not steps)


_WRAPPED: OrderedDict[tuple, WrappedModel] = OrderedDict()


def load_model(source: str | Path | bytes | Any, spec: ModelSpec | None = None, *,
               input_shape: tuple[int, int, int] | None = None) -> WrappedModel:
    """``wrap_model``, remembered for files (keyed by path, modification time, size and the spec's
    normalization, layout and output), so that the classifiers of one pipeline share one wrap."""
    if isinstance(source, WrappedModel):
        return source
    if not isinstance(source, str | Path):
        return wrap_model(source, spec, input_shape=input_shape)
    path = Path(source)
    try:
        st = path.stat()
    except OSError:
        raise ModelError(f"ONNX model not found: {path}") from None
    fields = (spec.scale, tuple(spec.mean), tuple(spec.std), spec.layout, spec.output) if spec is not None else None
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, fields, input_shape)
    if key not in _WRAPPED:
        _WRAPPED[key] = wrap_model(path, spec, input_shape=input_shape)
        while len(_WRAPPED) > 4:
            _WRAPPED.popitem(last=False)
    return _WRAPPED[key]
