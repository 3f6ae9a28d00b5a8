"""The exception hierarchy. Every error a user can cause is an ``AdvshieldError``."""

from __future__ import annotations


class AdvshieldError(Exception):
    """Base class of every error advshield raises on purpose."""


class ConfigError(AdvshieldError, ValueError):
    """A pipeline file or a config value is invalid (the message names the key)."""


class DataError(AdvshieldError):
    """A data set is missing or malformed."""


class ImageError(AdvshieldError, ValueError):
    """An input image cannot be decoded or violates the input spec."""


class InputError(AdvshieldError, ValueError):
    """A batch handed to a classifier has the wrong shape, dtype or range."""


class ModelError(AdvshieldError):
    """A model file cannot be loaded or converted."""


class ParityError(ModelError):
    """Two implementations of the same model disagree beyond tolerance."""


class ArtifactError(AdvshieldError):
    """An artifact is missing or its checksum does not match."""
