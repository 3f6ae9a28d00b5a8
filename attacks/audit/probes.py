"""Probes for the masking checks: gradient norms through the attack model, randomness of the
serving path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from advshield.attacks.audit.attack_models import Scorer, Setup
from advshield.attacks.primitives import l2, margin, value_and_grad

PROBES = "probes.json"


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


def run_probes(setup: Setup, images: np.ndarray, labels: np.ndarray, correct: np.ndarray, seed: int,
               n: int = 64) -> dict[str, Any]:
    pos = np.flatnonzero(correct)[:n]
    probes: dict[str, Any] = {"mode": setup.mode}
    x = torch.from_numpy(np.ascontiguousarray(images[: max(n, 1)], np.float32))
    probes["randomness"] = randomness_probe(setup.scorer, x)
    if len(pos):
        xs = torch.from_numpy(np.ascontiguousarray(images[pos], np.float32))
        ys = torch.from_numpy(np.asarray(labels[pos], np.int64))
        probes["gradients"] = gradient_probe(setup.model, xs, ys, seed)
    return probes
