"""DeepFool (Moosavi-Dezfooli et al. 2016), multi-class L2.

Each iteration linearises the model around the current point and steps onto the nearest
linearised decision hyperplane: for candidate class k, f_k = z_k - z_y and w_k = grad f_k; the
step is (|f_k| / ||w_k||^2) w_k for the k minimising |f_k| / ||w_k||. The output is
x + (1 + overshoot) * r_total. On a linear model the first step lands exactly on the nearest
hyperplane, i.e. on the minimal L2 adversarial perturbation (times 1 + overshoot).
Targeted: the hyperplane between the target and the currently winning class.
"""

from __future__ import annotations

import torch

from advshield.attacks.primitives import (
    Model,
    bview,
    check_inputs,
    check_positive,
    is_adversarial,
    jacobian,
    predict,
    quantize,
)
from advshield.core.errors import InputError

SCALES: tuple[float, ...] = (1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0)


def deepfool(
    model: Model,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool = False,
    steps: int = 50,
    overshoot: float = 0.02,
    candidates: int = 10,
    levels: int | None = 256,
) -> torch.Tensor:
    """Minimal attack: the DeepFool point where adversarial, else the clean input.

    ``candidates``: how many classes (the clean point's top logits, the true class first)
    untargeted DeepFool considers; each costs one gradient per iteration.
    ``levels``: rounding to the grey-level grid shrinks a perturbation spread thinly over many
    pixels (thesis section 5.4), which can undo the small overshoot; the output is then the
    rounded point x + s (1 + overshoot) r_total with the least scale s in ``SCALES`` that is
    still adversarial after rounding (forward passes only). ``None``: no rounding."""
    check_inputs(inputs, labels, "deepfool")
    check_positive("deepfool", overshoot=overshoot + 1.0)
    if steps < 1 or candidates < 2:
        raise InputError(f"deepfool: steps must be >= 1 and candidates >= 2, got steps={steps}, candidates={candidates}")
    z0 = predict(model, inputs, labels, targeted)
    k = min(candidates, z0.shape[1])
    others = z0.scatter(1, labels[:, None], float("-inf")).topk(k - 1, dim=1).indices
    classes = torch.cat([labels[:, None], others], dim=1)  # true (or target) class first
    r_tot = torch.zeros_like(inputs)
    active = ~is_adversarial(z0, labels, targeted)
    for _ in range(steps):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        x = (inputs[idx] + (1 + overshoot) * r_tot[idx]).clamp(0.0, 1.0)
        y = labels[idx]
        if targeted:
            z = predict(model, x, y, targeted)
            cls = torch.stack([y, z.argmax(1)], dim=1)  # target, current winner
        else:
            cls = classes[idx]
        z, jac = jacobian(model, x, y, targeted, cls)
        adv = is_adversarial(z, y, targeted)
        zc = z.gather(1, cls)
        f = zc[:, 1:] - zc[:, :1]  # other - own (untargeted, negative); winner - target (targeted, positive)
        w = jac[:, 1:] - jac[:, :1]
        wn = w.flatten(2).norm(dim=2).clamp_min(1e-12)  # [n, C-1]
        best = (f.abs() / wn).argmin(1)
        pick = torch.arange(len(idx), device=inputs.device)
        fk, wk, wnk = f[pick, best], w[pick, best], wn[pick, best]
        r = bview((fk.abs() + 1e-4) / wnk**2, wk) * wk
        if targeted:
            r = -r  # towards the target: decrease winner - target
        step = ~adv
        r_tot[idx[step]] += r[step]
        active[idx[adv]] = False
    out = inputs.clone()
    todo = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
    for s in SCALES if levels is not None else (1.0,):
        idx = todo.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        cand = (inputs[idx] + s * (1 + overshoot) * r_tot[idx]).clamp(0.0, 1.0)
        if levels is not None:
            cand = quantize(cand, levels)
        found = is_adversarial(predict(model, cand, labels[idx], targeted), labels[idx], targeted)
        out[idx[found]] = cand[found]
        todo[idx[found]] = False
    return out
