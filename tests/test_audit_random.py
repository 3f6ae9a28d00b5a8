"""Scoring a random pipeline as an attacker meets it (the majority of fresh serving draws, the
expected accuracy beside it), deterministic pipelines scored as before, and accuracy that does not
depend on the detector's ``reject``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch

from advshield.attacks import registry
from advshield.attacks.audit import RECORD_SETTINGS, Auditor, AuditSpec, Setup, build_setup, derive_seed
from advshield.attacks.gate import evaluate_gate
from advshield.attacks.registry import AttackSpec
from advshield.attacks.report import build_report, compute_metrics, validate_report, write_report
from advshield.core.errors import ConfigError
from advshield.core.resources import DEFAULT_PIPELINE
from advshield.core.validation import from_mapping
from advshield.plugin.config import GateSpec, load_pipeline
from advshield.plugin.fitting import FitSpec, fit_pipeline
from advshield.plugin.pipeline import Prediction

PIPELINES = Path(DEFAULT_PIPELINE).parent
N = 24

pytestmark = pytest.mark.usefixtures("one_thread")


def spec_of(**table) -> AuditSpec:
    base = {"samples": N, "batch_size": 12, "sanity_eps": 0.0, "eps_linf": [0.02, 0.1], "eps_l2": [0.5, 2.0]}
    return from_mapping(AuditSpec, {**base, **table}, "audit")


def strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _null(model, inputs, labels, *, targeted=False, eps=0.1):
    """Returns its input unchanged: whatever it "breaks", the pipeline's own noise broke."""
    return inputs.clone()


def _null_minimal(model, inputs, labels, *, targeted=False):
    return inputs.clone()


def _nudge(model, inputs, labels, *, targeted=False, eps=0.1):
    """Every pixel pushed by eps away from grey: a valid, visible change."""
    return (inputs + eps * torch.sign(inputs - 0.5)).clamp(0, 1)


@pytest.fixture()
def nulls(monkeypatch):
    for name, fn, kind, norm in (("null", _null, "budget", "linf"), ("null_l2", _null, "budget", "l2"),
                                 ("null_minimal", _null_minimal, "minimal", "l2"), ("nudge", _nudge, "budget", "linf")):
        monkeypatch.setitem(registry.ATTACKS, name, AttackSpec(name, fn, kind, norm, MappingProxyType({})))


@pytest.fixture(scope="module")
def data(fashion_test):
    return fashion_test.as_float(0, N), np.asarray(fashion_test.labels[:N], np.int64)


# --- the [audit] key ------------------------------------------------------------------------------

def test_draws_is_a_record_setting_and_is_validated():
    assert "draws" in RECORD_SETTINGS and AuditSpec().draws == 11
    with pytest.raises(ConfigError, match=r"audit.draws: must be >= 1 .*got 0"):
        from_mapping(AuditSpec, {"draws": 0}, "audit")
    with pytest.raises(ConfigError, match=r"audit.draws: expected an integer"):
        from_mapping(AuditSpec, {"draws": 2.5}, "audit")


# --- the shipped random pipeline ------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_cfg():
    return load_pipeline(PIPELINES / "fashion_mnist_random.toml")


