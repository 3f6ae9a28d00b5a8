"""A classifier Triton already serves, wrapped by advshield (issue 18), against a real tritonserver.

The repository holds ``zoo_cnn`` (tests/served_repo.py): the reference CNN exported as a model zoo
would (NHWC input normalized in 0-255 units, softmax output, its own tensor names), deployed with
a hand-written config.pbtxt and a Python-backend model.py that imports nothing of advshield (the
stand-in for a TensorRT plan). One tritonserver loads it; the tests then do what a team would:

* fit the squeeze detector through the served model, generate the ensemble around it by name into
  the same repository and load it into the running server;
* compare the ensemble, the in-process pipeline calling the served model over gRPC and the
  pipeline on the same ONNX file in ONNX Runtime (no server) on real test images;
* refuse configs that contradict the pipeline, naming every mismatch;
* run ``advshield serve`` with the remote classifier;
* audit with and without the ONNX twin (and refuse a twin that disagrees with the server).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from advshield.api import audit, info
from advshield.attacks.report.validate import validate_report
from advshield.cli import main
from advshield.core.errors import ConfigError, ParityError
from advshield.core.hashing import sha256_file
from advshield.deploy.triton import generate_repository, read_config, verify_repository
from advshield.deploy.tritonserver import start_triton
from advshield.plugin.client import RemoteClassifier, RemoteError
from advshield.plugin.config import load_pipeline
from advshield.plugin.fitting import fit_pipeline, fit_spec
from advshield.plugin.pipeline import DefendedClassifier
from advshield.plugin.served import ServedClassifier
from advshield.plugin.server import ScoringServer, ServeSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import served_repo as S
from server_helpers import free_port
from test_blackbox import FlakyProxy

DETECTOR = """
[[defenses]]
type = "bit_depth"
bits = 5

[detector]
type = "squeeze"
fpr = 0.05
artifact = "threshold"
reject = true

[artifacts.threshold]
path = "artifacts/wdet_threshold.json"

[fit]
samples = 1
calibration = 200
"""

AUDIT = """
[audit]
attacks = ["fgsm", {name = "pgd_linf", transfer = true, steps = 5}, {name = "square_linf", queries = 40}]
eps_linf = [0.1]
samples = 8
batch_size = 8
sanity_eps = 0.0
probe_samples = 0
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_path, surrogate_path):
    root = tmp_path_factory.mktemp("served")
    repo = root / "repo"
    zoo = S.zoo_onnx(model_path, root / "zoo_cnn.onnx")
    S.write_served_model(repo, zoo)
    wrong = S.zoo_onnx(surrogate_path, root / "not_the_served_model.onnx")  # a twin of another model
    sums = {f.relative_to(repo).as_posix(): sha256_file(f) for f in sorted((repo / S.NAME).rglob("*")) if f.is_file()}
    return {"root": root, "repo": repo, "zoo": zoo, "wrong": wrong, "sums": sums, "surrogate": surrogate_path}


@pytest.fixture(scope="module")
def triton(files):
    """The wheel's tritonserver with only the team's model loaded (explicit model control)."""
    server = start_triton(files["repo"], [S.NAME], threads=1, timeout=90)
    yield server
    assert server.stop() == 0, server.log()[-4000:]


def _write(files, name: str, text: str) -> Path:
    path = files["root"] / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pipelines(files, triton):
    """wdet: bit depth + squeeze detector around the served model, fitted through it; wref: the
    same pipeline on the zoo ONNX file in process (ONNX Runtime, no server)."""
    wdet = _write(files, "wdet", S.pipeline_text(pipeline="wdet", endpoint=triton.url, body=DETECTOR))
    fit_pipeline(load_pipeline(wdet), fit_spec(load_pipeline(wdet)), progress=False)
    ref = S.pipeline_text(pipeline="wref", twin=files["zoo"], body=DETECTOR)
    wref = _write(files, "wref", ref.replace('served = { endpoint = "", name = "zoo_cnn" }\n', ""))
    return {"wdet": wdet, "wref": wref}


