"""Serving commands: ``serve`` (advshield's gRPC scoring server) and ``score`` (its client)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

from advshield.errors import AdvshieldError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
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
    p.add_argument("--max-message-bytes", type=int, default=None, help="gRPC message size limit")
    p.add_argument("--request-timeout-s", type=float, default=None, help="deadline of requests that carry none")
    p.add_argument("--grace-s", type=float, default=None, help="shutdown grace period for in-flight requests")
    p.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime threads (default 1)")
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
    from advshield.plugin.server import read_token

    if args.token:
        return args.token
    if args.token_file:
        return read_token(args.token_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    return read_token(spec_token_file) if spec_token_file else None


# --- serve ---------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from advshield.plugin.config import load_pipeline
    from advshield.plugin.server import serve, serve_spec, setup_json_logging

    cfg = load_pipeline(args.pipeline)
    spec = serve_spec(
        cfg, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
        max_queue_delay_ms=args.max_queue_delay_ms, max_inflight=args.max_inflight,
        max_message_bytes=args.max_message_bytes, request_timeout_s=args.request_timeout_s,
        grace_s=args.grace_s, threads=args.threads, tls_cert=args.tls_cert, tls_key=args.tls_key,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
        log_requests=False if args.no_request_log else None,
    )
    token = _token(args, spec.token_file)
    setup_json_logging(logging.DEBUG if getattr(args, "verbose", 0) >= 2 else logging.INFO)
    return serve(cfg, spec, token)


# --- score ---------------------------------------------------------------------------------------

def collect_images(items: list[str]) -> list[Path]:
    """Files as given (any suffix), folders searched recursively for PNG/JPEG files."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise AdvshieldError(f"no PNG or JPEG files in folder {p}")
            out.extend(found)
        else:
            out.append(p)
    return out


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

    def row(self, name: str, label: int, probs, score, flagged, seed) -> None:
        import numpy as np

        if self.mode == "json":
            rec = {"image": name, "label": label, "class": self._class(label),
                   "probs": [round(float(p), 6) for p in probs]}
            if self.detector:
                rec.update(detector_score=round(float(score), 6), flagged=bool(flagged))
            if seed is not None:
                rec["seed"] = seed
            print(json.dumps(rec))
        elif self.csv is not None:
            self.csv.writerow([name, label, self._class(label), "" if not self.detector else int(bool(flagged)),
                               "" if not self.detector else f"{float(score):.6f}", "" if seed is None else seed, "",
                               *[f"{float(p):.6f}" for p in probs]])
        else:
            order = np.argsort(-probs)[: self.top]
            top = "  ".join(f"{self.names[j]} {probs[j]:.3f}" for j in order)
            flag = f"  [{'FLAGGED' if flagged else 'ok'} {float(score):.3f}]" if self.detector else ""
            print(f"{name:<40} {label:>3} {self._class(label):<12} {top}{flag}")

    def error(self, name: str, message: str) -> None:
        if self.mode == "json":
            print(json.dumps({"image": name, "error": message}))
        elif self.csv is not None:
            self.csv.writerow([name, "", "", "", "", "", message, *[""] * len(self.names)])
        else:
            print(f"{name}: error: {message}", file=sys.stderr)


def cmd_score(args) -> int:
    from tqdm import tqdm

    from advshield.plugin.client import RemoteClassifier, RemoteError

    files = collect_images(args.images)
    if args.batch_size is not None and args.batch_size < 1:
        raise AdvshieldError(f"--batch-size must be >= 1, got {args.batch_size}")
    with RemoteClassifier(args.url, args.model, token=_token(args), ssl=args.tls, root_certificates=args.tls_ca,
                          timeout=args.timeout, batch_size=args.batch_size) as clf:
        writer = _Writer("json" if args.json else "csv" if args.csv else "table", clf.class_names,
                         bool(clf.detector), args.top)
        errors = 0
        bar = tqdm(total=len(files), unit="img", file=sys.stderr, disable=args.quiet or len(files) <= clf.batch_size)
        for k, start in enumerate(range(0, len(files), clf.batch_size)):
            chunk, datas = [], []
            for f in files[start : start + clf.batch_size]:
                try:
                    datas.append(f.read_bytes())
                    chunk.append(str(f))
                except OSError as e:
                    errors += 1
                    writer.error(str(f), f"cannot read file: {e.strerror}")
            seed = None if args.seed is None else args.seed + k
            try:
                results = [clf.predict_bytes(datas, seed)] if datas else []
                names = [chunk]
            except RemoteError as e:
                if e.code != "INVALID_ARGUMENT":
                    raise
                results, names = [], []  # one bad image fails its request: find it, score the rest
                for name, data in zip(chunk, datas):
                    try:
                        results.append(clf.predict_bytes([data], seed))
                        names.append([name])
                    except RemoteError as e1:
                        if e1.code != "INVALID_ARGUMENT":
                            raise
                        errors += 1
                        writer.error(name, e1.detail.removeprefix("IMAGE[0]: "))
            for pred, group in zip(results, names):
                for i, name in enumerate(group):
                    writer.row(name, int(pred.labels[i]), pred.probs[i],
                               None if pred.score is None else pred.score[i],
                               None if pred.flagged is None else pred.flagged[i], pred.seed)
            bar.update(len(files[start : start + clf.batch_size]))
        bar.close()
    return 1 if errors else 0
