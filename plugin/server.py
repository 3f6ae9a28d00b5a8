"""advshield's own gRPC scoring server: the KServe v2 protocol subset clients use, in front of a
``DefendedClassifier``, hardened against bad input and load.

* ``GRPCInferenceService`` (tritonclient's generated stubs): ServerLive, ServerReady, ModelReady,
  ServerMetadata, ModelMetadata, ModelConfig, RepositoryIndex, ModelInfer. The wire contract
  (tensor names, shapes, parameters) is ``advshield.plugin.protocol``.
* ``grpc.health.v1.Health`` (SERVING until shutdown starts) and server reflection.
* Micro-batching: each request's images are decoded and validated in its own handler thread, so
  a bad request fails alone before it can reach a batch; a single batcher thread then joins the
  queued requests into one classifier call of at most ``max_batch_size`` images, waiting at most
  ``max_queue_delay_ms`` after the oldest one arrived.
* Load: a bound on in-flight ModelInfer requests (RESOURCE_EXHAUSTED beyond it), per-request
  deadlines (the client's, else ``request_timeout_s``), a message size limit.
* Optional bearer-token authentication (UNAUTHENTICATED; the health service stays open for
  probes) and TLS; graceful shutdown on SIGTERM/SIGINT finishes in-flight requests.
* Structured JSON logs (one line per request) and Prometheus metrics on a separate HTTP port.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import prometheus_client as prom
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2, service_pb2_grpc

from advshield import __version__
from advshield.configs import check, from_mapping
from advshield.errors import AdvshieldError, ImageError, InputError
from advshield.plugin import protocol as P
from advshield.plugin.classifiers import validate_batch
from advshield.plugin.decode import decode_image

log = logging.getLogger("advshield.serve")


class ServeError(AdvshieldError):
    """The server cannot start (port in use, unreadable TLS files, ...)."""


# --- the [serve] section ---------------------------------------------------------------------

@dataclass(frozen=True)
class ServeSpec:
    """``[serve]`` of the pipeline file; every field can be overridden on the command line."""

    host: str = "127.0.0.1"
    port: int = 8001  # 0: any free port (logged)
    max_batch_size: int = 64  # images per request and per micro-batch
    max_queue_delay_ms: float = 2.0  # how long the oldest queued request waits for company
    max_inflight: int = 64  # ModelInfer requests admitted at once; beyond: RESOURCE_EXHAUSTED
    max_message_bytes: int = 32 << 20  # gRPC receive/send limit
    request_timeout_s: float = 30.0  # deadline of a request whose client sets none
    grace_s: float = 10.0  # shutdown: how long in-flight requests may take to finish
    threads: int = 1  # torch / ONNX Runtime / OpenMP threads inside the server
    token_file: str = ""  # bearer token (first line of the file); empty: no authentication
    tls_cert: str = ""  # PEM certificate chain; with tls_key: TLS instead of plaintext
    tls_key: str = ""
    metrics_port: int = -1  # Prometheus HTTP port; -1: off, 0: any free port
    metrics_host: str = "127.0.0.1"
    log_requests: bool = True  # one JSON log line per ModelInfer request

    def __post_init__(self) -> None:
        check(bool(self.host), "serve.host: must not be empty")
        check(0 <= self.port <= 65535, f"serve.port: must be within [0, 65535], got {self.port}")
        check(1 <= self.max_batch_size <= 4096, f"serve.max_batch_size: must be within [1, 4096], got {self.max_batch_size}")
        check(0 <= self.max_queue_delay_ms <= 10_000, f"serve.max_queue_delay_ms: must be within [0, 10000], got {self.max_queue_delay_ms}")
        check(1 <= self.max_inflight <= 10_000, f"serve.max_inflight: must be within [1, 10000], got {self.max_inflight}")
        check(self.max_message_bytes >= 1024, f"serve.max_message_bytes: must be >= 1024, got {self.max_message_bytes}")
        check(self.request_timeout_s > 0, f"serve.request_timeout_s: must be > 0, got {self.request_timeout_s}")
        check(self.grace_s >= 0, f"serve.grace_s: must be >= 0, got {self.grace_s}")
        check(1 <= self.threads <= 64, f"serve.threads: must be within [1, 64], got {self.threads}")
        check(bool(self.tls_cert) == bool(self.tls_key),
              f"serve: tls_cert and tls_key go together, got tls_cert={self.tls_cert!r} tls_key={self.tls_key!r}")
        check(-1 <= self.metrics_port <= 65535, f"serve.metrics_port: must be -1 (off) or within [0, 65535], got {self.metrics_port}")


def serve_spec(cfg: Any, **overrides: Any) -> ServeSpec:
    """The pipeline's ``[serve]`` table (paths resolved against the pipeline file) with the
    non-None ``overrides`` applied."""
    spec = from_mapping(ServeSpec, dict(cfg.extra.get("serve", {})), "serve")
    changes: dict[str, Any] = {k: str(cfg.resolve(getattr(spec, k)))
                               for k in ("token_file", "tls_cert", "tls_key") if getattr(spec, k)}
    changes.update({k: v for k, v in overrides.items() if v is not None})
    return replace(spec, **changes)


def read_token(path: str | Path) -> str:
    try:
        lines = Path(path).read_text().strip().splitlines()
    except OSError as e:
        raise ServeError(f"cannot read the token file {path}: {e.strerror}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ServeError(f"token file {path} is empty")
    return token


# --- structured logs -------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus the record's ``fields`` dict."""

    def format(self, record: logging.LogRecord) -> str:
        rec: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rec.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            rec["exc"] = self.formatException(record.exc_info)
        return json.dumps(rec, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _event(level: int, msg: str, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, msg, extra={"fields": fields})


# --- metrics ---------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics in a registry of their own (several servers may share a process)."""

    def __init__(self, max_batch_size: int) -> None:
        prom.disable_created_metrics()  # no *_created series next to every counter
        self.registry = r = prom.CollectorRegistry()
        lat_buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
        self.requests = prom.Counter("advshield_requests", "gRPC requests by method and status code",
                                     ["method", "code"], registry=r)
        self.errors = prom.Counter("advshield_errors", "failed requests by status code", ["code"], registry=r)
        self.latency = prom.Histogram("advshield_request_latency_seconds", "ModelInfer latency (server side)",
                                      buckets=lat_buckets, registry=r)
        self.queue_delay = prom.Histogram("advshield_queue_delay_seconds", "time a request waited for its batch",
                                          buckets=lat_buckets, registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, max_batch_size})
        self.batch_size = prom.Histogram("advshield_batch_size", "images per classifier call",
                                         buckets=[s for s in sizes if s <= max_batch_size], registry=r)
        self.batch_requests = prom.Histogram("advshield_batch_requests", "requests joined into one classifier call",
                                             buckets=[s for s in sizes if s <= max_batch_size], registry=r)
        self.images = prom.Counter("advshield_images", "images scored", registry=r)
        self.flagged = prom.Counter("advshield_flagged", "images the detector flagged", registry=r)
        self.detector_score = prom.Histogram("advshield_detector_score", "detector scores",
                                             buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0),
                                             registry=r)
        self.inflight = prom.Gauge("advshield_inflight_requests", "ModelInfer requests admitted and not answered",
                                   registry=r)

    def count(self, method: str, code: grpc.StatusCode) -> None:
        self.requests.labels(method, code.name).inc()
        if code != grpc.StatusCode.OK:
            self.errors.labels(code.name).inc()


