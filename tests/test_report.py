"""Audit metrics against values computed by hand from a small hand-made record set, and the
rendered report (report.json without NaN, report.md, plots)."""

from __future__ import annotations

import base64
import json
import math
import re

import pytest

from advshield.attacks.audit import AuditSpec
from advshield.attacks.gate import evaluate_gate
from advshield.attacks.report import (
    REPORT_FORMAT,
    ReportSchemaError,
    build_report,
    compute_metrics,
    distortion_budget,
    jsonable,
    load_schema,
    validate_report,
    write_report,
)
from advshield.attacks.report.render import eps_label
from advshield.core.validation import from_mapping
from advshield.plugin.config import GateSpec

SPEC = from_mapping(AuditSpec, {"eps_linf": [0.05, 0.1, 0.2], "eps_l2": [0.5, 1.0, 2.0], "d_upp": 1.0,
                                "quantiles": [0.25, 0.5, 0.9]}, "audit")
MODE = {"detector_threshold": 0.5, "detector_fpr_target": 0.05, "adaptive": "auto"}


def rec(sample, attack, *, kind="minimal", source="white-box", eps=None, norm="l2", success=False, l2=0.0, linf=0.0,
        adv_pred=None, flagged=False, valid=True, label=None, grads=0.0, seconds=0.0, name=None):
    label = sample % 10 if label is None else label
    if adv_pred is None:
        adv_pred = (label + 1) % 10 if success else label
    return {"sample": sample, "attack": attack, "name": name or attack, "source": source, "kind": kind, "norm": norm,
            "eps": eps, "batch": 0, "label": label, "clean_pred": label, "correct": True, "adv_pred": adv_pred,
            "flagged": flagged, "score": 0.9 if flagged else 0.1, "valid": valid,
            "reason": "valid" if valid else "outside the budget", "success": success, "l2": l2, "linf": linf,
            "gradients": grads, "seconds": seconds, "seed": None}


def clean(sample, correct=True, flagged=False):
    r = rec(sample, "clean", kind="clean", source="clean", norm=None)
    r.update(adv_pred=None, correct=correct, flagged=flagged, clean_pred=r["label"] if correct else (r["label"] + 1) % 10)
    return r


# six samples; #5 is misclassified without attack (N' = 6, N = 5); #1 is a detector false positive
RECORDS = [
    *(clean(s) for s in range(5)), clean(5, correct=False), ]
RECORDS[1]["flagged"] = True
RECORDS += [
    # DDN (minimal, white-box): breaks 0, 1, 3, 4; fails on 2 (fooled the classifier but was flagged)
    rec(0, "ddn", success=True, l2=0.5, linf=0.1, grads=100, seconds=0.2),
    rec(1, "ddn", success=True, l2=1.5, linf=0.3, grads=100, seconds=0.2),
    rec(2, "ddn", success=False, l2=9.0, linf=0.9, adv_pred=7, flagged=True, grads=100, seconds=0.2),
    rec(3, "ddn", success=True, l2=1.0, linf=0.2, grads=100, seconds=0.2),
    rec(4, "ddn", success=True, l2=2.0, linf=0.4, grads=100, seconds=0.2),
    # BP (minimal, white-box): breaks 0, 2, 3
    rec(0, "bp", success=True, l2=0.4, linf=0.15, grads=100, seconds=0.1),
    rec(1, "bp", success=False, l2=0.0),
    rec(2, "bp", success=True, l2=3.0, linf=0.5),
    rec(3, "bp", success=True, l2=1.2, linf=0.25),
    rec(4, "bp", success=False, l2=0.0),
    # PGD L-inf (budget): at 0.05 breaks 0; #4 cheats (outside the budget: a failure); at 0.1 breaks 2
    rec(0, "pgd_linf", kind="budget", norm="linf", eps=0.05, success=True, l2=0.8, linf=0.05, grads=40, seconds=0.1),
    rec(2, "pgd_linf", kind="budget", norm="linf", eps=0.05, success=False, grads=40, seconds=0.1),
    rec(4, "pgd_linf", kind="budget", norm="linf", eps=0.05, success=False, valid=False, adv_pred=3, l2=5.0, linf=0.6,
        grads=40, seconds=0.1),
    rec(2, "pgd_linf", kind="budget", norm="linf", eps=0.1, success=True, l2=1.1, linf=0.1, grads=40, seconds=0.1),
    rec(4, "pgd_linf", kind="budget", norm="linf", eps=0.1, success=False, grads=40, seconds=0.1),
    # transfer PGD at 0.1 breaks 4
    rec(4, "transfer_pgd_linf", kind="budget", norm="linf", eps=0.1, source="transfer", success=True, l2=0.7,
        linf=0.09, name="pgd_linf", grads=40, seconds=0.1),
]


