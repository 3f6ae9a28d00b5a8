"""advshield's gRPC scoring server, tested against the running server with tritonclient.

The session server is the real ``advshield serve`` in a subprocess on a free loopback port
(bearer token on, metrics on); behaviour that needs a slow or random classifier is tested on an
in-process ``ScoringServer`` around a wrapped classifier.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from server_helpers import call, image_tensor, outputs_of, raw_request, start_server, stub
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from advshield.cli import main
from advshield.core.errors import ConfigError
from advshield.plugin import protocol as P
from advshield.plugin.classifiers import Classifier
from advshield.plugin.client import RemoteClassifier, RemoteError
from advshield.plugin.config import DefenseEntry, load_pipeline, loads_pipeline
from advshield.plugin.decode import encode_png
from advshield.plugin.pipeline import DefendedClassifier, Prediction
from advshield.plugin.server import ScoringServer, ServeSpec, serve_spec
from advshield.plugin.server.scoring_server import serve
from advshield.plugin.server.spec import ServeError

MODEL = "fashion_mnist"
TOKEN = "test-token-0123456789"


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def server(pipeline_path, tmp_path_factory):
    """``advshield serve`` in a subprocess: token auth, metrics on, short queue delay."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = start_server(pipeline_path, log, "--metrics-port", "0", "--max-queue-delay-ms", "5",
                       "--max-batch-size", "32", token=TOKEN)
    yield srv
    assert srv.stop() == 0, log.read_text()


@pytest.fixture(scope="session")
def reference(pipeline_path):
    return DefendedClassifier.from_config(pipeline_path)


@pytest.fixture(scope="session")
def client(server):
    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture(scope="session")
def raw(server):
    ch, s = stub(server.url)
    yield s
    ch.close()


def _pngs(fashion_test, start: int, stop: int) -> list[bytes]:
    return [encode_png(a) for a in fashion_test.as_float(start, stop)]


def _image_input(images: list[bytes]) -> grpcclient.InferInput:
    data = np.empty((len(images), 1), dtype=np.object_)
    for i, b in enumerate(images):
        data[i, 0] = b
    inp = grpcclient.InferInput(P.INPUT_IMAGE, [len(images), 1], "BYTES")
    inp.set_data_from_numpy(data)
    return inp


def _pixels_input(x: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(P.INPUT_PIXELS, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _code(e: InferenceServerException) -> str:
    return str(e.status()).removeprefix("StatusCode.")


def _metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            if key == (f"{name}{{{want}}}" if labels else name):
                return float(value)
    return 0.0


# --- health, metadata, reflection ----------------------------------------------------------------

def test_health_live_ready_metadata(server, client, reference):
    with grpc.insecure_channel(server.url) as ch:  # the health service needs no token (probes)
        h = health_pb2_grpc.HealthStub(ch)
        for service in ("", P.SERVICE_NAME, MODEL):
            assert h.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    hd = server.headers
    assert client.is_server_live(headers=hd) and client.is_server_ready(headers=hd)
    assert client.is_model_ready(MODEL, headers=hd) and client.is_model_ready(MODEL, "1", headers=hd)
    assert not client.is_model_ready("no_such_model", headers=hd)
    meta = client.get_model_metadata(MODEL, headers=hd, as_json=True)
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"] + meta["outputs"]}
    assert shapes == {"IMAGE": ("BYTES", [-1, 1]), "PIXELS": ("FP32", [-1, 1, 28, 28]), "PROBS": ("FP32", [-1, 10]),
                      "LABEL": ("INT64", [-1, 1]), "DETECTOR_SCORE": ("FP32", [-1, 1]), "FLAGGED": ("BOOL", [-1, 1])}
    config = client.get_model_config(MODEL, headers=hd).config
    assert config.max_batch_size == 0 and config.parameters["max_batch_size"].string_value == "32"  # as the Triton ensemble
    assert [list(t.dims) for t in config.input] == [[-1, 1], [-1, 1, 28, 28]]
    assert json.loads(config.parameters["class_names"].string_value) == list(reference.class_names)
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no_such_model", headers=hd)
    assert _code(e.value) == "NOT_FOUND" and "no_such_model" in e.value.message()


def test_reflection_lists_the_services(server):
    with grpc.insecure_channel(server.url) as ch:
        s = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = s.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           metadata=server.metadata)
        names = {svc.name for r in responses for svc in r.list_services_response.service}
    assert {P.SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


# --- inference -----------------------------------------------------------------------------------

def test_infer_images_and_pixels_equal_in_process(server, client, reference, fashion_test):
    x = fashion_test.as_float(0, 20)
    expected = reference.predict(torch.from_numpy(x))
    res = client.infer(MODEL, [_image_input(_pngs(fashion_test, 0, 20))], headers=server.headers)
    np.testing.assert_allclose(res.as_numpy("PROBS"), expected.probs, atol=1e-5)
    np.testing.assert_array_equal(res.as_numpy("LABEL"), expected.labels.reshape(-1, 1))
    assert res.as_numpy("DETECTOR_SCORE").shape == (20, 1) and not res.as_numpy("FLAGGED").any()  # no detector
    assert (res.as_numpy("LABEL").ravel() == fashion_test.labels[:20]).mean() >= 0.8
    res = client.infer(MODEL, [_pixels_input(x)], headers=server.headers,
                       outputs=[grpcclient.InferRequestedOutput("LABEL")])
    assert [o.name for o in res.get_response().outputs] == ["LABEL"]
    np.testing.assert_array_equal(res.as_numpy("LABEL").ravel(), expected.labels)
    assert "seed" not in res.get_response().parameters  # deterministic pipeline: no seed


def test_jpeg_and_colour_images_are_decoded(server, client, reference, fashion_test):
    grey = (fashion_test.as_float(0, 1)[0, 0] * 255).astype(np.uint8)
    jpeg, rgb = io.BytesIO(), io.BytesIO()
    Image.fromarray(grey).save(jpeg, format="JPEG", quality=95)
    Image.fromarray(np.stack([grey] * 3, -1)).save(rgb, format="PNG")  # color = "convert"
    res = client.infer(MODEL, [_image_input([jpeg.getvalue(), rgb.getvalue()])], headers=server.headers)
    assert res.as_numpy("LABEL")[1, 0] == reference.predict(torch.from_numpy(fashion_test.as_float(0, 1))).labels[0]
    np.testing.assert_allclose(res.as_numpy("PROBS").sum(1), 1.0, atol=1e-5)


def test_remote_classifier_is_a_classifier(server, reference, fashion_test):
    x = torch.from_numpy(fashion_test.as_float(0, 70))
    with RemoteClassifier(server.url, token=TOKEN, batch_size=32) as rc:  # model discovered, 3 requests
        assert isinstance(rc, Classifier)
        assert rc.model_name == MODEL and rc.input_shape == (1, 28, 28) and rc.num_classes == 10
        assert rc.class_names == reference.class_names and not rc.detector
        logp = rc(x)
        expected = reference.predict(x)
        np.testing.assert_allclose(torch.softmax(logp, 1).numpy(), expected.probs, atol=1e-5)
        pred = rc.predict_bytes(_pngs(fashion_test, 0, 70))
        np.testing.assert_array_equal(pred.labels, expected.labels)
        assert pred.score is None and pred.flagged is None


# --- authentication --------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}])
def test_requests_without_a_valid_token_are_unauthenticated(server, client, fashion_test, headers):
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, [_image_input(_pngs(fashion_test, 0, 1))], headers=headers)
    assert _code(e.value) == "UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata(MODEL, headers=headers)
    assert _code(e.value) == "UNAUTHENTICATED"
    with pytest.raises(RemoteError, match="UNAUTHENTICATED"):
        RemoteClassifier(server.url, MODEL, token=None if headers is None else "wrong")
    with pytest.raises(InferenceServerException) as e:
        client.is_model_ready(MODEL, headers=headers)  # names a model: closed
    assert _code(e.value) == "UNAUTHENTICATED"
    # liveness and readiness stay open for probes (Kubernetes, tritonclient's is_server_live)
    assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)


