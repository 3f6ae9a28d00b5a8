"""Probes for the masking checks (``advshield.attacks.masking``), run after the cascade.

* ``gradients``: input-gradient norms of the margin and cross-entropy losses through the attack
  model (BPDA, EOT, detector logit as the attacks see them), on the first correct samples;
* ``randomness``: two seeded passes of the serving path: do the probabilities differ?
* ``attacks`` (:func:`attack_probe`): on a seeded subsample of ``probe_samples`` correct samples,
  at one budget (``probe_eps``, else the gate's eps, else the middle of the grid of ``gate_norm``),
  *independent* runs (not cascaded: each attacks every subsample point) of the iterative white-box
  attack, the same with twice its steps, the same with more random restarts, FGSM, and the
  transfer attack (when the setup has a surrogate). Every example is checked, rounded and
  re-scored through the serving path as the runner does; per run, the samples broken;
* ``bpda`` (:func:`bpda_probe`): per non-differentiable defense the attack model runs with BPDA
  (image layer, and the feature layers of a split twin), ||defense(x) - approximation(x)||_2 on the
  subsample's inputs to that defense, absolute and relative to ||x||_2: BPDA differentiates the
  approximation, so a large error means the attacks follow the gradient of another function.

Seeds derive from the audit seed: the subsample and every run are reproducible. The iterative
attack's three runs share one seed (its first restart is the base run), so what the restarts or
the extra steps add is theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from advshield.attacks.audit.attack_models import Scorer, Setup
from advshield.attacks.audit.records import derive_seed
from advshield.attacks.audit.runner import Auditor
from advshield.attacks.audit.spec import AttackEntry, AuditSpec
from advshield.attacks.primitives import l2, margin, value_and_grad
from advshield.attacks.registry import run_attack
from advshield.attacks.threat import ThreatModel, check_adversarial
from advshield.plugin.split import SplitClassifier

PROBES = "probes.json"
SINGLE_STEP_ATTACK = {"linf": "fgsm", "l2": "fgsm_l2"}
ITERATIVE_ATTACK = {"linf": "apgd_ce_linf", "l2": "apgd_ce_l2"}  # when the audit lists none of the norm
TRANSFER_ATTACK = {"linf": "pgd_linf", "l2": "pgd_l2"}  # when the audit lists none of the norm


def gradient_probe(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   seed: int = 0) -> dict[str, Any]:
    """Per-sample L2 norms of the input gradient of the margin and of the cross-entropy loss
    (through the attack model: BPDA, EOT, detector logit as the attacks see them)."""
    if hasattr(model, "reset"):
        model.reset(seed=seed)
    _, g_margin, z = value_and_grad(model, x, y, False, "margin")
    _, g_ce, _ = value_and_grad(model, x, y, False, "ce")
    n_margin, n_ce = l2(g_margin), l2(g_ce)
    return {
        "samples": len(x),
        "margin_grad_norm": [float(v) for v in n_margin],
        "ce_grad_norm": [float(v) for v in n_ce],
        "margin": [float(v) for v in margin(z, y, False)],
    }


def randomness_probe(scorer: Scorer, x: torch.Tensor) -> dict[str, Any]:
    """Two passes of the serving path with different seeds: do the probabilities differ?"""
    a = np.asarray(scorer.predict(x, seed=1).probs)
    b = np.asarray(scorer.predict(x, seed=2).probs)
    diff = float(np.abs(a - b).max())
    return {"declared": bool(getattr(scorer, "random", False)), "max_prob_diff": diff, "random": diff > 1e-6}


# --- the subsample and the attacks the probes run ------------------------------------------------

def probe_positions(correct: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions of ``n`` correct samples drawn with a seed derived from the audit seed (all of
    them when fewer), ascending."""
    pos = np.flatnonzero(correct)
    if len(pos) > n:
        rng = np.random.default_rng(derive_seed(seed, "probe samples"))
        pos = np.sort(rng.choice(pos, size=n, replace=False))
    return pos


