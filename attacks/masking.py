"""Gradient-masking checks (Athalye, Carlini and Wagner 2018; Carlini et al. 2019, "On evaluating
adversarial robustness"), reported as warnings next to the audit's numbers.

Each check reads the audit's records or its probes (``advshield.attacks.audit.run_probes``) and
returns warnings (thresholds: ``masking_tolerance``, ``convergence_tolerance``, ``bpda_tolerance``
of the [audit] section); a warning says the numbers may *overestimate* robustness:

* ``random_without_eot``: the serving path is random (declared, or two seeds give different
  scores) and the white-box attacks averaged no EOT draws;
* ``zero_gradients``: the input gradient of the logit margin through the attack model is zero on
  some correct samples (a step function treated as differentiable, shattered gradients);
* ``vanishing_gradients``: the cross-entropy gradient underflows (softmax saturated) on many
  samples: cross-entropy attacks (FGSM, PGD-CE, DDN) barely move; a margin loss does not saturate;
* ``transfer_beats_white_box`` / ``single_step_beats_iterative``: an attack that knows less (crafted
  on a surrogate) or searches less (one step) broke samples that the white-box iterative attacks
  tried and failed on, at the same budget: in the cascade's records where both attacked a sample
  at an eps, and in the attack probe, where FGSM, the transfer attack and the iterative attack
  each ran on every subsample point (independent runs; the cascade alone rarely lets them meet);
* ``black_box_beats_white_box``: a black-box attack (Square, HopSkipJump: answers of the serving
  path only) broke samples within an eps at which the white-box attacks had left them robust;
  AutoAttack reads a gradient-free attack beating the gradient attacks as the strongest sign of
  masking;
* ``not_converged``: the attack probe's iterative attack with twice its steps raised the success
  rate by more than ``convergence_tolerance``: the audit's attack had not converged;
* ``restarts_break_more``: the same attack with more random restarts broke more than the tolerance
  of the subsample that one run left robust: single runs are unreliable there;
* ``bpda_approximation_error``: a defense's BPDA approximation is far from the defense
  (mean ||defense(x) - approximation(x)||_2 / ||x||_2 above ``bpda_tolerance``): BPDA follows the
  gradient of another function;
* ``unbounded_not_100``: an attack without (or with a huge) budget did not break every sample;
* ``non_adaptive``: the attacks ignored the pipeline's defenses (``adaptive = "off"``);
* ``certificate_violated``: an attack found, on the smoothed classifier, an adversarial example
  inside the radius certified for that sample (a bug, or the certificate's alpha failure).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ZERO_GRAD = 1e-12  # an input-gradient L2 norm at or below this is zero
VANISHING_CE_GRAD = 1e-8  # a cross-entropy gradient norm below this has underflowed
VANISHING_SHARE = 0.1  # share of samples with a vanished CE gradient before the check warns
ITERATIVE = ("pgd", "bim", "apgd", "opgd", "detector_sweep")  # registered attacks that iterate (name prefixes)
SINGLE_STEP = ("fgsm",)
CONVERGENCE_TOLERANCE = 0.02  # defaults of the [audit] keys of the same names
BPDA_TOLERANCE = 0.5


@dataclass(frozen=True)
class MaskingWarning:
    code: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "details": dict(self.details)}


def check_randomness(probes: Mapping[str, Any]) -> list[MaskingWarning]:
    mode, rnd = probes.get("mode", {}), probes.get("randomness", {})
    random = bool(rnd.get("random") or rnd.get("declared") or mode.get("random_declared") or mode.get("random_measured"))
    eot = int(mode.get("eot_samples", 1))
    if random and eot <= 1:
        return [MaskingWarning(
            "random_without_eot",
            f"the pipeline is random (two seeds differ by up to {rnd.get('max_prob_diff', float('nan')):.3g} in "
            f"probability) but the white-box attacks used no EOT (eot_samples = {eot}, adaptive = "
            f"{mode.get('adaptive')!r}): the attacks chase one random draw, so robustness is overestimated; "
            f"audit with adaptive = \"auto\" or eot_samples >= 10",
            {"max_prob_diff": rnd.get("max_prob_diff"), "eot_samples": eot})]
    return []


def check_gradients(probes: Mapping[str, Any], tolerance: float) -> list[MaskingWarning]:
    g = probes.get("gradients")
    if not g or not g.get("samples"):
        return []
    out = []
    m = np.asarray(g["margin_grad_norm"], dtype=np.float64)
    ce = np.asarray(g["ce_grad_norm"], dtype=np.float64)
    zero = float(np.mean(m <= ZERO_GRAD))
    if zero > tolerance:
        out.append(MaskingWarning(
            "zero_gradients",
            f"the input gradient of the logit margin is zero on {zero:.0%} of {len(m)} correct samples "
            f"(median norm {np.median(m):.3g}): gradient attacks cannot move there; a non-differentiable "
            f"step is probably differentiated as if it were smooth; declare it non-differentiable (BPDA)",
            {"zero_share": zero, "median_margin_grad_norm": float(np.median(m))}))
    vanish = float(np.mean((ce < VANISHING_CE_GRAD) & (m > ZERO_GRAD)))  # zero margin gradients: warned above
    if vanish > VANISHING_SHARE:
        out.append(MaskingWarning(
            "vanishing_gradients",
            f"the cross-entropy gradient is below {VANISHING_CE_GRAD:g} on {vanish:.0%} of {len(ce)} correct "
            f"samples (saturated softmax): cross-entropy attacks (FGSM, PGD, DDN) barely move there; rerun "
            f"them with loss = \"margin\"",
            {"vanished_share": vanish, "median_ce_grad_norm": float(np.median(ce))}))
    return out


def _tried(records: Iterable[Mapping[str, Any]], pick) -> dict[tuple[int, str, float], bool]:
    """(sample, norm, eps) -> whether any picked budget record there succeeded."""
    out: dict[tuple[int, str, float], bool] = {}
    for r in records:
        if r["kind"] == "budget" and pick(r):
            key = (r["sample"], r["norm"], round(r["eps"], 10))
            out[key] = out.get(key, False) or bool(r["success"])
    return out


def check_weaker_attacks(records: list[Mapping[str, Any]], correct: int, tolerance: float) -> list[MaskingWarning]:
    """Transfer (or single-step) successes at (sample, eps) where white-box iterative attacks of
    the same norm had tried that sample at that eps and failed."""
    out = []
    white = _tried(records, lambda r: r["source"] == "white-box")
    iterative = _tried(records, lambda r: r["source"] == "white-box" and r["name"].startswith(ITERATIVE))
    for code, weak, strong, what, whom in (
        ("transfer_beats_white_box", lambda r: r["source"] == "transfer", white,
         "transfer attacks crafted on the surrogate", "white-box attacks"),
        ("single_step_beats_iterative", lambda r: r["source"] == "white-box" and r["name"].startswith(SINGLE_STEP),
         iterative, "single-step attacks", "iterative white-box attacks (PGD, BIM, APGD)"),
    ):
        beaten: dict[tuple[str, float], set[int]] = {}
        for r in records:
            if r["kind"] != "budget" or not r["success"] or not weak(r):
                continue
            key = (r["sample"], r["norm"], round(r["eps"], 10))
            if strong.get(key) is False:
                beaten.setdefault((r["norm"], r["eps"]), set()).add(r["sample"])
        samples = set().union(*beaten.values()) if beaten else set()
        share = len(samples) / correct if correct else 0.0
        if samples and share > tolerance:
            where = ", ".join(f"{n} eps={e:g}: {len(s)}" for (n, e), s in sorted(beaten.items()))
            out.append(MaskingWarning(
                code,
                f"{what} broke {len(samples)} sample(s) ({share:.1%} of the correct ones) that {whom} had "
                f"tried and failed on at the same budget ({where}): the white-box gradients are unreliable "
                f"(masking) or the white-box attacks are too weak",
                {"samples": sorted(samples), "share": share, "by_eps": {f"{n}:{e:g}": sorted(s) for (n, e), s in beaten.items()}}))
    return out


def _probe_share(samples: set[int], n: int) -> float:
    return len(samples) / n if n else 0.0


def check_attack_probe(probes: Mapping[str, Any], tolerance: float,
                       convergence_tolerance: float = CONVERGENCE_TOLERANCE) -> list[MaskingWarning]:
    """The attack probe's independent runs (``advshield.attacks.audit.probes.attack_probe``):
    FGSM and the transfer attack against every run of the iterative attack (base, twice the
    steps, more restarts: a sample counts as beaten only when all of them left it robust), the
    doubled steps' success rate against the base run's (a rise beyond ``convergence_tolerance``;
    a fall is the noise of one run, which the restarts measure), the restarts' breaks the base run
    missed. With 32 probe samples and a tolerance of 0.02 one sample is enough: each is a concrete,
    reproducible example the audit's attack missed (its id is in the details)."""
    p = probes.get("attacks")
    if not p or not p.get("samples") or "iterative" not in p.get("runs", {}):
        return []
    runs, n = p["runs"], len(p["samples"])
    at = f"{p['norm']} eps={p['eps']:g} ({p['eps_from']}) on {n} correct samples"
    base = runs["iterative"]
    broken = set(base["broken"])
    strong = broken.union(*(runs[k]["broken"] for k in ("steps_2x", "restarts") if k in runs))
    tried = " and ".join(f"{runs[k]['attack']}{label}" for k, label in
                         (("iterative", ""), ("steps_2x", " with 2x steps"), ("restarts", " with restarts")) if k in runs)
    out = []
    for code, key, what in (("single_step_beats_iterative", "single_step", "the single-step attack"),
                            ("transfer_beats_white_box", "transfer", "the transfer attack crafted on the surrogate")):
        if key not in runs:
            continue
        beaten = set(runs[key]["broken"]) - strong
        share = _probe_share(beaten, n)
        if beaten and share > tolerance:
            out.append(MaskingWarning(
                code,
                f"{what} ({runs[key]['attack']}) broke {len(beaten)} of {n} probe samples ({share:.1%}) that "
                f"{tried} left robust, all run independently on the same samples at {at}: the white-box "
                f"gradients are unreliable (masked or shattered) or the iterative attack is misconfigured",
                {"probe": key, "attack": runs[key]["attack"], "samples": sorted(beaten), "share": share,
                 "eps": p["eps"], "norm": p["norm"], "success_rate": runs[key]["success_rate"],
                 "iterative_success_rate": base["success_rate"]}))
    if "steps_2x" in runs:
        moved = runs["steps_2x"]["success_rate"] - base["success_rate"]
        if moved > convergence_tolerance:
            out.append(MaskingWarning(
                "not_converged",
                f"{base['attack']} with twice its steps ({runs['steps_2x']['hyper'].get('steps')}) broke "
                f"{runs['steps_2x']['success_rate']:.1%} of the probe samples against {base['success_rate']:.1%} "
                f"with its own at {at}: {moved:+.1%} > {convergence_tolerance:g}; the attack has not converged, "
                f"give it more steps",
                {"attack": base["attack"], "success_rate": base["success_rate"],
                 "samples": sorted(set(runs["steps_2x"]["broken"]) - broken),
                 "success_rate_2x_steps": runs["steps_2x"]["success_rate"], "change": moved,
                 "steps": runs["steps_2x"]["hyper"].get("steps"), "eps": p["eps"], "norm": p["norm"]}))
    if "restarts" in runs:
        extra = set(runs["restarts"]["broken"]) - broken
        share = _probe_share(extra, n)
        if extra and share > tolerance:
            restarts = runs["restarts"]["hyper"].get("restarts")
            out.append(MaskingWarning(
                "restarts_break_more",
                f"{base['attack']} with {restarts} random restarts broke {len(extra)} of {n} probe samples "
                f"({share:.1%}) that one run left robust at {at}: single runs depend on their random start "
                f"(a noisy or shattered loss surface); audit with more restarts",
                {"attack": base["attack"], "restarts": restarts, "samples": sorted(extra), "share": share,
                 "success_rate": base["success_rate"], "success_rate_restarts": runs["restarts"]["success_rate"],
                 "eps": p["eps"], "norm": p["norm"]}))
    return out


