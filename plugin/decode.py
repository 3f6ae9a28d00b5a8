"""Image decoding at the edge: encoded PNG/JPEG bytes -> validated float32 CHW in [0, 1].

Images are decoded exactly once, here. Limits on encoded size and pixel count are checked
before any pixel is decoded (decompression bombs); every failure is an ``ImageError`` that says
what is wrong with the input.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from advshield.core.errors import ImageError
from advshield.plugin.config import InputSpec

ACCEPTED_FORMATS = ("PNG", "JPEG")
_GREY_MODES = {"1", "L", "LA", "I;16", "I;16B", "I;16L", "I"}
_COLOUR_MODES = {"RGB", "RGBA", "P", "CMYK", "YCbCr"}


def decode_image(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode one encoded image into float32 [C, H, W] in [0, 1] following ``spec``."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageError(f"expected encoded image bytes, got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ImageError("empty input: 0 bytes")
    if n > spec.max_bytes:
        raise ImageError(f"encoded image too large: {n} bytes > limit {spec.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"not a PNG or JPEG image ({n} bytes, starts with {bytes(data[:8])!r})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image rejected as a decompression bomb: {e}") from None
    except Exception as e:  # Pillow raises many types on corrupt headers
        raise ImageError(f"corrupt image header: {e}") from None
    w, h = img.size
    if w * h > spec.max_pixels:
        raise ImageError(f"image too large: {w}x{h} = {w * h} pixels > limit {spec.max_pixels}")
    if w == 0 or h == 0:
        raise ImageError(f"image has zero size {w}x{h}")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        if "truncated" in msg or isinstance(e, EOFError) or "broken data stream" in msg:
            raise ImageError(f"truncated {img.format} image ({n} bytes): {msg}") from None
        raise ImageError(f"corrupt {img.format} image: {msg}") from None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise ImageError(f"unsupported pixel mode {mode!r} (16/32-bit); expected 8-bit grey or RGB")
    if mode not in _GREY_MODES | _COLOUR_MODES:
        raise ImageError(f"unsupported pixel mode {mode!r}")
    is_grey = mode in _GREY_MODES or (mode == "P" and _palette_is_grey(img))
    if spec.color == "strict":
        if spec.channels == 1 and not is_grey:
            raise ImageError(f"wrong mode: model takes 1-channel grey images, got {mode!r}")
        if spec.channels == 3 and is_grey:
            raise ImageError(f"wrong mode: model takes 3-channel RGB images, got {mode!r}")
    if mode == "CMYK" and spec.color == "strict":
        raise ImageError("wrong mode: CMYK images are not accepted")
    pic = img.convert("L" if spec.channels == 1 else "RGB")
    if (h, w) != (spec.height, spec.width):
        if spec.resize == "exact":
            raise ImageError(f"wrong size: expected {spec.width}x{spec.height} (WxH), got {w}x{h}")
        pic = pic.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.asarray(pic, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return arr.astype(np.float32) / np.float32(255.0)


def _palette_is_grey(img) -> bool:
    pal = img.getpalette() or []
    rgb = np.asarray(pal, dtype=np.int32).reshape(-1, 3) if len(pal) % 3 == 0 and pal else np.zeros((0, 3))
    return bool(len(rgb)) and bool((rgb == rgb[:, :1]).all())


def decode_batch(items: list[bytes], spec: InputSpec) -> tuple[np.ndarray, list[ImageError | None]]:
    """Decode many images; a bad one yields an error in its slot (its pixels stay zero)."""
    out = np.zeros((len(items), *spec.shape), np.float32)
    errors: list[ImageError | None] = []
    for i, data in enumerate(items):
        try:
            out[i] = decode_image(data, spec)
            errors.append(None)
        except ImageError as e:
            errors.append(e)
    return out, errors


def encode_png(image: np.ndarray) -> bytes:
    """float32 [C, H, W] in [0, 1] (or uint8) -> PNG bytes (lossless: round trip is exact on the 1/255 grid)."""
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()
