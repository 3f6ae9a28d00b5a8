"""Budget attacks: FGSM, I-FGSM/BIM and PGD (L-inf and L2) as one gradient loop.

The loop is: start (clean or random in the ball), gradient of the attack loss, a step for the
norm, projection onto the eps-ball and onto [0, 1]. The per-norm pieces are three small
functions; FGSM is one step of size eps from the clean input, BIM is PGD without random start.
Restarts re-run the loop (new random start) on the samples not yet adversarial.
"""

from __future__ import annotations

import torch

from advshield.attacks.primitives import (
    LossName,
    Model,
    Norm,
    attack_loss,
    bview,
    check_inputs,
    check_norm,
    check_positive,
    generator_for,
    is_adversarial,
    l2,
    normalize,
    predict,
    value_and_grad,
)
from advshield.core.errors import InputError


def _step(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign for L-inf, normalised gradient for L2."""
    return g.sign() if norm == "linf" else normalize(g)


def _project(delta: torch.Tensor, inputs: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Onto the eps-ball, then onto [0, 1] (clipping only shrinks |delta|, so both hold)."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = l2(delta)
        delta = delta * bview(torch.clamp(eps / n.clamp_min(1e-12), max=1.0), delta)
    return (inputs + delta).clamp(0.0, 1.0) - inputs


def _random_start(inputs: torch.Tensor, eps: float, norm: str, g: torch.Generator | None) -> torch.Tensor:
    """Uniform in the ball: L-inf uniform per pixel; L2 uniform direction, radius eps * u^(1/d)."""
    if norm == "linf":
        delta = (torch.rand(inputs.shape, generator=g, device=inputs.device) * 2 - 1) * eps
    else:
        d = inputs[0].numel()
        u = torch.rand(inputs.shape[0], generator=g, device=inputs.device)
        delta = normalize(torch.randn(inputs.shape, generator=g, device=inputs.device)) * bview(eps * u ** (1.0 / d), inputs)
    return _project(delta, inputs, eps, norm)


def pgd(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    eps: float,
    norm: Norm = "linf",
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    loss: LossName = "ce",
    seed: int | None = 0,
) -> torch.Tensor:
    """Projected gradient descent on the attack loss inside the ``norm`` ball of radius ``eps``.

    ``step_size`` defaults to 2.5 * eps / steps (Madry et al.). Returns, per sample, the first
    restart that is adversarial, else the last iterate of the restart with the lowest loss."""
    check_inputs(inputs, labels, "pgd")
    check_norm("pgd", norm)
    check_positive("pgd", eps=eps)
    if steps < 1 or restarts < 1:
        raise InputError(f"pgd: steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    check_positive("pgd", step_size=alpha)
    gen = generator_for(inputs.device, seed)
    best = inputs.clone()
    best_loss = torch.full((len(inputs),), float("inf"), device=inputs.device)
    done = torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
    for _ in range(restarts):
        idx = (~done).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x, y = inputs[idx], labels[idx]
        delta = _random_start(x, eps, norm, gen) if random_start else torch.zeros_like(x)
        for _ in range(steps):
            _, g, _ = value_and_grad(model, x + delta, y, targeted, loss)
            delta = _project(delta - alpha * _step(g, norm), x, eps, norm)
        adv = x + delta
        z = predict(model, adv, y, targeted)
        final_loss = attack_loss(z, y, targeted, loss)
        better = is_adversarial(z, y, targeted) | (final_loss < best_loss[idx])
        best[idx[better]] = adv[better]
        best_loss[idx[better]] = final_loss[better]
        done[idx] = is_adversarial(z, y, targeted)
    return best


def fgsm(
    model: Model, inputs: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False, eps: float,
    norm: Norm = "linf", loss: LossName = "ce",
) -> torch.Tensor:
    """Fast gradient (sign) method: one step of size eps from the clean input."""
    return pgd(model, inputs, labels, targeted=targeted, eps=eps, norm=norm, steps=1, step_size=eps,
               random_start=False, restarts=1, loss=loss, seed=None)


def bim(
    model: Model, inputs: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False, eps: float,
    norm: Norm = "linf", steps: int = 10, step_size: float | None = None, loss: LossName = "ce",
) -> torch.Tensor:
    """I-FGSM / BIM (Kurakin et al.): PGD from the clean input, default step 1.25 * eps / steps."""
    alpha = 1.25 * eps / max(steps, 1) if step_size is None else step_size
    return pgd(model, inputs, labels, targeted=targeted, eps=eps, norm=norm, steps=steps, step_size=alpha,
               random_start=False, restarts=1, loss=loss, seed=None)
