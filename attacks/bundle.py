"""A pipeline's files by content, for workers that do not share the driver's disk.

``pack`` reads every file the pipeline uses (the model, the surrogate, the artifacts with their
``.meta.json`` sidecars, and any extra files such as ``[certify]`` noise models) into a ``Bundle``:
bytes with their sha256, plus the pipeline as a table whose paths name the bundled files. On the
worker ``unpack`` writes them into a folder, checks each file's sha256 against the one the driver
computed *before anything loads it* (an ``ArtifactError`` names the file that differs), and loads
the pipeline from there: the same graph, codebooks and thresholds, byte for byte. The pipeline
travels without its data set (the images travel as arrays) and with its class names inline.
No pickle: the files are the ONNX/npy/json bytes themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advshield.core.errors import ArtifactError
from advshield.core.validation import to_mapping
from advshield.plugin.config import PipelineConfig, parse_pipeline

SIDECAR = ".meta.json"


@dataclass(frozen=True)
class Bundle:
    """The pipeline table (paths relative to the bundle folder) and name -> (file name, bytes, sha256)."""

    table: Mapping[str, Any]
    files: Mapping[str, tuple[str, bytes, str]] = field(default_factory=dict)

    @property
    def checksums(self) -> dict[str, str]:
        return {name: sha for name, (_, _, sha) in self.files.items()}

    @property
    def size(self) -> int:
        return sum(len(data) for _, data, _ in self.files.values())


def _entry(name: str, path: Path) -> tuple[str, bytes, str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{name}: cannot read {path}: {e.strerror}") from None
    return f"{name}/{path.name}", data, hashlib.sha256(data).hexdigest()


def pack(cfg: PipelineConfig, extra: Mapping[str, str | Path] | None = None) -> Bundle:
    """The pipeline's files (``cfg.files()``, verified against their pins first), their sidecars,
    and ``extra`` (name -> path), with the pipeline table rewritten to name them."""
    cfg.checksums(verify=True)  # a pinned file that changed is refused here, on the driver, too
    files: dict[str, tuple[str, bytes, str]] = {}
    for name, (path, _) in cfg.files().items():
        files[name] = _entry(name, path)
        sidecar = Path(str(path) + SIDECAR)
        if sidecar.is_file():
            files[name + SIDECAR] = (files[name][0] + SIDECAR, *_entry(name, sidecar)[1:])
    for name, path in (extra or {}).items():
        files[name] = _entry(name, Path(path))
    table = cfg.to_dict()
    model = dict(table["model"])
    model.update(path=files["model"][0], classes=list(cfg.class_names), classes_file="")
    if "surrogate" in files:
        model["surrogate"] = files["surrogate"][0]
    table["model"] = model
    table["data"] = to_mapping(cfg.data.standalone(cfg.root))  # no data set: the images travel as arrays
    if cfg.artifacts:
        table["artifacts"] = {k: {**to_mapping(a), "path": files[f"artifacts.{k}"][0]} for k, a in cfg.artifacts.items()}
    return Bundle(table, files)


def unpack(bundle: Bundle, folder: Path) -> tuple[PipelineConfig, dict[str, Path]]:
    """Write the bundle under ``folder``, verify every file's sha256, and load the pipeline from
    there; returns it and name -> written path (for the ``extra`` files)."""
    folder = Path(folder)
    paths: dict[str, Path] = {}
    for name, (rel, data, sha) in bundle.files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != sha:
            raise ArtifactError(f"{name}: sha256 mismatch on this worker for {path}: the file has {got}, "
                                f"the driver sent {sha}")
        paths[name] = path
    cfg = parse_pipeline(dict(bundle.table), folder.resolve())
    return cfg, paths
