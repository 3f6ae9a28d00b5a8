"""The wire contract (``advshield.plugin.protocol``), held against both servers with the same cases:
``advshield serve`` in a subprocess and the generated Triton ensemble on the real tritonserver (the
nvidia-pytriton wheel's, as in tests/test_triton.py), both on loopback free ports, both serving one
small random pipeline (the reference CNN behind Gaussian noise, ``max_batch_size = 8``).

Every case runs unchanged against each server and yields an *outcome*: the status code, or for an
answer ``OK`` (after the contract's checks: names, datatypes, shapes, raw lengths, label = argmax,
probabilities = the in-process pipeline's for the request's seed) possibly with what it shows
(``OK: 1 row``). ``AGREED`` holds the outcome both servers give, with patterns both error
messages match; ``DIFFERENCES`` what each server gives where they still differ, and why. Both
tables are asserted, nothing is skipped: when either server's behaviour changes, this file fails.
docs/deploy.md ("Where advshield serve and Triton differ") lists ``DIFFERENCES``; a test keeps the
two in step.
"""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from server_helpers import call, image_tensor, raw_request, start_server, stub
from tritonclient.grpc import service_pb2

from advshield.deploy.triton import generate_repository, serve_repository
from advshield.plugin import protocol as P
from advshield.plugin.config import load_pipeline
from advshield.plugin.decode import decode_image, encode_png
from advshield.plugin.pipeline import DefendedClassifier

MODEL = "conformance"
MAX_BATCH = 8
DOCS = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
SERVERS = ("advshield", "triton")

PIPELINE = """
[pipeline]
name = "conformance"

[model]
path = "{model}"

[input]
channels = 1
height = 28
width = 28
resize = "exact"

[[defenses]]
type = "gaussian_noise"
sigma = 0.05

[serve]
max_batch_size = 8
max_queue_delay_ms = 1.0

[deploy]
max_batch_size = 8
max_queue_delay_us = 1000
"""

BAD, NF = "INVALID_ARGUMENT", "NOT_FOUND"
SEED = r"'seed'"

