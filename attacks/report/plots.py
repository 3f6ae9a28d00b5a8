"""The report's three plots, drawn from the metrics dict, each written as a PNG and its path
returned: the operating characteristic of the minimal attacks, robust accuracy against eps (one
per norm) and the distortion budget (certified against empirical).

Matplotlib's object API (``Figure``, no pyplot): no global backend to select and no figure
registry, so plotting never opens a window and is safe from any thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from advshield.attacks.report.aggregates import NORM_LABEL

DPI = 110


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(6, 4))
    return fig, fig.subplots()


def _save(fig: Figure, ax: Axes, title: str, path: Path) -> Path:
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return Path(path)


def plot_operating_characteristic(metrics: Mapping[str, Any], path: Path, d_upp: float) -> Path | None:
    """P(D) of every minimal attack and of their per-sample best; None when no minimal attack ran."""
    curves = [(a, v) for a, v in metrics["attacks"].items() if v["kind"] == "minimal"]
    if not curves:
        return None
    fig, ax = _figure()
    for a, v in curves:
        oc = v["operating_characteristic"]
        ax.step(oc["distortion"], oc["p"], where="post", label=a)
    if "best_minimal" in metrics:
        oc = metrics["best_minimal"]["operating_characteristic"]
        ax.step(oc["distortion"], oc["p"], where="post", color="black", lw=2, label="best of minimal")
    ax.axvline(d_upp, color="grey", ls="--", lw=1, label=f"D_upp = {d_upp:g}")
    ax.set_xlabel("L2 distortion D (pixels in [0, 1])")
    ax.set_ylabel("P(D): share of correct samples broken")
    return _save(fig, ax, "Operating characteristic", path)


def plot_robust_accuracy(metrics: Mapping[str, Any], norm: str, path: Path) -> Path:
    """Robust accuracy against eps in ``norm``: all attacks, white-box ones, each minimal one alone."""
    t = metrics["robust_accuracy"][norm]
    fig, ax = _figure()
    eps = [0.0, *t["eps"]]
    styles: tuple[tuple[str, dict[str, Any]], ...] = (("all attacks", {"color": "black", "lw": 2}),
                                                      ("white-box", {"ls": "--"}))
    for label, style in styles:
        ax.plot(eps, [metrics["clean_accuracy"], *t[label]], marker="o", ms=3, label=label, **style)
    for a, v in metrics["attacks"].items():
        if v["kind"] == "minimal":
            alone = v["robust_accuracy"] if norm == "l2" else v["robust_accuracy_linf"]
            ax.plot(eps, [metrics["clean_accuracy"], *alone], ls=":", marker=".", label=f"{a} alone")
    ax.set_xlabel(f"{NORM_LABEL[norm]} eps (pixels in [0, 1])")
    ax.set_ylabel("robust accuracy")
    return _save(fig, ax, f"Robust accuracy against {NORM_LABEL[norm]} eps", path)


def plot_budget(budget: Mapping[str, Any], path: Path) -> Path:
    """Certified accuracy against radius per sigma, next to the attacks' robust accuracy curve."""
    fig, ax = _figure()
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
    return _save(fig, ax, "Distortion budget: certified vs empirical", path)
