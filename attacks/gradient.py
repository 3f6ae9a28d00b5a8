"""Budget attacks: FGSM, I-FGSM/BIM, PGD and APGD (L-inf and L2) as one gradient loop.

The loop is: start (clean or random in the ball), gradient of the attack loss, a step for the
norm, projection onto the eps-ball and onto [0, 1]. The per-norm pieces are three small
functions; FGSM is one step of size eps from the clean input, BIM is PGD without random start.
Every point the loop visits is a candidate: per sample the attack returns the best one
(adversarial before not adversarial, then the lowest attack loss), never just the last iterate.
Restarts re-run the loop (new random start) on the samples not yet adversarial.

APGD (Croce & Hein, ICML 2020, Algorithm 1) is the same loop with a momentum step and a step
size that starts at 2 eps and halves at the checkpoints of :func:`checkpoints` when the loss
stalls, restarting from the best point; APGD-T (:func:`apgd_t`) runs it once per target class
with the targeted DLR loss. The losses are minimised here (the paper maximises their negatives).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from functools import partial
from typing import Literal

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
    margin,
    normalize,
    predict,
    value_and_grad,
)
from advshield.core.errors import InputError

ApgdLoss = Literal["ce", "dlr", "margin"]
LossFn = Callable[[torch.Tensor], torch.Tensor]  # decision logits [N, K] -> per-sample loss [N]
APGD_LOSSES: tuple[str, ...] = ("ce", "dlr", "margin")


def _step(g: torch.Tensor, norm: str, gen: torch.Generator | None = None) -> torch.Tensor:
    """Steepest-ascent direction of unit norm: sign for L-inf, normalised gradient for L2."""
    return g.sign() if norm == "linf" else normalize(g, gen)


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


def _improves(loss: torch.Tensor, adv: torch.Tensor, best_loss: torch.Tensor, best_adv: torch.Tensor) -> torch.Tensor:
    """Where a candidate beats the best so far: adversarial beats not adversarial, then lower loss."""
    return (adv & ~best_adv) | ((adv == best_adv) & (loss < best_loss))


def _validate(attack: str, inputs: torch.Tensor, labels: torch.Tensor, eps: float, norm: str,
              steps: int, restarts: int) -> None:
    check_inputs(inputs, labels, attack)
    check_norm(attack, norm)
    check_positive(attack, eps=eps)
    if steps < 1 or restarts < 1:
        raise InputError(f"{attack}: steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")


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

    ``step_size`` defaults to 2.5 * eps / steps (Madry et al.). Returns, per sample, the best
    point of all steps and restarts: an adversarial point found at any step is kept (the one with
    the lowest loss), else the lowest-loss point. The clean input itself (no random start) is not
    a candidate: FGSM always returns its step."""
    _validate("pgd", inputs, labels, eps, norm, steps, restarts)
    alpha = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    check_positive("pgd", step_size=alpha)
    gen = generator_for(inputs.device, seed)
    best = inputs.clone()
    best_loss = torch.full((len(inputs),), float("inf"), device=inputs.device)
    best_adv = torch.zeros(len(inputs), dtype=torch.bool, device=inputs.device)
    for _ in range(restarts):
        idx = (~best_adv).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x, y = inputs[idx], labels[idx]
        delta = _random_start(x, eps, norm, gen) if random_start else torch.zeros_like(x)
        for k in range(steps + 1):  # the last point is scored without a gradient
            if k < steps:
                f, g, z = value_and_grad(model, x + delta, y, targeted, loss)
            else:
                z = predict(model, x + delta, y, targeted)
                f = attack_loss(z, y, targeted, loss)
            if random_start or k > 0:
                adv = is_adversarial(z, y, targeted)
                better = _improves(f, adv, best_loss[idx], best_adv[idx])
                best[idx[better]] = (x + delta)[better]
                best_loss[idx[better]] = f[better]
                best_adv[idx[better]] = adv[better]
            if k < steps:
                delta = _project(delta - alpha * _step(g, norm, gen), x, eps, norm)
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


# --- APGD ----------------------------------------------------------------------------------------

def checkpoints(steps: int) -> tuple[int, ...]:
    """APGD's checkpoints w_j = ceil(p_j * steps) <= steps, p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (exact fractions: 0.22 * 100 is 22, not 23)."""
    ps = [Fraction(0), Fraction(22, 100)]
    while ps[-1] <= 1:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - Fraction(3, 100), Fraction(6, 100)))
    ws = sorted({math.ceil(p * steps) for p in ps})
    return tuple(w for w in ws if w <= steps)