# case -> (the outcome of both servers, patterns that both error messages match)
AGREED: dict[str, tuple[str, tuple[str, ...]]] = {
    # good requests: outputs, shapes, dtypes and numbers
    "IMAGE, 2 PNGs, seed 6": ("OK", ()),
    "IMAGE, a JPEG, seed 6": ("OK", ()),
    "PIXELS, 3 images, seed 5": ("OK", ()),
    "PIXELS in contents.fp32_contents": ("OK", ()),
    "IMAGE in contents.bytes_contents": ("OK", ()),
    "max_batch_size images": ("OK", ()),
    "one output": ("OK", ()),
    "outputs in the request's order": ("OK", ()),
    "an output asked for twice comes once": ("OK", ()),
    "request id echoed": ("OK", ()),
    # the seed parameter
    "seed as a string of digits": ("OK", ()),
    "seed of 19 zeros": ("OK", ()),
    "seed 2**63 - 1": ("OK", ()),
    "seed 'abc'": (BAD, (SEED,)),
    "seed -3": (BAD, (SEED,)),
    "seed superscript two": (BAD, (SEED,)),
    "seed in Arabic-Indic digits": (BAD, (SEED,)),
    "seed of 5,000 digits": (BAD, (SEED, r"5000 characters")),
    "seed of 20 digits": (BAD, (SEED,)),
    "seed 2**63 as a string": (BAD, (SEED,)),
    "seed ''": (BAD, (SEED,)),
    "seed true (bool)": (BAD, (SEED,)),
    "seed 1.5 (double)": (BAD, (SEED,)),
    "seed as uint64": (BAD, (SEED,)),
    # other parameters
    "unknown int64 parameter": ("OK", ()),
    "unknown uint64 parameter": (BAD, (r"'colour'",)),
    "timeout 0": ("OK", ()),
    "negative timeout": ("OK", ()),
    "timeout as a double": (BAD, (r"'timeout'",)),
    # model name and version
    "version ''": ("OK", ()),
    "version '1'": ("OK", ()),
    "version '01'": ("OK", ()),
    "version '2'": (NF, (r"version '?2\b",)),
    "version '0'": (NF, (r"version '?0\b",)),
    "version 'abc'": (BAD, (r"version.*'abc'",)),
    "version '-1'": (BAD, (r"version.*'-1'",)),
    "unknown model": (NF, (r"'nope'",)),
    "empty model name": (NF, (r"model.*''",)),
    # batch dimension and limits
    "max_batch_size + 1 images": (BAD, (r"batch.*\b8\b",)),
    "max_batch_size + 1 pixel images": (BAD, (r"batch.*\b8\b",)),
    "IMAGE empty batch": (BAD, (r"IMAGE",)),
    "PIXELS empty batch": (BAD, (r"PIXELS",)),
    "PIXELS negative batch": (BAD, (r"PIXELS",)),
    "PIXELS batch 2**31, one image's bytes": (BAD, (r"'PIXELS'",)),
    "IMAGE batch 2**31, one image": (BAD, (r"'IMAGE'",)),
    "PIXELS batch 2**63 - 1, one image's bytes": (BAD, (r"'PIXELS'",)),
    # Triton keeps a batching model's batch size in 32 bits; the public model is not batching
    # (max_batch_size 0), so Triton checks the full shape against the bytes before any model runs
    "PIXELS batch 2**32 + 1, one image's bytes": (BAD, (r"'PIXELS'",)),
    "IMAGE batch 2**32 + 1, one image": (BAD, (r"'IMAGE'",)),
    "PIXELS batch 2**32, one image's bytes": (BAD, (r"'PIXELS'",)),
    "PIXELS batch 2**40, one image's bytes": (BAD, (r"'PIXELS'",)),
    # datatypes and shapes
    "PIXELS as FP64": (BAD, (r"'PIXELS'.*FP64",)),
    "PIXELS as 'fp32'": (BAD, (r"'PIXELS'",)),
    "IMAGE as FP32": (BAD, (r"'IMAGE'.*FP32",)),
    "200 KB datatype": (BAD, (r"'PIXELS'",)),
    "PIXELS with 3 channels": (BAD, (r"'PIXELS'.*\[1, ?3, ?28, ?28\]",)),
    "PIXELS with 5 dimensions": (BAD, (r"'PIXELS'",)),
    "IMAGE without its [N, 1] shape": (BAD, (r"'IMAGE'.*\[1\]",)),
    "IMAGE of shape [1, 2]": (BAD, (r"'IMAGE'.*\[1, ?2\]",)),
    "PIXELS 4 bytes short": (BAD, (r"'PIXELS'.*6272.*6268",)),
    "PIXELS an image too long": (BAD, (r"'PIXELS'.*3136.*6272",)),
    "fp32_contents too short": (BAD, (r"'PIXELS'",)),
    "bytes_contents count differs from the shape": (BAD, (r"'IMAGE'",)),
    "raw_input_contents and contents together": (BAD, (r"'PIXELS'", r"contents")),
    # tensor names
    "unknown input": (BAD, (r"'INPUT__0'",)),
    "missing input": (BAD, (r"input",)),
    "both inputs": (BAD, (r"either IMAGE or PIXELS",)),
    "the same input twice": (BAD, (r"'PIXELS'",)),
    "unknown output": (BAD, (r"'LOGITS'",)),
    # BYTES layout and images (decoded by the same code on both servers)
    "IMAGE count larger than the raw content": (BAD, (r"IMAGE",)),
    "IMAGE trailing bytes": (BAD, (r"IMAGE",)),
    "IMAGE length prefix lies": (BAD, (r"IMAGE",)),
    "corrupt PNG": (BAD, (r"IMAGE\[0\]: corrupt",)),
    "not an image": (BAD, (r"IMAGE\[0\]: not a PNG or JPEG image",)),
    "empty image": (BAD, (r"IMAGE\[0\]: empty input",)),
    "truncated PNG": (BAD, (r"IMAGE\[0\]: truncated PNG",)),
    "JPEG scan cut, end marker appended": (BAD, (r"IMAGE\[0\]: truncated JPEG",)),
    "wrong image size": (BAD, (r"IMAGE\[0\]: wrong size: expected 28x28",)),
    "5000x5000 PNG": (BAD, (r"IMAGE\[0\]: image too large: 5000x5000",)),
    "a bad image among good ones": (BAD, (r"IMAGE\[1\]: not a PNG",)),
    "PIXELS out of [0, 1]": (BAD, (r"PIXELS: pixels must lie in \[0, 1\]",)),
    "PIXELS NaN": (BAD, (r"PIXELS: contains NaN",)),
    # the other RPCs
    "ServerLive and ServerReady": ("OK", ()),
    "grpc health": ("SERVING", ()),
    "ModelReady": ("'': True, '1': True, '01': True, '2': False, 'nope': False", ()),
    "ModelReady version 'abc'": (BAD, (r"'abc'",)),
    "ModelMetadata": ("OK", ()),
    "ModelMetadata version '01'": ("OK", ()),
    "ModelMetadata version '2'": (NF, (r"version '?2\b",)),
    "ModelMetadata version 'abc'": (BAD, (r"version.*'abc'",)),
    "ModelMetadata unknown model": (NF, (r"'nope'",)),
    "ModelConfig": ("OK", ()),
    "ModelConfig unknown model": (NF, (r"'nope'",)),
}

STOL = ("Triton reads a version with std::stol (leading spaces and a sign skipped, trailing characters "
        "ignored); advshield serve takes ASCII digits only")
CLIP = ("Triton copies the name into its error message uncapped, and gRPC refuses error metadata over "
        "16 KiB; advshield serve clips client strings to 64 characters")

