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
import re
import warnings
from typing import Any, NamedTuple

import numpy as np

from advshield.core.errors import ImageError
from advshield.plugin.config import InputSpec

ACCEPTED_FORMATS = ("PNG", "JPEG")
_GREY_MODES = {"1", "L", "LA", "I;16", "I;16B", "I;16L", "I"}
_COLOUR_MODES = {"RGB", "RGBA", "P", "CMYK", "YCbCr"}

# 64 one-bits after the scan: no Huffman code is all ones, so they cannot complete a scan that was
# cut; enough for libjpeg's read-ahead (57 bits) past the last MCU of a complete one
_SCAN_PAD = b"\xff\x00" * 8
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_LEFT_OVER = re.compile(r"\((\d+) bytes not processed\)")  # Pillow's "image file is truncated" message


def decode_image(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode one encoded image into float32 [C, H, W] in [0, 1] following ``spec``."""
    return decode_pixels(data, spec).astype(np.float32) / np.float32(255.0)


def decode_pixels(data: bytes, spec: InputSpec) -> np.ndarray:
    """Decode one encoded image into uint8 [C, H, W] following ``spec`` (serving and data sets alike)."""
    return _pixels(open_image(data, spec), spec)


def decode_images(items, spec: InputSpec, name: str = "IMAGE") -> np.ndarray:
    """Decode one request's encoded images into float32 [N, C, H, W] in [0, 1]: every header is
    checked first (format, size, ``max_pixels``), then their pixels together against
    ``max_request_pixels``, and only then is any image decoded. An ``ImageError`` names the image
    (``name[i]: ...``) or the budget."""
    opened = []
    for i, data in enumerate(items):
        try:
            opened.append(open_image(data, spec))
        except ImageError as e:
            raise ImageError(f"{name}[{i}]: {e}") from None
    total = sum(o.image.size[0] * o.image.size[1] for o in opened)
    if total > spec.max_request_pixels:
        raise ImageError(f"{name}: the request's {len(opened)} images hold {total} pixels > "
                         f"limit {spec.max_request_pixels} (input.max_request_pixels); send fewer or smaller images")
    out = np.empty((len(opened), *spec.shape), np.float32)
    for i, o in enumerate(opened):
        try:
            out[i] = _pixels(o, spec)
        except ImageError as e:
            raise ImageError(f"{name}[{i}]: {e}") from None
    out /= np.float32(255.0)
    return out


class Opened(NamedTuple):
    """An encoded image whose header has been checked, not yet decoded."""

    image: Any  # PIL.Image.Image, lazy
    size: int  # encoded bytes
    probe: bytes | None  # a multi-scan JPEG's last-scan probe (``_check_last_scan``), run before decoding


def open_image(data: bytes, spec: InputSpec) -> Opened:
    """Open one encoded image and check what its header says (format, encoded size, pixel count,
    zero size, the exact size, a JPEG's marker structure and scans) before any pixel is decoded."""
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
    probe = None
    if img.format == "JPEG":
        # libjpeg only warns (and Pillow hides the warning) when a marker cuts a scan short, and
        # fills the rest with grey; decode a single-scan file up to the end of its scan data,
        # with no marker after it, so that a cut scan ends in "truncated"
        single, probe = jpeg_scan_check(bytes(data))
        if single is not None:
            img = Image.open(io.BytesIO(single), formats=("JPEG",))
    return Opened(img, n, probe)


def _pixels(opened: Opened, spec: InputSpec) -> np.ndarray:
    """Decode an opened image into uint8 [C, H, W] following ``spec``."""
    from PIL import Image

    img, n = opened.image, opened.size
    h, w = img.size[1], img.size[0]
    if opened.probe is not None:
        _check_last_scan(opened.probe, n)
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
    if mode not in _GREY_MODES and mode not in _COLOUR_MODES:
        raise ImageError(f"unsupported pixel mode {mode!r}")
    is_grey = mode in _GREY_MODES or (mode == "P" and _palette_is_grey(img))
    if spec.color == "strict":
        if spec.channels == 1 and not is_grey:
            raise ImageError(f"wrong mode: model takes 1-channel grey images, got {mode!r}")
        if spec.channels == 3 and is_grey:
            raise ImageError(f"wrong mode: model takes 3-channel RGB images, got {mode!r}")
    if mode == "CMYK" and spec.color == "strict":
        raise ImageError("wrong mode: CMYK images are not accepted")
    target = "L" if spec.channels == 1 else "RGB"
    pic = img if img.mode == target else img.convert(target)  # already decoded in that mode: no copy
    if spec.resize == "crop":
        pic = resize_and_centre_crop(pic, spec.height, spec.width, spec.crop_fraction)
    elif (h, w) != (spec.height, spec.width):  # resize = "resize" (a wrong size under "exact" was refused above)
        pic = pic.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    arr = np.asarray(pic, dtype=np.uint8)
    if arr.ndim == 2:
        return np.ascontiguousarray(arr[None])
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def jpeg_scan_check(data: bytes) -> tuple[bytes | None, bytes | None]:
    """Check a JPEG's marker structure and scans; raise ``ImageError`` when a scan is cut short
    (its entropy-coded data ended by a marker before the image is complete), when the scans of a
    multi-scan (progressive) file do not cover every coefficient of every component, or when the
    file ends without its end-of-image marker. Return ``(single, probe)``: for a single-scan file,
    ``single`` holds the bytes to decode, the file up to the end of the scan's data and a padding
    that completes no cut scan (the decoder then reports a cut scan as truncated instead of filling
    it); for a multi-scan file, whose decoder must read up to the end-of-image marker, ``probe``
    holds the bytes for a probe decode of its last scan (``_check_last_scan``). A cut that leaves
    only part of the last block (MCU) missing can pass."""
    n = len(data)
    pos, frame, progressive = 2, None, False
    components: tuple[int, ...] = ()
    scans: list[tuple[tuple[int, ...], int, int, int]] = []  # components, Ss, Se, Al
    scan_end = -1
    while True:
        if pos >= n:
            raise ImageError(f"truncated JPEG image ({n} bytes): no end-of-image marker")
        if data[pos] != 0xFF:
            raise ImageError(f"corrupt JPEG image: expected a marker at byte {pos}, got 0x{data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            raise ImageError(f"truncated JPEG image ({n} bytes): no end-of-image marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE:
            continue
        if pos + 2 > n:
            raise ImageError(f"truncated JPEG image ({n} bytes): segment 0xFF{marker:02X} cut")
        length = int.from_bytes(data[pos:pos + 2], "big")
        body = data[pos + 2:pos + length]
        if length < 2 or pos + length > n:
            raise ImageError(f"truncated JPEG image ({n} bytes): segment 0xFF{marker:02X} of {length} bytes at byte {pos - 2} cut")
        pos += length
        if marker in _SOF and len(body) >= 6:
            frame, progressive = marker, marker in _PROGRESSIVE
            components = tuple(body[6 + 3 * i] for i in range(body[5]) if 6 + 3 * i < len(body))
        elif marker == 0xDA:  # SOS, then entropy-coded data up to the next marker
            if frame is None or not body:
                raise ImageError("corrupt JPEG image: a scan before the frame header")
            ns = body[0]
            if len(body) < 1 + 2 * ns + 3:
                raise ImageError(f"corrupt JPEG image: scan header of {len(body)} bytes for {ns} components")
            ids = tuple(body[1 + 2 * i] for i in range(ns))
            ss, se, a = body[1 + 2 * ns], body[2 + 2 * ns], body[3 + 2 * ns]
            scans.append((ids, ss, se, a & 0x0F))
            scan_end = pos = _scan_data_end(data, pos)
    if not scans:
        raise ImageError("corrupt JPEG image: no scan")
    if progressive:
        for c in components:  # every coefficient of every component refined down to bit 0
            done = [False] * 64
            for ids, ss, se, al in scans:
                if c in ids and al == 0:
                    for k in range(ss, min(se, 63) + 1):
                        done[k] = True
            if not all(done):
                missing = done.index(False)
                raise ImageError(f"truncated JPEG image ({n} bytes): its scans end before coefficient {missing} "
                                 f"of component {c} is complete (progressive file cut short)")
    else:
        covered = {c for ids, *_ in scans for c in ids}
        if not set(components) <= covered:
            raise ImageError(f"truncated JPEG image ({n} bytes): components {sorted(set(components) - covered)} have no scan")
        if len(scans) == 1:
            return data[:scan_end] + _SCAN_PAD, None
    return None, data[:scan_end] + _SCAN_PAD


def _scan_data_end(data: bytes, pos: int) -> int:
    """Where a scan's entropy-coded data starting at ``pos`` ends: at the first marker that is
    neither a stuffed 0xFF (FF 00) nor a restart marker (FF D0-D7), fill bytes (FF FF ...) included
    in the marker; the file's length when there is none."""
    n = len(data)
    while True:
        i = data.find(b"\xff", pos)
        if i < 0:
            return n
        j = i + 1
        while j < n and data[j] == 0xFF:
            j += 1
        if j >= n:
            return i
        if data[j] != 0x00 and not 0xD0 <= data[j] <= 0xD7:
            return i
        pos = j + 1


def _check_last_scan(head: bytes, n: int) -> None:
    """A multi-scan file's decoder reads every scan before the first row comes out, so it is fed
    the file up to its last scan's data and the padding, without the end-of-image marker: it then
    stops for want of input, with every byte consumed when the last scan was complete, and in the
    middle of a block (bytes left over) when the scan was cut."""
    from PIL import Image

    try:
        Image.open(io.BytesIO(head), formats=("JPEG",)).load()
    except OSError as e:
        m = _LEFT_OVER.search(str(e))
        if m and int(m.group(1)) > 0:
            raise ImageError(f"truncated JPEG image ({n} bytes): its last scan is cut short") from None
    except Exception:  # Pillow reports the real file's problems when it decodes it
        pass


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
