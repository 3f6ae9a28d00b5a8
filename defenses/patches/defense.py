"""The patch replacement defenses (k-means codebooks or the E8 lattice), their codebook artifact,
and their registration as defense type ``patch_replacement``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from advshield.core.errors import ArtifactError, ConfigError, InputError
from advshield.core.progress import progress as progress_bar
from advshield.defenses.base import Defense, meta_path, verify_artifact, write_artifact_meta
from advshield.defenses.patches.codebooks import Codebooks, faiss_has_gpu, train_codebooks
from advshield.defenses.patches.config import IMAGE_LAYER, PatchReplacementConfig
from advshield.defenses.patches.e8 import e8_quantize_patches
from advshield.defenses.patches.geometry import extract_patches, patch_windows, reconstruct
from advshield.defenses.patches.strategies import replace
from advshield.defenses.registry import register_defense

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "advshield.patch_codebook.v1"

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
                       progress: bool = True) -> torch.Tensor:
        """Training patches [m, sample, dim] drawn uniformly from ``fit_images`` random images.

        Features are computed ``batch`` images at a time; from each batch, a share of the sample
        proportional to its size is drawn without replacement, independently per slice, straight
        from a strided view of the padded feature (only the drawn patches are copied).
        """
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
        parts = []
        for i in progress_bar(range(len(ends) - 1), enabled=progress, desc=f"patches ({cfg.layer})", unit="batch"):
            feats = self._features(images[order[ends[i] : ends[i + 1]]].float()).float().cpu()
            win = patch_windows(feats, cfg, copy=False)  # [m, b, nh, nw, d, k, k], a view
            m, b, nh, nw = win.shape[:4]
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
            progress: bool = True) -> None:
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
        self.set_codebooks(centroids)

    def set_codebooks(self, centroids: np.ndarray) -> None:
        """Use given codebooks [m, K, dim] (tests, experiments)."""
        cfg = self.config
        self.codebooks = Codebooks(np.asarray(centroids, np.float32), threads=cfg.threads, gpu=cfg.gpu, search=cfg.search)


class E8PatchReplacement(PatchReplacement):
    """Patch replacement on the data-free E8 lattice: nothing to fit."""

    needs_fit: ClassVar[bool] = False

    def quantize(self, patches: torch.Tensor) -> torch.Tensor:
        return e8_quantize_patches(patches, self.config.scale)

    def fit(self, images: torch.Tensor, paths: Mapping[str, Path], *, seed: int = 0, data_sha256: str = "",
            progress: bool = True) -> None:
        return None

    def load(self, files: Mapping[str, Path]) -> None:
        return None


@register_defense("patch_replacement", PatchReplacementConfig)
def build(config: PatchReplacementConfig) -> PatchReplacement:
    return E8PatchReplacement(config) if config.quantizer == "e8" else PatchReplacement(config)
