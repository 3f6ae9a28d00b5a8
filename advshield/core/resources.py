"""Files shipped inside the package: the example pipelines and the embedded reference models.

The package is read-only for advshield: ``copy_examples`` puts the example pipelines and the models
they name into a working folder, where ``fit`` may write their artifacts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from advshield.core.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PIPELINES_DIR = PACKAGE_DIR / "pipelines"
MODELS_DIR = PACKAGE_DIR / "models"
DEFAULT_PIPELINE = PIPELINES_DIR / "fashion_mnist.toml"


def example_pipeline(name: str) -> Path:
    """The packaged example pipeline ``name`` (with or without ``.toml``)."""
    path = PIPELINES_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PIPELINES_DIR.glob("*.toml")))
        raise ConfigError(f"no example pipeline {name!r}; the package ships: {known}")
    return path


def inside_package(path: str | Path) -> bool:
    """True when ``path`` lies inside the installed advshield package (which advshield never writes)."""
    return Path(path).resolve().is_relative_to(PACKAGE_DIR)


def copy_examples(dest: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy the example pipelines (``dest/pipelines/*.toml``) and the models they name
    (``dest/models/``) into ``dest``, keeping their relative paths; returns the pipeline files.
    Refuses to overwrite an existing file unless ``overwrite``."""
    dest = Path(dest)
    if inside_package(dest):
        raise ConfigError(f"{dest}: choose a working folder outside the installed package ({PACKAGE_DIR})")
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{dest}: exists and is not a folder")
    sources = sorted(PIPELINES_DIR.glob("*.toml")) + sorted(MODELS_DIR.glob("*.onnx")) + sorted(MODELS_DIR.glob("*.json"))
    targets = [dest / src.parent.name / src.name for src in sources]
    clash = [str(t) for t in targets if t.exists()]
    if clash and not overwrite:
        raise ConfigError(f"{dest}: would overwrite {len(clash)} file(s), e.g. {clash[0]}; pass overwrite (--force) to replace them")
    for src, target in zip(sources, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return [t for t in targets if t.suffix == ".toml"]
