"""Masking checks that fire in real runs: deliberately masked pipelines through the runner and the
probes (independent runs of FGSM, the iterative attack and the transfer attack on one subsample,
twice the steps, more restarts, the BPDA approximation error), and the shipped undefended pipeline,
where none of them fires."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from advshield.attacks.adaptive import AttackModel
from advshield.attacks.audit import Auditor, AuditSpec, Setup, build_setup, run_probes
from advshield.attacks.audit.probes import attack_probe, bpda_probe, probe_attacks, probe_eps, probe_positions
from advshield.attacks.audit_pipeline import audit_pipeline
from advshield.attacks.masking import masking_warnings
from advshield.attacks.primitives import bview, l2, quantize
from advshield.core.errors import ConfigError
from advshield.core.validation import from_mapping
from advshield.defenses.base import Defense
from advshield.defenses.squeeze import BitDepth, BitDepthConfig
from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier
from advshield.plugin.config import load_pipeline
from advshield.plugin.pipeline import DefendedClassifier

PIPELINES = Path(__file__).resolve().parents[1] / "advshield" / "pipelines"
N = 40  # test images audited; the probes draw 32 of the correct ones
PROBE_CODES = {"single_step_beats_iterative", "transfer_beats_white_box", "not_converged", "restarts_break_more",
               "bpda_approximation_error"}

pytestmark = pytest.mark.usefixtures("one_thread")


# --- deliberately masked defenses ------------------------------------------------------------------

class ShatteredGradient(Defense):
    """The identity, declared differentiable, whose gradient is the true one on the 8-bit grid (clean
    images) and zero everywhere else: FGSM from the clean image sees the model's gradient, an
    iterative attack is blind from its random start (or its first step) on."""

    name = "shattered_gradient"
    differentiable = True

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        on_grid = ((x * 255 - torch.round(x * 255)).abs() < 1e-3).flatten(1).all(1)
        return x.detach() + (x - x.detach()) * bview(on_grid.to(x.dtype), x)


class RoundedAsDifferentiable(Defense):
    """8-bit rounding declared differentiable: autograd's gradient of a step function is zero."""

    name = "rounded_as_differentiable"
    differentiable = True

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return quantize(x)


class WrongApproximation(Defense):
    """4-bit depth reduction whose BPDA approximation is 0.5 everywhere (not the defense at all)."""

    name = "wrong_approximation"

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return quantize(x, 16)

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 + 0 * x


# --- running the cascade and the probes on a hand-built setup ---------------------------------------

@pytest.fixture(scope="module")
def data(fashion_test):
    return fashion_test.as_float(0, N), np.asarray(fashion_test.labels[:N], np.int64)


@pytest.fixture(scope="module")
def serving(model_path):
    return OnnxClassifier(model_path, device="cpu")


@pytest.fixture(scope="module")
def surrogate(surrogate_path):
    """The bare surrogate: transfer attacks crafted on it, blind to the target's defenses."""
    return AttackModel(TwinClassifier(surrogate_path, validate=False, device="cpu"), [])


def spec_of(**table) -> AuditSpec:
    base = {"samples": N, "batch_size": N, "sanity_samples": 0, "eps_linf": [0.1], "eps_l2": [1.0],
            "attacks": ["fgsm"]}
    return from_mapping(AuditSpec, {**base, **table}, "audit")


def audit(tmp_path, data, serving, twin, defenses, *, surrogate=None, gate_eps=0.1, **table):
    """The runner's cascade, then the probes and the masking warnings, as ``audit_pipeline`` runs them."""
    spec = spec_of(**table).with_gate_eps(gate_eps)
    mode = {"adaptive": "auto", "defenses": [repr(d) for d in defenses],
            "bpda": [d.name for d in defenses if not d.differentiable], "eot_samples": 1,
            "random_declared": False, "random_measured": False}
    setup = Setup(DefendedClassifier(serving, list(defenses)), AttackModel(twin, defenses, seed=spec.seed),
                  surrogate, mode, twin, list(defenses))
    auditor = Auditor(setup, spec, *data, tmp_path / "audit", fresh=True, progress=False)
    records = auditor.run()
    probes = run_probes(setup, *data, auditor.correct, spec.seed, auditor=auditor, gate_eps=gate_eps)
    warnings = masking_warnings(records, probes, spec.masking_tolerance,
                                convergence_tolerance=spec.convergence_tolerance, bpda_tolerance=spec.bpda_tolerance)
    return auditor, probes, {w.code: w for w in warnings}


