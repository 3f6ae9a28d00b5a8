"""The data-free E8 quantizer: nearest points of the lattice s E8 (Conway and Sloane, 1982).

E8 = D8 u (D8 + 1/2), with D_n = {z in Z^n : sum(z) even}: decode in both cosets, keep the closer.
"""

from __future__ import annotations

import torch

from advshield.core.errors import InputError


def nearest_dn(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of D_n = {z in Z^n : sum(z) even} to each row of ``x`` (last dimension n).

    Round every coordinate; if the sum is odd, round the coordinate with the largest rounding
    error the other way.
    """
    f = torch.round(x)
    delta = x - f
    worst = delta.abs().argmax(dim=-1, keepdim=True)
    step = torch.where(delta.gather(-1, worst) >= 0, 1.0, -1.0).to(x.dtype)
    g = f.scatter_add(-1, worst, step)
    odd = (f.sum(dim=-1, keepdim=True).remainder(2) != 0)
    return torch.where(odd, g, f)


def nearest_e8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Nearest point of ``scale`` * E8 to each 8-vector (last dimension 8)."""
    if x.shape[-1] != 8:
        raise InputError(f"E8 quantizes 8-dimensional vectors, got last dimension {x.shape[-1]}")
    y = x / scale
    a = nearest_dn(y)
    b = nearest_dn(y - 0.5) + 0.5
    da = (y - a).square().sum(-1, keepdim=True)
    db = (y - b).square().sum(-1, keepdim=True)
    return torch.where(da <= db, a, b) * scale


def e8_quantize_patches(patches: torch.Tensor, scale: float) -> torch.Tensor:
    """q(P) for patches [..., (2a+1)^2 * 8] of depth 8: each position's 8-channel vector goes to s E8."""
    v = patches.reshape(*patches.shape[:-1], patches.shape[-1] // 8, 8)  # [..., (2a+1)^2, 8]
    return nearest_e8(v, scale).reshape(patches.shape)
