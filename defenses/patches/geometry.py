"""Patch geometry: a feature [N, D, H, W] <-> patches [m, N * L, (2a+1)^2 d] of its m = D / d slices.

Borders: the feature is padded (``padding``: replicate or zeros) so that patch centres at
0, c, 2c, ... cover every position; the padding is cropped after reconstruction. The same
padding is used when sampling training patches (``patch_windows``).

A patch vector is laid out (2a+1, 2a+1, d): rows, columns, then the slice's channels innermost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advshield.core.errors import InputError
from advshield.defenses.patches.config import PatchReplacementConfig


def _cover(n: int, size: int, stride: int, radius: int) -> tuple[int, int]:
    """Padding (before, after) so that centres 0, stride, ... reach position n-1."""
    centres = -(-(n - 1) // stride) + 1
    padded = (centres - 1) * stride + size
    return radius, padded - n - radius


def _grid(n: int, cfg: PatchReplacementConfig) -> tuple[int, int, int]:
    """(padding before, padding after, number of patch centres) along one spatial axis."""
    before, after = _cover(n, cfg.patch_size, cfg.stride, cfg.radius)
    return before, after, (n + before + after - cfg.patch_size) // cfg.stride + 1


def _pad(x: torch.Tensor, cfg: PatchReplacementConfig) -> torch.Tensor:
    top, bottom = _cover(x.shape[-2], cfg.patch_size, cfg.stride, cfg.radius)
    left, right = _cover(x.shape[-1], cfg.patch_size, cfg.stride, cfg.radius)
    if top == bottom == left == right == 0:
        return x
    mode = "replicate" if cfg.padding == "replicate" else "constant"
    return F.pad(x, (left, right, top, bottom), mode=mode)


def _slice_count(x: torch.Tensor, depth: int) -> int:
    if x.ndim != 4:
        raise InputError(f"patch replacement: expected a 4-D feature [N, C, H, W], got shape {list(x.shape)}")
    if x.shape[1] % depth:
        raise InputError(
            f"patch replacement: {x.shape[1]} channels cannot be cut into slices of depth {depth} "
            f"(depth must divide the channel count)"
        )
    return x.shape[1] // depth


def patch_windows(x: torch.Tensor, cfg: PatchReplacementConfig, *, copy: bool = True) -> torch.Tensor:
    """Every patch of every slice of the padded feature [N, C, H, W], as a strided view
    [m, N, nh, nw, d, 2a+1, 2a+1].

    ``copy``: first copy the padded feature channels-innermost into [m, N, Hp, Wp, d] (for reading
    every patch: 2x faster); without it the result is a pure view (for reading a few patches).
    """
    n, m, d = x.shape[0], _slice_count(x, cfg.depth), cfg.depth
    k, c = cfg.patch_size, cfg.stride
    xs = _pad(x, cfg)
    xl = xs.reshape(n, m, d, xs.shape[2], xs.shape[3]).permute(1, 0, 3, 4, 2)  # [m, N, Hp, Wp, d]
    if copy:
        xl = xl.contiguous()
    return xl.unfold(2, k, c).unfold(3, k, c)


def extract_patches(x: torch.Tensor, cfg: PatchReplacementConfig) -> torch.Tensor:
    """[N, C, H, W] -> patches [m, N * L, (2a+1)^2 d], one row per patch position of each slice.

    Built as one copy of the padded feature into [m, N, H, W, d] and one copy of a strided window
    view (no im2col: its per-image parallel regions stall when CPU cores are shared).
    """
    win = patch_windows(x, cfg)  # [m, N, nh, nw, d, k, k]
    m, n, nh, nw = win.shape[:4]
    return win.permute(0, 1, 2, 3, 5, 6, 4).reshape(m, n * nh * nw, cfg.dim)


def reconstruct(patches: torch.Tensor, shape: torch.Size | tuple[int, ...], cfg: PatchReplacementConfig) -> torch.Tensor:
    """Inverse of ``extract_patches``: overlapping patches are averaged (section 6.3.4).

    Sums the patches into the padded slices with (2a+1)^2 strided adds (one per offset inside a
    patch, each over every patch at once), divides by the number of patches covering each
    position, crops the padding and concatenates the slices over channels.
    """
    n, ch, h, w = shape
    m, d, k, c = ch // cfg.depth, cfg.depth, cfg.patch_size, cfg.stride
    top, bottom, nh = _grid(h, cfg)
    left, right, nw = _grid(w, cfg)
    hp, wp = h + top + bottom, w + left + right
    p = patches.reshape(m, n, nh, nw, k, k, d)
    total = patches.new_zeros((m, n, hp, wp, d))
    count = patches.new_zeros((hp, wp, 1))
    for u in range(k):
        for v in range(k):
            rows, cols = slice(u, u + c * (nh - 1) + 1, c), slice(v, v + c * (nw - 1) + 1, c)
            total[:, :, rows, cols] += p[:, :, :, :, u, v]
            count[rows, cols] += 1
    out = (total / count)[:, :, top : top + h, left : left + w]  # [m, N, H, W, d]
    return out.permute(1, 0, 4, 2, 3).reshape(n, ch, h, w)
