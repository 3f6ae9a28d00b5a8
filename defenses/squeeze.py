"""Feature squeezing (Xu, Evans, Qi, NDSS 2018) and JPEG re-compression (Guo et al., ICLR 2018).

Pure batch functions on float32 NCHW tensors in [0, 1] (any device; JPEG round-trips through
Pillow on the CPU), each wrapped as a registered ``Defense`` with a frozen, validated config:

==================  =========================  ===============  ================================
type                function                   differentiable   BPDA approximation
==================  =========================  ===============  ================================
``bit_depth``       ``bit_depth(x, bits)``     no (steps)       identity
``median``          ``median_filter(x, size)`` no (ties)        configurable, see ``Median``
``non_local_means`` ``non_local_means(...)``   yes (smooth)     (autograd is exact)
``jpeg``            ``jpeg(x, quality)``       no               identity
==================  =========================  ===============  ================================
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from advshield.core.validation import check
from advshield.defenses.base import Defense
from advshield.defenses.registry import register_defense

# --- the functions ------------------------------------------------------------------------------


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reduce every pixel to ``2**bits`` levels: round(x * (2^b - 1)) / (2^b - 1) (Xu et al., eq. in
    section 3.1; 1 bit = thresholding at 0.5). Output levels are exactly {i / (2^b - 1)}."""
    levels = float(2**bits - 1)
    return torch.round(x.clamp(0, 1) * levels) / levels


