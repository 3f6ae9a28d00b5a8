"""The frozen, validated configuration of patch replacement (one ``[[defenses]]`` table)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from advshield.core.validation import check
from advshield.defenses.patches.strategies import Strategy

IMAGE_LAYER = "image"


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
    strategy    "plain", "l2", "linf" or "linear" (see ``strategies.py`` for the formulas)
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