def test_shattered_gradients_single_step_beats_iterative(tmp_path, data, serving, twin):
    _, probes, warned = audit(tmp_path, data, serving, twin, [ShatteredGradient(None)],
                              attacks=[{"name": "apgd_ce_linf", "steps": 10}, "fgsm"],
                              probe_attack={"name": "pgd_linf", "steps": 10})
    p = probes["attacks"]
    assert len(p["samples"]) == 32 and p["eps"] == 0.1 and p["eps_from"] == "gate_eps"
    assert p["skipped"] == {"transfer": "no surrogate"} and set(p["runs"]) == {"iterative", "steps_2x", "restarts",
                                                                                 "single_step"}
    runs = p["runs"]
    assert runs["single_step"]["success_rate"] > 0.7 > 0.3 > runs["iterative"]["success_rate"]
    w = warned["single_step_beats_iterative"]
    assert w.details["probe"] == "single_step" and w.details["share"] > 0.5
    strong = set(runs["iterative"]["broken"]) | set(runs["steps_2x"]["broken"]) | set(runs["restarts"]["broken"])
    assert set(w.details["samples"]) == set(runs["single_step"]["broken"]) - strong
    # the cascade (APGD, then FGSM on what it left) saw it too: one warning, carrying both
    assert w.details["cascade"]["share"] > 0.5 and "the cascade's records agree" in w.message
    # the gradient at the clean images is the model's own: the gradient probe sees nothing
    assert "zero_gradients" not in warned and set(warned) == {"single_step_beats_iterative"}


def test_zero_gradient_step_transfer_beats_white_box_and_restarts_break_more(tmp_path, data, serving, twin, surrogate):
    _, probes, warned = audit(tmp_path, data, serving, twin, [RoundedAsDifferentiable(None)], surrogate=surrogate,
                              eps_linf=[0.3], probe_eps=0.3, probe_attack={"name": "pgd_linf", "steps": 10})
    runs = probes["attacks"]["runs"]
    assert probes["attacks"]["eps_from"] == "probe_eps" and runs["transfer"]["source"] == "transfer"
    assert runs["single_step"]["success_rate"] == 0.0  # FGSM cannot move on a zero gradient
    w = warned["transfer_beats_white_box"]
    assert w.details["probe"] == "transfer" and w.details["share"] > 0.3
    # each restart is one more random start (the only thing a zero-gradient PGD tries)
    r = warned["restarts_break_more"]
    assert r.details["restarts"] == 5 and set(r.details["samples"]) == set(runs["restarts"]["broken"]) - set(
        runs["iterative"]["broken"])
    assert runs["restarts"]["success_rate"] > runs["iterative"]["success_rate"]
    assert "zero_gradients" in warned and "single_step_beats_iterative" not in warned


def test_too_few_steps_are_not_converged(tmp_path, data, serving, twin):
    # the audit's own iterative attack (the first white-box L-inf one with steps), capped at 3 steps of
    # one grey level: it cannot even reach the budget's faces
    auditor, probes, warned = audit(tmp_path, data, serving, twin, [],
                                    attacks=[{"name": "pgd_linf", "steps": 3, "step_size": 1 / 255}, "fgsm"])
    runs = probes["attacks"]["runs"]
    assert runs["iterative"]["attack"] == "pgd_linf" and runs["steps_2x"]["hyper"]["steps"] == 6
    assert runs["steps_2x"]["gradients_per_image"] == 2 * runs["iterative"]["gradients_per_image"] == 6
    w = warned["not_converged"]
    assert w.details["change"] > 0.1 and w.details["steps"] == 6
    # reproducible: the subsample and every run derive from the audit seed
    assert attack_probe(auditor, 0.1) == probes["attacks"]


def test_a_wrong_bpda_approximation_warns(tmp_path, data, serving, twin):
    bits = BitDepth(BitDepthConfig(bits=4))  # a shipped defense, identity approximation: a small error
    auditor, probes, warned = audit(tmp_path, data, serving, twin, [bits, WrongApproximation(None)],
                                    probe_samples=16, probe_attack={"name": "pgd_linf", "steps": 2})
    rows = {r["defense"]: r for r in probes["bpda"]["defenses"]}
    assert probes["bpda"]["samples"] == 16 and set(rows) == {"bit_depth", "wrong_approximation"}
    x = auditor.images[probe_positions(auditor.correct, 16, 0)]
    assert rows["bit_depth"]["mean_l2"] == pytest.approx(float(l2(bits.transform(x) - x).double().mean()))
    assert rows["bit_depth"]["max_relative"] < 0.1 < 0.5 < rows["wrong_approximation"]["mean_relative"]
    w = warned["bpda_approximation_error"]
    assert [r["defense"] for r in w.details["defenses"]] == ["wrong_approximation"]
    assert rows["wrong_approximation"]["layer"] == "image"


