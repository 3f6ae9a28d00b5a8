"""The scoring server: the servicer, health, reflection, authentication, TLS and the metrics
endpoint put together (``ScoringServer``), and ``serve``, which runs one until SIGTERM/SIGINT and
then shuts it down gracefully."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import ssl
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import prometheus_client as prom
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc

from advshield.plugin import protocol as P
from advshield.plugin.config import load_pipeline
from advshield.plugin.pipeline import DefendedClassifier
from advshield.plugin.server.auth import TokenAuth
from advshield.plugin.server.batcher import Batcher
from advshield.plugin.server.logs import log_event, setup_json_logging
from advshield.plugin.server.metrics import Metrics
from advshield.plugin.server.servicer import InferenceServicer
from advshield.plugin.server.spec import ServeError, ServeSpec, read_token
from advshield.plugin.server.streams import StreamLimit
from advshield.plugin.server.workers import serve_workers


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
        self.servicer: InferenceServicer = InferenceServicer(clf, spec, model_name, self.metrics, self.batcher)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.streams = StreamLimit(spec.max_streams, self.metrics, spec.stream_idle_s, spec.stream_max_age_s)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_httpd: Any = None
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    def start(self) -> ScoringServer:
        spec = self.spec
        # authentication first (a client without the token cannot take a stream slot), then the
        # stream bound; the pool holds a thread for each admitted ModelInfer and each open stream,
        # plus 8 for health/metadata calls and rejections, so idle streams cannot starve unary calls
        interceptors: list[grpc.ServerInterceptor] = [TokenAuth(self.token, self.metrics)] if self.token else []
        interceptors.append(self.streams)
        workers = spec.max_inflight + spec.max_streams + 8
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="advshield-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", spec.max_message_bytes),
                ("grpc.max_send_message_length", spec.max_message_bytes),
                ("grpc.so_reuseport", 1 if spec.reuse_port else 0),
                *([("grpc.max_connection_idle_ms", int(spec.connection_idle_s * 1000))] if spec.connection_idle_s else []),
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
                creds = _tls_credentials(spec.tls_cert, spec.tls_key)
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
        log_event(logging.INFO, "listening", event="listening", host=spec.host, port=port,
                  tls=bool(spec.tls_cert), auth=bool(self.token), metrics_port=self.metrics_port,
                  model=self.model_name, max_batch_size=spec.max_batch_size,
                  max_queue_delay_ms=spec.max_queue_delay_ms, max_inflight=spec.max_inflight,
                  max_streams=spec.max_streams, stream_idle_s=spec.stream_idle_s,
                  random=bool(getattr(self.clf, "random", False)), pid=os.getpid())
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING, refuse new RPCs, let in-flight ones finish within
        ``grace`` seconds, then drain the batcher and close the metrics endpoint."""
        if self._server is None or self._stopped.is_set():
            return
        grace = self.spec.grace_s if grace is None else grace
        log_event(logging.INFO, "stopping", event="stopping", grace_s=grace)
        self.health.enter_graceful_shutdown()
        done = self._server.stop(grace)
        done.wait()
        self.servicer.ready.clear()
        self.batcher.stop(timeout=5.0)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        self._stopped.set()
        log_event(logging.INFO, "stopped", event="stopped")

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> ScoringServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _tls_credentials(cert: str, key: str) -> grpc.ServerCredentials:
    """The server's TLS credentials; files that cannot be read, are not PEM, or hold a key that
    does not match the certificate are a ``ServeError`` naming both files (gRPC itself only fails
    to listen, which reads like a port in use)."""
    try:
        key_pem, cert_pem = Path(key).read_bytes(), Path(cert).read_bytes()
    except OSError as e:
        raise ServeError(f"cannot read TLS files {cert} / {key}: {e.strerror}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise ServeError(f"cannot load TLS certificate/key {cert} / {key}: {e.reason or e} "
                         f"(tls_cert: a PEM certificate chain, tls_key: its PEM private key)") from None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def limit_threads(threads: int) -> None:
    """Keep torch / ONNX Runtime / OpenMP at ``threads`` (tail latency grows tenfold otherwise)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    os.environ["ADVSHIELD_THREADS"] = str(threads)  # default intra-op threads of OnnxClassifier
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already ran
        torch.set_num_interop_threads(1)


def build_server(cfg: Any, spec: ServeSpec, token: str | None = None) -> ScoringServer:
    """The defended classifier of pipeline ``cfg`` behind a ScoringServer (not started)."""
    limit_threads(spec.threads)
    clf = DefendedClassifier.from_config(cfg)
    return ScoringServer(clf, spec, model_name=cfg.pipeline.name, token=token)


def serve(cfg: Any, spec: ServeSpec, token: str | None = None) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns the exit status.
    ``spec.workers`` > 1: that many server processes on the one port (``workers.serve_workers``)."""
    if token is None and spec.token_file:
        token = read_token(spec.token_file)
    if spec.workers > 1:
        return serve_workers(cfg.source, spec, token, _worker_main)
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
        log_event(logging.INFO, "ready", event="ready", startup_s=round(time.perf_counter() - t0, 3))
        while not stop.wait(0.5):
            pass
        log_event(logging.INFO, "signal", event="signal", signal=signal.Signals(received[0]).name)
        server.stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def _worker_main(source: str, spec: ServeSpec, token: str | None, index: int, level: int) -> None:
    """One of ``serve.workers``' processes: load the pipeline file, serve until SIGTERM."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only, which forwards one SIGTERM
    setup_json_logging(level)
    log_event(logging.INFO, "worker", event="worker", index=index, pid=os.getpid())
    raise SystemExit(serve(load_pipeline(source), spec, token))
