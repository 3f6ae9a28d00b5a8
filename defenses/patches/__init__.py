"""Patch replacement (H. Zhang, PhD thesis, ENS Rennes 2021, chapter 6, sections 6.3-6.4).

A feature map F [N, D, H, W] (layer 0 = the image itself, or an early layer of the network) is
cut along its channels into m = D / d *slices* of depth d (F = [F_1, ..., F_m]); each slice into
*patches* P_ijk = F_k(i-a:i+a, j-a:j+a) of (2a+1) x (2a+1) x d whose centres move on a grid of
step c (c < 2a+1: overlapping patches). Each patch is replaced through the quantizer q_k of its
slice with one of four strategies (plain, l2, linf, linear; parameter eps). Overlapping patches
are averaged back into the slice (section 6.3.4) and the slices concatenated over channels:
F' = Q(F).

Quantizers (section 6.3.2):

* ``kmeans``: one codebook of K codewords per slice, learnt with faiss k-means on patches sampled
  from clean training data; q_k = exact nearest codeword. Artifact: one ``.npy`` array
  [m, K, (2a+1)^2 d] with a JSON sidecar.
* ``e8``: the data-free E8 lattice at scale s (d = 8): every 8-channel vector of a patch is
  replaced by its nearest point of s E8.

BPDA: the replacement is not differentiable; its backward pass is the identity (the default
``Defense.approximation``).

Feature layers: the defense itself only sees a tensor. ``layer`` names where it runs; the serving
pipeline (``advshield.plugin.split``) cuts the ONNX model there and, before ``fit``, binds the
model's head with ``bind_features`` so that codebooks are learnt on the layer's features.

Modules: ``config`` (the validated parameters), ``geometry`` (padding, patches <-> feature),
``strategies`` (eq. 6.3-6.5), ``e8`` (the lattice decoder), ``codebooks`` (faiss k-means and
nearest-codeword search), ``defense`` (the defenses, their artifact, the registration).
"""

from advshield.defenses.patches.codebooks import (
    Codebooks,
    configure_faiss,
    faiss_has_gpu,
    torch_nearest,
    train_codebooks,
)
from advshield.defenses.patches.config import IMAGE_LAYER, PatchReplacementConfig
from advshield.defenses.patches.defense import ARTIFACT_FORMAT, E8PatchReplacement, PatchReplacement, build
from advshield.defenses.patches.e8 import e8_quantize_patches, nearest_dn, nearest_e8
from advshield.defenses.patches.geometry import extract_patches, reconstruct
from advshield.defenses.patches.strategies import Strategy, replace

__all__ = [
    "ARTIFACT_FORMAT",
    "IMAGE_LAYER",
    "Codebooks",
    "E8PatchReplacement",
    "PatchReplacement",
    "PatchReplacementConfig",
    "Strategy",
    "build",
    "configure_faiss",
    "e8_quantize_patches",
    "extract_patches",
    "faiss_has_gpu",
    "nearest_dn",
    "nearest_e8",
    "reconstruct",
    "replace",
    "torch_nearest",
    "train_codebooks",
]
