"""Randomization defenses: the batched fast path against per-image torch code, the draws, seeding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from advshield.core.errors import ConfigError
from advshield.defenses.randomization import (
    draw_resize_pad,
    gaussian_noise,
    random_resize_pad,
    resize_matrix,
    resize_pad,
)
from advshield.defenses.registry import build_defense, parse_defense


def make(spec: dict):
    return build_defense(*parse_defense(spec))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=gen(seed))


# --- the resize matrices and the batched resize-and-pad ------------------------------------------------

@pytest.mark.parametrize("n_in,n_out,mode,antialias", [
    (28, 31, "nearest", False), (28, 30, "bilinear", False), (31, 28, "bilinear", True), (32, 28, "bilinear", True),
    (9, 4, "nearest", False),
])
def test_resize_matrix_equals_interpolate(n_in, n_out, mode, antialias):
    x = rand(3, 2, n_in, n_in, seed=n_in)
    m = resize_matrix(n_in, n_out, mode, antialias=antialias)
    kwargs = {"align_corners": False, "antialias": antialias} if mode == "bilinear" else {}
    ref = F.interpolate(x, size=(n_out, n_out), mode=mode, **kwargs)
    torch.testing.assert_close(m @ x @ m.T, ref, atol=1e-6, rtol=0)


def reference_resize_pad(x, sizes, top, left, padded, mode):
    """Xie et al.'s layer written plainly, one image at a time: interpolate, pad, interpolate back."""
    out = []
    h, w = x.shape[-2:]
    pw = round(padded * w / h)
    for img, r, t, lft in zip(x, sizes.tolist(), top.tolist(), left.tolist()):
        rw = round(r * w / h)
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        small = F.interpolate(img[None], size=(r, rw), mode=mode, **kwargs)
        canvas = F.pad(small, (lft, pw - rw - lft, t, padded - r - t))
        out.append(F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(out)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("shape,lo,hi,padded", [((6, 1, 28, 28), 28, 30, 31), ((5, 3, 20, 30), 18, 24, 26)])
def test_resize_pad_equals_per_image_reference(mode, shape, lo, hi, padded):
    x = rand(*shape, seed=1)
    n, _, h, w = shape
    sizes, top, left = draw_resize_pad(n, h, w, lo, hi, padded, gen(3))
    got = resize_pad(x, sizes, top, left, padded, mode=mode)
    torch.testing.assert_close(got, reference_resize_pad(x, sizes, top, left, padded, mode), atol=2e-6, rtol=0)


def test_draws_cover_the_ranges_uniformly():
    n, lo, hi, padded = 20000, 28, 30, 31
    sizes, top, left = draw_resize_pad(n, 28, 28, lo, hi, padded, gen(0))
    assert int(sizes.min()) == lo and int(sizes.max()) == hi
    assert bool((top >= 0).all() and (top <= padded - sizes).all() and (left <= padded - sizes).all())
    for r in range(lo, hi + 1):  # each size 1/3 of the time; each offset uniform given the size
        k = int((sizes == r).sum())
        assert abs(k - n / 3) < 5 * math.sqrt(n * (1 / 3) * (2 / 3))
        for o in range(padded - r + 1):
            p = 1 / (padded - r + 1)
            m = int(((sizes == r) & (top == o)).sum())
            assert abs(m - k * p) < 5 * math.sqrt(k * p * (1 - p)) + 1


# --- the defenses: seeding, range, gradients -----------------------------------------------------------

RANDOM = [{"type": "random_resize_pad"}, {"type": "random_resize_pad", "interpolation": "bilinear", "min_size": 24,
                                            "max_size": 32, "padded_size": 34},
          {"type": "gaussian_noise", "sigma": 0.1}]


@pytest.mark.parametrize("spec", RANDOM, ids=str)
def test_seeded_reproducible_and_different_across_seeds(spec, fashion_test):
    d = make(spec)
    assert d.random
    x = torch.from_numpy(fashion_test.as_float(0, 32))
    a, b, c = d(x, gen(7)), d(x, gen(7)), d(x, gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    # per-image draws: two copies of the same image come out different within one batch
    twice = d(torch.cat([x[:1], x[:1]]), gen(1))
    assert not torch.equal(twice[0], twice[1])
    # no generator: torch's global generator, so torch.manual_seed reproduces
    torch.manual_seed(5)
    g1 = d(x)
    torch.manual_seed(5)
    assert torch.equal(d(x), g1)


def test_gaussian_noise_statistics():
    x = torch.full((4, 1, 64, 64), 0.5)
    sigma = 0.05  # 10 sigma away from the clip bounds
    noise = (gaussian_noise(x, sigma, gen(0)) - x).flatten()
    n = noise.numel()
    assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(n)
    assert abs(float(noise.std()) - sigma) < 4 * sigma / math.sqrt(2 * n)
    wide = gaussian_noise(x, 1.0, gen(1))
    assert float(wide.min()) == 0.0 and float(wide.max()) == 1.0  # clipped to [0, 1]
    raw = gaussian_noise(x, 1.0, gen(1), clip=False)
    assert float(raw.min()) < 0 and float(raw.max()) > 1


@pytest.mark.parametrize("spec", RANDOM, ids=str)
def test_differentiable_for_a_fixed_draw(spec, fashion_test):
    d = make(spec)
    assert d.differentiable
    x = torch.from_numpy(fashion_test.as_float(0, 4)).requires_grad_(True)
    (g,) = torch.autograd.grad(d(x, gen(0)).square().sum(), x)  # no NonDifferentiableError, no BPDA
    assert float(g.abs().sum()) > 0
    z = rand(2, 1, 12, 12, seed=2).double().requires_grad_(True)
    cache: dict = {}
    draw = draw_resize_pad(2, 12, 12, 11, 14, 15, gen(3))
    if spec["type"] == "random_resize_pad":
        def f(t):
            return resize_pad(t, *draw, 15, cache=cache)
    else:
        def f(t):
            return gaussian_noise(t, 0.01, gen(3))
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_random_resize_pad_with_a_cache_is_the_same(fashion_test):
    x = torch.from_numpy(fashion_test.as_float(0, 8))
    cache: dict = {}
    a = random_resize_pad(x, 28, 30, 31, gen(4), cache=cache)
    b = random_resize_pad(x, 28, 30, 31, gen(4), cache=cache)
    assert len(cache) == 1  # square images: rows and columns share one table
    assert torch.equal(a, random_resize_pad(x, 28, 30, 31, gen(4))) and torch.equal(a, b)


def test_clean_accuracy_survives_mild_randomization(onnx_classifier, fashion_test):
    x = torch.from_numpy(fashion_test.as_float(0, 1000))
    y = torch.from_numpy(fashion_test.labels[:1000])
    base = float((onnx_classifier(x).argmax(1) == y).float().mean())
    for spec in ({"type": "random_resize_pad"}, {"type": "gaussian_noise", "sigma": 0.05}):
        acc = float((onnx_classifier(make(spec)(x, gen(0))).argmax(1) == y).float().mean())
        assert base - 0.08 < acc <= base + 0.01, (spec, acc, base)


@pytest.mark.parametrize("spec,match", [
    ({"type": "gaussian_noise", "sigma": 0}, r"sigma: must be > 0"),
    ({"type": "gaussian_noise", "sigma": "big"}, r"sigma: expected a number"),
    ({"type": "random_resize_pad", "min_size": 30, "max_size": 28}, r"max_size: must be >= min_size = 30"),
    ({"type": "random_resize_pad", "padded_size": 29}, r"padded_size: must be >= max_size = 30"),
    ({"type": "random_resize_pad", "interpolation": "cubic"}, r"interpolation: expected 'nearest' or 'bilinear'"),
])
def test_config_errors_name_the_key(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_defense(spec)