def check_bpda(probes: Mapping[str, Any], tolerance: float = BPDA_TOLERANCE) -> list[MaskingWarning]:
    """Defenses whose BPDA approximation is far from the defense on the probe samples."""
    rows = (probes.get("bpda") or {}).get("defenses") or []
    far = [r for r in rows if r["mean_relative"] > tolerance]
    if not far:
        return []
    where = ", ".join(f"{r['defense']}@{r['layer']}: {r['mean_relative']:.3g} (max {r['max_relative']:.3g})" for r in far)
    return [MaskingWarning(
        "bpda_approximation_error",
        f"the BPDA approximation is far from the defense: mean ||defense(x) - approximation(x)||_2 / ||x||_2 "
        f"above {tolerance:g} ({where}); BPDA differentiates the approximation, so the attacks follow the "
        f"gradient of a different function; use an approximation g with g(x) ~ defense(x)",
        {"defenses": far, "tolerance": tolerance})]


def check_unbounded(records: list[Mapping[str, Any]], tolerance: float) -> list[MaskingWarning]:
    """The sanity attack (huge budget) and the white-box minimal attacks (no budget) should break
    every correctly classified sample they attack."""
    out = []
    groups: dict[str, list[bool]] = {}
    for r in records:
        if r["source"] == "sanity" or (r["kind"] == "minimal" and r["source"] == "white-box"):
            groups.setdefault(r["attack"], []).append(bool(r["success"]))
    for attack, s in groups.items():
        rate = float(np.mean(s))
        if rate < 1 - tolerance:
            out.append(MaskingWarning(
                "unbounded_not_100",
                f"{attack} broke {rate:.1%} of the {len(s)} samples it attacked; with no (or a huge) budget every "
                f"sample should fall: the attack is stuck (masked or vanishing gradients, too few steps, "
                f"randomness without EOT, or a detector it cannot evade)",
                {"attack": attack, "success_rate": rate, "attacked": len(s)}))
    return out


