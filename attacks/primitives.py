"""What every attack shares: input checks, per-sample norms, the attack losses, and one gradient
helper that knows about EOT draws, the detector's reject logit and gradient counting.

Conventions:

* a *model* is any callable mapping a float32 batch in [0, 1] to logits [N, K]; attacks use the
  inputs' device and never move anything elsewhere;
* an attack *loss* is per sample and is minimised: it is low when the input is adversarial
  (untargeted: away from ``labels``; targeted: towards ``labels``, then the target classes);
* a model may carry three optional attributes, set by the wrappers in ``advshield.attacks.adaptive``:
  ``eot_samples`` (gradients and logits are averaged over that many forward passes),
  ``reject_class`` (the last logit is the detector's "flagged" class, which counts as a failure)
  and ``forwards`` / ``gradients`` counters (images through the model, per-image gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from advshield.core.errors import InputError

Model = Callable[[torch.Tensor], torch.Tensor]
Norm = Literal["linf", "l2"]
LossName = Literal["ce", "margin"]
NORMS: tuple[str, ...] = ("linf", "l2")


class Counted:
    """Wrap a model to count images through it (``forwards``) and per-image gradients
    (``gradients``, incremented by :func:`value_and_grad` and :func:`jacobian`)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.forwards = 0
        self.gradients = 0

    @property
    def eot_samples(self) -> int:
        return int(getattr(self.model, "eot_samples", 1))

    @property
    def reject_class(self) -> bool:
        return bool(getattr(self.model, "reject_class", False))

    def reset(self) -> None:
        self.forwards = self.gradients = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += int(x.shape[0])
        return self.model(x)


def _tally(model: Model, gradients: int) -> None:
    if hasattr(model, "gradients"):
        model.gradients += gradients  # type: ignore[attr-defined]


# --- checks --------------------------------------------------------------------------------------

def check_inputs(inputs: torch.Tensor, labels: torch.Tensor, attack: str) -> None:
    """The pixel contract plus labels: float32 [N, ...] in [0, 1], finite, integer labels [N]."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise InputError(f"{attack}: inputs and labels must be torch tensors, got {type(inputs).__name__} and {type(labels).__name__}")
    if inputs.dtype != torch.float32:
        raise InputError(f"{attack}: inputs must be float32 pixels in [0, 1], got dtype {inputs.dtype}")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise InputError(f"{attack}: inputs must be a non-empty batch [N, ...], got shape {list(inputs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
        raise InputError(f"{attack}: labels must have shape [{inputs.shape[0]}], got {list(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"{attack}: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.device != inputs.device:
        raise InputError(f"{attack}: labels are on {labels.device}, inputs on {inputs.device}")
    x = inputs.detach()
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{attack}: inputs contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"{attack}: pixels must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")


def check_positive(attack: str, **values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise InputError(f"{attack}: {name} must be > 0, got {v}")


def check_norm(attack: str, norm: str) -> None:
    if norm not in NORMS:
        raise InputError(f"{attack}: norm must be one of {NORMS}, got {norm!r}")


# --- per-sample geometry -------------------------------------------------------------------------

def bview(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values [N] shaped to broadcast against ``like`` [N, ...]."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def l2(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(p=2, dim=1)


def linf(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).abs().amax(dim=1)


def normalize(g: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """L2-normalise each sample; a zero gradient becomes a random unit direction."""
    n = l2(g)
    zero = n < 1e-12
    if bool(zero.any()):
        g = g.clone()
        g[zero] = torch.randn(g[zero].shape, generator=generator, device=g.device, dtype=g.dtype)
        n = l2(g)
    return g / bview(n, g)


def quantize(x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """Round to the nearest of ``levels`` grey levels in [0, 1] (256: the 1/255 grid)."""
    return torch.round(x * (levels - 1)) / (levels - 1)


def generator_for(device: torch.device, seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))


# --- decisions and losses ------------------------------------------------------------------------

def decision_logits(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, reject_class: bool) -> torch.Tensor:
    """Logits as the attack's success criterion sees them.

    With a detector's reject class (last column), an untargeted attack succeeds only when the
    winner is neither the true class nor "flagged": the reject logit is merged into the true class
    (max of the two). A targeted attack keeps the reject class as one more competitor."""
    if not reject_class or targeted:
        return logits
    body, reject = logits[:, :-1], logits[:, -1]
    true = body.gather(1, labels[:, None]).squeeze(1)
    merged = torch.maximum(true, reject)
    return body.scatter(1, labels[:, None], merged[:, None])


def is_adversarial(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == labels if targeted else pred != labels


def margin(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Logit margin, negative exactly when adversarial: untargeted z_y - max_{j!=y} z_j,
    targeted max_{j!=t} z_j - z_t. On a linear model its zero set is the decision boundary."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return other - own if targeted else own - other


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, loss: LossName | str) -> torch.Tensor:
    if loss == "margin":
        return margin(logits, labels, targeted)
    if loss == "ce":
        ce = F.cross_entropy(logits, labels, reduction="none")
        return ce if targeted else -ce
    raise InputError(f"unknown attack loss {loss!r}; expected 'ce' or 'margin'")


def predict(model: Model, x: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Decision logits without gradient (averaged over the model's EOT draws)."""
    n = int(getattr(model, "eot_samples", 1))
    reject = bool(getattr(model, "reject_class", False))
    with torch.no_grad():
        out = sum(decision_logits(model(x), labels, targeted, reject) for _ in range(n))
    return out / n  # type: ignore[return-value,operator]