# case -> (advshield serve's outcome, Triton's outcome, why they differ); docs/deploy.md has this table
DIFFERENCES: dict[str, tuple[str, str, str]] = {
    "two raw contents for one input": (
        BAD, "OK", "Triton reads raw_input_contents by input index and ignores the extra one; advshield serve "
                   "refuses bytes no input accounts for"),
    "timeout 1 us": (
        "DEADLINE_EXCEEDED", "OK",
        "advshield serve takes `timeout` as the request's deadline; Triton applies it only in a dynamic "
        "batcher queue policy with allow_timeout_override, which the generated models leave off"),
    "34 MB message": (
        "RESOURCE_EXHAUSTED", BAD,
        "advshield serve caps gRPC messages at serve.max_message_bytes (32 MiB); Triton's gRPC accepts up to "
        "2 GiB, so the image reaches the preprocess model, which refuses it as over input.max_bytes"),
    "version '1.0'": (BAD, "OK", STOL),
    "version ' 1'": (BAD, "OK", STOL),
    "version of 30 digits": (NF, BAD, "Triton refuses a version beyond int64 as malformed; advshield serve "
                                      "reads any ASCII digits as a version it lacks"),
    "200 KB input name": (BAD, "RESOURCE_EXHAUSTED", CLIP),
    "200 KB output name": (BAD, "RESOURCE_EXHAUSTED", CLIP),
    "200 KB model name": (NF, "RESOURCE_EXHAUSTED", CLIP),
    "200 KB version": (NF, "RESOURCE_EXHAUSTED", CLIP),
    "outputs when none are named": (
        "OK: PROBS, LABEL, DETECTOR_SCORE, FLAGGED", "OK: FLAGGED, DETECTOR_SCORE, LABEL, PROBS",
        "the order is not part of the contract (clients look outputs up by name); each server has its own"),
    "response parameter seed": (
        "OK: the seed it drew", "OK: none",
        "the Python backend of Triton 2.51 cannot attach response parameters; send `seed` to make a random "
        "request reproducible on both"),
    "output parameter classification": (
        "OK: PROBS FP32 [1, 10]", "OK: PROBS BYTES [3]",
        "Triton's classification extension turns PROBS into the top-k 'score:index:label' strings, over the "
        "whole tensor since the public model is not batching (max_batch_size 0: no 32-bit batch wrap); "
        "advshield serve does not implement it and ignores the parameter: take the top-k from PROBS"),
    "ModelMetadata platform": (
        P.PLATFORM, "ensemble", "each server names what serves the model; the tensors are the same"),
    "ServerMetadata name": ("advshield", "triton", "each server names itself"),
    "RepositoryIndex": (
        "conformance", "conformance, conformance__classifier, conformance__postprocess, conformance__preprocess",
        "Triton lists the ensemble's steps too (internal models a client should not call)"),
    "ModelStatistics": ("UNIMPLEMENTED", "OK",
                        "advshield serve exports its statistics as Prometheus metrics (--metrics-port) instead"),
    "ModelStreamInfer": ("UNIMPLEMENTED", "OK", "advshield serve has no streaming inference; use ModelInfer"),
}


# --- fixtures ------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str  # "advshield" or "triton"
    url: str
    channel: grpc.Channel
    stub: Any


@dataclass
class Req:
    """One ModelInfer case: the request, and the images and seed it carries (None: unknown), so an
    OK answer can be held to the in-process pipeline."""

    request: service_pb2.ModelInferRequest
    x: np.ndarray | None = None
    seed: int | None = None


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, model_path) -> Path:
    path = tmp_path_factory.mktemp("conformance") / "conformance.toml"
    path.write_text(PIPELINE.format(model=model_path.as_posix()))
    return path


@pytest.fixture(scope="module")
def reference(pipeline) -> DefendedClassifier:
    return DefendedClassifier.from_config(pipeline)


