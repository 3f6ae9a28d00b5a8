"""Bearer-token authentication: a gRPC interceptor that answers UNAUTHENTICATED without the token.
Liveness and readiness stay open for probes (Kubernetes, tritonclient's ``is_server_live``): the
grpc health service and KServe's ServerLive and ServerReady, which name nothing; model metadata,
model readiness, inference and reflection need the token."""

from __future__ import annotations

import hmac
import logging

import grpc

from advshield.plugin import protocol as P
from advshield.plugin.server.logs import log_event
from advshield.plugin.server.metrics import Metrics


class TokenAuth(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except the probes' (see the module)."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
    OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})

    def __init__(self, token: str, metrics: Metrics) -> None:
        self._expected = f"Bearer {token}".encode()
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.OPEN_PREFIXES) or method in self.OPEN_METHODS:
            return continuation(handler_call_details)
        got = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == P.AUTH_HEADER:
                got = value if isinstance(value, str) else value.decode("latin-1")
        if hmac.compare_digest(got.encode("utf-8", "replace"), self._expected):
            return continuation(handler_call_details)
        reason = "missing 'authorization: Bearer <token>' metadata" if not got else "invalid bearer token"
        handler = continuation(handler_call_details)
        # the label and the log carry only what the client cannot grow: known methods by name
        label = method.rsplit("/", 1)[-1] if handler is not None else "unknown"
        self.metrics.count(label or "unknown", grpc.StatusCode.UNAUTHENTICATED)
        log_event(logging.WARNING, "unauthenticated", event="auth", method=P.clip(method), error=reason)
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