def test_a_null_attack_leaves_robust_accuracy_equal_to_clean_accuracy(nulls, random_cfg, data, tmp_path):
    spec = spec_of(attacks=["null_minimal", "null", "null_l2"], eot_samples=2)
    setup = build_setup(random_cfg, spec, torch.from_numpy(data[0][:8]))
    assert setup.scorer.random and setup.mode["random_declared"]
    records = Auditor(setup, spec, *data, tmp_path, progress=False).run()
    clean = [r for r in records if r["attack"] == "clean"]
    assert all(r["draws"] == 11 for r in records)
    shares = np.array([r["clean_share"] for r in clean])
    assert ((shares > 0) & (shares < 1)).any(), "the pipeline's noise should make some clean images uncertain"
    assert [r["correct"] for r in clean] == [s > 0.5 for s in shares]  # majority of the draws
    m = compute_metrics(records, spec, setup.mode)
    for norm in ("linf", "l2"):
        table = m["robust_accuracy"][norm]
        assert table["all attacks"] == [m["clean_accuracy"]] * 2
        assert table["expected"]["all attacks"] == pytest.approx([m["scoring"]["expected_clean_accuracy"]] * 2)
    assert m["scoring"] == {"random": True, "draws": 11, "eot_samples": 2,
                            "expected_clean_accuracy": pytest.approx(shares.mean())}
    minimal = [r for r in records if r["attack"] == "null_minimal"]
    assert len(minimal) == sum(r["correct"] for r in clean)
    assert not any(r["success"] for r in minimal) and all(r["l2"] == 0 and r["adv_share"] == 1 for r in minimal)

    # the report: majority-vote and expected accuracy side by side, the draws and the EOT draws
    report = build_report(pipeline={"name": "random"}, spec=spec, probes={"mode": setup.mode}, metrics=m, warnings=[],
                          gate=evaluate_gate(GateSpec(), m, warnings=0, budget=None).to_dict(), budget=None)
    validate_report(report)
    files = write_report(tmp_path / "report", report)
    expected = f"{100 * m['scoring']['expected_clean_accuracy']:.1f}%"
    for text in (files.markdown.read_text(), files.html.read_text()):
        assert "majority of 11 draws" in text and f"expected over draws {expected}" in text
        assert "all attacks (expected over draws)" in text
        assert re.search(r"scored by (\*\*|<strong>)11(\*\*|</strong>) fresh serving draws", text)
        assert re.search(r"averaged (\*\*|<strong>)2(\*\*|</strong>) EOT draws per gradient", text)


def test_draws_are_fresh_seeds_shared_by_a_sample_clean_image_and_its_examples(nulls, random_cfg, data, tmp_path):
    spec = spec_of(attacks=["nudge"], draws=3, eps_linf=[0.2], eot_samples=2)
    setup = build_setup(random_cfg, spec, torch.from_numpy(data[0][:8]))
    records = Auditor(setup, spec, *data, tmp_path, progress=False).run()
    for r in records:  # the first draw's serving seed: derived for scoring, not the attack's seed
        assert r["seed"] == derive_seed(spec.seed, "score", r["batch"], 0) != derive_seed(spec.seed, r["attack"], r["eps"], r["batch"])
    nudged = [r for r in records if r["attack"] == "nudge"]
    assert nudged and any(r["success"] for r in nudged)  # a real change of the image can still succeed
    for r in nudged:
        assert r["success"] == (r["adv_share"] < 0.5) and r["adv_share"] in (0, 1 / 3, 2 / 3, 1)


# --- the per-draw rule, with a scorer whose draws are known -----------------------------------------

@dataclass
class DrawScorer:
    """A random serving path whose draw d (known by its seed) misclassifies a changed image when d
    is in ``wrong`` and flags it when d is in ``flagged``; clean images are always right."""

    clean: torch.Tensor
    labels: np.ndarray
    seeds: dict[int, int]
    wrong: set[int]
    flagged: set[int]
    random: bool = True

    def predict(self, x, seed=None):
        d = self.seeds[seed]
        changed = (x != self.clean[: len(x)]).flatten(1).any(1).numpy()
        labels = np.where(changed & (d in self.wrong), (self.labels[: len(x)] + 1) % 10, self.labels[: len(x)])
        flags = changed & (d in self.flagged)
        return Prediction(np.where(flags, -1, labels), np.eye(10, dtype=np.float32)[labels], flags.astype(np.float32),
                          flags, seed=seed)


@pytest.mark.parametrize("flagged_is_failure, success, adv_share", [(True, False, 0.6), (False, True, 0.2)])
def test_a_draw_succeeds_only_when_misclassified_and_not_flagged(nulls, data, tmp_path, flagged_is_failure, success,
                                                                 adv_share):
    # 4 of 5 draws misclassify, 3 of 5 do not flag, but only 2 of 5 do both: no majority
    x, y = data[0][:4], data[1][:4]
    spec = spec_of(samples=4, batch_size=4, attacks=["nudge"], eps_linf=[0.1], draws=5,
                   flagged_is_failure=flagged_is_failure)
    scorer = DrawScorer(torch.from_numpy(x), y, {derive_seed(spec.seed, "score", 0, d): d for d in range(5)},
                        wrong={0, 1, 2, 3}, flagged={0, 1})
    setup = Setup(scorer, lambda z: torch.zeros(len(z), 10), mode={"random_declared": True})
    records = Auditor(setup, spec, x, y, tmp_path, progress=False).run()
    clean = [r for r in records if r["attack"] == "clean"]
    assert all(r["correct"] and r["clean_share"] == 1 and r["flagged"] is False for r in clean)
    adv = [r for r in records if r["attack"] == "nudge"]
    assert len(adv) == 4
    for r in adv:
        assert r["success"] is success and r["adv_share"] == pytest.approx(adv_share)
        assert r["adv_pred"] == (r["label"] + 1) % 10 and r["flagged"] is False  # majority label, majority flag


