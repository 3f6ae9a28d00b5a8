"""Randomization defenses: random resize and pad (Xie et al., ICLR 2018) and additive Gaussian noise.

Every random draw comes from the explicit ``generator`` (serving seeds one per request, audits
average over draws with EOT); with ``generator=None`` torch's global generator is used. Both are
differentiable with respect to the input for a fixed draw, so attacks differentiate through them
and handle the randomness with EOT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from advshield.core.validation import check
from advshield.defenses.base import Defense
from advshield.defenses.registry import register_defense


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None, *, clip: bool = True) -> torch.Tensor:
    """x + N(0, sigma^2 I), clipped to [0, 1] when ``clip`` (the pixel contract)."""
    draw_on = generator.device if generator is not None else x.device  # torch draws on the generator's device
    noise = torch.randn(x.shape, generator=generator, device=draw_on, dtype=x.dtype)
    y = x + sigma * noise.to(x.device)
    return y.clamp(0.0, 1.0) if clip else y


def resize_matrix(n_in: int, n_out: int, mode: str, device: torch.device | str = "cpu", antialias: bool = False) -> torch.Tensor:
    """[n_out, n_in] matrix R with R @ signal == 1-D ``F.interpolate(signal, n_out, mode)``.

    torch's nearest, bilinear and antialiased bilinear resizing are separable, so a 2-D resize of an
    image X is R_h @ X @ R_w^T exactly (checked against F.interpolate in the tests)."""
    eye = torch.eye(n_in, dtype=torch.float32, device=device)[:, None, None, :]  # n_in 1-row images
    kwargs: dict = {"align_corners": False, "antialias": antialias} if mode == "bilinear" else {}
    out = F.interpolate(eye, size=(1, n_out), mode=mode, **kwargs)
    return out[:, 0, 0, :].T.contiguous()


def resize_pad_table(n: int, sizes: list[int], padded: int, mode: str,
                     device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (size, offset) placement along one axis of length n: the k-th is the [n, n] matrix
    D @ P_k, where P_k resizes n -> size and places the result at the offset inside ``padded``
    zeros, and D resizes padded -> n (antialiased bilinear). Returns (matrices [K, n, n] ordered by
    size then offset, index of each size's first matrix, the sizes) as tensors on ``device``."""
    down = resize_matrix(padded, n, "bilinear", device, antialias=True)  # [n, padded]
    mats: list[torch.Tensor] = []
    starts: list[int] = []
    for r in sizes:
        starts.append(sum(len(m) for m in mats))
        up = resize_matrix(n, r, mode, device)  # [r, n]
        # D @ P_k = D[:, offset : offset + r] @ up, for every offset at once
        mats.append(torch.stack([down[:, o : o + r] for o in range(padded - r + 1)]) @ up)
    return (torch.cat(mats), torch.tensor(starts, dtype=torch.long, device=device),
            torch.tensor(sizes, dtype=torch.long, device=device))


def resize_pad(x: torch.Tensor, sizes: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padded_size: int,
               *, mode: str = "nearest", cache: dict | None = None) -> torch.Tensor:
    """The deterministic part of Xie et al.'s layer, per image n: resize the H x W image to
    sizes[n] x round(sizes[n] W / H), place it with its corner at (top[n], left[n]) in a zero
    canvas of padded_size x round(padded_size W / H), resize the canvas back to H x W
    (antialiased bilinear). Each image's map is a pair of matrices, so the batch is one batched
    product y_n = A_n X_n B_n^T: linear in x, hence differentiable for fixed draws.
    ``cache``: a dict that keeps the per-shape matrix tables between calls."""
    h, w = x.shape[-2:]
    lo, hi = int(sizes.min()), int(sizes.max())
    picked = []
    for length, scale, offset in ((h, 1.0, top), (w, w / h, left)):
        axis_sizes = [max(1, round(r * scale)) for r in range(lo, hi + 1)]
        padded = round(padded_size * scale)
        if axis_sizes[-1] > padded:
            raise ValueError(f"resize_pad: size {axis_sizes[-1]} does not fit in the {padded} canvas")
        key = (length, tuple(axis_sizes), padded, mode, str(x.device))
        table = cache.get(key) if cache is not None else None
        if table is None:
            table = resize_pad_table(length, axis_sizes, padded, mode, x.device)
            if cache is not None:
                cache[key] = table
        mats, starts, sizes_t = table
        i = sizes.to(x.device) - lo
        offset = offset.to(x.device)
        if bool(((offset < 0) | (offset > padded - sizes_t[i])).any()):
            raise ValueError(f"resize_pad: offsets must lie within [0, {padded} - size]")
        picked.append(mats[starts[i] + offset].to(x.dtype))  # [N, length, length]
    rows, cols = picked
    return torch.matmul(rows[:, None], torch.matmul(x, cols[:, None].transpose(-1, -2))).clamp(0.0, 1.0)


