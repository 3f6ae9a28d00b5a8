"""The KServe v2 ``GRPCInferenceService`` servicer: health and metadata RPCs, and ModelInfer with
its admission bound, request validation, deadline and one JSON log line per request. The wire
contract (tensor names, shapes, parameters) is ``advshield.plugin.protocol``."""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from advshield.core.errors import ImageError, InputError
from advshield.core.version import __version__
from advshield.plugin import protocol as P
from advshield.plugin.classifiers import validate_batch
from advshield.plugin.decode import decode_images
from advshield.plugin.server.batcher import Batcher, Job, RpcStatus
from advshield.plugin.server.logs import log, log_event
from advshield.plugin.server.metrics import Metrics
from advshield.plugin.server.spec import ServeSpec


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The protocol subset clients use; the other RPCs answer UNIMPLEMENTED (stub default)."""

    def __init__(self, clf: Any, spec: ServeSpec, model_name: str, metrics: Metrics, batcher: Batcher) -> None:
        self.clf = clf
        self.spec = spec
        self.model_name = model_name
        self.metrics = metrics
        self.batcher = batcher
        self.input_spec = clf.config.input if getattr(clf, "config", None) is not None else None
        c, h, w = clf.input_shape
        self.input_shape = (c, h, w)
        self.num_classes = int(clf.num_classes)
        self.inputs = {t.name: t for t in P.input_tensors(c, h, w)}
        self.outputs = {t.name: t for t in P.output_tensors(self.num_classes)}
        self.ready = threading.Event()
        self._inflight = 0
        self._lock = threading.Lock()

    # --- health and metadata ---
    def ServerLive(self, request, context):
        self.metrics.count("ServerLive", grpc.StatusCode.OK)
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        self.metrics.count("ServerReady", grpc.StatusCode.OK)
        return service_pb2.ServerReadyResponse(ready=self.ready.is_set())

    def ModelReady(self, request, context):
        err = self._model_error(request.name, request.version)
        if err is not None and err.code != grpc.StatusCode.NOT_FOUND:  # a malformed version, as Triton
            self.metrics.count("ModelReady", err.code)
            context.abort(err.code, err.message)
        self.metrics.count("ModelReady", grpc.StatusCode.OK)
        return service_pb2.ModelReadyResponse(ready=err is None and self.ready.is_set())

    def ServerMetadata(self, request, context):
        self.metrics.count("ServerMetadata", grpc.StatusCode.OK)
        return service_pb2.ServerMetadataResponse(name="advshield", version=__version__,
                                                  extensions=["model_configuration", "parameters"])

    def _model_error(self, name: str, version: str) -> RpcStatus | None:
        """NOT_FOUND for another model or version; INVALID_ARGUMENT for a version that is not an
        integer (``protocol.version_number``): Triton's codes, in Triton's order."""
        try:
            number = P.version_number(version)
        except P.ParameterError as e:
            return RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if name != self.model_name:
            return RpcStatus(grpc.StatusCode.NOT_FOUND, f"unknown model {P.quoted(name)}; this server serves {self.model_name!r}")
        if number not in ("", P.MODEL_VERSION):
            return RpcStatus(grpc.StatusCode.NOT_FOUND,
                              f"unknown version {P.quoted(version)} of model {P.quoted(name)}; available: {P.MODEL_VERSION!r}")
        return None

    def _check_model(self, name: str, version: str, context, method: str) -> None:
        if (err := self._model_error(name, version)) is not None:
            self.metrics.count(method, err.code)
            context.abort(err.code, err.message)

    def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version, context, "ModelMetadata")
        T = service_pb2.ModelMetadataResponse.TensorMetadata
        self.metrics.count("ModelMetadata", grpc.StatusCode.OK)
        return service_pb2.ModelMetadataResponse(
            name=self.model_name, versions=[P.MODEL_VERSION], platform=P.PLATFORM,
            inputs=[T(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in self.inputs.values()],
            outputs=[T(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in self.outputs.values()],
        )

    def ModelConfig(self, request, context):
        self._check_model(request.name, request.version, context, "ModelConfig")
        cfg = getattr(self.clf, "config", None)
        detector = cfg.detector.type if cfg is not None and cfg.detector is not None else ""
        c, h, w = self.input_shape
        self.metrics.count("ModelConfig", grpc.StatusCode.OK)
        return service_pb2.ModelConfigResponse(config=P.model_config(
            self.model_name, channels=c, height=h, width=w, num_classes=self.num_classes,
            max_batch_size=self.spec.max_batch_size, max_queue_delay_us=int(self.spec.max_queue_delay_ms * 1000),
            class_names=tuple(getattr(self.clf, "class_names", ())), detector=detector,
            random=bool(getattr(self.clf, "random", False))))

    def RepositoryIndex(self, request, context):
        state = "READY" if self.ready.is_set() else "UNAVAILABLE"
        self.metrics.count("RepositoryIndex", grpc.StatusCode.OK)
        return service_pb2.RepositoryIndexResponse(models=[
            service_pb2.RepositoryIndexResponse.ModelIndex(name=self.model_name, version=P.MODEL_VERSION, state=state)])

    # --- inference ---
    def ModelInfer(self, request, context):
        t0 = time.perf_counter()
        code, message, n_images, result, response = grpc.StatusCode.OK, "", 0, None, None
        admitted = self._admit()
        try:
            if not admitted:
                raise RpcStatus(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"server busy: {self.spec.max_inflight} requests in flight (max_inflight); retry later")
            if not self.ready.is_set():
                raise RpcStatus(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            x, seed, wanted, timeout_s = self._parse(request)
            n_images = len(x)
            deadline = time.monotonic() + timeout_s
            remaining = context.time_remaining()
            if remaining is not None:
                deadline = min(deadline, time.monotonic() + remaining)
            job = Job(x, seed, deadline)
            fut = self.batcher.submit(job)
            try:
                result = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except futures.TimeoutError:
                fut.cancel()
                raise RpcStatus(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"deadline exceeded after {time.perf_counter() - t0:.3f} s") from None
            response = self._response(request, wanted, result)
        except RpcStatus as st:
            code, message = st.code, st.message
        except (ImageError, InputError) as e:  # from predict, e.g. a defense rejecting an input
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except Exception as e:
            log.exception("internal error in ModelInfer")
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        finally:
            if admitted:
                self._release()
        latency = time.perf_counter() - t0
        self.metrics.count("ModelInfer", code)
        self.metrics.latency.observe(latency)
        if code == grpc.StatusCode.OK and result is not None:
            self.metrics.images.inc(n_images)
            if result["has_detector"]:
                self.metrics.flagged.inc(int(result[P.OUTPUT_FLAGGED].sum()))
                for s in result[P.OUTPUT_SCORE].ravel():
                    self.metrics.detector_score.observe(float(s))
        if self.spec.log_requests or code not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED):
            fields: dict[str, Any] = {"event": "infer", "id": P.clip(request.id), "model": P.clip(request.model_name),
                                      "code": code.name, "images": n_images,
                                      "latency_ms": round(latency * 1000, 3), "peer": context.peer()}
            if result is not None:
                fields["seed"] = result["seed"]
                fields["flagged"] = int(result[P.OUTPUT_FLAGGED].sum())
            if message:
                fields["error"] = message
            log_event(logging.INFO if code == grpc.StatusCode.OK else logging.WARNING, "infer", **fields)
        if code != grpc.StatusCode.OK:
            context.abort(code, message)
        return response

    @property
    def inflight(self) -> int:
        return self._inflight

    @functools.cached_property
    def _expected_inputs(self) -> str:
        """What the error messages say the model takes (built once, not per request)."""
        return " or ".join(f"{t.name} ({t.datatype} {list(t.shape)})" for t in self.inputs.values())

    def _admit(self) -> bool:
        with self._lock:
            if self._inflight >= self.spec.max_inflight:
                return False
            self._inflight += 1
        self.metrics.inflight.inc()
        return True

    def _release(self) -> None:
        with self._lock:
            self._inflight -= 1
        self.metrics.inflight.dec()

    def _parse(self, request) -> tuple[np.ndarray, int | None, list[str], float]:
        """Validate a ModelInferRequest: pixels [n, C, H, W], seed, wanted outputs, timeout."""
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if (err := self._model_error(request.model_name, request.model_version)) is not None:
            raise err
        expected = self._expected_inputs
        names = [t.name for t in request.inputs]
        for name in names:
            if name not in self.inputs:
                raise RpcStatus(bad, f"unexpected input {P.quoted(name)} for model {self.model_name!r}; expected {expected}")
        if len(set(names)) != len(names):
            raise RpcStatus(bad, f"input tensor given twice: {P.quoted(names)}")
        if not names:
            raise RpcStatus(bad, f"missing input: send {expected}")
        if len(names) > 1:
            raise RpcStatus(bad, f"send one input per request, either {P.INPUT_IMAGE} or {P.INPUT_PIXELS}, got {P.quoted(names)}")
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise RpcStatus(bad, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        tensor = request.inputs[0]
        if raw and tensor.HasField("contents"):  # which would count? Triton refuses it too
            raise RpcStatus(bad, f"input {tensor.name!r}: contents must not be given together with raw_input_contents")
        spec = self.inputs[tensor.name]
        if tensor.datatype != spec.datatype:
            raise RpcStatus(bad, f"input {tensor.name!r}: expected datatype {spec.datatype}, got {P.quoted(tensor.datatype)}")
        shape = list(tensor.shape)
        if len(shape) != len(spec.shape) or any(d != e for d, e in zip(shape[1:], spec.dims)):
            raise RpcStatus(bad, f"input {tensor.name!r}: expected shape {['N', *spec.dims]}, got {P.quoted(shape)}")
        n = shape[0]
        if n < 1:
            raise RpcStatus(bad, f"input {tensor.name!r}: empty batch (shape {P.quoted(shape)})")
        if n > self.spec.max_batch_size:
            raise RpcStatus(bad, f"input {tensor.name!r}: batch of {n} images exceeds max_batch_size "
                                  f"{self.spec.max_batch_size} of model {self.model_name!r}")
        for key in request.parameters:
            if request.parameters[key].WhichOneof("parameter_choice") == "uint64_param":  # as Triton 2.51
                raise RpcStatus(bad, f"parameter {P.quoted(key)}: uint64 values are not accepted; "
                                     f"send an int64, bool or string parameter")
        x = self._pixels(tensor, raw[0] if raw else None, n)
        return x, self._seed(request), self._wanted(request), self._timeout(request)

    def _pixels(self, tensor, raw: bytes | None, n: int) -> np.ndarray:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if tensor.name == P.INPUT_IMAGE:
            if raw is not None:
                try:
                    items = P.deserialize_bytes(raw, n, P.INPUT_IMAGE)
                except P.WireFormatError as e:
                    raise RpcStatus(bad, str(e)) from None
            else:
                items = list(tensor.contents.bytes_contents)
                if len(items) != n:
                    raise RpcStatus(bad, f"input {P.INPUT_IMAGE!r}: shape says {n} images, contents hold {len(items)}")
            if self.input_spec is None:
                raise RpcStatus(bad, f"this server takes no {P.INPUT_IMAGE} input (no [input] spec); send {P.INPUT_PIXELS}")
            try:  # every header first, then the request's pixel budget, then the pixels
                return decode_images(items, self.input_spec, P.INPUT_IMAGE)
            except ImageError as e:
                raise RpcStatus(bad, str(e)) from None
        count = n * math.prod(self.input_shape)
        if raw is not None:
            if len(raw) != 4 * count:
                raise RpcStatus(bad, f"input {P.INPUT_PIXELS!r}: shape {[n, *self.input_shape]} needs {4 * count} "
                                      f"bytes of FP32, got {len(raw)}")
            x = np.frombuffer(raw, "<f4").reshape(n, *self.input_shape).astype(np.float32)
        else:
            values = tensor.contents.fp32_contents
            if len(values) != count:
                raise RpcStatus(bad, f"input {P.INPUT_PIXELS!r}: shape {[n, *self.input_shape]} needs {count} "
                                      f"values, contents hold {len(values)}")
            x = np.asarray(values, np.float32).reshape(n, *self.input_shape)
        try:
            validate_batch(x, self.input_shape, what=P.INPUT_PIXELS)
        except InputError as e:
            raise RpcStatus(bad, str(e)) from None
        return x

    def _seed(self, request) -> int | None:
        if P.PARAM_SEED not in request.parameters:
            return None
        p = request.parameters[P.PARAM_SEED]
        kind = p.WhichOneof("parameter_choice")
        try:
            return P.parse_seed(getattr(p, kind) if kind else None)
        except P.ParameterError as e:
            raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    def _wanted(self, request) -> list[str]:
        wanted = [o.name for o in request.outputs] or list(P.OUTPUTS)
        for name in wanted:
            if name not in self.outputs:
                raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"unexpected output {P.quoted(name)} for model {self.model_name!r}; "
                                 f"available: {', '.join(P.OUTPUTS)}")
        return list(dict.fromkeys(wanted))  # an output asked for twice comes once, as from Triton

    def _timeout(self, request) -> float:
        """Triton's per-request ``timeout`` parameter (microseconds), else the server default."""
        t = self.spec.request_timeout_s
        if "timeout" in request.parameters:
            p = request.parameters["timeout"]
            if p.WhichOneof("parameter_choice") != "int64_param":
                raise RpcStatus(grpc.StatusCode.INVALID_ARGUMENT,
                                 "parameter 'timeout': expected an int64 parameter (microseconds)")
            if p.int64_param > 0:
                t = min(t, p.int64_param / 1e6)
        return t

    def _response(self, request, wanted: list[str], result: dict[str, Any]):
        resp = service_pb2.ModelInferResponse(model_name=self.model_name, model_version=P.MODEL_VERSION, id=request.id)
        for name in wanted:
            arr = result[name]
            resp.outputs.add(name=name, datatype=self.outputs[name].datatype, shape=list(arr.shape))
            resp.raw_output_contents.append(arr.tobytes())
        if result["seed"] is not None:
            resp.parameters[P.PARAM_SEED].int64_param = int(result["seed"])
        return resp