@pytest.fixture(scope="module")
def ensemble(files, pipelines, triton):
    repo = generate_repository(pipelines["wdet"], files["repo"])
    client = grpcclient.InferenceServerClient(triton.url)
    client.load_model("wdet")  # into the running server, next to the model it calls
    client.close()
    return repo


@pytest.fixture(scope="module")
def images(fashion_test):
    return torch.from_numpy(fashion_test.as_float(0, 48))


def test_ensemble_calls_the_served_model_by_name_and_copies_nothing(files, ensemble):
    assert ensemble.models == ("wdet__preprocess", "wdet__postprocess", "wdet")
    ens = read_config(files["repo"] / "wdet" / "config.pbtxt")
    steps = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in ens.ensemble_scheduling.step]
    served = [s for s in steps if s[0] == S.NAME]
    assert [s[1] for s in served] == [{"images": "defended"}, {"images": "squeezed_1"}, {"images": "squeezed_2"}]
    assert [s[2] for s in served] == [{"probs": f"logits_{i}"} for i in range(3)]
    limit = ens.max_batch_size or int(ens.parameters["max_batch_size"].string_value)  # a non-batching ensemble
    assert limit == 16  # the served model's, not the [deploy] default of 64
    pre = read_config(files["repo"] / "wdet__preprocess" / "config.pbtxt")
    assert (pre.output[0].name, list(pre.output[0].dims)) == ("DEFENDED", [28, 28, 1])  # the model's NHWC
    post = read_config(files["repo"] / "wdet__postprocess" / "config.pbtxt")
    assert [list(i.dims) for i in post.input] == [[10]] * 3
    # the team's model: not copied, not changed, not in the manifest's generated files
    now = {f.relative_to(files["repo"]).as_posix(): sha256_file(f)
           for f in sorted((files["repo"] / S.NAME).rglob("*")) if f.is_file() and "__pycache__" not in f.parts}
    assert now == {k: v for k, v in files["sums"].items()}
    manifest = verify_repository(files["repo"], "wdet")
    assert not [f for f in manifest["files"] if f.startswith(f"{S.NAME}/")]
    assert manifest["served_model"]["config_sha256"] == files["sums"][f"{S.NAME}/config.pbtxt"]
    assert manifest["served_model"]["layout"] == "nhwc" and manifest["served_model"]["output_kind"] == "probabilities"


def test_ensemble_served_pipeline_and_onnx_pipeline_agree(triton, ensemble, pipelines, images):
    onnx_ref = DefendedClassifier.from_config(pipelines["wref"]).predict(images)  # ONNX Runtime, no server
    served = DefendedClassifier.from_config(pipelines["wdet"])
    assert isinstance(served.classifier, ServedClassifier) and served.classifier.output == "probabilities"
    in_process = served.predict(images)  # defenses here, the served model over gRPC
    with RemoteClassifier(triton.url, "wdet") as remote:
        through = remote.predict(images)  # the whole ensemble in Triton
    for got in (in_process, through):
        assert np.abs(got.probs - onnx_ref.probs).max() < 1e-5
        assert np.array_equal(got.labels, onnx_ref.labels)
        assert np.abs(got.score - onnx_ref.score).max() < 1e-5
        assert np.array_equal(got.flagged, onnx_ref.flagged)
    assert (onnx_ref.labels == -1).any() or onnx_ref.flagged.sum() == 0  # reject = true: flagged -> -1
    assert np.array_equal(onnx_ref.labels == -1, onnx_ref.flagged)
    assert served.classifier.stats()["requests"] >= 3  # 48 images x 3 passes in requests of <= 16


def _repo_with(files, tmp_path, **edits) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(files["repo"] / S.NAME, repo / S.NAME)
    cfg = repo / S.NAME / "config.pbtxt"
    text = cfg.read_text()
    for old, new in edits.items():
        text = text.replace(old, new)
    cfg.write_text(text)
    return repo


