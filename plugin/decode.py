"""Image decoding at the edge: encoded PNG/JPEG bytes -> validated float32 CHW in [0, 1].

The same function decodes what serving receives and the images of a folder or manifest data set
(``decode_pixels``: uint8 CHW), so a data set is seen exactly as a served request. ``[input]
resize``: ``exact`` (another size is an error), ``resize`` (bilinear to HxW) or ``crop``
(ImageNet evaluation: shorter side to round(max(H, W) / crop_fraction), centre HxW crop).

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
    return decode_pixels(data, spec).astype(np.float32) / np.float32(255.0)


def decode_pixels(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode one encoded image into uint8 [C, H, W] following ``spec`` (serving and data sets alike)."""
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
    if spec.resize == "exact" and (h, w) != (spec.height, spec.width):  # from the header, before any pixel is decoded
        raise ImageError(f"wrong size: expected {spec.width}x{spec.height} (WxH), got {w}x{h}")
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
    if spec.resize == "crop":
        pic = resize_and_centre_crop(pic, spec.height, spec.width, spec.crop_fraction)
    elif (h, w) != (spec.height, spec.width):  # resize = "resize" (a wrong size under "exact" was refused above)
        pic = pic.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.asarray(pic, dtype=np.uint8)
    if arr.ndim == 2:
        return np.ascontiguousarray(arr[None])
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def crop_geometry(w: int, h: int, height: int, width: int, crop_fraction: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ``crop`` policy's sizes for a WxH image: ((resized W, resized H), (left, top) of the
    centre HxW crop). The shorter side becomes round(max(height, width) / crop_fraction), the longer
    one keeps the aspect ratio (truncated, as torchvision's Resize); the crop's offset is rounded,
    as torchvision's CenterCrop (crop_fraction <= 1, so the resized image holds the crop)."""
    short = round(max(height, width) / crop_fraction)
    if w <= h:
        rw, rh = short, int(short * h / w)
    else:
        rw, rh = int(short * w / h), short
    return (rw, rh), (round((rw - width) / 2.0), round((rh - height) / 2.0))


def resize_and_centre_crop(pic, height: int, width: int, crop_fraction: float):
    """ImageNet evaluation's preprocessing on a PIL image: shorter side to
    round(max(height, width) / crop_fraction) (bilinear), then the centre height x width crop.
    Applied to every image, whatever its size, so that equal content gives equal pixels."""
    from PIL import Image

    (rw, rh), (left, top) = crop_geometry(pic.width, pic.height, height, width, crop_fraction)
    if (rw, rh) != pic.size:
        pic = pic.resize((rw, rh), Image.Resampling.BILINEAR)
    return pic.crop((left, top, left + width, top + height))


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
