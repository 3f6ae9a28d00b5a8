import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from advshield.core.errors import ImageError
from advshield.plugin.config import InputSpec
from advshield.plugin.decode import decode_batch, decode_image, encode_png

SPEC = InputSpec(channels=1, height=28, width=28)


def _png(mode="L", size=(28, 28), fmt="PNG", **kw) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "L":
        img = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L")
    elif mode == "RGB":
        img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB")
    else:
        img = Image.new(mode, size)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_round_trip_is_exact(fashion_test):
    x = fashion_test.as_float(0, 1)[0]
    y = decode_image(encode_png(x), SPEC)
    assert y.dtype == np.float32 and y.shape == (1, 28, 28)
    np.testing.assert_array_equal(y, x)


def test_jpeg_decodes():
    y = decode_image(_png(fmt="JPEG", quality=95), SPEC)
    assert y.shape == (1, 28, 28) and y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty input: 0 bytes"),
        (b"hello world, not an image", "not a PNG or JPEG image"),
        (b"GIF89a" + b"\0" * 40, "not a PNG or JPEG image"),
    ],
)
def test_bad_bytes(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data, SPEC)


def test_truncated_png_and_jpeg():
    for fmt in ("PNG", "JPEG"):
        data = _png(fmt=fmt)
        with pytest.raises(ImageError, match=r"truncated|corrupt"):
            decode_image(data[: len(data) // 2], SPEC)


def test_wrong_size_exact_vs_resize():
    data = _png(size=(32, 30))
    with pytest.raises(ImageError, match=r"wrong size: expected 28x28 \(WxH\), got 32x30"):
        decode_image(data, SPEC)
    y = decode_image(data, replace(SPEC, resize="resize"))
    assert y.shape == (1, 28, 28)


def test_modes():
    rgb = _png("RGB")
    assert decode_image(rgb, SPEC).shape == (1, 28, 28)  # converted to grey by default
    with pytest.raises(ImageError, match=r"wrong mode: model takes 1-channel grey images, got 'RGB'"):
        decode_image(rgb, replace(SPEC, color="strict"))
    assert decode_image(rgb, replace(SPEC, channels=3)).shape == (3, 28, 28)
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(buf, format="PNG")
    with pytest.raises(ImageError, match="unsupported pixel mode"):
        decode_image(buf.getvalue(), SPEC)


def test_limits_before_decoding():
    with pytest.raises(ImageError, match="encoded image too large"):
        decode_image(_png(), replace(SPEC, max_bytes=100))
    # a 6000x6000 black PNG is tiny encoded but 36 M pixels: refused from the header alone
    bomb = _png("L", size=(6000, 6000)) if False else _blank_png(6000, 6000)
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="image too large: 6000x6000"):
        decode_image(bomb, replace(SPEC, max_pixels=4096 * 4096))


def _blank_png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_batch_keeps_errors_per_slot():
    x, errors = decode_batch([_png(), b"", _png()], SPEC)
    assert x.shape == (3, 1, 28, 28)
    assert errors[0] is None and errors[2] is None and "empty" in str(errors[1])
    assert np.all(x[1] == 0)


def test_exact_size_is_refused_from_the_header_before_any_pixel_is_decoded(monkeypatch):
    """A 4096x4096 PNG compresses to a few KB but costs tens of ms to decode: under
    resize = "exact" its size is refused from the header, without decoding it."""
    from PIL import ImageFile

    buf = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) < 64 << 10
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real(self))
    with pytest.raises(ImageError, match=r"wrong size: expected 28x28 \(WxH\), got 4096x4096"):
        decode_image(data, SPEC)
    assert loads == []
    decode_image(encode_png(np.zeros((1, 28, 28), np.float32)), SPEC)  # a right-sized image is decoded
    assert loads and set(loads) == {(28, 28)}
