"""``advshield examples``: the shipped pipelines copied into a working folder; advshield never
writes artifacts inside its installed package."""

from __future__ import annotations

from pathlib import Path

import pytest

from advshield.cli import main
from advshield.core.errors import ConfigError
from advshield.core.hashing import sha256_file
from advshield.core.resources import MODELS_DIR, PACKAGE_DIR, PIPELINES_DIR, copy_examples, inside_package
from advshield.plugin.config import load_pipeline
from advshield.plugin.fitting import FitSpec, fit_pipeline


def test_examples_copy_is_self_contained(tmp_path, capsys):
    dest = tmp_path / "work"
    assert main(["examples", str(dest)]) == 0
    copied = sorted(p.name for p in (dest / "pipelines").glob("*.toml"))
    assert copied == sorted(p.name for p in PIPELINES_DIR.glob("*.toml")) and copied
    for name in copied:
        cfg = load_pipeline(dest / "pipelines" / name)
        # every file the copy names lies in the working folder and is byte-identical to the shipped one
        for key, (path, _) in cfg.files().items():
            assert path.resolve().is_relative_to(dest.resolve()), (name, key, path)
            if not key.startswith("artifacts."):
                assert sha256_file(path) == sha256_file(MODELS_DIR / path.name)
    assert "fashion_mnist_squeeze.toml" in capsys.readouterr().out
    # a second copy refuses to overwrite, unless forced
    with pytest.raises(ConfigError, match="would overwrite"):
        copy_examples(dest)
    assert len(copy_examples(dest, overwrite=True)) == len(copied)


def test_examples_refuse_the_package_folder():
    with pytest.raises(ConfigError, match="outside the installed package"):
        copy_examples(PACKAGE_DIR / "pipelines" / "copy")


def test_fit_never_writes_inside_the_package(tmp_path):
    shipped = load_pipeline(PIPELINES_DIR / "fashion_mnist_squeeze.toml")
    assert inside_package(shipped.artifact_path("squeeze_threshold"))
    with pytest.raises(ConfigError, match=r"inside the installed advshield package .*advshield examples DIR"):
        fit_pipeline(shipped, FitSpec(calibration=10), progress=False)
    # the copy fits next to itself
    copy = copy_examples(tmp_path / "w")
    cfg = load_pipeline(next(p for p in copy if p.name == "fashion_mnist_squeeze.toml"))
    summary = fit_pipeline(cfg, FitSpec(calibration=50), progress=False)
    written = Path(summary["artifacts"]["squeeze_threshold"]["path"])
    assert written.is_file() and written.resolve().is_relative_to((tmp_path / "w").resolve())
