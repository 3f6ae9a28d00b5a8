"""Replacement strategies (thesis eq. 6.3-6.5): how far a patch P moves towards its codeword q(P).

* ``plain``:  P' = q(P)
* ``l2``:     P' = q(P)                          if ||q(P) - P||_2 < eps
              P' = P + eps (q(P) - P) / ||q(P) - P||_2   otherwise
  (the codeword is kept when it lies within eps of the patch, else the patch moves a distance
  eps towards it: the patch is never moved by more than eps in L2)
* ``linf``:   P' = P + clip_[-eps, eps](q(P) - P)   (no value moves by more than eps)
* ``linear``: P' = P + eps (q(P) - P)               (eps in [0, 1])

so eps = 0 returns the input for l2/linf/linear; l2/linf with eps at least the largest
distance, and linear with eps = 1, equal plain (section 6.3.3).
"""

from __future__ import annotations

from typing import Literal

import torch

from advshield.core.errors import ConfigError

Strategy = Literal["plain", "l2", "linf", "linear"]


def replace(p: torch.Tensor, q: torch.Tensor, strategy: str, eps: float) -> torch.Tensor:
    """P' from patches ``p`` and their quantized versions ``q`` (rows are patch vectors).

    Written so that the limiting cases hold exactly: eps = 0 gives p (l2, linf, linear), eps above
    every distance gives q (l2, linf), linear with eps = 1 gives q.
    """
    if strategy == "plain":
        return q
    if strategy == "linear":
        return torch.lerp(p, q, eps)  # exact at both ends: lerp(p, q, 0) = p, lerp(p, q, 1) = q
    diff = q - p
    if strategy == "l2":
        dist = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        moved = p + diff * (eps / dist.clamp_min(torch.finfo(p.dtype).tiny))
        return torch.where(dist < eps, q, torch.where(dist > 0, moved, p))
    if strategy == "linf":
        return torch.where(diff.abs() <= eps, q, p + diff.clamp(-eps, eps))
    raise ConfigError(f"strategy: unknown {strategy!r}; expected plain, l2, linf or linear")
