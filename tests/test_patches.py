"""Patch replacement (thesis ch. 6): patches, codebooks, strategies, E8, artifacts, BPDA."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from advshield.core.errors import ArtifactError, ConfigError, InputError
from advshield.defenses.base import NonDifferentiableError, bpda_apply
from advshield.defenses.patches import (
    Codebooks,
    E8PatchReplacement,
    PatchReplacement,
    PatchReplacementConfig,
    build,
    extract_patches,
    nearest_dn,
    nearest_e8,
    reconstruct,
    replace,
    torch_nearest,
)
from advshield.defenses.registry import build_defense, parse_defense

# small enough for tests; one faiss thread (its OpenMP threads stall on shared cores)
SMALL = {"codewords": 256, "sample": 20_000, "fit_images": 2_000, "iterations": 10, "artifact": "cb", "fit_threads": 1}


@pytest.fixture(scope="module")
def fashion_train():
    from advshield.core.data import load_fashion_mnist

    return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def train_images(fashion_train):
    return torch.from_numpy(fashion_train.as_float(0, 4_000))


@pytest.fixture(scope="module")
def fitted(train_images, tmp_path_factory):
    """A small image-layer codebook (K = 256, 20k patches) fitted on real training images."""
    path = tmp_path_factory.mktemp("cb") / "image.npy"
    d = build(PatchReplacementConfig(**SMALL))
    d.fit(train_images, {"cb": path}, seed=0, data_sha256="f" * 64)
    return d, path


def real(fashion_test, n=16, start=0):
    return torch.from_numpy(fashion_test.as_float(start, start + n))


def with_codebook(centroids, **kw) -> PatchReplacement:
    d = build(PatchReplacementConfig(**{**SMALL, **kw}))
    d.set_codebooks(centroids)
    return d


# --- configuration -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"stride": 4, "radius": 1}, r"stride: must be within \[1, 2\*radius\+1 = 3\].*got 4"),
        ({"stride": 0}, r"stride: .*got 0"),
        ({"radius": -1}, "radius: must be >= 0, got -1"),
        ({"depth": 0}, "depth: must be >= 1, got 0"),
        ({"strategy": "linear", "eps": 1.5}, r"eps: the linear strategy interpolates, eps must be within \[0, 1\], got 1.5"),
        ({"strategy": "l2", "eps": -0.1}, "eps: must be a finite number >= 0, got -0.1"),
        ({"quantizer": "e8", "depth": 4}, "depth: the E8 lattice quantizes 8-channel vectors, depth must be 8, got 4"),
        ({"quantizer": "e8", "depth": 8, "scale": 0.0}, "scale: must be > 0, got 0.0"),
        ({"codewords": 5000, "sample": 1000}, r"sample: k-means needs at least as many training patches as codewords \(5000\), got 1000"),
        ({"artifact": ""}, "artifact: the kmeans quantizer needs"),
        ({"layer": " "}, "layer: must be"),
    ],
)
def test_config_rejects_bad_values(params, match):
    with pytest.raises(ConfigError, match=match):
        PatchReplacementConfig(**{**SMALL, **params})


def test_pipeline_table_is_validated_by_the_registry():
    name, cfg = parse_defense({"type": "patch_replacement", "artifact": "cb", "codewords": 512, "strategy": "linf",
                               "eps": 0.1}, "defenses[0]")
    assert name == "patch_replacement" and cfg.codewords == 512 and cfg.strategy == "linf"
    assert isinstance(build_defense(name, cfg), PatchReplacement)
    with pytest.raises(ConfigError, match=r"defenses\[0\]: unknown key 'K'"):
        parse_defense({"type": "patch_replacement", "artifact": "cb", "K": 3}, "defenses[0]")
    with pytest.raises(ConfigError, match=r"defenses\[0\].strategy: expected 'plain' or 'l2' or 'linf' or 'linear', got 'l1'"):
        parse_defense({"type": "patch_replacement", "artifact": "cb", "strategy": "l1"}, "defenses[0]")
    _, e8 = parse_defense({"type": "patch_replacement", "quantizer": "e8", "depth": 8}, "defenses[1]")
    d = build_defense("patch_replacement", e8)
    assert isinstance(d, E8PatchReplacement) and not d.needs_fit and d.artifact_names == ()


# --- features, slices, patches -----------------------------------------------------------------------

@pytest.mark.parametrize(("radius", "stride", "depth", "padding"),
                         [(1, 1, 1, "replicate"), (1, 2, 2, "zeros"), (2, 3, 4, "replicate"), (0, 1, 8, "zeros"),
                          (1, 3, 1, "replicate"), (2, 5, 2, "zeros")])
def test_patches_reassemble_to_the_feature(radius, stride, depth, padding):
    x = torch.randn(3, 8, 13, 11, generator=torch.Generator().manual_seed(0))
    cfg = PatchReplacementConfig(radius=radius, stride=stride, depth=depth, padding=padding, **SMALL)
    p = extract_patches(x, cfg)
    k = 2 * radius + 1
    assert p.shape[0] == 8 // depth and p.shape[2] == k * k * depth
    torch.testing.assert_close(reconstruct(p, x.shape, cfg), x, rtol=0, atol=1e-6)


def test_a_patch_is_the_window_of_its_slice():
    """P_ijk = F_k(i-a:i+a, j-a:j+a), laid out (2a+1, 2a+1, d), centres on a grid of step c."""
    x = torch.randn(2, 6, 12, 12, generator=torch.Generator().manual_seed(1))
    cfg = PatchReplacementConfig(radius=1, stride=2, depth=3, **SMALL)
    p = extract_patches(x, cfg)  # [2 slices, N * L, 27]
    per_row = -(-(12 - 1) // 2) + 1  # centres 0, 2, ..., 12 (padded) -> 7 per row
    n, k, i, j = 1, 1, 2, 3  # image 1, slice 1 (channels 3-5), centre (2*2, 3*2) = (4, 6)
    row = n * per_row * per_row + i * per_row + j
    expected = x[n, 3:6, 4 - 1 : 4 + 2, 6 - 1 : 6 + 2].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(p[k, row], expected)
    corner = x[0, 0:3, :2, :2]  # centre (0, 0): the replicate padding repeats row and column 0
    padded = torch.nn.functional.pad(corner.unsqueeze(0), (1, 0, 1, 0), mode="replicate")[0]
    torch.testing.assert_close(p[0, 0], padded.permute(1, 2, 0).reshape(-1))


def test_channels_must_split_into_slices():
    d = with_codebook(np.zeros((1, 4, 27), np.float32), depth=3)
    with pytest.raises(InputError, match="8 channels cannot be cut into slices of depth 3"):
        d.transform(torch.zeros(1, 8, 5, 5))
    d = with_codebook(np.zeros((2, 4, 9), np.float32))
    with pytest.raises(InputError, match="the codebook has 2 slices of 9-dimensional codewords, the feature gives 1"):
        d.transform(torch.zeros(1, 1, 5, 5))


# --- codebooks and search ------------------------------------------------------------------------------

def test_faiss_nearest_codeword_is_the_brute_force_argmin(fitted, fashion_test):
    d, _ = fitted
    patches = extract_patches(real(fashion_test, 8), d.config)
    cb = d.codebooks
    got = cb.nearest(patches)[0].numpy()
    p64 = patches[0].double().numpy()
    c64 = cb.centroids[0].astype(np.float64)
    dist = (p64**2).sum(1)[:, None] - 2 * p64 @ c64.T + (c64**2).sum(1)[None]  # [P, K], float64
    best = dist.min(1)
    # faiss's pick is a nearest codeword (up to float32 rounding of the expanded distance) ...
    assert np.all(dist[np.arange(len(got)), got] <= best + 1e-5)
    # ... and is the argmin itself wherever the nearest is unambiguous
    second = np.partition(dist, 1, axis=1)[:, 1]
    clear = (second - best) > 1e-4
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(got[clear], dist.argmin(1)[clear])
    tor = torch_nearest(patches.double(), torch.from_numpy(cb.centroids).double())[0].numpy()
    np.testing.assert_array_equal(tor[clear], got[clear])


def test_torch_and_faiss_search_agree(fitted, fashion_test):
    d, _ = fitted
    patches = extract_patches(real(fashion_test, 16), d.config)
    faiss_idx = d.codebooks.nearest(patches)
    torch_cb = Codebooks(d.codebooks.centroids, search="torch")
    assert torch_cb.backend(torch.device("cpu")) == "torch" and d.codebooks.backend(torch.device("cpu")) == "faiss"
    agree = (torch_cb.nearest(patches) == faiss_idx).float().mean().item()
    assert agree > 0.999, agree


@pytest.mark.parametrize("search", ["faiss", "torch"])
@pytest.mark.parametrize(("radius", "stride", "depth"), [(1, 1, 1), (1, 2, 1), (2, 3, 1), (1, 1, 4)])
def test_a_codebook_holding_every_patch_returns_the_input(fashion_test, search, radius, stride, depth):
    x = real(fashion_test, 4)
    if depth > 1:  # a feature-like tensor with several slices
        x = torch.cat([x, x.flip(-1), x.flip(-2), 1 - x], 1)
    cfg = PatchReplacementConfig(radius=radius, stride=stride, depth=depth, search=search, **SMALL)
    d = build(cfg)
    d.set_codebooks(extract_patches(x, cfg).numpy())
    torch.testing.assert_close(d.transform(x), x, rtol=0, atol=1e-6)


# --- strategies ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["l2", "linf", "linear"])
def test_eps_zero_returns_the_input(fitted, fashion_test, strategy):
    d, _ = fitted
    x = real(fashion_test, 16)
    d0 = with_codebook(d.codebooks.centroids, strategy=strategy, eps=0.0)
    assert (d.transform(x) - x).abs().max() > 0.05  # the codebook does change the image ...
    torch.testing.assert_close(d0.transform(x), x, rtol=0, atol=1e-6)  # ... but eps = 0 does not


@pytest.mark.parametrize(("strategy", "eps"), [("l2", 1e6), ("linf", 1e6), ("linear", 1.0)])
def test_limiting_cases_equal_plain(fitted, fashion_test, strategy, eps):
    """Section 6.3.3: l2/linf with a very large eps and linear with eps = 1 are the plain strategy."""
    d, _ = fitted
    x = real(fashion_test, 16)
    other = with_codebook(d.codebooks.centroids, strategy=strategy, eps=eps)
    assert torch.equal(other.transform(x), d.transform(x))


def test_strategy_formulas():
    g = torch.Generator().manual_seed(3)
    p, q = torch.randn(500, 9, generator=g), torch.randn(500, 9, generator=g)
    dist = (q - p).norm(dim=1, keepdim=True)
    eps = float(dist.median())
    out = replace(p, q, "l2", eps)
    inside = (dist < eps).squeeze(1)
    assert torch.equal(out[inside], q[inside])  # codeword within eps: kept
    moved = out[~inside] - p[~inside]
    torch.testing.assert_close(moved.norm(dim=1), torch.full((int((~inside).sum()),), eps))  # moved by eps ...
    torch.testing.assert_close(moved / eps, (q - p)[~inside] / dist[~inside])  # ... towards the codeword
    out = replace(p, q, "linf", 0.3)
    torch.testing.assert_close(out, p + (q - p).clamp(-0.3, 0.3))
    assert (out - p).abs().max() <= 0.3 + 1e-6
    torch.testing.assert_close(replace(p, q, "linear", 0.25), p + 0.25 * (q - p))
    assert torch.equal(replace(p, q, "plain", 0.7), q)
    assert torch.equal(replace(p, p.clone(), "l2", 0.0), p)  # zero distance: no division by zero


# --- the E8 lattice ----------------------------------------------------------------------------------------

def brute_e8(x: np.ndarray) -> np.ndarray:
    """Nearest point of E8 = D8 u (D8 + 1/2) by exhaustive search over the neighbourhood that must
    hold it: every coordinate of the nearest point lies within 1 (the covering radius) of x's."""
    offsets = np.array(list(itertools.product((-1, 0, 1), repeat=8)), np.float64)
    out = np.empty_like(x)
    for i, v in enumerate(x):
        cands = np.concatenate([np.round(v) + offsets, np.round(v - 0.5) + offsets + 0.5])
        ints = cands - (cands % 1 != 0) * 0.5  # the integer point of each coset member
        cands = cands[ints.sum(1) % 2 == 0]  # D8 (and its coset): even coordinate sum
        out[i] = cands[((cands - v) ** 2).sum(1).argmin()]
    return out


