"""The feature-squeezing detector (Xu, Evans, Qi, NDSS 2018, section 4).

For an input x (the image the classifier sees, after the pipeline's defenses), classifier f and
squeezers s_1 ... s_S:

    score(x) = max_i || softmax(f(x)) - softmax(f(s_i(x))) ||_1      (in [0, 2])

computed with one stacked classifier call on [x, s_1(x), ..., s_S(x)] (so (1 + S) N images, and
the first N logits are the prediction itself). An input is flagged when score > threshold; the
threshold is calibrated on clean held-out data at a target false-positive rate (5% in the
reference setting) by ``advshield fit`` and stored as a JSON artifact with a sidecar recording its
sha256, the squeezers, the calibration data's sha256 and the achieved rates.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch

from advshield.core.errors import ArtifactError, ConfigError, InputError
from advshield.core.validation import check, to_mapping
from advshield.defenses.base import Defense, write_artifact_meta
from advshield.defenses.registry import build_defense, parse_defense, register_detector

ARTIFACT_FORMAT = "advshield.squeeze_threshold/1"

# Xu et al.'s MNIST setting: 1-bit depth and 2x2 median.
_DEFAULT_SQUEEZERS = (
    MappingProxyType({"type": "bit_depth", "bits": 1}),
    MappingProxyType({"type": "median", "size": 2}),
)


@dataclass(frozen=True)
class SqueezeDetectorConfig:
    squeezers: tuple[Mapping[str, Any], ...] = _DEFAULT_SQUEEZERS  # deterministic defense specs
    fpr: float = 0.05  # target false-positive rate on clean data
    artifact: str = "squeeze_threshold"  # name of the [artifacts] entry holding the threshold JSON
    reject: bool = False  # flagged images get label -1 instead of their prediction
    random: ClassVar[bool] = False
    parsed: tuple[tuple[str, Any], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check(len(self.squeezers) >= 1, "squeezers: at least one squeezer is needed")
        parsed = []
        for i, spec in enumerate(self.squeezers):
            name, cfg = parse_defense(dict(spec), f"squeezers[{i}]")
            check(not getattr(cfg, "random", False),
                  f"squeezers[{i}].type: {name!r} is random; a squeezer must be deterministic")
            parsed.append((name, cfg))
        object.__setattr__(self, "parsed", tuple(parsed))
        check(0.0 < self.fpr < 1.0, f"fpr: must be within (0, 1), got {self.fpr}")
        check(bool(self.artifact), "artifact: must name an entry of the pipeline's [artifacts] table")

    def squeezer_specs(self) -> list[dict[str, Any]]:
        """The squeezers in canonical form (every config key spelled out), as stored in the artifact."""
        return [{"type": name, **to_mapping(cfg)} for name, cfg in self.parsed]


def l1_scores(probs: torch.Tensor, n: int) -> torch.Tensor:
    """probs [(1 + S) n, K] (input first, then each squeezer) -> max_i ||p_0 - p_i||_1, [n]."""
    p = probs.reshape(-1, n, probs.shape[-1])
    return (p[1:] - p[:1]).abs().sum(-1).amax(0)


def calibrate_threshold(scores: np.ndarray, fpr: float) -> float:
    """Smallest order statistic t of the clean scores with #{score > t} <= fpr * n: the
    ceil((1 - fpr) n)-th smallest score. Flagging ``score > t`` then has a false-positive rate of
    at most ``fpr`` on the calibration data and, for exchangeable clean data, in expectation."""
    s = np.sort(np.asarray(scores, np.float64).ravel())
    if not np.isfinite(s).all():
        raise InputError("calibration scores contain NaN or infinite values")
    n = len(s)
    if n * fpr < 1:
        raise InputError(f"calibrating at fpr = {fpr} needs at least {math.ceil(1 / fpr)} clean samples, got {n}")
    k = math.ceil((1.0 - fpr) * n - 1e-9)
    return float(s[k - 1])


@register_detector("squeeze", SqueezeDetectorConfig)
class SqueezeDetector:
    """Squeezers plus a calibrated threshold. ``logits_and_score`` is differentiable when the
    classifier is (run the squeezers with ``bpda=True`` under autograd), for detector-aware attacks."""

    name: ClassVar[str] = "squeeze"
    random: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True

    def __init__(self, config: SqueezeDetectorConfig) -> None:
        self.config = config
        self.squeezers: list[Defense] = [build_defense(name, cfg) for name, cfg in config.parsed]
        self.threshold: float | None = None
        self.meta: dict[str, Any] = {}

    @property
    def artifact_names(self) -> tuple[str, ...]:
        return (self.config.artifact,)

    def __repr__(self) -> str:
        return f"SqueezeDetector({[repr(s) for s in self.squeezers]}, threshold={self.threshold})"

    # --- scoring ------------------------------------------------------------------------------
    def stack(self, x: torch.Tensor, *, bpda: bool = False) -> torch.Tensor:
        """[x, s_1(x), ..., s_S(x)] along the batch dimension: [(1 + S) N, C, H, W]."""
        return torch.cat([x] + [s(x, None, bpda=bpda) for s in self.squeezers])

    def logits_and_score(self, x: torch.Tensor, classifier: Callable[[torch.Tensor], torch.Tensor],
                         *, bpda: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One classifier call on the stack: (logits of x [N, K], score [N])."""
        n = len(x)
        logits = classifier(self.stack(x, bpda=bpda))
        return logits[:n], l1_scores(torch.softmax(logits.float(), dim=-1), n)

    def flag(self, score: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            raise ArtifactError(f"squeeze detector: no threshold; run `advshield fit` (artifact {self.config.artifact!r})")
        return score > self.threshold

    # --- calibration (fit) and its artifact --------------------------------------------------
    def calibrate(self, scores: np.ndarray | torch.Tensor) -> dict[str, Any]:
        """Set the threshold from clean scores at the configured false-positive rate; returns the
        calibration record (threshold, achieved rate, score quantiles)."""
        s = np.asarray(torch.as_tensor(scores).detach().cpu().numpy(), np.float64).ravel()
        self.threshold = calibrate_threshold(s, self.config.fpr)
        achieved = float((s > self.threshold).mean())
        record: dict[str, Any] = {
            "threshold": self.threshold,
            "fpr_target": self.config.fpr,
            "fpr_calibration": achieved,
            "samples": len(s),
            "score_quantiles": {str(q): float(np.quantile(s, q / 100)) for q in (50, 90, 95, 99)},
        }
        tied = float((s >= self.threshold).mean())
        if achieved < 0.5 * self.config.fpr and tied > self.config.fpr:
            # ties at the threshold (typically score 2: a squeezer flips the clean prediction outright,
            # as 1-bit depth does on colour images) leave the detector far below its target rate
            record["warning"] = (
                f"{tied:.1%} of the clean calibration images score {self.threshold:.3g} or more (the squeezers "
                f"change their prediction outright), so the detector flags only {achieved:.1%} of them, not the "
                f"{self.config.fpr:.0%} asked for: choose milder squeezers (Xu et al. use 5-bit depth and a 2x2 "
                f"median on colour images)"
            )
        return record

    def save(self, path: str | Path, record: Mapping[str, Any], **meta: Any) -> dict[str, Any]:
        """Write the threshold JSON (deterministic content: same calibration, same sha256) and its sidecar."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": ARTIFACT_FORMAT, "detector": self.name, "squeezers": self.config.squeezer_specs(),
               **dict(record), **{k: v for k, v in meta.items() if k in ("data_sha256", "model_sha256", "seed")}}
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        self.meta = write_artifact_meta(path, format=ARTIFACT_FORMAT, detector=self.name,
                                        parameters=to_mapping(self.config), **dict(record), **meta)
        return self.meta

    def fit(self, scores: np.ndarray | torch.Tensor, paths: Mapping[str, Path], **meta: Any) -> dict[str, Any]:
        """Calibrate on clean scores (see ``DefendedClassifier.detector_scores``) and save."""
        if self.config.artifact not in paths:
            raise ConfigError(f"artifact: no path given for {self.config.artifact!r}")
        record = self.calibrate(scores)
        self.save(paths[self.config.artifact], record, **meta)
        return record

    def load(self, files: Mapping[str, Path]) -> None:
        """Read the threshold; it must have been calibrated for these squeezers and this rate."""
        if self.config.artifact not in files:
            raise ArtifactError(f"squeeze detector: artifact {self.config.artifact!r} not given")
        path = Path(files[self.config.artifact])
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: cannot read the detector threshold: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(f"{path}: not a squeeze-detector threshold (format {doc.get('format') if isinstance(doc, dict) else None!r})")
        if doc.get("squeezers") != self.config.squeezer_specs():
            raise ArtifactError(f"{path}: calibrated for squeezers {doc.get('squeezers')}, the pipeline has "
                                f"{self.config.squeezer_specs()}; run `advshield fit` again")
        if not math.isclose(float(doc.get("fpr_target", -1)), self.config.fpr):
            raise ArtifactError(f"{path}: calibrated at fpr {doc.get('fpr_target')}, the pipeline asks for "
                                f"{self.config.fpr}; run `advshield fit` again")
        threshold = doc.get("threshold")
        if not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise ArtifactError(f"{path}: invalid threshold {threshold!r}")
        self.threshold = float(threshold)
        self.meta = doc