def test_zero_gradients_black_box_beats_white_box(tmp_path, data, serving, twin):
    # 8-bit rounding declared differentiable: APGD sees a zero gradient and only its random start
    # moves; Square, which only reads the serving path's probabilities, breaks what APGD left
    auditor, _, warned = audit(tmp_path, data, serving, twin, [RoundedAsDifferentiable(None)], eps_linf=[0.1],
                               attacks=[{"name": "apgd_ce_linf", "steps": 10}, {"name": "square_linf", "queries": 300}],
                               probe_samples=0)
    records = auditor.log.records
    white = {r["sample"] for r in records if r["attack"] == "apgd_ce_linf" and r["success"]}
    black = {r["sample"] for r in records if r["attack"] == "square_linf" and r["success"]}
    assert not white & black and len(black) > len(white)
    w = warned["black_box_beats_white_box"]
    assert set(w.details["samples"]) == black and w.details["share"] > 0.3
    assert w.details["by_eps"] == {"linf:0.1": sorted(black)}
    # the unmasked model: APGD's gradients are the model's, Square finds nothing APGD missed
    _, _, fair = audit(tmp_path / "fair", data, serving, twin, [], eps_linf=[0.1], probe_samples=0,
                       attacks=[{"name": "apgd_ce_linf", "steps": 10}, {"name": "square_linf", "queries": 300}])
    assert "black_box_beats_white_box" not in fair


def test_bpda_probe_of_an_exact_surrogate_is_zero(data):
    from advshield.defenses.squeeze import Median, MedianConfig

    x = torch.from_numpy(data[0][:8])
    exact, identity = Median(MedianConfig(size=2)), Median(MedianConfig(size=2, approximation="identity"))
    rows = bpda_probe(AttackModel(lambda v: v, [exact, identity]), x, seed=0)["defenses"]
    assert rows[0]["max_l2"] == 0.0
    # the identity is compared on the median's output (what the second defense receives)
    y = exact.transform(x)
    assert rows[1]["mean_l2"] == pytest.approx(float(l2(exact.transform(y) - y).double().mean()))


# --- the shipped pipeline: nothing to warn about -----------------------------------------------------

