"""The audit runner: the [audit] section, the never-trust check (a cheating attack is a failure),
re-scoring through the serving path, the cascade, and resume after an interruption."""

from __future__ import annotations

import json
from types import MappingProxyType

import numpy as np
import pytest
import torch

from advshield.attacks import registry
from advshield.attacks.audit import (
    RECORDS,
    Auditor,
    AuditSpec,
    RecordLog,
    audit_spec,
    build_setup,
    derive_seed,
    load_examples,
    read_records,
)
from advshield.attacks.gate import evaluate_gate
from advshield.attacks.registry import AttackSpec
from advshield.attacks.report import build_report, compute_metrics, jsonable, render_markdown, validate_report
from advshield.core.errors import ConfigError, InputError
from advshield.core.validation import from_mapping
from advshield.plugin.config import GateSpec, load_pipeline

N = 12


def spec_of(**table) -> AuditSpec:
    base = {"samples": N, "batch_size": 4, "sanity_samples": 4, "eps_linf": [0.02, 0.05], "eps_l2": [0.5, 1.0]}
    return from_mapping(AuditSpec, {**base, **table}, "audit")


FAST = [
    {"name": "ddn", "steps": 10},
    {"name": "fgsm"},
    {"name": "pgd_linf", "steps": 5},
    {"name": "fgsm", "transfer": True},
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg(pipeline_path):
    return load_pipeline(pipeline_path)


@pytest.fixture(scope="module")
def data(fashion_test):
    return fashion_test.as_float(0, N), np.asarray(fashion_test.labels[:N], np.int64)


@pytest.fixture(scope="module")
def setup(cfg, data):
    return build_setup(cfg, spec_of(attacks=FAST), torch.from_numpy(data[0][:8]))


def strip(records):
    """Records without their timings (everything else must be reproducible)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


# --- the [audit] section ---------------------------------------------------------------------------

def test_default_section_and_pipeline_sections_parse(cfg):
    spec = audit_spec(cfg)
    assert [e.id for e in spec.entries] == ["ddn", "bp", "apgd_ce_linf", "apgd_t_linf", "apgd_ce_l2", "apgd_t_l2",
                                            "fgsm", "transfer_pgd_linf", "square_linf", "hsj_l2"]
    assert [e.id for e in AuditSpec().entries] == ["ddn", "bp", "apgd_ce_linf", "apgd_t_linf", "detector_sweep_linf",
                                                   "opgd_linf", "apgd_ce_l2", "apgd_t_l2", "detector_sweep_l2",
                                                   "opgd_l2", "fgsm", "transfer_pgd_linf", "square_linf", "hsj_l2"]
    assert [e.source for e in spec.entries[-3:]] == ["transfer", "black-box", "black-box"]
    assert spec.entries[-3].kind == "budget" and spec.entries[-3].norm == "linf"
    assert spec.eps_for(spec.entries[2]) == spec.eps_linf
    # the L-inf grid lies on the 8-bit lattice: every budget is a whole number of grey levels
    assert all(abs(e * 255 - round(e * 255)) < 1e-9 for e in spec.eps_linf)


@pytest.mark.parametrize("table, match", [
    ({"sampels": 3}, "unknown key 'sampels'"),
    ({"attacks": ["pgd_infinity"]}, r"audit.attacks\[0\].name: unknown attack 'pgd_infinity'"),
    ({"attacks": [{"name": "pgd_linf", "stepz": 3}]}, r"audit.attacks\[0\]: attack 'pgd_linf': unknown hyper-parameter 'stepz'"),
    ({"attacks": [{"name": "ddn", "eps": 0.1}]}, r"audit.attacks\[0\].eps: 'ddn' is a minimal attack"),
    ({"attacks": ["fgsm", "fgsm"]}, "id 'fgsm' used twice"),
    ({"attacks": [{"name": "pgd_linf", "eps": [0.1, 0.05]}]}, "strictly increasing"),
    ({"eps_linf": [0.1, 2.0]}, "an L-inf eps is at most 1"),
    ({"adaptive": "sometimes"}, "audit.adaptive: expected 'auto' or 'on' or 'off'"),
    ({"samples": 0}, "audit.samples: must be >= 1, got 0"),
])
def test_section_errors_name_the_bad_value(table, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(AuditSpec, table, "audit")


def test_gate_eps_joins_the_grid_and_select_keeps_listed_attacks():
    spec = spec_of(attacks=FAST)
    assert spec.with_gate_eps(0.1).eps_linf == (0.02, 0.05, 0.1)
    assert spec.with_gate_eps(0.05) is spec
    assert [e.id for e in spec.select(["fgsm", "ddn"]).entries] == ["ddn", "fgsm"]
    with pytest.raises(ConfigError, match="unknown attack id 'pgd'"):
        spec.select(["pgd"])


def test_seeds_are_stable():
    assert derive_seed(0, "pgd_linf", 0.05, 3) == derive_seed(0, "pgd_linf", 0.05, 3)
    assert derive_seed(0, "pgd_linf", 0.05, 3) != derive_seed(0, "pgd_linf", 0.05, 4)


# --- never trust the attack ------------------------------------------------------------------------

def _cheat(model, inputs, labels, *, targeted=False, eps=0.1, how="grey"):
    """Fools the model by leaving the budget: a flat grey image, or NaN."""
    if how == "nan":
        return torch.full_like(inputs, float("nan"))
    return torch.full_like(inputs, 0.5)


def test_a_cheating_attack_is_counted_as_a_failure(monkeypatch, tmp_path, setup, data):
    monkeypatch.setitem(registry.ATTACKS, "cheat", AttackSpec("cheat", _cheat, "budget", "linf", MappingProxyType({})))
    spec = spec_of(attacks=["cheat", {"name": "cheat", "id": "cheat_nan", "how": "nan"}], sanity_eps=0.0)
    records = Auditor(setup, spec, *data, tmp_path, progress=False).run()
    attacked = [r for r in records if r["attack"] == "cheat"]
    assert attacked and all(r["reason"] == "outside the budget" and not r["valid"] and not r["success"] for r in attacked)
    # the serving path was fooled: counted as a success, the cheat would have broken samples
    assert any(r["adv_pred"] != r["label"] for r in attacked)
    nan = [r for r in records if r["attack"] == "cheat_nan"]
    assert nan and all(r["reason"] == "not finite" and not r["success"] for r in nan)
    m = compute_metrics(records, spec)
    assert m["robust_accuracy"]["linf"]["all attacks"] == [m["clean_accuracy"]] * 2
    assert m["attacks"]["cheat"]["invalid"] == {"outside the budget": len(attacked)}


# --- the runner ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_run(setup, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    spec = spec_of(attacks=FAST)
    records = Auditor(setup, spec, *data, out, progress=False).run()
    return spec, out, records


def test_records_cover_every_phase_and_respect_the_threat_model(full_run, data):
    _, _, records = full_run
    clean = [r for r in records if r["attack"] == "clean"]
    assert sorted(r["sample"] for r in clean) == list(range(N))
    correct = {r["sample"] for r in clean if r["correct"]}
    ddn = [r for r in records if r["attack"] == "ddn"]
    assert sorted(r["sample"] for r in ddn) == sorted(correct)  # minimal: every correct sample
    for r in records:
        if r["kind"] == "budget":
            assert r["sample"] in correct
            assert r[r["norm"]] <= r["eps"] + 1e-6 or not r["valid"]
        assert r["success"] == (r["valid"] and r.get("adv_pred") not in (None, r["label"]) and not r["flagged"]) \
            or r["attack"] == "clean"
    assert {r["source"] for r in records} == {"clean", "white-box", "transfer", "sanity"}
    assert all(r["gradients"] == 10 for r in ddn)  # one gradient per step and image
    assert all(r["gradients"] == 5 for r in records if r["attack"] == "pgd_linf")


def test_the_cascade_attacks_only_samples_still_robust(full_run):
    _, _, records = full_run
    broken_at: dict[int, float] = {}
    for r in records:  # records are in the order the units ran
        if r["kind"] == "budget" and r["norm"] == "linf" and r["source"] != "sanity":
            assert broken_at.get(r["sample"], np.inf) > r["eps"], "attacked a sample already broken within eps"
        if r["success"] and r["source"] != "sanity":
            broken_at[r["sample"]] = min(broken_at.get(r["sample"], np.inf), r["linf"])


def test_adversarial_examples_are_rounded_and_rescored_through_the_serving_path(full_run, setup, data):
    _, out, records = full_run
    stored = load_examples(out, "ddn")
    rows = [r for r in records if r["attack"] == "ddn"]
    x = torch.from_numpy(np.stack([stored[r["sample"]] for r in rows]))
    assert torch.equal(torch.round(x * 255) / 255, x)  # on the 8-bit grid
    pred = setup.scorer.predict(x)
    assert pred.probs.argmax(1).tolist() == [r["adv_pred"] for r in rows]
    clean = data[0][[r["sample"] for r in rows]]
    d2 = np.linalg.norm((x.numpy() - clean).reshape(len(rows), -1), axis=1)
    np.testing.assert_allclose(d2, [r["l2"] for r in rows], rtol=1e-5)
    assert sum(r["success"] for r in rows) >= len(rows) - 1


def test_resume_after_an_interruption_gives_the_same_records(full_run, setup, data, tmp_path):
    spec, _, reference = full_run
    commits = []

    def interrupt(key):
        commits.append(key)
        if len(commits) == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Auditor(setup, spec, *data, tmp_path, progress=False, on_commit=interrupt).run()
    path = tmp_path / RECORDS
    # a torn write after the interruption: records of an uncommitted batch and half a line
    lines = path.read_text().splitlines()
    uncommitted = [line for line in lines if '"attack"' in line][-2:]
    with path.open("a") as f:
        f.write("\n".join(uncommitted) + "\n" + uncommitted[0][: len(uncommitted[0]) // 2])
    header, _, done = read_records(path)
    assert len(done) == 9 and header is not None
    resumed = []
    records = Auditor(setup, spec, *data, tmp_path, progress=False, on_commit=resumed.append).run()
    assert not set(resumed) & set(commits)  # committed batches were not redone
    assert strip(records) == strip(reference)
    again = Auditor(setup, spec, *data, tmp_path, progress=False).run()  # nothing left to do
    assert strip(again) == strip(reference)
    assert strip(read_records(path)[1]) == strip(reference)


def test_resume_refuses_records_of_a_different_audit(full_run, setup, data):
    _, out, _ = full_run
    other = spec_of(attacks=FAST, seed=1)
    with pytest.raises(ConfigError, match=r"different audit.*seed"):
        Auditor(setup, other, *data, out, progress=False)
    changed = spec_of(attacks=[{"name": "ddn", "steps": 11}])
    with pytest.raises(ConfigError, match="attack 'ddn' was run with other hyper-parameters"):
        Auditor(setup, changed, *data, out, progress=False)


def test_records_are_flushed_as_they_are_produced(setup, data, tmp_path):
    seen = []

    def look(key):
        seen.append(sum(1 for line in (tmp_path / RECORDS).read_text().splitlines() if "commit" in json.loads(line)))

    Auditor(setup, spec_of(attacks=["fgsm"], sanity_eps=0.0), *data, tmp_path, progress=False, on_commit=look).run()
    assert seen == list(range(1, len(seen) + 1))  # each batch is on disk when it is committed


@pytest.mark.slow
def test_remote_scoring_gives_the_same_records(full_run, cfg, data, tmp_path, pipeline_path):
    """Re-scoring through a live advshield server over gRPC equals re-scoring in process."""
    from server_helpers import start_server

    from advshield.plugin.client import RemoteClassifier

    spec, _, reference = full_run
    srv = start_server(pipeline_path, tmp_path / "server.log")
    try:
        with RemoteClassifier(srv.url) as remote:
            setup = build_setup(cfg, spec, torch.from_numpy(data[0][:8]), scorer=remote)
            records = Auditor(setup, spec, *data, tmp_path / "remote", progress=False).run()
    finally:
        srv.stop()
    a, b = strip(records), strip(reference)
    assert [(r["attack"], r["sample"], r["eps"]) for r in a] == [(r["attack"], r["sample"], r["eps"]) for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in ("l2", "linf", "score")} == \
            {k: v for k, v in y.items() if k not in ("l2", "linf", "score")}
        assert x["l2"] == pytest.approx(y["l2"]) and x["linf"] == pytest.approx(y["linf"])


def test_detector_attacks_run_only_against_a_detector(setup, data, tmp_path):
    spec = from_mapping(AuditSpec, {"samples": N, "batch_size": N}, "audit")  # the default cascade
    auditor = Auditor(setup, spec, *data, tmp_path, progress=False)
    names = {u.name for u in auditor.units()}
    assert not setup.mode["detector_aware"] and "apgd_t_linf" in names
    assert not names & {"opgd_linf", "opgd_l2", "detector_sweep_linf", "detector_sweep_l2"}
    auditor.setup.mode["detector_aware"] = True  # as build_setup sets it for a pipeline with a detector
    assert {"opgd_linf", "detector_sweep_l2"} <= {u.name for u in auditor.units()}
    auditor.setup.mode["detector_aware"] = False
    auditor.log.close()


def test_metrics_refuse_duplicated_records(full_run):
    """Two runs' records concatenated would count samples twice (robust accuracy 0.33 -> 0.58)."""
    spec, _, records = full_run
    compute_metrics(records, spec)
    with pytest.raises(InputError, match=r"duplicated record for sample \d+, attack 'clean'"):
        compute_metrics(records + records, spec)


def test_resume_keeps_committed_units_without_records(full_run):
    """A unit with no sample left to attack commits with no rows; a resumed log keeps its commit."""
    _, out, records = full_run
    path = out / RECORDS
    _, _, done = read_records(path)
    committed_lines = sum('"commit"' in line for line in path.read_text().splitlines())
    empty = {k for k in done if not any((r["attack"], r["eps"], r["batch"]) == (k[0], k[1], k[2]) for r in records)}
    assert empty, "the fixture's audit should leave some units with nothing to attack"
    log = RecordLog(path, read_records(path)[0], fresh=False)  # the rewrite a resume does
    log.close()
    _, _, after = read_records(path)
    assert after == done and sum('"commit"' in line for line in path.read_text().splitlines()) == committed_lines


def test_the_thesis_protocol_runs_every_attack_on_every_correct_sample(setup, data, tmp_path):
    """protocol = "independent": no cascade; each attack gets its own statistics, with and without
    8-bit rounding."""
    spec = spec_of(attacks=[{"name": "fgsm"}, {"name": "pgd_linf", "steps": 5}, {"name": "ddn", "steps": 10}],
                   protocol="independent", sanity_eps=0.0)
    records = Auditor(setup, spec, *data, tmp_path, progress=False).run()
    correct = {r["sample"] for r in records if r["attack"] == "clean" and r["correct"]}
    for attack in ("fgsm", "pgd_linf"):
        for eps in spec.eps_linf:
            attacked = {r["sample"] for r in records if r["attack"] == attack and r["eps"] == eps}
            assert attacked == correct, (attack, eps)  # no cascade: broken samples are attacked again
    attacked = [r for r in records if r["attack"] != "clean"]
    assert all(isinstance(r["float_success"], bool) and r["float_l2"] >= 0 for r in attacked)
    m = compute_metrics(records, spec)
    rows = {(r["attack"], r["eps"]): r for r in m["independent"]["rows"]}
    assert set(rows) == {("ddn", None)} | {(a, e) for a in ("fgsm", "pgd_linf") for e in spec.eps_linf}
    # a larger budget breaks at least as much, for the iterative attack on the same samples
    p = [rows[("pgd_linf", e)]["rounded"]["p_suc"] for e in spec.eps_linf]
    assert p == sorted(p)
    assert 0 <= rows[("ddn", None)]["float"]["p_suc"] <= 1
    report = build_report(pipeline={"name": "t", "sha256": {}, "paths": {}}, spec=spec, probes={"mode": setup.mode},
                          metrics=m, warnings=[], gate=evaluate_gate(GateSpec(), m).to_dict(), budget=None)
    validate_report(jsonable(report))
    text = render_markdown(jsonable(report), {})
    assert "the thesis's protocol" in text and "| pgd_linf | linf | " in text
