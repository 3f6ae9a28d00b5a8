"""Micro-batching: a single batcher thread joins the queued requests (each decoded and validated
in its own handler thread already) into one classifier call of at most ``max_batch_size`` images,
waiting at most ``max_queue_delay_ms`` after the oldest one arrived."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from advshield.plugin import protocol as P
from advshield.plugin.server.logs import log
from advshield.plugin.server.metrics import Metrics


class RpcStatus(Exception):
    """An RPC outcome other than OK, with the message the client sees."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Job:
    """One ModelInfer request waiting for its batch; the handler thread waits on ``future``."""

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

    def submit(self, job: Job) -> futures.Future:
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
                job.future.set_exception(RpcStatus(grpc.StatusCode.UNAVAILABLE, "server is shutting down"))

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the handler gave up (deadline) before we got to it
            if now >= job.deadline:
                job.future.set_exception(RpcStatus(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                    "deadline exceeded while queued for a batch"))
                continue
            self.metrics.queue_delay.observe(now - job.enqueued)
            live.append(job)
        if not live:
            return
        groups = [[j] for j in live] if self.random else [live]
        for group in groups:
            self._predict_group(group)

    def _predict_group(self, group: list[Job]) -> None:
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
