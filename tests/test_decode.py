import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from advshield.core.errors import ImageError
from advshield.plugin.config import InputSpec
from advshield.plugin.decode import decode_batch, decode_image, decode_images, decode_pixels, encode_png

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


def _jpeg(kind: str, seed: int, size=(40, 36), mode="RGB", **kw) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    if kind == "noise":
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif kind == "ramp":
        a = np.broadcast_to(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, w, 3)).copy()
    else:
        a = np.full((h, w, 3), int(rng.integers(0, 256)), np.uint8)
    img = Image.fromarray(a).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _scans(data: bytes) -> list[int]:
    """Byte offsets of the SOS markers."""
    out, i = [], data.find(b"\xff\xda")
    while i >= 0:
        out.append(i)
        i = data.find(b"\xff\xda", i + 2)
    return out


GOOD_JPEGS = [
    pytest.param(dict(quality=q, subsampling=sub), id=f"baseline-q{q}-sub{sub}") for q in (20, 75, 98) for sub in (0, 2)
] + [
    pytest.param(dict(quality=85, progressive=True), id="progressive"),
    pytest.param(dict(quality=85, optimize=True), id="optimized"),
    pytest.param(dict(quality=85, restart_marker_rows=1), id="restart-markers"),
    pytest.param(dict(quality=85, comment=b"hello \xff\x00 world", exif=b"Exif\x00\x00" + b"\x00" * 16), id="comment-exif"),
]


@pytest.mark.parametrize("options", GOOD_JPEGS)
@pytest.mark.parametrize("kind", ["noise", "ramp", "flat"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_good_jpegs_decode_exactly_as_pillow(options, kind, mode):
    """The strict JPEG path (scan checks, the single-scan re-encode-free decode) gives the pixels
    Pillow gives for the untouched file, for every kind of well-formed JPEG."""
    data = _jpeg(kind, 3, mode=mode, **options)
    spec = InputSpec(channels=3 if mode == "RGB" else 1, height=40, width=36)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert(mode))
    got = decode_pixels(data, spec)
    np.testing.assert_array_equal(got.transpose(1, 2, 0) if mode == "RGB" else got[0], ref)


@pytest.mark.parametrize("options", [dict(quality=90), dict(quality=90, restart_marker_rows=2), dict(quality=90, subsampling=0)],
                         ids=["baseline", "restart-markers", "444"])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_jpeg_scan_cut_with_end_marker_appended_is_truncated(options, fraction):
    """libjpeg fills a scan that a marker cuts short with grey and only warns (Pillow hides the
    warning): such a file used to decode with OK; it must be refused as truncated."""
    data = _jpeg("noise", 1, size=(64, 64), **options)
    sos = _scans(data)[-1]
    cut = sos + int((len(data) - sos) * fraction)
    assert Image.open(io.BytesIO(data[:cut] + b"\xff\xd9")).load() is not None  # plain Pillow accepts it
    spec = InputSpec(channels=3, height=64, width=64)
    with pytest.raises(ImageError, match=r"truncated JPEG image"):
        decode_pixels(data[:cut] + b"\xff\xd9", spec)
    with pytest.raises(ImageError, match=r"truncated JPEG image"):  # another marker than the end marker
        decode_pixels(data[:cut] + b"\xff\xfe\x00\x04hi\xff\xd9", spec)
    with pytest.raises(ImageError, match=r"truncated JPEG"):  # no end marker at all
        decode_pixels(data[:cut], spec)


def test_progressive_jpeg_cut_is_truncated():
    """A progressive file cut in an early scan loses the later ones (its scans no longer refine
    every coefficient); one cut inside its last scan is caught by the probe decode."""
    data = _jpeg("noise", 2, size=(64, 64), quality=90, progressive=True)
    sos = _scans(data)
    assert len(sos) >= 6
    spec = InputSpec(channels=3, height=64, width=64)
    early = (sos[2] + sos[3]) // 2
    with pytest.raises(ImageError, match=r"before coefficient .* is complete"):
        decode_pixels(data[:early] + b"\xff\xd9", spec)
    last = sos[-1] + (len(data) - sos[-1]) // 2
    Image.open(io.BytesIO(data[:last] + b"\xff\xd9")).load()  # plain Pillow accepts it
    with pytest.raises(ImageError, match=r"last scan is cut short"):
        decode_pixels(data[:last] + b"\xff\xd9", spec)


def test_corrupt_jpeg_structure_is_named():
    data = _jpeg("noise", 4)
    spec = InputSpec(channels=3, height=40, width=36)
    sos = _scans(data)[0]
    with pytest.raises(ImageError, match=r"corrupt JPEG image: expected a marker at byte"):
        decode_pixels(data[:sos] + b"\x12\x34" + data[sos:], spec)  # junk between segments
    with pytest.raises(ImageError, match=r"truncated JPEG image .*no end-of-image marker"):
        decode_pixels(data[:-2] + b"\xff", spec)  # a scan followed by a lone 0xFF, the end marker gone


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


def test_request_pixel_budget_is_checked_before_any_image_is_decoded(monkeypatch):
    """Under resize = "resize", each of these 1024x1024 PNGs is within max_pixels, but together
    they exceed max_request_pixels: the request is refused from the headers alone, and a bad image
    anywhere in it is named before any good one is decoded."""
    from PIL import ImageFile

    spec = replace(SPEC, resize="resize", max_pixels=1024 * 1024, max_request_pixels=3 * 1024 * 1024)
    buf = io.BytesIO()
    Image.new("L", (1024, 1024), 7).save(buf, format="PNG")
    big = buf.getvalue()
    loads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real(self))
    with pytest.raises(ImageError, match=r"IMAGE: the request's 4 images hold 4194304 pixels > limit 3145728 "
                                         r"\(input.max_request_pixels\)"):
        decode_images([big] * 4, spec)
    assert loads == []
    with pytest.raises(ImageError, match=r"IMAGE\[2\]: not a PNG or JPEG image"):
        decode_images([big, big, b"junk" * 10], spec)
    assert loads == []
    x = decode_images([big] * 3, spec)  # within the budget: decoded, resized
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x, 7 / 255, atol=1e-6)
    assert set(loads) == {(1024, 1024)}
