"""advshield post-processing, a Triton Python-backend model (copied as ``<pipeline>__postprocess/1/model.py``).

Inputs ``LOGITS`` and one ``LOGITS_SQUEEZED_<i>`` per detector squeezer (the classifier's passes on
the squeezed copies); outputs the wire contract's ``PROBS``, ``LABEL``, ``DETECTOR_SCORE`` and
``FLAGGED`` (``advshield.deploy.runtime.Postprocess`` with the detector threshold of
``pipeline.toml`` here). Metrics: images scored, images flagged by the detector.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from advshield.deploy.runtime import Postprocess, check_stub_numpy

        check_stub_numpy(pb_utils)

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.post = Postprocess(Path(__file__).with_name("pipeline.toml"), threads=int(params.get("threads", "1")))
        labels = {"model": args["model_name"], "pipeline": params.get("pipeline", "")}
        self.scored_family = pb_utils.MetricFamily(
            name="advshield_scored_images_total", description="images scored by the advshield pipeline",
            kind=pb_utils.MetricFamily.COUNTER)
        self.flagged_family = pb_utils.MetricFamily(
            name="advshield_flagged_images_total", description="images flagged by the advshield detector",
            kind=pb_utils.MetricFamily.COUNTER)
        # the families must outlive their metrics: keep both
        self.scored = self.scored_family.Metric(labels=labels)
        self.flagged = self.flagged_family.Metric(labels=labels)

    def execute(self, requests):
        names = self.post.inputs
        per_request = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in names] for r in requests]
        sizes = [len(p[0]) for p in per_request]
        joined = [np.concatenate([p[k] for p in per_request]) if len(per_request) > 1 else per_request[0][k]
                  for k in range(len(names))]
        try:
            result = self.post.run(joined[0], joined[1:])
        except Exception as e:
            err = pb_utils.TritonError(f"post-processing failed: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        from advshield.deploy.runtime import split_rows

        self.scored.increment(int(sum(sizes)))
        self.flagged.increment(int(result["FLAGGED"].sum()))
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in part.items()])
                for part in split_rows(result, sizes)]
