"""Smooth adversarial examples (H. Zhang's thesis, ch. 4): perturbations smooth like the input.

Both attacks smooth with the image-guided Laplacian operator s^_alpha of
``advshield.attacks.laplacian`` (guided by the clean input x_o; alpha = 0.95, the thesis's MNIST
value), but integrate it in very different ways (section 4.3):

* **sC&W** (:func:`scw_l2`, eq. 4.14): the perturbation *is* the smoothing of a latent variable,
  r = s^_alpha(z), z initialised at 0, and C&W's problem is solved for z:

      min_z ||s^_alpha(z)||^2 + c * max(margin(f(clip(x_o + s^_alpha(z)))) + confidence, 0)

  with Adam and C&W's binary search over c (as ``advshield.attacks.carlini_wagner.cw_l2``). The
  gradient w.r.t. z is the gradient w.r.t. r through the transpose of the (linear, constant)
  smoothing (eq. 4.15). Every iterate r is smooth like x_o. The output is the least-distorted
  adversarial iterate, else the clean input.
* **qPGD2** (eq. 4.8, "quick and dirty"): PGD-L2 whose gradient is smoothed before it is
  normalised: x <- proj(x - step * n(s^_alpha(g))). :func:`qpgd_l2` is the budget attack (eps);
  :func:`qpgd2` makes it a minimal attack the way the thesis evaluates PGD2/qPGD2 (several target
  distortions): a per-sample bisection over eps, returning the least-distorted adversarial found.
"""

from __future__ import annotations

import torch

from advshield.attacks.laplacian import LaplacianSmoother, SmoothingConfig, Solver
from advshield.attacks.primitives import (
    Model,
    attack_loss,
    bview,
    check_inputs,
    check_positive,
    generator_for,
    is_adversarial,
    l2,
    margin,
    normalize,
    predict,
    value_and_grad,
)
from advshield.core.errors import InputError


def _smoother(inputs: torch.Tensor, alpha: float, sigma: float, solver: Solver, cg_steps: int) -> LaplacianSmoother:
    if inputs.dim() != 4:
        raise InputError(f"smooth attacks need image batches [N, C, H, W], got shape {list(inputs.shape)}")
    return LaplacianSmoother(inputs, SmoothingConfig(alpha=alpha, sigma=sigma, solver=solver, cg_steps=cg_steps))


def scw_l2(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    binary_search_steps: int = 5,
    steps: int = 20,
    lr: float = 0.05,
    initial_const: float = 1.0,
    confidence: float = 0.0,
    alpha: float = 0.95,
    sigma: float = 0.1,
    solver: Solver = "auto",
    cg_steps: int = 50,
) -> torch.Tensor:
    """Smooth C&W (thesis eq. 4.14). Minimal attack: the least-distorted adversarial iterate,
    else the clean input. ``lr`` is Adam's step on z (pixel units)."""
    check_inputs(inputs, labels, "scw_l2")
    check_positive("scw_l2", lr=lr, initial_const=initial_const)
    if binary_search_steps < 1 or steps < 1 or confidence < 0:
        raise InputError(
            f"scw_l2: binary_search_steps and steps must be >= 1 and confidence >= 0, got "
            f"{binary_search_steps}, {steps}, {confidence}"
        )
    smooth = _smoother(inputs, alpha, sigma, solver, cg_steps)
    n, dev = len(inputs), inputs.device
    const = torch.full((n,), float(initial_const), device=dev)
    lower = torch.zeros(n, device=dev)
    upper = torch.full((n,), 1e10, device=dev)
    best = inputs.clone()
    best_l2 = torch.full((n,), float("inf"), device=dev)

    for _ in range(binary_search_steps):
        z = torch.zeros_like(inputs)
        m1, m2 = torch.zeros_like(z), torch.zeros_like(z)  # Adam moments (betas 0.9, 0.999)
        succeeded = torch.zeros(n, dtype=torch.bool, device=dev)
        c = const.clone()

        def hinge(logits: torch.Tensor, c: torch.Tensor = c) -> torch.Tensor:
            return c * (margin(logits, labels, targeted) + confidence).clamp_min(0)

        for k in range(1, steps + 1):
            r = smooth.apply(z)
            raw = inputs + r
            x = raw.clamp(0.0, 1.0)
            _, g, logits = value_and_grad(model, x, labels, targeted, hinge)
            d = l2(x - inputs)
            adv = is_adversarial(logits, labels, targeted) & (margin(logits, labels, targeted) <= -confidence)
            better = adv & (d < best_l2)
            best[better] = x[better]
            best_l2[better] = d[better]
            succeeded |= adv
            inside = ((raw > 0) & (raw < 1)).to(g.dtype)  # clip's derivative
            grad_z = smooth.adjoint(g * inside + 2 * r)  # eq. 4.15: J^T grad_r
            m1.mul_(0.9).add_(grad_z, alpha=0.1)
            m2.mul_(0.999).addcmul_(grad_z, grad_z, value=0.001)
            z = z - lr * (m1 / (1 - 0.9**k)) / ((m2 / (1 - 0.999**k)).sqrt() + 1e-8)
        upper = torch.where(succeeded, torch.minimum(upper, const), upper)
        lower = torch.where(succeeded, lower, torch.maximum(lower, const))
        const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
    return best


