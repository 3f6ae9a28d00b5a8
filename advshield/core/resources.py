"""Files shipped inside the package: the example pipelines and the embedded reference models."""

from __future__ import annotations

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
