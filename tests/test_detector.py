"""The squeezing detector: its score, the threshold's statistics on real data, the artifact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from advshield.core.data import load_fashion_mnist
from advshield.core.errors import ArtifactError, ConfigError, InputError
from advshield.core.hashing import sha256_file
from advshield.defenses.base import NonDifferentiableError, verify_artifact
from advshield.defenses.detector import SqueezeDetector, calibrate_threshold, l1_scores
from advshield.defenses.registry import build_defense, build_detector, parse_defense, parse_detector

SQUEEZERS = [{"type": "bit_depth", "bits": 2}, {"type": "median", "size": 2}]


def detector(squeezers=SQUEEZERS, **kw) -> SqueezeDetector:
    return build_detector(*parse_detector({"type": "squeeze", "squeezers": squeezers, **kw}))


def scores_of(det: SqueezeDetector, x: torch.Tensor, classifier, batch: int = 1000) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([det.logits_and_score(x[i : i + batch], classifier)[1] for i in range(0, len(x), batch)]).numpy()


# --- the threshold ----------------------------------------------------------------------------------

def test_threshold_is_the_order_statistic_with_at_most_fpr_above():
    s = np.random.default_rng(0).permutation(np.arange(1, 101)).astype(float)
    assert calibrate_threshold(s, 0.05) == 95 and (s > 95).sum() == 5
    assert calibrate_threshold(s, 0.1) == 90
    ties = np.array([0.0] * 50 + list(range(1, 51)))
    t = calibrate_threshold(ties, 0.05)
    assert (ties > t).sum() == 5
    assert (np.full(40, 0.25) > calibrate_threshold(np.full(40, 0.25), 0.05)).sum() == 0  # all tied: none flagged
    for n in (20, 37, 1000, 1001):  # never above the target on the calibration data itself
        x = np.random.default_rng(n).random(n)
        assert (x > calibrate_threshold(x, 0.05)).mean() <= 0.05
    with pytest.raises(InputError, match="at least 20 clean samples, got 19"):
        calibrate_threshold(np.arange(19.0), 0.05)
    with pytest.raises(InputError, match="NaN"):
        calibrate_threshold(np.array([0.1, np.nan] * 20), 0.05)


def test_l1_score_by_hand():
    p0 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    p1 = torch.tensor([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    p2 = torch.tensor([[0.7, 0.1, 0.2], [0.0, 0.0, 1.0]])
    got = l1_scores(torch.cat([p0, p1, p2]), 2)
    torch.testing.assert_close(got, torch.tensor([0.4, 0.4]))  # max(0.4, 0.2), max(0, 0.4)


# --- the score: one stacked classifier call ------------------------------------------------------------

class Counting:
    def __init__(self, clf):
        self.clf, self.calls = clf, []
        self.input_shape, self.num_classes = clf.input_shape, clf.num_classes

    def __call__(self, x):
        self.calls.append(tuple(x.shape))
        return self.clf(x)


def test_score_uses_one_stacked_call_and_matches_separate_calls(onnx_classifier, fashion_test):
    x = torch.from_numpy(fashion_test.as_float(0, 50))
    det = detector()
    counting = Counting(onnx_classifier)
    logits, score = det.logits_and_score(x, counting)
    assert counting.calls == [(150, 1, 28, 28)]  # (1 + 2 squeezers) x 50 images, one call
    torch.testing.assert_close(logits, onnx_classifier(x), atol=1e-4, rtol=0)
    p = torch.softmax(onnx_classifier(x), 1)
    separate = [(torch.softmax(onnx_classifier(build_defense(*parse_defense(s))(x)), 1) - p).abs().sum(1) for s in SQUEEZERS]
    torch.testing.assert_close(score, torch.maximum(*separate), atol=1e-4, rtol=0)
    assert float(score.min()) >= 0 and float(score.max()) <= 2


def test_a_squeezer_that_changes_nothing_scores_zero(onnx_classifier, fashion_test):
    x = torch.from_numpy(fashion_test.as_float(0, 20))  # 8-bit images: 8-bit depth is the identity
    _, score = detector([{"type": "bit_depth", "bits": 8}]).logits_and_score(x, onnx_classifier)
    assert float(score.max()) < 1e-6


def test_false_positive_rate_on_held_out_clean_data(onnx_classifier, fashion_test):
    """Threshold calibrated on held-out TRAIN images at 5%; measured on other held-out train images and
    on the test split. Sampling error of the comparison: both the threshold's true rate (n_cal) and
    the measured rate (n_eval) vary, so the standard error is sqrt(p (1 - p) (1/n_cal + 1/n_eval))."""
    train = load_fashion_mnist("train")
    idx = np.random.default_rng(1).permutation(len(train))
    n = 2000
    cal = torch.from_numpy(train.images[idx[:n], None].astype(np.float32) / 255)
    other = torch.from_numpy(train.images[idx[n : 2 * n], None].astype(np.float32) / 255)
    test = torch.from_numpy(fashion_test.as_float(0, n))
    det = detector(fpr=0.05)
    record = det.calibrate(scores_of(det, cal, onnx_classifier))
    assert record["fpr_calibration"] <= 0.05 and record["samples"] == n
    se = math.sqrt(0.05 * 0.95 * (1 / n + 1 / n))
    for name, data in (("held-out train", other), ("test split", test)):
        flagged = det.flag(torch.from_numpy(scores_of(det, data, onnx_classifier)))
        fpr = float(flagged.float().mean())
        assert abs(fpr - 0.05) <= 3 * se, f"{name}: false-positive rate {fpr:.4f}, target 0.05 +- {3 * se:.4f}"


def test_score_is_differentiable_for_detector_aware_attacks(twin, fashion_test):
    det = detector()
    x = torch.from_numpy(fashion_test.as_float(0, 8)).requires_grad_(True)
    with pytest.raises(NonDifferentiableError, match="bpda=True"):
        det.logits_and_score(x, twin)
    logits, score = det.logits_and_score(x, twin, bpda=True)
    (g,) = torch.autograd.grad(score.sum() + logits.logsumexp(1).sum(), x)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0


@pytest.mark.slow
def test_detects_pgd_examples_far_above_its_false_positive_rate(twin, onnx_classifier, fashion_test):
    """Measured on 300 test images: 63% broken by PGD at eps 0.03, 68% of those flagged at 5% FPR."""
    train = load_fashion_mnist("train")
    idx = np.random.default_rng(0).permutation(len(train))[:3000]
    det = detector()
    det.calibrate(scores_of(det, torch.from_numpy(train.images[idx, None].astype(np.float32) / 255), onnx_classifier))
    x = torch.from_numpy(fashion_test.as_float(5000, 5300))
    y = torch.from_numpy(fashion_test.labels[5000:5300])
    eps, xa = 0.03, x.clone()
    for _ in range(20):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(twin(xa), y), xa)
        xa = torch.min(torch.max(xa.detach() + eps / 8 * g.sign(), x - eps), x + eps).clamp(0, 1)
    xa = torch.round(xa * 255) / 255
    with torch.no_grad():
        broken = (onnx_classifier(x).argmax(1) == y) & (onnx_classifier(xa).argmax(1) != y)
    rate = float(det.flag(torch.from_numpy(scores_of(det, xa[broken], onnx_classifier))).float().mean())
    assert int(broken.sum()) > 100 and rate > 0.4, (int(broken.sum()), rate)


# --- the artifact -------------------------------------------------------------------------------------

def test_artifact_round_trip_and_checks(tmp_path):
    scores = np.random.default_rng(0).random(400)
    det = detector()
    with pytest.raises(ArtifactError, match="no threshold; run `advshield fit`"):
        det.flag(torch.zeros(3))
    path = tmp_path / "thr.json"
    record = det.fit(scores, {"squeeze_threshold": path}, data_sha256="ab" * 32, model_sha256="cd" * 32, seed=3)
    assert record["threshold"] == calibrate_threshold(scores, 0.05)
    meta = verify_artifact(path)  # the sidecar's sha256 is the file's
    assert meta["sha256"] == sha256_file(path) and meta["data_sha256"] == "ab" * 32 and meta["seed"] == 3
    assert meta["parameters"]["fpr"] == 0.05 and meta["samples"] == 400
    digest = sha256_file(path)
    det.fit(scores, {"squeeze_threshold": path}, data_sha256="ab" * 32, model_sha256="cd" * 32, seed=3)
    assert sha256_file(path) == digest  # same calibration, same bytes

    again = detector()
    again.load({"squeeze_threshold": path})
    assert again.threshold == det.threshold
    torch.testing.assert_close(again.flag(torch.tensor([0.0, 2.0])), torch.tensor([False, True]))

    with pytest.raises(ArtifactError, match="calibrated for squeezers"):
        detector([{"type": "bit_depth", "bits": 3}]).load({"squeeze_threshold": path})
    with pytest.raises(ArtifactError, match=r"calibrated at fpr 0\.05, the pipeline asks for 0\.01"):
        detector(fpr=0.01).load({"squeeze_threshold": path})
    doc = json.loads(path.read_text())
    doc["threshold"] = "high"
    path.write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="invalid threshold 'high'"):
        detector().load({"squeeze_threshold": path})
    with pytest.raises(ArtifactError, match="does not match the expected"):
        verify_artifact(path)  # the edited file no longer matches its sidecar
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="cannot read the detector threshold"):
        detector().load({"squeeze_threshold": path})


# --- the config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ({"squeezers": [{"type": "gaussian_noise", "sigma": 0.1}]}, r"squeezers\[0\]\.type: 'gaussian_noise' is random"),
    ({"squeezers": [{"type": "median"}, {"type": "blur"}]}, r"squeezers\[1\]\.type: unknown defense type 'blur'"),
    ({"squeezers": [{"type": "bit_depth", "bits": 12}]}, r"squeezers\[0\]: bits: must be within 1\.\.8, got 12"),
    ({"squeezers": []}, r"at least one squeezer"),
    ({"fpr": 0.0}, r"fpr: must be within \(0, 1\), got 0\.0"),
    ({"fpr": 1.5}, r"fpr: must be within \(0, 1\)"),
    ({"threshold": 0.3}, r"unknown key 'threshold'"),
    ({"reject": "yes"}, r"reject: expected true or false"),
])
def test_config_errors_name_the_key(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_detector({"type": "squeeze", **spec})


def test_default_config_is_xu_et_al_mnist_setting():
    name, cfg = parse_detector({"type": "squeeze"})
    assert name == "squeeze" and cfg.fpr == 0.05 and not cfg.reject and cfg.artifact == "squeeze_threshold"
    assert [(n, vars(c)) for n, c in cfg.parsed] == [("bit_depth", {"bits": 1}), ("median", {"size": 2, "approximation": "median"})]
