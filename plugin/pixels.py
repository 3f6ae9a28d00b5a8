"""Images handed to the Python API, converted to the pixel contract: float32 [N, C, H, W] in [0, 1].

``to_pixels(x, input_shape)`` accepts a numpy array or a torch tensor (kept on its device) and
applies these rules, for a model taking C x H x W pixels:

* dtype: ``uint8`` is divided by 255; ``float32`` is taken as it is; ``float64``, ``float16`` (and
  torch's ``bfloat16``) are cast to float32. Float pixels must lie in [0, 1] (0-255 floats are an
  error: divide by 255 or pass uint8). Any other dtype (int64, bool, ...) is an error.
* layout: ``[N, C, H, W]`` (NCHW) as it is; ``[N, H, W, C]`` (NHWC) is transposed to NCHW;
  when both readings fit (e.g. C = H = W), NCHW wins.
* one image: ``[C, H, W]``, ``[H, W, C]``, and for grey models (C = 1) ``[H, W]``, become a batch of
  one; for grey models ``[N, H, W]`` is a batch of N images.

Anything else is an ``InputError`` naming the expected dtype and layouts and what it got.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from advshield.core.errors import InputError
from advshield.plugin.classifiers import validate_batch

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def expected(input_shape: tuple[int, int, int]) -> str:
    c, h, w = input_shape
    single = f"[{c}, {h}, {w}] or [{h}, {w}, {c}]" + (f" or [{h}, {w}]" if c == 1 else "")
    return (f"float32 pixels in [0, 1] (or uint8 0-255) shaped [N, {c}, {h}, {w}] (NCHW) or [N, {h}, {w}, {c}] "
            f"(NHWC), or one image {single}")


def _as_tensor(x: Any, input_shape: tuple[int, int, int], what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint8 or x.dtype.kind == "f":
            return torch.from_numpy(np.ascontiguousarray(x))
        raise InputError(f"{what}: expected {expected(input_shape)}; got a numpy array of dtype {x.dtype}")
    raise InputError(f"{what}: expected a numpy array or a torch tensor of {expected(input_shape)}; got "
                     f"{type(x).__name__}")


def _to_nchw(t: torch.Tensor, input_shape: tuple[int, int, int], what: str) -> torch.Tensor:
    c, h, w = input_shape
    shape = tuple(t.shape)
    if len(shape) == 4:
        if shape[1:] == (c, h, w):
            return t
        if shape[1:] == (h, w, c):
            return t.permute(0, 3, 1, 2)
    elif len(shape) == 3:
        if shape == (c, h, w):
            return t.unsqueeze(0)
        if shape == (h, w, c):
            return t.permute(2, 0, 1).unsqueeze(0)
        if c == 1 and shape[1:] == (h, w):
            return t.unsqueeze(1)
    elif len(shape) == 2 and c == 1 and shape == (h, w):
        return t.reshape(1, 1, h, w)
    raise InputError(f"{what}: expected {expected(input_shape)}; got shape {list(shape)}")


def to_pixels(x: Any, input_shape: tuple[int, int, int], what: str = "images") -> torch.Tensor:
    """``x`` as a float32 NCHW batch in [0, 1] (see the module's rules); ``InputError`` otherwise."""
    t = _as_tensor(x, input_shape, what)
    if t.dtype == torch.uint8:
        t = _to_nchw(t, input_shape, what).float().div_(255.0)
    elif t.dtype in _FLOATS:
        t = _to_nchw(t, input_shape, what).to(torch.float32)
        if t.numel() and bool(torch.isfinite(t).all()):
            hi = float(t.max())
            if 1 + 1e-6 < hi <= 255:
                raise InputError(f"{what}: float pixels must lie in [0, 1], got values up to {hi:.4g} (0-255 values? "
                                 f"divide by 255 or pass uint8)")
    else:
        raise InputError(f"{what}: expected {expected(input_shape)}; got dtype {t.dtype}")
    t = t.contiguous()
    validate_batch(t, input_shape, what)
    return t
