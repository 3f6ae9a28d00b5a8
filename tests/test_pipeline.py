"""Pipelines from the TOML file: round trip, step order, `advshield fit`, the defended classifier with
its detector, per-request seeds, and `advshield predict` through the CLI."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from advshield.cli import main
from advshield.core.data import Dataset, load_fashion_mnist
from advshield.core.errors import ArtifactError, ConfigError
from advshield.core.hashing import sha256_file
from advshield.core.resources import DEFAULT_PIPELINE
from advshield.defenses.base import Defense, verify_artifact, write_artifact_meta
from advshield.defenses.registry import build_defense, register_defense
from advshield.defenses.squeeze import JpegConfig, MedianConfig
from advshield.plugin.config import load_pipeline, loads_pipeline
from advshield.plugin.decode import encode_png
from advshield.plugin.fitting import FitSpec, fit_pipeline, fit_spec
from advshield.plugin.pipeline import DefendedClassifier

PIPELINES = Path(DEFAULT_PIPELINE).parent

EVERY_STEP = """
[[defenses]]
type = "jpeg"
quality = 60
[[defenses]]
type = "random_resize_pad"
min_size = 26
max_size = 29
padded_size = 30
interpolation = "bilinear"
[[defenses]]
type = "median"
size = 3
approximation = "mean"
[[defenses]]
type = "gaussian_noise"
sigma = 0.02
clip = false
[[defenses]]
type = "non_local_means"
search = 7
patch = 5
strength = 9.5
[[defenses]]
type = "bit_depth"
bits = 6

[detector]
type = "squeeze"
squeezers = [{type = "bit_depth", bits = 3}, {type = "median", size = 2}, {type = "non_local_means", search = 5, patch = 3, strength = 8.0}]
fpr = 0.1
artifact = "thr"
reject = true

[artifacts.thr]
path = "artifacts/thr.json"
"""

SQUEEZE = """
[[defenses]]
type = "bit_depth"
bits = 4

[detector]
type = "squeeze"
squeezers = [{type = "bit_depth", bits = 2}, {type = "median", size = 2}]
artifact = "thr"
reject = REJECT

[artifacts.thr]
path = "artifacts/thr.json"