@pytest.fixture(scope="module", params=SERVERS)
def target(request, pipeline, tmp_path_factory):
    """One server per module and parameter: ``advshield serve`` (subprocess) or the generated
    ensemble on the wheel's tritonserver; stopped by PID afterwards, with exit status 0."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "advshield":
        srv = start_server(pipeline, folder / "serve.log")
        url, stop, log = srv.url, srv.stop, lambda: srv.log_path.read_text()
    else:
        repo = generate_repository(pipeline, folder / "models", classifier_backend="python")
        triton = serve_repository(repo, log_path=folder / "tritonserver.log", threads=1)
        url, stop, log = triton.url, triton.stop, triton.log
    ch, s = stub(url)
    try:
        yield Target(request.param, url, ch, s)
    finally:
        ch.close()
        code = stop()
    assert code == 0, f"{request.param} exited with {code}:\n{log()[-4000:]}"


def _pixels(x: np.ndarray, shape: list[int] | None = None, datatype: str = "FP32"):
    return [(P.INPUT_PIXELS, datatype, shape or list(x.shape), x.tobytes())]


def _image(items: list[bytes], shape: list[int] | None = None):
    return [(P.INPUT_IMAGE, "BYTES", shape or [len(items), 1], image_tensor(items))]


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def requests(fashion_test, pipeline) -> dict[str, Req]:
    x = fashion_test.as_float(0, 9)
    one = x[:1]
    pngs = [encode_png(a) for a in x]
    buf = io.BytesIO()
    Image.fromarray((x[0, 0] * 255).round().astype(np.uint8)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    spec = load_pipeline(pipeline).input
    M = MODEL

    def r(inputs, x_=None, seed=None, *, params=None, **kw) -> Req:
        p = dict(params or {})
        if seed is not None:
            p.setdefault(P.PARAM_SEED, seed)
        return Req(raw_request(kw.pop("model", M), inputs, parameters=p, **kw), x_, seed)

    def seeded(x_, seed: int, **kw) -> Req:
        return r(_pixels(x_), x_, seed, **kw)

    def edit(req: Req, fn: Callable[[service_pb2.ModelInferRequest], None]) -> Req:
        fn(req.request)
        return req

    def contents(name: str, datatype: str, shape: list[int], fill: Callable) -> Req:
        req = service_pb2.ModelInferRequest(model_name=M)
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        fill(t.contents)
        req.parameters[P.PARAM_SEED].int64_param = 3
        return Req(req, one, 3)  # pngs[0] encodes one

    def uint64(key: str, value: int) -> Callable:
        return lambda q: q.parameters[key].MergeFrom(service_pb2.InferParameter(uint64_param=value))

    cases: dict[str, Req] = {
        "IMAGE, 2 PNGs, seed 6": r(_image(pngs[:2]), x[:2], 6),
        "IMAGE, a JPEG, seed 6": r(_image([jpeg]), decode_image(jpeg, spec)[None], 6),
        "PIXELS, 3 images, seed 5": seeded(x[:3], 5),
        "PIXELS in contents.fp32_contents": contents(P.INPUT_PIXELS, "FP32", [1, 1, 28, 28],
                                                     lambda c: c.fp32_contents.extend(one.ravel().tolist())),
        "IMAGE in contents.bytes_contents": contents(P.INPUT_IMAGE, "BYTES", [1, 1],
                                                     lambda c: c.bytes_contents.append(pngs[0])),
        "max_batch_size images": r(_image(pngs[:MAX_BATCH]), x[:MAX_BATCH], 8),
        "one output": seeded(x[:2], 1, outputs=[P.OUTPUT_LABEL]),
        "outputs in the request's order": seeded(one, 1, outputs=[P.OUTPUT_FLAGGED, P.OUTPUT_PROBS]),
        "an output asked for twice comes once": seeded(one, 1, outputs=[P.OUTPUT_LABEL, P.OUTPUT_PROBS,
                                                                        P.OUTPUT_LABEL]),
        "request id echoed": edit(seeded(one, 1), lambda q: setattr(q, "id", "request-17")),
        "seed as a string of digits": r(_pixels(one), one, params={P.PARAM_SEED: "42"}),
        "seed of 19 zeros": r(_pixels(one), one, params={P.PARAM_SEED: "0" * 19}),
        "seed 2**63 - 1": seeded(one, 2**63 - 1),
        "seed 'abc'": r(_pixels(one), params={P.PARAM_SEED: "abc"}),
        "seed -3": r(_pixels(one), params={P.PARAM_SEED: -3}),
        "seed superscript two": r(_pixels(one), params={P.PARAM_SEED: "\u00b2"}),
        "seed in Arabic-Indic digits": r(_pixels(one), params={P.PARAM_SEED: "\u0661\u0662"}),
        "seed of 5,000 digits": r(_pixels(one), params={P.PARAM_SEED: "9" * 5000}),
        "seed of 20 digits": r(_pixels(one), params={P.PARAM_SEED: "0" * 20}),
        "seed 2**63 as a string": r(_pixels(one), params={P.PARAM_SEED: str(2**63)}),
        "seed ''": r(_pixels(one), params={P.PARAM_SEED: ""}),
        "seed true (bool)": r(_pixels(one), params={P.PARAM_SEED: True}),
        "seed 1.5 (double)": r(_pixels(one), params={P.PARAM_SEED: 1.5}),
        "seed as uint64": edit(r(_pixels(one)), uint64(P.PARAM_SEED, 9)),
        "unknown int64 parameter": seeded(one, 1, params={"colour": 3}),
        "unknown uint64 parameter": edit(seeded(one, 1), uint64("colour", 3)),
        "timeout 0": seeded(one, 1, params={"timeout": 0}),
        "negative timeout": seeded(one, 1, params={"timeout": -5}),
        "timeout as a double": seeded(one, 1, params={"timeout": 1.5}),
        "timeout 1 us": seeded(one, 1, params={"timeout": 1}),
        "version ''": seeded(one, 1, version=""),
        "version '1'": seeded(one, 1, version="1"),
        "version '01'": seeded(one, 1, version="01"),
        "version '2'": seeded(one, 1, version="2"),
        "version '0'": seeded(one, 1, version="0"),
        "version 'abc'": seeded(one, 1, version="abc"),
        "version '-1'": seeded(one, 1, version="-1"),
        "version '1.0'": seeded(one, 1, version="1.0"),
        "version ' 1'": seeded(one, 1, version=" 1"),
        "version of 30 digits": seeded(one, 1, version="9" * 30),
        "unknown model": seeded(one, 1, model="nope"),
        "empty model name": seeded(one, 1, model=""),
        "max_batch_size + 1 images": r(_image(pngs[:MAX_BATCH + 1])),
        "max_batch_size + 1 pixel images": r(_pixels(x[:MAX_BATCH + 1])),
        "IMAGE empty batch": r(_image([], [0, 1])),
        "PIXELS empty batch": r([(P.INPUT_PIXELS, "FP32", [0, 1, 28, 28], b"")]),
        "PIXELS negative batch": r(_pixels(one, [-1, 1, 28, 28])),
        "PIXELS batch 2**31, one image's bytes": r(_pixels(one, [2**31, 1, 28, 28])),
        "IMAGE batch 2**31, one image": r(_image(pngs[:1], [2**31, 1])),
        "PIXELS batch 2**63 - 1, one image's bytes": r(_pixels(one, [2**63 - 1, 1, 28, 28])),
        "PIXELS batch 2**32 + 1, one image's bytes": r(_pixels(one, [2**32 + 1, 1, 28, 28]), one, 2),
        "IMAGE batch 2**32 + 1, one image": r(_image(pngs[:1], [2**32 + 1, 1]), one, 2),
        "PIXELS batch 2**32, one image's bytes": r(_pixels(one, [2**32, 1, 28, 28]), one, 2),
        "PIXELS batch 2**40, one image's bytes": r(_pixels(one, [2**40, 1, 28, 28]), one, 2),
        "PIXELS as FP64": r(_pixels(one.astype(np.float64), datatype="FP64")),
        "PIXELS as 'fp32'": r(_pixels(one, datatype="fp32")),
        "IMAGE as FP32": r([(P.INPUT_IMAGE, "FP32", [1, 1], b"\0" * 4)]),
        "200 KB datatype": r(_pixels(one, datatype="D" * 200_000)),
        "PIXELS with 3 channels": r(_pixels(np.zeros((1, 3, 28, 28), np.float32))),
        "PIXELS with 5 dimensions": r(_pixels(one, [1, 1, 1, 28, 28])),
        "IMAGE without its [N, 1] shape": r(_image(pngs[:1], [1])),
        "IMAGE of shape [1, 2]": r(_image(pngs[:2], [1, 2])),
        "PIXELS 4 bytes short": r([(P.INPUT_PIXELS, "FP32", [2, 1, 28, 28], x[:2].tobytes()[:-4])]),
        "PIXELS an image too long": r([(P.INPUT_PIXELS, "FP32", [1, 1, 28, 28], x[:2].tobytes())]),
        "fp32_contents too short": contents(P.INPUT_PIXELS, "FP32", [1, 1, 28, 28],
                                            lambda c: c.fp32_contents.extend([0.5] * 10)),
        "bytes_contents count differs from the shape": contents(P.INPUT_IMAGE, "BYTES", [1, 1],
                                                                lambda c: c.bytes_contents.extend(pngs[:2])),
        "raw_input_contents and contents together": edit(
            seeded(one, 1), lambda q: q.inputs[0].contents.fp32_contents.extend(one.ravel().tolist())),
        "two raw contents for one input": edit(seeded(one, 1), lambda q: q.raw_input_contents.append(b"zz")),
        "unknown input": r([("INPUT__0", "FP32", [1, 1, 28, 28], one.tobytes())]),
        "missing input": r([]),
        "both inputs": r([*_image(pngs[:1]), *_pixels(one)]),
        "the same input twice": r([*_pixels(one), *_pixels(one)]),
        "unknown output": seeded(one, 1, outputs=["LOGITS"]),
        "200 KB input name": r([("I" * 200_000, "FP32", [1, 1, 28, 28], one.tobytes())]),
        "200 KB output name": seeded(one, 1, outputs=["O" * 200_000]),
        "200 KB model name": seeded(one, 1, model="M" * 200_000),
        "200 KB version": seeded(one, 1, version="7" * 200_000),
        "34 MB message": r(_image([b"\x89PNG\r\n\x1a\n" + b"\0" * (34 << 20)])),
        "IMAGE count larger than the raw content": r(_image(pngs[:2], [3, 1])),
        "IMAGE trailing bytes": r([(P.INPUT_IMAGE, "BYTES", [1, 1], image_tensor(pngs[:1]) + b"xx")]),
        "IMAGE length prefix lies": r([(P.INPUT_IMAGE, "BYTES", [1, 1], b"\xff\xff\xff\x7f" + pngs[0])]),
        "corrupt PNG": r(_image([b"\x89PNG\r\n\x1a\n" + b"garbage" * 10])),
        "not an image": r(_image([b"hello world"])),
        "empty image": r(_image([b""])),
        "truncated PNG": r(_image([pngs[0][: len(pngs[0]) // 2]])),
        "JPEG scan cut, end marker appended": r(_image([jpeg[: len(jpeg) * 2 // 3] + b"\xff\xd9"])),
        "wrong image size": r(_image([_png((32, 32))])),
        "5000x5000 PNG": r(_image([_png((5000, 5000))])),
        "a bad image among good ones": r(_image([pngs[0], b"junk", pngs[1]])),
        "PIXELS out of [0, 1]": r(_pixels(one * 2 + 0.5)),
        "PIXELS NaN": r(_pixels(np.full((1, 1, 28, 28), np.nan, np.float32))),
        "outputs when none are named": seeded(one, 1),
        "response parameter seed": r(_pixels(x[:2]), x[:2]),
        "output parameter classification": edit(
            seeded(one, 1), lambda q: q.outputs.add(name=P.OUTPUT_PROBS).parameters["classification"].MergeFrom(
                service_pb2.InferParameter(int64_param=3))),
    }
    return cases


# --- outcomes ------------------------------------------------------------------------------------

DIMS = {t.name: (t.datatype, t.dims) for t in P.output_tensors(10)}


def _arrays(resp) -> dict[str, np.ndarray]:
    """The response's outputs, each checked against the contract's datatype, dims and raw length;
    per-image outputs come back with their batch dimension unless Triton lost it."""
    assert len(resp.raw_output_contents) == len(resp.outputs), "one raw content per output"
    out = {}
    for t, raw in zip(resp.outputs, resp.raw_output_contents):
        datatype, dims = DIMS[t.name]
        assert t.datatype == datatype, f"{t.name}: datatype {t.datatype}, the contract says {datatype}"
        shape = list(t.shape)
        assert shape[-len(dims):] == list(dims) and len(shape) in (len(dims), len(dims) + 1), (t.name, shape)
        dtype = P.DATATYPES[datatype][0]
        assert len(raw) == math.prod(shape) * dtype.itemsize, f"{t.name}: {len(raw)} bytes for shape {shape}"
        out[t.name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return out


def _check_ok(case: str, req: Req, resp, reference: DefendedClassifier) -> str:
    """The contract's checks on an OK answer; returns "OK", "OK: N rows" or "OK: no batch dimension"."""
    request = req.request
    assert resp.model_name == MODEL and resp.model_version == P.MODEL_VERSION, (resp.model_name, resp.model_version)
    assert resp.id == request.id
    asked = list(dict.fromkeys(o.name for o in request.outputs))
    names = [t.name for t in resp.outputs]
    if asked:
        assert names == asked, f"outputs {names}, asked for {asked}"
    else:
        assert sorted(names) == sorted(P.OUTPUTS), names
    out = _arrays(resp)
    batched = {len(out[n].shape) == len(DIMS[n][1]) + 1 for n in out}
    assert len(batched) == 1, {n: a.shape for n, a in out.items()}
    with_batch = batched.pop()
    if not with_batch:
        out = {n: a[None] for n, a in out.items()}
    rows = {len(a) for a in out.values()}
    assert len(rows) == 1, {n: a.shape for n, a in out.items()}
    n = rows.pop()
    if not with_batch:
        outcome = "OK: no batch dimension"
    elif n != request.inputs[0].shape[0]:
        outcome = f"OK: {n} row{'s' if n != 1 else ''}"
    else:
        outcome = "OK"
    if P.OUTPUT_PROBS in out:
        probs = out[P.OUTPUT_PROBS]
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        if P.OUTPUT_LABEL in out:
            np.testing.assert_array_equal(out[P.OUTPUT_LABEL].ravel(), probs.argmax(1))
        seed = req.seed if req.seed is not None else _seed_param(request)
        if req.x is not None and seed is not None:
            expected = reference.predict(torch.from_numpy(req.x[:n]), seed=seed)
            np.testing.assert_allclose(probs, expected.probs, rtol=0, atol=1e-5,
                                       err_msg=f"{case}: PROBS differ from the in-process pipeline's (seed {seed})")
    if P.OUTPUT_SCORE in out:  # no detector in this pipeline
        assert not out[P.OUTPUT_SCORE].any()
    if P.OUTPUT_FLAGGED in out:
        assert not out[P.OUTPUT_FLAGGED].any()
    return outcome


