"""Serving commands: ``serve`` (advshield's gRPC scoring server) and ``score`` (its client)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys

import numpy as np

from advshield.core.errors import AdvshieldError
from advshield.plugin.client import RemoteClassifier
from advshield.plugin.config import load_pipeline
from advshield.plugin.scoring import ImageScore, collect_images, score_files
from advshield.plugin.server import read_token, serve, serve_spec, setup_json_logging

TOKEN_ENV = "ADVSHIELD_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a pipeline over gRPC (KServe v2 protocol, same contract as the Triton ensemble)",
                       description="Settings come from the pipeline's [serve] section; flags override them. "
                                   f"The bearer token: --token, --token-file, ${TOKEN_ENV}, or serve.token_file.")
    p.add_argument("pipeline")
    p.add_argument("--host", default=None, help="listen address (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="gRPC port, 0 = any free port (default: serve.port, 8001)")
    p.add_argument("--max-batch-size", type=int, default=None, help="images per request and per micro-batch")
    p.add_argument("--max-queue-delay-ms", type=float, default=None, help="how long a request waits for a batch")
    p.add_argument("--max-inflight", type=int, default=None, help="requests admitted at once (more: RESOURCE_EXHAUSTED)")
    p.add_argument("--max-streams", type=int, default=None,
                   help="streaming RPCs open at once: reflection, health Watch (more: RESOURCE_EXHAUSTED)")
    p.add_argument("--max-message-bytes", type=int, default=None, help="gRPC message size limit")
    p.add_argument("--request-timeout-s", type=float, default=None, help="deadline of requests that carry none")
    p.add_argument("--grace-s", type=float, default=None, help="shutdown grace period for in-flight requests")
    p.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads per worker (default 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="server processes on the one port, each with its own model (default: serve.workers, 1)")
    p.add_argument("--token", default=None, help="require this bearer token (visible in ps; prefer --token-file)")
    p.add_argument("--token-file", default=None, help="require the bearer token in this file's first line")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus endpoint port; -1 off, 0 any free port")
    p.add_argument("--metrics-host", default=None, help="Prometheus endpoint address (default 127.0.0.1)")
    p.add_argument("--no-request-log", action="store_true", help="log failed requests only")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("score", help="score images on a running advshield or Triton scoring server")
    p.add_argument("images", nargs="+", help="PNG/JPEG files, or folders searched recursively")
    p.add_argument("--url", required=True, help="HOST:PORT of the gRPC endpoint")
    p.add_argument("--model", default=None, help="model name (default: the server's one advshield model)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON lines")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header row")
    p.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--token-file", default=None)
    p.add_argument("--tls", action="store_true", help="connect with TLS (system CAs unless --tls-ca)")
    p.add_argument("--tls-ca", default=None, help="PEM file of the CA that signed the server certificate")
    p.add_argument("--batch-size", type=int, default=None, help="images per request (default: the server's maximum)")
    p.add_argument("--seed", type=int, default=None, help="seed for random defenses (request k uses seed + k)")
    p.add_argument("--top", type=int, default=3, help="probabilities shown per image in the table (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)


def _token(args, spec_token_file: str = "") -> str | None:
    if args.token:
        return args.token
    if args.token_file:
        return read_token(args.token_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    return read_token(spec_token_file) if spec_token_file else None


# --- serve ---------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    cfg = load_pipeline(args.pipeline)
    spec = serve_spec(
        cfg, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms, max_inflight=args.max_inflight, max_streams=args.max_streams,
        max_message_bytes=args.max_message_bytes, request_timeout_s=args.request_timeout_s,
        grace_s=args.grace_s, threads=args.threads, workers=args.workers, tls_cert=args.tls_cert, tls_key=args.tls_key,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        log_requests=False if args.no_request_log else None,
    )
    token = _token(args, spec.token_file)
    setup_json_logging(logging.DEBUG if getattr(args, "verbose", 0) >= 2 else logging.INFO)
    return serve(cfg, spec, token)


# --- score ---------------------------------------------------------------------------------------

class _Writer:
    def __init__(self, mode: str, class_names: tuple[str, ...], detector: bool, top: int) -> None:
        self.mode, self.names, self.detector, self.top = mode, class_names, detector, top
        self.csv = None
        if mode == "csv":
            self.csv = csv.writer(sys.stdout)
            self.csv.writerow(["image", "label", "class", "flagged", "detector_score", "seed", "error",
                               *[f"prob_{n}" for n in class_names]])

    def _class(self, label: int) -> str:
        return self.names[label] if 0 <= label < len(self.names) else "(rejected)"  # -1: detector reject

    def row(self, r: ImageScore) -> None:
        if r.error:
            self._error(r.image, r.error)
        elif self.mode == "json":
            rec = {"image": r.image, "label": r.label, "class": self._class(r.label),
                   "probs": [round(float(p), 6) for p in r.probs]}
            if self.detector:
                rec.update(detector_score=round(r.detector_score, 6), flagged=r.flagged)
            if r.seed is not None:
                rec["seed"] = r.seed
            print(json.dumps(rec))
        elif self.csv is not None:
            self.csv.writerow([r.image, r.label, self._class(r.label), "" if not self.detector else int(r.flagged),
                               "" if not self.detector else f"{r.detector_score:.6f}",
                               "" if r.seed is None else r.seed, "", *[f"{float(p):.6f}" for p in r.probs]])
        else:
            order = np.argsort(-r.probs)[: self.top]
            top = "  ".join(f"{self.names[j]} {r.probs[j]:.3f}" for j in order)
            flag = f"  [{'FLAGGED' if r.flagged else 'ok'} {r.detector_score:.3f}]" if self.detector else ""
            print(f"{r.image:<40} {r.label:>3} {self._class(r.label):<12} {top}{flag}")

    def _error(self, name: str, message: str) -> None:
        if self.mode == "json":
            print(json.dumps({"image": name, "error": message}))
        elif self.csv is not None:
            self.csv.writerow([name, "", "", "", "", "", message, *[""] * len(self.names)])
        else:
            print(f"{name}: error: {message}", file=sys.stderr)


def cmd_score(args) -> int:
    files = collect_images(args.images)
    if args.batch_size is not None and args.batch_size < 1:
        raise AdvshieldError(f"--batch-size must be >= 1, got {args.batch_size}")
    errors = 0
    with RemoteClassifier(args.url, args.model, token=_token(args), ssl=args.tls, root_certificates=args.tls_ca,
                          timeout=args.timeout, batch_size=args.batch_size) as clf:
        writer = _Writer("json" if args.json else "csv" if args.csv else "table", clf.class_names,
                         bool(clf.detector), args.top)
        for record in score_files(clf, files, seed=args.seed, show_progress=not args.quiet):
            errors += bool(record.error)
            writer.row(record)
    return 1 if errors else 0
