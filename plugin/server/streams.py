"""Bounds on streaming RPCs (server reflection, health Watch): a gRPC interceptor that answers
RESOURCE_EXHAUSTED beyond ``max_streams``, so idle streams cannot hold the worker threads (or the
server's RPC slots) that unary calls such as ModelInfer and Health.Check need, and that closes a
stream whose client has sent nothing for ``idle_s`` seconds (reflection) or that has been open for
``max_age_s`` seconds (any stream, health Watch included), so no client holds a slot for ever."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from advshield.plugin import protocol as P
from advshield.plugin.server.logs import log_event
from advshield.plugin.server.metrics import Metrics


class _Deadline:
    """A timer that cancels the RPC when it fires; re-armed and disarmed by the stream's owner."""

    def __init__(self, context: grpc.ServicerContext, method: str, reason: str, metrics: Metrics) -> None:
        self.context, self.method, self.reason, self.metrics = context, method, reason, metrics
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def arm(self, seconds: float) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(seconds, self._fire, args=(seconds,))
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _fire(self, seconds: float) -> None:
        self.metrics.count(self.method.rsplit("/", 1)[-1], grpc.StatusCode.CANCELLED)
        log_event(logging.WARNING, "stream closed", event="stream", method=P.clip(self.method),
                  reason=f"{self.reason} ({seconds:g} s)", peer=self.context.peer())
        self.context.cancel()


class _IdleRequests:
    """The request iterator of a client-streaming RPC, with the idle timer armed while the server
    waits for the client's next message."""

    def __init__(self, requests: Iterator[Any], timer: _Deadline, idle_s: float) -> None:
        self._requests, self._timer, self._idle_s = requests, timer, idle_s

    def __iter__(self) -> _IdleRequests:
        return self

    def __next__(self) -> Any:
        self._timer.arm(self._idle_s)
        try:
            return next(self._requests)
        finally:
            self._timer.disarm()


class StreamLimit(grpc.ServerInterceptor):
    """At most ``limit`` streaming RPCs open at once; a slot is freed when its RPC ends. A
    client-streaming RPC is cancelled after ``idle_s`` seconds without a message from its client,
    and every streaming RPC after ``max_age_s`` seconds open (0: no limit)."""

    def __init__(self, limit: int, metrics: Metrics, idle_s: float = 0.0, max_age_s: float = 0.0) -> None:
        self.limit = limit
        self.metrics = metrics
        self.idle_s = idle_s
        self.max_age_s = max_age_s
        self._open = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return self._open

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        else:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        method = handler_call_details.method
        request_streaming = handler.request_streaming

        def bounded(request_or_iterator, context, *callback):
            if not self._acquire():
                self.metrics.count(method.rsplit("/", 1)[-1], grpc.StatusCode.RESOURCE_EXHAUSTED)
                log_event(logging.WARNING, "stream refused", event="stream", method=P.clip(method),
                          code="RESOURCE_EXHAUSTED", peer=context.peer())
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server busy: {self.limit} streams open (max_streams); retry later")
            timers: list[_Deadline] = []
            if self.max_age_s > 0:
                age = _Deadline(context, method, "open longer than serve.stream_max_age_s", self.metrics)
                age.arm(self.max_age_s)
                timers.append(age)
            if request_streaming and self.idle_s > 0:
                idle = _Deadline(context, method, "no message within serve.stream_idle_s", self.metrics)
                timers.append(idle)
                request_or_iterator = _IdleRequests(request_or_iterator, idle, self.idle_s)

            def ended() -> None:
                for t in timers:
                    t.disarm()
                self._release()

            if not context.add_callback(ended):  # the RPC has already ended
                ended()
            return behavior(request_or_iterator, context, *callback)

        # a non-blocking handler (health Watch) answers through a callback and holds no thread
        if getattr(behavior, "experimental_non_blocking", False):
            bounded.experimental_non_blocking = True  # type: ignore[attr-defined]
        return factory(bounded, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _acquire(self) -> bool:
        with self._lock:
            if self._open >= self.limit:
                return False
            self._open += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._open -= 1