def test_mismatching_config_is_refused_naming_every_mismatch(files, pipelines, tmp_path):
    repo = _repo_with(files, tmp_path, **{'"images"': '"input__0"', "dims: [ 28, 28, 1 ]": "dims: [ 32, 32, 3 ]",
                                          "dims: [ 10 ]": "dims: [ 1000 ]"})
    text = S.pipeline_text(pipeline="wbad", body=DETECTOR).replace(
        'name = "zoo_cnn" }', 'name = "zoo_cnn", input = "images", datatype = "FP16" }')
    bad = _write(files, "wbad", text + "\n[input]\nchannels = 1\n")
    with pytest.raises(ConfigError) as e:
        generate_repository(bad, repo)
    msg = str(e.value)
    assert "config.pbtxt" in msg and "'zoo_cnn'" in msg
    assert "served.input = 'images', the model's inputs are ['input__0']" in msg
    assert "classes: the pipeline names 10 classes, the model's output 'probs' has 1000" in msg
    bad2 = _write(files, "wbad2", S.pipeline_text(pipeline="wbad2", body=DETECTOR) + "\n[input]\nchannels = 1\n")
    with pytest.raises(ConfigError) as e:
        generate_repository(bad2, repo)
    msg = str(e.value)
    assert "input.channels: the pipeline says 1, the model's input 'input__0' [32, 32, 3] (NHWC) has 3" in msg
    assert "classes: the pipeline names 10 classes, the model's output 'probs' has 1000" in msg
    assert not (repo / "wbad2").exists() and not (repo / "wbad2__preprocess").exists()  # nothing written

    repo = _repo_with(files, tmp_path / "b", **{"TYPE_FP32\n    dims: [ 28": "TYPE_UINT16\n    dims: [ 28",
                                                "max_batch_size: 16": "max_batch_size: 0"})
    with pytest.raises(ConfigError, match=r"input datatype: 'images' is UINT16"):
        generate_repository(pipelines["wdet"], repo)
    repo = _repo_with(files, tmp_path / "c", **{"max_batch_size: 16": "max_batch_size: 0"})
    with pytest.raises(ConfigError, match=r"max_batch_size 0 .* the model must batch"):
        generate_repository(pipelines["wdet"], repo)
    big = _write(files, "wbig", S.pipeline_text(pipeline="wbig", body=DETECTOR) + "\n[deploy]\nmax_batch_size = 64\n")
    with pytest.raises(ConfigError, match=r"deploy.max_batch_size: 64 is more than 'zoo_cnn' takes \(max_batch_size 16"):
        generate_repository(big, files["repo"])
    with pytest.raises(ConfigError, match=r"holds no model 'zoo_cnn'.*models there: none"):
        generate_repository(pipelines["wdet"], tmp_path / "empty")
    feat = _write(files, "wfeat", S.pipeline_text(pipeline="wfeat") + '\n[[defenses]]\ntype = "bit_depth"\nbits = 4\n')
    nout = feat.read_text().replace('output = "probabilities"\n', "")
    with pytest.raises(ConfigError, match=r"model.output: say what 'zoo_cnn' outputs"):
        generate_repository(_write(files, "wauto", nout.replace("wfeat", "wauto")), _repo_with(files, tmp_path / "d"))


def test_live_metadata_mismatch_is_named(files, triton):
    text = S.pipeline_text(pipeline="wlive", endpoint=triton.url).replace(
        'name = "zoo_cnn" }', 'name = "zoo_cnn", output = "logits", datatype = "UINT8" }')
    with pytest.raises(ConfigError) as e:
        ServedClassifier(load_pipeline(_write(files, "wlive", text)))
    msg = str(e.value)
    assert "ModelMetadata and ModelConfig of model 'zoo_cnn'" in msg
    assert "output name: [model] served.output = 'logits', the model's outputs are ['probs']" in msg
    assert "input datatype: [model] served.datatype = 'UINT8', the model's input 'images' is FP32" in msg
    gone = S.pipeline_text(pipeline="wgone", endpoint=triton.url).replace('"zoo_cnn"', '"resnet50"')
    with pytest.raises(ConfigError, match=r"'resnet50' at .* is not ready .*ready models: .*zoo_cnn"):
        ServedClassifier(load_pipeline(_write(files, "wgone", gone)))


