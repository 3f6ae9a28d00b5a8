"""HopSkipJump (Chen, Jordan and Wainwright, IEEE S&P 2020): a decision-based black-box minimal
attack, L2 and L-inf. It sees only whether an answer is adversarial (``Oracle.adversarial``:
misclassified, not rejected, not flagged), never a score.

Per image, from an adversarial start (blended uniform noise):

1. binary search between the clean image and the current point to the decision boundary
   (L2: blend; L-inf: clip to a shrinking box), to the paper's threshold theta
   (L2: gamma / d^1.5, L-inf: gamma / d^2, d = pixels x channels);
2. estimate the boundary's normal at that point by Monte Carlo over ``sqrt(t) x init_evals``
   random unit directions (Gaussian for L2, uniform for L-inf; at most ``max_evals``) of radius
   ``d x theta x distance`` (L2: ``sqrt(d) x theta x distance``), baseline-corrected decisions;
3. a geometric step along the estimate (L-inf: its sign) of size distance / sqrt(t), halved until
   the point is adversarial; then back to 1.

All images advance together and their queries travel in shared batches. The best (smallest)
boundary point found is returned, rounded to the ``levels`` grid; where the rounded point is not
adversarial, it is pushed away from the clean image by growing factors until it is (a few
queries). ``queries`` bounds the images sent per sample, the start and the final check included.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from advshield.attacks.oracle import Oracle
from advshield.attacks.primitives import Norm, l2, linf
from advshield.core.errors import InputError
from advshield.core.validation import check

_POINTS = 8192  # random directions generated (and sent) per round of the gradient estimate
_PUSH = (1.02, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0)  # final pushes off the boundary after rounding


def _dist(d: torch.Tensor, norm: Norm) -> torch.Tensor:
    return linf(d) if norm == "linf" else l2(d)


def _project(x: torch.Tensor, adv: torch.Tensor, alpha: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The point at ``alpha`` in [0, 1] between ``x`` (0) and ``adv`` (1): a blend (L2), or ``adv``
    clipped to the L-inf box of radius alpha x ||adv - x||_inf (L-inf)."""
    a = alpha.view(-1, 1, 1, 1)
    if norm == "l2":
        return (1 - a) * x + a * adv
    r = a * linf(adv - x).view(-1, 1, 1, 1)
    return torch.minimum(torch.maximum(adv, x - r), x + r)


