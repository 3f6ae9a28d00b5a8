"""Carlini & Wagner L2 (2017) with its binary search over the constant c.

Change of variable x' = (tanh(w) + 1) / 2 keeps pixels in [0, 1]; Adam minimises
||x' - x||^2 + c * max(margin(x') + confidence, 0) with the logit margin (negative when
adversarial). After each of ``binary_search_steps`` runs of ``steps`` iterations, c is halved
towards the last failure for samples that succeeded and raised (x10 until a first success, then
bisected) for those that failed. The output is the least-distorted adversarial iterate seen.
"""

from __future__ import annotations

import torch

from advshield.attacks.primitives import (
    Model,
    check_inputs,
    check_positive,
    is_adversarial,
    l2,
    margin,
    value_and_grad,
)
from advshield.core.errors import InputError


def cw_l2(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    binary_search_steps: int = 5,
    steps: int = 20,
    lr: float = 0.1,
    initial_const: float = 1.0,
    confidence: float = 0.0,
) -> torch.Tensor:
    """Minimal attack: the least-distorted adversarial found, else the clean input."""
    check_inputs(inputs, labels, "cw_l2")
    check_positive("cw_l2", lr=lr, initial_const=initial_const)
    if binary_search_steps < 1 or steps < 1 or confidence < 0:
        raise InputError(
            f"cw_l2: binary_search_steps and steps must be >= 1 and confidence >= 0, got "
            f"{binary_search_steps}, {steps}, {confidence}"
        )
    n, dev = len(inputs), inputs.device
    w0 = torch.atanh((2 * inputs - 1) * (1 - 1e-6))
    const = torch.full((n,), float(initial_const), device=dev)
    lower = torch.zeros(n, device=dev)
    upper = torch.full((n,), 1e10, device=dev)
    best = inputs.clone()
    best_l2 = torch.full((n,), float("inf"), device=dev)

    for _ in range(binary_search_steps):
        w = w0.clone()
        m1, m2 = torch.zeros_like(w), torch.zeros_like(w)  # Adam moments (betas 0.9, 0.999)
        succeeded = torch.zeros(n, dtype=torch.bool, device=dev)
        c = const.clone()

        def hinge(z: torch.Tensor, c: torch.Tensor = c) -> torch.Tensor:
            return c * (margin(z, labels, targeted) + confidence).clamp_min(0)

        for k in range(1, steps + 1):
            t = torch.tanh(w)
            x = (t + 1) / 2
            _, g, z = value_and_grad(model, x, labels, targeted, hinge)
            d = l2(x - inputs)
            adv = is_adversarial(z, labels, targeted) & (margin(z, labels, targeted) <= -confidence)
            better = adv & (d < best_l2)
            best[better] = x[better]
            best_l2[better] = d[better]
            succeeded |= adv
            grad_x = g + 2 * (x - inputs)
            grad_w = grad_x * (1 - t**2) / 2  # chain rule through x = (tanh(w) + 1) / 2
            m1.mul_(0.9).add_(grad_w, alpha=0.1)
            m2.mul_(0.999).addcmul_(grad_w, grad_w, value=0.001)
            w = w - lr * (m1 / (1 - 0.9**k)) / ((m2 / (1 - 0.999**k)).sqrt() + 1e-8)
        upper = torch.where(succeeded, torch.minimum(upper, const), upper)
        lower = torch.where(succeeded, lower, torch.maximum(lower, const))
        const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
    return best