def _seed_param(request) -> int | None:
    if P.PARAM_SEED not in request.parameters:
        return None
    p = request.parameters[P.PARAM_SEED]
    value = getattr(p, p.WhichOneof("parameter_choice"))
    return P.parse_seed(value)


def _order(case, req, resp, reference) -> str:
    _check_ok(case, req, resp, reference)
    return "OK: " + ", ".join(t.name for t in resp.outputs)


def _returned_seed(case, req, resp, reference) -> str:
    _check_ok(case, req, resp, reference)
    if P.PARAM_SEED not in resp.parameters:
        return "OK: none"
    seed = resp.parameters[P.PARAM_SEED].int64_param
    expected = reference.predict(torch.from_numpy(req.x), seed=seed)  # the returned seed reproduces the answer
    np.testing.assert_allclose(_arrays(resp)[P.OUTPUT_PROBS], expected.probs, rtol=0, atol=1e-5)
    return "OK: the seed it drew"


def _classification(case, req, resp, reference) -> str:
    (t,) = resp.outputs
    return f"OK: {t.name} {t.datatype} {list(t.shape)}"


# cases whose OK answer is summarised differently (the others: _check_ok)
SUMMARIES: dict[str, Callable[..., str]] = {
    "outputs when none are named": _order,
    "response parameter seed": _returned_seed,
    "output parameter classification": _classification,
}


