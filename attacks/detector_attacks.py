"""Attacks on a classifier guarded by a detector: orthogonal PGD and a combined-loss sweep.

Both take the detector-aware attack model of ``advshield.attacks.adaptive`` (its ``classifier``,
BPDA ``defend`` and differentiable ``detector`` score with ``threshold``) and treat the two
objectives separately instead of through the merged "flagged" logit: the classifier loss is on the
classifier's own logits (through the defenses, EOT-averaged), the detector loss is score - t.

* :func:`opgd`, orthogonal PGD (Bryniarski, Hingun, Kirichenko, Shmatikov, "Evading Adversarial
  Example Detection Defenses with Orthogonal Projected Gradient Descent", ICLR 2022, section 4):
  where the current point is still classified correctly, step along the classifier-loss gradient
  with its component along the detector-loss gradient removed (misclassify without raising the
  score; only where the point is flagged, see ``slack``); where it is misclassified, step along
  the detector-loss gradient orthogonal to the classifier-loss gradient (lower the score without
  undoing the misclassification).
* :func:`detector_sweep`: PGD on classifier loss + lambda * relu(score - t + margin) for each
  lambda of a small sweep, each on the samples no earlier lambda broke.

Every point visited is scored as the audit will score it: rounded to ``levels`` grey levels (the
audit's own rounding, ``attacks.threat.check_adversarial``) before its logits and score are
computed, so gradients are taken at the rounded point (straight through the rounding) and a kept
success stays one after the audit rounds it (measured: the twin's verdict and the serving path's
agree on every returned example). Per sample the attacks return the first success (misclassified
and unflagged; the sample then leaves the run), else the point of largest quality
q = min(probability margin, t - s), the closest to being both misclassified and unflagged.

Without a detector (``model.detector`` absent or None) both attacks are plain :func:`pgd` with the
same budget, steps, loss and seed: registered in the audit's cascade for every pipeline, they cost
one more PGD where there is nothing to evade.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# the per-norm pieces and the budget checks of the one gradient loop
from advshield.attacks.gradient import _project, _random_start, _step, pgd
from advshield.attacks.gradient import _validate as _validate_budget
from advshield.attacks.primitives import (
    Counted,
    LossName,
    Model,
    Norm,
    attack_loss,
    bview,
    check_positive,
    generator_for,
    is_adversarial,
    margin,
)
from advshield.attacks.threat import ThreatModel, check_adversarial
from advshield.core.errors import InputError

Logits = Callable[[torch.Tensor], torch.Tensor]
Losses = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]  # (logits, score, labels)


# --- geometry -------------------------------------------------------------------------------------

def orthogonal(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per sample, the component of ``g`` orthogonal to ``h``: g - (<g, h> / <h, h>) h (``g`` where
    h = 0)."""
    gf, hf = g.flatten(1), h.flatten(1)
    hh = (hf * hf).sum(1)
    coef = torch.where(hh > 0, (gf * hf).sum(1) / hh.clamp_min(torch.finfo(hh.dtype).tiny), torch.zeros_like(hh))
    return g - bview(coef, g) * h


# --- the two objectives of a detector-aware model ------------------------------------------------

@dataclass(frozen=True)
class Objectives:
    """The classifier (through the defenses) and the detector score of a detector-aware model,
    separately; ``draws`` forward passes are averaged (EOT)."""

    logits: Logits  # x -> classifier logits [N, K], no flagged logit
    score: Logits  # x -> detector score [N]
    threshold: float
    draws: int
    counter: Any  # where forwards / gradients are counted


def objectives(model: Model) -> Objectives | None:
    """The two objectives of ``model`` (an ``AttackModel``, possibly inside a ``Counted``), or None
    when it has no detector."""
    inner: Any = model.model if isinstance(model, Counted) else model
    detector = getattr(inner, "detector", None)
    if detector is None:
        return None
    # ``classify``: the classifier on defended images (a split one with its feature-layer steps)
    classify, defend = getattr(inner, "classify", inner.classifier), inner.defend
    return Objectives(lambda x: classify(defend(x)), detector, float(inner.threshold),
                      int(getattr(inner, "eot_samples", 1)), model)


def _count(counter: Any, forwards: int, gradients: int) -> None:
    if hasattr(counter, "forwards"):
        counter.forwards += forwards
    if hasattr(counter, "gradients"):
        counter.gradients += gradients


