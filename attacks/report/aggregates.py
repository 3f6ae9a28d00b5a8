"""The audit's numbers, from its records: ``compute_metrics`` and the distortion budget.

Records first, aggregates second: ``compute_metrics`` turns the JSONL records into the chapter-3
statistics (``advshield.attacks.metrics``); the report renders that dict and recomputes nothing.

* clean accuracy over the N' audited samples; everything else over the N correct ones;
* robust accuracy at eps (per norm): correct and no successful record whose distortion in that
  norm is <= eps, over every attack (a valid example within eps counts whichever attack found it);
* scoring: a random pipeline's images were scored by the majority of k serving draws (``draws``);
  next to those majority-vote accuracies, the expected accuracy over draws: the mean over samples
  of the share of draws the pipeline got right, for robust accuracy the least share over the clean
  image and every example within eps (the attacker may always send the clean image). For a
  deterministic pipeline (k = 1) the two are equal;
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

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from advshield.attacks import metrics as M
from advshield.attacks.certify import budget as certified_budgets
from advshield.attacks.threat import DIST_TOL
from advshield.core.errors import InputError

NORMS = ("linf", "l2")
NORM_LABEL = {"linf": "L-inf", "l2": "L2"}


def quantiles(per_sample: np.ndarray, qs: Sequence[float]) -> dict[str, float | None]:
    """Empirical quantiles (no interpolation, so +inf stays +inf) of the per-sample distortion."""
    if per_sample.size == 0:
        return {f"{q:g}": None for q in qs}
    return {f"{q:g}": float(np.quantile(per_sample, q, method="inverted_cdf")) for q in qs}


def _minimal_stats(correct: np.ndarray, success: np.ndarray, dist: np.ndarray, dist_inf: np.ndarray,
                   spec: Any) -> dict[str, Any]:
    s = M.summary(correct, success, dist, d_upp=spec.d_upp, eps_grid=spec.eps_l2)
    per = np.where(success, dist, np.inf)[correct]
    s["quantiles"] = quantiles(per, spec.quantiles)
    d, p = M.operating_characteristic(dist, success, correct)
    s["operating_characteristic"] = {"distortion": d.tolist(), "p": p.tolist()}
    s["robust_accuracy_linf"] = M.robust_accuracy(correct, success, dist_inf, spec.eps_linf).tolist()
    return s


def compute_metrics(records: Sequence[Mapping[str, Any]], spec: Any, mode: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every statistic of the report from the records (see the module docstring)."""
    mode = mode or {}
    seen: set[tuple[Any, Any, Any]] = set()
    for r in records:  # one record per (sample, attack, eps): a duplicate would be counted twice
        key = (r["sample"], r["attack"], r["eps"])
        if key in seen:
            raise InputError(f"audit metrics: duplicated record for sample {r['sample']}, attack {r['attack']!r}, "
                             f"eps {r['eps']} (records of two runs concatenated?)")
        seen.add(key)
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
    clean_share = np.array([_clean_share(r) for r in clean])
    draws = max(int(r.get("draws", 1)) for r in clean)
    out: dict[str, Any] = {
        "samples": n,
        "first_sample": clean[0]["sample"],
        "correct": n_correct,
        "clean_accuracy": M.clean_accuracy(correct),
        "scoring": {
            "random": bool(draws > 1 or mode.get("random_declared") or mode.get("random_measured")),
            "draws": draws,  # serving draws that scored each image, by majority
            "eot_samples": mode.get("eot_samples"),  # EOT draws per gradient of the attacks
            "expected_clean_accuracy": float(clean_share.mean()),
        },
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

    def white(r: Mapping[str, Any]) -> bool:  # the white-box attacks (and the sanity attack)
        return r["source"] not in ("transfer", "black-box")

    unions = {
        "all attacks": least(lambda r: True),
        "white-box": least(white),
    }
    picks = {"all attacks": lambda r: True, "white-box": white}

    def expected(norm: str, grid: np.ndarray, pick) -> list[float]:
        """Per eps, the mean over samples of the least share of draws right: on the clean image,
        on every example within eps."""
        share = np.repeat(clean_share[:, None], len(grid), axis=1)
        for r in records:
            if r["attack"] != "clean" and pick(r):
                i, within = index[r["sample"]], r[norm] <= grid + DIST_TOL
                share[i, within] = np.minimum(share[i, within], _adv_share(r))
        return share.mean(0).tolist()

    out["robust_accuracy"] = {}
    for norm in NORMS:
        grid = np.asarray(spec.grid(norm), dtype=np.float64)
        table: dict[str, Any] = {"eps": grid.tolist()}
        for label, best in unions.items():
            broken = best[norm][None, :] <= grid[:, None] + DIST_TOL
            table[label] = (correct[None, :] & ~broken).mean(1).tolist()
        table["expected"] = {label: expected(norm, grid, pick) for label, pick in picks.items()}
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
        if first["source"] == "black-box":
            q = np.array([int(r.get("queries", 0)) for r in rows], np.int64)
            info["queries"] = {"total": int(q.sum()), "median": float(np.median(q)) if q.size else 0.0,
                               "max": int(q.max()) if q.size else 0}
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
                                  "quantiles": quantiles(all_l2, spec.quantiles)}

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

    if getattr(spec, "protocol", "cascade") == "independent":
        out["independent"] = independent_attacks(records, correct, index, spec)

    black = [r for r in records if r["source"] == "black-box"]
    if black:
        q = np.array([int(r.get("queries", 0)) for r in black], np.int64)
        secs = float(sum(r["seconds"] for r in black))
        out["black_box"] = {
            "attacks": [a for a in order if out["attacks"][a]["source"] == "black-box"],
            "records": len(black),
            "queries_total": int(q.sum()),
            "queries_median": float(np.median(q)),  # per (sample, attack, eps) record
            "seconds": secs,
            "queries_per_second": float(q.sum() / secs) if secs > 0 else None,  # achieved by the attacks
        }

    total_g = sum(r["gradients"] for r in records if r["attack"] != "clean")
    total_s = sum(r["seconds"] for r in records)
    out["cost"] = {"gradients": float(total_g), "attack_seconds": float(total_s),
                   "records": sum(1 for r in records if r["attack"] != "clean")}
    return out


