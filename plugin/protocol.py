"""The wire contract of advshield's scoring endpoint (KServe v2 / Triton gRPC protocol).

advshield's own gRPC server (``advshield.plugin.server``) and the generated Triton ensemble
(``advshield.deploy``) expose the same model, so ``tritonclient.grpc`` and
``advshield.plugin.client`` work unchanged against either. Everything both sides must agree on
is written down here, once:

* model name: the pipeline's ``[pipeline] name`` (``cfg.pipeline.name``); version ``"1"`` (a
  request's version: ``""``, or ASCII digits read as an integer, so ``"01"`` is ``"1"``; anything
  else is INVALID_ARGUMENT: ``version_number``).
* inputs (send exactly one of them per request):

  - ``IMAGE``  BYTES ``[N, 1]``: encoded PNG/JPEG images, one per row (images of different
    sizes batch together; the server decodes them with the pipeline's ``[input]`` spec).
  - ``PIXELS`` FP32  ``[N, C, H, W]``: decoded pixels in [0, 1] (the pixel contract), for clients
    that already hold pixels, e.g. the audit re-scoring its quantized adversarial examples.

* outputs (a request may ask for a subset; all four by default):

  - ``PROBS``          FP32  ``[N, K]``  softmax probabilities of the defended pipeline
  - ``LABEL``          INT64 ``[N, 1]``  argmax
  - ``DETECTOR_SCORE`` FP32  ``[N, 1]``  detector score (0 when the pipeline has no detector)
  - ``FLAGGED``        BOOL  ``[N, 1]``  detector decision (False when there is no detector)

  Why ``[N, 1]`` and not ``[N]`` for the per-image tensors: a Triton model that batches
  (``max_batch_size > 0``) shows the client ``[batch] + dims`` and ``dims`` cannot be empty, so
  per-image scalars are ``dims: [1]`` there. Both servers use that shape.

* request parameter ``seed`` (int64 0 <= seed < 2**63, or a string of 1 to 19 ASCII digits of
  such a number; anything else is INVALID_ARGUMENT naming the parameter: ``parse_seed``): seeds the pipeline's random defenses
  for this request; without it the server draws one. A random pipeline returns the seed it used
  as the response parameter ``seed``; a deterministic pipeline returns no seed.
* other request parameters: ``timeout`` must be int64 (microseconds); a uint64 parameter of any
  name is INVALID_ARGUMENT (Triton 2.51 refuses them); unknown names are ignored. An output asked
  for twice comes back once; a tensor's data is either in ``raw_input_contents`` or in
  ``contents``, never both. Where the two servers still differ: docs/deploy.md, "Where advshield
  serve and Triton differ" (tests/test_conformance.py holds both to it).
* model config parameters (``ModelConfig.parameters``, string values): ``class_names`` (JSON
  list), ``detector`` (detector type or ``""``), ``random`` (``"true"``/``"false"``).
* ``max_batch_size``: the most images one request may carry (more is INVALID_ARGUMENT, as in
  Triton); also the largest micro-batch the server forms.
* errors: INVALID_ARGUMENT for bad input (message names the tensor and image index), NOT_FOUND
  for an unknown model or version, UNAUTHENTICATED without a valid bearer token (metadata
  ``authorization: Bearer <token>``), RESOURCE_EXHAUSTED when the in-flight bound or the message
  size limit is hit, DEADLINE_EXCEEDED past the request's deadline, UNAVAILABLE while shutting
  down. Client-supplied strings (names, ids, parameter values) appear in messages and logs
  clipped to ``ECHO_LIMIT`` characters with their length (``quoted``), so the code is the one
  named here, never RESOURCE_EXHAUSTED from error metadata over gRPC's 16 KiB.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

MODEL_VERSION = "1"
PLATFORM = "advshield"  # what ModelMetadata/ModelConfig report (a Triton ensemble says "ensemble")
SERVICE_NAME = "inference.GRPCInferenceService"

INPUT_IMAGE = "IMAGE"
INPUT_PIXELS = "PIXELS"
OUTPUT_PROBS = "PROBS"
OUTPUT_LABEL = "LABEL"
OUTPUT_SCORE = "DETECTOR_SCORE"
OUTPUT_FLAGGED = "FLAGGED"
OUTPUTS = (OUTPUT_PROBS, OUTPUT_LABEL, OUTPUT_SCORE, OUTPUT_FLAGGED)

PARAM_SEED = "seed"
CONFIG_CLASS_NAMES = "class_names"
CONFIG_DETECTOR = "detector"
CONFIG_RANDOM = "random"
CONFIG_MAX_BATCH = "max_batch_size"  # images per request; the Triton ensemble reports max_batch_size 0 (not batching)
AUTH_HEADER = "authorization"  # value: "Bearer <token>"

SEED_LIMIT = 2**63
SEED_DIGITS = 19  # a string seed: at most this many ASCII digits (2**63 - 1 has 19)
ECHO_LIMIT = 64  # characters of a client-supplied string that an error message or log line repeats

# KServe datatype -> (numpy dtype on the wire, Triton model-config enum name)
DATATYPES = {
    "BOOL": (np.dtype(np.bool_), "TYPE_BOOL"),
    "INT64": (np.dtype("<i8"), "TYPE_INT64"),
    "FP32": (np.dtype("<f4"), "TYPE_FP32"),
    "BYTES": (np.dtype(np.object_), "TYPE_STRING"),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension, as in a Triton model config
    optional: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape as ModelMetadata reports it: -1 for the batch dimension."""
        return (-1, *self.dims)