class _Budget:
    """Per-sample queries left; a query is refused (not sent) for a sample with none left."""

    def __init__(self, oracle: Oracle, y: torch.Tensor, queries: int) -> None:
        self.oracle, self.y = oracle, y
        self.left = np.full(len(y), queries, np.int64)

    def decide(self, x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Whether each query is adversarial (rows: its sample); rows without budget get False
        and are not sent."""
        rows = np.asarray(rows, np.int64)
        ok = np.zeros(len(rows), bool)
        # the first `left` queries of each sample are allowed
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        first = np.searchsorted(sorted_rows, sorted_rows, side="left")
        rank = np.arange(len(rows)) - first
        ok[order] = rank < self.left[sorted_rows]
        out = torch.zeros(len(rows), dtype=torch.bool, device=x.device)
        if ok.any():
            sel = np.flatnonzero(ok)
            ans = self.oracle(x[torch.from_numpy(sel).to(x.device)], rows[sel])
            out[torch.from_numpy(sel).to(x.device)] = self.oracle.adversarial(ans, self.y[torch.from_numpy(rows[sel]).to(x.device)])
            np.add.at(self.left, rows[sel], -1)
        return out


def _boundary(x: torch.Tensor, adv: torch.Tensor, budget: _Budget, rows: np.ndarray, norm: Norm,
              theta: float) -> torch.Tensor:
    """Binary search from ``adv`` (adversarial) towards ``x``: the adversarial end of the last bracket."""
    n = len(x)
    lo = torch.zeros(n, device=x.device)
    hi = torch.ones(n, device=x.device)
    d = _dist(adv - x, norm).clamp_min(1e-12)
    # stop when the bracket is below theta (L2: absolute in blend x distance; L-inf: relative)
    tol = (theta / d) if norm == "l2" else torch.full_like(d, theta)
    tol = tol.clamp_min(1e-7)
    for _ in range(64):
        can = torch.from_numpy(budget.left[rows] > 0).to(x.device)  # one query each this round
        i = torch.nonzero(((hi - lo) > tol) & can).view(-1)
        if len(i) == 0:
            break
        mid = (lo[i] + hi[i]) / 2
        ok = budget.decide(_project(x[i], adv[i], mid, norm), rows[i.cpu().numpy()])
        hi[i] = torch.where(ok, mid, hi[i])
        lo[i] = torch.where(ok, lo[i], mid)
    return _project(x, adv, hi, norm)


def _gradient(xb: torch.Tensor, budget: _Budget, rows: np.ndarray, evals: np.ndarray, radius: torch.Tensor,
              norm: Norm, g: torch.Generator) -> torch.Tensor:
    """Monte Carlo estimate of the boundary normal at each ``xb`` from ``evals[i]`` directions."""
    k = len(xb)
    shape = xb.shape[1:]
    grad = torch.zeros_like(xb)
    start = 0
    while start < k:  # groups of images whose directions fit in one round
        stop, total = start, 0
        while stop < k and (stop == start or total + evals[stop] <= _POINTS):
            total += int(evals[stop])
            stop += 1
        owner = np.repeat(np.arange(start, stop), evals[start:stop])
        if len(owner):
            if norm == "l2":
                u = torch.randn((len(owner), *shape), generator=g)
            else:
                u = torch.rand((len(owner), *shape), generator=g) * 2 - 1
            u = u.to(xb.device)
            u = u / l2(u).clamp_min(1e-12).view(-1, 1, 1, 1)
            o = torch.from_numpy(owner).to(xb.device)
            r = radius[o].view(-1, 1, 1, 1)
            pts = (xb[o] + r * u).clamp(0.0, 1.0)
            u = (pts - xb[o]) / r
            phi = budget.decide(pts, rows[owner]).float() * 2 - 1
            cnt = torch.zeros(k, device=xb.device).index_add_(0, o, torch.ones_like(phi))
            mean = torch.zeros(k, device=xb.device).index_add_(0, o, phi) / cnt.clamp_min(1)
            centred = phi - mean[o]
            # all answers alike: the mean direction, signed (the paper's fallback)
            alike = (mean[o].abs() == 1).view(-1, 1, 1, 1)
            w = torch.where(alike, mean[o].view(-1, 1, 1, 1), centred.view(-1, 1, 1, 1))
            grad.index_add_(0, o, w * u)
        start = stop
    return grad / l2(grad).clamp_min(1e-12).view(-1, 1, 1, 1)


def hop_skip_jump(oracle: Oracle, inputs: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False,
                  norm: Norm = "l2", queries: int = 1000, init_evals: int = 100, max_evals: int = 1000,
                  gamma: float = 1.0, init_tries: int = 50, levels: int = 256, seed: int = 0) -> torch.Tensor:
    """HopSkipJump: the smallest adversarial example found per sample within ``queries`` images
    sent (the clean image where none was found)."""
    if targeted:
        raise InputError("hop_skip_jump: targeted attacks are not supported (the audit runs untargeted ones)")
    check(norm in ("linf", "l2"), f"hop_skip_jump: norm must be 'linf' or 'l2', got {norm!r}")
    check(queries >= 10, f"hop_skip_jump: queries must be >= 10, got {queries}")
    check(1 <= init_evals <= max_evals, f"hop_skip_jump: need 1 <= init_evals <= max_evals, got {init_evals}, {max_evals}")
    check(gamma > 0, f"hop_skip_jump: gamma must be > 0, got {gamma}")
    check(init_tries >= 1, f"hop_skip_jump: init_tries must be >= 1, got {init_tries}")
    if inputs.dim() != 4 or len(inputs) != len(labels):
        raise InputError(f"hop_skip_jump: need inputs [N, C, H, W] and labels [N], got {list(inputs.shape)} "
                         f"and {list(labels.shape)}")
    x = inputs.detach().float()
    y = labels.to(x.device)
    n = len(x)
    d = x[0].numel()
    theta = gamma / (d * math.sqrt(d)) if norm == "l2" else gamma / d**2
    g = torch.Generator().manual_seed(int(seed))
    rows = np.arange(n)
    reserve = 2 + len(_PUSH)  # queries kept for the final rounding check
    budget = _Budget(oracle, y, queries - reserve)

    # start: blended uniform noise that is adversarial
    start = x.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    for _ in range(init_tries):
        todo = torch.nonzero(~found).view(-1)
        if len(todo) == 0:
            break
        noise = torch.rand((len(todo), *x.shape[1:]), generator=g).to(x.device)
        ok = budget.decide(noise, rows[todo.cpu().numpy()])
        start[todo[ok]] = noise[ok]
        found[todo[ok]] = True
    best = x.clone()
    best_d = torch.full((n,), math.inf, device=x.device)
    live = torch.nonzero(found).view(-1)
    if len(live):
        cur = _boundary(x[live], start[live], budget, rows[live.cpu().numpy()], norm, theta)
        xb = start.clone()
        xb[live] = cur
        dist = _dist(xb - x, norm)
        best[live], best_d[live] = xb[live], dist[live]
        for t in range(1, 10**6):
            act = live[torch.from_numpy(budget.left[live.cpu().numpy()] > 0).to(x.device)]
            if len(act) == 0:
                break
            r_np = rows[act.cpu().numpy()]
            evals = np.minimum(min(int(init_evals * math.sqrt(t)), max_evals), budget.left[r_np] // 2).clip(min=1)
            da = dist[act]
            radius = (math.sqrt(d) * theta * da) if norm == "l2" else (d * theta * da)
            if t == 1:
                radius = torch.full_like(da, 0.1)  # the paper's first radius (the distance is not known yet)
            grad = _gradient(xb[act], budget, r_np, evals, radius.clamp_min(1e-6), norm, g)
            step_dir = grad if norm == "l2" else grad.sign()
            size = da / math.sqrt(t)
            moved = xb[act].clone()
            pending = torch.ones(len(act), dtype=torch.bool, device=x.device)
            for _ in range(20):  # geometric step search: halve until adversarial
                i = torch.nonzero(pending).view(-1)
                if len(i) == 0:
                    break
                cand = (xb[act[i]] + size[i].view(-1, 1, 1, 1) * step_dir[i]).clamp(0.0, 1.0)
                ok = budget.decide(cand, r_np[i.cpu().numpy()])
                moved[i[ok]] = cand[ok]
                pending[i[ok]] = False
                size[i[~ok]] /= 2
            nb = _boundary(x[act], moved, budget, r_np, norm, theta)
            xb[act] = nb
            dist[act] = _dist(nb - x[act], norm)
            better = dist[act] < best_d[act]
            best[act[better]], best_d[act[better]] = nb[better], dist[act][better]
    # rounding to the grid can step back over the boundary: check it, push off where needed
    budget.left += reserve
    if not levels:
        return best
    s = levels - 1
    out = x.clone()
    todo = torch.nonzero(torch.isfinite(best_d)).view(-1)
    for f in (1.0, *_PUSH):
        if len(todo) == 0:
            break
        cand = torch.round((x[todo] + f * (best[todo] - x[todo])).clamp(0.0, 1.0) * s) / s
        ok = budget.decide(cand, rows[todo.cpu().numpy()])
        out[todo[ok]] = cand[ok]
        todo = todo[~ok]
    out[todo] = best[todo]  # none of the pushes held: the unrounded point (the audit rounds and judges it)
    return out
