"""Image-guided Laplacian smoothing (H. Zhang's thesis, ch. 4, eq. 4.1-4.5).

The graph's vertices are the n pixels of the guide image x_o, its edges join each pixel to its 8
neighbours with weight (eq. 4.1)

    w_ij = k_f(x_i, x_j) k_s(t_i, t_j),   k_f = exp(-||x_i - x_j||_2 / sigma)  (Laplacian feature
                                           kernel over the channels), k_s = exp(-||t_i - t_j||^2 / 2)

(a Gaussian spatial kernel that is nonzero on the 8-neighbourhood only, so W is sparse). With the
degree matrix D = diag(W 1), the normalised adjacency W_n = D^-1/2 W D^-1/2 and the regularized
Laplacian L_alpha = (I - alpha W_n) / (1 - alpha) (symmetric positive-definite for alpha in [0, 1)),
the smoothing of a signal z [n, C] is s_alpha(z) = L_alpha^-1 z (eq. 4.4, one system per channel)
and the *normalised* smoothing (eq. 4.5)

    s^_alpha(z) = diag(s_alpha(1_n))^-1 s_alpha(z)

whose rows sum to one (it preserves the dynamic range of z). alpha = 0 is the identity; alpha -> 1
is a strict low-pass filter: the output is smooth wherever x_o is, and may jump across its edges.

Two solvers, one operator: ``dense`` inverts L_alpha per image (n = 784 for 28x28: a 784 x 784
matrix; the thesis's choice for MNIST), ``cg`` runs the conjugate gradient method with the sparse
product v -> L_alpha v (8 shifted copies; the thesis's choice for ImageNet). ``auto`` picks dense up
to ``DENSE_MAX_PIXELS`` pixels. ``apply`` is s^_alpha, ``adjoint`` its transpose (what the chain
rule needs: grad_z = J^T grad_r, eq. 4.15); both are linear and constant in z, fixed by x_o.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from advshield.core.errors import InputError

Solver = Literal["auto", "dense", "cg"]
SOLVERS: tuple[str, ...] = ("auto", "dense", "cg")
DENSE_MAX_PIXELS = 1024  # 32 x 32: above this, conjugate gradient
DENSE_CHUNK = 16  # images inverted at once
OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


@dataclass(frozen=True)
class SmoothingConfig:
    alpha: float = 0.95  # the thesis's MNIST value; 0.997 on ImageNet
    sigma: float = 0.1  # bandwidth of the feature kernel (pixel units)
    solver: Solver = "auto"
    cg_steps: int = 50  # the thesis's ImageNet value
    cg_tol: float = 1e-6  # relative residual at which CG stops early

    def __post_init__(self) -> None:
        if not 0 <= self.alpha < 1:
            raise InputError(f"smoothing: alpha must be within [0, 1), got {self.alpha}")
        if not self.sigma > 0:
            raise InputError(f"smoothing: sigma must be > 0, got {self.sigma}")
        if self.solver not in SOLVERS:
            raise InputError(f"smoothing: solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.cg_steps < 1 or not self.cg_tol > 0:
            raise InputError(f"smoothing: cg_steps must be >= 1 and cg_tol > 0, got {self.cg_steps}, {self.cg_tol}")


def _shift(v: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = v[..., i + dy, j + dx], zero outside the image."""
    h, w = v.shape[-2:]
    out = torch.zeros_like(v)
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = v[..., ys, xs]
    return out


def edge_weights(guide: torch.Tensor, sigma: float) -> torch.Tensor:
    """w [N, 8, H, W]: the weight between pixel (i, j) and its neighbour (i + dy, j + dx), for the
    offsets of ``OFFSETS``; zero where the neighbour lies outside the image (eq. 4.1)."""
    ones = torch.ones_like(guide[:, :1])
    out = []
    for dy, dx in OFFSETS:
        dist = (guide - _shift(guide, dy, dx)).square().sum(1, keepdim=True).sqrt()
        inside = _shift(ones, dy, dx)
        out.append(torch.exp(-dist / sigma) * (math.exp(-(dy * dy + dx * dx) / 2.0) * inside))
    return torch.cat(out, 1)


