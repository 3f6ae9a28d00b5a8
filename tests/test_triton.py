"""The generated Triton repository, served by a real tritonserver (the nvidia-pytriton wheel's).

One session server on loopback free ports loads three generated ensembles from one repository:

* ``tdet``: bit depth + median, squeeze detector with ``reject`` (extra classifier pass per squeezer);
* ``tfeat``: patch replacement on the image and on the first feature layer (head -> replacement
  -> tail) plus a one-squeezer detector, so each pass runs through the split model;
* ``trand``: Gaussian noise + random resize-and-pad (seeded per request).

Scores through gRPC (advshield's ``RemoteClassifier``, i.e. tritonclient) are compared with the
in-process ``DefendedClassifier`` on real Fashion-MNIST test images. Artifacts are fitted on a
few hundred training images so the session set-up stays short.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from advshield.cli import main
from advshield.core.errors import ArtifactError, ConfigError
from advshield.core.hashing import sha256_file
from advshield.deploy import runtime as R
from advshield.deploy.triton import (
    DeploySpec,
    deploy_spec,
    generate_repository,
    read_config,
    serve_repository,
    verify_repository,
)
from advshield.deploy.tritonserver import SHM_DIR, TritonError, start_triton
from advshield.plugin import protocol as P
from advshield.plugin.client import RemoteClassifier, RemoteError, serving_parity
from advshield.plugin.config import load_pipeline
from advshield.plugin.decode import encode_png
from advshield.plugin.pipeline import DefendedClassifier

HEADER = """
[pipeline]
name = "{name}"

[model]
path = "{model}"

[input]
channels = 1
height = 28
width = 28
resize = "exact"

[data]
dataset = "fashion-mnist"
"""

PIPELINES = {
    "tdet": """
[[defenses]]
type = "bit_depth"
bits = 5

[[defenses]]
type = "median"
size = 2

[detector]
type = "squeeze"
fpr = 0.05
artifact = "threshold"
reject = true

[artifacts.threshold]
path = "artifacts/tdet_threshold.json"

[deploy]
max_batch_size = 32
max_queue_delay_us = 50000
preferred_batch_sizes = [8, 16]
classifier_instances = 2

[fit]
samples = 1
calibration = 400
""",
    "tfeat": """
[[defenses]]
type = "patch_replacement"
layer = "image"
radius = 1
stride = 1
codewords = 64
sample = 8192
fit_images = 300
iterations = 5
artifact = "image_codebook"

[[defenses]]
type = "patch_replacement"
layer = "relu"
depth = 8
radius = 1
stride = 2
codewords = 32
sample = 4096
fit_images = 100
iterations = 5
strategy = "linf"
eps = 0.5
artifact = "relu_codebook"

[detector]
type = "squeeze"
squeezers = [{type = "bit_depth", bits = 3}]
fpr = 0.1
artifact = "threshold"

[artifacts.image_codebook]
path = "artifacts/tfeat_image.npy"

[artifacts.relu_codebook]
path = "artifacts/tfeat_relu.npy"

[artifacts.threshold]
path = "artifacts/tfeat_threshold.json"

[deploy]
max_batch_size = 16
response_cache = true

[fit]
samples = 300
calibration = 200
""",
    "trand": """
[[defenses]]
type = "gaussian_noise"
sigma = 0.05

[[defenses]]
type = "random_resize_pad"
min_size = 26
max_size = 30
padded_size = 32

