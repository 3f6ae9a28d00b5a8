"""advshield preprocessing, a Triton Python-backend model (copied as ``<pipeline>__preprocess/1/model.py``).

Inputs ``IMAGE`` (BYTES [n, 1], encoded PNG/JPEG) or ``PIXELS`` (FP32 [n, C, H, W]); outputs
``DEFENDED`` and one ``SQUEEZED_<i>`` per detector squeezer. ``execute`` validates each request
on its own (a bad one gets its error response, the others go on), runs the image-layer defenses
on all valid requests of the call as one batch (random pipelines: one batch per request, seeded
with its ``seed`` parameter) and splits the result. Metrics: requests rejected, images defended.
The work itself is ``advshield.deploy.runtime.Preprocess``, configured by ``pipeline.toml`` here.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def instance_device(args):
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"


def parameters(args):
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def error_response(message, code=None):
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        from advshield.deploy.runtime import Preprocess, RequestError, check_stub_numpy

        check_stub_numpy(pb_utils)

        params = parameters(args)
        self.RequestError = RequestError
        self.pre = Preprocess(Path(__file__).with_name("pipeline.toml"), device=instance_device(args),
                              threads=int(params.get("threads", "1")))
        labels = {"model": args["model_name"], "pipeline": params.get("pipeline", "")}
        self.rejected_family = pb_utils.MetricFamily(
            name="advshield_rejected_requests_total",
            description="requests refused by advshield preprocessing (corrupt image, bad pixels, bad seed)",
            kind=pb_utils.MetricFamily.COUNTER)
        self.images_family = pb_utils.MetricFamily(
            name="advshield_defended_images_total", description="images through the advshield defense layer",
            kind=pb_utils.MetricFamily.COUNTER)
        # the families must outlive their metrics: keep both
        self.rejected = self.rejected_family.Metric(labels=labels)
        self.images = self.images_family.Metric(labels=labels)

    def execute(self, requests):
        responses = [None] * len(requests)
        jobs, where = [], []
        for i, request in enumerate(requests):
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
            pixels = pb_utils.get_input_tensor_by_name(request, "PIXELS")
            try:
                job = self.pre.parse(None if image is None else image.as_numpy(),
                                     None if pixels is None else pixels.as_numpy(), request.parameters())
            except self.RequestError as e:
                self.rejected.increment(1)
                responses[i] = error_response(str(e))
                continue
            except Exception as e:  # never out of execute(): that would fail every request of the batch
                self.rejected.increment(1)
                responses[i] = error_response(f"preprocess: {type(e).__name__}: {e}"[:512], pb_utils.TritonError.INTERNAL)
                continue
            jobs.append(job)
            where.append(i)
        from advshield.deploy.runtime import run_isolated

        for i, job, result in zip(where, jobs, run_isolated(self.pre.run, jobs)):
            if isinstance(result, Exception):
                self.rejected.increment(1)
                responses[i] = error_response(f"{type(result).__name__}: {result}")
                continue
            self.images.increment(len(job.x))
            responses[i] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(arr)) for name, arr in zip(self.pre.outputs, result)])
        return responses
