"""advshield's own gRPC scoring server: the KServe v2 protocol subset clients use, in front of a
``DefendedClassifier``, hardened against bad input and load.

* ``GRPCInferenceService`` (tritonclient's generated stubs): ServerLive, ServerReady, ModelReady,
  ServerMetadata, ModelMetadata, ModelConfig, RepositoryIndex, ModelInfer (``servicer``). The
  wire contract (tensor names, shapes, parameters) is ``advshield.plugin.protocol``.
* ``grpc.health.v1.Health`` (SERVING until shutdown starts) and server reflection
  (``scoring_server``).
* Micro-batching (``batcher``): each request's images are decoded and validated in its own
  handler thread, so a bad request fails alone before it can reach a batch; a single batcher
  thread then joins the queued requests into one classifier call of at most ``max_batch_size``
  images, waiting at most ``max_queue_delay_ms`` after the oldest one arrived.
* Load: a bound on in-flight ModelInfer requests (RESOURCE_EXHAUSTED beyond it), per-request
  deadlines (the client's, else ``request_timeout_s``), a message size limit.
* Optional bearer-token authentication (``auth``: UNAUTHENTICATED; the health service stays open
  for probes) and TLS; graceful shutdown on SIGTERM/SIGINT finishes in-flight requests.
* Structured JSON logs (``logs``: one line per request) and Prometheus metrics (``metrics``) on a
  separate HTTP port. Settings: the pipeline's ``[serve]`` section (``spec``).
"""

from advshield.plugin.server.auth import TokenAuth
from advshield.plugin.server.batcher import Batcher
from advshield.plugin.server.logs import JsonFormatter, setup_json_logging
from advshield.plugin.server.metrics import Metrics
from advshield.plugin.server.scoring_server import ScoringServer, build_server, limit_threads, serve
from advshield.plugin.server.servicer import InferenceServicer
from advshield.plugin.server.spec import ServeError, ServeSpec, read_token, serve_spec

__all__ = [
    "Batcher",
    "InferenceServicer",
    "JsonFormatter",
    "Metrics",
    "ScoringServer",
    "ServeError",
    "ServeSpec",
    "TokenAuth",
    "build_server",
    "limit_threads",
    "read_token",
    "serve",
    "serve_spec",
    "setup_json_logging",
]
