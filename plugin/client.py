"""advshield's client for a live scoring endpoint: advshield's own gRPC server or the generated
Triton ensemble (same wire contract, ``advshield.plugin.protocol``), over ``tritonclient.grpc``.

* ``RemoteClassifier``: satisfies the Classifier protocol (``input_shape``, ``num_classes``,
  ``__call__(x) -> logits``). It sends ``PIXELS`` and returns **log-probabilities** of the
  defended pipeline, i.e. logits up to a per-row constant (softmax, argmax and margin losses see
  the same thing). No gradients: the server is a black box; a white-box attack needs the twin.
* ``RemoteClassifier.predict`` / ``predict_bytes``: the same ``Prediction`` as the in-process
  ``DefendedClassifier.predict`` (labels, probs, detector score/flag, seed): this is how the audit
  and certification re-score through a live server, and how black-box attacks query it.
* Manners towards a production endpoint: ``rate`` (images per second, a token bucket over all
  requests), ``concurrency`` (requests in flight at once), ``retries`` of a request answered
  UNAVAILABLE (exponential back-off from ``backoff`` seconds), a deadline per request
  (``timeout``). ``stats()`` gives what was achieved: images, requests, retries, seconds waited
  for the rate limit, images per second.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from advshield.core.errors import ConfigError, InputError
from advshield.plugin import protocol as P
from advshield.plugin.classifiers import validate_batch
from advshield.plugin.endpoint import Endpoint, RateLimit, RemoteError

__all__ = ["Endpoint", "RateLimit", "RemoteClassifier", "RemoteError", "parse_target", "serving_parity"]
from advshield.plugin.pipeline import Prediction


class RemoteClassifier(Endpoint):
    """A defended pipeline behind a KServe v2 gRPC endpoint ``url`` (``host:port``).

    ``model``: the served model's name; default: the one ready model with the advshield wire
    contract (input IMAGE, outputs PROBS and FLAGGED). ``token``: bearer token. ``ssl`` /
    ``root_certificates``: TLS (a PEM file of the CA that signed the server's certificate).
    ``timeout``: seconds per request (its deadline). ``batch_size``: images per request (default:
    the server's max_batch_size). ``rate``, ``concurrency``, ``retries``, ``backoff``: see the
    module docstring.
    """

    def __init__(self, url: str, model: str | None = None, *, token: str | None = None, ssl: bool = False,
                 root_certificates: str | None = None, timeout: float = 30.0, batch_size: int | None = None,
                 rate: float = 0.0, concurrency: int = 1, retries: int = 3, backoff: float = 0.25) -> None:
        super().__init__(url, token=token, ssl=ssl, root_certificates=root_certificates, timeout=timeout, rate=rate,
                         concurrency=concurrency, retries=retries, backoff=backoff)
        self.model_name = model or self._discover()
        meta = self._call(self.client.get_model_metadata, self.model_name, as_json=True)
        config = self._call(self.client.get_model_config, self.model_name, as_json=True)["config"]
        tensors = {t["name"]: t for t in meta.get("inputs", []) + meta.get("outputs", [])}
        missing = [n for n in (P.INPUT_PIXELS, *P.OUTPUTS) if n not in tensors]
        if missing:
            raise RemoteError(f"model {self.model_name!r} at {url} lacks the advshield tensors {missing}", "NOT_FOUND")
        c, h, w = (int(d) for d in tensors[P.INPUT_PIXELS]["shape"][1:])
        self.input_shape = (c, h, w)
        self.num_classes = int(tensors[P.OUTPUT_PROBS]["shape"][-1])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        names = json.loads(params.get(P.CONFIG_CLASS_NAMES) or "[]")
        self.class_names = tuple(names) if len(names) == self.num_classes else tuple(map(str, range(self.num_classes)))
        self.detector = params.get(P.CONFIG_DETECTOR, "")
        self.random = params.get(P.CONFIG_RANDOM, "false") == "true"
        # the Triton ensemble does not batch (max_batch_size 0) and gives its limit as a parameter
        self.max_batch_size = int(config.get("max_batch_size", 0) or 0) or int(params.get(P.CONFIG_MAX_BATCH) or 0) or 64
        self.batch_size = min(batch_size or self.max_batch_size, self.max_batch_size)

    def _discover(self) -> str:
        index = self._call(self.client.get_model_repository_index, as_json=True).get("models", [])
        found = []
        for m in index:
            if m.get("state", "READY") != "READY":
                continue
            meta = self._call(self.client.get_model_metadata, m["name"], as_json=True)
            names = {t["name"] for t in meta.get("inputs", []) + meta.get("outputs", [])}
            if {P.INPUT_IMAGE, P.OUTPUT_PROBS, P.OUTPUT_FLAGGED} <= names:
                found.append(m["name"])
        if len(found) != 1:
            raise RemoteError(f"{self.url}: {'no' if not found else 'several'} ready advshield models "
                              f"({', '.join(found) or 'none'}); name one with model=...", "NOT_FOUND")
        return found[0]

    def _infer(self, name: str, datatype: str, data: np.ndarray, seed: int | None) -> tuple[dict[str, np.ndarray], int | None]:
        inp = self._grpc.InferInput(name, list(data.shape), datatype)
        inp.set_data_from_numpy(data)
        outputs = [self._grpc.InferRequestedOutput(n) for n in P.OUTPUTS]
        params = {P.PARAM_SEED: int(seed)} if seed is not None else None
        res = self.send(self.model_name, [inp], outputs, images=len(data), parameters=params)
        arrays = {n: res.as_numpy(n) for n in P.OUTPUTS}
        resp = res.get_response()
        used = int(resp.parameters[P.PARAM_SEED].int64_param) if P.PARAM_SEED in resp.parameters else None
        return arrays, used

    def _gather(self, chunks: list[tuple[str, str, np.ndarray]], seed: int | None) -> Prediction:
        t0 = time.perf_counter()
        jobs = [(name, datatype, data, None if seed is None else (seed + k) % P.SEED_LIMIT)
                for k, (name, datatype, data) in enumerate(chunks)]
        done = self.map(lambda j: self._infer(*j), jobs)
        parts = [a for a, _ in done]
        seeds = [u for _, u in done]
        self._busy += time.perf_counter() - t0
        probs = np.concatenate([p[P.OUTPUT_PROBS] for p in parts]).astype(np.float32)
        labels = np.concatenate([p[P.OUTPUT_LABEL] for p in parts]).reshape(-1).astype(np.int64)
        score = flagged = None
        if self.detector:
            score = np.concatenate([p[P.OUTPUT_SCORE] for p in parts]).reshape(-1).astype(np.float32)
            flagged = np.concatenate([p[P.OUTPUT_FLAGGED] for p in parts]).reshape(-1).astype(bool)
        return Prediction(labels, probs, score, flagged, seed=seeds[0] if seeds else None)

    # --- public API ---
    def predict(self, x: torch.Tensor | np.ndarray, seed: int | None = None) -> Prediction:
        """Score pixels (float32 NCHW in [0, 1]). Batches larger than ``batch_size`` go out as
        several requests; with ``seed``, request k uses ``seed + k`` (one request: exactly
        ``seed``, reproducing ``DefendedClassifier.predict(x, seed)`` of a random pipeline)."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        validate_batch(arr, self.input_shape)
        arr = np.ascontiguousarray(arr, np.float32)
        chunks = [(P.INPUT_PIXELS, "FP32", arr[i : i + self.batch_size]) for i in range(0, len(arr), self.batch_size)]
        return self._gather(chunks, seed)

    def predict_bytes(self, images: list[bytes], seed: int | None = None) -> Prediction:
        """Score encoded PNG/JPEG images (decoded by the server with the pipeline's input spec)."""
        if not images:
            raise InputError("predict_bytes: no images")
        chunks = []
        for i in range(0, len(images), self.batch_size):
            part = images[i : i + self.batch_size]
            data = np.empty((len(part), 1), dtype=np.object_)
            for j, b in enumerate(part):
                data[j, 0] = bytes(b)
            chunks.append((P.INPUT_IMAGE, "BYTES", data))
        return self._gather(chunks, seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, K] (float32, on x's device): logits up to a per-row constant."""
        pred = self.predict(x)
        logp = np.log(np.maximum(pred.probs, np.finfo(np.float32).tiny))
        return torch.from_numpy(logp).to(x.device if isinstance(x, torch.Tensor) else "cpu")

    def __repr__(self) -> str:
        return f"RemoteClassifier({self.url}, model={self.model_name!r})"


def parse_target(url: str) -> tuple[str, str | None]:
    """grpc://HOST:PORT[/MODEL] -> (HOST:PORT, MODEL or None)."""
    rest = url.removeprefix("grpc://")
    if "://" in rest:
        raise ConfigError(f"--target: only grpc:// URLs are supported, got {url!r}")
    hostport, _, model = rest.partition("/")
    if ":" not in hostport:
        raise ConfigError(f"--target: expected grpc://HOST:PORT[/MODEL], got {url!r}")
    return hostport, model or None


def serving_parity(reference: Any, remote: Any, x: torch.Tensor, seed: int | None = None) -> dict[str, Any]:
    """Score ``x`` in process (``DefendedClassifier``) and through a live endpoint
    (``RemoteClassifier``) with the same seed: max |probability difference|, label and flag
    agreement. A random pipeline is compared with one request (``remote.batch_size`` >= len(x))."""
    a = reference.predict(x, seed=seed)
    b = remote.predict(x, seed=seed)
    out = {"images": len(a), "max_abs_prob_diff": float(np.abs(a.probs - b.probs).max()),
           "label_agreement": float((a.labels == b.labels).mean())}
    if a.score is not None and b.score is not None:
        out["max_abs_score_diff"] = float(np.abs(a.score - b.score).max())
        out["flag_agreement"] = float((a.flagged == b.flagged).mean())
    return out