def _rpc(fn: Callable[[], str]) -> tuple[str, str]:
    try:
        return fn(), ""
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


def _model_ready(s) -> str:
    got = [(v, s.ModelReady(service_pb2.ModelReadyRequest(name=MODEL, version=v)).ready) for v in ("", "1", "01", "2")]
    got.append(("nope", s.ModelReady(service_pb2.ModelReadyRequest(name="nope")).ready))
    return ", ".join(f"{k!r}: {v}" for k, v in got)


def _metadata(s, version: str = "", name: str = MODEL) -> str:
    meta = s.ModelMetadata(service_pb2.ModelMetadataRequest(name=name, version=version))
    assert meta.name == MODEL and list(meta.versions) == [P.MODEL_VERSION], (meta.name, meta.versions)
    got = {(t.name, t.datatype, tuple(t.shape)) for t in [*meta.inputs, *meta.outputs]}
    assert got == {(t.name, t.datatype, t.shape) for t in P.input_tensors(1, 28, 28) + P.output_tensors(10)}, got
    return "OK"


def _config(s, reference, name: str = MODEL) -> str:
    cfg = s.ModelConfig(service_pb2.ModelConfigRequest(name=name)).config
    public = P.model_config(MODEL, channels=1, height=28, width=28, num_classes=10, max_batch_size=MAX_BATCH,
                            class_names=tuple(reference.class_names), random=True)
    assert cfg.name == MODEL and cfg.max_batch_size == 0, (cfg.name, cfg.max_batch_size)

    def tensors(ts):
        return [(t.name, t.data_type, list(t.dims), getattr(t, "optional", False)) for t in ts]

    assert tensors(cfg.input) == tensors(public.input) and tensors(cfg.output) == tensors(public.output)
    assert cfg.parameters[P.CONFIG_MAX_BATCH].string_value == str(MAX_BATCH)
    for key in (P.CONFIG_CLASS_NAMES, P.CONFIG_DETECTOR, P.CONFIG_RANDOM, P.CONFIG_MAX_BATCH):
        assert cfg.parameters[key].string_value == public.parameters[key].string_value, key
    return "OK"


