"""Property-based tests against the running server: random bytes, shapes, datatypes, names and
pixel values; after every example the server must still answer a known request correctly."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import call, image_tensor, outputs_of, raw_request, start_server, stub

from advshield.plugin import protocol as P
from advshield.plugin.decode import encode_png
from advshield.plugin.pipeline import DefendedClassifier

MODEL = "fashion_mnist"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module")
def fuzz_server(pipeline_path, tmp_path_factory):
    srv = start_server(pipeline_path, tmp_path_factory.mktemp("fuzz") / "server.log",
                       "--max-batch-size", "8", "--max-queue-delay-ms", "1", "--no-request-log")
    ch, s = stub(srv.url)
    yield srv, s
    ch.close()
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def probe(pipeline_path, fashion_test):
    """A known-good request and the in-process answer it must keep getting."""
    clf = DefendedClassifier.from_config(pipeline_path)
    x = fashion_test.as_float(100, 103)
    req = raw_request(MODEL, [(P.INPUT_IMAGE, "BYTES", [3, 1], image_tensor([encode_png(a) for a in x]))])
    return req, clf.predict(torch.from_numpy(x)), clf


def _still_serving(s, probe) -> None:
    req, expected, _ = probe
    code, message, resp = call(s, req)
    assert code == grpc.StatusCode.OK, f"server stopped answering correctly: {code} {message}"
    out = outputs_of(resp)
    np.testing.assert_allclose(out["PROBS"], expected.probs, atol=1e-5)
    np.testing.assert_array_equal(out["LABEL"].ravel(), expected.labels)


names = st.sampled_from([P.INPUT_IMAGE, P.INPUT_PIXELS, "image", "INPUT__0", "", "PIXELS\0"])
datatypes = st.sampled_from(["BYTES", "FP32", "FP64", "UINT8", "INT64", "BOOL", "fp32", ""])
shapes = st.lists(st.integers(-2, 40), min_size=0, max_size=5)
png_like = st.binary(max_size=300).map(lambda b: b"\x89PNG\r\n\x1a\n" + b)


@FUZZ
@given(name=names, datatype=datatypes, shape=shapes,
       raw=st.one_of(st.none(), st.binary(max_size=4096), st.lists(st.one_of(st.binary(max_size=200), png_like),
                                                                  max_size=4).map(image_tensor)),
       model=st.sampled_from([MODEL, MODEL, "other", ""]), version=st.sampled_from(["", "1", "2"]),
       outputs=st.lists(st.sampled_from([*P.OUTPUTS, "LOGITS"]), max_size=3),
       seed=st.one_of(st.none(), st.integers(-5, 2**64), st.text(max_size=5)))
def test_random_requests_get_clear_answers(fuzz_server, probe, name, datatype, shape, raw, model, version, outputs, seed):
    _, s = fuzz_server
    params = None if seed is None else {"seed": seed if not isinstance(seed, int) or seed < 2**63 else str(seed)}
    req = raw_request(model, [(name, datatype, shape, raw)], outputs=outputs, version=version, parameters=params)
    code, message, _ = call(s, req)
    assert code in ALLOWED, (code, message)
    assert code == grpc.StatusCode.OK or message
    _still_serving(s, probe)


@FUZZ
@given(n=st.integers(1, 8), data=st.data())
def test_random_image_bytes_never_break_a_batch(fuzz_server, probe, n, data):
    """Random images, some valid (random pixels, PNG), some not: the request is OK exactly when
    every image decodes, and then equals the in-process prediction; else the error names the
    first bad image."""
    _, s = fuzz_server
    _, _, clf = probe
    items, arrays, first_bad = [], [], None
    for i in range(n):
        if data.draw(st.booleans()):
            seed = data.draw(st.integers(0, 2**32 - 1))
            a = np.random.default_rng(seed).integers(0, 256, (1, 28, 28)).astype(np.float32) / 255
            items.append(encode_png(a))
            arrays.append(a)
        else:
            items.append(data.draw(st.one_of(st.binary(max_size=120), png_like)))
            first_bad = i if first_bad is None else first_bad
    code, message, resp = call(s, raw_request(MODEL, [(P.INPUT_IMAGE, "BYTES", [n, 1], image_tensor(items))]))
    if first_bad is None:
        assert code == grpc.StatusCode.OK, message
        expected = clf.predict(torch.from_numpy(np.stack(arrays)))
        np.testing.assert_allclose(outputs_of(resp)["PROBS"], expected.probs, atol=1e-5)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"IMAGE[{first_bad}]" in message, message
    _still_serving(s, probe)


@FUZZ
@given(n=st.integers(1, 8), fill=st.sampled_from([0.0, 1.0, -0.5, 1.5, float("nan"), float("inf"), None]),
       seed=st.integers(0, 2**32 - 1))
def test_random_pixels_are_scored_exactly_when_valid(fuzz_server, probe, n, fill, seed):
    _, s = fuzz_server
    _, _, clf = probe
    x = np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)
    if fill is not None:
        x[n - 1, 0, seed % 28, (seed // 28) % 28] = fill
    valid = bool(np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)
    code, message, resp = call(s, raw_request(MODEL, [(P.INPUT_PIXELS, "FP32", [n, 1, 28, 28], x.tobytes())]))
    if valid:
        assert code == grpc.StatusCode.OK, message
        np.testing.assert_allclose(outputs_of(resp)["PROBS"], clf.predict(torch.from_numpy(x)).probs, atol=1e-5)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "PIXELS" in message, message


@settings(max_examples=40, deadline=None, derandomize=True)
@given(payload=st.binary(max_size=2048))
def test_garbage_protobuf_does_not_take_the_server_down(fuzz_server, probe, payload):
    srv, s = fuzz_server
    with grpc.insecure_channel(srv.url) as ch:
        rpc = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                             request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            rpc(payload, timeout=10)
        except grpc.RpcError as e:
            assert e.code() in ALLOWED | {grpc.StatusCode.INTERNAL}, (e.code(), e.details())
    _still_serving(s, probe)