def test_the_shipped_undefended_pipeline_raises_no_masking_warning(tmp_path):
    text = (PIPELINES / "fashion_mnist.toml").read_text().replace("../models", (PIPELINES.parent / "models").as_posix())
    audit_section = f"""[audit]
samples = {N}
batch_size = {N}
sanity_samples = 0
eps_linf = [0.05]
eps_l2 = [1.0]
attacks = [{{ name = "apgd_ce_linf", steps = 25 }}, {{ name = "fgsm" }}, {{ name = "pgd_linf", steps = 10, transfer = true }}]
"""
    path = tmp_path / "pipeline.toml"
    path.write_text(text.split("[audit]")[0] + audit_section)
    cfg = load_pipeline(path)
    result = audit_pipeline(cfg, out=tmp_path / "out", progress=False, certify=False)
    assert result.warnings == []
    p = result.probes["attacks"]
    assert p["eps"] == cfg.gate.gate_eps > 0 and p["eps_from"] == "gate_eps" and len(p["samples"]) == 32
    assert set(p["runs"]) == {"iterative", "steps_2x", "restarts", "single_step", "transfer"}
    assert p["runs"]["iterative"]["attack"] == "apgd_ce_linf" and p["runs"]["transfer"]["attack"] == "transfer_pgd_linf"
    assert result.probes["bpda"] == {"samples": 32, "defenses": []}
    assert json.loads((tmp_path / "out" / "probes.json").read_text())["attacks"]["samples"] == p["samples"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["probes"]["attacks"]["runs"]["restarts"]["hyper"]["restarts"] == 5
    assert "masking probes, independent runs on the same 32 correct samples" in (tmp_path / "out" / "report.md").read_text()


# --- the [audit] keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("table, match", [
    ({"probe_samples": -1}, "audit.probe_samples: must be >= 0"),
    ({"probe_eps": 2.0}, "audit.probe_eps: an L-inf eps is at most 1"),
    ({"probe_restarts": 1}, "audit.probe_restarts: must be >= 2"),
    ({"convergence_tolerance": 1.5}, r"audit.convergence_tolerance: must be within \[0, 1\)"),
    ({"bpda_tolerance": 0.0}, "audit.bpda_tolerance: must be > 0"),
    ({"probe_attack": "ddn"}, "audit.probe_attack: 'ddn' is a minimal attack"),
    ({"probe_attack": "fgsm"}, "audit.probe_attack: 'fgsm' has no steps"),
    ({"probe_attack": "pgd_l2"}, "'pgd_l2' is an l2 attack; the probes run in gate_norm = 'linf'"),
    ({"probe_attack": {"name": "pgd_linf", "transfer": True}}, "must be a white-box attack"),
    ({"probe_attack": {"name": "pgd_linf", "eps": 0.1}}, "remove eps"),
    ({"probe_attack": {"name": "pgd_linf", "stepz": 3}}, r"audit.probe_attack: attack 'pgd_linf': unknown hyper-parameter"),
])
def test_probe_keys_are_validated(table, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(AuditSpec, table, "audit")


def test_probe_budget_and_subsample():
    spec = spec_of(eps_linf=[0.02, 0.05, 0.1])
    assert probe_eps(spec) == (0.05, "middle of the grid")
    assert probe_eps(spec, gate_eps=0.08) == (0.08, "gate_eps")
    assert probe_eps(spec_of(probe_eps=0.03), gate_eps=0.08) == (0.03, "probe_eps")
    correct = np.arange(100) % 3 != 0
    pos = probe_positions(correct, 32, seed=0)
    assert len(pos) == 32 and correct[pos].all() and list(pos) == sorted(pos)
    assert list(pos) == list(probe_positions(correct, 32, seed=0)) != list(probe_positions(correct, 32, seed=1))
    assert list(probe_positions(correct[:10], 32, seed=0)) == list(np.flatnonzero(correct[:10]))


def test_the_probes_attack_what_the_audit_lists_in_the_gate_norm():
    default = {k: e.id for k, e in probe_attacks(from_mapping(AuditSpec, {}, "audit"), transfer=True).items()}
    assert default == {"iterative": "apgd_ce_linf", "single_step": "fgsm", "transfer": "transfer_pgd_linf"}
    l2_only = probe_attacks(from_mapping(AuditSpec, {"gate_norm": "l2", "attacks": ["ddn", "fgsm"]}, "audit"), transfer=True)
    assert {k: (e.name, e.transfer) for k, e in l2_only.items()} == {
        "iterative": ("apgd_ce_l2", False), "single_step": ("fgsm_l2", False), "transfer": ("pgd_l2", True)}
    named = from_mapping(AuditSpec, {"probe_attack": {"name": "pgd_linf", "steps": 7}}, "audit")
    assert dict(probe_attacks(named, transfer=False)["iterative"].hyper) == {"steps": 7}


def test_a_random_pipeline_is_probed_with_eot_and_scored_by_majority_of_draws(tmp_path, fashion_test):
    cfg = load_pipeline(PIPELINES / "fashion_mnist_random.toml")
    x, y = fashion_test.as_float(0, 8), np.asarray(fashion_test.labels[:8], np.int64)
    spec = spec_of(samples=8, batch_size=8, eot_samples=2, draws=3, probe_samples=4,
                   probe_attack={"name": "pgd_linf", "steps": 2}, transfer=False)
    setup = build_setup(cfg, spec, torch.from_numpy(x))
    auditor = Auditor(setup, spec, x, y, tmp_path / "random", fresh=True, progress=False)
    auditor.run()
    assert auditor.random and auditor.draws == 3
    probes = run_probes(setup, x, y, auditor.correct, spec.seed, auditor=auditor)
    runs = probes["attacks"]["runs"]
    assert len(probes["attacks"]["samples"]) == min(4, int(auditor.correct.sum()))
    # the cost counts the EOT draws: 2 steps x 2 draws per image, 1 x 2 for FGSM
    assert runs["iterative"]["gradients_per_image"] == 4 and runs["single_step"]["gradients_per_image"] == 2
    assert probes["bpda"]["defenses"] == []  # both defenses are differentiable for a fixed draw