@pytest.fixture(scope="module")
def m():
    return compute_metrics(RECORDS, SPEC, MODE)


def test_clean_accuracy_and_counts(m):
    assert (m["samples"], m["correct"]) == (6, 5)
    assert m["clean_accuracy"] == pytest.approx(5 / 6)


def test_robust_accuracy_is_the_union_over_attacks_within_eps(m):
    # least successful L-inf distortion per sample: #0 0.05, #1 0.3, #2 0.1, #3 0.2, #4 0.09 (transfer)
    ra = m["robust_accuracy"]["linf"]
    assert ra["eps"] == [0.05, 0.1, 0.2]
    assert ra["all attacks"] == pytest.approx([4 / 6, 2 / 6, 1 / 6])  # "<= eps" is inclusive
    assert ra["white-box"] == pytest.approx([4 / 6, 3 / 6, 2 / 6])  # #4 only falls to the transfer attack (0.4 by DDN)
    assert ra["success_rate"] == pytest.approx([1 / 5, 3 / 5, 4 / 5])
    # least L2: #0 0.4, #1 1.5, #2 1.1, #3 1.0, #4 0.7
    assert m["robust_accuracy"]["l2"]["all attacks"] == pytest.approx([4 / 6, 2 / 6, 0.0])


def test_minimal_attack_statistics(m):
    ddn = m["attacks"]["ddn"]
    assert ddn["p_suc"] == pytest.approx(4 / 5)
    assert ddn["mean_distortion"] == pytest.approx((0.5 + 1.5 + 1.0 + 2.0) / 4)  # over the successes only
    assert ddn["median_distortion"] == 1.5  # of 0.5, 1.0, 1.5, 2.0, inf
    assert ddn["quantiles"] == {"0.25": 1.0, "0.5": 1.5, "0.9": math.inf}
    assert ddn["p_upp"] == pytest.approx(2 / 5)  # 0.5 and 1.0 <= D_upp = 1.0
    assert ddn["operating_characteristic"] == {"distortion": [0.0, 0.5, 1.0, 1.5, 2.0], "p": [0.0, 0.2, 0.4, 0.6, 0.8]}
    assert ddn["robust_accuracy"] == pytest.approx([4 / 6, 3 / 6, 1 / 6])  # DDN alone, on the L2 grid
    assert ddn["cost"]["gradients_per_image"] == 100 and ddn["cost"]["seconds_per_image"] == pytest.approx(0.2)


def test_best_of_minimal_attacks_is_the_per_sample_minimum(m):
    best = m["best_minimal"]  # 0.4, 1.5, 3.0, 1.0, 2.0
    assert best["attacks"] == ["ddn", "bp"]
    assert best["p_suc"] == 1.0
    assert best["mean_distortion"] == pytest.approx((0.4 + 1.5 + 3.0 + 1.0 + 2.0) / 5)
    assert best["median_distortion"] == 1.5
    assert best["p_upp"] == pytest.approx(2 / 5)


def test_budget_attacks_cascade_counts_and_invalid_examples(m):
    pgd = m["attacks"]["pgd_linf"]
    assert [(e["eps"], e["attacked"], e["broken"], e["invalid"]) for e in pgd["per_eps"]] == [(0.05, 3, 1, 1), (0.1, 2, 1, 0)]
    assert pgd["invalid"] == {"outside the budget": 1}
    assert pgd["cost"]["gradients_per_image"] == 40
    assert m["attacks"]["transfer_pgd_linf"]["source"] == "transfer"


def test_detector_rates(m):
    det = m["detector"]
    assert det["fpr_clean"] == pytest.approx(1 / 6)
    # valid examples that fool the classifier: 10 successes + DDN's flagged #2; the cheat is not valid
    assert det["adversarial"] == 11 and det["tpr"] == pytest.approx(1 / 11)
    assert det["per_attack"]["ddn"] == {"adversarial": 5, "tpr": pytest.approx(1 / 5)}
    assert (det["threshold"], det["fpr_target"]) == (0.5, 0.05)