def _sorted_logits(logits: torch.Tensor, need: int, what: str) -> torch.Tensor:
    if logits.shape[1] < need:
        raise InputError(f"{what} needs at least {need} classes, the model has {logits.shape[1]}")
    return logits.sort(1, descending=True).values


def dlr(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020, eq. 3), as a loss to minimise: the logit
    margin over the spread of the sorted logits z_pi1 >= z_pi2 >= ...: untargeted
    (z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12). Targeted towards ``labels`` (the true class
    unknown): (max_{i!=t} z_i - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12). Invariant to shifts
    and positive scalings of the logits."""
    s = _sorted_logits(logits, 4 if targeted else 3, "the targeted DLR loss" if targeted else "the DLR loss")
    scale = s[:, 0] - (s[:, 2] + s[:, 3]) / 2 if targeted else s[:, 0] - s[:, 2]
    return margin(logits, labels, targeted) / (scale + 1e-12)


def dlr_targeted(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """APGD-T's loss, to minimise: (z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)."""
    s = _sorted_logits(logits, 4, "the targeted DLR loss")
    own = logits.gather(1, labels[:, None]).squeeze(1)
    tz = logits.gather(1, target[:, None]).squeeze(1)
    return (own - tz) / (s[:, 0] - (s[:, 2] + s[:, 3]) / 2 + 1e-12)


def _apgd_loss(name: str, labels: torch.Tensor, targeted: bool) -> LossFn:
    if name == "dlr":
        return partial(dlr, labels=labels, targeted=targeted)
    return partial(attack_loss, labels=labels, targeted=targeted, loss=name)


