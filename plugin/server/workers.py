"""``serve.workers``: N server processes on one port (SO_REUSEPORT; the kernel spreads the
connections over them), each with its own model, batcher and bounds, so that one Python process's
interpreter lock does not cap the server at one core. The parent supervises them: it forwards
SIGTERM/SIGINT once (each worker drains its in-flight requests), and stops the others and exits 1
when one of them dies."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from advshield.plugin.server.logs import log, log_event
from advshield.plugin.server.spec import ServeError, ServeSpec


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (not listening) with SO_REUSEPORT on ``host:port`` (0: a free port): it keeps
    the port for the workers while they start (the kernel hands connections to listening sockets
    only, so it takes none), and is closed when they are stopped."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host.strip("[]"), port))
    except OSError as e:
        s.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror} (port in use?)") from None
    return s, s.getsockname()[1]


def serve_workers(source: Path | None, spec: ServeSpec, token: str | None, target: Callable[..., None]) -> int:
    """Run ``spec.workers`` server processes on one port until SIGTERM/SIGINT; the exit status.
    ``target(source, spec, token, index, log_level)`` runs one worker (a module-level function:
    the workers are spawned)."""
    if source is None:
        raise ServeError("serve.workers > 1 needs a pipeline file (each worker loads it), not a pipeline from a string")
    held, port = _reserve_port(spec.host, spec.port)
    level = log.getEffectiveLevel()  # the workers log as the parent does
    ctx = mp.get_context("spawn")
    procs = []
    for i in range(spec.workers):
        metrics_port = spec.metrics_port + i if spec.metrics_port > 0 else spec.metrics_port
        wspec = replace(spec, workers=1, port=port, reuse_port=True, metrics_port=metrics_port)
        p = ctx.Process(target=target, args=(str(source), wspec, token, i, level), name=f"advshield-worker-{i}")
        p.start()
        procs.append(p)
    log_event(logging.INFO, "workers", event="workers", port=port, workers=spec.workers, pids=[p.pid for p in procs])
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        while not stop.wait(0.5):
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                log_event(logging.ERROR, "worker exited", event="worker_exited",
                          pids=[p.pid for p in dead], codes=[p.exitcode for p in dead])
                status = 1
                break
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + spec.grace_s + 15
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
                status = 1
            elif p.exitcode not in (0, None) and not received:
                status = 1
    finally:
        held.close()
        for s, h in previous.items():
            signal.signal(s, h)
    log_event(logging.INFO, "stopped", event="stopped", workers=spec.workers, status=status)
    return status