def _clean_share(r: Mapping[str, Any]) -> float:
    """Share of the serving draws that classified the clean image correctly (records written
    before draws were counted: 1 or 0)."""
    share = r.get("clean_share")
    return float(r["correct"]) if share is None else float(share)


def _adv_share(r: Mapping[str, Any]) -> float:
    """Share of the serving draws on which the adversarial example was not a success."""
    share = r.get("adv_share")
    return float(not r["success"]) if share is None else float(share)


def distortion_budget(certify: Mapping[str, Any], metrics: Mapping[str, Any], target: float) -> dict[str, Any]:
    """Certified accuracy vs radius and the certified budget (lower bound) per sigma, next to the
    empirical robust accuracy at the same radii and the per-sample minimal distortion found by the
    attacks (upper bound)."""
    budgets = certified_budgets(certify, target)
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


def independent_attacks(records: Sequence[Mapping[str, Any]], correct: np.ndarray, index: Mapping[int, int],
                        spec: Any) -> dict[str, Any]:
    """The thesis's protocol (ch. 3): per attack and eps (minimal attacks: once), over the correct
    samples, P_suc, the conditional mean L2 distortion D-bar and P_upp = P(D_upp), judged after
    8-bit rounding and without it (``float_*`` record fields)."""
    groups: dict[tuple[str, Any], list[Mapping[str, Any]]] = {}
    for r in records:
        if r["attack"] != "clean" and r["source"] != "sanity":
            groups.setdefault((r["attack"], r["eps"]), []).append(r)
    rows = []
    for (attack, eps), rs in groups.items():
        row: dict[str, Any] = {"attack": attack, "eps": eps, "kind": rs[0]["kind"], "norm": rs[0]["norm"],
                               "source": rs[0]["source"], "attacked": len(rs)}
        for tag, s_key, d_key in (("rounded", "success", "l2"), ("float", "float_success", "float_l2")):
            success = np.zeros(len(correct), bool)
            dist = np.full(len(correct), np.inf)
            for r in rs:
                success[index[r["sample"]]] = bool(r.get(s_key, False))
                dist[index[r["sample"]]] = float(r.get(d_key, np.inf))
            row[tag] = {"p_suc": M.success_probability(success, correct),
                        "mean_l2": M.conditional_distortion(dist, success, correct),
                        "p_upp": M.p_upp(dist, success, correct, spec.d_upp)}
        rows.append(row)
    return {"d_upp": spec.d_upp, "rows": rows}
