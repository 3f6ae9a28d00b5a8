"""Defenses: pure batch functions on torch tensors plus frozen, validated configs.

This package imports nothing of ``advshield.plugin``, ``advshield.attacks`` or
``advshield.deploy``. Each defense registers itself by type name in ``registry``.
"""

from advshield.defenses.registry import DEFENSES, DETECTORS, parse_defense, parse_detector

__all__ = ["DEFENSES", "DETECTORS", "parse_defense", "parse_detector"]
