"""advshield: defenses, adaptive audits and certification for deployed image classifiers.

The Python API (``advshield.api``) is available at the top level::

    import advshield
    cfg = advshield.load_pipeline("pipeline.toml")
    advshield.fit(cfg)
    result = advshield.audit(cfg, out="runs/audit")

The repository's folders are installed as sub-packages of this namespace, in layers that import
only downward: ``advshield.core`` (errors, validation, hashing, data, progress) <
``advshield.defenses`` < ``advshield.plugin`` (serving edge) < ``advshield.attacks`` (attacks,
audit, report, certification) < ``advshield.deploy`` < the API, the CLI and the demo.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from advshield.core.version import __version__

if TYPE_CHECKING:  # the names mypy and IDEs see; at run time they load on first use (below)
    from advshield.api import (
        AuditResult,
        CertifyResult,
        PipelineConfig,
        Prediction,
        audit,
        certify,
        classifier,
        copy_examples,
        deploy_triton,
        fit,
        info,
        init,
        load_pipeline,
        predict,
        serve,
        train,
    )
    from advshield.core.errors import AdvshieldError

__all__ = [
    "AdvshieldError",
    "AuditResult",
    "CertifyResult",
    "PipelineConfig",
    "Prediction",
    "__version__",
    "audit",
    "certify",
    "classifier",
    "copy_examples",
    "deploy_triton",
    "fit",
    "info",
    "init",
    "load_pipeline",
    "predict",
    "serve",
    "train",
]
_API = set(__all__) - {"AdvshieldError", "__version__"}


def __getattr__(name: str) -> Any:
    # ``import advshield.core.errors`` (what a Triton model or a defense imports) must not load
    # torch, onnx2torch and every attack: the API module loads when one of its names is used.
    if name in _API:
        return getattr(importlib.import_module("advshield.api"), name)
    if name == "AdvshieldError":
        return importlib.import_module("advshield.core.errors").AdvshieldError
    raise AttributeError(f"module 'advshield' has no attribute {name!r}")

