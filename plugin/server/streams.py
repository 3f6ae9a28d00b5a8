"""A bound on open streaming RPCs (server reflection, health Watch): a gRPC interceptor that
answers RESOURCE_EXHAUSTED beyond ``max_streams``, so idle streams cannot hold the worker threads
(or the server's RPC slots) that unary calls such as ModelInfer and Health.Check need."""

from __future__ import annotations

import logging
import threading

import grpc

from advshield.plugin import protocol as P
from advshield.plugin.server.logs import log_event
from advshield.plugin.server.metrics import Metrics


class StreamLimit(grpc.ServerInterceptor):
    """At most ``limit`` streaming RPCs open at once; a slot is freed when its RPC ends."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
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

        def bounded(request_or_iterator, context, *callback):
            if not self._acquire():
                self.metrics.count(method.rsplit("/", 1)[-1], grpc.StatusCode.RESOURCE_EXHAUSTED)
                log_event(logging.WARNING, "stream refused", event="stream", method=P.clip(method),
                          code="RESOURCE_EXHAUSTED", peer=context.peer())
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"server busy: {self.limit} streams open (max_streams); retry later")
            if not context.add_callback(self._release):  # the RPC has already ended
                self._release()
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
