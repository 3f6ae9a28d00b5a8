"""A Triton model repository holding a classifier that advshield did not generate.

``zoo_onnx`` turns an ONNX classifier that takes advshield's pixels (float32 NCHW in [0, 1]) into
the kind of export a model zoo ships: it takes ``(255 * pixel - MEAN) / STD`` in NHWC and answers
softmax probabilities. ``write_served_model`` deploys such a file on its own in a repository, with
a hand-written config.pbtxt and a Python-backend ``model.py`` that runs ONNX Runtime and imports
nothing of advshield: the stand-in for a TensorRT plan or a team's own ONNX model, with its own
name, tensor names and batching. Used by tests/test_served.py and benchmarks/remote.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MEAN = 72.9  # the zoo's normalization, in 0-255 units
STD = 90.0
NAME = "zoo_cnn"

MODEL_PY = '''"""A classifier deployed by its team (not by advshield): ONNX Runtime in the Python backend."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(__file__).with_name("model.onnx")), sess_options=so,
                                            providers=["CPUExecutionProvider"])
        self.onnx_input = self.session.get_inputs()[0].name

    def execute(self, requests):
        parts = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        out = self.session.run(None, {self.onnx_input: np.concatenate(parts).astype(np.float32)})[0]
        responses, start = [], 0
        for p in parts:
            piece = np.ascontiguousarray(out[start:start + len(p)])
            start += len(p)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, piece)]))
        return responses
'''

CONFIG = '''name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{input}"
    data_type: {datatype}
    dims: [ 28, 28, 1 ]
  }}
]
output [
  {{
    name: "{output}"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }}
]
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
'''


def zoo_onnx(src: str | Path, dest: str | Path) -> Path:
    """``src`` (pixels in [0, 1], NCHW, logits) as a zoo export: input ``images`` [N, 28, 28, 1]
    holding (255 * pixel - MEAN) / STD, output ``probs`` = softmax."""
    m = onnx.load(str(src))
    g = m.graph
    old_in, old_out = g.input[0].name, g.output[0].name
    for node in g.node:
        for i, n in enumerate(node.input):
            if n == old_in:
                node.input[i] = "zoo/nchw"
    consts = {"zoo/std": np.float32(STD), "zoo/mean": np.float32(MEAN), "zoo/inv255": np.float32(1 / 255)}
    for k, v in consts.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(v, np.float32), k))
    pre = [
        helper.make_node("Mul", ["images", "zoo/std"], ["zoo/a"], name="zoo_unstd"),
        helper.make_node("Add", ["zoo/a", "zoo/mean"], ["zoo/b"], name="zoo_unmean"),
        helper.make_node("Mul", ["zoo/b", "zoo/inv255"], ["zoo/c"], name="zoo_unscale"),
        helper.make_node("Transpose", ["zoo/c"], ["zoo/nchw"], name="zoo_nhwc_to_nchw", perm=[0, 3, 1, 2]),
    ]
    rest = list(g.node)
    del g.node[:]
    g.node.extend(pre + rest + [helper.make_node("Softmax", [old_out], ["probs"], name="zoo_softmax", axis=1)])
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 28, 28, 1]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10]))
    onnx.checker.check_model(m)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dest))
    return dest


def write_served_model(repo: str | Path, onnx_path: str | Path, *, name: str = NAME, max_batch_size: int = 16,
                       input: str = "images", output: str = "probs", datatype: str = "TYPE_FP32") -> Path:
    """``repo/name``: config.pbtxt (written by hand, as its team would), 1/model.py, 1/model.onnx."""
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(CONFIG.format(name=name, max_batch_size=max_batch_size, input=input,
                                                       output=output, datatype=datatype))
    (folder / "1" / "model.py").write_text(MODEL_PY)
    (folder / "1" / "model.onnx").write_bytes(Path(onnx_path).read_bytes())
    return folder


PIPELINE = '''[pipeline]
name = "{pipeline}"

[model]
{path}served = {{ endpoint = "{endpoint}", name = "{name}" }}
scale = 255.0
mean = [{mean}]
std = [{std}]
output = "probabilities"
surrogate = "{surrogate}"

[data]
dataset = "fashion-mnist"
{body}'''


def pipeline_text(*, pipeline: str, endpoint: str = "", twin: str | Path | None = None, surrogate: str | Path = "",
                  body: str = "", name: str = NAME) -> str:
    """A pipeline file wrapping the served zoo model (``twin``: its ONNX file, [model] path)."""
    path = f'path = "{Path(twin).as_posix()}"\n' if twin else ""
    return PIPELINE.format(pipeline=pipeline, path=path, endpoint=endpoint, name=name, mean=MEAN, std=STD,
                           surrogate=Path(surrogate).as_posix() if surrogate else "", body=body)
