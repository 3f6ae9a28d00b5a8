"""The serving edge: image decoding, classifiers, the pipeline file, the defended pipeline, fitting,
the client of a live endpoint (``plugin.client``) and advshield's gRPC scoring server
(``plugin.server``).

The main names are re-exported here and load on first use: the generated Triton models import
``advshield.plugin.protocol``, and each model instance (its own stub process) should load only
what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier
    from advshield.plugin.client import RemoteClassifier, RemoteError
    from advshield.plugin.config import PipelineConfig, load_pipeline, loads_pipeline
    from advshield.plugin.decode import decode_image
    from advshield.plugin.fitting import FitSpec, fit_pipeline, fit_spec
    from advshield.plugin.pipeline import DefendedClassifier, Prediction

_WHERE = {
    "OnnxClassifier": "classifiers", "TwinClassifier": "classifiers",
    "RemoteClassifier": "client", "RemoteError": "client",
    "PipelineConfig": "config", "load_pipeline": "config", "loads_pipeline": "config",
    "decode_image": "decode",
    "FitSpec": "fitting", "fit_pipeline": "fitting", "fit_spec": "fitting",
    "DefendedClassifier": "pipeline", "Prediction": "pipeline",
}

__all__ = [
    "DefendedClassifier",
    "FitSpec",
    "OnnxClassifier",
    "PipelineConfig",
    "Prediction",
    "RemoteClassifier",
    "RemoteError",
    "TwinClassifier",
    "decode_image",
    "fit_pipeline",
    "fit_spec",
    "load_pipeline",
    "loads_pipeline",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"advshield.plugin.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'advshield.plugin' has no attribute {name!r}")