def reflect_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Half-sample symmetric padding (d c b a | a b c d | d c b a): scipy.ndimage's
    ``mode='reflect'``, the border convention of the feature-squeezing reference code. torch's own
    ``'reflect'`` is scipy's ``'mirror'`` (whole-sample), hence this helper. Needs pad <= size."""
    h, w = x.shape[-2:]
    if max(top, bottom) > h or max(left, right) > w:
        raise ValueError(f"reflect_pad: padding ({top}, {bottom}, {left}, {right}) larger than the image {h}x{w}")
    parts = [x[..., :top, :].flip(-2), x, x[..., h - bottom :, :].flip(-2)] if top or bottom else [x]
    x = torch.cat(parts, dim=-2) if len(parts) > 1 else x
    parts = [x[..., :left].flip(-1), x, x[..., w - right :].flip(-1)] if left or right else [x]
    return torch.cat(parts, dim=-1) if len(parts) > 1 else x


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """k x k median per channel, equal to ``scipy.ndimage.median_filter(x, size=(1, 1, k, k),
    mode='reflect')``, the reference implementation's call.

    The window of pixel i spans i - k//2 ... i - k//2 + k - 1 (scipy's origin 0), so the even 2x2
    window of the reference setting covers the pixel and its upper-left neighbours. For an even
    number of values the output is scipy's rank k*k//2 element (the upper of the two middle values).
    """
    k = size
    if k == 1:
        return x.clone()
    before, after = k // 2, k - 1 - k // 2
    xp = reflect_pad(x, before, after, before, after)
    h, w = x.shape[-2:]
    if k in (2, 3):  # min/max networks on shifted views: ~10x faster than a sort on CPU
        v = [xp[..., i : i + h, j : j + w] for i in range(k) for j in range(k)]
        return _upper_median4(*v) if k == 2 else _median9(v)
    windows = xp.unfold(-2, k, 1).unfold(-2, k, 1)  # [N, C, H, W, k, k] (a view)
    return windows.reshape(*x.shape, k * k).kthvalue(k * k // 2 + 1, dim=-1).values


def _upper_median4(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Third smallest of four values (scipy's median of an even window)."""
    return torch.maximum(torch.minimum(torch.maximum(a, b), torch.maximum(c, d)),
                         torch.maximum(torch.minimum(a, b), torch.minimum(c, d)))


# Devillard's 19-exchange median-of-9 network (opt_med9; after Paeth, Graphics Gems)
_MED9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7),
         (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _median9(v: list[torch.Tensor]) -> torch.Tensor:
    p = list(v)
    for i, j in _MED9:
        p[i], p[j] = torch.minimum(p[i], p[j]), torch.maximum(p[i], p[j])
    return p[4]


def non_local_means(x: torch.Tensor, search: int, patch: int, strength: float, *, chunk_elements: int = 1 << 19) -> torch.Tensor:
    """Non-local means (Buades et al.) with the weights of OpenCV's ``fastNlMeansDenoising``, the
    implementation Xu et al. used ("NLM search-patch-strength", e.g. 11-3-4):

        out(p) = sum_q w(p, q) x(q) / sum_q w(p, q),  q in the search x search window around p,
        w(p, q) = exp(-mean_{patch, channels} (x(P_p) - x(P_q))^2 / h^2),  h = strength / 255,

    i.e. ``strength`` is in grey levels (0-255) like OpenCV's ``h``; borders are padded like
    OpenCV's BORDER_REFLECT_101 (torch's ``'reflect'``). Channels share one weight per pair (patch
    distance averaged over channels, OpenCV's multi-channel rule). Unlike OpenCV there is neither
    the fixed-point arithmetic nor the 0.001 weight cut-off, so the function is smooth in x and
    autograd through it is its exact gradient. On 8-bit Fashion-MNIST images it agrees with
    OpenCV to within one grey level (mean |difference| 0.004 grey levels at 11-3-4; measured by
    benchmarks/defenses.py). Vectorised over images and search offsets, in blocks of about
    ``chunk_elements`` values (cache-sized: memory bandwidth bounds this filter)."""
    n, c, h, w = x.shape
    r, a = search // 2, patch // 2
    pad = r + a
    if pad >= min(h, w):
        raise ValueError(f"non_local_means: search {search} + patch {patch} too large for a {h}x{w} image")
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    per_image = c * (h + 2 * a) * (w + 2 * a)
    images = max(1, chunk_elements // per_image)
    offsets = max(1, chunk_elements // (per_image * min(images, n)))
    blocks = [_nlm_block(xp[i : i + images], search, patch, strength, offsets) for i in range(0, n, images)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def _nlm_block(xp: torch.Tensor, search: int, patch: int, strength: float, step: int) -> torch.Tensor:
    n, c = xp.shape[:2]
    r, a = search // 2, patch // 2
    h, w = xp.shape[-2] - 2 * (r + a), xp.shape[-1] - 2 * (r + a)
    inv_h2 = (255.0 / strength) ** 2
    ref = xp[:, :, r : r + h + 2 * a, r : r + w + 2 * a].unsqueeze(1)
    offsets = [(dy, dx) for dy in range(search) for dx in range(search)]
    num = xp.new_zeros(n, c, h, w)
    den = xp.new_zeros(n, 1, h, w)
    for i in range(0, len(offsets), step):
        group = offsets[i : i + step]
        shifted = torch.stack([xp[:, :, dy : dy + h + 2 * a, dx : dx + w + 2 * a] for dy, dx in group], 1)
        d2 = (shifted - ref).square()
        d2 = d2[:, :, 0] if c == 1 else d2.mean(2)  # [N, G, H+2a, W+2a]
        dist = _box_sum(d2, patch)  # patch sums: [N, G, H, W]
        # exp(-80) ~ 2e-35: a floor that changes no sum but keeps exp out of (very slow) denormals
        weight = torch.exp((dist * (-inv_h2 / (patch * patch))).clamp_min(-80.0)).unsqueeze(2)  # [N, G, 1, H, W]
        centre = shifted[..., a : a + h, a : a + w]
        num = num + (weight * centre).sum(1)
        den = den + weight.sum(1)
    return num / den


def _box_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over k x k windows (valid positions) of the last two dimensions, by shifted adds."""
    h, w = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    rows = sum(x[..., i : i + h, :] for i in range(1, k)) + x[..., :h, :] if k > 1 else x
    return sum(rows[..., j : j + w] for j in range(1, k)) + rows[..., :w] if k > 1 else rows


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG re-compression at ``quality`` (Pillow, libjpeg, default 4:2:0 chroma subsampling for
    colour), image by image on the CPU; pixels are rounded to 8 bits first, output is decoded/255."""
    from PIL import Image

    if x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg: needs 1 or 3 channels, got {x.shape[1]}")
    arr = (x.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i, img in enumerate(arr):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=quality)
        dec = np.asarray(Image.open(buf))
        out[i] = dec[..., None] if dec.ndim == 2 else dec
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255.0


# --- configs and defenses -------------------------------------------------------------------------


@dataclass(frozen=True)
class BitDepthConfig:
    bits: int = 5

    def __post_init__(self) -> None:
        check(1 <= self.bits <= 8, f"bits: must be within 1..8, got {self.bits}")


@register_defense("bit_depth", BitDepthConfig)
class BitDepth(Defense):
    """Bit-depth reduction. Piecewise constant (zero gradient almost everywhere): BPDA uses the
    identity, since the output approximates the input (Athalye et al., 2018)."""

    name = "bit_depth"
    config: BitDepthConfig

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return bit_depth(x, self.config.bits)


@dataclass(frozen=True)
class MedianConfig:
    size: int = 2  # k x k window; 2 is the reference's setting for MNIST/CIFAR-10/ImageNet
    approximation: Literal["median", "identity", "mean"] = "median"  # BPDA backward pass, see Median

    def __post_init__(self) -> None:
        check(1 <= self.size <= 15, f"size: must be within 1..15, got {self.size}")


def mean_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """k x k box filter on the median's window and padding: the 'mean' BPDA stand-in."""
    if size == 1:
        return x
    before, after = size // 2, size - 1 - size // 2
    return F.avg_pool2d(reflect_pad(x, before, after, before, after), size, stride=1)


@register_defense("median", MedianConfig)
class Median(Defense):
    """Median smoothing over k x k windows (scipy 'reflect' borders, scipy's even-window origin).

    Not marked differentiable: the median is piecewise linear, and on 8-bit images ties inside a
    window are the rule (flat backgrounds), where autograd silently picks one tied element. The
    BPDA backward pass is configurable (``approximation``):

    * ``"median"`` (default): the filter itself, i.e. the gradient routed to the selected element.
      Where the window has no tie this is the exact gradient; at ties a valid subgradient. On the
      reference Fashion-MNIST CNN behind a 2x2 median it gave BPDA-PGD (eps 0.03, 20 steps, 300
      test images) the highest success: 0.69, against 0.61 for "mean" and 0.30 for "identity"
      (slow test ``test_median_bpda_choice_is_the_strongest``), so audits use it by default.
    * ``"identity"``: Athalye et al.'s choice for smoothing-type defenses (f(x) ~ x).
    * ``"mean"``: a box filter with the same window: the expected gradient when each window element
      is equally likely to be the median; smoother, spreads the gradient over the window.
    """

    name = "median"
    config: MedianConfig

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return median_filter(x, self.config.size)

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.approximation == "median":
            return median_filter(x, self.config.size)
        if self.config.approximation == "mean":
            return mean_filter(x, self.config.size)
        return x


@dataclass(frozen=True)
class NonLocalMeansConfig:
    search: int = 11  # search window (odd), pixels
    patch: int = 3  # patch (template) window (odd), pixels
    strength: float = 4.0  # filter strength h in grey levels (0-255), as OpenCV's h

    def __post_init__(self) -> None:
        check(self.search >= 1 and self.search % 2 == 1, f"search: must be an odd number >= 1, got {self.search}")
        check(self.patch >= 1 and self.patch % 2 == 1, f"patch: must be an odd number >= 1, got {self.patch}")
        check(self.strength > 0, f"strength: must be > 0 (grey levels), got {self.strength}")


@register_defense("non_local_means", NonLocalMeansConfig)
class NonLocalMeans(Defense):
    """Non-local means smoothing. Written in torch as a smooth function of x (no OpenCV cut-offs),
    so autograd through it is its true gradient: differentiable, no BPDA needed."""

    name = "non_local_means"
    differentiable = True
    config: NonLocalMeansConfig

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        return non_local_means(x, c.search, c.patch, c.strength)


@dataclass(frozen=True)
class JpegConfig:
    quality: int = 75  # Guo et al.'s setting

    def __post_init__(self) -> None:
        check(1 <= self.quality <= 95, f"quality: must be within 1..95 (libjpeg's useful range), got {self.quality}")


@register_defense("jpeg", JpegConfig)
class Jpeg(Defense):
    """JPEG re-compression (Pillow). Not differentiable (quantised DCT, 8-bit rounding, runs outside
    torch); BPDA uses the identity, as Athalye et al. did against it."""

    name = "jpeg"
    config: JpegConfig

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return jpeg(x, self.config.quality)
