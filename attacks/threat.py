"""The threat model, and the check the audit runs on every adversarial example it is handed.

The audit never trusts an attack: ``check_adversarial`` clips to [0, 1], checks the budget, and
rounds to the 8-bit grid; ``judge`` then counts a sample as broken only when its checked image is
valid and the *serving path* (re-scored by the caller) misclassifies it (and, with a detector,
does not flag it). An attack that returns a point outside its budget is a failure, not a success.

Rounding to the nearest grey level can push a point that was inside an L2 (or a non-grid L-inf)
ball slightly outside it; such samples are rounded towards the clean image instead, which never
increases any |pixel difference| when the clean image is on the grid, so honest attacks keep their
successes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from advshield.attacks.primitives import l2, linf
from advshield.core.errors import InputError
from advshield.core.validation import check

# why a sample is invalid (``Checked.reason``)
VALID, NOT_FINITE, OUTSIDE_BUDGET, OFF_GRID = 0, 1, 2, 3
REASONS = {VALID: "valid", NOT_FINITE: "not finite", OUTSIDE_BUDGET: "outside the budget",
           OFF_GRID: "outside the budget after rounding"}


DIST_TOL = 1e-6  # a distortion d counts within eps when d <= eps + DIST_TOL (the threat check's slack)


@dataclass(frozen=True)
class ThreatModel:
    """norm and eps of the budget (eps=None: a minimal attack, no budget: its distortion is
    measured instead); images are rounded to ``levels`` grey levels (0: kept as floats)."""

    norm: Literal["l2", "linf"] = "l2"
    eps: float | None = None
    levels: int = 256
    tolerance: float = 1e-6  # absolute slack on the budget for float round-off

    def __post_init__(self) -> None:
        check(self.norm in ("l2", "linf"), f"threat.norm: must be 'l2' or 'linf', got {self.norm!r}")
        check(self.eps is None or self.eps > 0, f"threat.eps: must be > 0 (or absent for minimal attacks), got {self.eps}")
        check(self.levels == 0 or self.levels >= 2, f"threat.levels: must be 0 (no rounding) or >= 2, got {self.levels}")
        check(0 <= self.tolerance < 1e-3, f"threat.tolerance: must be within [0, 1e-3), got {self.tolerance}")


@dataclass(frozen=True)
class Checked:
    """Per-sample result of the threat-model check (tensors on the inputs' device)."""

    adversarial: torch.Tensor  # clipped and rounded images; the clean image where not finite
    valid: torch.Tensor  # bool [N]: may count as a success
    reason: torch.Tensor  # int8 [N]: VALID, NOT_FINITE, OUTSIDE_BUDGET, OFF_GRID
    l2: torch.Tensor  # distortion of ``adversarial`` [N]
    linf: torch.Tensor


def _round(x: torch.Tensor, levels: int) -> torch.Tensor:
    return torch.round(x * (levels - 1)) / (levels - 1)


def _round_towards(x: torch.Tensor, ref: torch.Tensor, levels: int) -> torch.Tensor:
    """Per pixel, the grid value between ``ref`` and ``x`` nearest to ``x`` (floor or ceil)."""
    s = levels - 1
    lo, hi = torch.floor(x * s) / s, torch.ceil(x * s) / s
    return torch.where(x >= ref, lo, hi).clamp(0.0, 1.0)


def check_adversarial(inputs: torch.Tensor, adversarial: torch.Tensor, threat: ThreatModel) -> Checked:
    """Clip, budget-check and round one batch of adversarial examples against ``threat``."""
    if not isinstance(adversarial, torch.Tensor) or adversarial.shape != inputs.shape:
        shape = list(adversarial.shape) if isinstance(adversarial, torch.Tensor) else type(adversarial).__name__
        raise InputError(f"adversarial batch has shape {shape}, the clean batch {list(inputs.shape)}")
    x = inputs.detach().float()
    a = adversarial.detach().to(x.device, torch.float32)
    finite = torch.isfinite(a.flatten(1)).all(1)
    a = torch.where(finite.view(-1, *[1] * (a.dim() - 1)), a, x).clamp(0.0, 1.0)
    reason = torch.where(finite, VALID, NOT_FINITE).to(torch.int8)

    def within(img: torch.Tensor) -> torch.Tensor:
        if threat.eps is None:
            return torch.ones(len(img), dtype=torch.bool, device=img.device)
        d = linf(img - x) if threat.norm == "linf" else l2(img - x)
        return d <= threat.eps + threat.tolerance

    ok = within(a)
    reason = torch.where(finite & ~ok, OUTSIDE_BUDGET, reason).to(torch.int8)
    if threat.levels:
        q = _round(a, threat.levels)
        broke = (reason == VALID) & ~within(q)
        if bool(broke.any()):
            q[broke] = _round_towards(a[broke], x[broke], threat.levels)
            still = broke & ~within(q)
            reason = torch.where(still, OFF_GRID, reason).to(torch.int8)
        a = q
    return Checked(a, reason == VALID, reason, l2(a - x), linf(a - x))


def judge(
    checked: Checked,
    predicted: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    targeted: bool = False,
    flagged: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Per-sample success: the checked image is valid, the serving path's prediction (of
    ``checked.adversarial``) is wrong (targeted: equals ``labels``), and it was not flagged."""
    pred = np.asarray(torch.as_tensor(predicted).cpu())
    lab = np.asarray(torch.as_tensor(labels).cpu())
    if pred.shape != lab.shape or pred.shape != tuple(checked.valid.shape):
        raise InputError(f"judge: predicted {pred.shape}, labels {lab.shape} and checked {tuple(checked.valid.shape)} differ")
    hit = pred == lab if targeted else pred != lab
    ok = hit & checked.valid.cpu().numpy()
    if flagged is not None:
        ok &= ~np.asarray(torch.as_tensor(flagged).cpu(), dtype=bool)
    return ok
