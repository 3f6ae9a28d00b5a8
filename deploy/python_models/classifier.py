"""The classifier (or one segment of it) on ONNX Runtime inside the Python backend (copied as
``<pipeline>__classifier/1/model.py`` or ``__segment<k>``), for Triton servers without the
onnxruntime backend (e.g. the tritonserver of the nvidia-pytriton wheel). On GPU servers the
generator writes ``backend: "onnxruntime"`` for the same ``model.onnx`` instead.

One input and one output, named as in ``model.onnx``; the requests of an ``execute`` call are
joined into one ONNX Runtime call and the result split back.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from advshield.deploy.runtime import OnnxStep

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.step = OnnxStep(Path(__file__).with_name("model.onnx"), threads=int(params.get("threads", "1")),
                             gpu=args.get("model_instance_kind") == "GPU")

    def execute(self, requests):
        parts = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            out = self.step.run(np.concatenate(parts) if len(parts) > 1 else parts[0])
        except Exception as e:
            err = pb_utils.TritonError(f"ONNX Runtime failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses, start = [], 0
        for part in parts:
            piece = np.ascontiguousarray(out[start : start + len(part)])
            start += len(part)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, piece)]))
        return responses
