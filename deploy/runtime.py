"""What the generated Triton Python-backend models run: batch functions with no Triton import.

The ``model.py`` adapters in ``deploy/python_models/`` only turn Triton requests into the
arguments below and the results back into responses; everything that decides a number lives
here and is the same code the in-process ``DefendedClassifier`` runs (``load_defenses``,
``load_detector``, ``decode_image``, ``validate_batch``, ``l1_scores``), so it is tested
without a server too. Each model reads its own ``pipeline.toml`` (written by
``advshield.deploy.triton``) next to its ``model.py``:

* ``Preprocess``: one request's ``IMAGE`` (BYTES [n, 1]) or ``PIXELS`` (FP32 [n, C, H, W]) ->
  validated float32 pixels (``parse``); then for all requests of an ``execute`` call, the
  image-layer defenses and the detector's squeezers (``run``): one batch for a deterministic
  pipeline, one seeded batch per request for a random one (the request's ``seed`` parameter,
  else a fresh one), exactly as ``DefendedClassifier.predict(x, seed)``.
* ``FeatureStep``: the feature-layer defenses at one cut of the model (head -> here -> tail).
* ``OnnxStep``: an ONNX (segment) model on ONNX Runtime, for servers without the onnxruntime
  backend.
* ``Postprocess``: logits of the defended batch and of each squeezed copy -> PROBS, LABEL,
  DETECTOR_SCORE, FLAGGED as the advshield wire contract (``advshield.plugin.protocol``) has them.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advshield.core.errors import ConfigError, ImageError, InputError
from advshield.plugin import protocol as P

# names of the tensors between the generated models (the public ones are in plugin.protocol)
DEFENDED = "DEFENDED"
SQUEEZED = "SQUEEZED_{}"  # one per detector squeezer, 1-based
FEATURE = "FEATURE"
LOGITS = "LOGITS"
LOGITS_SQUEEZED = "LOGITS_SQUEEZED_{}"


class RequestError(InputError):
    """One request is invalid; its response carries this message and the others go on."""


def _torch(threads: int):
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch


def check_stub_numpy(pb_utils) -> None:
    """Refuse to load in a Python backend stub that garbles tensors: a stub compiled with a pybind11
    older than numpy 2 (Triton 2.51, the nvidia-pytriton wheel) hands back zeros or empty arrays
    for tensors it builds, and crashes on BYTES inputs, when numpy 2 is imported. Probe: a tensor
    made by the stub from DLPack must read back equal through numpy."""
    torch = _torch(0)
    probe = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    back = np.asarray(pb_utils.Tensor.from_dlpack("probe", torch.utils.dlpack.to_dlpack(probe)).as_numpy())
    if back.shape != (2, 3) or not np.array_equal(back, probe.numpy()):
        raise RuntimeError(
            f"this Triton Python backend stub cannot exchange tensors with numpy {np.__version__} (it reads "
            f"{back.ravel().tolist()} back for {probe.ravel().tolist()}): run the stub with numpy < 2 "
            f"(`advshield deploy triton-env` for the nvidia-pytriton wheel; `pip install 'numpy<2'` in a container)")


def parse_seed(params: Mapping[str, Any] | str | None) -> int | None:
    """The ``seed`` request parameter (Triton hands parameters over as a JSON string), checked as
    ``advshield serve`` checks it (``protocol.parse_seed``); a bad one is a ``RequestError``."""
    try:
        if isinstance(params, str):
            params = json.loads(params or "{}")
    except ValueError:
        raise RequestError("request parameters are not a JSON object") from None
    if not isinstance(params, Mapping) or P.PARAM_SEED not in params:
        return None
    try:
        return P.parse_seed(params[P.PARAM_SEED])
    except P.ParameterError as e:
        raise RequestError(str(e)) from None


def new_seed() -> int:
    """A fresh seed for a random pipeline's request that carries none."""
    return int.from_bytes(os.urandom(8), "little") % (2**62)


@dataclass
class Job:
    """One request's validated pixels and its seed (None: deterministic, or drawn later)."""

    x: np.ndarray  # float32 [n, C, H, W]
    seed: int | None = None


