"""The k-means quantizer: per-slice codebooks learnt with faiss k-means, searched exactly.

Product quantization (thesis section 6.3.2): one codebook C_k of K codewords per slice; q_k is the
exact nearest codeword, found by faiss IndexFlatL2 (on a GPU when faiss has one and the batch is
there) or by a batched brute-force torch search, the reference the faiss search is tested against.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import faiss
import numpy as np
import torch

from advshield.core.errors import ArtifactError, ConfigError, InputError
from advshield.core.progress import progress as progress_bar


def _resolve_threads(n: int) -> int:
    """``n``; 0: ``ADVSHIELD_THREADS`` (what ``advshield serve --threads`` sets for the whole
    process, so that faiss's OpenMP workers do not spin on the cores the server's RPC threads
    need), else min(4, cores)."""
    env = os.environ.get("ADVSHIELD_THREADS", "").strip()
    return n or (int(env) if env.isascii() and env.isdigit() and int(env) > 0 else 0) or max(1, min(4, os.cpu_count() or 1))


def configure_faiss(threads: int) -> None:
    """Set faiss's global OpenMP thread count (0: min(4, cores)) and BLAS threshold before a call."""
    # small query batches of low-dimensional patches: BLAS from 20 queries on (ENVIRONMENT.md)
    faiss.cvar.distance_compute_blas_threshold = 20
    faiss.omp_set_num_threads(_resolve_threads(threads))


def faiss_has_gpu() -> bool:
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
    def dim(self) -> int:
        return self.centroids.shape[2]

    def tensor(self, device: torch.device) -> torch.Tensor:
        if device not in self._torch:
            self._torch[device] = torch.from_numpy(self.centroids).to(device)
        return self._torch[device]

    def cpu_indexes(self) -> list[Any]:
        if self._indexes is None:
            configure_faiss(self.threads)
            self._indexes = []
            for c in self.centroids:
                index = faiss.IndexFlatL2(self.dim)
                index.add(c)
                self._indexes.append(index)
        return self._indexes

    def cuda_indexes(self) -> list[Any]:
        if self._gpu_indexes is None:
            configure_faiss(self.threads)
            # lazy: the faiss GPU path only; faiss searches then accept torch tensors
            importlib.import_module("faiss.contrib.torch_utils")
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
    gpu: bool = True, progress: bool = True,
) -> tuple[np.ndarray, list[float]]:
    """faiss k-means per slice: patches [m, n, dim] -> centroids [m, K, dim] and final objectives."""
    configure_faiss(threads)
    data = patches.numpy() if isinstance(patches, torch.Tensor) else patches
    m, n, dim = data.shape
    if n < k:
        raise ConfigError(f"sample: {n} training patches per slice, fewer than the {k} codewords asked for")
    use_gpu = gpu and faiss_has_gpu()
    out = np.empty((m, k, dim), np.float32)
    objectives = []
    for s in progress_bar(range(m), enabled=progress, desc=f"k-means K={k} dim={dim}", unit="slice"):
        km = faiss.Kmeans(dim, k, niter=iterations, seed=seed + s, gpu=use_gpu, verbose=False,
                          max_points_per_centroid=max(256, -(-n // k)))
        km.train(np.ascontiguousarray(data[s], dtype=np.float32))
        out[s] = km.centroids
        objectives.append(float(km.obj[-1]) if km.obj is not None and len(km.obj) else float("nan"))
    return out, objectives
