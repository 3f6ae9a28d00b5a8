"""Square attack (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020): a score-based black-box
budget attack by random search, L-inf and L2.

Each iteration changes one square window of the current perturbation and keeps the change when
the margin loss (``Oracle.margin``: the log-probability margin, penalised where flagged) goes
down; an image stops as soon as an answer is adversarial. The window's side follows the paper's
piecewise-constant schedule of ``p`` (the share of pixels changed), from ``p_init`` halving at
fixed fractions of the query budget.

* L-inf: vertical stripes of +-eps to start; a window is set to +-eps per channel.
* L2: a tiling of pseudo-Gaussian bumps of random sign to start, scaled to ||delta|| = eps; an
  update moves the mass of a second window into the first as a new two-signed pseudo-Gaussian
  bump plus the first window's old content, per channel, keeping ||delta|| <= eps.

Every query is a candidate on the ``levels`` grid (rounded, towards the clean image where
rounding would leave the budget), so what the attacker saw is what the audit judges. ``queries``
counts every image sent, the first one included: no image costs more.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from advshield.attacks.oracle import Oracle
from advshield.attacks.primitives import Norm, l2, linf
from advshield.core.errors import InputError
from advshield.core.validation import check

# the paper's schedule: p halves at these fractions (x 10,000) of the query budget
_P_STEPS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, it: int, queries: int) -> float:
    """The share of pixels a window covers at iteration ``it`` of ``queries``."""
    at = int(it / queries * 10000)
    return p_init / 2 ** sum(at > s for s in _P_STEPS)


def on_grid(x: torch.Tensor, adv: torch.Tensor, norm: Norm, eps: float, levels: int) -> torch.Tensor:
    """``adv`` clipped to [0, 1] and rounded to the grid; where rounding leaves the ball of
    radius ``eps`` around ``x``, rounded towards ``x`` instead (never further from it)."""
    a = adv.clamp(0.0, 1.0)
    if not levels:
        return a
    s = levels - 1
    q = torch.round(a * s) / s
    dist = linf(q - x) if norm == "linf" else l2(q - x)
    out = dist > eps + 1e-6
    if bool(out.any()):
        toward = torch.where(a >= x, torch.floor(a * s), torch.ceil(a * s)) / s
        q = torch.where(out.view(-1, 1, 1, 1), toward, q)
    return q


def _window(k: int, h: int, w: int, s: int, g: torch.Generator,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k random s x s windows: a bool mask [k, 1, h, w] and the top-left corners (rows, columns)."""
    r0 = torch.randint(0, h - s + 1, (k, 1), generator=g).to(device)
    c0 = torch.randint(0, w - s + 1, (k, 1), generator=g).to(device)
    rows = torch.arange(h, device=device)[None]
    cols = torch.arange(w, device=device)[None]
    mr = (rows >= r0) & (rows < r0 + s)
    mc = (cols >= c0) & (cols < c0 + s)
    return (mr[:, :, None] & mc[:, None, :])[:, None], r0.view(-1), c0.view(-1)