def draw_resize_pad(n: int, height: int, width: int, min_size: int, max_size: int, padded_size: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image draws (on the generator's device): size uniform in [min_size, max_size], then the
    row and the column offset each uniform over the positions that keep the image in the canvas."""
    device = generator.device if generator is not None else torch.device("cpu")
    sizes = torch.randint(min_size, max_size + 1, (n,), generator=generator, device=device)
    scale = width / height
    widths = torch.clamp((sizes * scale).round().long(), min=1)
    u = torch.rand(2, n, generator=generator, device=device)
    room_rows = padded_size - sizes
    room_cols = round(padded_size * scale) - widths
    top = torch.minimum((u[0] * (room_rows + 1)).long(), room_rows)
    left = torch.minimum((u[1] * (room_cols + 1)).long(), room_cols)
    return sizes, top, left


def random_resize_pad(x: torch.Tensor, min_size: int, max_size: int, padded_size: int,
                      generator: torch.Generator | None = None, *, mode: str = "nearest",
                      cache: dict | None = None) -> torch.Tensor:
    """Xie et al.'s randomization layer with a fresh draw per image (``draw_resize_pad``, then
    ``resize_pad``)."""
    n, _, h, w = x.shape
    sizes, top, left = draw_resize_pad(n, h, w, min_size, max_size, padded_size, generator)
    return resize_pad(x, sizes, top, left, padded_size, mode=mode, cache=cache)


@dataclass(frozen=True)
class GaussianNoiseConfig:
    sigma: float = 0.1  # standard deviation in pixel units (1/255 = one grey level)
    clip: bool = True  # clip to [0, 1] (the pixel contract)
    random: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check(self.sigma > 0, f"sigma: must be > 0, got {self.sigma}")


@register_defense("gaussian_noise", GaussianNoiseConfig)
class GaussianNoise(Defense):
    """Additive Gaussian noise (the basis of randomized smoothing). Random and differentiable."""

    name = "gaussian_noise"
    random = True
    differentiable = True
    config: GaussianNoiseConfig

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return gaussian_noise(x, self.config.sigma, generator, clip=self.config.clip)


@dataclass(frozen=True)
class RandomResizePadConfig:
    # Xie et al. resize 299 x 299 inputs to r in [299, 331) inside a 331 canvas; the same
    # proportions for 28 x 28 are r in [28, 30] inside 31.
    min_size: int = 28  # resized height range [min_size, max_size] (pixels; width keeps the aspect)
    max_size: int = 30
    padded_size: int = 31  # canvas height
    interpolation: Literal["nearest", "bilinear"] = "nearest"  # Xie et al. resize with nearest
    random: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check(self.min_size >= 1, f"min_size: must be >= 1, got {self.min_size}")
        check(self.max_size >= self.min_size, f"max_size: must be >= min_size = {self.min_size}, got {self.max_size}")
        check(self.padded_size >= self.max_size,
              f"padded_size: must be >= max_size = {self.max_size}, got {self.padded_size}")
        check(self.padded_size <= 4 * self.min_size,
              f"padded_size: {self.padded_size} is more than 4x min_size = {self.min_size}; the image would vanish")


@register_defense("random_resize_pad", RandomResizePadConfig)
class RandomResizePad(Defense):
    """Random resize and pad, then back to the input size. Random; differentiable for a fixed draw
    (a linear map of the input), so EOT over draws is the adaptive attack."""

    name = "random_resize_pad"
    random = True
    differentiable = True
    config: RandomResizePadConfig

    def __init__(self, config: RandomResizePadConfig) -> None:
        super().__init__(config)
        self._tables: dict = {}

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        return random_resize_pad(x, c.min_size, c.max_size, c.padded_size, generator,
                                 mode=c.interpolation, cache=self._tables)
