"""The audit's metrics over its records, and the report: ``report.json`` and ``report.md`` with
PNG plots (matplotlib, Agg).

Records first, aggregates second: ``compute_metrics`` turns the JSONL records into the chapter-3
statistics (``advshield.attacks.metrics``); the Markdown renders that dict and recomputes nothing.

* clean accuracy over the N' audited samples; everything else over the N correct ones;
* robust accuracy at eps (per norm): correct and no successful record whose distortion in that
  norm is <= eps, over every attack (a valid example within eps counts whichever attack found it);
* per minimal attack (it ran on every correct sample): P_suc, conditional mean L2 distortion over
  the successes, median and quantiles of the per-sample distortion (+inf where it failed), the
  operating characteristic P(D) and P_upp = P(D_upp); the same for the per-sample best of the
  white-box minimal attacks, the empirical *upper bound* on each sample's minimal distortion;
* per budget attack: what it broke at each eps among the samples still robust when it ran
  (the cascade), and checked examples it returned outside its budget (counted as failures);
* detector: its threshold (calibrated at its target false-positive rate), the false-positive rate
  measured on the audited clean images, the true-positive rate on the adversarial examples that
  fool the classifier;
* cost: gradient evaluations (EOT draws included) and seconds per attacked image;
* the distortion budget (from a certification run): certified accuracy against radius, the
  certified budget at the target, next to the empirical upper bound.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from advshield.attacks import metrics as M
from advshield.attacks.audit import DIST_TOL
from advshield.errors import InputError

NORMS = ("linf", "l2")
NORM_LABEL = {"linf": "L-inf", "l2": "L2"}


def _quantiles(per_sample: np.ndarray, qs: Sequence[float]) -> dict[str, float | None]:
    """Empirical quantiles (no interpolation, so +inf stays +inf) of the per-sample distortion."""
    if per_sample.size == 0:
        return {f"{q:g}": None for q in qs}
    return {f"{q:g}": float(np.quantile(per_sample, q, method="inverted_cdf")) for q in qs}


def _minimal_stats(correct: np.ndarray, success: np.ndarray, dist: np.ndarray, dist_inf: np.ndarray,
                   spec: Any) -> dict[str, Any]:
    s = M.summary(correct, success, dist, d_upp=spec.d_upp, eps_grid=spec.eps_l2)
    per = np.where(success, dist, np.inf)[correct]
    s["quantiles"] = _quantiles(per, spec.quantiles)
    d, p = M.operating_characteristic(dist, success, correct)
    s["operating_characteristic"] = {"distortion": d.tolist(), "p": p.tolist()}
    s["robust_accuracy_linf"] = M.robust_accuracy(correct, success, dist_inf, spec.eps_linf).tolist()
    return s


def compute_metrics(records: Sequence[Mapping[str, Any]], spec: Any, mode: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every statistic of the report from the records (see the module docstring)."""
    mode = mode or {}
    clean = sorted((r for r in records if r["attack"] == "clean"), key=lambda r: r["sample"])
    if not clean:
        raise InputError("audit metrics: no clean records (the audit did not score any sample)")
    index = {r["sample"]: i for i, r in enumerate(clean)}
    n = len(clean)
    correct = np.array([bool(r["correct"]) for r in clean])
    n_correct = int(correct.sum())
    order: list[str] = []
    for r in records:
        if r["attack"] != "clean" and r["attack"] not in order:
            order.append(r["attack"])
    out: dict[str, Any] = {
        "samples": n,
        "first_sample": clean[0]["sample"],
        "correct": n_correct,
        "clean_accuracy": M.clean_accuracy(correct),
        "attacks": {},
    }

    # per-sample least successful distortion per norm, over every record / white-box ones / budget ones
    def least(pick) -> dict[str, np.ndarray]:
        best = {norm: np.full(n, np.inf) for norm in NORMS}
        for r in records:
            if r["attack"] != "clean" and r["success"] and pick(r):
                i = index[r["sample"]]
                for norm in NORMS:
                    best[norm][i] = min(best[norm][i], r[norm])
        return best

    unions = {
        "all attacks": least(lambda r: True),
        "white-box": least(lambda r: r["source"] != "transfer"),
    }
    out["robust_accuracy"] = {}
    for norm in NORMS:
        grid = np.asarray(spec.grid(norm), dtype=np.float64)
        table = {"eps": grid.tolist()}
        for label, best in unions.items():
            broken = best[norm][None, :] <= grid[:, None] + DIST_TOL
            table[label] = (correct[None, :] & ~broken).mean(1).tolist()
        all_broken = unions["all attacks"][norm][None, :] <= grid[:, None] + DIST_TOL
        table["success_rate"] = ((correct[None, :] & all_broken).sum(1) / n_correct).tolist() if n_correct else [math.nan] * len(grid)
        out["robust_accuracy"][norm] = table

    minimal_white: list[str] = []
    for a in order:
        rows = [r for r in records if r["attack"] == a]
        first = rows[0]
        info: dict[str, Any] = {"name": first["name"], "kind": first["kind"], "norm": first["norm"],
                                "source": first["source"], "attacked": len(rows)}
        grads = float(sum(r["gradients"] for r in rows))
        secs = float(sum(r["seconds"] for r in rows))
        info["cost"] = M.cost(grads, secs, len(rows)) if rows else None
        if info["cost"] is not None:
            info["cost"]["seconds"] = secs
            info["cost"]["gradients"] = grads
        invalid: dict[str, int] = {}
        for r in rows:
            if not r["valid"]:
                invalid[r["reason"]] = invalid.get(r["reason"], 0) + 1
        info["invalid"] = invalid
        if first["kind"] == "minimal":
            success = np.zeros(n, dtype=bool)
            dist = np.full(n, np.inf)
            dist_inf = np.full(n, np.inf)
            for r in rows:
                i = index[r["sample"]]
                success[i] = r["success"]
                dist[i], dist_inf[i] = r["l2"], r["linf"]
            info.update(_minimal_stats(correct, success, dist, dist_inf, spec))
            if first["source"] == "white-box":
                minimal_white.append(a)
        else:
            per_eps: dict[str, Any] = {}
            for r in rows:
                e = per_eps.setdefault(f"{r['eps']:g}", {"eps": r["eps"], "attacked": 0, "broken": 0, "flagged": 0, "invalid": 0})
                e["attacked"] += 1
                e["broken"] += int(r["success"])
                e["flagged"] += int(bool(r["flagged"]))
                e["invalid"] += int(not r["valid"])
            info["per_eps"] = sorted(per_eps.values(), key=lambda e: e["eps"])
            info["broken"] = len({r["sample"] for r in rows if r["success"]})
            info["p_suc_attacked"] = float(np.mean([r["success"] for r in rows])) if rows else math.nan
        out["attacks"][a] = info

    # the empirical upper bound: per-sample best of the white-box minimal attacks
    if minimal_white:
        success = np.zeros(n, dtype=bool)
        dist = np.full(n, np.inf)
        dist_inf = np.full(n, np.inf)
        for r in records:
            if r["attack"] in minimal_white and r["success"]:
                i = index[r["sample"]]
                success[i] = True
                dist[i] = min(dist[i], r["l2"])
                dist_inf[i] = min(dist_inf[i], r["linf"])
        best_minimal = _minimal_stats(correct, success, dist, dist_inf, spec)
        best_minimal["attacks"] = minimal_white
        out["best_minimal"] = best_minimal
    all_l2 = unions["all attacks"]["l2"][correct]
    out["least_l2_any_attack"] = {"median": float(np.median(all_l2)) if all_l2.size else None,
                                  "quantiles": _quantiles(all_l2, spec.quantiles)}

    # detector
    if any(r.get("score") is not None for r in clean):
        flagged_clean = np.array([bool(r["flagged"]) for r in clean])
        adv = [r for r in records if r["attack"] != "clean" and r["valid"] and r["adv_pred"] != r["label"]]
        det: dict[str, Any] = {
            "threshold": mode.get("detector_threshold"),
            "fpr_target": mode.get("detector_fpr_target"),
            "fpr_clean": float(flagged_clean.mean()),
            "adversarial": len(adv),
            "tpr": float(np.mean([bool(r["flagged"]) for r in adv])) if adv else None,
            "per_attack": {},
        }
        for a in order:
            rows = [r for r in adv if r["attack"] == a]
            det["per_attack"][a] = {"adversarial": len(rows),
                                    "tpr": float(np.mean([bool(r["flagged"]) for r in rows])) if rows else None}
        out["detector"] = det

    total_g = sum(r["gradients"] for r in records if r["attack"] != "clean")
    total_s = sum(r["seconds"] for r in records)
    out["cost"] = {"gradients": float(total_g), "attack_seconds": float(total_s),
                   "records": sum(1 for r in records if r["attack"] != "clean")}
    return out