# --- deterministic pipelines: scored as before ------------------------------------------------------

def test_a_deterministic_pipeline_is_scored_once_whatever_draws_says(data, pipeline_path, tmp_path):
    cfg = load_pipeline(pipeline_path)
    attacks = [{"name": "ddn", "steps": 5}, {"name": "fgsm"}]
    spec = spec_of(attacks=attacks, sanity_eps=0.5, sanity_samples=3)
    setup = build_setup(cfg, spec, torch.from_numpy(data[0][:8]))
    assert not setup.scorer.random
    records = Auditor(setup, spec, *data, tmp_path / "a", progress=False).run()
    one = Auditor(setup, spec_of(attacks=attacks, sanity_eps=0.5, sanity_samples=3, draws=1), *data, tmp_path / "b",
                  progress=False).run()
    assert strip(records) == strip(one)
    pred = setup.scorer.predict(torch.from_numpy(data[0]))
    for r in records:
        assert r["draws"] == 1 and r["seed"] is None
        if r["attack"] == "clean":
            assert r["clean_pred"] == pred.labels[r["sample"]] and r["correct"] == (r["clean_pred"] == r["label"])
            assert r["clean_share"] == float(r["correct"]) and r["adv_share"] is None
        else:
            assert r["success"] == (r["valid"] and r["adv_pred"] != r["label"] and r["l2"] > 0)
            assert r["adv_share"] == float(not r["success"]) and r["clean_share"] == 1.0
    m = compute_metrics(records, spec)
    assert m["scoring"]["draws"] == 1 and not m["scoring"]["random"]
    assert m["scoring"]["expected_clean_accuracy"] == m["clean_accuracy"]
    for norm in ("linf", "l2"):
        t = m["robust_accuracy"][norm]
        assert t["expected"] == {"all attacks": t["all attacks"], "white-box": t["white-box"]}


# --- the detector's reject flag does not change accuracy ------------------------------------------

def squeeze_copy(folder: Path, reject: bool) -> Path:
    text = (PIPELINES / "fashion_mnist_squeeze.toml").read_text().replace("../models", (PIPELINES.parent / "models").as_posix())
    assert "reject = false" in text
    path = folder / f"squeeze_{str(reject).lower()}.toml"
    path.write_text(text.replace("reject = false", f"reject = {str(reject).lower()}"))
    return path


def test_clean_and_robust_accuracy_do_not_depend_on_the_detectors_reject(fashion_test, tmp_path):
    n = 60
    x, y = fashion_test.as_float(0, n), np.asarray(fashion_test.labels[:n], np.int64)
    fit_pipeline(load_pipeline(squeeze_copy(tmp_path, False)), FitSpec(calibration=400), progress=False)
    spec = spec_of(samples=n, batch_size=30, attacks=["fgsm"], eps_linf=[0.05], eps_l2=[1.0])
    runs = {}
    for reject in (False, True):
        cfg = load_pipeline(squeeze_copy(tmp_path, reject))
        assert cfg.detector.config.reject is reject
        setup = build_setup(cfg, spec, torch.from_numpy(x[:8]))
        records = Auditor(setup, spec, x, y, tmp_path / f"audit_{reject}", progress=False).run()
        runs[reject] = (records, compute_metrics(records, spec, setup.mode))
    (served, m_served), (rejected, m_rejected) = runs[False], runs[True]
    flagged = [r for r in rejected if r["attack"] == "clean" and r["flagged"]]
    assert flagged and any(r["correct"] for r in flagged)  # a flagged clean image still counts as correct
    assert strip(served) == strip(rejected)
    assert m_rejected["clean_accuracy"] == m_served["clean_accuracy"]
    assert m_rejected["robust_accuracy"] == m_served["robust_accuracy"]
    assert m_rejected["detector"]["fpr_clean"] == len(flagged) / n > 0  # reported as false positives
