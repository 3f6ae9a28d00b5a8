"""The serving edge: image decoding, classifiers, the pipeline file, the defended pipeline, fitting,
the client of a live endpoint (``plugin.client``, not loaded here: the Triton models import this
package) and advshield's gRPC scoring server (``plugin.server``)."""

from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier
from advshield.plugin.config import PipelineConfig, load_pipeline, loads_pipeline
from advshield.plugin.decode import decode_image
from advshield.plugin.pipeline import DefendedClassifier, Prediction

__all__ = [
    "DefendedClassifier",
    "OnnxClassifier",
    "PipelineConfig",
    "Prediction",
    "TwinClassifier",
    "decode_image",
    "load_pipeline",
    "loads_pipeline",
]
