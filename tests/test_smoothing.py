"""Randomized smoothing: the Clopper-Pearson bound, radii and abstention, against known values."""

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from advshield.core.errors import ConfigError
from advshield.plugin.smoothing import (
    ABSTAIN,
    SmoothedClassifier,
    SmoothingConfig,
    certified_accuracy,
    certified_budget,
    lower_confidence_bound,
)


def constant(label: int, k: int = 10):
    def f(x):
        out = torch.zeros(len(x), k)
        out[:, label] = 1.0
        return out

    return f


def coin(x):
    """Label 0 or 1 by the sign of the noise on the first pixel: a 50/50 classifier."""
    return (x.flatten(1)[:, 0] > 0.5).long()


def test_bound_known_values():
    # k = n: the bound solves p^n = alpha
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    # definition: P(Bin(n, p_lower) >= k) = alpha
    for k, n, a in [(50, 100, 0.05), (990, 1000, 0.001), (7, 10, 0.01)]:
        p = lower_confidence_bound(k, n, a)
        assert binom.sf(k - 1, n, p) == pytest.approx(a, rel=1e-6)
    # a textbook value: 8 of 10, 95% one-sided Clopper-Pearson lower bound = 0.4931
    assert lower_confidence_bound(8, 10, 0.05) == pytest.approx(0.4931, abs=1e-4)


def test_constant_classifier_radius_is_exact():
    cfg = SmoothingConfig(sigma=0.25, n0=10, n=500, alpha=0.001, batch_size=128)
    s = SmoothedClassifier(constant(3), 10, cfg)
    cert = s.certify(torch.full((1, 28, 28), 0.5))
    assert cert.label == 3 and cert.counts[3] == 500
    assert cert.radius == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 500)), rel=1e-12)
    assert s.predict(torch.zeros(1, 28, 28)) == 3


def test_fifty_fifty_classifier_abstains():
    cfg = SmoothingConfig(sigma=0.5, n0=50, n=2000, alpha=0.001)
    s = SmoothedClassifier(coin, 2, cfg)
    x = torch.full((1, 4, 4), 0.5)
    cert = s.certify(x)
    assert cert.label == ABSTAIN and cert.radius == 0.0 and cert.p_lower < 0.5
    assert 800 < cert.counts[0] < 1200
    assert s.predict(x) == ABSTAIN


def test_seeded_runs_are_reproducible_and_seeds_differ(onnx_classifier, test_batch):
    x = test_batch[0][:2]
    def base(z):
        return torch.from_numpy(onnx_classifier.run(z.numpy()))  # noisy inputs: no [0, 1] check

    mk = lambda seed: SmoothedClassifier(base, 10, SmoothingConfig(sigma=0.5, n0=20, n=200, seed=seed))  # noqa: E731
    a = [c.counts for c in mk(1).certify_batch(x, progress=False)]
    b = [c.counts for c in mk(1).certify_batch(x, progress=False)]
    c = [c.counts for c in mk(2).certify_batch(x, progress=False)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    # sharding: certifying image 1 alone with its global index gives the same counts
    alone = mk(1).certify(x[1], index=1)
    assert np.array_equal(alone.counts, a[1])


def test_certified_accuracy_and_budget():
    labels = np.array([0, 1, 2, 3])
    pred = np.array([0, 1, ABSTAIN, 2])
    radii = np.array([0.5, 0.2, 0.0, 1.0])
    grid = np.array([0.0, 0.25, 0.5, 0.75])
    acc = certified_accuracy(labels, pred, radii, grid)
    np.testing.assert_allclose(acc, [0.5, 0.25, 0.25, 0.0])
    assert certified_budget(grid, acc, 0.25) == 0.5
    assert certified_budget(grid, acc, 0.9) == 0.0


@pytest.mark.parametrize(("kw", "match"), [({"sigma": 0}, "sigma: must be > 0"), ({"alpha": 0.7}, "alpha")])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        SmoothingConfig(**kw)


def test_smoothed_serving_option(tmp_path, pipeline_path, fashion_test):
    """A [smoothing] section makes predict answer CERTIFY's label and radius, reproducibly per seed."""
    from advshield.plugin.config import load_pipeline
    from advshield.plugin.pipeline import DefendedClassifier

    text = pipeline_path.read_text().replace("../models/", f"{pipeline_path.parent.parent.as_posix()}/models/")
    (tmp_path / "p.toml").write_text(text + "\n[smoothing]\nsigma = 0.25\nn0 = 20\nn = 200\nalpha = 0.001\n")
    clf = DefendedClassifier.from_config(load_pipeline(tmp_path / "p.toml"))
    x = torch.from_numpy(fashion_test.as_float(0, 4))
    a, b = clf.predict(x, seed=5), clf.predict(x, seed=5)
    assert a.radius is not None and a.seed == 5
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.radius, b.radius)
    assert ((a.labels == ABSTAIN) == (a.radius == 0)).all()
    assert (a.radius <= 0.25 * norm.ppf(0.001 ** (1 / 200)) + 1e-6).all()
    np.testing.assert_allclose(a.probs.sum(1), 1.0, rtol=1e-6)
    # the same answer as the certification code on the same base classifier and seed
    s = SmoothedClassifier(clf.logits, 10, SmoothingConfig(sigma=0.25, n0=20, n=200, seed=5))
    clf.classifier.validate = False
    try:
        assert s.certify(x[2], index=2).label == a.labels[2]
    finally:
        clf.classifier.validate = True
    with pytest.raises(ConfigError, match=r"smoothing.sigma: must be > 0|smoothing: sigma: must be > 0"):
        (tmp_path / "q.toml").write_text(text + "\n[smoothing]\nsigma = 0\n")
        load_pipeline(tmp_path / "q.toml")