# --- micro-batching --------------------------------------------------------------------------

class _Status(Exception):
    """An RPC outcome other than OK, with the message the client sees."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Job:
    x: np.ndarray  # float32 [n, C, H, W], already validated
    seed: int | None
    deadline: float  # time.monotonic()
    enqueued: float = field(default_factory=time.monotonic)
    future: futures.Future = field(default_factory=futures.Future)

    @property
    def n(self) -> int:
        return len(self.x)


_STOP = object()


class Batcher:
    """Joins queued requests into classifier calls of at most ``max_batch_size`` images.

    Deterministic pipelines: one ``predict`` per micro-batch. Random pipelines: one ``predict``
    per request with that request's seed, so that the seed returned to the client reproduces its
    result exactly (``predict(x, seed)`` in process gives the same numbers)."""

    def __init__(self, clf: Any, max_batch_size: int, max_queue_delay_s: float, metrics: Metrics,
                 inflight: Callable[[], int] | None = None) -> None:
        self.clf = clf
        self.inflight = inflight  # admitted requests; no more than the batch holds: nobody to wait for
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.metrics = metrics
        self.random = bool(getattr(clf, "random", False))
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="advshield-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: _Job) -> futures.Future:
        self._queue.put(job)
        return job.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything queued, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _loop(self) -> None:
        carry: Any = None
        stopping = False
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is _STOP:
                self._fail_queued()
                return
            batch, n = [first], first.n
            t_end = first.enqueued + self.max_queue_delay_s
            while n < self.max_batch_size:
                try:
                    remaining = t_end - time.monotonic()
                    if self.inflight is not None and self.inflight() <= len(batch):
                        remaining = 0.0  # no other request admitted: waiting cannot fill the batch
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                if n + nxt.n > self.max_batch_size:
                    carry = nxt
                    break
                batch.append(nxt)
                n += nxt.n
            try:
                self._run(batch)
            except Exception as e:  # a bug here must not strand the waiting handlers
                log.exception("batcher failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
            if stopping:
                self._queue.put(_STOP)  # after the carried job, if any

    def _fail_queued(self) -> None:
        """Whatever arrives after the stop marker is answered UNAVAILABLE, never left waiting."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(_Status(grpc.StatusCode.UNAVAILABLE, "server is shutting down"))

    def _run(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the handler gave up (deadline) before we got to it
            if now >= job.deadline:
                job.future.set_exception(_Status(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                 "deadline exceeded while queued for a batch"))
                continue
            self.metrics.queue_delay.observe(now - job.enqueued)
            live.append(job)
        if not live:
            return
        groups = [[j] for j in live] if self.random else [live]
        for group in groups:
            self._predict_group(group)

    def _predict_group(self, group: list[_Job]) -> None:
        x = group[0].x if len(group) == 1 else np.concatenate([j.x for j in group])
        self.metrics.batch_size.observe(len(x))
        self.metrics.batch_requests.observe(len(group))
        try:
            pred = self.clf.predict(x, seed=group[0].seed)
        except Exception as e:
            if len(group) > 1:  # find the culprit: the others must not fail with it
                for job in group:
                    self._predict_group([job])
                return
            group[0].future.set_exception(e)
            return
        start = 0
        for job in group:
            sl = slice(start, start + job.n)
            start += job.n
            job.future.set_result(_slice_prediction(pred, sl))


def _slice_prediction(pred: Any, sl: slice) -> dict[str, Any]:
    n = sl.stop - sl.start
    score = np.zeros(n, np.float32) if pred.score is None else np.asarray(pred.score[sl], np.float32)
    flagged = np.zeros(n, bool) if pred.flagged is None else np.asarray(pred.flagged[sl], bool)
    return {
        P.OUTPUT_PROBS: np.ascontiguousarray(pred.probs[sl], np.float32),
        P.OUTPUT_LABEL: np.asarray(pred.labels[sl], np.int64).reshape(n, 1),
        P.OUTPUT_SCORE: score.reshape(n, 1),
        P.OUTPUT_FLAGGED: flagged.reshape(n, 1),
        "seed": pred.seed,
        "has_detector": pred.score is not None,
    }


# --- the KServe v2 servicer ------------------------------------------------------------------

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
        known = request.name == self.model_name and request.version in ("", P.MODEL_VERSION)
        self.metrics.count("ModelReady", grpc.StatusCode.OK)
        return service_pb2.ModelReadyResponse(ready=known and self.ready.is_set())

    def ServerMetadata(self, request, context):
        self.metrics.count("ServerMetadata", grpc.StatusCode.OK)
        return service_pb2.ServerMetadataResponse(name="advshield", version=__version__,
                                                  extensions=["model_configuration", "parameters"])

    def _model_error(self, name: str, version: str) -> _Status | None:
        if name != self.model_name:
            return _Status(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {self.model_name!r}")
        if version not in ("", P.MODEL_VERSION):
            return _Status(grpc.StatusCode.NOT_FOUND,
                           f"unknown version {version!r} of model {name!r}; available: {P.MODEL_VERSION!r}")
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
                raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server busy: {self.spec.max_inflight} requests in flight (max_inflight); retry later")
            if not self.ready.is_set():
                raise _Status(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            x, seed, wanted, timeout_s = self._parse(request)
            n_images = len(x)
            deadline = time.monotonic() + timeout_s
            remaining = context.time_remaining()
            if remaining is not None:
                deadline = min(deadline, time.monotonic() + remaining)
            job = _Job(x, seed, deadline)
            fut = self.batcher.submit(job)
            try:
                result = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except futures.TimeoutError:
                fut.cancel()
                raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"deadline exceeded after {time.perf_counter() - t0:.3f} s") from None
            response = self._response(request, wanted, result)
        except _Status as st:
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
            fields: dict[str, Any] = {"event": "infer", "id": request.id, "model": request.model_name,
                                      "code": code.name, "images": n_images,
                                      "latency_ms": round(latency * 1000, 3), "peer": context.peer()}
            if result is not None:
                fields["seed"] = result["seed"]
                fields["flagged"] = int(result[P.OUTPUT_FLAGGED].sum())
            if message:
                fields["error"] = message
            _event(logging.INFO if code == grpc.StatusCode.OK else logging.WARNING, "infer", **fields)
        if code != grpc.StatusCode.OK:
            context.abort(code, message)
        return response

    @property
    def inflight(self) -> int:
        return self._inflight

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
        expected = " or ".join(f"{t.name} ({t.datatype} {list(t.shape)})" for t in self.inputs.values())
        names = [t.name for t in request.inputs]
        for name in names:
            if name not in self.inputs:
                raise _Status(bad, f"unexpected input {name!r} for model {self.model_name!r}; expected {expected}")
        if len(set(names)) != len(names):
            raise _Status(bad, f"input tensor given twice: {names}")
        if not names:
            raise _Status(bad, f"missing input: send {expected}")
        if len(names) > 1:
            raise _Status(bad, f"send one input per request, either {P.INPUT_IMAGE} or {P.INPUT_PIXELS}, got {names}")
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise _Status(bad, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        tensor = request.inputs[0]
        spec = self.inputs[tensor.name]
        if tensor.datatype != spec.datatype:
            raise _Status(bad, f"input {tensor.name!r}: expected datatype {spec.datatype}, got {tensor.datatype!r}")
        shape = list(tensor.shape)
        if len(shape) != len(spec.shape) or any(d != e for d, e in zip(shape[1:], spec.dims)):
            raise _Status(bad, f"input {tensor.name!r}: expected shape {['N', *spec.dims]}, got {shape}")
        n = shape[0]
        if n < 1:
            raise _Status(bad, f"input {tensor.name!r}: empty batch (shape {shape})")
        if n > self.spec.max_batch_size:
            raise _Status(bad, f"input {tensor.name!r}: batch of {n} images exceeds max_batch_size "
                               f"{self.spec.max_batch_size} of model {self.model_name!r}")
        x = self._pixels(tensor, raw[0] if raw else None, n)
        return x, self._seed(request), self._wanted(request), self._timeout(request)

    def _pixels(self, tensor, raw: bytes | None, n: int) -> np.ndarray:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if tensor.name == P.INPUT_IMAGE:
            if raw is not None:
                try:
                    items = P.deserialize_bytes(raw, n, P.INPUT_IMAGE)
                except P.WireFormatError as e:
                    raise _Status(bad, str(e)) from None
            else:
                items = list(tensor.contents.bytes_contents)
                if len(items) != n:
                    raise _Status(bad, f"input {P.INPUT_IMAGE!r}: shape says {n} images, contents hold {len(items)}")
            if self.input_spec is None:
                raise _Status(bad, f"this server takes no {P.INPUT_IMAGE} input (no [input] spec); send {P.INPUT_PIXELS}")
            x = np.empty((n, *self.input_shape), np.float32)
            for i, data in enumerate(items):
                try:
                    x[i] = decode_image(data, self.input_spec)
                except ImageError as e:
                    raise _Status(bad, f"{P.INPUT_IMAGE}[{i}]: {e}") from None
            return x
        count = n * math.prod(self.input_shape)
        if raw is not None:
            if len(raw) != 4 * count:
                raise _Status(bad, f"input {P.INPUT_PIXELS!r}: shape {[n, *self.input_shape]} needs {4 * count} "
                                   f"bytes of FP32, got {len(raw)}")
            x = np.frombuffer(raw, "<f4").reshape(n, *self.input_shape).astype(np.float32)
        else:
            values = tensor.contents.fp32_contents
            if len(values) != count:
                raise _Status(bad, f"input {P.INPUT_PIXELS!r}: shape {[n, *self.input_shape]} needs {count} "
                                   f"values, contents hold {len(values)}")
            x = np.asarray(values, np.float32).reshape(n, *self.input_shape)
        try:
            validate_batch(x, self.input_shape, what=P.INPUT_PIXELS)
        except InputError as e:
            raise _Status(bad, str(e)) from None
        return x

    def _seed(self, request) -> int | None:
        if P.PARAM_SEED not in request.parameters:
            return None
        p = request.parameters[P.PARAM_SEED]
        kind = p.WhichOneof("parameter_choice")
        given: Any = getattr(p, kind) if kind else None
        value = given
        if kind == "string_param" and given.strip().isdigit():
            value = int(given)
        if kind in ("bool_param", "double_param") or not isinstance(value, int) or not 0 <= value < P.SEED_LIMIT:
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT,
                          f"parameter 'seed' must be an integer in [0, 2**63), got {given!r}")
        return value

    def _wanted(self, request) -> list[str]:
        wanted = [o.name for o in request.outputs] or list(P.OUTPUTS)
        for name in wanted:
            if name not in self.outputs:
                raise _Status(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unexpected output {name!r} for model {self.model_name!r}; "
                              f"available: {', '.join(P.OUTPUTS)}")
        if len(set(wanted)) != len(wanted):
            raise _Status(grpc.StatusCode.INVALID_ARGUMENT, f"output requested twice: {wanted}")
        return wanted

    def _timeout(self, request) -> float:
        """Triton's per-request ``timeout`` parameter (microseconds), else the server default."""
        t = self.spec.request_timeout_s
        if "timeout" in request.parameters:
            us = request.parameters["timeout"].int64_param
            if us > 0:
                t = min(t, us / 1e6)
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


# --- authentication --------------------------------------------------------------------------

class TokenAuth(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except the health service (probes)."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str, metrics: Metrics) -> None:
        self._expected = f"Bearer {token}".encode()
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.OPEN_PREFIXES):
            return continuation(handler_call_details)
        got = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == P.AUTH_HEADER:
                got = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(got.encode("utf-8", "replace"), self._expected):
            return continuation(handler_call_details)
        reason = "missing 'authorization: Bearer <token>' metadata" if not got else "invalid bearer token"
        handler = continuation(handler_call_details)
        self.metrics.count(method.rsplit("/", 1)[-1] or "unknown", grpc.StatusCode.UNAUTHENTICATED)
        _event(logging.WARNING, "unauthenticated", event="auth", method=method, error=reason)
        return _deny(handler, reason)


def _deny(handler, reason: str):
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    if handler is None:  # unknown method: UNAUTHENTICATED too (reveal nothing without a token)
        return grpc.unary_unary_rpc_method_handler(abort)
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


# --- the server ------------------------------------------------------------------------------

class ScoringServer:
    """One pipeline served over gRPC. ``start()``, then ``stop()`` (graceful) or use ``with``."""

    def __init__(self, clf: Any, spec: ServeSpec, *, model_name: str, token: str | None = None) -> None:
        self.clf = clf
        self.spec = spec
        self.model_name = model_name
        self.token = token
        self.metrics = Metrics(spec.max_batch_size)
        self.batcher = Batcher(clf, spec.max_batch_size, spec.max_queue_delay_ms / 1000.0, self.metrics,
                               inflight=lambda: self.servicer.inflight)
        self.servicer = InferenceServicer(clf, spec, model_name, self.metrics, self.batcher)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_httpd: Any = None
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    def start(self) -> ScoringServer:
        spec = self.spec
        interceptors = [TokenAuth(self.token, self.metrics)] if self.token else []
        workers = spec.max_inflight + 8  # the extra threads answer health/metadata and rejections
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="advshield-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", spec.max_message_bytes),
                ("grpc.max_send_message_length", spec.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=4 * workers,  # backstop: gRPC answers RESOURCE_EXHAUSTED beyond it
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (P.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        address = f"{spec.host}:{spec.port}"
        try:
            if spec.tls_cert:
                try:
                    creds = grpc.ssl_server_credentials([(Path(spec.tls_key).read_bytes(), Path(spec.tls_cert).read_bytes())])
                except OSError as e:
                    raise ServeError(f"cannot read TLS files {spec.tls_cert} / {spec.tls_key}: {e.strerror}") from None
                port = server.add_secure_port(address, creds)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise ServeError(f"cannot listen on {address}: {e} (port in use?)") from None
        if not port:
            raise ServeError(f"cannot listen on {address} (port in use?)")
        self.port = port
        if spec.metrics_port >= 0:
            try:
                httpd, _ = prom.start_http_server(spec.metrics_port, addr=spec.metrics_host, registry=self.metrics.registry)
            except OSError as e:
                raise ServeError(f"cannot serve metrics on {spec.metrics_host}:{spec.metrics_port}: {e.strerror}") from None
            self._metrics_httpd = httpd
            self.metrics_port = httpd.server_port
        self.batcher.start()
        server.start()
        self._server = server
        self.servicer.ready.set()
        for name in ("", P.SERVICE_NAME, self.model_name):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        _event(logging.INFO, "listening", event="listening", host=spec.host, port=port,
               tls=bool(spec.tls_cert), auth=bool(self.token), metrics_port=self.metrics_port,
               model=self.model_name, max_batch_size=spec.max_batch_size,
               max_queue_delay_ms=spec.max_queue_delay_ms, max_inflight=spec.max_inflight,
               random=bool(getattr(self.clf, "random", False)), pid=os.getpid())
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING, refuse new RPCs, let in-flight ones finish within
        ``grace`` seconds, then drain the batcher and close the metrics endpoint."""
        if self._server is None or self._stopped.is_set():
            return
        grace = self.spec.grace_s if grace is None else grace
        _event(logging.INFO, "stopping", event="stopping", grace_s=grace)
        self.health.enter_graceful_shutdown()
        done = self._server.stop(grace)
        done.wait()
        self.servicer.ready.clear()
        self.batcher.stop(timeout=5.0)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        self._stopped.set()
        _event(logging.INFO, "stopped", event="stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> ScoringServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def limit_threads(threads: int) -> None:
    """Keep torch / ONNX Runtime / OpenMP at ``threads`` (tail latency grows tenfold otherwise)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    os.environ["ADVSHIELD_THREADS"] = str(threads)  # default intra-op threads of OnnxClassifier
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already ran
        torch.set_num_interop_threads(1)


def build_server(cfg: Any, spec: ServeSpec, token: str | None = None) -> ScoringServer:
    """The defended classifier of pipeline ``cfg`` behind a ScoringServer (not started)."""
    from advshield.plugin.pipeline import DefendedClassifier

    limit_threads(spec.threads)
    clf = DefendedClassifier.from_config(cfg)
    return ScoringServer(clf, spec, model_name=cfg.pipeline.name, token=token)


def serve(cfg: Any, spec: ServeSpec, token: str | None = None) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns the exit status."""
    if token is None and spec.token_file:
        token = read_token(spec.token_file)
    t0 = time.perf_counter()
    server = build_server(cfg, spec, token)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        if len(received) > 1:  # a second signal: stop now
            os._exit(130)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        _event(logging.INFO, "ready", event="ready", startup_s=round(time.perf_counter() - t0, 3))
        while not stop.wait(0.5):
            pass
        _event(logging.INFO, "signal", event="signal", signal=signal.Signals(received[0]).name)
        server.stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