def probe_eps(spec: AuditSpec, gate_eps: float = 0.0) -> tuple[float, str]:
    """(budget of the attack probes in ``spec.gate_norm``, where it comes from)."""
    if spec.probe_eps > 0:
        return spec.probe_eps, "probe_eps"
    if gate_eps > 0:
        return float(gate_eps), "gate_eps"
    grid = spec.grid(spec.gate_norm)
    return grid[len(grid) // 2], "middle of the grid"


def _iterative(e: AttackEntry) -> bool:
    return "steps" in e.spec.hyper_names


def probe_attacks(spec: AuditSpec, transfer: bool) -> dict[str, AttackEntry]:
    """The probes' attacks, in ``spec.gate_norm``: ``iterative`` (``probe_attack``, else the
    audit's first white-box iterative budget attack of the norm, else APGD-CE), ``single_step``
    (the audit's FGSM entry of the norm, for its hyper-parameters, else FGSM) and, with a
    surrogate, ``transfer`` (the audit's first transfer budget attack of the norm, else PGD)."""
    norm = spec.gate_norm
    budget = [e for e in spec.entries if e.kind == "budget" and e.norm == norm]
    white = [e for e in budget if not e.transfer and not e.black_box]
    out = {
        "iterative": spec.probe_entry or next((e for e in white if _iterative(e)),
                                              AttackEntry(ITERATIVE_ATTACK[norm], ITERATIVE_ATTACK[norm])),
        "single_step": next((e for e in white if e.name == SINGLE_STEP_ATTACK[norm]),
                            AttackEntry(SINGLE_STEP_ATTACK[norm], SINGLE_STEP_ATTACK[norm])),
    }
    if transfer:
        out["transfer"] = next((e for e in budget if e.transfer),
                               AttackEntry(f"transfer_{TRANSFER_ATTACK[norm]}", TRANSFER_ATTACK[norm], True))
    return out


def _variants(entry: AttackEntry, restarts: int) -> dict[str, AttackEntry | str]:
    """The iterative attack with twice its steps and with more restarts (``restarts``, or twice its
    own when that is not more); a reason instead of an entry where the attack has no such knob."""
    hyper = entry.spec.hyper(**entry.hyper, **entry._eps_stub())
    out: dict[str, AttackEntry | str] = {}
    steps = hyper.get("steps")
    out["steps_2x"] = (replace(entry, hyper=MappingProxyType({**entry.hyper, "steps": 2 * int(steps)})) if steps
                       else f"{entry.name} has no steps")
    if "restarts" in entry.spec.hyper_names:
        base = int(hyper.get("restarts", 1))
        out["restarts"] = replace(entry, hyper=MappingProxyType(
            {**entry.hyper, "restarts": restarts if restarts > base else 2 * base}))
    else:
        out["restarts"] = f"{entry.name} has no random restarts"
    return out


# --- running and judging one probe attack -----------------------------------------------------------

def _judge(auditor: Auditor, pos: np.ndarray, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, norm: str,
           eps: float, seed: int) -> np.ndarray:
    """Per sample, success as the runner judges a budget example (``Auditor._attack``): clipped,
    budget-checked and rounded, re-scored through the serving path (majority of the draws of a
    random pipeline), moved, misclassified and, with ``flagged_is_failure``, not flagged."""
    checked = check_adversarial(x, adv, ThreatModel(norm, eps, auditor.spec.levels))  # type: ignore[arg-type]
    s, wins = auditor.judge_examples(pos, checked, y, seed)
    return s.majority(wins)


def _run(auditor: Auditor, entry: AttackEntry, pos: np.ndarray, eps: float, seed: int) -> dict[str, Any]:
    model = auditor.surrogate if entry.transfer else auditor.model
    assert model is not None
    x, y = auditor.images[pos], auditor.labels[pos]
    hyper = dict(entry.hyper)
    hyper["eps"] = eps
    if "seed" in entry.spec.hyper_names and "seed" not in hyper:
        hyper["seed"] = seed
    model.reset(seed=seed)
    adv = run_attack(entry.name, model, x, y, **hyper)
    grads = model.gradients / len(pos)
    success = _judge(auditor, pos, x, y, adv, entry.norm, eps, derive_seed(auditor.spec.seed, "probe score", seed))
    return {"attack": entry.id, "name": entry.name, "source": entry.source,
            "hyper": {k: v for k, v in entry.spec.hyper(**hyper).items() if k not in ("eps", "seed")},
            "broken": [int(p + auditor.spec.start) for p in pos[success]],
            "success_rate": float(success.mean()), "gradients_per_image": float(grads)}


def attack_probe(auditor: Auditor, gate_eps: float = 0.0) -> dict[str, Any]:
    """Independent runs of the probes' attacks (:func:`probe_attacks`) on the subsample, at one
    budget; the iterative attack also with twice its steps and with ``probe_restarts`` restarts.
    Cost: about (1 + 2 + probe_restarts) x the iterative attack's gradients per image (restarts
    only on the samples still robust), + 1 (FGSM), + the transfer attack's on the surrogate, each
    times the EOT draws, on ``probe_samples`` images."""
    spec = auditor.spec
    pos = probe_positions(auditor.correct, spec.probe_samples, spec.seed)
    eps, source = probe_eps(spec, gate_eps)
    out: dict[str, Any] = {"samples": [int(p + spec.start) for p in pos], "norm": spec.gate_norm, "eps": eps,
                           "eps_from": source, "runs": {}, "skipped": {}}
    if len(pos) == 0:
        return out
    attacks = probe_attacks(spec, auditor.surrogate is not None)
    iterative = attacks["iterative"]
    seed = derive_seed(spec.seed, "probe", iterative.id, eps)
    runs: dict[str, Any] = {"iterative": _run(auditor, iterative, pos, eps, seed)}
    for key, variant in _variants(iterative, spec.probe_restarts).items():
        if isinstance(variant, str):
            out["skipped"][key] = variant
        else:
            runs[key] = _run(auditor, variant, pos, eps, seed)  # same seed: the first restart is the base run
    for key in ("single_step", "transfer"):
        if key in attacks:
            runs[key] = _run(auditor, attacks[key], pos, eps, derive_seed(spec.seed, "probe", attacks[key].id, eps))
    if "transfer" not in attacks:
        out["skipped"]["transfer"] = "no surrogate"
    out["runs"] = runs
    return out


# --- the BPDA approximation error -------------------------------------------------------------------

def _approximation_error(d: Any, x: torch.Tensor, g: torch.Generator, layer: str) -> dict[str, Any]:
    y = d.transform(x, g)
    err = l2(y - d.approximation(x)).double()
    rel = err / l2(x).double().clamp_min(1e-12)
    return {"defense": d.name, "layer": layer, "mean_l2": float(err.mean()), "max_l2": float(err.max()),
            "mean_relative": float(rel.mean()), "max_relative": float(rel.max())}


@torch.no_grad()
def bpda_probe(model: Any, x: torch.Tensor, seed: int) -> dict[str, Any]:
    """||defense(x) - approximation(x)||_2 (and / ||x||_2) per non-differentiable defense of the
    attack model, each on its own input (the outputs of the defenses before it, and of the split
    twin's segments for a feature layer); forward passes only."""
    g = torch.Generator(device=x.device).manual_seed(derive_seed(seed, "probe bpda"))
    rows: list[dict[str, Any]] = []
    h = x
    for d in getattr(model, "defenses", ()):
        if not d.differentiable:
            rows.append(_approximation_error(d, h, g, "image"))
        h = d.transform(h, g)
    clf = getattr(model, "classifier", None)
    if isinstance(clf, SplitClassifier) and any(clf.steps):
        f = clf.segments[0](h if clf.device is None else h.to(clf.device))
        for cut, group, segment in zip(clf.cuts, clf.steps, clf.segments[1:]):
            for d in group:
                if not d.differentiable:
                    rows.append(_approximation_error(d, f, g, cut))
                f = d.transform(f, g)
            f = segment(f)
    return {"samples": len(x), "defenses": rows}


def run_probes(setup: Setup, images: np.ndarray, labels: np.ndarray, correct: np.ndarray, seed: int,
               n: int = 64, *, auditor: Auditor | None = None, gate_eps: float = 0.0) -> dict[str, Any]:
    """The gradient and randomness probes; with the ``auditor`` that ran the cascade, the attack
    and BPDA probes too (on ``auditor.spec.probe_samples`` correct samples; 0: not run)."""
    pos = np.flatnonzero(correct)[:n]
    probes: dict[str, Any] = {"mode": setup.mode}
    x = torch.from_numpy(np.ascontiguousarray(images[: max(n, 1)], np.float32))
    probes["randomness"] = randomness_probe(setup.scorer, x)
    if not setup.white_box:  # no differentiable twin: the gradient, BPDA and attack probes cannot run
        probes["skipped"] = "no differentiable twin (a served model audited with transfer and black-box attacks only)"
        return probes
    if len(pos):
        xs = torch.from_numpy(np.ascontiguousarray(images[pos], np.float32))
        ys = torch.from_numpy(np.asarray(labels[pos], np.int64))
        probes["gradients"] = gradient_probe(setup.model, xs, ys, seed)
    if auditor is not None and auditor.spec.probe_samples > 0:
        sub = probe_positions(auditor.correct, auditor.spec.probe_samples, auditor.spec.seed)
        if len(sub):
            probes["bpda"] = bpda_probe(setup.model, auditor.images[sub], auditor.spec.seed)
        probes["attacks"] = attack_probe(auditor, gate_eps)
    return probes