def _apgd_run(
    model: Model, x: torch.Tensor, y: torch.Tensor, lossf: LossFn, targeted: bool,
    eps: float, norm: str, steps: int, rho: float, momentum: float, gen: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from a random start: the best point (adversarial first, then lowest loss),
    its loss, whether it is adversarial, and its decision logits. ``steps`` gradients per sample:
    x^(0) ... x^(steps-1); x^(steps) is scored without one."""
    n = len(x)
    ws = set(checkpoints(steps)[1:])
    delta = _random_start(x, eps, norm, gen)
    f, g, z = value_and_grad(model, x + delta, y, targeted, lossf)
    best, best_f, best_adv, best_z = delta, f, is_adversarial(z, y, targeted), z
    top, top_f, top_g = delta, f, g  # x_max (the lowest loss: where a halving restarts), its gradient
    top_f_at_w, reduced = f, torch.zeros(n, dtype=torch.bool, device=x.device)
    decreases = torch.zeros(n, device=x.device)
    eta = torch.full((n,), 2.0 * eps, device=x.device)
    prev, last_w = delta, 0
    for k in range(steps):  # x^(k) and its loss f, gradient g are known: checkpoint, then step
        if k in ws:
            # condition 1: fewer than rho * (w_j - w_{j-1}) of the steps since w_{j-1} lowered the
            # loss; condition 2: the step was not halved at w_{j-1} and the best loss did not improve
            halve = (decreases < rho * (k - last_w)) | (~reduced & (top_f >= top_f_at_w))
            h = bview(halve, x)
            eta = torch.where(halve, eta / 2, eta)
            delta, g, f = torch.where(h, top, delta), torch.where(h, top_g, g), torch.where(halve, top_f, f)
            reduced, top_f_at_w, last_w = halve, top_f, k
            decreases = torch.zeros_like(decreases)
        a = 1.0 if k == 0 else momentum
        zk = _project(delta - bview(eta, x) * _step(g, norm, gen), x, eps, norm)
        prev, delta = delta, _project(delta + a * (zk - delta) + (1 - a) * (delta - prev), x, eps, norm)
        if k + 1 < steps:
            f_new, g, z = value_and_grad(model, x + delta, y, targeted, lossf)
        else:  # the last iterate needs no gradient
            z = predict(model, x + delta, y, targeted)
            f_new = lossf(z)
        adv = is_adversarial(z, y, targeted)
        decreases += (f_new < f).float()
        f = f_new
        better = _improves(f, adv, best_f, best_adv)
        best, best_f = torch.where(bview(better, x), delta, best), torch.where(better, f, best_f)
        best_adv, best_z = torch.where(better, adv, best_adv), torch.where(better[:, None], z, best_z)
        up = f < top_f
        top, top_f, top_g = torch.where(bview(up, x), delta, top), torch.where(up, f, top_f), torch.where(bview(up, x), g, top_g)
    return x + best, best_f, best_adv, best_z


def _validate_apgd(attack: str, rho: float, momentum: float) -> None:
    if not 0 < rho <= 1:
        raise InputError(f"{attack}: rho must be in (0, 1], got {rho}")
    if not 0 < momentum <= 1:
        raise InputError(f"{attack}: momentum must be in (0, 1], got {momentum}")


def apgd(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    eps: float,
    norm: Norm = "linf",
    steps: int = 100,
    restarts: int = 1,
    loss: ApgdLoss = "ce",
    rho: float = 0.75,
    momentum: float = 0.75,
    seed: int | None = 0,
) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020): momentum 0.75, step 2 eps halved at :func:`checkpoints`
    when fewer than ``rho`` of the steps since the last one lowered the loss, or when the step
    was not halved there and the best loss did not improve (then the run restarts from its
    best point). ``loss``: 'ce' (APGD-CE), 'dlr' (APGD-DLR) or 'margin'.

    Samples adversarial at the clean input are returned unchanged; each restart (a new random
    start from ``seed``'s generator) runs on the samples not yet adversarial. Per sample: the
    adversarial point with the lowest loss over all iterates and restarts, else the lowest-loss
    point. At most ``steps * restarts`` gradients per image."""
    _validate("apgd", inputs, labels, eps, norm, steps, restarts)
    _validate_apgd("apgd", rho, momentum)
    if loss not in APGD_LOSSES:
        raise InputError(f"apgd: loss must be one of {APGD_LOSSES}, got {loss!r}")
    gen = generator_for(inputs.device, seed)
    z0 = predict(model, inputs, labels, targeted)
    best = inputs.clone()
    best_adv = is_adversarial(z0, labels, targeted)
    best_loss = torch.where(best_adv, _apgd_loss(loss, labels, targeted)(z0), float("inf"))
    for _ in range(restarts):
        idx = (~best_adv).nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x, y = inputs[idx], labels[idx]
        out, f, adv, _ = _apgd_run(model, x, y, _apgd_loss(loss, y, targeted), targeted, eps, norm,
                                   steps, rho, momentum, gen)
        better = _improves(f, adv, best_loss[idx], best_adv[idx])
        best[idx[better]], best_loss[idx[better]], best_adv[idx[better]] = out[better], f[better], adv[better]
    return best


def apgd_t(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    eps: float,
    norm: Norm = "linf",
    steps: int = 100,
    restarts: int = 1,
    top_k: int = 9,
    rho: float = 0.75,
    momentum: float = 0.75,
    seed: int | None = 0,
) -> torch.Tensor:
    """APGD-T (Croce & Hein 2020): an untargeted attack made of targeted APGD runs with the
    targeted DLR loss, one per class among the ``top_k`` highest clean logits other than the true
    class (fewer when the model has fewer classes), ``restarts`` each, in that order, each on the
    samples still robust. Per sample: the first success (its best iterate), else the point with
    the smallest untargeted logit margin over all runs. At most ``steps * restarts * top_k``
    gradients per image. For a given target, use ``apgd(..., targeted=True)``."""
    if targeted:
        raise InputError("apgd_t: an untargeted attack that picks its own targets; for given targets use apgd(targeted=True)")
    _validate("apgd_t", inputs, labels, eps, norm, steps, restarts)
    _validate_apgd("apgd_t", rho, momentum)
    if top_k < 1:
        raise InputError(f"apgd_t: top_k must be >= 1, got {top_k}")
    gen = generator_for(inputs.device, seed)
    z0 = predict(model, inputs, labels, False)
    _sorted_logits(z0, 4, "apgd_t (targeted DLR loss)")
    k = min(top_k, z0.shape[1] - 1)
    ranked = z0.scatter(1, labels[:, None], float("-inf")).argsort(1, descending=True)[:, :k]
    best = inputs.clone()
    best_adv = is_adversarial(z0, labels, False)
    best_margin = torch.where(best_adv, margin(z0, labels, False), float("inf"))
    for rank in range(k):
        for _ in range(restarts):
            idx = (~best_adv).nonzero().squeeze(1)
            if len(idx) == 0:
                return best
            x, y = inputs[idx], labels[idx]
            lossf = partial(dlr_targeted, labels=y, target=ranked[idx, rank])
            out, _, adv, z = _apgd_run(model, x, y, lossf, False, eps, norm, steps, rho, momentum, gen)
            m = margin(z, y, False)
            better = _improves(m, adv, best_margin[idx], best_adv[idx])
            best[idx[better]], best_margin[idx[better]], best_adv[idx[better]] = out[better], m[better], adv[better]
    return best
