"""Auditing feature-layer patch replacement (thesis ch. 6, the final two-layer configuration):
the split twin equals the ONNX Runtime split classifier, BPDA through the feature replacement is
the gradient it claims to be, and a stacked image + feature-layer pipeline audits end to end."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
import torch.nn.functional as F

from advshield.attacks.adaptive import DEFAULT_EOT_SAMPLES, AttackModel, attack_model, bare, twin_of
from advshield.attacks.audit import Auditor, AuditSpec, build_setup, load_examples
from advshield.core.errors import ParityError
from advshield.core.validation import from_mapping
from advshield.defenses.base import Defense, NonDifferentiableError
from advshield.plugin import split as split_module
from advshield.plugin.config import load_pipeline
from advshield.plugin.fitting import FitSpec, fit_pipeline
from advshield.plugin.pipeline import DefendedClassifier
from advshield.plugin.split import (
    OnnxSegment,
    SplitClassifier,
    split_model,
    split_onnx_classifier,
    twin_of_split,
)

LAYER = "relu"  # the first convolution + ReLU, [N, 32, 28, 28]
N = 12

pytestmark = pytest.mark.usefixtures("one_thread")


def enable_feature_layer(text: str) -> str:
    """The shipped example with its commented-out feature-layer section uncommented."""
    lines = text.splitlines()
    start = lines.index("# [[defenses]]")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("# path = "))
    block = [line[2:] if line.startswith("# ") else "" for line in lines[start : end + 1]]
    return "\n".join(lines[:start] + block + lines[end + 1 :]) + "\n"


@pytest.fixture(scope="module")
def stacked(pipeline_path, tmp_path_factory):
    """fashion_mnist_patches.toml with its feature layer on, small codebooks (K = 64 on both
    layers), fitted on 1,000 training images; absolute paths, artifacts in a tmp folder."""
    shipped = Path(pipeline_path).parent / "fashion_mnist_patches.toml"
    table = tomllib.loads(enable_feature_layer(shipped.read_text()))
    assert [d["layer"] for d in table["defenses"]] == ["image", LAYER]
    root = tmp_path_factory.mktemp("stacked")
    table["model"]["path"] = str((shipped.parent / table["model"]["path"]).resolve())
    table["model"]["surrogate"] = str((shipped.parent / table["model"]["surrogate"]).resolve())
    for name in table["artifacts"]:
        table["artifacts"][name]["path"] = str(root / f"{name}.npy")
    small = {"codewords": 64, "sample": 8192, "fit_images": 1000, "iterations": 8}
    table["defenses"] = [{**d, **small} for d in table["defenses"]]
    path = root / "pipeline.toml"
    path.write_text(tomli_w.dumps(table))
    fit_pipeline(load_pipeline(path), FitSpec(samples=1000, calibration=1), progress=False)
    return load_pipeline(path)


@pytest.fixture(scope="module")
def defended(stacked):
    return DefendedClassifier.from_config(stacked)


@pytest.fixture(scope="module")
def images(fashion_test):
    return torch.from_numpy(fashion_test.as_float(0, 128)), torch.from_numpy(fashion_test.labels[:128].astype(np.int64))


def _grad(fn, x, y):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(fn(xr), y), xr)
    return g


# --- (a) the split twin is the serving path, differentiable ----------------------------------------

def test_split_twin_equals_the_onnx_runtime_split_classifier(stacked, defended, images):
    x, y = images
    served = defended.classifier
    assert isinstance(served, SplitClassifier) and all(isinstance(s, OnnxSegment) for s in served.segments)
    tol = stacked.model.parity_tolerance
    twin = twin_of(defended, check_with=x[:32])
    assert isinstance(twin, SplitClassifier) and twin.differentiable and twin.cuts == (LAYER,)
    assert twin.steps[0][0] is served.steps[0][0]  # the same defense, codebook as loaded
    assert twin.parity is not None and len(twin.parity) == 2 and max(twin.parity) <= tol
    with torch.no_grad():
        # the feature replacement in the middle of both: replaced features, then the tail
        diff = (twin(defended.defend(x)) - served(defended.defend(x))).abs().max().item()
    assert diff <= tol, diff
    model = attack_model(defended, twin=twin)
    with torch.no_grad():
        assert (model(x) - defended.logits(x)).abs().max().item() <= tol
    g = _grad(model, x[:16], y[:16])
    norms = g.flatten(1).norm(dim=1)
    assert bool(torch.isfinite(g).all()) and bool((norms > 0).all()), norms


def test_twin_segments_are_parity_checked_and_a_bad_one_is_named(defended, monkeypatch):
    convert = split_module.onnx_to_torch

    def skewed(proto):
        module = convert(proto)
        if proto.graph.output[0].name != "logits":
            return module
        return torch.nn.Sequential(module, _Shift(0.01))  # the tail off by 0.01

    monkeypatch.setattr(split_module, "onnx_to_torch", skewed)
    with pytest.raises(ParityError, match=r"segment 1 \(relu -> logits\): the twin disagrees with ONNX Runtime by "
                                          r"max \|difference\| 0.01 > tolerance 0.001"):
        twin_of(defended)


class _Shift(torch.nn.Module):
    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        return x + self.c


# --- (b) BPDA through the feature replacement --------------------------------------------------------

class SmoothStep(Defense):
    """A feature-layer stand-in declared non-differentiable whose BPDA approximation is the exact
    function (h * sigmoid(h)): BPDA must then be autograd."""

    name = "smooth_step"

    def transform(self, x, generator=None):
        return x * torch.sigmoid(x)

    def approximation(self, x):
        return x * torch.sigmoid(x)


def _segments(model_path):
    head, tail = split_model(model_path, [LAYER])
    return split_module.onnx_to_torch(head), split_module.onnx_to_torch(tail)


def test_bpda_with_the_exact_surrogate_on_the_feature_layer_is_autograd(model_path, images):
    x, y = images[0][:8], images[1][:8]
    step = SmoothStep(None)
    served = split_onnx_classifier(model_path, {LAYER: [step]}, device="cpu")
    model = attack_model(DefendedClassifier(served, []))
    head, tail = _segments(model_path)  # by hand, no SplitClassifier involved
    want = _grad(lambda v: tail(step.transform(head(v))), x, y)
    got = _grad(model, x, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # the step matters: without it (the bare model) the gradient is another one
    plain = _grad(lambda v: tail(head(v)), x, y)
    assert (got - plain).abs().max() > 10 * (got - want).abs().max()


def test_identity_bpda_through_both_layers_is_the_head_vjp_at_the_replaced_features(defended, images):
    """Image replacement P, head H, feature replacement R, tail T. BPDA (identity backward through
    P and R) gives grad = J_H(P(x))^T grad_r L(T(r)) at r = R(H(P(x)))."""
    x, y = images[0][:8], images[1][:8]
    model = attack_model(defended)
    img, feat = defended.defenses[0], defended.classifier.steps[0][0]
    head, tail = model.classifier.segments
    with torch.no_grad():
        px = img.transform(x)
        r = feat.transform(head(px))
    r.requires_grad_(True)
    (g_r,) = torch.autograd.grad(F.cross_entropy(tail(r), y), r)
    p = px.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(head(p), p, grad_outputs=g_r)
    got = _grad(model, x, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert bool((got.flatten(1).norm(dim=1) > 0).all())


def test_a_non_differentiable_feature_step_without_bpda_fails_loudly(defended, images):
    x = images[0][:4].clone().requires_grad_(True)
    strict = twin_of_split(defended.classifier, device="cpu", bpda=False)
    with pytest.raises(NonDifferentiableError, match="'patch_replacement' is not differentiable"):
        strict(x)
    assert AttackModel(strict, defended.defenses)(x).requires_grad  # the attack model turns BPDA on
    with torch.no_grad():
        strict(x)  # no autograd, no BPDA needed


class FeatureNoise(Defense):
    """A random, differentiable feature-layer step."""

    name = "feature_noise"
    random = True
    differentiable = True

    def transform(self, x, generator=None):
        return x + 0.1 * torch.randn(x.shape, generator=generator, device=x.device)


def test_a_random_feature_step_gets_eot_and_the_attack_models_seeded_draws(model_path, images):
    x = images[0][:4]
    served = split_onnx_classifier(model_path, {LAYER: [FeatureNoise(None)]}, device="cpu")
    model = attack_model(DefendedClassifier(served, []), seed=3)
    assert model.random and model.eot_samples == DEFAULT_EOT_SAMPLES
    with torch.no_grad():
        a, b = model(x), model(x)  # a fresh draw per pass
        model.reset(seed=3)
        c = model(x)  # the same stream again
    assert not torch.equal(a, b) and torch.equal(a, c)


# --- (c) the audit ---------------------------------------------------------------------------------

def spec_of(**table) -> AuditSpec:
    base = {"samples": N, "batch_size": 6, "sanity_samples": 4, "eps_linf": [0.02, 0.05], "eps_l2": [0.5, 1.0],
            "attacks": [{"name": "ddn", "steps": 20}, {"name": "fgsm"}]}
    return from_mapping(AuditSpec, {**base, **table}, "audit")


def test_stacked_pipeline_audits_end_to_end(stacked, fashion_test, tmp_path):
    x, y = fashion_test.as_float(0, N), np.asarray(fashion_test.labels[:N], np.int64)
    spec = spec_of()
    setup = build_setup(stacked, spec, torch.from_numpy(x[:8]))
    assert setup.mode["feature_layers"] == {LAYER: ["patch_replacement"]}
    assert setup.mode["bpda"] == ["patch_replacement", f"patch_replacement@{LAYER}"]
    assert ["layer='image'" in setup.mode["defenses"][0], f"layer='{LAYER}'" in setup.mode["defenses"][1]] == [True, True]
    assert isinstance(setup.scorer.classifier.segments[0], OnnxSegment)  # serving stays on ONNX Runtime
    records = Auditor(setup, spec, x, y, tmp_path, progress=False).run()

    clean = [r for r in records if r["attack"] == "clean"]
    correct = {r["sample"] for r in clean if r["correct"]}
    assert len(clean) == N and correct
    ddn = [r for r in records if r["attack"] == "ddn"]
    assert sorted(r["sample"] for r in ddn) == sorted(correct)
    assert all(r["gradients"] == 20 for r in ddn)
    for r in records:
        if r["kind"] == "budget":
            assert r["sample"] in correct
            assert r[r["norm"]] <= r["eps"] + 1e-6 or not r["valid"]
        if r["attack"] != "clean":
            assert r["success"] == (r["valid"] and r["adv_pred"] != r["label"] and not r["flagged"])
    # every example was rounded to 8 bits and re-scored through the ONNX Runtime split classifier
    stored = load_examples(tmp_path, "ddn")
    adv = torch.from_numpy(np.stack([stored[r["sample"]] for r in ddn]))
    assert torch.equal(torch.round(adv * 255) / 255, adv)
    assert setup.scorer.predict(adv).labels.tolist() == [r["adv_pred"] for r in ddn]
    # the gradient path works: BPDA-DDN breaks most correct images within 20 steps
    assert sum(r["success"] for r in ddn) >= len(ddn) // 2, [r["success"] for r in ddn]
    sanity = [r for r in records if r["attack"].startswith("sanity")]
    assert sanity and all(r["success"] for r in sanity)


def test_non_adaptive_audit_attacks_the_bare_split_model(stacked, fashion_test):
    probe = torch.from_numpy(fashion_test.as_float(0, 8))
    setup = build_setup(stacked, spec_of(adaptive="off"), probe)
    assert setup.model.defenses == [] and setup.mode["bpda"] == [] and setup.mode["feature_layers"] == {}
    assert setup.model.classifier.steps == [[]] and len(setup.mode["defenses"]) == 2
    assert bare(setup.twin).steps == [[]] and setup.twin.steps[0][0].config.layer == LAYER
