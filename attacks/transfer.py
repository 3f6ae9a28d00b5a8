"""Transfer attacks: craft on independently trained surrogates, evaluate on the target pipeline.

The attacker sees neither the target's weights nor its gradients: any registered attack runs on a
surrogate (or an ensemble of surrogates, logits averaged), optionally composed with the target's
*known* defenses (BPDA/EOT through ``AttackModel``: the grey-box setting). The adversarial
examples are then checked and re-scored through the target's serving path like any other
(``advshield.attacks.threat``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from advshield.attacks.adaptive import AttackModel
from advshield.attacks.primitives import Model
from advshield.attacks.registry import run_attack
from advshield.core.errors import InputError
from advshield.plugin.classifiers import TwinClassifier


class Ensemble(torch.nn.Module):
    """Average of the members' logits (Liu et al. 2017)."""
    def __init__(self, members: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        super().__init__()
        if not members:
            raise InputError("an ensemble needs at least one surrogate")
        self.members = list(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def load_surrogates(paths: Sequence[str | Path], *, device: str = "auto", tolerance: float = 1e-3,
                    spec: Any = None) -> list[torch.nn.Module]:
    """Surrogate ONNX files as differentiable twins (each parity-checked against ONNX Runtime).
    ``spec``: the pipeline's ``ModelSpec``; a surrogate takes the same preprocessing as the model
    (scale, mean/std, layout), its output kind detected on its own."""
    if not paths:
        raise InputError("no surrogate model given (pipeline [model] surrogate = \"...onnx\")")
    out = []
    for p in paths:
        own = None if spec is None else replace(spec, path=str(p), sha256="", output="auto", classes=(), classes_file="")
        out.append(TwinClassifier(p, device=device, tolerance=tolerance, validate=False, spec=own))
    return out


def surrogate_model(surrogates: Sequence[Callable[[torch.Tensor], torch.Tensor]], defenses: Sequence[Any] = (),
                    **wrapper: Any) -> AttackModel:
    """The model a transfer attack is crafted on: one surrogate or their ensemble, behind the
    target's known defenses when given (``wrapper``: AttackModel options such as eot_samples)."""
    clf = surrogates[0] if len(surrogates) == 1 else Ensemble(surrogates)
    return AttackModel(clf, defenses, **wrapper)


def transfer_attack(
    attack: str | Callable[..., torch.Tensor],
    surrogate: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    **hyper: Any,
) -> torch.Tensor:
    """Adversarial examples crafted on ``surrogate`` with ``attack`` (a registered name or an
    attack function); the target is not queried."""
    if isinstance(attack, str):
        return run_attack(attack, surrogate, inputs, labels, targeted=targeted, **hyper)
    return attack(surrogate, inputs, labels, targeted=targeted, **hyper)
