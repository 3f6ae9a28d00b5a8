"""The core layer every other layer may import: errors, config validation, hashing, data sets,
progress reporting. It imports nothing of advshield outside itself."""

from advshield.core.errors import (
    AdvshieldError,
    ArtifactError,
    ConfigError,
    DataError,
    ImageError,
    InputError,
    ModelError,
    ParityError,
)
from advshield.core.hashing import sha256_arrays, sha256_file
from advshield.core.validation import check, from_mapping, to_mapping

__all__ = [
    "AdvshieldError",
    "ArtifactError",
    "ConfigError",
    "DataError",
    "ImageError",
    "InputError",
    "ModelError",
    "ParityError",
    "check",
    "from_mapping",
    "sha256_arrays",
    "sha256_file",
    "to_mapping",
]
