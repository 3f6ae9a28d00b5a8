"""The ``[serve]`` section of the pipeline file, the bearer-token file, and the start-up error."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from advshield.core.errors import AdvshieldError
from advshield.core.validation import check, from_mapping


class ServeError(AdvshieldError):
    """The server cannot start (port in use, unreadable TLS files, ...)."""


@dataclass(frozen=True)
class ServeSpec:
    """``[serve]`` of the pipeline file; every field can be overridden on the command line."""

    host: str = "127.0.0.1"
    port: int = 8001  # 0: any free port (logged)
    max_batch_size: int = 64  # images per request and per micro-batch
    max_queue_delay_ms: float = 2.0  # how long the oldest queued request waits for company
    max_inflight: int = 64  # ModelInfer requests admitted at once; beyond: RESOURCE_EXHAUSTED
    max_streams: int = 16  # streaming RPCs open at once (reflection, health Watch); beyond: RESOURCE_EXHAUSTED
    stream_idle_s: float = 60.0  # a reflection stream with no client message this long is closed (0: never)
    stream_max_age_s: float = 3600.0  # any stream (health Watch too) open this long is closed (0: never)
    connection_idle_s: float = 300.0  # a connection with no RPC this long is closed (0: never)
    max_message_bytes: int = 32 << 20  # gRPC receive/send limit
    request_timeout_s: float = 30.0  # deadline of a request whose client sets none
    grace_s: float = 10.0  # shutdown: how long in-flight requests may take to finish
    threads: int = 1  # torch / ONNX Runtime / OpenMP threads inside the server (each worker)
    workers: int = 1  # server processes on the one port (SO_REUSEPORT), each with its own model
    reuse_port: bool = False  # share the port with other processes (set for each of serve.workers)
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
        check(1 <= self.max_streams <= 1000, f"serve.max_streams: must be within [1, 1000], got {self.max_streams}")
        check(self.stream_idle_s >= 0, f"serve.stream_idle_s: must be >= 0 (0: never), got {self.stream_idle_s}")
        check(self.stream_max_age_s >= 0, f"serve.stream_max_age_s: must be >= 0 (0: never), got {self.stream_max_age_s}")
        check(self.connection_idle_s >= 0, f"serve.connection_idle_s: must be >= 0 (0: never), got {self.connection_idle_s}")
        check(self.max_message_bytes >= 1024, f"serve.max_message_bytes: must be >= 1024, got {self.max_message_bytes}")
        check(self.request_timeout_s > 0, f"serve.request_timeout_s: must be > 0, got {self.request_timeout_s}")
        check(self.grace_s >= 0, f"serve.grace_s: must be >= 0, got {self.grace_s}")
        check(1 <= self.threads <= 64, f"serve.threads: must be within [1, 64], got {self.threads}")
        check(1 <= self.workers <= 64, f"serve.workers: must be within [1, 64], got {self.workers}")
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
    """The bearer token: the first line of the file at ``path``, stripped."""
    try:
        lines = Path(path).read_text().strip().splitlines()
    except OSError as e:
        raise ServeError(f"cannot read the token file {path}: {e.strerror}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise ServeError(f"token file {path} is empty")
    return token
