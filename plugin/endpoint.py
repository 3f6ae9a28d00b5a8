"""The transport to a KServe v2 gRPC endpoint (Triton or ``advshield serve``), over ``tritonclient.grpc``.

``Endpoint`` holds one channel reused by every request and the manners a client owes a production
endpoint: a deadline per request, a token bucket over images, a bound on requests in flight,
retries of UNAVAILABLE with exponential back-off, and counts of what it sent. Two clients build on
it: ``advshield.plugin.client.RemoteClassifier`` (the advshield wire contract) and
``advshield.plugin.served.ServedClassifier`` (a classifier Triton already serves).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self

from advshield.core.errors import AdvshieldError, ConfigError
from advshield.plugin import protocol as P


class RemoteError(AdvshieldError):
    """The scoring server answered an error or cannot be reached; ``code`` is the gRPC status
    name (e.g. ``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``)."""

    def __init__(self, message: str, code: str = "UNKNOWN", detail: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail or message  # the server's own message


def _status_name(e: Exception) -> str:
    status = e.status() if hasattr(e, "status") else None
    return str(status).removeprefix("StatusCode.") if status else "UNKNOWN"


def _message(e: Exception) -> str:
    msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return str(msg)


class RateLimit:
    """A token bucket: ``acquire(n)`` blocks until n images may go out at ``rate`` images per
    second. It starts empty (a new client never bursts) and saves at most one second's worth
    while idle (or n, when one request is larger); rate 0: no limit."""

    def __init__(self, rate: float = 0.0) -> None:
        if rate < 0:
            raise ConfigError(f"rate limit: must be >= 0 images per second (0: no limit), got {rate}")
        self.rate = float(rate)
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds spent waiting for tokens

    def acquire(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:  # one waiter at a time keeps the order fair
            now = time.monotonic()
            cap = max(self.rate, float(n))
            self._tokens = min(cap, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens < n:
                wait = (n - self._tokens) / self.rate
                time.sleep(wait)
                self.waited += wait
                self._tokens = float(n)
                self._stamp = time.monotonic()
            self._tokens -= n


class Endpoint:
    """A KServe v2 gRPC endpoint ``url`` (``host:port``), with the manners of the module docstring:
    one ``tritonclient`` channel reused by every request, a deadline per request (``timeout``), a
    token bucket (``rate``), ``concurrency`` requests in flight (``map``), ``retries`` of UNAVAILABLE
    with exponential back-off from ``backoff`` seconds, and counts (``stats``). ``RemoteClassifier``
    (the advshield wire contract) and ``advshield.plugin.served.ServedClassifier`` (a model Triton
    already serves, whatever its tensors) both talk through it."""

    def __init__(self, url: str, *, token: str | None = None, ssl: bool = False, root_certificates: str | None = None,
                 timeout: float = 30.0, rate: float = 0.0, concurrency: int = 1, retries: int = 3,
                 backoff: float = 0.25) -> None:
        import tritonclient.grpc as grpcclient

        if concurrency < 1:
            raise ConfigError(f"concurrency: must be >= 1 requests in flight, got {concurrency}")
        if retries < 0 or backoff < 0:
            raise ConfigError(f"retries and backoff: must be >= 0, got {retries} and {backoff}")
        self.url = url
        self.timeout = float(timeout)
        self.limit = RateLimit(rate)
        self.concurrency = int(concurrency)
        self.retries, self.backoff = int(retries), float(backoff)
        self._counts = {"images": 0, "requests": 0, "retries": 0}
        self._busy = 0.0  # seconds inside predict calls
        self._count_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.headers = {P.AUTH_HEADER: f"Bearer {token}"} if token else None
        ssl = ssl or root_certificates is not None
        try:
            self.client = grpcclient.InferenceServerClient(url, ssl=ssl, root_certificates=root_certificates)
        except Exception as e:
            raise RemoteError(f"cannot connect to {url}: {_message(e)}", "UNAVAILABLE") from None
        self._grpc = grpcclient
        live = self._call(self.client.is_server_live, client_timeout=min(self.timeout, 10.0))
        if not live:
            raise RemoteError(f"the server at {url} reports it is not live", "UNAVAILABLE")

    # --- transport ---
    def _call(self, fn, *args, **kwargs):
        kwargs.setdefault("client_timeout", self.timeout)
        try:
            return fn(*args, headers=self.headers, **kwargs)
        except self._grpc.InferenceServerException as e:
            code, msg = _status_name(e), _message(e)
            if code == "UNAVAILABLE" and "shutting down" not in msg:
                raise RemoteError(f"cannot reach the scoring server at {self.url}: {msg} "
                                  f"(is `advshield serve` or Triton running there?)", code) from None
            raise RemoteError(f"{self.url}: {code}: {msg}", code, msg) from None

    def send(self, model: str, inputs: list[Any], outputs: list[Any], *, images: int, version: str = "",
             parameters: dict[str, Any] | None = None) -> Any:
        """One ModelInfer after the rate limit's ``images`` tokens, retried on UNAVAILABLE."""
        self.limit.acquire(images)
        for attempt in range(self.retries + 1):
            try:
                res = self._call(self.client.infer, model, inputs, model_version=version, outputs=outputs,
                                 parameters=parameters)
                break
            except RemoteError as e:
                if e.code != "UNAVAILABLE" or attempt == self.retries:
                    raise
                with self._count_lock:
                    self._counts["retries"] += 1
                time.sleep(self.backoff * 2**attempt)
        with self._count_lock:
            self._counts["images"] += images
            self._counts["requests"] += 1
        return res

    def map(self, fn, jobs: list[Any]) -> list[Any]:
        """``fn`` over ``jobs``, at most ``concurrency`` at once (in order)."""
        if self.concurrency > 1 and len(jobs) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="advshield-client")
            return list(self._pool.map(fn, jobs))
        return [fn(j) for j in jobs]

    def stats(self) -> dict[str, Any]:
        """What this client sent: images, requests, retries on UNAVAILABLE, seconds waited for the
        rate limit, seconds in predict calls and the achieved images per second over them."""
        with self._count_lock:
            out: dict[str, Any] = dict(self._counts)
        out.update({"rate_limit": self.limit.rate, "concurrency": self.concurrency,
                    "rate_limit_wait_seconds": round(self.limit.waited, 3), "seconds": round(self._busy, 3),
                    "images_per_second": out["images"] / self._busy if self._busy > 0 else None})
        return out

    def add_stats(self, other: dict[str, Any]) -> None:
        """Count another client's requests (``stats()`` of a shard's client, ``attacks/distributed.py``)
        as this one's, so the audit's totals include every shard."""
        with self._count_lock:
            for key in self._counts:
                self._counts[key] += int(other.get(key, 0))
            self._busy += float(other.get("seconds", 0.0))
        self.limit.waited += float(other.get("rate_limit_wait_seconds", 0.0))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