def input_tensors(channels: int, height: int, width: int) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(INPUT_IMAGE, "BYTES", (1,), optional=True),
        TensorSpec(INPUT_PIXELS, "FP32", (channels, height, width), optional=True),
    )


def output_tensors(num_classes: int) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(OUTPUT_PROBS, "FP32", (num_classes,)),
        TensorSpec(OUTPUT_LABEL, "INT64", (1,)),
        TensorSpec(OUTPUT_SCORE, "FP32", (1,)),
        TensorSpec(OUTPUT_FLAGGED, "BOOL", (1,)),
    )


def model_config(name: str, *, channels: int, height: int, width: int, num_classes: int,
                 max_batch_size: int, max_queue_delay_us: int = 0, class_names: tuple[str, ...] = (),
                 detector: str = "", random: bool = False, platform: str = PLATFORM):
    """The public model's ``ModelConfig`` (tritonclient's protobuf), as both servers report it.

    The public model is not batching in Triton's sense (``max_batch_size`` 0, the batch dimension
    -1 in every tensor's dims): Triton keeps a batching model's batch size in 32 bits, so that a
    declared batch of 2**32 + 1 with one image's bytes would wrap to a batch of 1 and pass; a
    non-batching model's full int64 shape is checked against the bytes at the door. The limit on
    images per request is the parameter ``max_batch_size``."""
    from tritonclient.grpc import model_config_pb2 as mc

    def dtype(t: TensorSpec) -> int:
        return mc.DataType.Value(DATATYPES[t.datatype][1])

    cfg = mc.ModelConfig(name=name, platform=platform, max_batch_size=0)
    for t in input_tensors(channels, height, width):
        cfg.input.add(name=t.name, data_type=dtype(t), dims=[-1, *t.dims], optional=t.optional)
    for t in output_tensors(num_classes):
        cfg.output.add(name=t.name, data_type=dtype(t), dims=[-1, *t.dims])
    cfg.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    cfg.parameters[CONFIG_CLASS_NAMES].string_value = json.dumps(list(class_names))
    cfg.parameters[CONFIG_DETECTOR].string_value = detector
    cfg.parameters[CONFIG_RANDOM].string_value = "true" if random else "false"
    cfg.parameters[CONFIG_MAX_BATCH].string_value = str(max_batch_size)
    return cfg


# --- request parameters and client-supplied strings ---------------------------------------------

class ParameterError(ValueError):
    """A request parameter has a value outside the contract."""


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """A client-supplied string as a log line may carry it: at most ``limit`` characters, then
    ``...`` and the original length."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


def quoted(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr`` of a client-supplied value for an error message, clipped: a string to ``limit``
    characters, a list to its first 8 items, each with the original length."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}...({len(value)} characters)"
    if isinstance(value, list | tuple):
        items = ", ".join(quoted(v, limit) for v in value[:8])
        return f"[{items}]" if len(value) <= 8 else f"[{items}, ...]({len(value)} items)"
    return clip(repr(value), limit)


def parse_seed(given: object) -> int:
    """The ``seed`` request parameter, as either server received it (an int64 parameter, or a
    string; both servers refuse uint64 parameters before this): an integer in [0, 2**63), or 1
    to ``SEED_DIGITS`` ASCII digits of one. Anything else (bool, float, signs, spaces, other scripts' digits) is a ``ParameterError``."""
    value: object = given
    if isinstance(given, str) and given.isascii() and given.isdigit() and len(given) <= SEED_DIGITS:
        value = int(given)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ParameterError(f"parameter '{PARAM_SEED}' must be an integer in [0, 2**63), got {quoted(given)} "
                             f"(an int64 parameter, or a string of 1 to {SEED_DIGITS} ASCII digits)")
    return value


def version_number(version: str) -> str:
    """A requested model version as Triton reads it: ``""`` (the latest), or an integer written in
    ASCII digits, returned without leading zeros (``"01"`` is version ``"1"``, ``"0"`` stays ``"0"``).
    Anything else (signs, spaces, letters, other scripts' digits) is a ``ParameterError``: Triton
    answers those INVALID_ARGUMENT, and NOT_FOUND only for a well-formed version it lacks."""
    if version == "":
        return ""
    if not (version.isascii() and version.isdigit()):
        raise ParameterError(f"model version must be an integer > 0 written in ASCII digits, got {quoted(version)}")
    return version.lstrip("0") or "0"


# --- BYTES tensors: each element is a 4-byte little-endian length, then that many bytes -------

class WireFormatError(ValueError):
    """A raw tensor's bytes do not match its declared datatype and shape."""


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def deserialize_bytes(raw: bytes, count: int, name: str = INPUT_IMAGE) -> list[bytes]:
    """Split a raw BYTES tensor into exactly ``count`` elements; malformed data is an error
    naming the element and the byte offset (never an out-of-range read)."""
    out, pos, n = [], 0, len(raw)
    view = memoryview(raw)
    for i in range(count):
        if pos + 4 > n:
            raise WireFormatError(f"{name}: raw content ends at byte {n} inside the length prefix of element {i} "
                                  f"(expected {count} length-prefixed elements)")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > n:
            raise WireFormatError(f"{name}[{i}]: length prefix says {size} bytes but only {n - pos} remain")
        out.append(bytes(view[pos : pos + size]))
        pos += size
    if pos != n:
        raise WireFormatError(f"{name}: {n - pos} unexpected trailing bytes after {count} elements")
    return out
