"""The server's Prometheus metrics."""

from __future__ import annotations

import grpc
import prometheus_client as prom


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