class Preprocess:
    """Decode/validate, image-layer defenses, detector squeezers. ``device``: torch device string."""

    def __init__(self, pipeline: str | Path, *, device: str = "cpu", threads: int = 1) -> None:
        from advshield.defenses.registry import build_detector
        from advshield.plugin.config import load_pipeline
        from advshield.plugin.pipeline import load_defenses

        self.torch = _torch(threads)
        self.cfg = load_pipeline(pipeline)
        self.spec = self.cfg.input
        self.shape = self.cfg.input.shape
        self.device = self.torch.device(device)
        self.defenses = load_defenses(self.cfg)
        bad = [d.name for d in self.defenses if getattr(d.config, "layer", "image") not in ("image", "")]
        if bad:
            raise ConfigError(f"preprocess: feature-layer defenses {bad} belong to the features models")
        self.squeezers = []
        if self.cfg.detector is not None:
            detector = build_detector(self.cfg.detector.type, self.cfg.detector.config)
            self.squeezers = list(getattr(detector, "squeezers", []))
        self.random = any(d.random for d in self.defenses)
        self.served = served_model(pipeline) if self.cfg.served_model else None

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """Defended pixels as the served model takes them (normalization, layout, datatype:
        ``plugin.served.to_model_input``); as they are for advshield's own classifier."""
        if self.served is None:
            return x
        from advshield.plugin.served import to_model_input

        return to_model_input(x, self.cfg.model, self.served)

    @property
    def outputs(self) -> list[str]:
        return [DEFENDED] + [SQUEEZED.format(i + 1) for i in range(len(self.squeezers))]

    def parse(self, image: np.ndarray | None, pixels: np.ndarray | None, params: Any = None) -> Job:
        """One request's inputs -> ``Job``; a ``RequestError`` naming the tensor and image index."""
        from advshield.plugin.classifiers import validate_batch
        from advshield.plugin.decode import decode_images

        if (image is None) == (pixels is None):
            got = [n for n, t in ((P.INPUT_IMAGE, image), (P.INPUT_PIXELS, pixels)) if t is not None]
            raise RequestError(f"send one input per request, either {P.INPUT_IMAGE} or {P.INPUT_PIXELS}, got {got}")
        seed = parse_seed(params)
        if image is not None:
            items = [bytes(d) if isinstance(d, bytes | bytearray) else d for d in np.asarray(image, dtype=object).reshape(-1)]
            try:  # every header first, then the request's pixel budget, then the pixels
                x = decode_images(items, self.spec, P.INPUT_IMAGE)
            except ImageError as e:
                raise RequestError(str(e)) from None
        else:
            x = np.asarray(pixels)
            try:
                validate_batch(x, self.shape, what=P.INPUT_PIXELS)
            except InputError as e:
                raise RequestError(str(e)) from None
            x = np.ascontiguousarray(x, np.float32)
        if len(x) == 0:
            raise RequestError("empty batch")
        return Job(x, seed)

    def _defend(self, x: np.ndarray, seed: int | None) -> list[np.ndarray]:
        torch = self.torch
        t = torch.from_numpy(x).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for d in self.defenses:
                t = d(t, g)
            outs = [t] + [s(t, None) for s in self.squeezers]
        return [self.to_model(o.float().cpu().numpy()) for o in outs]

    def run(self, jobs: Sequence[Job]) -> list[list[np.ndarray]]:
        """Per job: [defended, squeezed_1, ..., squeezed_S]. Deterministic pipelines run all jobs as
        one batch; random ones one batch per job with its seed (drawn now when it has none)."""
        if not jobs:
            return []
        if self.random:
            out = []
            for job in jobs:
                if job.seed is None:
                    job.seed = new_seed()
                out.append(self._defend(job.x, job.seed))
            return out
        sizes = [len(j.x) for j in jobs]
        x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
        outs = self._defend(x, None)
        bounds = np.cumsum([0, *sizes])
        return [[o[a:b] for o in outs] for a, b in itertools.pairwise(bounds)]


class FeatureStep:
    """The feature-layer defenses at one cut (every ``[[defenses]]`` of this model's pipeline.toml)."""

    def __init__(self, pipeline: str | Path, *, device: str = "cpu", threads: int = 1) -> None:
        from advshield.plugin.config import load_pipeline
        from advshield.plugin.pipeline import load_defenses

        self.torch = _torch(threads)
        self.cfg = load_pipeline(pipeline)
        self.device = self.torch.device(device)
        self.defenses = load_defenses(self.cfg)
        if not self.defenses:
            raise ConfigError(f"{pipeline}: a features model needs at least one defense")

    def run(self, h: np.ndarray) -> np.ndarray:
        torch = self.torch
        t = torch.from_numpy(np.ascontiguousarray(h, np.float32)).to(self.device)
        with torch.no_grad():
            for d in self.defenses:
                t = d(t, None)  # as SplitClassifier.forward called by DefendedClassifier: no generator
        return t.float().cpu().numpy()