def test_distortion_budget_puts_certified_next_to_empirical(m):
    cert = {"sigmas": {"0.25": {"samples": 6, "radii": [0.0, 0.5, 1.0], "certified_accuracy": [0.8, 0.6, 0.2],
                                "abstain_rate": 0.1}}}
    b = distortion_budget(cert, m, target=0.5)
    assert b["certified_budget"] == {"0.25": 0.5} and b["best_certified_budget"] == 0.5
    # robust accuracy implied by the best minimal distortions (0.4, 1.0, 1.5, 2.0, 3.0) at the radii
    assert b["empirical"]["robust_accuracy"] == pytest.approx([5 / 6, 4 / 6, 3 / 6])
    assert b["empirical"]["median_minimal_distortion"] == 1.5
    # robust accuracy (5 - broken) / 6 >= 0.5 while at most 2 samples are broken: below the 3rd least distortion
    assert b["empirical"]["budget"] == 1.5
    assert distortion_budget(cert, m, target=0.9)["empirical"]["budget"] == 0.0  # clean accuracy 5/6 < 0.9
    assert distortion_budget(cert, m, target=0.0)["empirical"]["budget"] == math.inf  # never below 0


def test_report_files(m, tmp_path):
    gate = {"passed": False, "verdict": "FAIL: clean accuracy 0.8333 < 0.9", "robustness_checked": False,
            "reasons": ["clean accuracy 0.8333 < 0.9"],
            "checks": [{"id": "min_clean_accuracy", "label": "min_clean_accuracy", "threshold": 0.9, "value": 0.8333,
                        "passed": False, "detail": "clean accuracy 0.8333 < 0.9", "norm": None, "eps": None,
                        "d_upp": None, "target": None}]}
    warnings = [{"code": "transfer_beats_white_box", "message": "transfer broke 1 sample", "details": {}}]
    report = build_report(pipeline={"name": "hand", "description": "made by hand", "sha256": {"model": "ab" * 32},
                                    "paths": {"model": "m.onnx"}},
                          spec=SPEC, probes={"mode": MODE}, metrics=m, warnings=warnings, gate=gate,
                          budget=distortion_budget({"sigmas": {"0.25": {"samples": 6, "radii": [0.0, 1.0],
                                                                        "certified_accuracy": [0.8, 0.2]}}}, m, 0.5))
    files = write_report(tmp_path, report)
    json_path, md_path = files.json, files.markdown
    data = json.loads(json_path.read_text())  # strict JSON: written with allow_nan=False
    assert data["metrics"]["attacks"]["ddn"]["quantiles"]["0.9"] == "inf"
    assert data["gate"]["passed"] is False
    md = md_path.read_text()
    for text in ("**Gate: FAIL: ", "## Robust accuracy", "| ddn alone |", "## Minimal attacks", "best of ddn, bp",
                 "## Detector", "## Distortion budget", "transfer_beats_white_box", "`abababab", "**FAIL**"):
        assert text in md, text
    for png in ("operating_characteristic", "robust_accuracy_linf", "robust_accuracy_l2", "distortion_budget"):
        assert (tmp_path / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{png}.png" in md


def test_jsonable_has_no_nan_or_infinity():
    assert jsonable({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5]}) == {"a": None, "b": ["inf", "-inf", 1.5]}


def test_budget_over_noise_trained_models_is_not_called_an_interval(m, tmp_path):
    """Certificates of a smoothed pipeline over another (noise-trained) model bound another classifier."""
    gate = {"passed": True, "verdict": "PASS", "robustness_checked": True, "reasons": [], "checks": []}
    cert = {"spec": {"models": ["noise.onnx"]},
            "sigmas": {"0.25": {"samples": 6, "radii": [0.0, 1.0], "certified_accuracy": [0.8, 0.2]}}}
    for certified, interval in ((cert, False), ({"sigmas": cert["sigmas"]}, True)):
        b = distortion_budget(certified, m, 0.5)
        assert b["same_classifier"] is interval
        report = build_report(pipeline={"name": "hand", "description": "", "sha256": {}, "paths": {}}, spec=SPEC,
                              probes={"mode": MODE}, metrics=m, warnings=[], gate=gate, budget=b)
        md = write_report(tmp_path, report)[1].read_text()
        assert ("<= true budget <=" in md) is interval
        assert ("about different classifiers" in md) is not interval


# --- report.html and the report's JSON Schema ------------------------------------------------------

def full_report(m):
    """A report as the audit builds it: the hand-made records, a certification budget, a real gate."""
    budget = distortion_budget({"sigmas": {"0.25": {"samples": 6, "radii": [0.0, 0.5, 1.0],
                                                    "certified_accuracy": [0.8, 0.6, 0.2]}}}, m, 0.5)
    gate = evaluate_gate(GateSpec(min_clean_accuracy=0.9, max_success_rate=0.7, gate_eps=0.1), m,
                         warnings=1, budget=budget)
    warnings = [{"code": "transfer_beats_white_box", "message": "transfer broke 1 sample", "details": {"samples": [4]}}]
    return build_report(pipeline={"name": "hand", "description": "made by <hand> & checked", "sha256": {"model": "ab" * 32},
                                  "paths": {"model": "m.onnx"}},
                        spec=SPEC, probes={"mode": MODE}, metrics=m, warnings=warnings, gate=gate.to_dict(),
                        budget=budget, command="advshield audit hand.toml", seconds=3.0)