# --- the distortion budget (certification) ---------------------------------------------------------

def distortion_budget(certify: Mapping[str, Any], metrics: Mapping[str, Any], target: float) -> dict[str, Any]:
    """Certified accuracy vs radius and the certified budget (lower bound) per sigma, next to the
    empirical robust accuracy at the same radii and the per-sample minimal distortion found by the
    attacks (upper bound)."""
    from advshield.attacks.certify import budget

    budgets = budget(certify, target)
    models = list(certify.get("spec", {}).get("models") or [])
    out: dict[str, Any] = {"target": target, "sigmas": {}, "certified_budget": budgets,
                           "best_certified_budget": max(budgets.values()) if budgets else 0.0,
                           # noise-trained base models: the certificate is about another classifier
                           "certified_models": models, "same_classifier": not models}
    for sigma, v in certify["sigmas"].items():
        out["sigmas"][sigma] = {k: v[k] for k in ("samples", "radii", "certified_accuracy", "abstain_rate",
                                                  "clean_smoothed_accuracy", "median_radius_correct") if k in v}
    best = metrics.get("best_minimal")
    if best is not None:
        radii = sorted({r for v in certify["sigmas"].values() for r in v["radii"]})
        d, p = best["operating_characteristic"]["distortion"], best["operating_characteristic"]["p"]
        acc = metrics["clean_accuracy"]
        correct = metrics["correct"]
        # robust accuracy implied by the minimal attacks at each radius: clean - P(D <= r) * N / N'
        emp = [acc - (p[int(np.searchsorted(d, r + DIST_TOL, side="right")) - 1] if len(d) else 0.0) * correct
               / metrics["samples"] for r in radii]
        out["empirical"] = {"radii": radii, "robust_accuracy": emp, "attacks": best["attacks"],
                            "median_minimal_distortion": best["median_distortion"],
                            "quantiles": best["quantiles"],
                            "budget": empirical_budget(d, p, correct, metrics["samples"], target),
                            "curve": {"radius": list(d),
                                      "robust_accuracy": [acc - q * correct / metrics["samples"] for q in p]}}
    return out