def _qpgd_run(model: Model, x: torch.Tensor, y: torch.Tensor, targeted: bool, eps: torch.Tensor, steps: int,
              step_size: torch.Tensor, smooth: LaplacianSmoother,
              gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD-L2 from the clean input with the smoothed, normalised gradient (eq. 4.8), per-sample
    budgets ``eps`` [N]: the best point per sample (adversarial first, then the lowest loss) and
    whether it is adversarial. ``steps`` gradients; the last iterate is scored without one."""
    n = len(x)
    delta = torch.zeros_like(x)
    best = x.clone()
    best_loss = torch.full((n,), float("inf"), device=x.device)
    best_adv = torch.zeros(n, dtype=torch.bool, device=x.device)
    for k in range(steps + 1):
        if k < steps:
            f, g, z = value_and_grad(model, x + delta, y, targeted, "ce")
        else:
            z = predict(model, x + delta, y, targeted)
            f = attack_loss(z, y, targeted, "ce")
        if k > 0:
            adv = is_adversarial(z, y, targeted)
            better = (adv & ~best_adv) | ((adv == best_adv) & (f < best_loss))
            best[better], best_loss[better], best_adv[better] = (x + delta)[better], f[better], adv[better]
        if k < steps:
            delta = delta - bview(step_size, x) * normalize(smooth.apply(g), gen)
            delta = delta * bview(torch.clamp(eps / l2(delta).clamp_min(1e-12), max=1.0), delta)
            delta = (x + delta).clamp(0.0, 1.0) - x
    return best, best_adv


def _check_qpgd(attack: str, steps: int) -> None:
    if steps < 1:
        raise InputError(f"{attack}: steps must be >= 1, got {steps}")


def qpgd_l2(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    eps: float,
    steps: int = 40,
    step_size: float | None = None,
    alpha: float = 0.95,
    sigma: float = 0.1,
    solver: Solver = "auto",
    cg_steps: int = 50,
    seed: int | None = 0,
) -> torch.Tensor:
    """qPGD2 at budget ``eps`` (L2): from the clean input, ``step_size`` (default 2.5 eps / steps)
    along the normalised smoothed gradient, projected onto the ball and [0, 1]. Per sample the
    best point of all steps (adversarial first, then the lowest loss). ``seed``: the generator of
    the random direction that replaces a zero gradient (as PGD's)."""
    check_inputs(inputs, labels, "qpgd_l2")
    check_positive("qpgd_l2", eps=eps)
    _check_qpgd("qpgd_l2", steps)
    alpha_step = 2.5 * eps / steps if step_size is None else step_size
    check_positive("qpgd_l2", step_size=alpha_step)
    smooth = _smoother(inputs, alpha, sigma, solver, cg_steps)
    n, dev = len(inputs), inputs.device
    out, _ = _qpgd_run(model, inputs, labels, targeted, torch.full((n,), float(eps), device=dev), steps,
                       torch.full((n,), float(alpha_step), device=dev), smooth, generator_for(dev, seed))
    return out


def qpgd2(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    search_steps: int = 6,
    steps: int = 20,
    init_eps: float = 1.0,
    max_eps: float = 8.0,
    alpha: float = 0.95,
    sigma: float = 0.1,
    solver: Solver = "auto",
    cg_steps: int = 50,
    seed: int | None = 0,
) -> torch.Tensor:
    """qPGD2 as a minimal attack: ``search_steps`` runs of :func:`qpgd_l2` (``steps`` each), the
    budget of each sample doubled from ``init_eps`` (at most ``max_eps``) until a first success,
    then bisected between the largest failing and the smallest succeeding budget. Returns the
    least-distorted adversarial point found, else the clean input."""
    check_inputs(inputs, labels, "qpgd2")
    check_positive("qpgd2", init_eps=init_eps, max_eps=max_eps)
    _check_qpgd("qpgd2", steps)
    if search_steps < 1:
        raise InputError(f"qpgd2: search_steps must be >= 1, got {search_steps}")
    smooth = _smoother(inputs, alpha, sigma, solver, cg_steps)
    n, dev = len(inputs), inputs.device
    lo = torch.zeros(n, device=dev)
    hi = torch.full((n,), float("inf"), device=dev)
    eps = torch.full((n,), float(min(init_eps, max_eps)), device=dev)
    best = inputs.clone()
    best_l2 = torch.full((n,), float("inf"), device=dev)
    gen = generator_for(dev, seed)  # a zero gradient becomes a random direction from it
    for _ in range(search_steps):
        out, adv = _qpgd_run(model, inputs, labels, targeted, eps, steps, 2.5 * eps / steps, smooth, gen)
        d = l2(out - inputs)
        better = adv & (d < best_l2)
        best[better], best_l2[better] = out[better], d[better]
        hi = torch.where(adv, torch.minimum(hi, eps), hi)
        lo = torch.where(adv, lo, torch.maximum(lo, eps))
        eps = torch.where(torch.isfinite(hi), (lo + hi) / 2, torch.clamp(eps * 2, max=max_eps))
    return best
