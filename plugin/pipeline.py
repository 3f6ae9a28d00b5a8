"""The defended classifier: decode -> defenses -> classifier -> softmax (+ detector).

``DefendedClassifier.from_config(cfg)`` builds the serving path the pipeline file describes;
``predict`` returns labels, probabilities and (with a detector) score and flag per image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from advshield.core.errors import ConfigError
from advshield.core.validation import from_mapping
from advshield.defenses.base import Defense, verify_artifact
from advshield.defenses.registry import build_defense, build_detector
from advshield.plugin.classifiers import Classifier, classifier_from_config
from advshield.plugin.config import PipelineConfig, load_pipeline
from advshield.plugin.decode import decode_image
from advshield.plugin.pixels import to_pixels
from advshield.plugin.served import ServedClassifier
from advshield.plugin.smoothing import SmoothedClassifier, SmoothingConfig
from advshield.plugin.split import attach_feature_defenses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    labels: np.ndarray  # int64 [N]; -1 where the detector rejected the image (detector reject = true)
    probs: np.ndarray  # float32 [N, K]
    score: np.ndarray | None = None  # detector score [N]
    flagged: np.ndarray | None = None  # bool [N]
    seed: int | None = None  # seed of the random defenses (or of the smoothing noise) for this call
    radius: np.ndarray | None = None  # certified L2 radius [N] with [smoothing] (0 where ABSTAIN = -1)

    def __len__(self) -> int:
        return len(self.labels)


def load_defenses(cfg: PipelineConfig) -> list[Defense]:
    """Build the pipeline's defense steps and load their (checksum-verified) artifacts."""
    steps = []
    for entry in cfg.defenses:
        d = build_defense(entry.type, entry.config)
        if d.needs_fit:
            files = {}
            for key in getattr(d, "artifact_names", ()):
                path = cfg.artifact_path(key)
                verify_artifact(path, cfg.artifacts[key].sha256)
                files[key] = path
            d.load(files)
        steps.append(d)
    return steps


def load_detector(cfg: PipelineConfig):
    """Build the pipeline's detector (None without one) and load its checksum-verified threshold."""
    if cfg.detector is None:
        return None
    det = build_detector(cfg.detector.type, cfg.detector.config)
    files = {}
    for key in det.artifact_names:
        files[key] = cfg.artifact_path(key)
        verify_artifact(files[key], cfg.artifacts[key].sha256)
    det.load(files)
    return det


def smoothing_config(cfg: PipelineConfig):
    """The ``[smoothing]`` section (serving answers with smoothed predictions), or None."""
    table = cfg.extra.get("smoothing")
    if table is None:
        return None

    return from_mapping(SmoothingConfig, table, "smoothing")


