"""Adaptive wrappers checked against mathematics: BPDA with the exact function is autograd, EOT
over a deterministic pipeline is the plain gradient and over a random one the mean of per-draw
gradients, the detector-aware mode counts flagged examples as failures; transfer attacks."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from attack_helpers import linear_model, tiny_cnn

from advshield.attacks.adaptive import DEFAULT_EOT_SAMPLES, AttackModel, attack_model, is_random
from advshield.attacks.boundary_projection import bp
from advshield.attacks.decoupled_direction_norm import ddn
from advshield.attacks.primitives import Counted, l2, predict, quantize, value_and_grad
from advshield.attacks.transfer import Ensemble, load_surrogates, surrogate_model, transfer_attack
from advshield.core.errors import InputError
from advshield.defenses.base import Defense, NonDifferentiableError


class Square(Defense):
    """Declared non-differentiable; its BPDA approximation is the exact function."""

    name = "square"

    def transform(self, x, generator=None):
        return x * x

    def approximation(self, x):
        return x * x


class Round(Defense):
    """8-bit rounding: non-differentiable, identity approximation (the classic BPDA case)."""

    name = "round"

    def transform(self, x, generator=None):
        return quantize(x)


class Noise(Defense):
    """Additive Gaussian noise, declared random and differentiable."""

    name = "noise"
    random = True
    differentiable = True

    def transform(self, x, generator=None):
        return (x + 0.1 * torch.randn(x.shape, generator=generator, device=x.device)).clamp(0, 1)


class UndeclaredNoise(Noise):
    random = False  # random all the same: only measuring finds it


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnn():
    return tiny_cnn()


@pytest.fixture(scope="module")
def batch(fashion_test):
    return torch.from_numpy(fashion_test.as_float(0, 8)), torch.from_numpy(fashion_test.labels[:8])


def _autograd(fn, x, y):
    xr = x.clone().requires_grad_(True)
    loss = -F.cross_entropy(fn(xr), y, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), xr)
    return g


# --- BPDA --------------------------------------------------------------------------------------

def test_bpda_with_the_exact_function_equals_autograd(cnn, batch):
    x, y = batch
    model = AttackModel(cnn, [Square(None)])
    _, g, _ = value_and_grad(model, x, y, False, "ce")
    assert torch.allclose(g, _autograd(lambda v: cnn(v * v), x, y), atol=1e-6)


def test_bpda_forward_is_the_defense_and_backward_its_approximation(cnn, batch):
    x, y = batch
    model = AttackModel(cnn, [Round(None)])
    _, g, logits = value_and_grad(model, x + 0.001, y, False, "ce")
    h = quantize(x + 0.001)
    with torch.no_grad():
        assert torch.allclose(logits, cnn(h))  # forward: the real defense
    assert torch.allclose(g, _autograd(cnn, h, y), atol=1e-6)  # backward: identity at h


def test_a_non_differentiable_defense_fails_loudly_without_bpda(batch):
    x = batch[0].clone().requires_grad_(True)
    with pytest.raises(NonDifferentiableError, match="'round' is not differentiable; run it with bpda=True"):
        Round(None)(x)


# --- EOT ---------------------------------------------------------------------------------------

def test_eot_over_a_deterministic_pipeline_equals_the_plain_gradient(cnn, batch):
    x, y = batch
    plain = AttackModel(cnn, [Square(None)])
    eot = AttackModel(cnn, [Square(None)], eot_samples=7)
    loss1, g1, z1 = value_and_grad(plain, x, y, False, "ce")
    loss7, g7, z7 = value_and_grad(eot, x, y, False, "ce")
    assert torch.allclose(g1, g7, atol=1e-6) and torch.allclose(z1, z7, atol=1e-5) and torch.allclose(loss1, loss7, atol=1e-5)
    assert eot.gradients == 7 * len(x) and plain.gradients == len(x)


def test_eot_gradient_is_the_mean_of_the_per_draw_gradients(cnn, batch):
    x, y = batch
    model = AttackModel(cnn, [Noise(None)], eot_samples=5, seed=3)
    _, g, _ = value_and_grad(model, x, y, False, "ce")
    gen = torch.Generator().manual_seed(3)
    draws = [_autograd(lambda v, gen=gen: cnn(Noise(None).transform(v, gen)), x, y) for _ in range(5)]
    assert torch.allclose(g, torch.stack(draws).mean(0), atol=1e-6)
    single = _autograd(lambda v: cnn(Noise(None).transform(v, torch.Generator().manual_seed(3))), x, y)
    assert not torch.allclose(g, single, atol=1e-4)  # the draws do differ


def test_random_defenses_draw_from_the_models_seeded_generator(cnn, batch):
    x, _ = batch
    a, b = AttackModel(cnn, [Noise(None)], seed=1), AttackModel(cnn, [Noise(None)], seed=1)
    with torch.no_grad():
        first, again = a(x), a(x)
        assert torch.equal(first, b(x)) and not torch.equal(first, again)
        a.reset()
        assert torch.equal(a(x), first)


def test_attack_model_switches_eot_on_when_the_pipeline_is_random(cnn, batch):
    x, _ = batch
    as_pipeline = lambda *d: SimpleNamespace(defenses=list(d), classifier=cnn)  # noqa: E731
    assert attack_model(as_pipeline(), twin=cnn).eot_samples == 1
    assert attack_model(as_pipeline(Square(None)), twin=cnn, probe=x).eot_samples == 1
    assert attack_model(as_pipeline(Noise(None)), twin=cnn).eot_samples == DEFAULT_EOT_SAMPLES
    assert attack_model(as_pipeline(UndeclaredNoise(None)), twin=cnn).eot_samples == 1  # not measured
    assert attack_model(as_pipeline(UndeclaredNoise(None)), twin=cnn, probe=x).eot_samples == DEFAULT_EOT_SAMPLES
    assert attack_model(as_pipeline(Noise(None)), twin=cnn, eot_samples=3).eot_samples == 3
    assert is_random(lambda v, g: Noise(None)(v, g), x) and not is_random(lambda v, g: Square(None)(v, g), x)


def test_attack_model_of_a_served_pipeline_uses_the_twin(onnx_classifier, twin, test_batch):
    from advshield.plugin.pipeline import DefendedClassifier

    x, y = test_batch[0][:4], test_batch[1][:4]
    model = attack_model(DefendedClassifier(onnx_classifier, [Round(None)]))  # builds its own twin
    _, g, z = value_and_grad(model, x, y, False, "ce")
    assert torch.allclose(z, onnx_classifier(quantize(x)), atol=1e-4)
    assert torch.allclose(g, _autograd(twin, quantize(x), y), atol=1e-5)


def test_attack_model_validates():
    with pytest.raises(InputError, match="eot_samples must be >= 1, got 0"):
        AttackModel(lambda v: v, eot_samples=0)


# --- detector-aware ----------------------------------------------------------------------------

def _three_class_problem():
    """Class-0 samples whose nearest adversarial class (1) lies beyond a linear detector's
    threshold: an attack blind to the detector is flagged, an aware one must reach class 2."""
    lin = linear_model(n=60, shape=(1, 8, 8), classes=3, depth=0.5, seed=2)
    keep = (lin.y == 0) & (lin.nearest_class() == 1)
    x, y = lin.x[keep], lin.y[keep]
    e01 = (lin.W[1] - lin.W[0]) / (lin.W[1] - lin.W[0]).norm()

    def score(v):
        return (v.flatten(1) - 0.5) @ e01

    threshold = float(score(x).max()) + 0.02
    return lin, x, y, score, threshold


def test_detector_aware_attack_breaks_the_model_without_being_flagged():
    lin, x, y, score, threshold = _three_class_problem()
    assert len(x) >= 5 and threshold < 0  # crossing into class 1 (score >= 0) is always flagged
    blind = ddn(lin, x, y, steps=100)
    assert bool((lin(blind).argmax(1) != y).all()) and bool((score(blind) > threshold).all())  # all flagged
    aware_model = AttackModel(lin, detector=score, threshold=threshold)
    for attack in (ddn, partial(bp, out_fallback="shrink")):
        aware = attack(aware_model, x, y, steps=100)
        pred = lin(aware).argmax(1)
        assert bool((pred == 2).all()) and bool((score(aware) <= threshold).all())
        assert bool((l2(aware - x) > l2(blind - x)).all())  # evading the detector costs distortion
    assert aware_model.reject_class and predict(aware_model, x, y, False).shape == (len(x), 3)


# --- transfer ----------------------------------------------------------------------------------

def test_ensemble_averages_logits():
    a, b = (lambda v: v.flatten(1)[:, :3]), (lambda v: 3 * v.flatten(1)[:, :3])
    x = torch.rand(2, 1, 2, 2)
    assert torch.allclose(Ensemble([a, b])(x), 2 * x.flatten(1)[:, :3])
    with pytest.raises(InputError, match="at least one surrogate"):
        Ensemble([])


def test_transfer_attack_crafted_on_the_surrogate_fools_the_target(surrogate_path, onnx_classifier, test_batch):
    x, y = test_batch[0][:32], test_batch[1][:32]
    (surrogate,) = load_surrogates([surrogate_path], device="cpu")
    counted = Counted(surrogate)
    adv = transfer_attack("pgd_linf", counted, x, y, eps=0.15, steps=10)
    assert counted.gradients == 10 * 32  # crafted on the surrogate only
    clean = float((onnx_classifier(x).argmax(1) == y).float().mean())
    robust = float((onnx_classifier(adv).argmax(1) == y).float().mean())
    assert clean > 0.8 and robust < clean - 0.3, (clean, robust)
    grey = surrogate_model([surrogate, surrogate], [Round(None)])
    assert isinstance(grey.classifier, Ensemble) and grey.defenses and grey.eot_samples == 1