def _stream(s) -> str:
    x = np.zeros((1, 1, 28, 28), np.float32)
    replies = list(s.ModelStreamInfer(iter([raw_request(MODEL, _pixels(x), parameters={P.PARAM_SEED: 1})]),
                                      timeout=30))
    assert len(replies) == 1 and not replies[0].error_message, replies
    assert sorted(t.name for t in replies[0].infer_response.outputs) == sorted(P.OUTPUTS)
    return "OK"


def _health(ch) -> str:
    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


RPCS: dict[str, Callable[[Target, DefendedClassifier], str]] = {
    "ServerLive and ServerReady": lambda t, ref: "OK" if (
        t.stub.ServerLive(service_pb2.ServerLiveRequest()).live
        and t.stub.ServerReady(service_pb2.ServerReadyRequest()).ready) else "not ready",
    "grpc health": lambda t, ref: _health(t.channel),
    "ModelReady": lambda t, ref: _model_ready(t.stub),
    "ModelReady version 'abc'": lambda t, ref: str(
        t.stub.ModelReady(service_pb2.ModelReadyRequest(name=MODEL, version="abc")).ready),
    "ModelMetadata": lambda t, ref: _metadata(t.stub),
    "ModelMetadata version '01'": lambda t, ref: _metadata(t.stub, "01"),
    "ModelMetadata version '2'": lambda t, ref: _metadata(t.stub, "2"),
    "ModelMetadata version 'abc'": lambda t, ref: _metadata(t.stub, "abc"),
    "ModelMetadata unknown model": lambda t, ref: _metadata(t.stub, name="nope"),
    "ModelConfig": lambda t, ref: _config(t.stub, ref),
    "ModelConfig unknown model": lambda t, ref: _config(t.stub, ref, name="nope"),
    "ModelMetadata platform": lambda t, ref: t.stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=MODEL)).platform,
    "ServerMetadata name": lambda t, ref: t.stub.ServerMetadata(service_pb2.ServerMetadataRequest()).name,
    "RepositoryIndex": lambda t, ref: ", ".join(sorted(
        m.name for m in t.stub.RepositoryIndex(service_pb2.RepositoryIndexRequest()).models if m.state == "READY")),
    "ModelStatistics": lambda t, ref: "OK" if len(
        t.stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=MODEL)).model_stats) == 1 else "none",
    "ModelStreamInfer": lambda t, ref: _stream(t.stub),
}

