"""Metrics over per-sample records (thesis section 3.3), short functions over numpy arrays.

Notation: N' samples; ``correct`` [N'] marks the N correctly classified without attack (the only
ones attacked); ``success`` [N'] the samples the (checked, re-scored) attack broke; ``distortion``
[N'] the L2 (or other) distortion of each sample's adversarial example.

* clean accuracy N / N';
* P_suc = N_suc / N, successes counted among the correct samples only;
* D-bar = mean distortion over the successes (conditional: distortion means nothing for a failure);
* P(D) = |{x in X_suc : D(x) <= D}| / N, the operating characteristic, from P(0)=0 to P_suc;
  P_upp = P(D_upp);
* robust accuracy at eps = share of all N' samples classified correctly and not broken within eps;
* detector: threshold calibrated on clean scores at a target false-positive rate (flag when
  score > threshold), true-positive rate on the adversarial examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from advshield.core.errors import InputError


def _arrays(correct: Any, *others: Any) -> tuple[np.ndarray, ...]:
    c = np.asarray(correct, dtype=bool)
    out = [c]
    for o in others:
        a = np.asarray(o)
        if a.shape != c.shape:
            raise InputError(f"metrics: record arrays must have the same shape, got {c.shape} and {a.shape}")
        out.append(a)
    return tuple(out)


def clean_accuracy(correct: Any) -> float:
    c = np.asarray(correct, dtype=bool)
    if c.size == 0:
        raise InputError("metrics: no samples")
    return float(c.mean())


def success_probability(success: Any, correct: Any) -> float:
    """P_suc = N_suc / N over the N correctly classified samples (nan when N = 0)."""
    c, s = _arrays(correct, success)
    n = int(c.sum())
    return float((s.astype(bool) & c).sum() / n) if n else math.nan


def conditional_distortion(distortion: Any, success: Any, correct: Any) -> float:
    """D-bar: mean distortion over the successes among correct samples (nan when none)."""
    c, s, d = _arrays(correct, success, distortion)
    hit = s.astype(bool) & c
    return float(d[hit].astype(np.float64).mean()) if hit.any() else math.nan


def operating_characteristic(distortion: Any, success: Any, correct: Any,
                             grid: Sequence[float] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(D, P(D)): at the given ``grid``, or at 0 and every distinct successful distortion."""
    c, s, d = _arrays(correct, success, distortion)
    n = int(c.sum())
    broken = np.sort(d[s.astype(bool) & c].astype(np.float64))
    points = np.unique(np.concatenate([[0.0], broken])) if grid is None else np.asarray(grid, dtype=np.float64)
    counts = np.searchsorted(broken, points, side="right")
    return points, (counts / n if n else np.full(points.shape, math.nan))


def p_upp(distortion: Any, success: Any, correct: Any, d_upp: float) -> float:
    """P_upp = P(D_upp): share of the correct samples broken with distortion <= D_upp."""
    return float(operating_characteristic(distortion, success, correct, [d_upp])[1][0])


def median_distortion(distortion: Any, success: Any, correct: Any) -> float:
    """Median over the correct samples of the distortion needed to break them, +inf for those
    not broken: an upper bound on the median minimal adversarial distortion."""
    c, s, d = _arrays(correct, success, distortion)
    if not c.any():
        return math.nan
    per = np.where(s.astype(bool), d.astype(np.float64), np.inf)[c]
    return float(np.median(per))


def robust_accuracy(correct: Any, success: Any, distortion: Any, eps_grid: Sequence[float]) -> np.ndarray:
    """From a minimal attack: at each eps, the share of all N' samples that are correct and not
    broken with distortion <= eps."""
    c, s, d = _arrays(correct, success, distortion)
    eps = np.asarray(eps_grid, dtype=np.float64)
    broken = s.astype(bool)[None, :] & (d.astype(np.float64)[None, :] <= eps[:, None])
    return (c[None, :] & ~broken).mean(1)


def best_of(success: Any, distortion: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per sample over A attacks ([A, N'] each): broken by any, and the least successful
    distortion (+inf where none succeeded)."""
    s = np.asarray(success, dtype=bool)
    d = np.asarray(distortion, dtype=np.float64)
    if s.shape != d.shape or s.ndim != 2:
        raise InputError(f"metrics: best_of needs two [A, N] arrays, got {list(s.shape)} and {list(d.shape)}")
    return np.asarray(s.any(0)), np.asarray(np.where(s, d, np.inf).min(0))


def calibrate_threshold(clean_scores: Any, fpr: float) -> float:
    """The least threshold t among the clean scores with share(score > t) <= fpr."""
    s = np.sort(np.asarray(clean_scores, dtype=np.float64).ravel())
    if s.size == 0 or not 0 <= fpr < 1:
        raise InputError(f"calibrate_threshold: need clean scores and 0 <= fpr < 1, got {s.size} scores, fpr={fpr}")
    k = math.ceil((1 - fpr) * s.size) - 1  # index of the threshold in the sorted scores
    return float(s[max(k, 0)])


def detection_rates(clean_scores: Any, adversarial_scores: Any, threshold: float,
                    mask: Any | None = None) -> tuple[float, float]:
    """(false-positive rate on clean, true-positive rate on adversarial[mask]) for score > threshold."""
    clean = np.asarray(clean_scores, dtype=np.float64).ravel()
    adv = np.asarray(adversarial_scores, dtype=np.float64).ravel()
    if mask is not None:
        adv = adv[np.asarray(mask, dtype=bool).ravel()]
    fpr = float((clean > threshold).mean()) if clean.size else math.nan
    tpr = float((adv > threshold).mean()) if adv.size else math.nan
    return fpr, tpr


def cost(gradients: float, seconds: float, images: int) -> dict[str, float]:
    """Attack cost per image: gradient evaluations, seconds, and images per second."""
    if images <= 0:
        raise InputError(f"cost: images must be > 0, got {images}")
    return {
        "gradients_per_image": float(gradients) / images,
        "seconds_per_image": float(seconds) / images,
        "images_per_second": images / seconds if seconds > 0 else math.inf,
    }


def summary(correct: Any, success: Any, distortion: Any, *, d_upp: float | None = None,
            eps_grid: Sequence[float] = ()) -> dict[str, Any]:
    """The chapter-3 statistics of one (minimal) attack as a JSON-ready dict."""
    c, s, d = _arrays(correct, success, distortion)
    out: dict[str, Any] = {
        "samples": int(c.size),
        "correct": int(c.sum()),
        "clean_accuracy": clean_accuracy(c),
        "p_suc": success_probability(s, c),
        "mean_distortion": conditional_distortion(d, s, c),
        "median_distortion": median_distortion(d, s, c),
    }
    if d_upp is not None:
        out["d_upp"] = float(d_upp)
        out["p_upp"] = p_upp(d, s, c, d_upp)
    if len(eps_grid):
        out["eps_grid"] = [float(e) for e in eps_grid]
        out["robust_accuracy"] = robust_accuracy(c, s, d, eps_grid).tolist()
    return out
