"""Analytic models for the attack tests: a linear classifier whose minimal L2 adversarial
perturbation is known exactly, a tiny CNN, and an exact targeted optimum by quadratic programming."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Linear:
    """f(x) = W flatten(x) + b on inputs of ``shape``; ``x`` sits well inside [0, 1]."""

    W: torch.Tensor  # [K, d]
    b: torch.Tensor  # [K]
    x: torch.Tensor  # [N, *shape], correctly classified by construction (labels = argmax)
    y: torch.Tensor  # [N]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return v.flatten(1) @ self.W.T + self.b

    def minimal_l2(self) -> torch.Tensor:
        """Distance from each x to the complement of its class region: for a point inside a
        convex polyhedron, the least distance to one of its facet hyperplanes,
        min_{j != y} (z_y - z_j) / ||w_y - w_j||."""
        z = self(self.x)
        zy = z.gather(1, self.y[:, None])
        wd = (self.W[None] - self.W[self.y][:, None]).norm(dim=2)
        dist = (zy - z) / wd.clamp_min(1e-12)
        dist[torch.arange(len(self.y)), self.y] = float("inf")
        return dist.min(1).values

    def nearest_class(self) -> torch.Tensor:
        z = self(self.x)
        zy = z.gather(1, self.y[:, None])
        wd = (self.W[None] - self.W[self.y][:, None]).norm(dim=2)
        dist = (zy - z) / wd.clamp_min(1e-12)
        dist[torch.arange(len(self.y)), self.y] = float("inf")
        return dist.argmin(1)


def linear_model(n: int = 16, shape: tuple[int, ...] = (1, 28, 28), classes: int = 10, depth: float = 1.5,
                 sharpness: float = 20.0, seed: int = 0) -> Linear:
    """Each x = 0.5 + depth * (unit direction of its class) + small noise, b centring the model
    at 0.5: minimal distortions around 0.3-1.5, optimal perturbations far from the box.
    ``sharpness`` scales the logits (not the geometry): like a trained network's, the softmax is
    then nearly two-class near the boundary, which the cross-entropy attacks (DDN) rely on."""
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    W = torch.randn(classes, d, generator=g) / d**0.5 * sharpness
    center = torch.full((d,), 0.5)
    b = -(W @ center)
    cls = torch.arange(n) % classes
    u = W[cls] - W.mean(0)
    u = u / u.norm(dim=1, keepdim=True)
    x = center + depth * u + 0.01 * torch.randn(n, d, generator=g)
    assert float(x.min()) > 0.1 and float(x.max()) < 0.9
    x = x.reshape(n, *shape).float()
    model = Linear(W, b, x, torch.zeros(n, dtype=torch.int64))
    model.y = model(x).argmax(1)
    return model


def targeted_optimum(model: Linear, i: int, target: int) -> float:
    """Exact least L2 distance from x_i to the region of class ``target`` (within [0, 1]) by SLSQP."""
    from scipy.optimize import minimize

    W, b = model.W.double().numpy(), model.b.double().numpy()
    x0 = model.x[i].flatten().double().numpy()
    others = [k for k in range(W.shape[0]) if k != target]
    A = W[target][None] - W[others]  # A v + c >= 0: target logit beats every other
    c = b[target] - b[others]
    res = minimize(
        lambda v: 0.5 * float(((v - x0) ** 2).sum()), x0, jac=lambda v: v - x0, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda v: A @ v + c, "jac": lambda v: A}],
        bounds=[(0.0, 1.0)] * len(x0), options={"maxiter": 500, "ftol": 1e-12},
    )
    assert res.success, res.message
    return float(np.linalg.norm(res.x - x0))


def tiny_cnn(seed: int = 0, classes: int = 10) -> torch.nn.Module:
    """A small random CNN for 1x28x28 inputs (fast; the budget properties hold for any model)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 5, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, classes),
    ).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