CASES = sorted(set(AGREED) | set(DIFFERENCES), key=lambda c: (c not in AGREED, c))


def expected(case: str, server: str) -> str:
    if case in AGREED:
        return AGREED[case][0]
    return DIFFERENCES[case][SERVERS.index(server)]


# --- the suite -----------------------------------------------------------------------------------

def test_every_case_has_a_request_or_an_rpc_and_one_table(requests):
    assert not set(AGREED) & set(DIFFERENCES)
    assert not set(requests) & set(RPCS)
    assert sorted([*requests, *RPCS]) == sorted(CASES), set(CASES) ^ {*requests, *RPCS}
    assert set(SUMMARIES) <= set(DIFFERENCES)


@pytest.mark.parametrize("case", CASES)
def test_wire_contract(target, requests, reference, case):
    if case in RPCS:
        outcome, message = _rpc(lambda: RPCS[case](target, reference))
    else:
        req = requests[case]
        code, message, resp = call(target.stub, req.request, timeout=60)
        if code == grpc.StatusCode.OK:
            outcome = SUMMARIES.get(case, _check_ok)(case, req, resp, reference)
        else:
            outcome = code.name
    want = expected(case, target.name)
    table = "AGREED" if case in AGREED else "DIFFERENCES"
    assert outcome == want, (f"{target.name}, case {case!r}: got {outcome} ({message[:300]!r}); {table} says {want}"
                             + ("" if case in AGREED else f" ({DIFFERENCES[case][2]})"))
    if case in AGREED and want != "OK" and want in grpc.StatusCode.__members__:  # an error both give
        assert message and len(message) < 2000, message[:2000]
        for pattern in AGREED[case][1]:
            assert re.search(pattern, message), f"{target.name}, case {case!r}: {pattern!r} not in {message!r}"


def test_without_a_seed_each_request_draws_its_own(target, fashion_test):
    x = fashion_test.as_float(0, 2)
    req = raw_request(MODEL, _pixels(x))
    answers = []
    for _ in range(2):
        code, message, resp = call(target.stub, req)
        assert code == grpc.StatusCode.OK, message
        answers.append(_arrays(resp)[P.OUTPUT_PROBS])
    assert np.abs(answers[0] - answers[1]).max() > 1e-4


def test_concurrent_good_and_bad_requests_keep_their_own_answers(target, requests, reference):
    """Good seeded requests sent together with bad ones (batched together where the server
    batches) get exactly their in-process answers; every bad one gets its own INVALID_ARGUMENT."""
    good = [requests["PIXELS, 3 images, seed 5"], requests["IMAGE, 2 PNGs, seed 6"]]
    bad = [requests[c] for c in ("PIXELS NaN", "a bad image among good ones", "seed of 5,000 digits")]
    jobs = [*good, *bad] * 3
    results: list[Any] = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def send(i: int) -> None:
        barrier.wait()
        results[i] = call(target.stub, jobs[i].request)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for job, (code, message, resp) in zip(jobs, results):
        if job in good:
            assert code == grpc.StatusCode.OK, message
            assert _check_ok("concurrent", job, resp, reference) == "OK"
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)


def test_docs_list_every_difference():
    """docs/deploy.md's table has one row per difference, with both outcomes, and no other rows."""
    text = DOCS.read_text()
    head = "## Where advshield serve and Triton differ"
    assert head in text, f"{DOCS}: no section {head!r}"
    section = text.split(head, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| case")
            and not set(line) <= set("|- ")]
    cells = {line.split("|")[1].strip().strip("`"): line for line in rows}
    assert sorted(cells) == sorted(DIFFERENCES), set(cells) ^ set(DIFFERENCES)
    for case, (ours, theirs, _) in DIFFERENCES.items():
        parts = [c.strip().strip("`") for c in cells[case].split("|")[1:-1]]
        assert parts[1:3] == [ours, theirs], f"docs row for {case!r}: {parts[1:3]}, the test says {[ours, theirs]}"
