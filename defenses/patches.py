"""Patch replacement (H. Zhang, PhD thesis, ENS Rennes 2021, chapter 6, sections 6.3-6.4).

A feature map F [N, D, H, W] (layer 0 = the image itself, or an early layer of the network) is
cut along its channels into m = D / d *slices* of depth d (F = [F_1, ..., F_m]); each slice into
*patches* P_ijk = F_k(i-a:i+a, j-a:j+a) of (2a+1) x (2a+1) x d whose centres move on a grid of
step c (c < 2a+1: overlapping patches). Each patch is replaced through the quantizer q_k of its
slice, with one of four strategies (eq. 6.3-6.5, parameter eps):

* ``plain``:  P' = q_k(P)
* ``l2``:     P' = q_k(P)                            if ||q_k(P) - P||_2 < eps
              P' = P + eps (q_k(P) - P) / ||q_k(P) - P||_2   otherwise
  (the codeword is kept when it lies within eps of the patch, else the patch moves a distance
  eps towards it: the patch is never moved by more than eps in L2)
* ``linf``:   P' = P + clip_[-eps, eps](q_k(P) - P)   (no value moves by more than eps)
* ``linear``: P' = P + eps (q_k(P) - P)               (eps in [0, 1])

so eps = 0 returns the input for l2/linf/linear; l2/linf with eps at least the largest
distance, and linear with eps = 1, equal plain (section 6.3.3). Overlapping patches are averaged
back into the slice (section 6.3.4) and the slices concatenated over channels: F' = Q(F).

Quantizers (section 6.3.2):

* ``kmeans``: product quantization: one codebook C_k of K codewords per slice, learnt with faiss
  k-means on patches sampled from clean training data; q_k = exact nearest codeword (faiss
  IndexFlatL2, on a GPU when faiss has one and the batch is there; or a batched brute-force torch
  search). Artifact: one ``.npy`` array [m, K, (2a+1)^2 d] with a JSON sidecar.
* ``e8``: the data-free E8 lattice at scale s (d = 8): every 8-channel vector of a patch is
  replaced by its nearest point of s E8 (Conway and Sloane's decoder for E8 = D8 u (D8 + 1/2)).

Borders: the feature is padded (``padding``: replicate or zeros) so that patch centres at
0, c, 2c, ... cover every position; the padding is cropped after reconstruction. The same
padding is used when sampling training patches.

BPDA: the replacement is not differentiable; its backward pass is the identity (the default
``Defense.approximation``).

Feature layers: the defense itself only sees a tensor. ``layer`` names where it runs; the serving
pipeline (``advshield.plugin.split``) cuts the ONNX model there and, before ``fit``, binds the
model's head with ``bind_features`` so that codebooks are learnt on the layer's features.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from advshield.configs import check
from advshield.defenses.base import Defense, meta_path, verify_artifact, write_artifact_meta
from advshield.defenses.registry import register_defense
from advshield.errors import ArtifactError, ConfigError, InputError

log = logging.getLogger(__name__)

IMAGE_LAYER = "image"
ARTIFACT_FORMAT = "advshield.patch_codebook.v1"

Strategy = Literal["plain", "l2", "linf", "linear"]


@dataclass(frozen=True)
class PatchReplacementConfig:
    """Every parameter of patch replacement, as the pipeline file's ``[[defenses]]`` table sets them.

    layer       "image" (layer 0) or the name of an intermediate tensor of the ONNX model
    depth       d, channels per slice (the layer's channel count must be a multiple of d)
    radius      a, patches are (2a+1) x (2a+1) x d
    stride      c, step of the patch centres, 1 <= c <= 2a+1 (c < 2a+1: overlap, averaged)
    padding     border handling: "replicate" or "zeros"
    quantizer   "kmeans" (per-slice faiss codebooks, needs `advshield fit`) or "e8" (data-free)
    codewords   K, codewords per slice (kmeans)
    scale       s, the E8 lattice is s * E8 (e8); smaller is finer
    strategy    "plain", "l2", "linf" or "linear" (see the module docstring for the formulas)
    eps         the strategy's parameter (ignored by plain; linear needs 0 <= eps <= 1)
    sample      training patches sampled per slice for k-means
    fit_images  training images the patches are drawn from (0: all images given to fit)
    iterations  k-means iterations
    seed        k-means and sampling seed; -1: the seed `advshield fit` passes
    search      nearest-codeword search: "auto" (faiss; torch on a GPU when faiss has none),
                "faiss" or "torch" (batched brute force)
    gpu         use a GPU for k-means and search when faiss has one
    threads     faiss OpenMP threads for the search (0: min(4, cores)). 1 by default: faiss's
                OpenMP runtime is not torch's, and on a small or shared machine threads left
                spinning by one stall the other (measured on 2 shared cores: the defense 1.8x
                slower with 2 threads than with 1). Raise it on a many-core server.
    fit_threads faiss OpenMP threads for k-means (0: min(4, cores)); 1 by default for the same
                reason (measured on 2 shared cores: 8 slices of k-means 9x slower with 2 threads)
    chunk       patches per search call (bounds memory; not a per-patch loop)
    artifact    name of the codebook in the pipeline's [artifacts] table (kmeans)
    """

    layer: str = IMAGE_LAYER
    depth: int = 1
    radius: int = 1
    stride: int = 1
    padding: Literal["replicate", "zeros"] = "replicate"
    quantizer: Literal["kmeans", "e8"] = "kmeans"
    codewords: int = 4096
    scale: float = 0.5
    strategy: Strategy = "plain"
    eps: float = 0.0
    sample: int = 262_144
    fit_images: int = 20_000
    iterations: int = 20
    seed: int = -1
    search: Literal["auto", "faiss", "torch"] = "auto"
    gpu: bool = True
    threads: int = 1
    fit_threads: int = 1
    chunk: int = 1 << 20
    artifact: str = ""

    def __post_init__(self) -> None:
        check(bool(self.layer.strip()), "layer: must be 'image' or the name of a tensor of the model")
        check(self.depth >= 1, f"depth: must be >= 1, got {self.depth}")
        check(self.radius >= 0, f"radius: must be >= 0, got {self.radius}")
        check(
            1 <= self.stride <= self.patch_size,
            f"stride: must be within [1, 2*radius+1 = {self.patch_size}] so that patches cover the "
            f"feature, got {self.stride}",
        )
        check(math.isfinite(self.eps) and self.eps >= 0, f"eps: must be a finite number >= 0, got {self.eps}")
        if self.strategy == "linear":
            check(self.eps <= 1, f"eps: the linear strategy interpolates, eps must be within [0, 1], got {self.eps}")
        check(self.threads >= 0, f"threads: must be >= 0, got {self.threads}")
        check(self.fit_threads >= 0, f"fit_threads: must be >= 0, got {self.fit_threads}")
        check(self.chunk >= 1, f"chunk: must be >= 1, got {self.chunk}")
        if self.quantizer == "e8":
            check(self.depth == 8, f"depth: the E8 lattice quantizes 8-channel vectors, depth must be 8, got {self.depth}")
            check(math.isfinite(self.scale) and self.scale > 0, f"scale: must be > 0, got {self.scale}")
            return
        check(self.codewords >= 1, f"codewords: must be >= 1, got {self.codewords}")
        check(
            self.sample >= self.codewords,
            f"sample: k-means needs at least as many training patches as codewords ({self.codewords}), got {self.sample}",
        )
        check(self.fit_images >= 0, f"fit_images: must be >= 0, got {self.fit_images}")
        check(self.iterations >= 1, f"iterations: must be >= 1, got {self.iterations}")
        check(self.seed >= -1, f"seed: must be >= 0, or -1 for the fit command's seed, got {self.seed}")
        check(bool(self.artifact), "artifact: the kmeans quantizer needs the name of its codebook in [artifacts]")

    @property
    def patch_size(self) -> int:
        return 2 * self.radius + 1

    @property
    def dim(self) -> int:
        """Dimension of one patch vector, (2a+1)^2 d."""
        return self.patch_size**2 * self.depth


# --- features, slices, patches ------------------------------------------------------------------

def _cover(n: int, size: int, stride: int, radius: int) -> tuple[int, int]:
    """Padding (before, after) so that centres 0, stride, ... reach position n-1."""
    centres = -(-(n - 1) // stride) + 1
    padded = (centres - 1) * stride + size
    return radius, padded - n - radius


def _pad(x: torch.Tensor, cfg: PatchReplacementConfig) -> torch.Tensor:
    top, bottom = _cover(x.shape[-2], cfg.patch_size, cfg.stride, cfg.radius)
    left, right = _cover(x.shape[-1], cfg.patch_size, cfg.stride, cfg.radius)
    if top == bottom == left == right == 0:
        return x
    mode = "replicate" if cfg.padding == "replicate" else "constant"
    return F.pad(x, (left, right, top, bottom), mode=mode)


def _slices(x: torch.Tensor, depth: int) -> int:
    if x.ndim != 4:
        raise InputError(f"patch replacement: expected a 4-D feature [N, C, H, W], got shape {list(x.shape)}")
    if x.shape[1] % depth:
        raise InputError(
            f"patch replacement: {x.shape[1]} channels cannot be cut into slices of depth {depth} "
            f"(depth must divide the channel count)"
        )
    return x.shape[1] // depth


def _grid(n: int, cfg: PatchReplacementConfig) -> tuple[int, int, int]:
    """(padding before, padding after, number of patch centres) along one spatial axis."""
    before, after = _cover(n, cfg.patch_size, cfg.stride, cfg.radius)
    return before, after, (n + before + after - cfg.patch_size) // cfg.stride + 1


def extract_patches(x: torch.Tensor, cfg: PatchReplacementConfig) -> torch.Tensor:
    """[N, C, H, W] -> patches [m, N * L, (2a+1)^2 d], one row per patch position of each slice.

    A patch vector is laid out (2a+1, 2a+1, d): rows, columns, then the slice's channels
    innermost. Built as one copy of the padded feature into [m, N, H, W, d] and one copy of a
    strided window view (no im2col: its per-image parallel regions stall when CPU cores are
    shared, and channels innermost copies 2x faster).
    """
    n = x.shape[0]
    m = _slices(x, cfg.depth)
    k, c, d = cfg.patch_size, cfg.stride, cfg.depth
    xs = _pad(x, cfg)
    xl = xs.reshape(n, m, d, xs.shape[2], xs.shape[3]).permute(1, 0, 3, 4, 2).contiguous()  # [m, N, Hp, Wp, d]
    win = xl.unfold(2, k, c).unfold(3, k, c)  # [m, N, nh, nw, d, k, k] (a view)
    nh, nw = win.shape[2], win.shape[3]
    return win.permute(0, 1, 2, 3, 5, 6, 4).reshape(m, n * nh * nw, cfg.dim)


def reconstruct(patches: torch.Tensor, shape: torch.Size | tuple[int, ...], cfg: PatchReplacementConfig) -> torch.Tensor:
    """Inverse of ``extract_patches``: overlapping patches are averaged (section 6.3.4).

    Sums the patches into the padded slices with (2a+1)^2 strided adds (one per offset inside a
    patch, each over every patch at once), divides by the number of patches covering each
    position, crops the padding and concatenates the slices over channels.
    """
    n, ch, h, w = shape
    m, d, k, c = ch // cfg.depth, cfg.depth, cfg.patch_size, cfg.stride
    top, bottom, nh = _grid(h, cfg)
    left, right, nw = _grid(w, cfg)
    hp, wp = h + top + bottom, w + left + right
    p = patches.reshape(m, n, nh, nw, k, k, d)
    total = patches.new_zeros((m, n, hp, wp, d))
    count = patches.new_zeros((hp, wp, 1))
    for u in range(k):
        for v in range(k):
            rows, cols = slice(u, u + c * (nh - 1) + 1, c), slice(v, v + c * (nw - 1) + 1, c)
            total[:, :, rows, cols] += p[:, :, :, :, u, v]
            count[rows, cols] += 1
    out = (total / count)[:, :, top : top + h, left : left + w]  # [m, N, H, W, d]
    return out.permute(1, 0, 4, 2, 3).reshape(n, ch, h, w)


# --- replacement strategies (eq. 6.3-6.5) -------------------------------------------------------

def replace(p: torch.Tensor, q: torch.Tensor, strategy: str, eps: float) -> torch.Tensor:
    """P' from patches ``p`` and their quantized versions ``q`` (rows are patch vectors).

    plain: q.  l2: q where ||q - p|| < eps, else p + eps (q - p) / ||q - p||.
    linf: p + clip(q - p, -eps, eps).  linear: p + eps (q - p).
    Written so that the limiting cases hold exactly: eps = 0 gives p (l2, linf, linear), eps above
    every distance gives q (l2, linf), linear with eps = 1 gives q.
    """
    if strategy == "plain":
        return q
    if strategy == "linear":
        return torch.lerp(p, q, eps)  # exact at both ends: lerp(p, q, 0) = p, lerp(p, q, 1) = q
    diff = q - p
    if strategy == "l2":
        dist = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        moved = p + diff * (eps / dist.clamp_min(torch.finfo(p.dtype).tiny))
        return torch.where(dist < eps, q, torch.where(dist > 0, moved, p))
    if strategy == "linf":
        return torch.where(diff.abs() <= eps, q, p + diff.clamp(-eps, eps))
    raise ConfigError(f"strategy: unknown {strategy!r}; expected plain, l2, linf or linear")


# --- the E8 lattice (Conway and Sloane, 1982) ----------------------------------------------------

def nearest_dn(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of D_n = {z in Z^n : sum(z) even} to each row of ``x`` (last dimension n).

    Round every coordinate; if the sum is odd, round the coordinate with the largest rounding
    error the other way.
    """
    f = torch.round(x)
    delta = x - f
    worst = delta.abs().argmax(dim=-1, keepdim=True)
    step = torch.where(delta.gather(-1, worst) >= 0, 1.0, -1.0).to(x.dtype)
    g = f.scatter_add(-1, worst, step)
    odd = (f.sum(dim=-1, keepdim=True).remainder(2) != 0)
    return torch.where(odd, g, f)


def nearest_e8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Nearest point of ``scale`` * E8 to each 8-vector (last dimension 8).

    E8 = D8 u (D8 + 1/2): decode in both cosets and keep the closer point.
    """
    if x.shape[-1] != 8:
        raise InputError(f"E8 quantizes 8-dimensional vectors, got last dimension {x.shape[-1]}")
    y = x / scale
    a = nearest_dn(y)
    b = nearest_dn(y - 0.5) + 0.5
    da = (y - a).square().sum(-1, keepdim=True)
    db = (y - b).square().sum(-1, keepdim=True)
    return torch.where(da <= db, a, b) * scale


def e8_quantize_patches(patches: torch.Tensor, cfg: PatchReplacementConfig) -> torch.Tensor:
    """q(P) for the E8 quantizer: each spatial position's 8-channel vector goes to s E8."""
    v = patches.reshape(*patches.shape[:-1], cfg.patch_size**2, cfg.depth)  # [..., (2a+1)^2, 8]
    return nearest_e8(v, cfg.scale).reshape(patches.shape)


# --- codebooks and nearest-codeword search ----------------------------------------------------------

def _threads(n: int) -> int:
    return n or max(1, min(4, os.cpu_count() or 1))


def configure_faiss(threads: int):
    import faiss

    # small query batches of low-dimensional patches: BLAS from 20 queries on (ENVIRONMENT.md)
    faiss.cvar.distance_compute_blas_threshold = 20
    faiss.omp_set_num_threads(_threads(threads))
    return faiss


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def torch_nearest(patches: torch.Tensor, codebooks: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """Brute-force nearest codeword: argmin_j ||p - c_j||^2, batched over slices.

    patches [m, P, dim], codebooks [m, K, dim] -> indices [m, P]. Distances are expanded as
    ||c||^2 - 2 p.c (||p||^2 does not change the argmin), ``chunk`` rows of P at a time.
    """
    sq = codebooks.square().sum(-1).unsqueeze(1)  # [m, 1, K]
    out = torch.empty(patches.shape[:2], dtype=torch.int64, device=patches.device)
    step = max(1, min(chunk, (1 << 26) // max(1, codebooks.shape[0] * codebooks.shape[1])))
    for s in range(0, patches.shape[1], step):
        p = patches[:, s : s + step]
        out[:, s : s + step] = torch.baddbmm(sq, p, codebooks.transpose(1, 2), alpha=-2.0).argmin(-1)
    return out


class Codebooks:
    """Per-slice codebooks [m, K, dim] with exact L2 search (faiss IndexFlatL2 or torch)."""

    def __init__(self, centroids: np.ndarray, *, threads: int = 0, gpu: bool = True, search: str = "auto") -> None:
        if centroids.ndim != 3 or centroids.dtype != np.float32:
            raise ArtifactError(f"codebooks must be float32 [slices, K, dim], got {centroids.dtype} {list(centroids.shape)}")
        self.centroids = np.ascontiguousarray(centroids)
        self.threads, self.gpu, self.search = threads, gpu, search
        self._indexes: list[Any] | None = None
        self._gpu_indexes: list[Any] | None = None
        self._res: Any = None
        self._torch: dict[torch.device, torch.Tensor] = {}

    @property
    def slices(self) -> int:
        return self.centroids.shape[0]

    @property
    def size(self) -> int:
        return self.centroids.shape[1]

    @property
    def dim(self) -> int:
        return self.centroids.shape[2]

    def tensor(self, device: torch.device) -> torch.Tensor:
        if device not in self._torch:
            self._torch[device] = torch.from_numpy(self.centroids).to(device)
        return self._torch[device]

    def cpu_indexes(self) -> list[Any]:
        if self._indexes is None:
            faiss = configure_faiss(self.threads)
            self._indexes = []
            for c in self.centroids:
                index = faiss.IndexFlatL2(self.dim)
                index.add(c)
                self._indexes.append(index)
        return self._indexes

    def cuda_indexes(self) -> list[Any]:
        if self._gpu_indexes is None:
            faiss = configure_faiss(self.threads)
            importlib.import_module("faiss.contrib.torch_utils")  # faiss searches then accept torch tensors
            self._res = faiss.StandardGpuResources()
            self._gpu_indexes = [faiss.index_cpu_to_gpu(self._res, 0, ix) for ix in self.cpu_indexes()]
        return self._gpu_indexes

    def backend(self, device: torch.device) -> str:
        if self.search == "torch":
            return "torch"
        if device.type == "cpu":
            return "faiss"
        if self.gpu and faiss_has_gpu():
            return "faiss-gpu"
        if self.search == "faiss":
            return "faiss"  # copies to the host and back
        return "torch"

    def nearest(self, patches: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
        """Indices [m, P] of the nearest codeword of every patch [m, P, dim] in its slice's codebook."""
        if patches.shape[0] != self.slices or patches.shape[-1] != self.dim:
            raise InputError(
                f"patch replacement: the codebook has {self.slices} slices of {self.dim}-dimensional "
                f"codewords, the feature gives {patches.shape[0]} slices of dimension {patches.shape[-1]} "
                f"(wrong layer, depth or radius?)"
            )
        backend = self.backend(patches.device)
        if backend == "torch":
            return torch_nearest(patches, self.tensor(patches.device))
        if backend == "faiss-gpu":
            indexes = self.cuda_indexes()
            out = torch.empty(patches.shape[:2], dtype=torch.int64, device=patches.device)
            for k, index in enumerate(indexes):
                for s in range(0, patches.shape[1], chunk):
                    out[k, s : s + chunk] = index.search(patches[k, s : s + chunk].contiguous(), 1)[1][:, 0]
            return out
        configure_faiss(self.threads)  # the thread count is global in faiss: set it for this search
        host = patches.detach().to("cpu", torch.float32).numpy()
        labels = np.empty(host.shape[:2], dtype=np.int64)
        for k, index in enumerate(self.cpu_indexes()):
            for s in range(0, host.shape[1], chunk):
                labels[k, s : s + chunk] = index.search(np.ascontiguousarray(host[k, s : s + chunk]), 1)[1][:, 0]
        return torch.from_numpy(labels).to(patches.device)

    def quantize(self, patches: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
        """q_k(P): every patch replaced by its nearest codeword, same shape and dtype."""
        idx = self.nearest(patches, chunk)
        book = self.tensor(patches.device).to(patches.dtype)
        return torch.gather(book, 1, idx.unsqueeze(-1).expand(-1, -1, self.dim))


def train_codebooks(
    patches: torch.Tensor | np.ndarray, k: int, *, iterations: int = 20, seed: int = 0, threads: int = 0,
    gpu: bool = True, progress: bool | None = None,
) -> tuple[np.ndarray, list[float]]:
    """faiss k-means per slice: patches [m, n, dim] -> centroids [m, K, dim] and final objectives."""
    from tqdm.auto import tqdm

    faiss = configure_faiss(threads)
    data = patches.numpy() if isinstance(patches, torch.Tensor) else patches
    m, n, dim = data.shape
    if n < k:
        raise ConfigError(f"sample: {n} training patches per slice, fewer than the {k} codewords asked for")
    use_gpu = gpu and faiss_has_gpu()
    out = np.empty((m, k, dim), np.float32)
    objectives = []
    bar = tqdm(range(m), desc=f"k-means K={k} dim={dim}", unit="slice", disable=None if progress is None else not progress)
    for s in bar:
        km = faiss.Kmeans(dim, k, niter=iterations, seed=seed + s, gpu=use_gpu, verbose=False,
                          max_points_per_centroid=max(256, -(-n // k)))
        km.train(np.ascontiguousarray(data[s], dtype=np.float32))
        out[s] = km.centroids
        objectives.append(float(km.obj[-1]) if len(km.obj) else float("nan"))
    return out, objectives


# --- the defense -------------------------------------------------------------------------------------

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class PatchReplacement(Defense):
    """Patch replacement with per-slice k-means codebooks (``fit`` learns them)."""

    name: ClassVar[str] = "patch_replacement"
    random: ClassVar[bool] = False
    differentiable: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True

    config: PatchReplacementConfig

    def __init__(self, config: PatchReplacementConfig) -> None:
        super().__init__(config)
        self.codebooks: Codebooks | None = None
        self.features: FeatureFn | None = None
        self.meta: dict[str, Any] = {}

    @property
    def layer(self) -> str:
        return self.config.layer

    # -- serving --
    def quantize(self, patches: torch.Tensor) -> torch.Tensor:
        if self.codebooks is None:
            raise ArtifactError(
                f"patch_replacement ({self.config.artifact!r}): no codebook loaded; run `advshield fit` "
                f"on the pipeline file, then load it"
            )
        return self.codebooks.quantize(patches, self.config.chunk)

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.config
        patches = extract_patches(x, cfg)
        q = self.quantize(patches)
        return reconstruct(replace(patches, q, cfg.strategy, cfg.eps), x.shape, cfg)

    # -- fitting --
    def bind_features(self, fn: FeatureFn | None) -> None:
        """Set the map from pixel images to this layer's features (the model's head), for ``fit``."""
        self.features = fn

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.layer == IMAGE_LAYER:
            return images
        if self.features is None:
            raise ConfigError(
                f"layer: codebooks for layer {self.config.layer!r} are learnt on the model's features; "
                f"bind the model's head first (PatchReplacement.bind_features, done by "
                f"advshield.plugin.split.bind_feature_extractors)"
            )
        with torch.no_grad():
            return self.features(images)

    def sample_patches(self, images: torch.Tensor, seed: int, batch: int = 512,
                       progress: bool | None = None) -> torch.Tensor:
        """Training patches [m, sample, dim] drawn uniformly from ``fit_images`` random images.

        Features are computed ``batch`` images at a time; from each batch, a share of the sample
        proportional to its size is drawn without replacement, independently per slice, straight
        from a strided view of the padded feature (only the drawn patches are copied).
        """
        from tqdm.auto import tqdm

        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        images = torch.as_tensor(images)
        n = len(images)
        if n == 0:
            raise InputError("patch replacement fit: no training images")
        use = n if cfg.fit_images == 0 else min(n, cfg.fit_images)
        order = torch.randperm(n, generator=g)[:use].sort().values
        ends = np.minimum(np.arange(0, use + batch, batch), use)
        edges = np.round(ends * (cfg.sample / use)).astype(np.int64)
        k, c = cfg.patch_size, cfg.stride
        parts = []
        bar = tqdm(range(len(ends) - 1), desc=f"patches ({cfg.layer})", unit="batch",
                   disable=None if progress is None else not progress)
        for i in bar:
            feats = self._features(images[order[ends[i] : ends[i + 1]]].float()).float().cpu()
            b, m = feats.shape[0], _slices(feats, cfg.depth)
            xs = _pad(feats, cfg)
            xl = xs.reshape(b, m, cfg.depth, xs.shape[2], xs.shape[3]).permute(1, 0, 3, 4, 2)  # [m, b, Hp, Wp, d]
            win = xl.unfold(2, k, c).unfold(3, k, c)  # [m, b, nh, nw, d, k, k], a view
            nh, nw = win.shape[2], win.shape[3]
            take = int(min(edges[i + 1] - edges[i], b * nh * nw))
            idx = torch.stack([torch.randperm(b * nh * nw, generator=g)[:take] for _ in range(m)])  # [m, take]
            img, pos = idx // (nh * nw), idx % (nh * nw)
            picked = win[torch.arange(m).unsqueeze(1), img, pos // nw, pos % nw]  # [m, take, d, k, k]
            parts.append(picked.permute(0, 1, 3, 4, 2).reshape(m, take, cfg.dim))  # (k, k, d) layout
        out = torch.cat(parts, 1)
        if out.shape[1] < cfg.codewords:
            raise ConfigError(
                f"sample: only {out.shape[1]} patches could be drawn from {use} images, fewer than "
                f"codewords = {cfg.codewords}"
            )
        return out.contiguous()

    def fit(self, images: torch.Tensor, paths: Mapping[str, Path], *, seed: int = 0, data_sha256: str = "",
            progress: bool | None = None) -> None:
        """Learn the per-slice codebooks on clean ``images`` (float32 NCHW in [0, 1]) and write
        ``paths[artifact]`` (.npy [m, K, dim]) plus its JSON sidecar."""
        cfg = self.config
        if cfg.artifact not in paths:
            raise ConfigError(f"artifact: no path given for {cfg.artifact!r} (known: {', '.join(sorted(paths)) or 'none'})")
        seed = cfg.seed if cfg.seed >= 0 else seed
        t0 = time.perf_counter()
        patches = self.sample_patches(images, seed, progress=progress)
        t1 = time.perf_counter()
        centroids, objectives = train_codebooks(
            patches, cfg.codewords, iterations=cfg.iterations, seed=seed, threads=cfg.fit_threads, gpu=cfg.gpu,
            progress=progress,
        )
        t2 = time.perf_counter()
        path = Path(paths[cfg.artifact])
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.save(f, centroids, allow_pickle=False)
        self.meta = write_artifact_meta(
            path,
            format=ARTIFACT_FORMAT,
            defense=self.name,
            config=asdict(cfg),
            layer=cfg.layer,
            slices=int(centroids.shape[0]),
            codewords=int(centroids.shape[1]),
            dim=int(centroids.shape[2]),
            patch_layout="(2a+1, 2a+1, d): rows, columns, channels innermost",
            seed=seed,
            data_sha256=data_sha256,
            training_images=len(images),
            patches_per_slice=int(patches.shape[1]),
            kmeans_objective=objectives,
            faiss_gpu=bool(cfg.gpu and faiss_has_gpu()),
            seconds={"sampling": round(t1 - t0, 3), "kmeans": round(t2 - t1, 3)},
        )
        self.codebooks = Codebooks(centroids, threads=cfg.threads, gpu=cfg.gpu, search=cfg.search)
        log.info("patch_replacement %s: %d slices x %d codewords in %.1f s", cfg.artifact, *centroids.shape[:2], t2 - t0)

    def load(self, files: Mapping[str, Path]) -> None:
        """Read the codebook written by ``fit``; sha256 and parameters are checked against the sidecar."""
        cfg = self.config
        if cfg.artifact not in files:
            raise ArtifactError(f"patch_replacement: artifact {cfg.artifact!r} not given")
        path = Path(files[cfg.artifact])
        meta = verify_artifact(path)
        if not meta:
            raise ArtifactError(f"{path}: the sidecar {meta_path(path).name} is missing (layer and parameters unknown)")
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(f"{path}: not a patch codebook (format {meta.get('format')!r})")
        made = meta.get("config", {})
        for key in ("layer", "depth", "radius", "codewords", "padding"):
            if made.get(key) != getattr(cfg, key):
                raise ArtifactError(
                    f"{path}: codebook fitted with {key} = {made.get(key)!r}, the pipeline says "
                    f"{getattr(cfg, key)!r}; run `advshield fit` again"
                )
        try:
            centroids = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ArtifactError(f"{path}: cannot read the codebook: {e}") from None
        if centroids.ndim != 3 or centroids.shape[1:] != (cfg.codewords, cfg.dim):
            raise ArtifactError(f"{path}: codebook shape {list(centroids.shape)} does not match K={cfg.codewords}, dim={cfg.dim}")
        self.meta = meta
        self.codebooks = Codebooks(centroids.astype(np.float32, copy=False), threads=cfg.threads, gpu=cfg.gpu,
                                   search=cfg.search)

    def set_codebooks(self, centroids: np.ndarray) -> None:
        """Use given codebooks [m, K, dim] (tests, experiments)."""
        cfg = self.config
        self.codebooks = Codebooks(np.asarray(centroids, np.float32), threads=cfg.threads, gpu=cfg.gpu, search=cfg.search)


class E8PatchReplacement(PatchReplacement):
    """Patch replacement on the data-free E8 lattice: nothing to fit."""

    needs_fit: ClassVar[bool] = False

    def quantize(self, patches: torch.Tensor) -> torch.Tensor:
        return e8_quantize_patches(patches, self.config)

    def fit(self, images: torch.Tensor, paths: Mapping[str, Path], *, seed: int = 0, data_sha256: str = "",
            progress: bool | None = None) -> None:
        return None

    def load(self, files: Mapping[str, Path]) -> None:
        return None


@register_defense("patch_replacement", PatchReplacementConfig)
def build(config: PatchReplacementConfig) -> PatchReplacement:
    return E8PatchReplacement(config) if config.quantizer == "e8" else PatchReplacement(config)