# --- bad input: every case gets a clear error, and the server keeps answering --------------------

@pytest.fixture(scope="module")
def bad_cases(fashion_test) -> dict[str, tuple]:
    png = encode_png(fashion_test.as_float(0, 1)[0])
    big = io.BytesIO()
    Image.new("L", (5000, 5000)).save(big, format="PNG")  # 25 M pixels > input.max_pixels
    small = io.BytesIO()
    Image.new("L", (32, 32)).save(small, format="PNG")
    pix = fashion_test.as_float(0, 2)
    img = lambda items, shape=None: [(P.INPUT_IMAGE, "BYTES", shape or [len(items), 1], image_tensor(items))]  # noqa: E731
    bad, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return {
        "corrupt": (img([b"\x89PNG\r\n\x1a\n" + b"garbage" * 10]), bad, r"IMAGE\[0\]: (corrupt|not a PNG)"),
        "not an image": (img([b"hello world"]), bad, r"IMAGE\[0\]: not a PNG or JPEG image"),
        "empty": (img([b""]), bad, r"IMAGE\[0\]: empty input: 0 bytes"),
        "truncated": (img([png[: len(png) // 2]]), bad, r"IMAGE\[0\]: (truncated|corrupt)"),
        "enormous bytes": (img([b"\x89PNG\r\n\x1a\n" + b"\0" * (5 << 20)]), bad, r"IMAGE\[0\]: encoded image too large"),
        "enormous pixels": (img([big.getvalue()]), bad, r"IMAGE\[0\]: image too large: 5000x5000"),
        "wrong size": (img([small.getvalue()]), bad, r"IMAGE\[0\]: wrong size: expected 28x28"),
        "bad image among good": (img([png, b"junk", png]), bad, r"IMAGE\[1\]: not a PNG"),
        "1-D image tensor": (img([png], [1]), bad, r"'IMAGE': expected shape \['N', 1\], got \[1\]"),
        "count mismatch": (img([png, png], [3, 1]), bad, r"IMAGE: raw content ends"),
        "trailing bytes": ([(P.INPUT_IMAGE, "BYTES", [1, 1], image_tensor([png]) + b"xx")], bad, r"trailing bytes"),
        "length prefix lies": ([(P.INPUT_IMAGE, "BYTES", [1, 1], b"\xff\xff\xff\x7f" + png)], bad, r"length prefix says"),
        "empty batch": (img([], [0, 1]), bad, r"empty batch"),
        "batch too large": (img([png] * 33), bad, r"batch of 33 images exceeds max_batch_size 32"),
        "wrong dtype": ([(P.INPUT_PIXELS, "FP64", [2, 1, 28, 28], pix.astype(np.float64).tobytes())], bad,
                        r"'PIXELS': expected datatype FP32, got 'FP64'"),
        "image as FP32": ([(P.INPUT_IMAGE, "FP32", [1, 1], b"\0" * 4)], bad, r"'IMAGE': expected datatype BYTES"),
        "wrong shape": ([(P.INPUT_PIXELS, "FP32", [1, 3, 28, 28], np.zeros((1, 3, 28, 28), np.float32).tobytes())],
                        bad, r"expected shape \['N', 1, 28, 28\], got \[1, 3, 28, 28\]"),
        "short pixels": ([(P.INPUT_PIXELS, "FP32", [2, 1, 28, 28], pix.tobytes()[:-4])], bad, r"needs 6272 bytes"),
        "pixels out of range": ([(P.INPUT_PIXELS, "FP32", [2, 1, 28, 28], (pix * 2 + 0.5).tobytes())], bad,
                                r"pixels must lie in \[0, 1\]"),
        "NaN pixels": ([(P.INPUT_PIXELS, "FP32", [1, 1, 28, 28], np.full((1, 1, 28, 28), np.nan, np.float32).tobytes())],
                       bad, r"NaN"),
        "unknown input": ([("INPUT__0", "FP32", [1, 1, 28, 28], pix[:1].tobytes())], bad, r"unexpected input 'INPUT__0'"),
        "missing input": ([], bad, r"missing input: send IMAGE"),
        "both inputs": ([*img([png]), (P.INPUT_PIXELS, "FP32", [1, 1, 28, 28], pix[:1].tobytes())], bad,
                        r"either IMAGE or PIXELS"),
        "unknown output": (dict(inputs=img([png]), outputs=["LOGITS"]), bad, r"unexpected output 'LOGITS'"),
        "bad seed": (dict(inputs=img([png]), parameters={"seed": "abc"}), bad, r"parameter 'seed'"),
        "negative seed": (dict(inputs=img([png]), parameters={"seed": -3}), bad, r"parameter 'seed'"),
        "superscript seed": (dict(inputs=img([png]), parameters={"seed": "\u00b2"}), bad, r"parameter 'seed'"),
        "Arabic-Indic seed": (dict(inputs=img([png]), parameters={"seed": "\u0661\u0662"}), bad, r"parameter 'seed'"),
        "5,000-digit seed": (dict(inputs=img([png]), parameters={"seed": "9" * 5000}), bad,
                             r"parameter 'seed' .*\(5000 characters\)"),
        "20-digit seed": (dict(inputs=img([png]), parameters={"seed": "0" * 20}), bad, r"parameter 'seed'"),
        "unknown model": (dict(inputs=img([png]), model="resnet50"), nf, r"unknown model 'resnet50'"),
        # client strings of 200 KB: clipped in the message, so the code stays the contract's (not
        # RESOURCE_EXHAUSTED from error metadata over 16 KiB)
        "200 KB input name": ([("I" * 200_000, "FP32", [1, 1, 28, 28], pix[:1].tobytes())], bad,
                              r"unexpected input 'I{64}'\.\.\.\(200000 characters\)"),
        "200 KB datatype": ([(P.INPUT_PIXELS, "D" * 200_000, [1, 1, 28, 28], pix[:1].tobytes())], bad,
                            r"expected datatype FP32, got 'D{64}'\.\.\.\(200000 characters\)"),
        "200 KB output name": (dict(inputs=img([png]), outputs=["O" * 200_000]), bad, r"unexpected output 'O{64}'\.\.\."),
        "20,000 input names": ([(P.INPUT_PIXELS, "FP32", [1], b"")] * 20_000, bad, r"given twice: .*\.\.\.\]\(20000 items\)"),
        "40,000-dim shape": ([(P.INPUT_PIXELS, "FP32", [1] * 40_000, b"")], bad, r"\.\.\.\]\(40000 items\)"),
        "200 KB model name": (dict(inputs=img([png]), model="M" * 200_000), nf, r"unknown model 'M{64}'\.\.\."),
        "200 KB version": (dict(inputs=img([png]), version="7" * 200_000), nf, r"unknown version '7{64}'\.\.\."),
        "unknown version": (dict(inputs=img([png]), version="7"), nf, r"unknown version '7'"),
    }


BAD_CASES = [
    "corrupt", "not an image", "empty", "truncated", "enormous bytes", "enormous pixels", "wrong size",
    "bad image among good", "1-D image tensor", "count mismatch", "trailing bytes", "length prefix lies",
    "empty batch", "batch too large", "wrong dtype", "image as FP32", "wrong shape", "short pixels",
    "pixels out of range", "NaN pixels", "unknown input", "missing input", "both inputs", "unknown output",
    "bad seed", "negative seed", "superscript seed", "Arabic-Indic seed", "5,000-digit seed", "20-digit seed",
    "unknown model", "200 KB input name", "200 KB datatype", "200 KB output name", "20,000 input names",
    "40,000-dim shape", "200 KB model name", "200 KB version", "unknown version",
]


def test_every_bad_case_is_exercised(bad_cases):
    assert sorted(bad_cases) == sorted(BAD_CASES)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, raw, fashion_test, reference, bad_cases, case):
    spec, code, match = bad_cases[case]
    spec = dict(spec) if isinstance(spec, dict) else spec
    kw = spec if isinstance(spec, dict) else {"inputs": spec}
    req = raw_request(kw.pop("model", MODEL), kw.pop("inputs"), **kw)
    got, message, _ = call(raw, req, server.metadata)
    assert got == code, message
    assert message and re.search(match, message), message[:2000]
    assert len(message) < 2000, message[:2000]
    got, message, resp = call(raw, raw_request(MODEL, [(P.INPUT_IMAGE, "BYTES", [1, 1],
                                                        image_tensor(_pngs(fashion_test, 5, 6)))]), server.metadata)
    assert got == grpc.StatusCode.OK, message
    assert outputs_of(resp)["LABEL"][0, 0] == reference.predict(torch.from_numpy(fashion_test.as_float(5, 6))).labels[0]


def test_a_1_mib_request_id_is_clipped_in_the_log(server, raw, fashion_test):
    req = raw_request(MODEL, [(P.INPUT_IMAGE, "BYTES", [1, 1], image_tensor(_pngs(fashion_test, 0, 1)))])
    req.id = "r" * (1 << 20)
    req.model_name = "m" * (1 << 20)  # NOT_FOUND, logged with the id
    code, message, _ = call(raw, req, server.metadata)
    assert code == grpc.StatusCode.NOT_FOUND and len(message) < 2000
    time.sleep(0.2)
    lines = server.log_path.read_text().splitlines()
    assert max(map(len, lines)) < 4000
    mine = [r for r in server.logs() if r.get("event") == "infer" and str(r.get("id", "")).startswith("r" * 64)]
    assert mine and mine[-1]["id"] == "r" * 64 + f"...({1 << 20} characters)" and mine[-1]["code"] == "NOT_FOUND"


def test_bad_requests_do_not_disturb_concurrent_good_ones(server, raw, fashion_test, reference):
    pngs = _pngs(fashion_test, 0, 24)
    expected = reference.predict(torch.from_numpy(fashion_test.as_float(0, 24)))

    def one(i: int):
        items = [pngs[i]] if i % 3 else [pngs[i], b"\x89PNG\r\n\x1a\n broken"]  # every third request is bad
        return i, call(raw, raw_request(MODEL, [(P.INPUT_IMAGE, "BYTES", [len(items), 1], image_tensor(items))]),
                       server.metadata)

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    for i, (code, message, resp) in results:
        if i % 3:
            assert code == grpc.StatusCode.OK, message
            out = outputs_of(resp)
            np.testing.assert_allclose(out["PROBS"][0], expected.probs[i], atol=1e-5)
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "IMAGE[1]" in message


def test_messages_over_the_size_limit_are_refused(tmp_path, pipeline_path, fashion_test):
    srv = ScoringServer(DefendedClassifier.from_config(pipeline_path), ServeSpec(port=0, max_message_bytes=1 << 20),
                        model_name=MODEL).start()
    try:
        ch, s = stub(f"127.0.0.1:{srv.port}")
        code, message, _ = call(s, raw_request(MODEL, [(P.INPUT_IMAGE, "BYTES", [1, 1], image_tensor([b"\0" * (2 << 20)]))]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message
        code, message, _ = call(s, raw_request(MODEL, [(P.INPUT_IMAGE, "BYTES", [1, 1], image_tensor(_pngs(fashion_test, 0, 1)))]))
        assert code == grpc.StatusCode.OK, message
        ch.close()
    finally:
        srv.stop(0)


# --- metrics and logs ----------------------------------------------------------------------------

def test_metrics_endpoint_and_structured_logs(server, client, fashion_test):
    client.infer(MODEL, [_image_input(_pngs(fashion_test, 0, 3))], headers=server.headers)
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [_image_input([b"nope"])], headers=server.headers)
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [_image_input([b"nope"])])
    text = _metrics(server.metrics_port)
    assert _metric(text, "advshield_requests_total", method="ModelInfer", code="OK") >= 1
    assert _metric(text, "advshield_errors_total", code="INVALID_ARGUMENT") >= 1
    assert _metric(text, "advshield_errors_total", code="UNAUTHENTICATED") >= 1
    assert _metric(text, "advshield_request_latency_seconds_count") >= 2
    assert _metric(text, "advshield_batch_size_count") >= 1 and _metric(text, "advshield_images_total") >= 3
    assert "advshield_flagged_total" in text and "advshield_inflight_requests" in text
    logs = server.logs()
    assert any(r.get("event") == "listening" and r["port"] == server.port for r in logs)
    infer = [r for r in logs if r.get("event") == "infer"]
    ok = [r for r in infer if r["code"] == "OK"]
    assert ok and all(isinstance(r["latency_ms"], float) and r["images"] >= 1 for r in ok)
    assert any(r["code"] == "INVALID_ARGUMENT" and "IMAGE[0]" in r["error"] for r in infer)


# --- the score command ---------------------------------------------------------------------------

def test_score_command_json_csv_table(server, tmp_path, fashion_test, reference, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, data in enumerate(_pngs(fashion_test, 0, 5)):
        (folder / ("sub" if i % 2 else "") / f"img{i}.png").write_bytes(data)
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    expected = reference.predict(torch.from_numpy(fashion_test.as_float(0, 5))).labels
    assert main(["score", "--url", server.url, "--token", TOKEN, str(folder), "--json", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5
    for r in rows:
        i = int(r["image"].rsplit("img", 1)[1].split(".")[0])
        assert r["label"] == expected[i] and r["class"] == reference.class_names[expected[i]]
        assert abs(sum(r["probs"]) - 1) < 1e-4 and "flagged" not in r  # no detector in this pipeline
    assert main(["score", "--url", server.url, "--token", TOKEN, str(folder / "img0.png"), "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("image,label,class,flagged,detector_score,seed,error,prob_T-shirt/top")
    assert lines[1].split(",")[1] == str(expected[0])
    assert main(["score", "--url", server.url, "--token", TOKEN, str(folder / "img0.png")]) == 0
    assert reference.class_names[expected[0]] in capsys.readouterr().out


def test_score_command_reports_bad_files_and_keeps_going(server, tmp_path, fashion_test, capsys):
    good = tmp_path / "good.png"
    good.write_bytes(_pngs(fashion_test, 0, 1)[0])
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    args = ["score", "--url", server.url, "--token", TOKEN, str(tmp_path / "bad.png"), str(good),
            str(tmp_path / "missing.png"), "--json"]
    assert main(args) == 1
    rows = {r["image"].rsplit("/", 1)[1]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert "cannot read file" in rows["missing.png"]["error"]
    assert "not a PNG" in rows["bad.png"]["error"] or "corrupt" in rows["bad.png"]["error"]
    assert "label" in rows["good.png"]


def test_score_command_unreachable_server(tmp_path, fashion_test, capsys):
    from server_helpers import free_port

    (tmp_path / "a.png").write_bytes(_pngs(fashion_test, 0, 1)[0])
    assert main(["score", "--url", f"127.0.0.1:{free_port()}", str(tmp_path / "a.png"), "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the scoring server at 127.0.0.1:" in err and "advshield serve" in err


# --- in-process servers: batching, load, deadlines, seeds, detector, TLS --------------------------

class Recording:
    """Wraps a DefendedClassifier: records batch sizes, optionally sleeps per call."""

    def __init__(self, inner, delay: float = 0.0) -> None:
        self.inner, self.delay = inner, delay
        self.sizes: list[int] = []
        self.input_shape, self.num_classes = inner.input_shape, inner.num_classes
        self.class_names, self.config, self.random = inner.class_names, inner.config, inner.random

    def predict(self, x, seed=None):
        self.sizes.append(len(x))
        time.sleep(self.delay)
        return self.inner.predict(x, seed=seed)


def _serve(clf, **spec):
    return ScoringServer(clf, ServeSpec(port=0, **spec), model_name=MODEL).start()


def _one(url, x, **kw):
    ch, s = stub(url)
    try:
        return call(s, raw_request(MODEL, [(P.INPUT_PIXELS, "FP32", list(x.shape), x.tobytes())],
                                   parameters=kw.pop("parameters", None)), **kw)
    finally:
        ch.close()


def test_micro_batching_joins_concurrent_requests(reference, fashion_test):
    rec = Recording(reference)
    x = fashion_test.as_float(0, 40)
    expected = reference.predict(torch.from_numpy(x))
    with _serve(rec, max_queue_delay_ms=150, max_batch_size=16, max_inflight=64) as srv:
        url = f"127.0.0.1:{srv.port}"
        with cf.ThreadPoolExecutor(40) as pool:
            results = list(pool.map(lambda i: _one(url, x[i : i + 1]), range(40)))
        text = prom_text(srv)
    for i, (code, message, resp) in enumerate(results):
        assert code == grpc.StatusCode.OK, message
        np.testing.assert_allclose(outputs_of(resp)["PROBS"][0], expected.probs[i], atol=1e-5)
    assert sum(rec.sizes) == 40 and max(rec.sizes) <= 16
    # 40 concurrent single-image requests are joined into fewer classifier calls (how many depends
    # on the load of the machine: the batcher never waits for company when none is queued)
    assert len(rec.sizes) <= 30 and max(rec.sizes) >= 2, rec.sizes
    assert _metric(text, "advshield_batch_size_count") == len(rec.sizes)
    assert _metric(text, "advshield_batch_size_sum") == 40


def test_a_lone_request_does_not_wait_for_company(reference, fashion_test):
    x = fashion_test.as_float(0, 1)
    with _serve(reference, max_queue_delay_ms=2000) as srv:
        t0 = time.perf_counter()
        assert _one(f"127.0.0.1:{srv.port}", x)[0] == grpc.StatusCode.OK
        assert time.perf_counter() - t0 < 1.0  # nobody else in flight: no point waiting 2 s


def prom_text(srv) -> str:
    import prometheus_client

    return prometheus_client.generate_latest(srv.metrics.registry).decode()


def test_inflight_bound_answers_resource_exhausted(reference, fashion_test):
    x = fashion_test.as_float(0, 1)
    with _serve(Recording(reference, delay=0.6), max_inflight=2, max_batch_size=1, max_queue_delay_ms=0) as srv:
        url = f"127.0.0.1:{srv.port}"
        with cf.ThreadPoolExecutor(8) as pool:
            codes = [r[0] for r in pool.map(lambda _: _one(url, x), range(8))]
        assert codes.count(grpc.StatusCode.OK) >= 2
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4, codes
        assert _one(url, x)[0] == grpc.StatusCode.OK  # and it recovers
        assert _metric(prom_text(srv), "advshield_errors_total", code="RESOURCE_EXHAUSTED") >= 4


def test_idle_streams_do_not_starve_other_clients(reference, fashion_test):
    """No token (as the shipped pipelines): 24 idle reflection streams that send nothing and 24
    health Watch streams, more than the worker pool of max_inflight + 8 the server used to have;
    beyond max_streams they are refused, and another client's ModelInfer and Health.Check answer
    within a short deadline."""
    x = fashion_test.as_float(0, 1)
    quiet = threading.Event()

    def nothing():
        quiet.wait(30)
        return
        yield

    with _serve(reference, max_inflight=4, max_streams=4) as srv:
        url = f"127.0.0.1:{srv.port}"
        ch = grpc.insecure_channel(url)
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        watch = health_pb2_grpc.HealthStub(ch)
        calls = [reflect.ServerReflectionInfo(nothing()) for _ in range(24)]
        calls += [watch.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(24)]
        try:
            time.sleep(1.0)  # all of them reach the server
            code, message, _ = _one(url, x, timeout=3)
            assert code == grpc.StatusCode.OK, message
            with grpc.insecure_channel(url) as other:
                status = health_pb2_grpc.HealthStub(other).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            refused = [c for c in calls if c.done() and c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
            assert len(refused) >= len(calls) - 4, [c.code() for c in calls if c.done()]
            assert "max_streams" in refused[0].details()
            assert srv.streams.open <= 4
        finally:
            quiet.set()
            for c in calls:
                c.cancel()
            ch.close()
        time.sleep(0.5)
        assert srv.streams.open == 0  # cancelled streams give their slots back


def test_idle_and_old_streams_are_closed_and_give_their_slots_back(reference, fashion_test):
    """A reflection stream whose client sends nothing is cancelled after stream_idle_s, one that
    keeps talking is not; a health Watch is closed after stream_max_age_s; the slots they held
    serve new streams, and ModelInfer answers throughout."""
    x = fashion_test.as_float(0, 1)
    quiet = threading.Event()

    def nothing():
        quiet.wait(30)
        return
        yield

    def chatty():
        while not quiet.is_set():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            time.sleep(0.3)

    with _serve(reference, max_streams=3, stream_idle_s=1.0, stream_max_age_s=2.5) as srv:
        url = f"127.0.0.1:{srv.port}"
        ch = grpc.insecure_channel(url)
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        try:
            idle = reflect.ServerReflectionInfo(nothing())
            talking = reflect.ServerReflectionInfo(chatty())
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert next(talking).list_services_response.service
            time.sleep(0.5)
            assert srv.streams.open == 3
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                next(idle)
            assert e.value.code() == grpc.StatusCode.CANCELLED
            assert time.monotonic() - t0 < 2.0  # closed at about 1 s idle, not at the 2.5 s age
            answers = sum(1 for _ in zip(range(3), talking))  # still answering after the idle one went
            assert answers == 3
            assert _one(url, x, timeout=3)[0] == grpc.StatusCode.OK
            with pytest.raises(grpc.RpcError) as e:
                next(watch)  # no status change: the Watch ends at its maximum age
            assert e.value.code() == grpc.StatusCode.CANCELLED
            time.sleep(0.3)
            assert srv.streams.open == 0  # the talking stream reached its age too
            again = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            assert next(again).list_services_response.service  # the slots were given back
        finally:
            quiet.set()
            ch.close()


def test_deadlines_client_server_and_queued(reference, fashion_test):
    x = fashion_test.as_float(0, 1)
    rec = Recording(reference, delay=0.8)
    with _serve(rec, max_batch_size=1, max_queue_delay_ms=0, request_timeout_s=5.0) as srv:
        url = f"127.0.0.1:{srv.port}"
        code, message, _ = _one(url, x, timeout=0.2)  # the client's deadline
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        code, message, _ = _one(url, x, parameters={"timeout": 200_000})  # Triton's timeout parameter (us)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline exceeded" in message
        time.sleep(1.2)  # the first request's classifier call (0.8 s) is over
        calls = len(rec.sizes)
        with cf.ThreadPoolExecutor(2) as pool:  # the second one expires while queued: never computed
            first = pool.submit(_one, url, x)
            time.sleep(0.2)
            second = pool.submit(_one, url, x, timeout=0.3)
            assert first.result()[0] == grpc.StatusCode.OK
            assert second.result()[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.2)
        assert len(rec.sizes) == calls + 1
        assert _one(url, x)[0] == grpc.StatusCode.OK


class GaussianNoise:
    """A random defense for the seed tests: x + N(0, 0.2^2), clipped."""

    name, random, differentiable, needs_fit = "noise", True, True, False

    def __call__(self, x, generator=None, *, bpda=False):
        noise = torch.randn(x.shape, generator=generator, device=x.device) * 0.2
        return (x + noise).clamp(0, 1)


def test_random_pipeline_returns_and_honours_seeds(reference, fashion_test):
    clf = DefendedClassifier(reference.classifier, [GaussianNoise()], reference.class_names, reference.config)  # type: ignore[list-item]
    x = fashion_test.as_float(0, 4)
    with _serve(clf, max_queue_delay_ms=50) as srv:
        url = f"127.0.0.1:{srv.port}"
        with cf.ThreadPoolExecutor(6) as pool:  # concurrent requests with different seeds
            results = list(pool.map(lambda s: (s, _one(url, x, parameters={"seed": s})), [1, 2, 3, 1, 2, 3]))
        for s, (code, message, resp) in results:
            assert code == grpc.StatusCode.OK, message
            assert resp.parameters["seed"].int64_param == s
            np.testing.assert_allclose(outputs_of(resp)["PROBS"], clf.predict(x, seed=s).probs, atol=1e-5)
        code, _, resp = _one(url, x)  # no seed: the server draws one and returns it
        drawn = resp.parameters["seed"].int64_param
        np.testing.assert_allclose(outputs_of(resp)["PROBS"], clf.predict(x, seed=drawn).probs, atol=1e-5)
        with RemoteClassifier(url) as rc:
            assert rc.random and rc.predict(x, seed=7).seed == 7
            np.testing.assert_allclose(rc.predict(x, seed=7).probs, clf.predict(x, seed=7).probs, atol=1e-5)


class FakeDetector(DefendedClassifier):
    """Detector score = mean pixel value; flagged above 0.3 (stands in for a fitted detector)."""

    def predict(self, x, seed=None):
        p = super().predict(x, seed)
        score = np.asarray(x, np.float32).reshape(len(p), -1).mean(1)
        return Prediction(p.labels, p.probs, score, score > 0.3, p.seed)


def test_detector_score_and_flag_on_the_wire(reference, fashion_test):
    cfg = dataclasses.replace(reference.config, detector=DefenseEntry("fake", None))
    clf = FakeDetector(reference.classifier, [], reference.class_names, cfg)
    x = fashion_test.as_float(0, 32)
    score = x.reshape(32, -1).mean(1)
    assert 0 < (score > 0.3).sum() < 32
    with _serve(clf) as srv:
        code, message, resp = _one(f"127.0.0.1:{srv.port}", x)
        assert code == grpc.StatusCode.OK, message
        out = outputs_of(resp)
        np.testing.assert_allclose(out["DETECTOR_SCORE"].ravel(), score, rtol=1e-6)
        np.testing.assert_array_equal(out["FLAGGED"].ravel(), score > 0.3)
        with RemoteClassifier(f"127.0.0.1:{srv.port}") as rc:
            assert rc.detector == "fake"
            pred = rc.predict(x)
            np.testing.assert_array_equal(pred.flagged, score > 0.3)
        assert _metric(prom_text(srv), "advshield_flagged_total") == 2 * (score > 0.3).sum()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls(tmp_path, reference, fashion_test):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    x = fashion_test.as_float(0, 2)
    with _serve(reference, tls_cert=str(cert), tls_key=str(key)) as srv:
        url = f"127.0.0.1:{srv.port}"
        with RemoteClassifier(url, root_certificates=str(cert)) as rc:
            np.testing.assert_array_equal(rc.predict(x).labels, reference.predict(x).labels)
        assert _one(url, x, timeout=3)[0] == grpc.StatusCode.UNAVAILABLE  # plaintext client: no handshake


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_a_bad_tls_certificate_or_key_is_a_clear_error(tmp_path, reference):
    from advshield.plugin.server import ServeError

    cert, key, other = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    subprocess.run(["openssl", "genrsa", "-out", str(other), "2048"], check=True, capture_output=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for c, k in ((key, cert), (cert, other), (junk, key), (cert, junk)):  # swapped, mismatched, invalid
        with pytest.raises(ServeError, match=f"cannot load TLS certificate/key {re.escape(str(c))} / {re.escape(str(k))}"):
            ScoringServer(reference, ServeSpec(port=0, tls_cert=str(c), tls_key=str(k)), model_name=MODEL).start()


# --- graceful shutdown ----------------------------------------------------------------------------

def test_stop_finishes_in_flight_requests_and_refuses_new_ones(reference, fashion_test):
    x = fashion_test.as_float(0, 1)
    srv = _serve(Recording(reference, delay=0.8), grace_s=5)
    url = f"127.0.0.1:{srv.port}"
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(r=_one(url, x)))
    t.start()
    time.sleep(0.3)  # the request is now inside the (slow) classifier call
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    time.sleep(0.1)
    late = _one(url, x, timeout=2)
    t.join(10)
    stopper.join(10)
    code, message, resp = box["r"]
    assert code == grpc.StatusCode.OK, message
    assert outputs_of(resp)["PROBS"].shape == (1, 10)
    assert late[0] == grpc.StatusCode.UNAVAILABLE
    assert srv.wait(0)


def test_sigterm_stops_the_server_gracefully(pipeline_path, tmp_path, fashion_test):
    srv = start_server(pipeline_path, tmp_path / "server.log")
    x = fashion_test.as_float(0, 1)
    try:
        assert _one(srv.url, x)[0] == grpc.StatusCode.OK
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(20) == 0
        events = [r.get("event") for r in srv.logs()]
        assert events.index("signal") < events.index("stopping") < events.index("stopped")
        assert _one(srv.url, x, timeout=2)[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_workers_share_the_port_and_stop_together(pipeline_path, tmp_path, fashion_test, reference):
    """serve.workers = 2: two processes listen on one port; requests from separate connections
    reach both (each worker's own metrics count its share, together every request), answers equal
    the in-process pipeline's; SIGTERM to the parent drains and stops both, exit status 0."""
    log = tmp_path / "server.log"
    srv = start_server(pipeline_path, log, "--workers", "2", "--metrics-port", "0")
    x = fashion_test.as_float(0, 2)
    expected = reference.predict(torch.from_numpy(x)).probs
    try:
        t_end = time.monotonic() + 60
        while len(listening := [r for r in srv.logs() if r.get("event") == "listening"]) < 2:
            assert time.monotonic() < t_end, log.read_text()
            time.sleep(0.2)
        assert {r["port"] for r in listening} == {srv.port}
        workers = next(r for r in srv.logs() if r.get("event") == "workers")["pids"]
        assert len(set(workers)) == 2 and srv.proc.pid not in workers

        def session(_):
            codes = []
            for _ in range(4):  # a new connection each time: the kernel picks a worker per connection
                with grpc.insecure_channel(srv.url, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                    code, message, resp = call(service_pb2_grpc.GRPCInferenceServiceStub(ch), raw_request(
                        MODEL, [(P.INPUT_PIXELS, "FP32", list(x.shape), x.tobytes())]), timeout=20)
                assert code == grpc.StatusCode.OK, message
                np.testing.assert_allclose(outputs_of(resp)["PROBS"], expected, rtol=0, atol=1e-5)
                codes.append(code)
            return len(codes)

        with cf.ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(session, range(8))) == 32
        counts = [_metric(_metrics(r["metrics_port"]), "advshield_requests_total", method="ModelInfer", code="OK")
                  for r in listening]
        assert sum(counts) == 32 and min(counts) > 0, counts
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, log.read_text()[-3000:]
        for pid in workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert sum(r.get("event") == "stopped" for r in srv.logs()) == 3  # each worker, then the parent
    finally:
        srv.stop()


def test_workers_need_a_pipeline_file(pipeline_path):
    cfg = dataclasses.replace(load_pipeline(pipeline_path), source=None)  # as loads_pipeline gives it
    with pytest.raises(ServeError, match=r"serve.workers > 1 needs a pipeline file"):
        serve(cfg, ServeSpec(port=0, workers=2))


# --- the same contract as the generated Triton ensemble ---------------------------------------

@pytest.mark.slow
def test_same_clients_work_against_triton(server, client, pipeline_path, tmp_path, fashion_test, reference):
    """Both servers report the same model metadata; tritonclient and RemoteClassifier get the same
    answers from either (needs the `triton` extra: the nvidia-pytriton wheel's tritonserver)."""
    from advshield.deploy.triton import generate_repository, serve_repository
    from advshield.deploy.tritonserver import TritonError, find_triton

    try:
        find_triton()
    except TritonError as e:
        pytest.skip(f"no tritonserver here: {e}")
    repo = generate_repository(pipeline_path, tmp_path / "repo", classifier_backend="python", max_batch_size=32)
    triton = serve_repository(repo, threads=1)
    try:
        tc = grpcclient.InferenceServerClient(triton.url)
        ours = client.get_model_metadata(MODEL, headers=server.headers, as_json=True)
        theirs = tc.get_model_metadata(MODEL, as_json=True)
        for key in ("inputs", "outputs"):
            assert sorted(ours[key], key=str) == sorted(theirs[key], key=str)
        pngs = _pngs(fashion_test, 0, 16)
        a = client.infer(MODEL, [_image_input(pngs)], headers=server.headers)
        b = tc.infer(MODEL, [_image_input(pngs)])
        for name in P.OUTPUTS:
            np.testing.assert_allclose(a.as_numpy(name), b.as_numpy(name), atol=1e-5)
        with RemoteClassifier(triton.url) as rt, RemoteClassifier(server.url, token=TOKEN) as ra:
            x = torch.from_numpy(fashion_test.as_float(0, 40))
            np.testing.assert_allclose(rt.predict(x).probs, ra.predict(x).probs, atol=1e-5)
            assert rt.class_names == ra.class_names == reference.class_names
        with pytest.raises(InferenceServerException) as e:
            tc.infer(MODEL, [_image_input([b"junk"])])
        assert _code(e.value) == "INVALID_ARGUMENT" and "IMAGE[0]" in e.value.message()
        tc.close()
    finally:
        triton.stop()


# --- configuration --------------------------------------------------------------------------------

def test_serve_section_parsing(tmp_path):
    base = "[pipeline]\nname='m'\n[model]\npath='m.onnx'\n"
    cfg = loads_pipeline(base + "[serve]\nport=9000\nmax_batch_size=8\ntoken_file='tok'\n", tmp_path)
    spec = serve_spec(cfg, port=0, max_queue_delay_ms=None)
    assert (spec.port, spec.max_batch_size, spec.max_queue_delay_ms) == (0, 8, 2.0)
    assert spec.token_file == str(tmp_path / "tok")
    with pytest.raises(ConfigError, match="serve: unknown key 'batch'"):
        serve_spec(loads_pipeline(base + "[serve]\nbatch=3\n", tmp_path))
    with pytest.raises(ConfigError, match=r"serve.max_batch_size: must be within \[1, 4096\], got 0"):
        serve_spec(loads_pipeline(base + "[serve]\nmax_batch_size=0\n", tmp_path))
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        ServeSpec(tls_cert="c.pem")
    with pytest.raises(ConfigError, match=r"serve\.port: expected an integer"):
        serve_spec(loads_pipeline(base + "[serve]\nport='80'\n", tmp_path))


def test_port_in_use_is_a_clear_error(reference):
    import socket

    from advshield.plugin.server import ServeError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            ScoringServer(reference, ServeSpec(port=port), model_name=MODEL).start()


def test_seed_parameter_is_strict():
    """One validator for both servers: an int64, or 1 to 19 ASCII digits; nothing else."""
    assert P.parse_seed(0) == 0 and P.parse_seed(2**63 - 1) == 2**63 - 1
    assert P.parse_seed("42") == 42 and P.parse_seed("0" * 19) == 0 and P.parse_seed(str(2**63 - 1)) == 2**63 - 1
    for bad in ("\u00b2", "\u0661\u0662", "9" * 5000, "0" * 20, str(2**63), "", " 7", "7\n", "+7", "-1", "1_000",
                True, 1.0, None, -1, 2**63):
        with pytest.raises(P.ParameterError, match=r"parameter 'seed' must be an integer in \[0, 2\*\*63\)") as e:
            P.parse_seed(bad)
        assert len(str(e.value)) < 300


def test_protocol_bytes_round_trip():
    items = [b"", b"a", bytes(range(256)) * 3]
    raw = P.serialize_bytes(items)
    assert P.deserialize_bytes(raw, 3) == items
    with pytest.raises(P.WireFormatError, match="inside the length prefix of element 3"):
        P.deserialize_bytes(raw, 4)
    with pytest.raises(P.WireFormatError, match="unexpected trailing bytes"):
        P.deserialize_bytes(raw + b"!", 3)
    cfg = P.model_config("m", channels=1, height=28, width=28, num_classes=10, max_batch_size=8,
                         class_names=("a",) * 10, detector="squeeze", random=True)
    assert [i.name for i in cfg.input] == ["IMAGE", "PIXELS"] and list(cfg.output[0].dims) == [-1, 10]
    assert cfg.max_batch_size == 0 and cfg.parameters["max_batch_size"].string_value == "8"
    assert cfg.parameters["random"].string_value == "true"


def test_pipeline_file_loads(pipeline_path):
    assert load_pipeline(pipeline_path).pipeline.name == MODEL