class LaplacianSmoother:
    """s^_alpha guided by ``guide`` [N, C, H, W] (float pixels); ``apply`` and ``adjoint`` take
    signals of the same shape (every channel smoothed by the same per-image operator)."""

    def __init__(self, guide: torch.Tensor, config: SmoothingConfig | None = None) -> None:
        if guide.dim() != 4:
            raise InputError(f"smoothing: the guide must be a batch [N, C, H, W], got shape {list(guide.shape)}")
        self.config = cfg = config or SmoothingConfig()
        self.shape = tuple(guide.shape)
        n, _, h, w = guide.shape
        self.pixels = h * w
        self.solver = cfg.solver if cfg.solver != "auto" else ("dense" if self.pixels <= DENSE_MAX_PIXELS else "cg")
        g = guide.detach().double()
        self.weights = edge_weights(g, cfg.sigma)  # [N, 8, H, W]
        degree = self.weights.sum(1, keepdim=True)  # [N, 1, H, W]
        self.inv_sqrt_degree = degree.clamp_min(1e-12).rsqrt()
        self.matrix: torch.Tensor | None = None
        if cfg.alpha == 0:
            self.row_norm = torch.ones(n, 1, h, w, dtype=torch.float64, device=guide.device)
        elif self.solver == "dense":
            mats, norms = [], []
            for lo in range(0, n, DENSE_CHUNK):  # bounds the float64 work space
                chol = torch.linalg.cholesky(self.laplacian_matrix(lo, lo + DENSE_CHUNK, torch.float32))
                inv = torch.cholesky_inverse(chol)  # L_alpha is symmetric positive-definite
                rows = inv.sum(-1, keepdim=True)  # s_alpha(1)
                mats.append((inv / rows).to(guide.dtype))  # diag(s(1))^-1 L^-1
                norms.append(rows)
            self.matrix = torch.cat(mats)
            self.row_norm = torch.cat(norms).view(n, 1, h, w)
        else:
            self.row_norm = self._solve(torch.ones(n, 1, h, w, dtype=torch.float64, device=guide.device))
        self.dtype = guide.dtype

    # -- the operator L_alpha ----------------------------------------------------------------------
    def normalized_adjacency(self, v: torch.Tensor) -> torch.Tensor:
        """W_n v = D^-1/2 W D^-1/2 v for v [N, C, H, W] (the sparse product)."""
        u = v * self.inv_sqrt_degree
        out = torch.zeros_like(v)
        for k, (dy, dx) in enumerate(OFFSETS):
            out = out + self.weights[:, k : k + 1] * _shift(u, dy, dx)
        return out * self.inv_sqrt_degree

    def laplacian(self, v: torch.Tensor) -> torch.Tensor:
        """L_alpha v = (v - alpha W_n v) / (1 - alpha)."""
        a = self.config.alpha
        return (v - a * self.normalized_adjacency(v)) / (1 - a)

    def laplacian_matrix(self, start: int = 0, stop: int | None = None,
                         dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """L_alpha of images ``start:stop`` as dense [n_img, n, n] matrices, from the same edge
        weights as the sparse product."""
        weights = self.weights[start:stop].to(dtype)
        s = self.inv_sqrt_degree[start:stop].to(dtype).flatten(1)  # [n_img, n]
        n, _, h, w = weights.shape
        p = h * w
        dev = weights.device
        a = self.config.alpha
        lmat = torch.zeros(n, p * p, dtype=dtype, device=dev)
        rows = torch.arange(p, device=dev).view(h, w)
        for k, (dy, dx) in enumerate(OFFSETS):
            i = rows[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)].reshape(-1)  # pixels with that neighbour
            j = i + dy * w + dx
            wk = weights[:, k].flatten(1)[:, i]
            lmat[:, i * p + j] = -a / (1 - a) * s[:, i] * wk * s[:, j]
        diag = torch.arange(p, device=dev)
        lmat[:, diag * p + diag] = 1 / (1 - a)
        return lmat.view(n, p, p)

    def _solve(self, b: torch.Tensor) -> torch.Tensor:
        """L_alpha x = b by conjugate gradient, one system per image and channel (float64)."""
        cfg = self.config
        x = b.clone()
        r = b - self.laplacian(x)
        p = r.clone()
        rs = r.square().sum((2, 3), keepdim=True)
        stop = (cfg.cg_tol**2) * b.square().sum((2, 3), keepdim=True).clamp_min(1e-30)
        for _ in range(cfg.cg_steps):
            if bool((rs <= stop).all()):
                break
            lp = self.laplacian(p)
            step = rs / (p * lp).sum((2, 3), keepdim=True).clamp_min(1e-30)
            step = torch.where(rs <= stop, torch.zeros_like(step), step)
            x = x + step * p
            r = r - step * lp
            rs_new = r.square().sum((2, 3), keepdim=True)
            p = r + (rs_new / rs.clamp_min(1e-30)) * p
            rs = rs_new
        return x

    # -- s^_alpha and its transpose ----------------------------------------------------------------
    def _check(self, z: torch.Tensor) -> None:
        if z.dim() != 4 or z.shape[0] != self.shape[0] or z.shape[2:] != self.shape[2:]:
            raise InputError(f"smoothing: signal of shape {list(z.shape)} does not match the guide {list(self.shape)}")

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """s^_alpha(z) = diag(s_alpha(1))^-1 L_alpha^-1 z."""
        self._check(z)
        if self.config.alpha == 0:
            return z
        if self.matrix is not None:
            n, c, h, w = z.shape
            flat = z.reshape(n, c, h * w).transpose(1, 2)  # [N, n, C]
            return (self.matrix @ flat).transpose(1, 2).reshape(n, c, h, w)
        return (self._solve(z.double()) / self.row_norm).to(z.dtype)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """(s^_alpha)^T g = L_alpha^-1 diag(s_alpha(1))^-1 g (L_alpha is symmetric)."""
        self._check(g)
        if self.config.alpha == 0:
            return g
        if self.matrix is not None:
            n, c, h, w = g.shape
            flat = g.reshape(n, c, h * w).transpose(1, 2)
            return (self.matrix.transpose(1, 2) @ flat).transpose(1, 2).reshape(n, c, h, w)
        return self._solve(g.double() / self.row_norm).to(g.dtype)

    def dense(self) -> torch.Tensor:
        """s^_alpha as a dense [N, n, n] matrix (the dense solver's, or columns of ``apply``)."""
        if self.matrix is not None:
            return self.matrix
        n, _, h, w = self.shape
        eye = torch.eye(h * w, dtype=self.dtype, device=self.weights.device)
        cols = [self.apply(eye[k].view(1, 1, h, w).expand(n, 1, h, w).contiguous()).reshape(n, h * w)
                for k in range(h * w)]
        return torch.stack(cols, -1)
