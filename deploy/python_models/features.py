"""advshield feature-layer defenses, a Triton Python-backend model (copied as
``<pipeline>__features<k>/1/model.py``), between the model's head and tail segments.

Input ``FEATURE`` (FP32 [n, D, H, W], the tensor at the cut), output ``DEFENDED`` (same shape):
every request of an ``execute`` call joined into one batch, the defenses of ``pipeline.toml``
here (``advshield.deploy.runtime.FeatureStep``), the result split back.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def instance_device(args):
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"


class TritonPythonModel:
    def initialize(self, args):
        from advshield.deploy.runtime import FeatureStep, check_stub_numpy

        check_stub_numpy(pb_utils)

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.step = FeatureStep(Path(__file__).with_name("pipeline.toml"), device=instance_device(args),
                                threads=int(params.get("threads", "1")))

    def execute(self, requests):
        parts = [pb_utils.get_input_tensor_by_name(r, "FEATURE").as_numpy() for r in requests]
        try:
            out = self.step.run(np.concatenate(parts) if len(parts) > 1 else parts[0])
        except Exception as e:
            err = pb_utils.TritonError(f"feature-layer defenses failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses, start = [], 0
        for part in parts:
            piece = np.ascontiguousarray(out[start : start + len(part)])
            start += len(part)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("DEFENDED", piece)]))
        return responses