class OnnxStep:
    """An ONNX model on ONNX Runtime (CUDA provider when ``gpu`` and present), one input, one output."""

    def __init__(self, path: str | Path, *, threads: int = 1, gpu: bool = False) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        first = self.session.get_inputs()[0].shape[0]
        self.batch = first if isinstance(first, int) and first > 0 else None  # a fixed-batch export
        from advshield.plugin.classifiers import pad_numpy, run_in_chunks

        self._chunks, self._pad = run_in_chunks, pad_numpy

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run(self, x: np.ndarray) -> np.ndarray:
        """One call; a fixed-batch model in chunks of its batch (the last one zero-padded), as the
        in-process classifier runs it."""
        return self._chunks(self._run, np.ascontiguousarray(x, np.float32), self.batch, np.concatenate, self._pad)


class Postprocess:
    """Softmax, argmax, detector score and flag (label -1 for flagged images when ``reject``)."""

    def __init__(self, pipeline: str | Path, *, threads: int = 1) -> None:
        from advshield.plugin.config import load_pipeline
        from advshield.plugin.pipeline import load_detector

        self.torch = _torch(threads)
        self.cfg = load_pipeline(pipeline)
        self.detector = load_detector(self.cfg)
        self.squeezers = len(getattr(self.detector, "squeezers", [])) if self.detector is not None else 0
        # a served model's scores become logits here (plugin.served.to_logits); advshield's own
        # classifier answers logits already (the wrapped graph)
        self.output = self.cfg.model.output if self.cfg.served_model else "logits"

    @property
    def inputs(self) -> list[str]:
        return [LOGITS] + [LOGITS_SQUEEZED.format(i + 1) for i in range(self.squeezers)]

    def run(self, logits: np.ndarray, squeezed: Sequence[np.ndarray] = ()) -> dict[str, np.ndarray]:
        torch = self.torch
        if len(squeezed) != self.squeezers:
            raise ValueError(f"postprocess: {self.squeezers} squeezed logits expected, got {len(squeezed)}")
        if self.output != "logits":
            from advshield.plugin.served import to_logits

            logits, squeezed = to_logits(logits, self.output), [to_logits(s, self.output) for s in squeezed]
        n = len(logits)
        z = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
        probs = torch.softmax(z.float(), dim=1)
        labels = probs.argmax(1).numpy().astype(np.int64)
        score = np.zeros(n, np.float32)
        flagged = np.zeros(n, bool)
        if self.detector is not None:
            from advshield.defenses.detector import l1_scores

            stacked = torch.from_numpy(np.concatenate([logits, *squeezed]).astype(np.float32, copy=False))
            s = l1_scores(torch.softmax(stacked.float(), dim=-1), n)
            flagged = self.detector.flag(s).numpy().astype(bool)
            score = s.float().numpy()
            if self.detector.config.reject:
                labels[flagged] = -1
        return {
            P.OUTPUT_PROBS: probs.numpy().astype(np.float32),
            P.OUTPUT_LABEL: labels.reshape(n, 1),
            P.OUTPUT_SCORE: score.reshape(n, 1).astype(np.float32),
            P.OUTPUT_FLAGGED: flagged.reshape(n, 1),
        }


SERVED_JSON = "served.json"  # next to a generated model's pipeline.toml: the served model it feeds


def served_model(pipeline: str | Path):
    """The ``plugin.served.ServedModel`` that ``deploy triton`` checked and wrote as served.json
    next to this model's pipeline.toml."""
    from advshield.plugin.served import served_from_dict

    path = Path(pipeline).with_name(SERVED_JSON)
    try:
        return served_from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: cannot read the served model's description ({e})") from None


def split_rows(arrays: Mapping[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut every array of a batch result back into per-request pieces of ``sizes`` rows."""
    bounds = np.cumsum([0, *sizes])
    return [{k: v[a:b] for k, v in arrays.items()} for a, b in itertools.pairwise(bounds)]


def run_isolated(fn, jobs: Sequence[Job]) -> list[Any]:
    """``fn(jobs)`` for the whole batch; if it raises, each job alone, so that the one request
    a defense cannot process gets the error and the others their results. Returns per job the
    result or the exception."""
    try:
        return list(fn(jobs))
    except Exception as e:
        if len(jobs) == 1:
            return [e]
    out: list[Any] = []
    for job in jobs:
        try:
            out.append(fn([job])[0])
        except Exception as e:
            out.append(e)
    return out
