"""Adaptive wrappers: a defended pipeline as a differentiable ``model(x) -> logits`` for any
gradient attack.

* **BPDA**: every non-differentiable defense runs forward as itself and backward through its
  declared ``approximation`` (``Defense.__call__(..., bpda=True)``); differentiable defenses are
  differentiated exactly. Nothing is silent: a defense without BPDA under autograd raises.
* **Feature layers**: a pipeline whose classifier is split around feature-layer defenses
  (``SplitClassifier``) is attacked through its split twin (``twin_of``: every ONNX segment
  converted to torch and parity-checked, the same defenses in between); ``AttackModel`` runs the
  feature-layer steps with BPDA and with its generator, like the image-layer ones.
* **EOT**: random defenses draw from the model's own seeded generator, a new draw per forward
  pass; ``eot_samples = n`` makes every attack average its loss gradients (and decision logits)
  over n draws (see ``advshield.attacks.primitives.value_and_grad``). ``attack_model`` switches EOT on
  when the pipeline declares a random defense or two passes of its defenses differ.
* **Detector-aware**: with a differentiable detector score s(x) and its threshold t, the model
  gains a last "flagged" logit max_j z_j + weight * (s(x) - t), which wins exactly when the input is
  flagged; attacks count a flagged input as a failure (untargeted: the flagged logit is merged
  into the true class), so the score enters every attack's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from advshield.core.errors import InputError
from advshield.defenses.base import Defense
from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier
from advshield.plugin.split import SplitClassifier, twin_of_split

DEFAULT_EOT_SAMPLES = 10


class AttackModel:
    """Defenses (BPDA where needed, seeded randomness) then a differentiable classifier,
    optionally with the detector's reject logit. Counts ``forwards`` and ``gradients`` (images)."""

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        defenses: Sequence[Defense] = (),
        *,
        eot_samples: int = 1,
        seed: int = 0,
        detector: Callable[[torch.Tensor], torch.Tensor] | None = None,
        threshold: float = 0.0,
        detector_weight: float = 10.0,
    ) -> None:
        if eot_samples < 1:
            raise InputError(f"eot_samples must be >= 1, got {eot_samples}")
        if detector_weight <= 0:
            raise InputError(f"detector_weight must be > 0, got {detector_weight}")
        self.classifier = classifier
        self.defenses = list(defenses)
        self.eot_samples = int(eot_samples)
        self.seed = int(seed)
        self.detector = detector
        self.threshold = float(threshold)
        self.detector_weight = float(detector_weight)
        self.forwards = 0
        self.gradients = 0
        self._generators: dict[str, torch.Generator] = {}

    @property
    def random(self) -> bool:
        return any(d.random for d in self.defenses) or bool(getattr(self.classifier, "random", False))

    @property
    def reject_class(self) -> bool:
        return self.detector is not None

    def reset(self, seed: int | None = None) -> None:
        """Zero the counters and restart the defenses' random stream (from ``seed`` if given)."""
        self.forwards = self.gradients = 0
        if seed is not None:
            self.seed = int(seed)
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def defend(self, x: torch.Tensor) -> torch.Tensor:
        g = self.generator(x.device)  # deterministic defenses ignore it
        for d in self.defenses:
            x = d(x, g, bpda=True)
        return x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier on defended images; a split one runs its feature-layer steps with BPDA
        and this model's generator."""
        if isinstance(self.classifier, SplitClassifier):
            return self.classifier(x, self.generator(x.device), bpda=True)
        return self.classifier(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += int(x.shape[0])
        logits = self.classify(self.defend(x))
        if self.detector is None:
            return logits
        score = self.detector(x).reshape(-1).to(logits.dtype)
        reject = logits.amax(1) + self.detector_weight * (score - self.threshold)
        return torch.cat([logits, reject[:, None]], dim=1)


@torch.no_grad()
def is_random(defend: Callable[[torch.Tensor, torch.Generator], torch.Tensor], probe: torch.Tensor) -> bool:
    """Measured randomness: two passes of ``defend`` with differently seeded generators differ."""
    a = defend(probe, torch.Generator(device=probe.device).manual_seed(1))
    b = defend(probe, torch.Generator(device=probe.device).manual_seed(2))
    return not torch.equal(a, b)


def twin_of(pipeline: Any, **kwargs: Any) -> torch.nn.Module:
    """The differentiable twin of a pipeline's classifier (itself when it already is one).

    An ONNX Runtime ``SplitClassifier`` (feature-layer defenses) gets its split twin
    (``twin_of_split``): each segment converted to torch and parity-checked against its ONNX Runtime
    segment, the same defenses between them, BPDA on. ``kwargs`` (e.g. ``check_with``: real images
    for the parity check) go to the twin's constructor."""
    clf = pipeline.classifier
    cfg = getattr(pipeline, "config", None)
    opts: dict[str, Any] = {"device": "auto", "validate": False}
    if cfg is not None:
        opts.update(device=cfg.model.device, tolerance=cfg.model.parity_tolerance)
    opts.update(kwargs)
    if isinstance(clf, SplitClassifier):
        return twin_of_split(clf, **opts)
    if isinstance(clf, torch.nn.Module):
        return clf
    if not isinstance(clf, OnnxClassifier):
        raise InputError(f"cannot build a differentiable twin of {clf!r}: pass twin=... explicitly")
    return TwinClassifier(clf.model, reference=clf, **opts)


def feature_steps(classifier: Any) -> dict[str, list[Defense]]:
    """The defenses a split classifier runs on its feature layers (cut -> steps); {} otherwise."""
    if not isinstance(classifier, SplitClassifier):
        return {}
    return {c: g for c, g in classifier.layer_steps().items() if g}


def bare(classifier: Any) -> Any:
    """The classifier without its feature-layer steps (the non-adaptive baseline attacks it)."""
    return classifier.without_steps() if isinstance(classifier, SplitClassifier) else classifier


def attack_model(
    pipeline: Any,
    *,
    twin: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eot_samples: int | None = None,
    probe: torch.Tensor | None = None,
    seed: int = 0,
    detector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    threshold: float = 0.0,
    detector_weight: float = 10.0,
) -> AttackModel:
    """The attack view of a ``DefendedClassifier``: its defenses with BPDA, its classifier's twin.

    ``eot_samples=None`` chooses: ``DEFAULT_EOT_SAMPLES`` when a defense declares randomness or,
    given a ``probe`` batch, two passes of the defenses differ; else 1."""
    defenses = list(pipeline.defenses)
    clf = twin if twin is not None else twin_of(pipeline)
    if eot_samples is None:
        random = any(d.random for d in defenses) or bool(getattr(clf, "random", False))
        if not random and probe is not None and defenses:
            random = is_random(lambda x, g: _run(defenses, x, g), probe)
        eot_samples = DEFAULT_EOT_SAMPLES if random else 1
    return AttackModel(
        clf, defenses, eot_samples=eot_samples, seed=seed,
        detector=detector, threshold=threshold, detector_weight=detector_weight,
    )


def _run(defenses: Sequence[Defense], x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    for d in defenses:
        x = d(x, g)
    return x