def test_serve_with_the_remote_classifier(pipelines, triton, images):
    defended = DefendedClassifier.from_config(pipelines["wdet"])
    srv = ScoringServer(defended, ServeSpec(port=0, max_batch_size=16, max_queue_delay_ms=20.0),
                        model_name="wdet").start()
    try:
        before = defended.classifier.stats()["requests"]
        with RemoteClassifier(f"127.0.0.1:{srv.port}", "wdet", batch_size=1, concurrency=8) as remote:
            got = remote.predict(images[:16])  # 16 one-image requests, 8 in flight
        ref = DefendedClassifier.from_config(pipelines["wref"]).predict(images[:16])
        assert np.abs(got.probs - ref.probs).max() < 1e-5 and np.array_equal(got.labels, ref.labels)
        assert np.array_equal(got.flagged, ref.flagged)
        sent = defended.classifier.stats()["requests"] - before
        # micro-batching: the server's batcher joins requests, each joined batch's 3 passes (defended
        # + 2 squeezed) go to the served model as requests of <= 16 images: fewer than 16 x 3
        assert 3 <= sent < 48
    finally:
        srv.stop()


def test_audit_without_twin_rests_on_transfer_and_black_box(files, pipelines, triton, tmp_path):
    text = S.pipeline_text(pipeline="wnotwin", endpoint=triton.url, surrogate=files["surrogate"]) + AUDIT
    path = _write(files, "wnotwin", text)
    result = audit(path, out=tmp_path / "audit", fresh=True, progress=False, certify=False)
    sources = {r["source"] for r in result.records}
    assert sources == {"clean", "transfer", "black-box"}  # fgsm (white-box) did not run
    basis = result.report["mode"]["verdict_basis"]
    assert basis["sources"] == ["transfer", "black-box"] and basis["white_box"] is False
    assert "no ONNX twin" in basis["reason"] and "ServedClassifier" in basis["classifier"]
    validate_report(json.loads(result.paths["report_json"].read_text()))
    md = result.paths["report_md"].read_text()
    assert "the verdict rests on: transfer, black-box attacks" in md and "no white-box attack: no ONNX twin" in md
    assert "rests on: transfer, black-box" in result.paths["report_html"].read_text()


def test_audit_with_a_parity_checked_twin(files, pipelines, triton, tmp_path):
    text = S.pipeline_text(pipeline="wtwin", endpoint=triton.url, twin=files["zoo"], surrogate=files["surrogate"])
    result = audit(_write(files, "wtwin", text + AUDIT), out=tmp_path / "audit", fresh=True, progress=False,
                   certify=False)
    assert "white-box" in {r["source"] for r in result.records}
    basis = result.report["mode"]["verdict_basis"]
    assert basis["sources"] == ["white-box", "transfer", "black-box"] and basis["white_box"] is True
    assert basis["twin_parity"]["max_abs_logit_diff"] < 1e-3 and basis["twin_parity"]["images"] == 40
    validate_report(json.loads(result.paths["report_json"].read_text()))
    fgsm = [r for r in result.records if r["attack"] == "fgsm"]
    assert fgsm and all(r["gradients"] > 0 for r in fgsm)


def test_a_twin_that_disagrees_with_the_server_is_refused(files, triton, tmp_path, capsys):
    text = S.pipeline_text(pipeline="wwrong", endpoint=triton.url, twin=files["wrong"]) + AUDIT
    path = _write(files, "wwrong", text)
    with pytest.raises(ParityError) as e:
        audit(path, out=tmp_path / "audit", fresh=True, progress=False, certify=False)
    msg = str(e.value)
    assert "white-box audit refused" in msg and "not_the_served_model.onnx" in msg and "'zoo_cnn'" in msg
    assert "max |logit difference|" in msg and "argmax agreement" in msg and "remove [model] path" in msg
    # advshield info --parity says the same before an audit is tried
    report = info(path, parity=True)
    assert report["served_parity"]["ok"] is False and report["served_model"]["layout"] == "nhwc"
    assert main(["info", str(path), "--parity"]) == 0
    assert "MISMATCH: a white-box audit would be refused" in capsys.readouterr().out


def test_served_classifier_sends_requests_concurrently(pipelines, images):
    clf = DefendedClassifier.from_config(pipelines["wdet"]).classifier
    with cf.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: clf(images[i * 12 : (i + 1) * 12]), range(4)))
    assert torch.allclose(torch.cat(outs), clf(images), atol=1e-6)
    clf.close()


