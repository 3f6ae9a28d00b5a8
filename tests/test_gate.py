"""The release gate on thresholds, the gradient-masking warnings on constructed cases, and the
``advshield audit`` command's exit status (0 pass, 1 gate failure, 2 error)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_report import MODE, RECORDS, SPEC, rec

from advshield.attacks import masking
from advshield.attacks.audit import AuditSpec, build_setup, gradient_probe, run_probes
from advshield.attacks.gate import evaluate_gate
from advshield.attacks.primitives import quantize
from advshield.attacks.report import compute_metrics, distortion_budget
from advshield.cli import main
from advshield.core.validation import from_mapping
from advshield.plugin.config import GateSpec, load_pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "advshield" / "pipelines"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def metrics():
    return compute_metrics(RECORDS, SPEC, MODE)


def gate(**kw) -> GateSpec:
    return GateSpec(**kw)


def failed(result) -> list[str]:
    return [c.id for c in result.checks if c.passed is False]


# --- the gate --------------------------------------------------------------------------------------

def test_a_gate_with_no_threshold_set_passes_and_reports_the_values(metrics):
    r = evaluate_gate(gate(), metrics)
    assert r.passed and all(c.passed is None for c in r.checks)
    assert {c.id: c.value for c in r.checks}["min_median_distortion"] == 1.5
    assert r.verdict == "PASS on clean accuracy only: no robustness threshold set" == r.to_dict()["verdict"]


def test_a_clean_accuracy_gate_does_not_pass_as_a_robustness_verdict(metrics):
    clean_only = evaluate_gate(gate(min_clean_accuracy=0.8), metrics)
    assert clean_only.passed and not clean_only.robustness_checked
    assert clean_only.verdict.startswith("PASS on clean accuracy only")
    robust = evaluate_gate(gate(min_clean_accuracy=0.8, min_median_distortion=1.5), metrics)
    assert robust.passed and robust.robustness_checked and robust.verdict == "PASS"
    broken = evaluate_gate(gate(min_clean_accuracy=0.8, min_robust_accuracy=0.34, gate_eps=0.1), metrics)
    assert broken.verdict == "FAIL: " + "; ".join(broken.reasons) and "robust accuracy" in broken.verdict


@pytest.mark.parametrize("kw, passes", [
    ({"min_clean_accuracy": 0.8}, True),  # 5/6
    ({"min_clean_accuracy": 0.9}, False),
    ({"min_robust_accuracy": 0.33, "gate_eps": 0.1}, True),  # worst of 4/6 (0.05) and 2/6 (0.1)
    ({"min_robust_accuracy": 0.34, "gate_eps": 0.1}, False),
    ({"min_robust_accuracy": 0.6, "gate_eps": 0.05}, True),  # only eps <= gate_eps count
    ({"max_success_rate": 0.6, "gate_eps": 0.1}, True),  # 3 of the 5 correct broken within 0.1
    ({"max_success_rate": 0.5, "gate_eps": 0.1}, False),
    ({"max_success_rate": 0.4}, True),  # no gate_eps: P_upp at d_upp = 1.0 of the best minimal attack, 2/5
    ({"max_success_rate": 0.3}, False),
    ({"min_median_distortion": 1.5}, True),
    ({"min_median_distortion": 1.6}, False),
])
def test_thresholds(metrics, kw, passes):
    r = evaluate_gate(gate(**kw), metrics)
    assert r.passed is passes, r.to_dict()
    if not passes:
        assert failed(r) == [next(iter(k for k in kw if k != "gate_eps"))]
        assert r.reasons and r.to_dict()["passed"] is False


def test_certified_budget_and_warnings(metrics):
    budget = distortion_budget({"sigmas": {"0.25": {"radii": [0.0, 0.5, 1.0], "certified_accuracy": [0.8, 0.6, 0.2]},
                                           "0.5": {"radii": [0.0, 0.5, 1.0], "certified_accuracy": [0.7, 0.5, 0.5]}}},
                               metrics, 0.5)
    assert budget["best_certified_budget"] == 1.0  # sigma 0.5 keeps 0.5 up to radius 1
    assert evaluate_gate(gate(min_certified_budget=1.0), metrics, budget=budget).passed
    assert not evaluate_gate(gate(min_certified_budget=1.5), metrics, budget=budget).passed
    assert evaluate_gate(gate(max_warnings=1), metrics, warnings=1).passed
    r = evaluate_gate(gate(max_warnings=0), metrics, warnings=1)
    assert not r.passed and r.reasons == ["1 masking warning(s) > 0"]


def test_a_threshold_that_cannot_be_measured_fails(metrics):
    r = evaluate_gate(gate(min_certified_budget=0.1), metrics, budget=None)
    assert not r.passed and "no certification results" in r.reasons[0]
    r = evaluate_gate(gate(min_robust_accuracy=0.1, gate_eps=0.01), metrics)
    assert not r.passed and "no linf eps of the grid is <= gate_eps = 0.01" in r.reasons[0]
    no_minimal = compute_metrics([r for r in RECORDS if r["kind"] != "minimal"], SPEC, MODE)
    r = evaluate_gate(gate(min_median_distortion=0.1), no_minimal)
    assert not r.passed and "no white-box minimal attack" in r.reasons[0]


# --- masking warnings on constructed cases ---------------------------------------------------------

def codes(warnings) -> list[str]:
    return [w.code for w in warnings]


def test_random_pipeline_audited_without_eot_warns(fashion_test):
    cfg = load_pipeline(PIPELINES / "fashion_mnist_random.toml")
    x, y = fashion_test.as_float(0, 8), np.asarray(fashion_test.labels[:8], np.int64)
    for adaptive, expected in (("off", ["non_adaptive", "random_without_eot"]), ("auto", [])):
        spec = from_mapping(AuditSpec, {"adaptive": adaptive, "eot_samples": 2, "attacks": ["fgsm"]}, "audit")
        setup = build_setup(cfg, spec, torch.from_numpy(x))
        probes = run_probes(setup, x, y, np.ones(8, bool), seed=0, n=8)
        assert probes["randomness"]["random"] and setup.mode["eot_samples"] == (1 if adaptive == "off" else 2)
        warns = masking.check_non_adaptive(probes) + masking.check_randomness(probes)
        assert codes(warns) == expected


def test_zero_gradients_warn(twin, test_batch):
    x, y = test_batch[0][:16], test_batch[1][:16].long()
    assert masking.check_gradients({"gradients": gradient_probe(twin, x, y)}, 0.02) == []
    # 8-bit rounding differentiated as if it were smooth: autograd sees a step function
    flat = gradient_probe(lambda v: twin(quantize(v)), x, y)
    assert codes(masking.check_gradients({"gradients": flat}, 0.02)) == ["zero_gradients"]


def test_vanishing_cross_entropy_gradients_warn():
    probe = {"samples": 4, "margin_grad_norm": [5.0] * 4, "ce_grad_norm": [0.0, 1e-12, 1e-3, 1e-2]}
    assert codes(masking.check_gradients({"gradients": probe}, 0.02)) == ["vanishing_gradients"]


def budget_rec(sample, attack, eps, success, source="white-box", name="pgd_linf"):
    return rec(sample, attack, kind="budget", norm="linf", eps=eps, source=source, success=success, name=name)


def test_transfer_beating_white_box_warns():
    records = [budget_rec(s, "pgd_linf", 0.05, success=s < 5) for s in range(10)]
    records += [budget_rec(s, "transfer_pgd_linf", 0.05, success=s in (6, 7), source="transfer") for s in range(5, 10)]
    w = masking.check_weaker_attacks(records, correct=10, tolerance=0.02)
    assert codes(w) == ["transfer_beats_white_box"] and w[0].details["samples"] == [6, 7]
    assert masking.check_weaker_attacks(records, correct=10, tolerance=0.25) == []  # 2/10 is within tolerance
    # a transfer success where no white-box attack tried that sample at that eps is no evidence
    alone = [budget_rec(s, "transfer_pgd_linf", 0.1, success=True, source="transfer") for s in range(3)]
    assert masking.check_weaker_attacks(records[:5] + alone, correct=10, tolerance=0.02) == []


def test_single_step_beating_iterative_warns():
    records = [budget_rec(0, "pgd_linf", 0.1, success=False), budget_rec(0, "fgsm", 0.1, success=True, name="fgsm"),
               budget_rec(1, "fgsm", 0.1, success=True, name="fgsm")]  # #1: PGD never tried it
    w = masking.check_weaker_attacks(records, correct=2, tolerance=0.02)
    assert codes(w) == ["single_step_beats_iterative"] and w[0].details["samples"] == [0]


def test_unbounded_attacks_below_100_percent_warn():
    ok = [rec(s, "ddn", success=True) for s in range(10)]
    assert masking.check_unbounded(ok, 0.02) == []
    stuck = ok + [budget_rec(s, "sanity_pgd_linf", 0.5, success=s != 3, source="sanity") for s in range(10)]
    w = masking.check_unbounded(stuck, 0.02)
    assert codes(w) == ["unbounded_not_100"] and w[0].details == {"attack": "sanity_pgd_linf", "success_rate": 0.9, "attacked": 10}


def test_certificate_violations_warn():
    assert masking.check_certificates([]) == []
    v = [{"sigma": 0.25, "sample": 3, "radius": 0.4, "attack": "ddn", "smoothed_prediction": 2}]
    assert codes(masking.check_certificates(v)) == ["certificate_violated"]


# --- the command -----------------------------------------------------------------------------------

def pipeline_copy(tmp_path, extra: str, name: str = "fashion_mnist.toml") -> Path:
    """The example pipeline with absolute model paths, its [audit] and [gate] replaced by ``extra``."""
    text = (PIPELINES / name).read_text()
    models = (PIPELINES.parent / "models").as_posix()
    text = text.replace("../models", models).split("[gate]")[0]
    path = tmp_path / "pipeline.toml"
    path.write_text(text + extra)
    return path


SMALL = """
[audit]
samples = 6
batch_size = 6
sanity_samples = 2
eps_linf = [0.05]
eps_l2 = [1.0]
attacks = [{ name = "ddn", steps = 10 }, { name = "fgsm" }]
"""


def test_audit_command_exit_status_follows_the_gate(tmp_path, capsys):
    ok = pipeline_copy(tmp_path, SMALL + "[gate]\nmin_clean_accuracy = 0.5\n")
    assert main(["audit", str(ok), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["gate"]["passed"] and report["pipeline"]["sha256"]["model"]
    assert (tmp_path / "a" / "report.md").is_file() and "gate: PASS" in capsys.readouterr().out
    strict = pipeline_copy(tmp_path, SMALL + "[gate]\nmin_robust_accuracy = 0.9\ngate_eps = 0.1\n")
    assert main(["audit", str(strict), "--out", str(tmp_path / "b"), "--quiet"]) == 1
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["audit"]["eps_linf"] == [0.05, 0.1]  # gate_eps joined the grid
    assert not report["gate"]["passed"] and "robust accuracy" in report["gate"]["reasons"][0]
    assert "gate: FAIL" in capsys.readouterr().out


def test_audit_command_errors_exit_2(tmp_path, capsys):
    bad = pipeline_copy(tmp_path, SMALL.replace("samples = 6", "samples = -1"))
    assert main(["audit", str(bad), "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "audit.samples: must be >= 1, got -1" in capsys.readouterr().err
    ok = pipeline_copy(tmp_path, SMALL)
    assert main(["audit", str(ok), "--out", str(tmp_path / "c"), "--attacks", "pgd", "--quiet"]) == 2
    assert "unknown attack id 'pgd'" in capsys.readouterr().err


CERTIFY = """
[certify]
sigmas = [0.25]
n0 = 10
n = 100
alpha = 0.01
samples = 4
"""


def test_audit_with_a_certification_stage_reports_the_distortion_budget(tmp_path):
    path = pipeline_copy(tmp_path, SMALL.replace("samples = 6", "samples = 4") + CERTIFY
                         + "[gate]\nmin_certified_budget = 0.01\ncertified_accuracy_target = 0.25\n")
    status = main(["audit", str(path), "--out", str(tmp_path / "d"), "--quiet"])
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    b = report["distortion_budget"]
    assert set(b["certified_budget"]) == {"0.25"} and b["empirical"]["radii"]
    assert b["certificate_check"]["checked"] >= 1 and b["certificate_check"]["violations"] == []
    assert status == (0 if b["best_certified_budget"] >= 0.01 else 1)
    assert (tmp_path / "d" / "certify" / "certify_records.jsonl").is_file()
    assert "## Distortion budget" in (tmp_path / "d" / "report.md").read_text()
    # reading the certify folder instead of running it again
    assert main(["audit", str(path), "--out", str(tmp_path / "d"), "--certify-dir", str(tmp_path / "d" / "certify"),
                 "--quiet"]) == status