def check_black_box(records: list[Mapping[str, Any]], correct: int, tolerance: float) -> list[MaskingWarning]:
    """Samples a black-box attack broke within eps (a budget attack at its eps; a minimal one at
    every eps of the grid of its norm at or above its distortion) where no white-box attack's
    success lies within that eps. No warning when no white-box attack ran (a served model audited
    without a twin: there are no gradients to be masked)."""
    if not any(r["source"] == "white-box" for r in records):
        return []
    white: dict[tuple[int, str], float] = {}  # (sample, norm) -> least white-box distortion
    grids: dict[str, set[float]] = {}
    for r in records:
        if r["kind"] == "budget" and r["eps"] is not None:
            grids.setdefault(r["norm"], set()).add(float(r["eps"]))
        if r["attack"] != "clean" and r["source"] == "white-box" and r["success"]:
            for norm in ("l2", "linf"):
                key = (r["sample"], norm)
                white[key] = min(white.get(key, float("inf")), float(r[norm]))
    beaten: dict[tuple[str, float], set[int]] = {}
    for r in records:
        if r["source"] != "black-box" or not r["success"]:
            continue
        norm = r["norm"]
        at = [float(r["eps"])] if r["kind"] == "budget" else sorted(e for e in grids.get(norm, ()) if e >= r[norm] - 1e-6)
        for eps in at:
            if white.get((r["sample"], norm), float("inf")) > eps + 1e-6:
                beaten.setdefault((norm, eps), set()).add(r["sample"])
    samples = set().union(*beaten.values()) if beaten else set()
    share = len(samples) / correct if correct else 0.0
    if not samples or share <= tolerance:
        return []
    where = ", ".join(f"{n} eps={e:g}: {len(s)}" for (n, e), s in sorted(beaten.items()))
    return [MaskingWarning(
        "black_box_beats_white_box",
        f"black-box attacks, which see only the serving path's answers, broke {len(samples)} sample(s) "
        f"({share:.1%} of the correct ones) within budgets at which the white-box attacks had left them robust "
        f"({where}): the white-box gradients do not follow the deployed pipeline (gradient masking, a BPDA "
        f"approximation far from its defense, randomness without enough EOT) or the white-box attacks are too weak",
        {"samples": sorted(samples), "share": share, "by_eps": {f"{n}:{e:g}": sorted(s) for (n, e), s in beaten.items()}})]


