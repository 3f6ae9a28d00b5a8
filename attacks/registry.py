"""Attacks by name, with their kind and default hyper-parameters.

* *budget* attacks take ``eps`` and stay inside the ball (FGSM, BIM, PGD, APGD-CE/DLR, APGD-T):
  the audit runs them over an eps grid and records success per eps;
* *minimal* attacks return the smallest adversarial they found (C&W, DeepFool, DDN, BP): one run
  gives each sample's distortion, hence the whole operating characteristic.

``access`` says what an attack needs of its model: ``gradients`` (a differentiable model: the
white-box and transfer attacks), or only the answers of the serving path, through an
``advshield.attacks.oracle.Oracle``: ``scores`` (probabilities: Square) or ``decisions``
(adversarial or not: HopSkipJump). The audit runs the last two in its black-box stage.

``run_attack(name, model, inputs, labels, **hyper)`` merges the defaults with ``hyper``; an
unknown hyper-parameter is a ConfigError naming it and the allowed ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from advshield.attacks.boundary_projection import bp
from advshield.attacks.carlini_wagner import cw_l2
from advshield.attacks.decoupled_direction_norm import ddn
from advshield.attacks.deepfool import deepfool
from advshield.attacks.detector_attacks import detector_sweep, opgd
from advshield.attacks.gradient import apgd, apgd_t, bim, fgsm, pgd
from advshield.attacks.hopskipjump import hop_skip_jump
from advshield.attacks.smooth import qpgd2, qpgd_l2, scw_l2
from advshield.attacks.square import square
from advshield.core.errors import ConfigError

Kind = Literal["budget", "minimal"]
Access = Literal["gradients", "scores", "decisions"]
BLACK_BOX: tuple[str, ...] = ("scores", "decisions")  # accesses of the black-box attacks


@dataclass(frozen=True)
class AttackSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    kind: Kind
    norm: Literal["linf", "l2"]  # the norm of its budget, or of the distortion it minimises
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    gradients: str = ""  # gradient evaluations per image, as a formula of the hyper-parameters
    access: Access = "gradients"

    @property
    def black_box(self) -> bool:
        return self.access in BLACK_BOX

    @property
    def hyper_names(self) -> tuple[str, ...]:
        params = inspect.signature(self.fn).parameters
        return tuple(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "targeted")

    def hyper(self, **overrides: Any) -> dict[str, Any]:
        allowed = self.hyper_names
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ConfigError(
                f"attack {self.name!r}: unknown hyper-parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
            )
        if "norm" in overrides and overrides["norm"] != self.norm:
            raise ConfigError(f"attack {self.name!r} is an {self.norm} attack; norm={overrides['norm']!r} is not allowed")
        merged = {**self.defaults, **overrides}
        if self.kind == "budget" and "eps" not in merged:
            raise ConfigError(f"attack {self.name!r} is a budget attack: it needs eps")
        return merged


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    if spec.name in ATTACKS:
        raise RuntimeError(f"attack {spec.name!r} registered twice")
    ATTACKS[spec.name] = spec
    return spec


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def run_attack(name: str, model: Any, inputs: torch.Tensor, labels: torch.Tensor, *,
               targeted: bool = False, **hyper: Any) -> torch.Tensor:
    spec = get_attack(name)
    return spec.fn(model, inputs, labels, targeted=targeted, **spec.hyper(**hyper))


def _p(d: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(d)


for _spec in (
    AttackSpec("fgsm", fgsm, "budget", "linf", _p({}), "1"),
    AttackSpec("fgsm_l2", fgsm, "budget", "l2", _p({"norm": "l2"}), "1"),
    AttackSpec("bim", bim, "budget", "linf", _p({"steps": 10}), "steps"),
    AttackSpec("pgd_linf", pgd, "budget", "linf", _p({"steps": 40, "restarts": 1}), "steps * restarts (at most)"),
    AttackSpec("pgd_l2", pgd, "budget", "l2", _p({"norm": "l2", "steps": 40, "restarts": 1}), "steps * restarts (at most)"),
    AttackSpec("apgd_ce_linf", apgd, "budget", "linf", _p({"steps": 100, "restarts": 1, "loss": "ce"}), "steps * restarts (at most)"),
    AttackSpec("apgd_ce_l2", apgd, "budget", "l2", _p({"norm": "l2", "steps": 100, "restarts": 1, "loss": "ce"}), "steps * restarts (at most)"),
    AttackSpec("apgd_dlr_linf", apgd, "budget", "linf", _p({"steps": 100, "restarts": 1, "loss": "dlr"}), "steps * restarts (at most)"),
    AttackSpec("apgd_dlr_l2", apgd, "budget", "l2", _p({"norm": "l2", "steps": 100, "restarts": 1, "loss": "dlr"}), "steps * restarts (at most)"),
    AttackSpec("apgd_t_linf", apgd_t, "budget", "linf", _p({"steps": 100, "restarts": 1, "top_k": 9}),
               "steps * restarts * min(top_k, classes - 1) (at most)"),
    AttackSpec("apgd_t_l2", apgd_t, "budget", "l2", _p({"norm": "l2", "steps": 100, "restarts": 1, "top_k": 9}),
               "steps * restarts * min(top_k, classes - 1) (at most)"),
    AttackSpec("cw_l2", cw_l2, "minimal", "l2", _p({"binary_search_steps": 5, "steps": 20}), "binary_search_steps * steps"),
    AttackSpec("deepfool", deepfool, "minimal", "l2", _p({"steps": 50, "overshoot": 0.02}), "candidates per iteration, <= steps"),
    AttackSpec("ddn", ddn, "minimal", "l2", _p({"steps": 100, "init_eps": 1.0, "gamma": 0.05, "levels": 256}), "steps"),
    AttackSpec("bp", bp, "minimal", "l2", _p({"steps": 100, "alpha": 2.0, "gamma_min": 0.7, "levels": 256}), "steps"),
):
    register_attack(_spec)

# Smooth attacks (thesis ch. 4, attacks/smooth.py): perturbations smooth like the input image.
for _spec in (
    AttackSpec("scw_l2", scw_l2, "minimal", "l2", _p({"binary_search_steps": 5, "steps": 20}), "binary_search_steps * steps"),
    AttackSpec("qpgd2", qpgd2, "minimal", "l2", _p({"search_steps": 6, "steps": 20}), "search_steps * steps"),
    AttackSpec("qpgd_l2", qpgd_l2, "budget", "l2", _p({"steps": 40}), "steps"),
):
    register_attack(_spec)

# Detector-aware attacks (attacks/detector_attacks.py): on a model without a detector they run as
# plain PGD (opgd: same steps; detector_sweep: one restart per lambda), so they may sit in any cascade.
for _spec in (
    AttackSpec("opgd_linf", opgd, "budget", "linf", _p({"steps": 100}), "2 * steps (at most)"),
    AttackSpec("opgd_l2", opgd, "budget", "l2", _p({"norm": "l2", "steps": 100}), "2 * steps (at most)"),
    AttackSpec("detector_sweep_linf", detector_sweep, "budget", "linf", _p({"steps": 50}),
               "steps * len(lambdas) (at most)"),
    AttackSpec("detector_sweep_l2", detector_sweep, "budget", "l2", _p({"norm": "l2", "steps": 50}),
               "steps * len(lambdas) (at most)"),
):
    register_attack(_spec)

# Black-box attacks (attacks/square.py, attacks/hopskipjump.py): their "model" is an Oracle over the
# serving path; their cost is counted in queries (images sent), not gradients.
for _spec in (
    AttackSpec("square_linf", square, "budget", "linf", _p({"queries": 1000, "p_init": 0.8}), "0", "scores"),
    AttackSpec("square_l2", square, "budget", "l2", _p({"norm": "l2", "queries": 1000, "p_init": 0.8}), "0", "scores"),
    AttackSpec("hsj_l2", hop_skip_jump, "minimal", "l2", _p({"queries": 1000}), "0", "decisions"),
    AttackSpec("hsj_linf", hop_skip_jump, "minimal", "linf", _p({"norm": "linf", "queries": 1000}), "0", "decisions"),
):
    register_attack(_spec)
