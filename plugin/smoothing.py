"""Randomized smoothing (Cohen, Rosenfeld and Kolter, 2019) over any classifier.

The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c). The base classifier ``f``
is anything that maps a batch to logits or labels: the whole defended pipeline (noise is added to
the input *before* the defenses), an ONNX Runtime model, or a remote Triton/advshield server.
Only labels are needed, so certification works through a black-box endpoint.

* ``predict``: PREDICT, a two-sided binomial test between the two top classes; ABSTAIN (-1) unless
  its p-value is at most alpha.
* ``certify``: CERTIFY, n0 samples select the class, n fresh samples give a one-sided
  Clopper-Pearson lower bound p_A on its probability; radius = sigma * Phi^-1(p_A), or ABSTAIN
  when p_A <= 1/2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from tqdm.auto import tqdm

from advshield.core.validation import check

ABSTAIN = -1
Base = Callable[[torch.Tensor], torch.Tensor]  # batch -> logits [N, K] or labels [N]


@dataclass(frozen=True)
class SmoothingConfig:
    sigma: float = 0.25
    n0: int = 100  # selection samples
    n: int = 1000  # estimation samples
    alpha: float = 0.001  # failure probability
    batch_size: int = 500
    seed: int = 0
    clip: bool = False  # clip noisy inputs to [0, 1] (changes the guarantee's base classifier only)

    def __post_init__(self) -> None:
        check(self.sigma > 0, f"sigma: must be > 0, got {self.sigma}")
        check(self.n0 >= 1 and self.n >= 1, f"n0, n: must be >= 1, got {self.n0}, {self.n}")
        check(0 < self.alpha < 0.5, f"alpha: must be in (0, 0.5), got {self.alpha}")
        check(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")


def lower_confidence_bound(k: int | np.ndarray, n: int, alpha: float) -> np.ndarray | float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion with k of n."""
    k = np.asarray(k)
    out = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1), n - k + 1), 0.0)
    return float(out) if out.ndim == 0 else out


def radius(p_lower: float | np.ndarray, sigma: float) -> np.ndarray | float:
    """Certified L2 radius sigma * Phi^-1(p_lower); negative values mean ABSTAIN."""
    return sigma * norm.ppf(p_lower)


def _labels(out: torch.Tensor) -> torch.Tensor:
    return out.argmax(1) if out.ndim == 2 else out.long()


@dataclass(frozen=True)
class Certificate:
    label: int  # ABSTAIN (-1) when not certified
    radius: float  # 0.0 when abstaining
    p_lower: float
    counts: np.ndarray  # class counts of the n estimation samples


class SmoothedClassifier:
    """g(x) over ``base``; ``num_classes`` classes; noise N(0, sigma^2) on the input."""

    def __init__(self, base: Base, num_classes: int, config: SmoothingConfig | None = None) -> None:
        self.base = base
        self.num_classes = num_classes
        self.config = config or SmoothingConfig()
        self.samples_drawn = 0

    def sample_counts(self, x: torch.Tensor, n: int, generator: torch.Generator) -> np.ndarray:
        """Class counts of f(x + noise) over n noise draws for one image x [C, H, W]."""
        cfg = self.config
        counts = torch.zeros(self.num_classes, dtype=torch.long)
        remaining = n
        with torch.no_grad():
            while remaining > 0:
                b = min(cfg.batch_size, remaining)
                batch = x.unsqueeze(0).expand(b, *x.shape)
                noise = torch.randn(batch.shape, generator=generator, device=generator.device) * cfg.sigma
                noisy = batch + noise.to(x.device)
                if cfg.clip:
                    noisy = noisy.clamp(0, 1)
                counts += torch.bincount(_labels(self.base(noisy)).cpu(), minlength=self.num_classes)[: self.num_classes]
                remaining -= b
        self.samples_drawn += n
        return counts.numpy()

    def _generator(self, index: int) -> torch.Generator:
        # one stream per (seed, sample index): a sample's result does not depend on which shard or
        # batch of images it was certified in (it does depend on batch_size, the noise chunking)
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + index)

    def predict(self, x: torch.Tensor, index: int = 0) -> int:
        """PREDICT: the top class if it beats the runner-up at level alpha, else ABSTAIN."""
        counts = self.sample_counts(x, self.config.n, self._generator(index))
        top2 = np.argsort(-counts, kind="stable")[:2]
        na, nb = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(na, na + nb, 0.5).pvalue > self.config.alpha:
            return ABSTAIN
        return int(top2[0])

    def certify(self, x: torch.Tensor, index: int = 0) -> Certificate:
        """CERTIFY: (class, radius) with probability >= 1 - alpha, or ABSTAIN."""
        cfg = self.config
        g = self._generator(index)
        c_a = int(np.argmax(self.sample_counts(x, cfg.n0, g)))
        counts = self.sample_counts(x, cfg.n, g)
        p_lower = float(lower_confidence_bound(int(counts[c_a]), cfg.n, cfg.alpha))
        if p_lower <= 0.5:
            return Certificate(ABSTAIN, 0.0, p_lower, counts)
        return Certificate(c_a, float(radius(p_lower, cfg.sigma)), p_lower, counts)

    def certify_batch(self, x: torch.Tensor, start_index: int = 0, progress: bool = True) -> list[Certificate]:
        return [self.certify(xi, start_index + i)
                for i, xi in enumerate(tqdm(x, desc=f"certify sigma={self.config.sigma:g}", disable=not progress, unit="img"))]


def certified_accuracy(labels: np.ndarray, certified: np.ndarray, radii: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Share of samples certified correctly with radius >= r, for each r of ``grid``."""
    ok = (certified == labels) & (certified != ABSTAIN)
    return np.array([float(np.mean(ok & (radii >= r))) for r in grid])


def certified_budget(grid: np.ndarray, accuracy: np.ndarray, target: float) -> float:
    """Largest radius of ``grid`` at which certified accuracy still meets ``target`` (0 if none)."""
    meets = np.asarray(grid)[np.asarray(accuracy) >= target]
    return float(meets.max()) if len(meets) else 0.0
