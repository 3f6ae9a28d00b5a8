"""The release gate: the pipeline file's ``[gate]`` thresholds against the audit's metrics.

A threshold left at its default is not checked. A threshold that is set but cannot be measured
(no minimal attack for the median distortion, no certification for the certified budget, no eps of
the grid up to ``gate_eps``) fails, naming what is missing: a gate never passes on missing data.

* ``min_clean_accuracy``: clean accuracy of the serving path on the audited samples;
* ``min_robust_accuracy``: robust accuracy (every attack) at every eps of the ``gate_norm`` grid
  up to ``gate_eps`` (the audit adds ``gate_eps`` to its grid);
* ``max_success_rate``: success rate of the attacks among the correct samples within the gate's
  budget: at ``gate_eps`` in ``gate_norm`` when set, else within L2 distortion ``d_upp`` (P_upp);
* ``min_median_distortion``: median over the correct samples of the least L2 distortion the
  white-box minimal attacks found (inf where none succeeded): the empirical upper bound;
* ``min_certified_budget``: largest certified radius (best sigma) whose certified accuracy meets
  ``certified_accuracy_target``: the lower bound;
* ``max_warnings``: number of masking warnings (-1: not checked).

Each check is reported under its threshold's key as a stable ``id``, with its ``threshold`` (None
when not set), the measured ``value``, ``passed`` (None when not checked) and its parameters
(``norm``, ``eps``, ``d_upp``, ``target``) as fields of their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from advshield.attacks.threat import DIST_TOL

CHECK_IDS = ("min_clean_accuracy", "min_robust_accuracy", "max_success_rate", "min_median_distortion",
             "min_certified_budget", "max_warnings")
# the checks that measure robustness: a gate none of which is set cannot vouch for a defense
ROBUSTNESS_CHECK_IDS = ("min_robust_accuracy", "max_success_rate", "min_median_distortion", "min_certified_budget")
CLEAN_ONLY = "PASS on clean accuracy only: no robustness threshold set"


@dataclass(frozen=True)
class GateCheck:
    """One threshold of the gate. ``id`` is its ``[gate]`` key (stable, one of ``CHECK_IDS``); its
    parameters are fields of their own, None where the check has none: ``norm`` and ``eps`` (the
    threat model of a robust-accuracy or success-rate check), ``d_upp`` (the L2 distortion bound of
    a success rate without ``gate_eps``), ``target`` (the certified-accuracy target)."""

    id: str
    threshold: float | None  # None: not set
    value: Any  # the measured number; None when it could not be measured
    passed: bool | None  # None: threshold not set, not checked
    detail: str = ""  # why it failed
    norm: str | None = None
    eps: float | None = None
    d_upp: float | None = None
    target: float | None = None

    @property
    def label(self) -> str:
        """The check for a reader: its id and its parameters, e.g. ``max_success_rate (linf eps = 0.1)``."""
        if self.eps is not None:
            relation = "<=" if self.id == "min_robust_accuracy" else "="  # worst over the grid up to eps
            return f"{self.id} ({self.norm} eps {relation} {self.eps:g})"
        if self.id == "max_success_rate":
            return f"{self.id} (L2 distortion <= d_upp" + ("" if self.d_upp is None else f" = {self.d_upp}") + ")"
        if self.target is not None:
            return f"{self.id} (target {self.target:g})"
        return self.id


@dataclass(frozen=True)
class GateResult:
    passed: bool
    checks: tuple[GateCheck, ...]

    @property
    def reasons(self) -> list[str]:
        return [c.detail or f"{c.label}: {c.value} vs {c.threshold}" for c in self.checks if c.passed is False]

    @property
    def robustness_checked(self) -> bool:
        """Whether any robustness threshold was set (and so checked)."""
        return any(c.passed is not None for c in self.checks if c.id in ROBUSTNESS_CHECK_IDS)

    @property
    def verdict(self) -> str:
        """"PASS", "FAIL: <reasons>", or the clean-only pass that says what was not checked."""
        if not self.passed:
            return "FAIL: " + "; ".join(self.reasons)
        return "PASS" if self.robustness_checked else CLEAN_ONLY

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "verdict": self.verdict, "robustness_checked": self.robustness_checked,
                "reasons": self.reasons,
                "checks": [{**asdict(c), "label": c.label} for c in self.checks]}


def _r(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) and math.isfinite(v) else v


def evaluate_gate(gate: Any, metrics: Mapping[str, Any], *, gate_norm: str = "linf", warnings: int = 0,
                  budget: Mapping[str, Any] | None = None) -> GateResult:
    """Check every set threshold of ``gate`` (a ``GateSpec``) against ``metrics``
    (``advshield.attacks.report.compute_metrics``) and the distortion ``budget`` section."""
    checks: list[GateCheck] = []

    def add(check_id: str, threshold: float | None, value: Any, ok: bool | None, detail: str = "", **params: Any) -> None:
        checks.append(GateCheck(check_id, threshold, _r(value), ok, detail if ok is False else "", **params))

    # clean accuracy
    v = metrics["clean_accuracy"]
    if gate.min_clean_accuracy > 0:
        add("min_clean_accuracy", gate.min_clean_accuracy, v, v >= gate.min_clean_accuracy,
            f"clean accuracy {v:.4f} < {gate.min_clean_accuracy}")
    else:
        add("min_clean_accuracy", None, v, None)

    # robust accuracy at every eps up to gate_eps
    t = metrics["robust_accuracy"][gate_norm]
    upto = [(e, a) for e, a in zip(t["eps"], t["all attacks"]) if e <= gate.gate_eps + DIST_TOL]
    at_eps = {"norm": gate_norm, "eps": gate.gate_eps}
    if gate.min_robust_accuracy > 0:
        if not upto:
            add("min_robust_accuracy", gate.min_robust_accuracy, None, False,
                f"min_robust_accuracy is set but no {gate_norm} eps of the grid is <= gate_eps = {gate.gate_eps}",
                **at_eps)
        else:
            e, worst = min(upto, key=lambda ea: ea[1])
            add("min_robust_accuracy", gate.min_robust_accuracy, worst, worst >= gate.min_robust_accuracy,
                f"robust accuracy {worst:.4f} at {gate_norm} eps = {e:g} < {gate.min_robust_accuracy}", **at_eps)
    elif upto:
        add("min_robust_accuracy", None, min(a for _, a in upto), None, **at_eps)

    # success rate within the gate budget
    within: dict[str, Any]
    if gate.gate_eps > 0:
        at = [s for e, s in zip(t["eps"], t["success_rate"]) if abs(e - gate.gate_eps) <= DIST_TOL]
        where = f"{gate_norm} eps = {gate.gate_eps:g}"
        rate = at[0] if at else None
        within = at_eps
    else:
        best = metrics.get("best_minimal")
        rate = best.get("p_upp") if best else None
        where = f"L2 distortion <= d_upp = {best.get('d_upp') if best else '?'}"
        within = {"norm": "l2", "d_upp": best.get("d_upp") if best else None}
    if gate.max_success_rate < 1:
        if rate is None or (isinstance(rate, float) and math.isnan(rate)):
            add("max_success_rate", gate.max_success_rate, None, False,
                f"max_success_rate is set but no success rate was measured at {where}", **within)
        else:
            add("max_success_rate", gate.max_success_rate, rate, rate <= gate.max_success_rate,
                f"attack success rate {rate:.4f} at {where} > {gate.max_success_rate}", **within)
    else:
        add("max_success_rate", None, rate, None, **within)

    # empirical upper bound: median minimal distortion
    best = metrics.get("best_minimal")
    med = best["median_distortion"] if best else None
    if gate.min_median_distortion > 0:
        if med is None or (isinstance(med, float) and math.isnan(med)):
            add("min_median_distortion", gate.min_median_distortion, None, False,
                "min_median_distortion is set but the audit ran no white-box minimal attack (ddn, bp, cw_l2)")
        else:
            add("min_median_distortion", gate.min_median_distortion, med, med >= gate.min_median_distortion,
                f"median minimal L2 distortion {med:.4f} < {gate.min_median_distortion}")
    else:
        add("min_median_distortion", None, med, None)

    # certified lower bound
    cb = budget.get("best_certified_budget") if budget else None
    target = {"target": gate.certified_accuracy_target}
    if gate.min_certified_budget > 0:
        if cb is None:
            add("min_certified_budget", gate.min_certified_budget, None, False,
                "min_certified_budget is set but there are no certification results (run with --certify or --certify-dir)",
                **target)
        else:
            add("min_certified_budget", gate.min_certified_budget, cb, cb >= gate.min_certified_budget,
                f"certified budget {cb:g} at certified accuracy {gate.certified_accuracy_target} < {gate.min_certified_budget}",
                **target)
    else:
        add("min_certified_budget", None, cb, None, **target)

    # warnings
    if gate.max_warnings >= 0:
        add("max_warnings", gate.max_warnings, warnings, warnings <= gate.max_warnings,
            f"{warnings} masking warning(s) > {gate.max_warnings}")
    else:
        add("max_warnings", None, warnings, None)
    return GateResult(all(c.passed is not False for c in checks), tuple(checks))