[deploy]
max_batch_size = 32
max_queue_delay_us = 20000
response_cache = true
""",
}


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pipelines(tmp_path_factory, model_path):
    """The three pipeline files, their artifacts fitted (``advshield fit``'s code, small samples)."""
    from advshield.plugin.fitting import fit_pipeline, fit_spec

    folder = tmp_path_factory.mktemp("triton_pipelines")
    paths = {}
    for name, body in PIPELINES.items():
        path = folder / f"{name}.toml"
        path.write_text(HEADER.format(name=name, model=model_path.as_posix()) + body)
        cfg = load_pipeline(path)
        fit_pipeline(cfg, fit_spec(cfg), progress=False)
        paths[name] = path
    return paths


@pytest.fixture(scope="session")
def repository(pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton") / "models"
    return {name: generate_repository(path, root, classifier_backend="python") for name, path in pipelines.items()}


@pytest.fixture(scope="session")
def triton(repository, tmp_path_factory):
    """The wheel's tritonserver on loopback free ports with the three ensembles loaded."""
    root = next(iter(repository.values())).root
    log = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    server = serve_repository(root, list(repository), log_path=log, threads=1)
    prefix = server.shm_prefix
    assert [p for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]  # the regions stop() must remove
    yield server
    # after every test (the malformed and mixed-traffic ones included): SIGTERM unloads every
    # model and exits 0, its shared memory and its temporary folder are gone
    assert server.stop() == 0, server.log()[-4000:]
    assert not [p for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]
    assert not server.workdir.exists(), sorted(p.name for p in server.workdir.iterdir())


@pytest.fixture(scope="session")
def references(pipelines):
    return {name: DefendedClassifier.from_config(path) for name, path in pipelines.items()}


@pytest.fixture(scope="session")
def remotes(triton, repository):
    clients = {name: RemoteClassifier(triton.url, name) for name in repository}
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture(scope="session")
def images(fashion_test):
    return torch.from_numpy(fashion_test.as_float(0, 32))


# --- generation (no server) ------------------------------------------------------------------------

def test_configs_follow_the_wire_contract_and_the_deploy_section(repository):
    """Every config.pbtxt parses back through the protobuf schema; the ensemble has the tensors and
    parameters of advshield.plugin.protocol; batching, instances and the cache follow [deploy]."""
    mc = grpcclient.model_config_pb2
    det = repository["tdet"]
    ens = det.config("tdet")
    public = P.model_config("tdet", channels=1, height=28, width=28, num_classes=10, max_batch_size=32)
    # not batching (no 32-bit batch wrap at the door), the contract's limit a parameter
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    assert ens.parameters[P.CONFIG_MAX_BATCH].string_value == "32"
    assert list(ens.input) == list(public.input) and list(ens.output) == list(public.output)
    assert json.loads(ens.parameters[P.CONFIG_CLASS_NAMES].string_value)[0] == "T-shirt/top"
    assert ens.parameters[P.CONFIG_DETECTOR].string_value == "squeeze"
    assert ens.parameters[P.CONFIG_RANDOM].string_value == "false"
    # detector: the classifier runs on the defended batch and on each of the 2 squeezed copies
    steps = [s.model_name for s in ens.ensemble_scheduling.step]
    assert steps == ["tdet__preprocess"] + ["tdet__classifier"] * 3 + ["tdet__postprocess"]
    pre = det.config("tdet__preprocess")
    assert [o.name for o in pre.output] == [R.DEFENDED, "SQUEEZED_1", "SQUEEZED_2"]
    assert pre.backend == "python" and pre.dynamic_batching.max_queue_delay_microseconds == 50000
    assert list(pre.dynamic_batching.preferred_batch_size) == [8, 16]
    clf = det.config("tdet__classifier")
    assert clf.instance_group[0].count == 2 and clf.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert [i.name for i in clf.input] == ["images"] and list(clf.output[0].dims) == [10]

    # feature layer: head -> features -> tail for the defended pass and the squeezed pass
    feat = repository["tfeat"]
    steps = [s.model_name for s in feat.config("tfeat").ensemble_scheduling.step]
    chain = ["tfeat__segment0", "tfeat__features0", "tfeat__segment1"]
    assert steps == ["tfeat__preprocess", *chain, *chain, "tfeat__postprocess"]
    f0 = feat.config("tfeat__features0")
    assert list(f0.input[0].dims) == [32, 28, 28] and f0.parameters["layer"].string_value == "relu"

    # random pipeline: the response cache stays off even though [deploy] asks for it
    rnd = repository["trand"]
    assert rnd.random and rnd.config("trand").parameters[P.CONFIG_RANDOM].string_value == "true"
    assert not rnd.config("trand").response_cache.enable
    assert all(not rnd.config(m).response_cache.enable for m in rnd.models if m != "trand__classifier")
    assert det.config("tdet").response_cache.enable is False  # not asked for
    assert repository["tfeat"].config("tfeat").response_cache.enable  # asked for, deterministic
    assert {p.name for p in (det.root / "tdet" / "1").iterdir()} == {".keep"}


def test_gpu_target_uses_the_onnxruntime_backend(pipelines, tmp_path):
    repo = generate_repository(pipelines["tdet"], tmp_path, gpu=True, gpus=[0, 1], max_batch_size=16)
    clf = repo.config("tdet__classifier")
    mc = grpcclient.model_config_pb2
    assert clf.backend == "onnxruntime" and clf.default_model_filename == "model.onnx"
    assert clf.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and list(clf.instance_group[0].gpus) == [0, 1]
    assert not (tmp_path / "tdet__classifier" / "1" / "model.py").exists()
    assert repo.config("tdet__preprocess").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert repo.config("tdet__postprocess").instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert all(repo.config(m).max_batch_size == 16 for m in repo.models if m != "tdet")
    assert repo.config("tdet").parameters[P.CONFIG_MAX_BATCH].string_value == "16"  # the ensemble: not batching
    with pytest.raises(ConfigError, match="exist already"):
        generate_repository(pipelines["tdet"], tmp_path)
    with pytest.raises(TritonError, match="lacks; generate the repository with --classifier-backend python"):
        serve_repository(repo)


def test_artifacts_are_copied_with_their_hashes(repository, pipelines):
    feat = repository["tfeat"]
    manifest = verify_repository(feat.root, "tfeat")
    cfg = load_pipeline(pipelines["tfeat"])
    src = sha256_file(cfg.artifact_path("relu_codebook"))
    assert manifest["inputs_sha256"]["artifacts.relu_codebook"] == src
    model_toml = load_pipeline(feat.root / "tfeat__features0" / "1" / "pipeline.toml")
    assert model_toml.artifacts["relu_codebook"].sha256 == src
    assert set(model_toml.artifacts) == {"relu_codebook"}  # each model gets only what it reads
    assert sha256_file(model_toml.artifact_path("relu_codebook")) == src
    assert set(load_pipeline(feat.root / "tfeat__preprocess" / "1" / "pipeline.toml").artifacts) == {"image_codebook"}
    assert set(load_pipeline(feat.root / "tfeat__postprocess" / "1" / "pipeline.toml").artifacts) == {"threshold"}
    assert sha256_file(feat.root / "tfeat__segment0" / "1" / "model.onnx") == manifest["files"]["tfeat__segment0/1/model.onnx"]


def test_tampered_repository_is_refused(repository, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repository["tdet"].root, copy)
    verify_repository(copy, "tdet")
    (copy / "tdet__postprocess" / "1" / "artifacts" / "threshold.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"tdet__postprocess/1/artifacts/threshold.json has sha256"):
        verify_repository(copy, "tdet")


def test_deploy_section_is_validated(pipelines):
    cfg = load_pipeline(pipelines["tdet"])
    assert deploy_spec(cfg).max_batch_size == 32 and deploy_spec(cfg, max_batch_size=16).max_batch_size == 16
    with pytest.raises(ConfigError, match=r"deploy.preferred_batch_sizes: each must be within \[1, max_batch_size = 4\]"):
        DeploySpec(max_batch_size=4, preferred_batch_sizes=(8,))
    with pytest.raises(ConfigError, match=r"deploy.gpus: \[0\] given but gpu = false"):
        DeploySpec(gpus=(0,))


def test_preprocess_runtime_isolates_a_bad_request(pipelines, images):
    """The batch function the Python model runs, without a server: a corrupt image or bad pixels
    is an error naming the tensor and index; the other requests give the in-process numbers."""
    pre = R.Preprocess(pipelines["tdet"])
    with pytest.raises(R.RequestError, match=r"IMAGE\[1\]: not a PNG or JPEG image"):
        pre.parse(np.array([[encode_png(images[0].numpy())], [b"junk"]], dtype=object), None)
    with pytest.raises(R.RequestError, match=r"PIXELS: pixels must lie in \[0, 1\]"):
        pre.parse(None, np.full((1, 1, 28, 28), 2.0, np.float32))
    with pytest.raises(R.RequestError, match="send one input per request"):
        pre.parse(None, None)
    with pytest.raises(R.RequestError, match=r"parameter 'seed' must be an integer in \[0, 2\*\*63\), got -3"):
        pre.parse(None, images[:1].numpy(), '{"seed": -3}')
    jobs = [pre.parse(None, images[:3].numpy()), pre.parse(None, images[3:8].numpy())]
    out = pre.run(jobs)
    assert [o[0].shape[0] for o in out] == [3, 5] and len(out[0]) == 3  # defended + 2 squeezed
    ref = DefendedClassifier.from_config(pipelines["tdet"])
    np.testing.assert_array_equal(np.concatenate([o[0] for o in out]), ref.defend(images[:8]).numpy())


def test_run_isolated_gives_only_the_failing_request_its_error():
    def fn(jobs):
        if any(j.seed == 13 for j in jobs):
            raise ValueError("unlucky")
        return [j.seed for j in jobs]

    out = R.run_isolated(fn, [R.Job(np.zeros(1), s) for s in (1, 13, 2)])
    assert out[0] == 1 and isinstance(out[1], ValueError) and out[2] == 2
    assert R.parse_seed('{"seed": "42"}') == 42 and R.parse_seed("{}") is None
    for bad in ('{"seed": true}', '{"seed": 1.5}', f'{{"seed": {2**63}}}', '{"seed": "\u00b2"}',
                '{"seed": "\u0661\u0662"}', json.dumps({"seed": "9" * 5000}), '{"seed": "-1"}'):
        with pytest.raises(R.RequestError, match="parameter 'seed'"):
            R.parse_seed(bad)


# --- against the running server --------------------------------------------------------------------

def test_ensembles_load_and_health_endpoints_answer(triton, repository):
    assert triton.http_status("/v2/health/live") == 200
    assert triton.http_status("/v2/health/ready") == 200
    for name in repository:
        assert triton.http_status(f"/v2/models/{name}/ready") == 200
    client = grpcclient.InferenceServerClient(triton.url)
    assert client.is_server_live() and client.is_server_ready()
    assert all(client.is_model_ready(m) for r in repository.values() for m in r.models)
    meta = client.get_model_metadata("tdet", as_json=True)
    assert meta["platform"] == "ensemble"
    assert {(t["name"], t["datatype"], tuple(map(int, t["shape"]))) for t in meta["inputs"] + meta["outputs"]} == {
        (t.name, t.datatype, t.shape) for t in P.input_tensors(1, 28, 28) + P.output_tensors(10)}
    client.close()


def test_deterministic_scores_equal_the_in_process_pipeline(remotes, references, images):
    remote, ref = remotes["tdet"], references["tdet"]
    assert remote.detector == "squeeze" and not remote.random and remote.max_batch_size == 32
    a, b = ref.predict(images), remote.predict(images)
    np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(b.labels, a.labels)
    np.testing.assert_allclose(b.score, a.score, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(b.flagged, a.flagged)
    assert a.flagged.any() and (a.labels[a.flagged] == -1).all()  # reject = true: flagged images get -1
    c = remote.predict_bytes([encode_png(x) for x in images.numpy()])  # decoded by the server
    np.testing.assert_allclose(c.probs, a.probs, rtol=0, atol=1e-6)


def test_feature_layer_ensemble_matches_in_process(remotes, references, images):
    ref = references["tfeat"]
    assert type(ref.classifier).__name__ == "SplitClassifier" and ref.classifier.cuts == ("relu",)
    report = serving_parity(ref, remotes["tfeat"], images[:16])
    assert report["max_abs_prob_diff"] <= 1e-5 and report["label_agreement"] == 1.0
    assert report["max_abs_score_diff"] <= 1e-5 and report["flag_agreement"] == 1.0


def test_deterministic_ensemble_answers_repeats_from_the_response_cache(triton, remotes, images):
    """tfeat asks for the response cache ([deploy] response_cache): a repeated request is a cache hit
    with the same answer (the server was started with a cache because of it)."""
    assert remotes["tfeat"].client.get_model_config("tfeat").config.response_cache.enable
    x = images[16:20]
    first = remotes["tfeat"].predict(x)
    hits = _cache_hits(remotes["tfeat"].client, "tfeat")
    again = remotes["tfeat"].predict(x)
    assert _cache_hits(remotes["tfeat"].client, "tfeat") == hits + 1
    np.testing.assert_array_equal(again.probs, first.probs)


def test_black_box_attacks_query_the_ensemble_as_they_query_the_pipeline_in_process(remotes, references, images,
                                                                                    fashion_test):
    """Square and HopSkipJump through the detector ensemble (reject = true: a flagged answer is
    label -1) take the same path, query for query, as against the in-process pipeline, and what
    they return as a success is misclassified and unflagged there."""
    from advshield.attacks.oracle import Oracle
    from advshield.attacks.registry import run_attack

    x = images[:8]
    y = torch.from_numpy(np.asarray(fashion_test.labels[:8], np.int64))
    for name, hyper in (("square_linf", {"eps": 0.1, "queries": 60}), ("hsj_l2", {"queries": 120})):
        o_remote, o_local = Oracle(remotes["tdet"], 8, seed=1), Oracle(references["tdet"], 8, seed=1)
        a = run_attack(name, o_remote, x, y, seed=1, **hyper)
        b = run_attack(name, o_local, x, y, seed=1, **hyper)
        assert torch.allclose(a, b, atol=1e-6) and o_remote.queries.tolist() == o_local.queries.tolist()
        pred = references["tdet"].predict(a)
        won = (pred.labels != y.numpy()) & (pred.labels >= 0)
        assert won.any() and not (won & pred.flagged).any()


def test_random_pipeline_with_the_same_seed(remotes, references, images):
    remote, ref = remotes["trand"], references["trand"]
    assert remote.random
    x = images[:16]
    for seed in (0, 12345):
        a, b = ref.predict(x, seed=seed), remote.predict(x, seed=seed)
        np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-5)
    assert np.abs(remote.predict(x, seed=1).probs - remote.predict(x, seed=2).probs).max() > 1e-3
    # without a seed every request draws its own (and the response cache is off): answers differ
    assert np.abs(remote.predict(x).probs - remote.predict(x).probs).max() > 1e-3


def test_a_corrupt_image_fails_its_request_only(triton, remotes, references, images):
    """Requests sent together are batched into one execute call (max_queue_delay 50 ms); the one
    with a corrupt image gets INVALID_ARGUMENT naming it, the others their in-process answers."""
    pngs = [encode_png(x) for x in images.numpy()]
    ref = references["tdet"].predict(images)
    before = _metric(triton, "advshield_rejected_requests_total", "tdet")
    requests = [pngs[0:4], pngs[4:8], [pngs[8], pngs[9][:60]], pngs[10:14]]  # image 9 truncated
    clients = [RemoteClassifier(triton.url, "tdet") for _ in requests]
    stats = grpcclient.InferenceServerClient(triton.url)
    executions = _executions(stats, "tdet__preprocess")
    barrier = threading.Barrier(len(requests))

    def send(k):
        barrier.wait()
        try:
            return clients[k].predict_bytes(requests[k])
        except RemoteError as e:
            return e

    with cf.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(send, range(len(requests))))
    batched = _executions(stats, "tdet__preprocess") - executions
    err = results[2]
    assert isinstance(err, RemoteError) and err.code == "INVALID_ARGUMENT"
    assert "IMAGE[1]: corrupt image" in str(err) or "IMAGE[1]: " in str(err), err
    for (lo, hi), res in zip([(0, 4), (4, 8), (10, 14)], [results[0], results[1], results[3]]):
        assert not isinstance(res, Exception), res
        np.testing.assert_allclose(res.probs, ref.probs[lo:hi], rtol=0, atol=1e-6)
    assert batched < len(requests), "the requests were not batched together"
    assert _metric(triton, "advshield_rejected_requests_total", "tdet") == before + 1
    # and the server keeps serving
    np.testing.assert_array_equal(remotes["tdet"].predict(images[:4]).labels, ref.labels[:4])
    for c in [*clients, stats]:
        c.close()


def test_detector_metrics_count_flagged_images(triton, remotes, references, images):
    before = _metric(triton, "advshield_flagged_images_total", "tdet")
    scored = _metric(triton, "advshield_scored_images_total", "tdet")
    pred = remotes["tdet"].predict(images)
    assert _metric(triton, "advshield_flagged_images_total", "tdet") == before + int(pred.flagged.sum())
    assert _metric(triton, "advshield_scored_images_total", "tdet") == scored + len(images)


def test_bad_pixels_and_seed_are_invalid_argument(triton):
    client = grpcclient.InferenceServerClient(triton.url)
    inp = grpcclient.InferInput(P.INPUT_PIXELS, [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(np.full((1, 1, 28, 28), np.nan, np.float32))
    with pytest.raises(grpcclient.InferenceServerException, match="NaN or infinite") as e:
        client.infer("tdet", [inp])
    assert "INVALID_ARGUMENT" in str(e.value.status())
    inp.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(grpcclient.InferenceServerException, match="parameter 'seed' must be an integer"):
        client.infer("trand", [inp], parameters={"seed": "abc"})
    client.close()


def test_a_bad_seed_fails_its_request_only(triton, references, images):
    """Seeds the old isdigit-then-int parsing let raise out of execute() (failing the whole batch
    with INTERNAL): each now gets INVALID_ARGUMENT naming the parameter, while good requests of
    other clients, batched into the same execute calls, get their in-process answers."""
    x = images[:2].numpy()
    ref = references["trand"].predict(images[:2], seed=7)
    bad = ["\u00b2", "9" * 5000, "\u0661\u0662", "0" * 20]
    kinds = [None, *bad] * 4  # None: a good request with seed 7
    clients = [grpcclient.InferenceServerClient(triton.url) for _ in kinds]
    barrier = threading.Barrier(len(kinds))

    def send(k):
        inp = grpcclient.InferInput(P.INPUT_PIXELS, [2, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(x)
        barrier.wait()
        try:
            return clients[k].infer("trand", [inp], parameters={"seed": kinds[k] or "7"})
        except grpcclient.InferenceServerException as e:
            return e

    with cf.ThreadPoolExecutor(len(kinds)) as pool:
        results = list(pool.map(send, range(len(kinds))))
    for kind, res in zip(kinds, results):
        if kind is None:
            assert not isinstance(res, Exception), res
            np.testing.assert_allclose(res.as_numpy(P.OUTPUT_PROBS), ref.probs, rtol=0, atol=1e-5)
        else:
            assert isinstance(res, grpcclient.InferenceServerException), kind[:20]
            assert "INVALID_ARGUMENT" in str(res.status()) and "parameter 'seed'" in res.message(), res
            assert "Traceback" not in res.message() and len(res.message()) < 400
    for c in clients:
        c.close()


def test_certification_runs_through_the_ensemble(triton, pipelines, tmp_path, capsys):
    """``advshield certify --target grpc://...``: randomized smoothing with the live ensemble as
    its base classifier (labels only)."""
    out = tmp_path / "cert"
    code = main(["certify", str(pipelines["tdet"]), "--target", f"grpc://{triton.url}/tdet", "--samples", "2",
                 "--n0", "8", "--n", "32", "--batch-size", "32", "--sigma", "0.25", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr()
    summary = json.loads((out / "certify_summary.json").read_text())
    assert "0.25" in summary["sigmas"] or 0.25 in summary["sigmas"]
    assert "RemoteClassifier" in capsys.readouterr().out


def test_transfer_examples_rescored_through_triton_keep_parity(remotes, references, twin, images, fashion_test):
    """Adversarial examples crafted elsewhere (FGSM on the twin of the model, a transfer attack
    on the defended pipeline), quantized to 8 bits, then re-scored through the live ensemble:
    same numbers as in process."""
    from advshield.attacks.gradient import fgsm
    from advshield.attacks.primitives import quantize

    labels = torch.from_numpy(fashion_test.labels[:16]).long()
    adv = quantize(fgsm(twin, images[:16], labels, eps=8 / 255))
    report = serving_parity(references["tdet"], remotes["tdet"], adv)
    assert report["max_abs_prob_diff"] <= 1e-6 and report["label_agreement"] == 1.0
    assert report["flag_agreement"] == 1.0


@pytest.mark.slow
def test_server_stop_removes_its_shared_memory(repository):
    """A second server (one light model): SIGTERM by PID, exit status 0, /dev/shm cleaned."""
    root = repository["tdet"].root
    server = start_triton(root, ["tdet__classifier"], timeout=60)
    pid, prefix = server.pid, server.shm_prefix
    assert [p for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]
    assert server.stop() == 0
    assert not [p for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_cli_generates_the_repository(pipelines, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["deploy", "triton", str(pipelines["trand"]), "--out", str(out), "--classifier-backend", "python",
                 "--max-batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "trand__preprocess" in text and "tritonserver" in text
    assert read_config(out / "trand" / "config.pbtxt").parameters[P.CONFIG_MAX_BATCH].string_value == "8"
    assert read_config(out / "trand__preprocess" / "config.pbtxt").max_batch_size == 8
    assert re.search(r"trand\s+ensemble\s+max_batch_size 8", text), text
    assert read_config(out / "trand__classifier" / "config.pbtxt").backend == "python"
    assert main(["deploy", "triton", str(pipelines["trand"]), "--out", str(out)]) == 2
    assert "exist already" in capsys.readouterr().err


def _cache_hits(client, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return int(stats.get("cache_hit", {}).get("count", 0))


def _executions(client, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("execution_count", 0))


def _metric(server, name: str, pipeline: str) -> float:
    deadline = time.monotonic() + 5
    while True:
        for line in server.metrics().splitlines():
            if line.startswith(name + "{") and f'pipeline="{pipeline}"' in line:
                return float(line.rsplit(" ", 1)[1])
        if time.monotonic() > deadline:
            return 0.0
        time.sleep(0.05)
