"""What the audit attacks and what it scores with: the attack models built for the audit's mode
(BPDA, EOT, detector-aware) and the serving path that re-scores every example.

A pipeline with feature-layer defenses is attacked through its split twin (image-layer steps in
the ``AttackModel``, feature-layer steps between the twin's segments, BPDA through both); the
serving path stays the ONNX Runtime split classifier. ``mode["feature_layers"]`` (present only for
such pipelines) names the steps per layer, and ``mode["bpda"]`` lists them as ``name@layer``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from advshield.attacks.adaptive import (
    DEFAULT_EOT_SAMPLES,
    AttackModel,
    bare,
    feature_steps,
    is_random,
    twin_of,
)
from advshield.attacks.audit.spec import AuditSpec
from advshield.attacks.primitives import Counted
from advshield.attacks.transfer import load_surrogates, surrogate_model
from advshield.core.errors import ConfigError, ParityError
from advshield.plugin.classifiers import parity, parity_batch, twin_from_config
from advshield.plugin.pipeline import DefendedClassifier


class Scorer(Protocol):
    """The serving path: ``DefendedClassifier`` in process or ``RemoteClassifier`` over gRPC."""

    random: bool

    def predict(self, x: torch.Tensor, seed: int | None = None) -> Any: ...


@dataclass
class Setup:
    scorer: Scorer
    model: Callable[[torch.Tensor], torch.Tensor]  # white-box attack model (counts gradients)
    surrogate: Callable[[torch.Tensor], torch.Tensor] | None = None  # transfer attacks craft on it
    mode: dict[str, Any] = field(default_factory=dict)  # how the models were built, for the report
    twin: Callable[[torch.Tensor], torch.Tensor] | None = None  # the pipeline's differentiable classifier
    defenses: Sequence[Any] = ()  # the pipeline's defense steps (whatever the mode)
    white_box: bool = True  # False: no differentiable twin (a served model without one): transfer and black-box only


class NoGradients:
    """Stands in for the twin of a served model audited without one: the runner and the probes skip
    every attack that needs gradients, and calling it anyway is an error that says why."""

    def __init__(self, classifier: Any, reason: str) -> None:
        self.input_shape = classifier.input_shape
        self.num_classes = classifier.num_classes
        self.reason = reason

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"white-box attacks need gradients: {self.reason}")


def served_twin(cfg: Any, defended: DefendedClassifier, probe: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """The ONNX twin of a served model ([model] path), parity-checked twice: the twin against ONNX
    Runtime on its own file, then against the served model's answers on the probe batch and the
    audit's images. A mismatch refuses the white-box audit (``ParityError`` with the figures).
    Without [model] path: (None, the reason)."""
    served = cfg.model.served
    if not cfg.has_onnx:
        return None, {"white_box": False, "reason": f"no ONNX twin of the served model {served.name!r} "
                                                    f"([model] path): gradient attacks cannot run"}
    twin = twin_from_config(defended.config, device=cfg.model.device, check_with=probe, validate=False)
    x = torch.cat([parity_batch(defended.input_shape), probe.detach().float().cpu()])
    report = parity(defended.classifier, twin, x, cfg.model.parity_tolerance)
    figures = {"max_abs_logit_diff": report.max_abs_diff, "tolerance": report.tolerance, "images": report.samples,
               "argmax_agreement": report.argmax_agreement}
    if not report.ok:
        raise ParityError(
            f"white-box audit refused: the ONNX twin {cfg.model_path.name} and the served model {served.name!r} at "
            f"{served.endpoint} disagree: max |logit difference| {report.max_abs_diff:.4g} > parity_tolerance "
            f"{report.tolerance:.4g} on {report.samples} images (argmax agreement {report.argmax_agreement:.1%}). "
            f"Give the ONNX file the server really runs (and its [model] normalization, layout, output), raise "
            f"[model] parity_tolerance if the difference is the server's precision (e.g. FP16), or remove [model] path "
            f"to audit with transfer and black-box attacks only")
    return twin, {"white_box": True, "twin_parity": figures}


def counted(model: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return model if hasattr(model, "gradients") and hasattr(model, "reset") else _Resettable(model)


class _Resettable(Counted):
    def reset(self, seed: int | None = None) -> None:  # type: ignore[override]
        self.forwards = self.gradients = 0


def build_setup(cfg: Any, spec: AuditSpec, probe: torch.Tensor, *, scorer: Scorer | None = None) -> Setup:
    """The attack models for ``spec.adaptive`` over the pipeline ``cfg``; ``scorer`` defaults to
    the in-process serving path. ``probe``: clean images to measure randomness on."""
    defended = DefendedClassifier.from_config(cfg)
    scorer = scorer if scorer is not None else defended
    basis: dict[str, Any] = {"white_box": True}
    if cfg.served_model:  # the classifier is a model Triton serves: white-box only through a checked twin
        twin, basis = served_twin(cfg, defended, probe)
        if twin is None:
            twin = NoGradients(defended.classifier, basis["reason"])
        basis["classifier"] = repr(defended.classifier)
    else:
        twin = twin_of(defended, check_with=probe)
    features = feature_steps(twin)  # feature-layer steps, inside the (split) twin
    declared = bool(defended.random) or any(d.random for g in features.values() for d in g)
    measured = bool(defended.defenses) and is_random(lambda x, g: defended.defend(x, g), probe)
    random = declared or measured
    adaptive = spec.adaptive
    if adaptive == "off":
        eot = 1
        model = AttackModel(bare(twin), [], seed=spec.seed)
    else:
        eot = (spec.eot_samples or DEFAULT_EOT_SAMPLES) if (random or adaptive == "on") else 1
        model = AttackModel(twin, defended.defenses, eot_samples=eot, seed=spec.seed)
    aware = adaptive != "off" and spec.detector_aware and defended.detector is not None
    if aware:
        det = defended.detector

        def score(x: torch.Tensor) -> torch.Tensor:
            return det.logits_and_score(model.defend(x), twin, bpda=True)[1]

        model.detector = score
        model.threshold = float(det.threshold)
        model.detector_weight = spec.detector_weight
    surrogate = None
    if cfg.surrogate_path is not None and any(e.transfer for e in spec.entries) and spec.transfer:
        members = load_surrogates([cfg.surrogate_path], device=cfg.model.device, tolerance=cfg.model.parity_tolerance,
                                   spec=cfg.model)
        surrogate = surrogate_model(members, model.defenses, eot_samples=model.eot_samples, seed=spec.seed)
    attacked = feature_steps(model.classifier)
    mode = {
        "adaptive": adaptive,
        "defenses": [repr(d) for d in defended.defenses] + [repr(d) for g in features.values() for d in g],
        "bpda": [d.name for d in model.defenses if not d.differentiable]
        + [f"{d.name}@{layer}" for layer, g in attacked.items() for d in g if not d.differentiable],
        "random_declared": declared,
        "random_measured": measured,
        "eot_samples": model.eot_samples,
        "detector": repr(defended.detector) if defended.detector is not None else None,
        "detector_aware": aware,
        "detector_threshold": float(defended.detector.threshold) if defended.detector is not None else None,
        "detector_fpr_target": float(defended.detector.config.fpr) if defended.detector is not None else None,
        "surrogate": cfg.surrogate_path.name if surrogate is not None else None,
        "scorer": repr(scorer) if scorer is not defended else "in process (DefendedClassifier)",
    }
    asked = [e.id for e in spec.entries if e.transfer]
    if asked and surrogate is None:  # said in the report (the surrogate is optional), not silently dropped
        why = "[audit] transfer = false" if not spec.transfer else "the pipeline has no [model] surrogate"
        mode["transfer_skipped"] = f"{why}: transfer attack{'s' if len(asked) > 1 else ''} {', '.join(asked)} not run"
    if cfg.served_model:  # what the verdict can rest on (completed by the audit with the sources that ran)
        mode["served_model"] = basis
    if features:  # only for split pipelines: the other audits' settings (and resume fingerprints) stay as they were
        mode["feature_layers"] = {layer: [d.name for d in g] for layer, g in attacked.items()}
    white = bool(basis["white_box"])
    return Setup(scorer, model, surrogate, mode, twin if white else None, list(defended.defenses), white_box=white)