def empirical_budget(distortion: Sequence[float], p: Sequence[float], correct: int, samples: int, target: float) -> float:
    """The radius D* at which the attacks push robust accuracy below ``target``: robust accuracy
    (N - #{broken with distortion <= r}) / N' stays >= target exactly for r < D*, so D* is the
    (k+1)-th least per-sample minimal distortion, k = floor(N - target N') the samples one may
    lose (0 when the clean accuracy is already below the target; inf when the attacks never get
    there). An upper bound on the true budget at that target, from the operating characteristic
    (``distortion``, ``p``: P(D) at 0 and at every distinct successful distortion)."""
    k = math.floor(correct - target * samples + 1e-9)
    if k < 0:
        return 0.0
    for d, share in zip(distortion, p):
        if round(share * correct) > k:
            return float(d)
    return math.inf


# --- plots -----------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_operating_characteristic(metrics: Mapping[str, Any], path: Path, d_upp: float) -> Path | None:
    curves = [(a, v) for a, v in metrics["attacks"].items() if v["kind"] == "minimal"]
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for a, v in curves:
        oc = v["operating_characteristic"]
        ax.step(oc["distortion"], oc["p"], where="post", label=a)
    if "best_minimal" in metrics:
        oc = metrics["best_minimal"]["operating_characteristic"]
        ax.step(oc["distortion"], oc["p"], where="post", color="black", lw=2, label="best of minimal")
    ax.axvline(d_upp, color="grey", ls="--", lw=1, label=f"D_upp = {d_upp:g}")
    ax.set_xlabel("L2 distortion D (pixels in [0, 1])")
    ax.set_ylabel("P(D): share of correct samples broken")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Operating characteristic")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_robust_accuracy(metrics: Mapping[str, Any], norm: str, path: Path) -> Path:
    plt = _plt()
    t = metrics["robust_accuracy"][norm]
    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [0.0, *t["eps"]]
    for label, style in (("all attacks", dict(color="black", lw=2)), ("white-box", dict(ls="--"))):
        ax.plot(eps, [metrics["clean_accuracy"], *t[label]], marker="o", ms=3, label=label, **style)
    for a, v in metrics["attacks"].items():
        if v["kind"] == "minimal":
            alone = v["robust_accuracy"] if norm == "l2" else v["robust_accuracy_linf"]
            ax.plot(eps, [metrics["clean_accuracy"], *alone], ls=":", marker=".", label=f"{a} alone")
    ax.set_xlabel(f"{NORM_LABEL[norm]} eps (pixels in [0, 1])")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Robust accuracy against {NORM_LABEL[norm]} eps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_budget(budget: Mapping[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    same = budget.get("same_classifier", True)  # else: certificates of a smoothed noise-trained model
    for sigma, v in budget["sigmas"].items():
        ax.step(v["radii"], v["certified_accuracy"], where="post",
                label=f"certified, sigma = {sigma} " + ("(lower bound)" if same else "(smoothed noise-trained model)"))
    emp = budget.get("empirical")
    if emp:
        c = emp["curve"]
        r, a = list(c["radius"]), list(c["robust_accuracy"])
        if r and emp["radii"] and emp["radii"][-1] > r[-1]:  # flat beyond the largest distortion found
            r, a = [*r, emp["radii"][-1]], [*a, a[-1]]
        ax.step(r, a, where="post", color="black",
                label="attacks: best of minimal " + ("(upper bound)" if same else "(deployed pipeline)"))
    ax.axhline(budget["target"], color="grey", ls="--", lw=1, label=f"target {budget['target']:g}")
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Distortion budget: certified vs empirical")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- report.json and report.md ---------------------------------------------------------------------

def jsonable(obj: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, +-inf the strings "inf" / "-inf" (a distortion
    of inf means "not broken"); numpy scalars become Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, Path):
        return str(obj)
    return obj


def build_report(*, pipeline: Mapping[str, Any], spec: Any, probes: Mapping[str, Any], metrics: Mapping[str, Any],
                 warnings: Sequence[Mapping[str, Any]], gate: Mapping[str, Any], budget: Mapping[str, Any] | None,
                 command: str = "", seconds: float | None = None) -> dict[str, Any]:
    import torch

    from advshield import __version__
    from advshield.configs import to_mapping

    gp = probes.get("gradients") or {}
    return jsonable({
        "format": "advshield.audit-report/1",
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "advshield": __version__,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "command": command,
        "wall_seconds": seconds,
        "pipeline": dict(pipeline),
        "audit": {k: v for k, v in to_mapping(spec).items() if k != "attacks"} | {"attacks": [e.describe() for e in spec.entries]},
        "mode": probes.get("mode", {}),
        "probes": {
            "randomness": probes.get("randomness"),
            "gradients": {k: (float(np.median(v)) if isinstance(v, list) and v else v) for k, v in gp.items()} if gp else None,
        },
        "metrics": metrics,
        "distortion_budget": budget,
        "warnings": list(warnings),
        "gate": gate,
    })


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    m, p, mode = report["metrics"], report["pipeline"], report["mode"]
    audit = report["audit"]
    lines: list[str] = []
    add = lines.append
    gate = report["gate"]
    add(f"# Audit report: `{p.get('name')}`\n")
    add(f"**Gate: {'PASS' if gate['passed'] else 'FAIL'}** · clean accuracy {_pct(m['clean_accuracy'])} on "
        f"{m['samples']} test images (from #{m['first_sample']}) · {len(report['warnings'])} warning(s) · "
        f"created {report['created']}" + (f" · {report['wall_seconds']:.0f} s this run" if report.get("wall_seconds") else "") + "\n")
    if report.get("command"):
        add(f"Command: `{report['command']}`\n")
    add("## Pipeline and files\n")
    add(f"{p.get('description', '')}\n")
    add("| file | sha256 |\n|---|---|")
    for name, digest in p.get("sha256", {}).items():
        add(f"| {name} (`{p.get('paths', {}).get(name, '')}`) | `{digest}` |")
    add("")
    add("## How the attacks saw the pipeline\n")
    add(f"- adaptive: **{mode.get('adaptive')}**; defenses: {', '.join(mode.get('defenses') or []) or 'none'}")
    add(f"- BPDA (backward through the approximation) for: {', '.join(mode.get('bpda') or []) or 'none'}")
    rnd = report["probes"].get("randomness") or {}
    add(f"- randomness: declared {mode.get('random_declared')}, measured on the defenses {mode.get('random_measured')}, "
        f"serving path with two seeds differs by {_f(rnd.get('max_prob_diff'), 4)}; EOT draws per gradient: "
        f"**{mode.get('eot_samples')}**")
    add(f"- detector: {mode.get('detector') or 'none'}" + (f"; detector-aware attacks: **{mode.get('detector_aware')}**"
                                                           if mode.get('detector') else ""))
    add(f"- flagged adversarial examples count as failures: {audit.get('flagged_is_failure')}; images rounded to "
        f"{audit.get('levels')} grey levels before scoring; scored by {mode.get('scorer')}")
    add(f"- transfer attacks crafted on: {mode.get('surrogate') or 'none'}\n")

    add("## Robust accuracy\n")
    add("Share of all audited samples classified correctly and not broken within eps: by any attack "
        "(`all attacks`), by the white-box ones (`white-box`), or by one minimal attack alone (it ran on every "
        "correct sample; its L-inf row uses the L-inf distortion of its L2 examples). Budget attacks run as a "
        "cascade, each on the samples still robust at its eps. `success`: success rate of all attacks among "
        "the correctly classified samples.\n")
    for norm in NORMS:
        t = m["robust_accuracy"][norm]
        add(f"**{NORM_LABEL[norm]}**\n")
        add("| eps | " + " | ".join(f"{e:g}" for e in t["eps"]) + " |")
        add("|---|" + "---|" * len(t["eps"]))
        for label in ("all attacks", "white-box"):
            add(f"| {label} | " + " | ".join(_pct(v) for v in t[label]) + " |")
        for a, v in m["attacks"].items():
            if v["kind"] == "minimal":
                alone = v["robust_accuracy"] if norm == "l2" else v["robust_accuracy_linf"]
                add(f"| {a} alone | " + " | ".join(_pct(x) for x in alone) + " |")
        add("| success | " + " | ".join(_pct(v) for v in t["success_rate"]) + " |\n")
        if f"robust_{norm}" in plots:
            add(f"![robust accuracy {norm}]({plots[f'robust_{norm}']})\n")

    minimal = [(a, v) for a, v in m["attacks"].items() if v["kind"] == "minimal"]
    if minimal or "best_minimal" in m:
        qs = audit["quantiles"]
        add("## Minimal attacks (L2)\n")
        add(f"Over the {m['correct']} correctly classified samples: P_suc, the conditional mean distortion over "
            f"the successes, P_upp = P(D <= {audit['d_upp']:g}), and quantiles of the per-sample distortion "
            f"(inf where the attack failed).\n")
        add("| attack | source | P_suc | mean D | median D | " + " | ".join(f"q{q:g}" for q in qs) + " | P_upp | grads/img | s/img |")
        add("|---|---|---|---|---|" + "---|" * len(qs) + "---|---|---|")
        rows = list(minimal)
        if "best_minimal" in m:
            rows.append(("**best of " + ", ".join(m["best_minimal"]["attacks"]) + "**", {**m["best_minimal"], "source": "white-box", "cost": None}))
        for a, v in rows:
            c = v.get("cost") or {}
            add(f"| {a} | {v['source']} | {_pct(v['p_suc'])} | {_f(v['mean_distortion'])} | {_f(v['median_distortion'])} | "
                + " | ".join(_f(v["quantiles"].get(f"{q:g}")) for q in qs)
                + f" | {_pct(v.get('p_upp'))} | {_f(c.get('gradients_per_image'), 0)} | {_f(c.get('seconds_per_image'), 3)} |")
        add("")
        if "oc" in plots:
            add(f"![operating characteristic]({plots['oc']})\n")

    budget_attacks = [(a, v) for a, v in m["attacks"].items() if v["kind"] == "budget"]
    if budget_attacks:
        add("## Budget attacks\n")
        add("Samples broken at each eps among those the attack ran on (still robust when its turn came); "
            "invalid: returned outside the budget or not finite (counted as failures).\n")
        add("| attack | source | norm | eps: broken / attacked | invalid | grads/img | s/img |")
        add("|---|---|---|---|---|---|---|")
        for a, v in budget_attacks:
            cells = ", ".join(f"{e['eps']:g}: {e['broken']}/{e['attacked']}" for e in v["per_eps"])
            c = v.get("cost") or {}
            inv = ", ".join(f"{k}: {n}" for k, n in v["invalid"].items()) or "0"
            add(f"| {a} | {v['source']} | {v['norm']} | {cells} | {inv} | {_f(c.get('gradients_per_image'), 0)} | "
                f"{_f(c.get('seconds_per_image'), 3)} |")
        add("")

    det = m.get("detector")
    if det:
        add("## Detector\n")
        add(f"Threshold {_f(det['threshold'], 4)} calibrated at a target false-positive rate of {_pct(det['fpr_target'])}; "
            f"measured on the audited clean images: **FPR {_pct(det['fpr_clean'])}**; true-positive rate on the "
            f"{det['adversarial']} valid adversarial examples that fool the classifier: **TPR {_pct(det['tpr'])}**.\n")
        add("| attack | adversarial examples | flagged (TPR) |\n|---|---|---|")
        for a, v in det["per_attack"].items():
            add(f"| {a} | {v['adversarial']} | {_pct(v['tpr'])} |")
        add("")

    b = report.get("distortion_budget")
    add("## Distortion budget\n")
    if not b:
        add("No certification results (run the audit with `--certify`, give `--certify-dir`, or add a `[certify]` "
            "section to the pipeline file).\n")
        if "best_minimal" in m:
            bm = m["best_minimal"]
            add(f"Empirical upper bound (best of {', '.join(bm['attacks'])} per sample): median minimal L2 distortion "
                f"**{_f(bm['median_distortion'])}**; quantiles " + ", ".join(f"q{k} = {_f(v)}" for k, v in bm["quantiles"].items()) + ".\n")
    else:
        add(f"Lower bound: randomized smoothing over the whole pipeline certifies, per sample, an L2 radius; the "
            f"certified budget is the largest radius whose certified accuracy still meets the target "
            f"**{b['target']:g}**. Upper bound: the least L2 distortion of an adversarial example the white-box "
            f"minimal attacks found per sample. The true robustness lies between the two. (The certificate "
            f"holds for the smoothed pipeline; the attacks bound the deployed one.)\n")
        for sigma, v in b["sigmas"].items():
            add(f"**sigma = {sigma}** ({v.get('samples')} samples; abstain {_pct(v.get('abstain_rate'))}; certified "
                f"budget **{_f(b['certified_budget'].get(sigma))}**)\n")
            add("| radius | " + " | ".join(f"{r:g}" for r in v["radii"]) + " |")
            add("|---|" + "---|" * len(v["radii"]))
            add("| certified accuracy | " + " | ".join(_pct(a) for a in v["certified_accuracy"]) + " |\n")
        emp = b.get("empirical")
        if emp:
            add("| radius | " + " | ".join(f"{r:g}" for r in emp["radii"]) + " |")
            add("|---|" + "---|" * len(emp["radii"]))
            add("| robust accuracy (attacks, upper bound) | " + " | ".join(_pct(a) for a in emp["robust_accuracy"]) + " |\n")
            if b.get("same_classifier", True):
                interval = (f"At the target accuracy {b['target']:g}: certified budget (best sigma) "
                            f"**{_f(b['best_certified_budget'])}** (lower bound) <= true budget <= **{_f(emp['budget'])}** "
                            f"(upper bound: the radius at which the attacks push robust accuracy below the target). ")
            else:
                interval = (f"**The two bounds are about different classifiers**: the certificate is for the "
                            f"smoothed pipeline over the noise-trained model(s) {', '.join(f'`{x}`' for x in b['certified_models'])}, "
                            f"the attacks bound the deployed pipeline. Read them side by side, not as one interval: at "
                            f"the target accuracy {b['target']:g}, certified budget (best sigma) "
                            f"**{_f(b['best_certified_budget'])}** for the smoothed alternative; the attacks push the "
                            f"deployed pipeline below the target at **{_f(emp['budget'])}**. ")
            add(interval + "Per sample, the least L2 distortion the attacks "
                f"found: median **{_f(emp['median_minimal_distortion'])}**, quantiles "
                + ", ".join(f"q{k} = {_f(v)}" for k, v in emp["quantiles"].items())
                + f". (Certified on {next(iter(b['sigmas'].values())).get('samples')} samples, attacked on "
                f"{m['samples']}.)\n")
        if "budget" in plots:
            add(f"![distortion budget]({plots['budget']})\n")

    add("## Cost\n")
    c = m["cost"]
    add(f"{c['records']} attack records; {c['gradients']:.0f} gradient evaluations (EOT draws included); "
        f"{c['attack_seconds']:.1f} s of attack and scoring time.\n")

    add("## Warnings (gradient masking and sanity checks)\n")
    if not report["warnings"]:
        add("None.\n")
    for w in report["warnings"]:
        add(f"- **{w['code']}**: {w['message']}")
    add("")
    add("## Gate\n")
    add("| check | threshold | measured | result |\n|---|---|---|---|")
    for c in gate["checks"]:
        res = "not set" if c["passed"] is None else ("pass" if c["passed"] else "**FAIL**")
        add(f"| {c['name']} | {c['threshold']} | {c['value']} | {res} |")
    add(f"\n**{'PASS' if gate['passed'] else 'FAIL'}**" + ("" if gate["passed"] else ": " + "; ".join(gate["reasons"])) + "\n")
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """report.json, plots/*.png and report.md in ``out``."""
    out = Path(out)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    m = report["metrics"]
    plots: dict[str, str] = {}
    if plot_operating_characteristic(m, plots_dir / "operating_characteristic.png", report["audit"]["d_upp"]):
        plots["oc"] = "plots/operating_characteristic.png"
    for norm in NORMS:
        plot_robust_accuracy(m, norm, plots_dir / f"robust_accuracy_{norm}.png")
        plots[f"robust_{norm}"] = f"plots/robust_accuracy_{norm}.png"
    if report.get("distortion_budget"):
        plot_budget(report["distortion_budget"], plots_dir / "distortion_budget.png")
        plots["budget"] = "plots/distortion_budget.png"
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    md_path = out / "report.md"
    md_path.write_text(render_markdown(json.loads(json_path.read_text()), plots))
    return json_path, md_path