def test_no_masking_warning_without_white_box_attacks():
    """black_box_beats_white_box compares with white-box successes; an audit without a twin has none."""
    from advshield.attacks.masking import check_black_box

    rows = [{"attack": "square_linf", "source": "black-box", "kind": "budget", "norm": "linf", "eps": 0.05,
             "sample": i, "success": True, "l2": 0.5, "linf": 0.05} for i in range(4)]
    assert check_black_box(rows, correct=4, tolerance=0.02) == []
    white = [{**r, "attack": "fgsm", "source": "white-box", "success": False} for r in rows]
    assert [w.code for w in check_black_box(white + rows, correct=4, tolerance=0.02)] == ["black_box_beats_white_box"]


class SlowProxy(FlakyProxy):
    """FlakyProxy that also holds every ModelInfer for ``delay`` seconds."""

    def __init__(self, upstream: str, fail: int, delay: float) -> None:
        super().__init__(upstream, fail)
        self.delay = delay

    def service(self, details):
        handler = super().service(details)
        if not details.method.endswith("/ModelInfer"):
            return handler
        inner = handler.unary_unary

        def slow(request, context):
            time.sleep(self.delay)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(slow)


def _proxied(triton, proxy):
    srv = grpc.server(futures.ThreadPoolExecutor(4), handlers=[proxy])
    port = free_port()
    srv.add_insecure_port(f"127.0.0.1:{port}")
    srv.start()
    return srv, f"127.0.0.1:{port}"


def test_served_classifier_retries_unavailable_and_keeps_its_deadline(files, triton, images):
    """The served model behind a real gRPC proxy that answers UNAVAILABLE, then one that is slow."""
    proxy = FlakyProxy(triton.url, fail=2)
    srv, url = _proxied(triton, proxy)
    try:
        cfg = load_pipeline(_write(files, "wflaky", S.pipeline_text(pipeline="wflaky", endpoint=url)))
        with ServedClassifier(cfg) as clf:
            direct = DefendedClassifier.from_config(_write(files, "wdirect", S.pipeline_text(
                pipeline="wdirect", endpoint=triton.url))).classifier
            assert torch.allclose(clf(images[:8]), direct(images[:8]))  # two UNAVAILABLE answers, retried
            assert clf.stats()["retries"] == 2 and proxy.failed == 2
    finally:
        srv.stop(0)
        proxy.channel.close()
    proxy = SlowProxy(triton.url, fail=0, delay=1.0)
    srv, url = _proxied(triton, proxy)
    try:
        text = S.pipeline_text(pipeline="wslow", endpoint=url).replace('name = "zoo_cnn" }',
                                                                       'name = "zoo_cnn", timeout_s = 0.2 }')
        with ServedClassifier(load_pipeline(_write(files, "wslow", text))) as clf:
            t0 = time.perf_counter()
            with pytest.raises(RemoteError) as e:
                clf(images[:4])
            assert e.value.code == "DEADLINE_EXCEEDED" and time.perf_counter() - t0 < 0.9
    finally:
        srv.stop(0)
        proxy.channel.close()


def test_a_pinned_version_is_checked_and_written_into_the_steps(files, pipelines, tmp_path):
    text = pipelines["wdet"].read_text()
    for version, ok in (("2", False), ("1", True)):
        pinned = text.replace('name = "zoo_cnn" }', f'name = "zoo_cnn", version = "{version}" }}').replace(
            'name = "wdet"', f'name = "wv{version}"')
        path = _write(files, f"wv{version}", pinned)
        repo = _repo_with(files, tmp_path / version)
        if not ok:
            with pytest.raises(ConfigError, match=r"'zoo_cnn' in .* has no version 2 \(versions there: 1\)"):
                generate_repository(path, repo)
            continue
        generate_repository(path, repo)
        ens = read_config(repo / f"wv{version}" / "config.pbtxt")
        assert {s.model_version for s in ens.ensemble_scheduling.step if s.model_name == S.NAME} == {1}
        assert {s.model_version for s in ens.ensemble_scheduling.step if s.model_name != S.NAME} == {-1}