def _evaluate(
    obj: Objectives, x: torch.Tensor, labels: torch.Tensor, losses: Losses,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """EOT-averaged classifier logits [N, K], detector score [N] and the gradients w.r.t. ``x`` of
    each per-sample loss ``losses(logits, score, labels)`` returns (one backward pass each, counted)."""
    zs, ss, gs = [], [], []
    n_losses = 0
    for _ in range(obj.draws):
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = obj.logits(xi)
            s = obj.score(xi).reshape(-1).to(z.dtype)
            parts = list(losses(z, s, labels))
            n_losses = len(parts)
            grads = [torch.autograd.grad(p.sum(), xi, retain_graph=k + 1 < n_losses)[0] for k, p in enumerate(parts)]
        zs.append(z.detach())
        ss.append(s.detach())
        gs.append(grads)
    _count(obj.counter, obj.draws * len(x), obj.draws * n_losses * len(x))
    mean = [torch.stack([g[k] for g in gs]).mean(0) for k in range(n_losses)]
    return torch.stack(zs).mean(0), torch.stack(ss).mean(0), mean


class _Best:
    """Per sample, the best point so far: a success (misclassified and unflagged) before a failure,
    then the larger quality min(probability margin, t - score)."""

    def __init__(self, inputs: torch.Tensor) -> None:
        n = len(inputs)
        self.x = inputs.clone()
        self.ok = torch.zeros(n, dtype=torch.bool, device=inputs.device)
        self.q = torch.full((n,), float("-inf"), device=inputs.device)

    def offer(self, idx: torch.Tensor, x: torch.Tensor, z: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
              targeted: bool, threshold: float) -> torch.Tensor:
        """Offer the points ``x`` of samples ``idx`` (logits ``z``, score ``s``); returns their success."""
        ok = is_adversarial(z, y, targeted) & (s <= threshold)
        q = torch.minimum(-margin(torch.softmax(z, 1), y, targeted), threshold - s)
        better = (ok & ~self.ok[idx]) | ((ok == self.ok[idx]) & (q > self.q[idx]))
        j = idx[better]
        self.x[j], self.ok[j], self.q[j] = x[better], ok[better], q[better]
        return ok


def _on_grid(inputs: torch.Tensor, x: torch.Tensor, eps: float, norm: str, levels: int) -> torch.Tensor:
    """``x`` as the audit will score it: rounded to ``levels`` grey levels within the budget."""
    if not levels:
        return x
    return check_adversarial(inputs, x, ThreatModel(norm, eps, levels)).adversarial  # type: ignore[arg-type]


def _validate(attack: str, inputs: torch.Tensor, labels: torch.Tensor, eps: float, norm: str, steps: int,
              levels: int, step_size: float | None) -> float:
    _validate_budget(attack, inputs, labels, eps, norm, steps, 1)
    if levels != 0 and levels < 2:
        raise InputError(f"{attack}: levels must be 0 (no rounding) or >= 2, got {levels}")
    alpha = eps / 10 if step_size is None else step_size
    check_positive(attack, step_size=alpha)
    return alpha


def _scores(obj: Objectives, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EOT-averaged logits and score without gradient."""
    with torch.no_grad():
        zs = [obj.logits(x) for _ in range(obj.draws)]
        ss = [obj.score(x).reshape(-1).to(zs[0].dtype) for _ in range(obj.draws)]
    _count(obj.counter, obj.draws * len(x), 0)
    return torch.stack(zs).mean(0), torch.stack(ss).mean(0)


def _run(
    obj: Objectives, best: _Best, idx: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor, targeted: bool,
    eps: float, norm: str, steps: int, alpha: float, random_start: bool, levels: int, gen: torch.Generator | None,
    losses: Losses,
    direction: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]], torch.Tensor],
) -> None:
    """One projected descent over the samples ``idx``: ``losses(logits, score, labels)`` gives the
    per-sample losses to differentiate, ``direction(logits, labels, grads)`` the descent direction.
    Every visited point (rounded, see :func:`_on_grid`) is offered to ``best``; a sample leaves the
    run at its first success."""
    x, y = inputs[idx], labels[idx]
    delta = _random_start(x, eps, norm, gen) if random_start else torch.zeros_like(x)
    live = torch.arange(len(idx), device=x.device)
    for k in range(steps + 1):  # the last point is scored without a gradient
        xl, yl = x[live], y[live]
        point = _on_grid(xl, xl + delta[live], eps, norm, levels)
        if k < steps:
            z, s, grads = _evaluate(obj, point, yl, losses)
        else:
            z, s = _scores(obj, point)
        ok = best.offer(idx[live], point, z, s, yl, targeted, obj.threshold)
        if k == steps:
            break
        d = direction(z, s, yl, grads)
        delta[live] = _project(delta[live] - alpha * _step(d, norm, gen), xl, eps, norm)
        live = live[~ok]
        if len(live) == 0:
            break


# --- the attacks ----------------------------------------------------------------------------------

def opgd(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    eps: float,
    norm: Norm = "linf",
    steps: int = 100,
    step_size: float | None = None,
    random_start: bool = True,
    loss: LossName = "margin",
    slack: float = 0.0,
    levels: int = 256,
    seed: int | None = 0,
) -> torch.Tensor:
    """Orthogonal PGD (Bryniarski et al., ICLR 2022) against the model's classifier and detector.

    At each step, per sample: misclassified, descend score - t along its gradient made orthogonal
    to the classifier loss's (``loss`` on the classifier's logits); classified correctly, descend
    the classifier loss, along its gradient made orthogonal to the detector's where the detector
    constraint is active (score > t - ``slack``), along the plain gradient elsewhere. The paper
    projects always (``slack=inf``); protecting a score far below t only slows the attack down
    (measured on the squeeze pipeline, L-inf 0.05, 64 images: 9% robust with slack 0.1, 3% with 0).
    Sign steps (L-inf) or normalised steps (L2) of ``step_size`` (default eps / 10: PGD's
    2.5 eps / steps is too short a walk around the detector), then projection onto the ball and
    [0, 1]. Returns per sample the first success (misclassified and unflagged), else the point of
    largest quality (see the module). Two gradients per image and step (``2 * steps`` at most).

    With the margin loss a classifier gradient parallel to the detector's leaves nothing after
    the projection (the nearest wrong class is exactly what the detector sees); the
    cross-entropy's gradient also points to the other classes (``loss='ce'``, weaker on the
    squeeze pipeline). Without a detector: :func:`pgd` with the same arguments (its own default
    step)."""
    obj = objectives(model)
    if obj is None:
        return pgd(model, inputs, labels, targeted=targeted, eps=eps, norm=norm, steps=steps, step_size=step_size,
                   random_start=random_start, restarts=1, loss=loss, seed=seed)
    alpha = _validate("opgd", inputs, labels, eps, norm, steps, levels, step_size)
    t = obj.threshold

    def losses(z: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attack_loss(z, y, targeted, loss), s - t

    def direction(z: torch.Tensor, s: torch.Tensor, y: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
        gc, gd = grads
        adv = bview(is_adversarial(z, y, targeted), gc)
        guard = bview(s > t - slack, gc)  # the detector constraint is (nearly) active: protect it
        return torch.where(adv, orthogonal(gd, gc), torch.where(guard, orthogonal(gc, gd), gc))

    best = _Best(inputs)
    idx = torch.arange(len(inputs), device=inputs.device)
    _run(obj, best, idx, inputs, labels, targeted, eps, norm, steps, alpha, random_start, levels,
         generator_for(inputs.device, seed), losses, direction)
    return best.x


def detector_sweep(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    eps: float,
    norm: Norm = "linf",
    steps: int = 50,
    lambdas: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
    loss: LossName = "margin",
    confidence: float = 1.0,
    score_margin: float = 0.05,
    step_size: float | None = None,
    random_start: bool = True,
    levels: int = 256,
    seed: int | None = 0,
) -> torch.Tensor:
    """PGD on classifier loss + lambda * relu(score - t + ``score_margin``), one run of ``steps``
    per lambda in ``lambdas`` (in order, each from a new random start), each on the samples no
    earlier run broke. The classifier loss is the logit margin clamped at -``confidence``
    (``loss='margin'``: once misclassified by that much only the detector term pulls) or the
    cross-entropy (``'ce'``). Steps as in :func:`opgd` (default eps / 10). Returns per sample
    the first success (misclassified and unflagged), else the point of largest quality over all
    runs (see the module). ``steps * len(lambdas)`` gradients per image at most. Without a
    detector: :func:`pgd` with ``restarts = len(lambdas)`` (its own default step)."""
    lams = [float(v) for v in lambdas]
    if not lams or any(not v >= 0 for v in lams):
        raise InputError(f"detector_sweep: lambdas must be a non-empty list of weights >= 0, got {list(lambdas)}")
    if not confidence >= 0 or not score_margin >= 0:
        raise InputError(f"detector_sweep: confidence and score_margin must be >= 0, got {confidence}, {score_margin}")
    obj = objectives(model)
    if obj is None:
        return pgd(model, inputs, labels, targeted=targeted, eps=eps, norm=norm, steps=steps, step_size=step_size,
                   random_start=random_start, restarts=len(lams), loss=loss, seed=seed)
    alpha = _validate("detector_sweep", inputs, labels, eps, norm, steps, levels, step_size)
    t = obj.threshold
    gen = generator_for(inputs.device, seed)
    best = _Best(inputs)
    for lam in lams:
        idx = (~best.ok).nonzero().squeeze(1)
        if len(idx) == 0:
            break

        def losses(z: torch.Tensor, s: torch.Tensor, y: torch.Tensor, lam: float = lam) -> tuple[torch.Tensor]:
            c = attack_loss(z, y, targeted, loss)
            if loss == "margin":
                c = c.clamp_min(-confidence)
            return (c + lam * torch.relu(s - t + score_margin),)

        _run(obj, best, idx, inputs, labels, targeted, eps, norm, steps, alpha, random_start, levels, gen,
             losses, lambda z, s, y, grads: grads[0])
    return best.x
