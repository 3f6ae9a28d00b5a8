"""Defense and detector types by name, as the pipeline file's ``type = "..."`` names them.

A defense module registers its frozen config dataclass and a factory::

    @register_defense("bit_depth", BitDepthConfig)
    def build(config: BitDepthConfig) -> Defense: ...

The pipeline loader validates each ``[[defenses]]`` table against the registered config
(unknown keys and bad values are errors naming them) without building anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from advshield.core.errors import ConfigError
from advshield.core.validation import from_mapping


@dataclass(frozen=True)
class Registered:
    name: str
    config_cls: type
    build: Callable[[Any], Any]


DEFENSES: dict[str, Registered] = {}
DETECTORS: dict[str, Registered] = {}


def _register(table: dict[str, Registered], kind: str, name: str, config_cls: type) -> Callable:
    def deco(build: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if name in table:
            raise RuntimeError(f"{kind} type {name!r} registered twice")
        table[name] = Registered(name, config_cls, build)
        return build

    return deco


def register_defense(name: str, config_cls: type) -> Callable:
    return _register(DEFENSES, "defense", name, config_cls)


def register_detector(name: str, config_cls: type) -> Callable:
    return _register(DETECTORS, "detector", name, config_cls)


def _parse(table: dict[str, Registered], kind: str, spec: Any, where: str) -> tuple[str, Any]:
    _load_builtin()
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a table, got {spec!r}")
    if "type" not in spec:
        raise ConfigError(f"{where}: missing required key 'type' (one of: {', '.join(sorted(table)) or 'none yet'})")
    name = spec["type"]
    if name not in table:
        raise ConfigError(
            f"{where}.type: unknown {kind} type {name!r}; known: {', '.join(sorted(table)) or 'none yet'}"
        )
    params = {k: v for k, v in spec.items() if k != "type"}
    return name, from_mapping(table[name].config_cls, params, where)


def parse_defense(spec: Any, where: str = "defenses") -> tuple[str, Any]:
    """Validate one ``[[defenses]]`` table: returns (type name, frozen config)."""
    return _parse(DEFENSES, "defense", spec, where)


def parse_detector(spec: Any, where: str = "detector") -> tuple[str, Any]:
    return _parse(DETECTORS, "detector", spec, where)


def build_defense(name: str, config: Any) -> Any:
    _load_builtin()
    return DEFENSES[name].build(config)


def build_detector(name: str, config: Any) -> Any:
    _load_builtin()
    return DETECTORS[name].build(config)


_BUILTIN_MODULES: tuple[str, ...] = (  # modules that register built-in defenses on import
    "advshield.defenses.patches",
    "advshield.defenses.squeeze",
    "advshield.defenses.randomization",
    "advshield.defenses.detector",
)
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    import importlib

    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    _loaded = True