class DefendedClassifier:
    """Defense steps in order, then the classifier. Deterministic unless a step is random.

    With a ``detector`` (e.g. ``advshield.defenses.detector.SqueezeDetector``), the defended image
    and its squeezed versions go through the classifier in one stacked call; ``predict`` then
    returns the detector's score and flag per image, and label -1 for flagged images when the
    detector's ``reject`` is set.
    """

    def __init__(self, classifier: Classifier, defenses: list[Defense], class_names: tuple[str, ...] = (),
                 config: PipelineConfig | None = None, detector=None) -> None:
        self.classifier = classifier
        self.detector = detector
        self.defenses = list(defenses)
        self.class_names = class_names or tuple(str(i) for i in range(classifier.num_classes))
        self.input_shape = classifier.input_shape
        self.num_classes = classifier.num_classes
        self.config = config
        self.smoothing = smoothing_config(config) if config is not None else None

    @classmethod
    def from_config(cls, cfg: PipelineConfig | str | Path, classifier: Classifier | None = None) -> DefendedClassifier:
        if not isinstance(cfg, PipelineConfig):
            cfg = load_pipeline(cfg)
        cfg.checksums(verify=True)
        if cfg.served_model:
            bad = [e.type for e in cfg.defenses if getattr(e.config, "layer", "image") not in ("image", "")]
            if bad:
                raise ConfigError(f"defenses: {bad} run on a feature layer, which needs the model's graph; a model "
                                  f"Triton serves ([model] served) is called whole: use layer = \"image\"")
        if classifier is None and cfg.served_model:  # the model Triton serves, over gRPC (plugin/served.py)
            served = ServedClassifier(cfg)
            cfg, classifier = served.config, served
        clf = classifier or classifier_from_config(cfg)
        # defenses on a feature layer (config `layer` = a tensor name) run inside the split model
        clf, image_steps = attach_feature_defenses(cfg, clf, load_defenses(cfg))
        return cls(clf, image_steps, cfg.class_names, cfg, detector=load_detector(cfg))

    @property
    def random(self) -> bool:
        return any(d.random for d in self.defenses)

    def defend(self, x: torch.Tensor, generator: torch.Generator | None = None, *, bpda: bool = False) -> torch.Tensor:
        for d in self.defenses:
            x = d(x, generator, bpda=bpda)
        return x

    def logits(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.classifier(self.defend(x, generator))

    __call__ = logits

    def logits_and_score(self, x: torch.Tensor, generator: torch.Generator | None = None, *,
                         bpda: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [N, K], detector score [N] or None): defenses, then one classifier call on the
        defended batch stacked with its squeezed versions. Differentiable with a differentiable
        classifier and ``bpda=True`` (detector-aware attacks)."""
        x = self.defend(x, generator, bpda=bpda)
        if self.detector is None:
            return self.classifier(x), None
        return self.detector.logits_and_score(x, self.classifier, bpda=bpda)

    @property
    def random_steps(self) -> list[str]:
        """Names of the random defense steps (the audit applies EOT over them)."""
        return [d.name for d in self.defenses if d.random]

    @torch.no_grad()
    def predict(self, images: torch.Tensor | np.ndarray, seed: int | None = None) -> Prediction:
        """Classify a batch: numpy or torch, float32 in [0, 1] or uint8, NCHW or NHWC, or one image
        (conversion rules: ``advshield.plugin.pixels.to_pixels``)."""
        x = to_pixels(images, self.input_shape)
        if self.smoothing is not None:
            return self.predict_smoothed(x, seed)
        g = None
        if self.random:
            seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed
            g = torch.Generator(device=x.device).manual_seed(seed)
            log.info("predict: %d images, random steps %s seeded with %d", len(x), self.random_steps, seed)
        logits, score = self.logits_and_score(x, g)
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        labels = probs.argmax(1).astype(np.int64)
        flagged = None
        if score is not None:
            flagged = self.detector.flag(score).cpu().numpy()
            if self.detector.config.reject:
                labels[flagged] = -1
        return Prediction(labels, probs, None if score is None else score.float().cpu().numpy(), flagged,
                          seed=seed if self.random else None)

    @torch.no_grad()
    def predict_smoothed(self, x: torch.Tensor, seed: int | None = None) -> Prediction:
        """Randomized smoothing over this whole pipeline (``[smoothing]``): per image, CERTIFY's
        class (label -1 = ABSTAIN) and certified L2 radius; ``probs`` are the vote shares of the
        n noisy samples. Noise is added before the defenses."""
        from dataclasses import replace


        assert self.smoothing is not None
        seed = int(torch.randint(0, 2**31, (1,)).item()) if seed is None else int(seed)
        g = torch.Generator().manual_seed(seed) if self.random else None
        unchecked = getattr(self.classifier, "validate", None)
        if unchecked is not None:
            self.classifier.validate = False  # type: ignore[attr-defined]  # noisy inputs leave [0, 1]
        try:
            smoothed = SmoothedClassifier(lambda z: self.logits(z, g), self.num_classes,
                                          replace(self.smoothing, seed=seed))
            certs = [smoothed.certify(xi, index=i) for i, xi in enumerate(x)]
        finally:
            if unchecked is not None:
                self.classifier.validate = unchecked  # type: ignore[attr-defined]
        probs = np.stack([c.counts / c.counts.sum() for c in certs]).astype(np.float32)
        labels = np.array([c.label for c in certs], np.int64)
        radius = np.array([c.radius for c in certs], np.float32)
        log.info("predict (smoothed, sigma=%g): %d images, seed %d", self.smoothing.sigma, len(x), seed)
        return Prediction(labels, probs, seed=seed, radius=radius)

    def predict_bytes(self, images: list[bytes], seed: int | None = None) -> Prediction:
        """Decode (errors raised as ImageError naming the image index) and predict."""
        assert self.config is not None, "predict_bytes needs a pipeline config (input spec)"
        arrays = []
        for i, data in enumerate(images):
            try:
                arrays.append(decode_image(data, self.config.input))
            except Exception as e:
                raise type(e)(f"image {i}: {e}") from None
        return self.predict(torch.from_numpy(np.stack(arrays)), seed=seed)
