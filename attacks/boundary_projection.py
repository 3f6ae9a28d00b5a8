"""Boundary Projection (Zhang, Avrithis, Furon, Amsaleg; thesis ch. 5, Algorithms 1 and 2).

K iterations, gamma_i = gamma_min + i / (K + 1) * (1 - gamma_min), g = normalised gradient of the
attack loss L (minimised; default: the logit margin, whose zero set is the decision boundary):

* Stage 1 (Algorithm 1), until the first adversarial iterate: y <- Q(y - alpha * gamma_i * g).
* Stage 2 (Algorithm 2), with r = y - x and rho = <r, g>:
  - OUT (y adversarial): eps = gamma_i ||r||; z is the point of the tangent hyperplane
    {v : <v - y, g> = 0} at distance eps from x closest to y (eq. 5.4), or the projection
    v* = x + rho g of x onto that hyperplane when eps <= |rho|; y <- Q_OUT(z, y): the step scaled
    by the beta whose rounded result has the distortion closest to ||z - x|| (line search, eq. 5.7).
  - IN (y not adversarial): eps = ||r|| / gamma_i; z = y - (rho + sqrt(eps^2 - ||r||^2 + rho^2)) g
    lies on the sphere S[x, eps] along -g (eq. 5.9); y <- Q(y + beta_IN (z - y)) with
    beta_IN = max(1, beta_min / ||z - y||) so rounding cannot cancel the step (eq. 5.10).

Q clips to [0, 1] and rounds to ``levels`` grey levels (``levels=None``: clipping only, no line
search). Algorithm 1 writes only the clipping; rounding Stage 1 too keeps every iterate, hence the
returned one, on the grid (Table 5.1: quantizing at each iteration is what matters). The output is
the least-distorted adversarial iterate. Defaults alpha = 2, gamma_min = 0.7 (section 5.3.2).
"""

from __future__ import annotations

from typing import Literal

import torch

from advshield.attacks.primitives import (
    LossName,
    Model,
    bview,
    check_inputs,
    check_positive,
    generator_for,
    is_adversarial,
    l2,
    normalize,
    predict,
    quantize,
    value_and_grad,
)
from advshield.core.errors import InputError

# scales tried by the Q_OUT line search: rounding mostly shrinks small steps, so mostly beta > 1
BETAS: tuple[float, ...] = (0.5, 0.7, 0.85, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.0)


def _q(x: torch.Tensor, levels: int | None) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return x if levels is None else quantize(x, levels)


def _unit_or_zero(v: torch.Tensor) -> torch.Tensor:
    n = l2(v)
    return v / bview(n.clamp_min(1e-12), v) * bview((n > 1e-12).to(v.dtype), v)


def q_out(z: torch.Tensor, y: torch.Tensor, x: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Q_OUT (eq. 5.7): Q(y + beta (z - y)) for the beta of ``BETAS`` whose distortion
    ||Q(...) - x|| is closest to ||z - x|| (ties: the smallest beta)."""
    if levels is None:
        return _q(z, None)
    target = l2(z - x)
    step = z - y
    best = _q(z, levels)
    best_err = (l2(best - x) - target).abs()
    for beta in BETAS:
        cand = _q(y + beta * step, levels)
        err = (l2(cand - x) - target).abs()
        better = err < best_err - 1e-9
        best = torch.where(bview(better, best), cand, best)
        best_err = torch.where(better, err, best_err)
    return best


def q_in(z: torch.Tensor, y: torch.Tensor, levels: int | None, beta_min: float) -> torch.Tensor:
    """Q_IN (eq. 5.10): Q(y + beta_IN (z - y)), beta_IN = max(1, beta_min / ||z - y||)."""
    step = z - y
    beta = torch.clamp(beta_min / l2(step).clamp_min(1e-12), min=1.0)
    return _q(y + bview(beta, step) * step, levels)


def bp(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    steps: int = 100,
    alpha: float = 2.0,
    gamma_min: float = 0.7,
    levels: int | None = 256,
    beta_min: float = 0.1,
    loss: LossName = "margin",
    out_fallback: Literal["project", "shrink"] = "project",
    seed: int | None = 0,
) -> torch.Tensor:
    """Minimal attack: the least-distorted adversarial iterate, else the clean input.

    ``out_fallback``: what OUT does when the sphere S[x, eps] misses the tangent hyperplane
    (eps <= |rho|). 'project' is the thesis (relax the distortion: z = v*); 'shrink' relaxes the
    hyperplane instead and takes the point of S[x, eps] closest to y, x + eps r / ||r||. They
    differ where r and g are nearly collinear, e.g. on a two-class linear model after Stage 1:
    there v* = y and 'project' cannot move, so thesis BP returns its first adversarial iterate.
    On the CNNs of ``benchmarks/attacks.py`` 'project' is as good or better."""
    check_inputs(inputs, labels, "bp")
    check_positive("bp", alpha=alpha, beta_min=beta_min)
    if steps < 1 or not 0 < gamma_min < 1 or (levels is not None and levels < 2):
        raise InputError(f"bp: need steps >= 1, 0 < gamma_min < 1, levels >= 2 or None; got {steps}, {gamma_min}, {levels}")
    if out_fallback not in ("project", "shrink"):
        raise InputError(f"bp: out_fallback must be 'project' or 'shrink', got {out_fallback!r}")
    n, dev = len(inputs), inputs.device
    gen = generator_for(dev, seed)
    y = inputs.clone()
    stage2 = torch.zeros(n, dtype=torch.bool, device=dev)  # has been adversarial once
    best = inputs.clone()
    best_l2 = torch.full((n,), float("inf"), device=dev)

    def keep(y: torch.Tensor, adv: torch.Tensor) -> None:
        d = l2(y - inputs)
        better = adv & (d < best_l2)
        best[better] = y[better]
        best_l2[better] = d[better]

    for i in range(steps):
        gamma = gamma_min + i / (steps + 1) * (1 - gamma_min)
        _, grad, z = value_and_grad(model, y, labels, targeted, loss)
        adv = is_adversarial(z, labels, targeted)
        keep(y, adv)
        stage2 |= adv
        g = normalize(grad, gen)
        r = y - inputs
        rn = l2(r)
        rho = (r * g).flatten(1).sum(1)
        # Stage 1 (Algorithm 1, line 4)
        y1 = _q(y - alpha * gamma * g, levels)
        # Stage 2, OUT (Algorithm 2, lines 6-9)
        eps_out = gamma * rn
        v = inputs + bview(rho, g) * g
        z_out = v + _unit_or_zero(y - v) * bview(torch.sqrt((eps_out**2 - rho**2).clamp_min(0)), g)
        if out_fallback == "shrink":
            miss = eps_out <= rho.abs()
            z_out = torch.where(bview(miss, y), inputs + _unit_or_zero(r) * bview(eps_out, r), z_out)
        # Stage 2, IN (lines 11-13)
        eps_in = rn / gamma
        t = rho + torch.sqrt((eps_in**2 - rn**2 + rho**2).clamp_min(0))
        z_in = y - bview(t, g) * g
        out = stage2 & adv
        into = stage2 & ~adv & (rn > 0)  # rounding may have cancelled r: then Stage 1 again
        y_next = y1
        if bool(out.any()):
            y_next = torch.where(bview(out, y), q_out(z_out, y, inputs, levels), y_next)
        if bool(into.any()):
            y_next = torch.where(bview(into, y), q_in(z_in, y, levels, beta_min), y_next)
        y = y_next
    keep(y, is_adversarial(predict(model, y, labels, targeted), labels, targeted))
    return best