def value_and_grad(
    model: Model,
    x: torch.Tensor,
    labels: torch.Tensor,
    targeted: bool,
    loss: LossName | str | Callable[[torch.Tensor], torch.Tensor] = "ce",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample attack loss, its gradient w.r.t. ``x`` and the decision logits.

    With ``model.eot_samples = n`` each of the three is the average over n forward passes (one
    draw of the random defenses each): the gradient is the average of the n per-draw gradients
    of the loss (expectation over transformation). ``loss``: 'ce', 'margin' or a callable of the
    decision logits returning [N]."""
    n = int(getattr(model, "eot_samples", 1))
    reject = bool(getattr(model, "reject_class", False))
    draws = []
    for _ in range(n):
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = decision_logits(model(xi), labels, targeted, reject)
            val = loss(z) if callable(loss) else attack_loss(z, labels, targeted, loss)
            (g,) = torch.autograd.grad(val.sum(), xi)
        draws.append((val.detach(), g, z.detach()))
    _tally(model, n * int(x.shape[0]))
    if n == 1:
        return draws[0]
    return tuple(torch.stack(parts).mean(0) for parts in zip(*draws))  # type: ignore[return-value]


def jacobian(
    model: Model, x: torch.Tensor, labels: torch.Tensor, targeted: bool, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision logits [N, K] and the gradients of the logits named by ``classes`` [N, C]
    (one class index per sample and column): [N, C, ...]. One backward pass per column (and per
    EOT draw)."""
    n = int(getattr(model, "eot_samples", 1))
    reject = bool(getattr(model, "reject_class", False))
    cols = classes.shape[1]
    grads = torch.zeros((x.shape[0], cols, *x.shape[1:]), device=x.device, dtype=x.dtype)
    total_logits: torch.Tensor | None = None
    for _ in range(n):
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = decision_logits(model(xi), labels, targeted, reject)
            picked = z.gather(1, classes)
            for c in range(cols):
                (g,) = torch.autograd.grad(picked[:, c].sum(), xi, retain_graph=c + 1 < cols)
                grads[:, c] += g
        total_logits = z.detach() if total_logits is None else total_logits + z.detach()
    _tally(model, n * cols * int(x.shape[0]))
    assert total_logits is not None
    return total_logits / n, grads / n
