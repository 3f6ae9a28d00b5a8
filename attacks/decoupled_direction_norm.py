"""Decoupling Direction and Norm (Rony et al. 2019), L2.

Each iteration takes a step of length alpha along the normalised gradient of the cross-entropy
(away from the true class, or towards the target), then rescales the perturbation to norm eps,
where eps shrinks by (1 - gamma) after an adversarial iterate and grows by (1 + gamma) otherwise;
the point is clipped to [0, 1] and rounded to ``levels`` grey levels. alpha follows the authors'
cosine annealing from 1 to 0.01. Defaults: eps_0 = 1, gamma = 0.05, 256 levels.
"""

from __future__ import annotations

import math

import torch

from advshield.attacks.primitives import (
    Model,
    bview,
    check_inputs,
    check_positive,
    is_adversarial,
    l2,
    normalize,
    predict,
    quantize,
    value_and_grad,
)
from advshield.core.errors import InputError


def ddn(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    steps: int = 100,
    init_eps: float = 1.0,
    gamma: float = 0.05,
    levels: int | None = 256,
    alpha_max: float = 1.0,
    alpha_min: float = 0.01,
) -> torch.Tensor:
    """Minimal attack: the least-distorted adversarial iterate, else the clean input."""
    check_inputs(inputs, labels, "ddn")
    check_positive("ddn", init_eps=init_eps, alpha_max=alpha_max, alpha_min=alpha_min)
    if steps < 1 or not 0 < gamma < 1 or (levels is not None and levels < 2):
        raise InputError(f"ddn: need steps >= 1, 0 < gamma < 1, levels >= 2 or None; got {steps}, {gamma}, {levels}")
    n, dev = len(inputs), inputs.device
    x = inputs.clone()  # the current iterate (on the grid once quantized)
    eps = torch.full((n,), float(init_eps), device=dev)
    worst = l2(torch.maximum(inputs, 1 - inputs))  # the largest distortion the box allows
    best = inputs.clone()
    best_l2 = torch.full((n,), float("inf"), device=dev)

    def keep(x: torch.Tensor, adv: torch.Tensor) -> None:
        d = l2(x - inputs)
        better = adv & (d < best_l2)
        best[better] = x[better]
        best_l2[better] = d[better]

    for i in range(steps):
        alpha = alpha_min + (alpha_max - alpha_min) * (1 + math.cos(math.pi * i / steps)) / 2
        _, g, z = value_and_grad(model, x, labels, targeted, "ce")
        adv = is_adversarial(z, labels, targeted)
        keep(x, adv)
        delta = (x - inputs) - alpha * normalize(g)  # descend the attack loss
        eps = torch.minimum(torch.where(adv, eps * (1 - gamma), eps * (1 + gamma)), worst)
        delta = delta * bview(eps / l2(delta).clamp_min(1e-12), delta)
        x = (inputs + delta).clamp(0.0, 1.0)
        if levels is not None:
            x = quantize(x, levels)
    keep(x, is_adversarial(predict(model, x, labels, targeted), labels, targeted))
    return best