def test_html_report_is_one_self_contained_file_with_the_numbers_of_the_markdown(m, tmp_path):
    files = write_report(tmp_path, full_report(m))
    html, md = files.html.read_text(), files.markdown.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    # the four plots embedded as PNG data URIs, nothing loaded from elsewhere
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == len(files.plots) == 4
    assert all(base64.b64decode(u)[:4] == b"\x89PNG" for u in uris)
    assert not re.search(r'(?:src|href)="(?!data:|#)', html) and not re.search(r"<(?:link|script)\b|url\(", html)
    assert "made by &lt;hand&gt; &amp; checked" in html  # escaped
    # the same numbers: every percentage and 3-decimal figure of report.md is a cell or phrase of report.html
    numbers = set(re.findall(r"\d+\.\d%|\d+\.\d{3}\b", md))
    assert len(numbers) > 20
    assert [n for n in numbers if n not in html] == []
    for text in ("best of ddn, bp", "transfer_beats_white_box", "ab" * 32, "max_success_rate (linf eps = 0.1)",
                 "&lt;= true budget &lt;="):
        assert text in html, text


def test_written_report_matches_the_schema(m, tmp_path):
    data = json.loads(write_report(tmp_path, full_report(m)).json.read_text())
    schema = load_schema()
    assert data["format"] == REPORT_FORMAT == schema["$id"] and "2020-12" in schema["$schema"]
    validate_report(data)
    # gate checks: a stable id, a numeric threshold (None: not set), parameters as fields of their own
    checks = {c["id"]: c for c in data["gate"]["checks"]}
    assert list(checks) == ["min_clean_accuracy", "min_robust_accuracy", "max_success_rate", "min_median_distortion",
                            "min_certified_budget", "max_warnings"]
    assert {k: checks["max_success_rate"][k] for k in ("threshold", "value", "passed", "norm", "eps")} == \
        {"threshold": 0.7, "value": 0.6, "passed": True, "norm": "linf", "eps": 0.1}
    assert (checks["min_clean_accuracy"]["passed"], checks["min_clean_accuracy"]["threshold"]) == (False, 0.9)
    assert (checks["min_median_distortion"]["threshold"], checks["min_median_distortion"]["passed"]) == (None, None)
    assert checks["min_certified_budget"]["target"] == 0.5 and checks["min_certified_budget"]["value"] == 0.5


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r["metrics"].pop("clean_accuracy"), "metrics: 'clean_accuracy' is a required property"),
    (lambda r: r.pop("gate"), "(top level): 'gate' is a required property"),
    (lambda r: r.update(format="advshield.audit-report/1"), "format: 'advshield.audit-report/2' was expected"),
    (lambda r: r["metrics"]["attacks"]["ddn"].update(p_suc=1.5), "metrics/attacks/ddn/p_suc: 1.5 is greater than"),
    (lambda r: r["metrics"]["attacks"]["pgd_linf"].pop("per_eps"), "metrics/attacks/pgd_linf: 'per_eps' is a required"),
    (lambda r: r["gate"]["checks"][1].update(threshold="-"), "gate/checks/1/threshold: '-' is not of type"),
    (lambda r: r["gate"]["checks"][0].update(id="clean accuracy"), "gate/checks/0/id: 'clean accuracy' is not one of"),
    (lambda r: r["metrics"]["attacks"]["ddn"]["quantiles"].update({"0.9": "infinite"}), "metrics/attacks/ddn/quantiles/0.9"),
])
def test_a_broken_report_fails_validation(m, corrupt, message):
    report = json.loads(json.dumps(full_report(m)))
    validate_report(report)
    corrupt(report)
    with pytest.raises(ReportSchemaError, match=re.escape(message)):
        validate_report(report)


def test_linf_budgets_are_labelled_on_the_8_bit_lattice():
    assert eps_label(8 / 255) == "8/255 (0.03137)"
    assert eps_label(0.03) == "0.03 (= 7/255 after rounding)"
    assert eps_label(0.5, "l2") == "0.5"
    assert eps_label(0.03, "linf", levels=0) == "0.03"
