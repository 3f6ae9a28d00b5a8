"""What every defense is: a pure batch function on torch tensors with a frozen config.

* ``transform(x, generator)``: the defense on a float32 NCHW batch in [0, 1] (any device);
  random defenses draw only from ``generator``.
* ``approximation(x)``: its differentiable stand-in for BPDA (identity unless overridden).
* ``__call__`` refuses to run a non-differentiable defense under autograd unless ``bpda=True``:
  silent zero gradients are how defenses look robust when they are not.
* Defenses that learn from data implement ``fit`` (returns the artifact files it wrote) and
  ``load`` (reads them back, checksums verified by ``verify_artifact``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from advshield.core.errors import AdvshieldError, ArtifactError
from advshield.core.hashing import sha256_file


class NonDifferentiableError(AdvshieldError, RuntimeError):
    """A non-differentiable defense was run under autograd without its BPDA approximation."""


class Defense:
    """Base class; subclasses set ``name``, ``random``, ``differentiable`` and implement transform."""

    name: ClassVar[str] = "defense"
    random: ClassVar[bool] = False  # random: takes its randomness from the generator; audits apply EOT
    differentiable: ClassVar[bool] = False  # True when autograd through transform is the true gradient
    needs_fit: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        self.config = config

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        """Backward-pass approximation for BPDA; identity by default."""
        return x

    def __call__(
        self, x: torch.Tensor, generator: torch.Generator | None = None, *, bpda: bool = False
    ) -> torch.Tensor:
        if self.differentiable or not (torch.is_grad_enabled() and x.requires_grad):
            return self.transform(x, generator)
        if not bpda:
            raise NonDifferentiableError(
                f"defense {self.name!r} is not differentiable; run it with bpda=True (backward pass "
                f"through its approximation) or under torch.no_grad()"
            )
        return bpda_apply(self, x, generator)

    # --- learning from data -------------------------------------------------------------------
    @property
    def artifact_names(self) -> tuple[str, ...]:
        """Names of the pipeline's ``[artifacts]`` entries this defense reads (config field
        ``artifact`` or ``artifacts`` by convention)."""
        one = getattr(self.config, "artifact", "")
        many = getattr(self.config, "artifacts", ())
        return tuple(([one] if one else []) + list(many))

    def fit(self, images: torch.Tensor, paths: Mapping[str, Path], *, seed: int = 0, data_sha256: str = "") -> None:
        """Learn from clean images (float32 NCHW in [0, 1]) and write each artifact named in
        ``artifact_names`` to ``paths[name]`` plus its sidecar (``write_artifact_meta``)."""
        if self.needs_fit:
            raise NotImplementedError(f"{type(self).__name__}.fit")

    def load(self, files: Mapping[str, Path]) -> None:
        """Read back the artifacts ``fit`` wrote (their checksums are verified before this call)."""
        if self.needs_fit:
            raise NotImplementedError(f"{type(self).__name__}.load")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def bpda_apply(defense: Defense, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward: the defense itself; backward: the gradient of its approximation (BPDA).

    Written as defense(x) + (approx(x) - approx(x).detach()): the value is the defense's output
    bit for bit (the bracket is exactly zero) and autograd sees only the approximation.
    """
    with torch.no_grad():
        y = defense.transform(x.detach(), generator)
    a = defense.approximation(x)
    return y + (a - a.detach())


# --- artifacts: files plus a JSON sidecar with parameters and checksums (never pickle) ---------

def meta_path(path: str | Path) -> Path:
    return Path(str(path) + ".meta.json")


def write_artifact_meta(path: str | Path, **meta: Any) -> dict[str, Any]:
    """Write ``<path>.meta.json`` recording the artifact's sha256 and how it was made."""
    record = {"file": Path(path).name, "sha256": sha256_file(path), **meta}
    meta_path(path).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    return record


def verify_artifact(path: str | Path, declared_sha256: str = "") -> dict[str, Any]:
    """Check an artifact against the sha256 the pipeline declares, else against its sidecar."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact not found: {path} (run `advshield fit` on the pipeline file)")
    digest = sha256_file(path)
    meta: dict[str, Any] = {}
    if meta_path(path).is_file():
        meta = json.loads(meta_path(path).read_text())
    expected = declared_sha256 or meta.get("sha256", "")
    if not expected:
        raise ArtifactError(f"artifact {path} has no declared sha256 and no {meta_path(path).name} sidecar")
    if digest != expected:
        raise ArtifactError(f"artifact {path}: sha256 {digest} does not match the expected {expected}")
    return meta