def test_dn_decoder_returns_even_sum_nearest_points():
    x = torch.randn(2000, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    y = nearest_dn(x)
    assert torch.equal(y, y.round()) and bool((y.sum(1) % 2 == 0).all())
    offsets = torch.tensor(list(itertools.product((-1, 0, 1), repeat=8)), dtype=torch.float64)
    cands = x[:64].round().unsqueeze(1) + offsets  # [64, 3^8, 8]: every D8 point near enough
    dist = ((cands - x[:64].unsqueeze(1)) ** 2).sum(-1)
    dist[cands.sum(-1) % 2 != 0] = float("inf")
    got = ((y[:64] - x[:64]) ** 2).sum(-1)
    assert bool((got <= dist.min(1).values + 1e-12).all())


@pytest.mark.parametrize("scale", [1.0, 0.3, 2.5])
def test_e8_nearest_point_matches_brute_force(scale):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(150, 8, dtype=torch.float64, generator=g) * 2 * scale
    got = nearest_e8(x, scale).numpy()
    want = brute_e8(x.numpy() / scale) * scale
    d_got = ((got - x.numpy()) ** 2).sum(1)
    d_want = ((want - x.numpy()) ** 2).sum(1)
    np.testing.assert_allclose(d_got, d_want, atol=1e-9)  # equally near (ties may pick either)
    np.testing.assert_allclose(got[d_want > 0], want[d_want > 0], atol=1e-9)
    # lattice points are fixed points
    assert np.allclose(nearest_e8(torch.from_numpy(want), scale).numpy(), want)


def test_e8_defense_quantizes_every_8_channel_vector(fashion_test):
    d = build(PatchReplacementConfig(quantizer="e8", depth=8, radius=1, stride=3, scale=0.25))
    f = torch.randn(2, 16, 9, 9, generator=torch.Generator().manual_seed(6))
    y = d.transform(f)
    v = (y / 0.25).permute(0, 2, 3, 1).reshape(-1, 8)  # channel slices 0-7 and 8-15
    frac = v - v.floor()
    on_int = (frac.abs() < 1e-5) | ((1 - frac).abs() < 1e-5)
    on_half = ((frac - 0.5).abs() < 1e-5)
    assert bool((on_int.all(1) | on_half.all(1)).all())
    torch.testing.assert_close(y, nearest_e8(f.permute(0, 2, 3, 1).reshape(-1, 8), 0.25)
                               .reshape(2, 9, 9, 2, 8).permute(0, 3, 4, 1, 2).reshape(2, 16, 9, 9))
    with pytest.raises(InputError, match="1 channels cannot be cut into slices of depth 8"):
        d.transform(real(fashion_test, 1))


# --- fitting and artifacts -------------------------------------------------------------------------------

def test_fit_writes_the_codebook_and_its_sidecar(fitted):
    _, path = fitted
    meta = json.loads(path.with_name(path.name + ".meta.json").read_text())
    assert meta["format"] == "advshield.patch_codebook.v1" and meta["layer"] == "image"
    assert meta["codewords"] == 256 and meta["slices"] == 1 and meta["dim"] == 9
    assert meta["data_sha256"] == "f" * 64 and meta["seed"] == 0 and meta["patches_per_slice"] == 20_000
    assert meta["config"]["radius"] == 1 and meta["config"]["strategy"] == "plain"
    assert len(meta["sha256"]) == 64
    arr = np.load(path, allow_pickle=False)  # plain .npy, no pickle
    assert arr.dtype == np.float32 and arr.shape == (1, 256, 9)
    # the codebook describes the data: codewords stay in [0, 1] and cover clean patches closely
    assert arr.min() >= -1e-6 and arr.max() <= 1 + 1e-6


def test_artifacts_reload_bit_identically(fitted, fashion_test):
    d, path = fitted
    again = build(d.config)
    again.load({"cb": path})
    assert np.array_equal(again.codebooks.centroids, d.codebooks.centroids)
    x = real(fashion_test, 32)
    assert torch.equal(again.transform(x), d.transform(x))


def test_load_refuses_tampered_or_mismatched_codebooks(fitted, tmp_path):
    d, path = fitted
    other = build(PatchReplacementConfig(**{**SMALL, "codewords": 512}))
    with pytest.raises(ArtifactError, match="codebook fitted with codewords = 256, the pipeline says 512"):
        other.load({"cb": path})
    bad = tmp_path / "image.npy"
    bad.write_bytes(path.read_bytes())
    (tmp_path / "image.npy.meta.json").write_text(path.with_name(path.name + ".meta.json").read_text())
    with open(bad, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(ArtifactError, match="does not match the expected"):
        build(d.config).load({"cb": bad})
    with pytest.raises(ArtifactError, match="no codebook loaded"):
        build(d.config).transform(torch.zeros(1, 1, 4, 4))


def test_feature_layer_fit_needs_the_head(train_images, tmp_path):
    cfg = PatchReplacementConfig(**{**SMALL, "layer": "relu", "depth": 4, "codewords": 64, "sample": 4096,
                                    "fit_images": 64})
    d = build(cfg)
    with pytest.raises(ConfigError, match="bind the model's head first"):
        d.fit(train_images[:64], {"cb": tmp_path / "f.npy"})
    conv = torch.nn.Conv2d(1, 8, 3, padding=1)
    d.bind_features(lambda x: torch.relu(conv(x)))
    d.fit(train_images[:64], {"cb": tmp_path / "f.npy"}, seed=1)
    assert d.codebooks.centroids.shape == (2, 64, 36)
    assert json.loads((tmp_path / "f.npy.meta.json").read_text())["layer"] == "relu"
    f = torch.relu(conv(train_images[:4])).detach()
    assert d.transform(f).shape == f.shape


def test_sampled_training_patches_are_patches_of_their_slice(train_images):
    cfg = PatchReplacementConfig(**{**SMALL, "layer": "feat", "depth": 2, "radius": 1, "stride": 2, "codewords": 8,
                                    "sample": 600, "fit_images": 30})
    d = build(cfg)
    d.bind_features(lambda x: torch.cat([x, 1 - x, x.square(), x.flip(-1)], 1))
    sampled = d.sample_patches(train_images[:50], seed=3, batch=7)  # several batches of unequal size
    assert sampled.shape == (2, 600, 18)
    every = extract_patches(d.features(train_images[:50]), cfg)  # all patches of all 50 images
    for k in range(2):
        dist = torch.cdist(sampled[k].double(), every[k].double(), compute_mode="donot_use_mm_for_euclid_dist")
        assert float(dist.min(1).values.max()) == 0.0  # each one is a patch of slice k
        assert float(torch.cdist(sampled[k].double(), every[1 - k].double()).min(1).values.max()) > 0


def test_fit_is_deterministic_for_a_seed(train_images, tmp_path):
    cfg = PatchReplacementConfig(**{**SMALL, "codewords": 32, "sample": 2048, "fit_images": 200})
    a, b = build(cfg), build(cfg)
    a.fit(train_images, {"cb": tmp_path / "a.npy"}, seed=7)
    b.fit(train_images, {"cb": tmp_path / "b.npy"}, seed=7)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


# --- BPDA --------------------------------------------------------------------------------------------------

def test_under_autograd_it_fails_loudly_and_bpda_is_the_identity(fitted, fashion_test):
    d, _ = fitted
    x = real(fashion_test, 4).requires_grad_(True)
    with pytest.raises(NonDifferentiableError, match="patch_replacement"):
        d(x)
    w = torch.randn_like(x)
    y = d(x, bpda=True)
    # forward value: the defense's (base.bpda_apply writes x + (y - x): equal up to float rounding)
    torch.testing.assert_close(y.detach(), d.transform(x.detach()), rtol=0, atol=1e-6)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.equal(g, w)
    torch.testing.assert_close(bpda_apply(d, x).detach(), y.detach(), rtol=0, atol=0)


def test_clean_images_stay_close_after_replacement(fitted, fashion_test):
    """A K = 256 3x3 codebook reproduces clean test images to a small L2 distance per image."""
    d, _ = fitted
    x = real(fashion_test, 64)
    err = (d.transform(x) - x).flatten(1).norm(dim=1)
    assert float(err.mean()) < 1.5, float(err.mean())  # the images' own norm is about 10