def _signs(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(device, torch.float32)


def bump(a: int, b: int) -> torch.Tensor:
    """The pseudo-Gaussian bump on an a x b rectangle: nested rectangles around the centre, the
    k-th adding 1 / (k + 1)^2; unit L2 norm."""
    ci, cj = a // 2, b // 2
    i = torch.arange(a)[:, None]
    j = torch.arange(b)[None, :]
    ring = torch.maximum((i - ci).abs(), (j - cj).abs())
    top = max(a, b) // 2
    tail = torch.tensor([sum(1.0 / (k + 1) ** 2 for k in range(r, top + 1)) for r in range(top + 1)])
    m = tail[ring]
    return m / m.norm()


def two_signed_bump(s: int) -> torch.Tensor:
    """An s x s window made of two bumps of opposite signs (top and bottom halves); unit norm."""
    half = s // 2
    m = torch.zeros(s, s)
    if half == 0:
        return torch.ones(s, s) / s
    m[:half] = bump(half, s)
    m[half:] = -bump(s - half, s)
    return m / m.norm()


def _l2_init(n: int, c: int, h: int, w: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Tiles of pseudo-Gaussian bumps, a random sign per tile and channel (unscaled)."""
    s = max(min(h, w) // 5, 1)
    delta = torch.zeros(n, c, h, w)
    b = bump(s, s)
    for r in range(0, h - s + 1, s):
        for q in range(0, w - s + 1, s):
            delta[:, :, r : r + s, q : q + s] += b * _signs((n, c, 1, 1), g, torch.device("cpu"))
    return delta.to(device)


def _scale_to(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = l2(delta).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * (eps / norms)


def square(oracle: Oracle, inputs: torch.Tensor, labels: torch.Tensor, *, targeted: bool = False, eps: float,
           norm: Norm = "linf", queries: int = 1000, p_init: float = 0.8, levels: int = 256,
           seed: int = 0) -> torch.Tensor:
    """Square attack within ``eps`` (``norm``), at most ``queries`` images sent per sample."""
    if targeted:
        raise InputError("square: targeted attacks are not supported (the audit runs untargeted ones)")
    check(norm in ("linf", "l2"), f"square: norm must be 'linf' or 'l2', got {norm!r}")
    check(eps > 0, f"square: eps must be > 0, got {eps}")
    check(queries >= 1, f"square: queries must be >= 1, got {queries}")
    check(0 < p_init <= 1, f"square: p_init must lie in (0, 1], got {p_init}")
    if inputs.dim() != 4 or len(inputs) != len(labels):
        raise InputError(f"square: need inputs [N, C, H, W] and labels [N], got {list(inputs.shape)} and {list(labels.shape)}")
    x = inputs.detach().float()
    y = labels.to(x.device)
    n, c, h, w = x.shape
    dev = x.device
    g = torch.Generator().manual_seed(int(seed))
    idx = np.arange(n)
    if norm == "linf":
        e = math.floor(eps * (levels - 1) + 1e-6) / (levels - 1) if levels else float(eps)
        if e <= 0:  # eps below one grey level: no point of the grid moves
            return x.clone()
        start = x + e * _signs((n, c, 1, w), g, dev).expand(n, c, h, w)
    else:
        e = float(eps)
        start = x + _scale_to(_l2_init(n, c, h, w, g, dev), e)
    best = on_grid(x, start, norm, e, levels)
    ans = oracle(best, idx)
    loss = oracle.margin(ans, y)
    done = oracle.adversarial(ans, y)
    side = min(h, w)
    for it in range(1, queries):
        act = torch.nonzero(~done).view(-1)
        if len(act) == 0:
            break
        k = len(act)
        xa, da = x[act], best[act] - x[act]
        p = p_schedule(p_init, it, queries)
        if norm == "linf":
            s = int(min(max(round(math.sqrt(p * h * w)), 1), max(side - 1, 1)))
            mask = _window(k, h, w, s, g, dev)[0]
            cand_d = torch.where(mask, e * _signs((k, c, 1, 1), g, dev), da)
            for _ in range(4):  # a window that changes nothing would waste a query: redraw its signs
                same = ((on_grid(xa, xa + cand_d, norm, e, levels) - best[act]).abs().flatten(1).amax(1) < 1e-7)
                if not bool(same.any()):
                    break
                redo = torch.where(mask, e * _signs((k, c, 1, 1), g, dev), da)
                cand_d = torch.where(same.view(-1, 1, 1, 1), redo, cand_d)
        else:
            s = int(max(round(math.sqrt(p * h * w)), 3))
            s += 1 - s % 2  # odd
            s = min(s, side)
            m1, r1, c1 = _window(k, h, w, s, g, dev)
            m2 = _window(k, h, w, s, g, dev)[0]
            total = l2(da)
            union = (da * (m1 | m2)).flatten(2).norm(dim=2)  # [k, c]
            inside = (da * m1).flatten(2).norm(dim=2)
            b = two_signed_bump(s)
            b = torch.where(torch.rand(k, generator=g).view(-1, 1, 1) < 0.5, b[None], b.t()[None]).to(dev)
            placed = torch.zeros(k, h, w, device=dev)  # the bump, placed in window 1
            ar = torch.arange(s, device=dev)
            placed[torch.arange(k, device=dev)[:, None, None], (r1[:, None] + ar)[:, :, None],
                   (c1[:, None] + ar)[:, None, :]] = b
            placed = placed[:, None]
            fresh = placed * _signs((k, c, 1, 1), g, dev) + da * m1 / (inside.view(k, c, 1, 1) + 1e-10)
            target = torch.sqrt((e**2 - total**2).clamp_min(0.0).view(-1, 1) / c + union**2)  # [k, c]
            fresh = fresh * m1 * (target / (fresh * m1).flatten(2).norm(dim=2).clamp_min(1e-12)).view(k, c, 1, 1)
            cand_d = torch.where(m1, fresh, torch.where(m2, torch.zeros_like(da), da))
            over = l2(cand_d) > e
            if bool(over.any()):
                cand_d[over] = _scale_to(cand_d[over], e)
        cand = on_grid(xa, xa + cand_d, norm, e, levels)
        a = oracle(cand, idx[act.cpu().numpy()])
        new_loss = oracle.margin(a, y[act])
        better = new_loss < loss[act]
        upd = act[better]
        best[upd] = cand[better]
        loss[upd] = new_loss[better]
        done[upd] = oracle.adversarial(a, y[act])[better]
    return best