[fit]
calibration = 400
"""

RANDOM = """
[[defenses]]
type = "random_resize_pad"
[[defenses]]
type = "gaussian_noise"
sigma = 0.05
"""


def write_pipeline(folder: Path, model_path: Path, body: str, name: str = "p.toml") -> Path:
    path = folder / name
    path.write_text(f'[pipeline]\nname = "test"\n[model]\npath = {json.dumps(str(model_path))}\n'
                    f'[data]\ndataset = "fashion-mnist"\n{body}')
    return path


# --- the file -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fashion_mnist_squeeze.toml", "fashion_mnist_random.toml"])
def test_example_pipelines_round_trip(name):
    cfg = load_pipeline(PIPELINES / name)
    text = cfg.dumps()
    again = loads_pipeline(text, root=cfg.root)
    assert again.to_dict() == cfg.to_dict()
    assert again.defenses == cfg.defenses and again.detector == cfg.detector and again.artifacts == cfg.artifacts
    assert again.dumps() == text


def test_every_step_type_in_any_order_round_trips(tmp_path, model_path):
    cfg = load_pipeline(write_pipeline(tmp_path, model_path, EVERY_STEP))
    assert [e.type for e in cfg.defenses] == ["jpeg", "random_resize_pad", "median", "gaussian_noise",
                                              "non_local_means", "bit_depth"]
    assert cfg.defenses[2].config.approximation == "mean" and cfg.defenses[3].config.clip is False
    assert cfg.detector is not None and cfg.detector.config.reject and cfg.detector.config.fpr == 0.1
    assert cfg.random  # random_resize_pad and gaussian_noise
    again = loads_pipeline(cfg.dumps(), root=cfg.root)
    assert again.to_dict() == cfg.to_dict() and again.defenses == cfg.defenses and again.detector == cfg.detector
    assert again.artifact_path("thr") == tmp_path / "artifacts" / "thr.json"


def test_pipeline_errors_name_the_step(tmp_path, model_path):
    with pytest.raises(ConfigError, match=r"defenses\[1\]\.type: unknown defense type 'blur'"):
        load_pipeline(write_pipeline(tmp_path, model_path, '[[defenses]]\ntype = "median"\n[[defenses]]\ntype = "blur"\n'))
    with pytest.raises(ConfigError, match=r"defenses\[0\]: unknown key 'bitz'"):
        load_pipeline(write_pipeline(tmp_path, model_path, '[[defenses]]\ntype = "bit_depth"\nbitz = 3\n'))
    with pytest.raises(ConfigError, match=r"detector: squeezers\[0\]\.type: 'gaussian_noise' is random"):
        load_pipeline(write_pipeline(tmp_path, model_path, '[detector]\ntype = "squeeze"\nsqueezers = [{type = "gaussian_noise"}]\n'))


def test_steps_run_in_file_order(tmp_path, model_path, onnx_classifier, fashion_test):
    x = torch.from_numpy(fashion_test.as_float(0, 16))
    # (a median commutes with bit-depth reduction, a monotone map of each pixel; not with JPEG)
    median, jpeg = build_defense("median", MedianConfig()), build_defense("jpeg", JpegConfig(quality=50))
    outputs = []
    for body in ('[[defenses]]\ntype = "median"\n[[defenses]]\ntype = "jpeg"\nquality = 50\n',
                 '[[defenses]]\ntype = "jpeg"\nquality = 50\n[[defenses]]\ntype = "median"\n'):
        clf = DefendedClassifier.from_config(write_pipeline(tmp_path, model_path, body), classifier=onnx_classifier)
        outputs.append(clf.defend(x))
    assert torch.equal(outputs[0], jpeg(median(x)))
    assert torch.equal(outputs[1], median(jpeg(x)))
    assert not torch.equal(outputs[0], outputs[1])


# --- fit, then serve with the detector --------------------------------------------------------------------

def test_fit_then_predict_with_the_detector(tmp_path, model_path, fashion_test):
    path = write_pipeline(tmp_path, model_path, SQUEEZE.replace("REJECT", "false"))
    cfg = load_pipeline(path)
    with pytest.raises(ArtifactError, match=r"artifacts\.thr: file not found"):
        DefendedClassifier.from_config(cfg)
    spec = fit_spec(cfg)
    assert spec == FitSpec(calibration=400)
    summary = fit_pipeline(cfg, spec, progress=False)
    thr = tmp_path / "artifacts" / "thr.json"
    assert summary["artifacts"]["thr"]["sha256"] == sha256_file(thr) == verify_artifact(thr)["sha256"]
    det = summary["detector"]
    assert det["samples"] == 400 and det["fpr_calibration"] <= 0.05
    # calibrated on held-out TRAIN images: the recorded data hash is that of the seeded train subset
    train = load_fashion_mnist("train")
    idx = np.random.default_rng(0).permutation(len(train))[:400]
    assert det["data_sha256"] == Dataset(train.images[idx], train.labels[idx], train.classes, "").sha256()

    clf = DefendedClassifier.from_config(cfg)
    x = torch.from_numpy(fashion_test.as_float(0, 300))
    pred = clf.predict(x)
    assert pred.seed is None and not clf.random
    np.testing.assert_allclose(pred.probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(pred.labels, pred.probs.argmax(1))
    assert pred.score is not None and pred.flagged is not None and pred.score.shape == (300,)
    np.testing.assert_array_equal(pred.flagged, pred.score > clf.detector.threshold)
    assert (pred.labels == fashion_test.labels[:300]).mean() > 0.88
    assert 0.0 < pred.flagged.mean() < 0.15  # about the 5% target on clean images (n = 300, n_cal = 400)
    # the score is the one the detector computes from the defended images
    with torch.no_grad():
        _, direct = clf.detector.logits_and_score(clf.defend(x), clf.classifier)
    np.testing.assert_allclose(pred.score, direct.numpy(), atol=1e-6)

    thr.write_text(thr.read_text().replace('"threshold": ', '"threshold": 0.0001 + '))  # tampering
    with pytest.raises(ArtifactError, match="does not match the expected"):
        DefendedClassifier.from_config(cfg)


def test_reject_gives_label_minus_one(tmp_path, model_path, fashion_test):
    cfg = load_pipeline(write_pipeline(tmp_path, model_path, SQUEEZE.replace("REJECT", "true")))
    fit_pipeline(cfg, FitSpec(calibration=200), progress=False)
    clf = DefendedClassifier.from_config(cfg)
    x = torch.from_numpy(fashion_test.as_float(0, 100))
    pred = clf.predict(x)
    assert pred.flagged is not None and pred.flagged.any() and not pred.flagged.all()
    np.testing.assert_array_equal(pred.labels[pred.flagged], -1)
    np.testing.assert_array_equal(pred.labels[~pred.flagged], pred.probs[~pred.flagged].argmax(1))


def test_random_pipeline_is_seeded_per_request(tmp_path, model_path, fashion_test, caplog):
    clf = DefendedClassifier.from_config(write_pipeline(tmp_path, model_path, RANDOM))
    assert clf.random and clf.random_steps == ["random_resize_pad", "gaussian_noise"] and clf.config.random
    x = torch.from_numpy(fashion_test.as_float(0, 64))
    a, b, c = clf.predict(x, seed=1), clf.predict(x, seed=1), clf.predict(x, seed=2)
    assert a.seed == 1 and np.array_equal(a.probs, b.probs) and not np.array_equal(a.probs, c.probs)
    with caplog.at_level(logging.INFO, logger="advshield.plugin.pipeline"):
        d = clf.predict(x)
    assert isinstance(d.seed, int) and f"seeded with {d.seed}" in caplog.text
    assert np.array_equal(clf.predict(x, seed=d.seed).probs, d.probs)  # the logged seed replays the request
    assert (a.labels == fashion_test.labels[:64]).mean() > 0.75


# --- `advshield fit` is generic over needs_fit ------------------------------------------------------------

@dataclass(frozen=True)
class RecorderConfig:
    artifact: str = "recorded"


@register_defense("_test_recorder", RecorderConfig)
class Recorder(Defense):
    """A learning defense for the test: stores the mean image it was fitted on (npy)."""

    name = "_test_recorder"
    needs_fit = True
    seen: list = []  # noqa: RUF012 (test instrumentation)

    def transform(self, x, generator=None):
        return x

    def fit(self, images, paths, *, seed=0, data_sha256=""):
        Recorder.seen.append((images.clone(), data_sha256))
        path = paths[self.config.artifact]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.save(f, images.mean(0).numpy(), allow_pickle=False)
        write_artifact_meta(path, data_sha256=data_sha256, seed=seed)

    def load(self, files):
        self.mean = np.load(files[self.config.artifact], allow_pickle=False)


def test_fit_is_generic_over_needs_fit(tmp_path, model_path):
    body = ('[[defenses]]\ntype = "bit_depth"\nbits = 1\n[[defenses]]\ntype = "_test_recorder"\n'
            '[artifacts.recorded]\npath = "artifacts/mean.npy"\n' + SQUEEZE.replace("REJECT", "false").replace("bits = 4", "bits = 5"))
    cfg = load_pipeline(write_pipeline(tmp_path, model_path, body))
    Recorder.seen.clear()
    summary = fit_pipeline(cfg, FitSpec(samples=300, calibration=200, seed=4), progress=False)
    assert [d["type"] for d in summary["defenses"]] == ["_test_recorder"] and set(summary["artifacts"]) == {"recorded", "thr"}
    (images, data_sha), = Recorder.seen
    train = load_fashion_mnist("train")
    perm = np.random.default_rng(4).permutation(len(train))
    fit_idx, cal_idx = perm[:300], perm[300:500]
    expected = torch.from_numpy(train.images[fit_idx, None].astype(np.float32) / 255)
    assert torch.equal(images, (expected >= 0.5).float())  # the training images, through the step before it
    assert data_sha == Dataset(train.images[fit_idx], train.labels[fit_idx], train.classes, "").sha256()
    assert summary["detector"]["data_sha256"] == Dataset(train.images[cal_idx], train.labels[cal_idx], train.classes, "").sha256()
    clf = DefendedClassifier.from_config(cfg)  # both artifacts load, checksums verified
    assert isinstance(clf.defenses[1], Recorder) and clf.defenses[1].mean.shape == (1, 28, 28)
    with pytest.raises(ConfigError, match=r"samples \(59000\) \+ calibration \(2000\) exceed the 60000 images"):
        fit_pipeline(cfg, FitSpec(samples=59000, calibration=2000), progress=False)


# --- the CLI ----------------------------------------------------------------------------------------------

def test_cli_fit_then_predict_json(tmp_path, model_path, fashion_test, capsys):
    path = write_pipeline(tmp_path, model_path, SQUEEZE.replace("REJECT", "false"))
    assert main(["fit", str(path), "--calibration", "300", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["detector"]["samples"] == 300
    assert summary["artifacts"]["thr"]["sha256"] == sha256_file(tmp_path / "artifacts" / "thr.json")
    pngs = []
    for i in range(6):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(encode_png(fashion_test.as_float(i, i + 1)[0]))
        pngs.append(str(p))
    assert main(["predict", str(path), *pngs, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == pngs
    assert sum(r["label"] == fashion_test.labels[i] for i, r in enumerate(rows)) >= 5
    for r in rows:
        assert isinstance(r["flagged"], bool) and 0 <= r["detector_score"] <= 2

    # reject = true with a threshold below every score: every image comes back REJECTED, label -1
    reject = write_pipeline(tmp_path, model_path, SQUEEZE.replace("REJECT", "true"), "reject.toml")
    thr = tmp_path / "artifacts" / "thr.json"
    doc = json.loads(thr.read_text())
    doc["threshold"] = -1.0
    thr.write_text(json.dumps(doc))
    write_artifact_meta(thr)
    assert main(["predict", str(reject), pngs[0], "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["label"] == -1 and row["class"] == "REJECTED" and row["flagged"] is True
    assert main(["predict", str(reject), pngs[0]]) == 0
    out = capsys.readouterr().out
    assert "REJECTED" in out and "FLAGGED" in out


def test_cli_fit_with_nothing_to_fit(tmp_path, model_path, capsys):
    path = write_pipeline(tmp_path, model_path, RANDOM)
    assert main(["fit", str(path)]) == 0
    assert "nothing to fit" in capsys.readouterr().out