def check_non_adaptive(probes: Mapping[str, Any]) -> list[MaskingWarning]:
    mode = probes.get("mode", {})
    if mode.get("adaptive") == "off" and (mode.get("defenses") or mode.get("detector")):
        return [MaskingWarning(
            "non_adaptive",
            "non-adaptive audit: the attacks were crafted on the bare classifier and ignore the defenses "
            "and the detector; only an adaptive audit (BPDA, EOT, detector-aware) bounds the pipeline's robustness",
            {"defenses": mode.get("defenses"), "detector": mode.get("detector")})]
    return []


def check_certificates(violations: list[Mapping[str, Any]]) -> list[MaskingWarning]:
    if not violations:
        return []
    return [MaskingWarning(
        "certificate_violated",
        f"{len(violations)} adversarial example(s) change the smoothed classifier's prediction inside the "
        f"radius certified for their sample: a certification bug, or one of its alpha failures",
        {"violations": list(violations)})]


def _merge(cascade: list[MaskingWarning], probe: list[MaskingWarning]) -> list[MaskingWarning]:
    """One warning per code: where the cascade's records and the attack probe both warn, the probe's
    warning carries the records' evidence under ``details["cascade"]``."""
    by_code = {w.code: w for w in cascade}
    out = []
    for w in probe:
        c = by_code.pop(w.code, None)
        out.append(w if c is None else MaskingWarning(w.code, w.message + "; the cascade's records agree: " + c.message,
                                                      {**w.details, "cascade": dict(c.details)}))
    return [*by_code.values(), *out]


def masking_warnings(records: list[Mapping[str, Any]], probes: Mapping[str, Any], tolerance: float,
                     violations: list[Mapping[str, Any]] | None = None, *,
                     convergence_tolerance: float = CONVERGENCE_TOLERANCE,
                     bpda_tolerance: float = BPDA_TOLERANCE) -> list[MaskingWarning]:
    correct = sum(1 for r in records if r["attack"] == "clean" and r["correct"])
    return [
        *check_non_adaptive(probes),
        *check_randomness(probes),
        *check_gradients(probes, tolerance),
        *check_bpda(probes, bpda_tolerance),
        *_merge(check_weaker_attacks(records, correct, tolerance),
                check_attack_probe(probes, tolerance, convergence_tolerance)),
        *check_unbounded(records, tolerance),
        *check_black_box(records, correct, tolerance),
        *check_certificates(violations or []),
    ]
