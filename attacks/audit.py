"""The audit runner: attacks as a cascade over the samples still robust; every adversarial example
clipped, checked against its threat model, rounded to 8 bits and re-scored through the real
serving path; one JSONL record per (sample, attack, eps), written as it is produced.

Phases, in this order, each over fixed batches of the sample range:

1. ``clean``: every sample through the serving path (prediction, detector score and flag);
2. white-box *minimal* attacks (DDN, BP, C&W, DeepFool) on every correctly classified sample: one
   run gives each sample's distortion, hence the attack's operating characteristic, and the
   per-sample best of them the empirical upper bound on the minimal distortion;
3. white-box *budget* attacks, per norm, eps ascending, in the listed order, each on the samples
   *still robust at that eps*: correct and without a successful record (of any attack so far)
   whose distortion in that norm is <= eps (a valid example at eps is valid at every larger eps);
4. transfer attacks (crafted on the surrogate; the target is not queried), same cascade: whatever
   they break, the white-box attacks had left robust;
5. sanity: an unbounded PGD (L-inf ``sanity_eps``) on a few correct samples; it should break all.

Resume: every batch of a unit (attack, eps) is written as its records followed by one ``commit``
line. A restarted audit keeps the committed batches (a torn or uncommitted tail is dropped), skips
them, and redoes the others with the same seeds, which are derived from (audit seed, attack, eps,
batch): the batches, the cascade and the seeds are the same, so are the records.

Modes (``adaptive``): ``off`` attacks the bare classifier (the twin) and ignores the defenses, the
non-adaptive baseline; ``auto`` attacks the pipeline (BPDA through non-differentiable steps, EOT
over random ones when the pipeline declares or shows randomness, the detector's reject logit when
``detector_aware``); ``on`` is ``auto`` with EOT applied even when no randomness is seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

import numpy as np
import torch

from advshield.attacks.adaptive import DEFAULT_EOT_SAMPLES, AttackModel, is_random, twin_of
from advshield.attacks.core import Counted, l2, margin, value_and_grad
from advshield.attacks.registry import AttackSpec, get_attack, run_attack
from advshield.attacks.threat import REASONS, ThreatModel, check_adversarial, judge
from advshield.configs import check, from_mapping, to_mapping
from advshield.errors import ConfigError, InputError

RECORDS = "records.jsonl"
PROBES = "probes.json"
EXAMPLES = "examples"
FORMAT = "advshield.audit/1"
# the [audit] keys the records depend on (the others only change the report): resuming with
# other values is refused
RECORD_SETTINGS = ("eps_linf", "eps_l2", "samples", "start", "batch_size", "seed", "adaptive", "eot_samples",
                   "detector_aware", "detector_weight", "flagged_is_failure", "transfer", "levels", "sanity_eps",
                   "sanity_samples")
DIST_TOL = 1e-6  # a distortion d counts within eps when d <= eps + DIST_TOL (the threat check's slack)

_ATTACK_KEYS = ("name", "id", "transfer", "eps")
DEFAULT_ATTACKS: tuple[Mapping[str, Any], ...] = tuple(MappingProxyType(a) for a in (
    {"name": "ddn"},
    {"name": "bp"},
    {"name": "fgsm"},
    {"name": "pgd_linf"},
    {"name": "pgd_l2"},
    {"name": "pgd_linf", "transfer": True},
))


# --- the [audit] section ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AttackEntry:
    """One attack of the audit: a registered attack, its hyper-parameters, crafted on the target
    (white-box) or on the surrogate (transfer). Budget attacks run at every eps of ``eps`` (default:
    the audit's grid of their norm)."""

    id: str
    name: str
    transfer: bool = False
    eps: tuple[float, ...] = ()
    hyper: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def spec(self) -> AttackSpec:
        return get_attack(self.name)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def norm(self) -> str:
        return self.spec.norm

    @property
    def source(self) -> str:
        return "transfer" if self.transfer else "white-box"

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": self.kind, "norm": self.norm, "source": self.source,
                "eps": list(self.eps), "hyper": dict(self.spec.hyper(**self.hyper, **self._eps_stub()))}

    def _eps_stub(self) -> dict[str, float]:
        return {"eps": 1.0} if self.kind == "budget" and "eps" not in self.spec.defaults else {}


def parse_attack(table: Any, where: str) -> AttackEntry:
    """``"pgd_linf"`` or ``{name = "pgd_linf", id = ..., transfer = true, eps = [...], steps = 20}``."""
    if isinstance(table, str):
        table = {"name": table}
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: expected an attack name or a table with name = ..., got {table!r}")
    name = table.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: expected the name of a registered attack, got {name!r}")
    try:
        spec = get_attack(name)
    except ConfigError as e:
        raise ConfigError(f"{where}.name: {e}") from None
    transfer = table.get("transfer", False)
    if not isinstance(transfer, bool):
        raise ConfigError(f"{where}.transfer: expected true or false, got {transfer!r}")
    eps_raw = table.get("eps", [])
    eps_list = [eps_raw] if isinstance(eps_raw, int | float) and not isinstance(eps_raw, bool) else eps_raw
    if not isinstance(eps_list, list | tuple) or not all(isinstance(e, int | float) and not isinstance(e, bool)
                                                         for e in eps_list):
        raise ConfigError(f"{where}.eps: expected a number or a list of numbers, got {eps_raw!r}")
    eps = tuple(float(e) for e in eps_list)
    if eps and spec.kind != "budget":
        raise ConfigError(f"{where}.eps: {name!r} is a minimal attack (it has no budget); remove eps")
    _check_grid(eps, spec.norm, f"{where}.eps")
    ident = table.get("id", f"transfer_{name}" if transfer else name)
    if not isinstance(ident, str) or not ident or not all(c.isalnum() or c in "-_." for c in ident):
        raise ConfigError(f"{where}.id: {ident!r} must be non-empty letters, digits, '-', '_' or '.'")
    hyper = {k: v for k, v in table.items() if k not in _ATTACK_KEYS}
    if "targeted" in hyper:
        raise ConfigError(f"{where}.targeted: the audit runs untargeted attacks only")
    entry = AttackEntry(ident, name, transfer, eps, MappingProxyType(hyper))
    try:
        spec.hyper(**hyper, **entry._eps_stub())
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return entry


def _check_grid(grid: Sequence[float], norm: str, where: str) -> None:
    check(all(e > 0 for e in grid), f"{where}: every eps must be > 0, got {list(grid)}")
    check(list(grid) == sorted(set(grid)), f"{where}: must be strictly increasing, got {list(grid)}")
    if norm == "linf":
        check(all(e <= 1 for e in grid), f"{where}: an L-inf eps is at most 1 (pixels in [0, 1]), got {list(grid)}")


@dataclass(frozen=True)
class AuditSpec:
    """The pipeline file's ``[audit]`` section."""

    attacks: tuple[Any, ...] = DEFAULT_ATTACKS  # names or tables (see ``parse_attack``)
    eps_linf: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2)
    eps_l2: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
    samples: int = 200  # test images audited, from ``start``
    start: int = 0
    batch_size: int = 100
    seed: int = 0
    adaptive: Literal["auto", "on", "off"] = "auto"
    eot_samples: int = 0  # EOT draws per gradient; 0: DEFAULT_EOT_SAMPLES where EOT applies
    detector_aware: bool = True  # adaptive attacks see the detector's reject logit
    detector_weight: float = 10.0
    flagged_is_failure: bool = True  # a flagged adversarial example is detected, not a success
    transfer: bool = True  # run the transfer attacks (needs [model] surrogate)
    levels: int = 256  # adversarial images are rounded to this many grey levels (0: not rounded)
    d_upp: float = 1.0  # L2 distortion at which P_upp is reported
    quantiles: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
    sanity_eps: float = 0.5  # L-inf budget of the unbounded sanity attack (0: no sanity attack)
    sanity_samples: int = 20
    masking_tolerance: float = 0.02  # share of the correct samples before a masking check warns
    gate_norm: Literal["linf", "l2"] = "linf"  # norm of [gate] gate_eps
    certify_checks: int = 20  # certified samples the smoothed-classifier sanity check attacks
    entries: tuple[AttackEntry, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        entries = tuple(parse_attack(a, f"audit.attacks[{i}]") for i, a in enumerate(self.attacks))
        ids = [e.id for e in entries]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        check(not dup, f"audit.attacks: id {', '.join(map(repr, dup))} used twice; give one of them id = \"...\"")
        reserved = {"clean"} | {i for i in ids if i.startswith("sanity_")}
        check(not reserved & set(ids), f"audit.attacks: ids {sorted(reserved & set(ids))} are reserved")
        object.__setattr__(self, "entries", entries)
        _check_grid(self.eps_linf, "linf", "audit.eps_linf")
        _check_grid(self.eps_l2, "l2", "audit.eps_l2")
        check(self.samples >= 1, f"audit.samples: must be >= 1, got {self.samples}")
        check(self.start >= 0, f"audit.start: must be >= 0, got {self.start}")
        check(self.batch_size >= 1, f"audit.batch_size: must be >= 1, got {self.batch_size}")
        check(self.eot_samples >= 0, f"audit.eot_samples: must be >= 0 (0: automatic), got {self.eot_samples}")
        check(self.detector_weight > 0, f"audit.detector_weight: must be > 0, got {self.detector_weight}")
        check(self.levels == 0 or self.levels >= 2, f"audit.levels: must be 0 or >= 2, got {self.levels}")
        check(self.d_upp > 0, f"audit.d_upp: must be > 0, got {self.d_upp}")
        check(all(0 < q < 1 for q in self.quantiles), f"audit.quantiles: must lie in (0, 1), got {list(self.quantiles)}")
        check(0 <= self.sanity_eps <= 1, f"audit.sanity_eps: must be within [0, 1], got {self.sanity_eps}")
        check(self.sanity_samples >= 0, f"audit.sanity_samples: must be >= 0, got {self.sanity_samples}")
        check(0 <= self.masking_tolerance < 1, f"audit.masking_tolerance: must be within [0, 1), got {self.masking_tolerance}")
        check(self.certify_checks >= 0, f"audit.certify_checks: must be >= 0, got {self.certify_checks}")

    def grid(self, norm: str) -> tuple[float, ...]:
        return self.eps_linf if norm == "linf" else self.eps_l2

    def eps_for(self, entry: AttackEntry) -> tuple[float, ...]:
        return entry.eps or self.grid(entry.norm)

    def with_gate_eps(self, gate_eps: float) -> AuditSpec:
        """The spec with ``gate_eps`` added to the grid of ``gate_norm`` (so the gate's robust
        accuracy is measured, not interpolated)."""
        grid = self.grid(self.gate_norm)
        if gate_eps <= 0 or gate_eps in grid:
            return self
        key = "eps_linf" if self.gate_norm == "linf" else "eps_l2"
        return replace_spec(self, **{key: tuple(sorted({*grid, float(gate_eps)}))})

    def select(self, ids: Sequence[str]) -> AuditSpec:
        """Only the attacks with these ids (``--attacks``)."""
        known = [e.id for e in self.entries]
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(f"--attacks: unknown attack id {', '.join(map(repr, unknown))}; this audit has: {', '.join(known)}")
        keep = tuple(a for a, e in zip(self.attacks, self.entries) if e.id in ids)
        return replace_spec(self, attacks=keep)


def replace_spec(spec: AuditSpec, **changes: Any) -> AuditSpec:
    table = to_mapping(spec)
    table.update(changes)
    return from_mapping(AuditSpec, table, "audit")


def audit_spec(cfg: Any, **overrides: Any) -> AuditSpec:
    """The pipeline's ``[audit]`` section (defaults where absent), with command-line overrides."""
    table = dict(cfg.extra.get("audit", {}))
    table.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(AuditSpec, table, "audit")


# --- what the audit attacks and what it scores with ------------------------------------------------

class Scorer(Protocol):
    """The serving path: ``DefendedClassifier`` in process or ``RemoteClassifier`` over gRPC."""

    random: bool

    def predict(self, x: torch.Tensor, seed: int | None = None) -> Any: ...


@dataclass
class Setup:
    scorer: Scorer
    model: Callable[[torch.Tensor], torch.Tensor]  # white-box attack model (counts gradients)
    surrogate: Callable[[torch.Tensor], torch.Tensor] | None = None  # transfer attacks craft on it
    mode: dict[str, Any] = field(default_factory=dict)  # how the models were built, for the report
    twin: Callable[[torch.Tensor], torch.Tensor] | None = None  # the pipeline's differentiable classifier
    defenses: Sequence[Any] = ()  # the pipeline's defense steps (whatever the mode)


def _counted(model: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return model if hasattr(model, "gradients") and hasattr(model, "reset") else _Resettable(model)


class _Resettable(Counted):
    def reset(self, seed: int | None = None) -> None:  # type: ignore[override]
        self.forwards = self.gradients = 0


def build_setup(cfg: Any, spec: AuditSpec, probe: torch.Tensor, *, scorer: Scorer | None = None) -> Setup:
    """The attack models for ``spec.adaptive`` over the pipeline ``cfg``; ``scorer`` defaults to
    the in-process serving path. ``probe``: clean images to measure randomness on."""
    from advshield.plugin.pipeline import DefendedClassifier

    defended = DefendedClassifier.from_config(cfg)
    scorer = scorer if scorer is not None else defended
    twin = twin_of(defended)
    declared = bool(defended.random)
    measured = bool(defended.defenses) and is_random(lambda x, g: defended.defend(x, g), probe)
    random = declared or measured
    adaptive = spec.adaptive
    if adaptive == "off":
        eot = 1
        model = AttackModel(twin, [], seed=spec.seed)
    else:
        eot = (spec.eot_samples or DEFAULT_EOT_SAMPLES) if (random or adaptive == "on") else 1
        model = AttackModel(twin, defended.defenses, eot_samples=eot, seed=spec.seed)
    aware = adaptive != "off" and spec.detector_aware and defended.detector is not None
    if aware:
        det = defended.detector

        def score(x: torch.Tensor) -> torch.Tensor:
            return det.logits_and_score(model.defend(x), twin, bpda=True)[1]

        model.detector = score
        model.threshold = float(det.threshold)
        model.detector_weight = spec.detector_weight
    surrogate = None
    if cfg.surrogate_path is not None and any(e.transfer for e in spec.entries) and spec.transfer:
        from advshield.attacks.transfer import load_surrogates, surrogate_model

        members = load_surrogates([cfg.surrogate_path], device=cfg.model.device, tolerance=cfg.model.parity_tolerance)
        surrogate = surrogate_model(members, model.defenses, eot_samples=model.eot_samples, seed=spec.seed)
    mode = {
        "adaptive": adaptive,
        "defenses": [repr(d) for d in defended.defenses],
        "bpda": [d.name for d in model.defenses if not d.differentiable],
        "random_declared": declared,
        "random_measured": measured,
        "eot_samples": model.eot_samples,
        "detector": repr(defended.detector) if defended.detector is not None else None,
        "detector_aware": aware,
        "detector_threshold": float(defended.detector.threshold) if defended.detector is not None else None,
        "detector_fpr_target": float(defended.detector.config.fpr) if defended.detector is not None else None,
        "surrogate": cfg.surrogate_path.name if surrogate is not None else None,
        "scorer": repr(scorer) if scorer is not defended else "in process (DefendedClassifier)",
    }
    return Setup(scorer, model, surrogate, mode, twin, list(defended.defenses))


# --- records on disk -------------------------------------------------------------------------------

def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from the parts (same parts, same seed, in every process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - 1)


def _eps_key(eps: float | None) -> float | None:
    return None if eps is None else round(float(eps), 10)


UnitKey = tuple[str, float | None, int]  # (attack id, eps, batch)


def read_records(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], set[UnitKey]]:
    """(header, committed records, committed units) of a records file; records of a batch whose
    commit line is missing (an interrupted write) are dropped."""
    header: dict[str, Any] | None = None
    pending: dict[UnitKey, list[dict[str, Any]]] = {}
    records: list[dict[str, Any]] = []
    done: set[UnitKey] = set()
    if not path.is_file():
        return None, [], set()
    with path.open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line
            if "header" in row:
                header = row["header"]
            elif "commit" in row:
                a, e, b = row["commit"]
                key = (a, _eps_key(e), int(b))
                records += pending.pop(key, [])
                done.add(key)
            else:
                key = (row["attack"], _eps_key(row["eps"]), int(row["batch"]))
                pending.setdefault(key, []).append(row)
    return header, records, done


class RecordLog:
    """Append-only JSONL: a header line, then per batch its records and a commit line, each batch
    written and flushed (and fsynced) as soon as it is scored."""

    def __init__(self, path: Path, header: dict[str, Any], *, fresh: bool) -> None:
        self.path = path
        old, records, done = (None, [], set()) if fresh else read_records(path)
        if old is not None and old.get("fingerprint") != header["fingerprint"]:
            raise ConfigError(
                f"{path} holds records of a different audit (settings, pipeline files or target changed: "
                f"{', '.join(_diff(old.get('settings', {}), header['settings'])) or 'fingerprint'}); "
                f"use --fresh to start over or --out to write elsewhere")
        if old is not None:
            _check_entries(old.get("attacks", {}), header["attacks"], path)
            header = {**header, "attacks": {**old.get("attacks", {}), **header["attacks"]}}
        self.records = records
        self.done = done
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:  # the committed part, rewritten without a torn tail
            f.write(json.dumps({"header": header}) + "\n")
            for key, rows in _group(records):
                f.writelines(json.dumps(r) + "\n" for r in rows)
                f.write(json.dumps({"commit": list(key)}) + "\n")
        os.replace(tmp, path)
        self._f = path.open("a")

    def commit(self, key: UnitKey, rows: list[dict[str, Any]]) -> None:
        self._f.write("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"commit": list(key)}) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records += rows
        self.done.add(key)

    def close(self) -> None:
        self._f.close()


def _group(records: list[dict[str, Any]]) -> Iterator[tuple[UnitKey, list[dict[str, Any]]]]:
    units: dict[UnitKey, list[dict[str, Any]]] = {}
    for r in records:
        units.setdefault((r["attack"], _eps_key(r["eps"]), int(r["batch"])), []).append(r)
    yield from units.items()


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_entries(old: Mapping[str, Any], new: Mapping[str, Any], path: Path) -> None:
    changed = [k for k in new if k in old and old[k] != new[k]]
    if changed:
        raise ConfigError(f"{path}: attack {', '.join(map(repr, changed))} was run with other hyper-parameters; "
                          f"use --fresh, --out elsewhere, or give the changed attack a new id")


# --- the runner ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One attack at one eps over the samples still robust in one batch."""

    attack: str  # id
    name: str  # registered attack
    hyper: Mapping[str, Any]
    kind: str
    norm: str
    source: str  # white-box, transfer, sanity
    eps: float | None
    batch: int

    @property
    def key(self) -> UnitKey:
        return (self.attack, _eps_key(self.eps), self.batch)


class Auditor:
    """Runs the phases over ``images`` (float32 NCHW) / ``labels`` and writes ``out/records.jsonl``."""

    def __init__(self, setup: Setup, spec: AuditSpec, images: np.ndarray, labels: np.ndarray, out: Path, *,
                 fresh: bool = False, progress: bool = True, header: Mapping[str, Any] | None = None,
                 on_commit: Callable[[UnitKey], None] | None = None) -> None:
        if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
            raise InputError(f"audit: need images [N, C, H, W] and labels [N], got {list(images.shape)} and {list(labels.shape)}")
        self.setup, self.spec, self.out = setup, spec, Path(out)
        self.images = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        self.labels = torch.from_numpy(np.asarray(labels, np.int64))
        self.n = len(images)
        self.progress = progress
        self.on_commit = on_commit
        self.model = _counted(setup.model)
        self.surrogate = _counted(setup.surrogate) if setup.surrogate is not None else None
        table = to_mapping(spec)
        settings = {k: table[k] for k in RECORD_SETTINGS}
        settings.update({f"mode.{k}": v for k, v in setup.mode.items()})
        settings.update(dict(header or {}))
        full = {"format": FORMAT, "settings": settings,
                "fingerprint": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(),
                "attacks": {e.id: e.describe() for e in spec.entries}}
        if fresh and (self.out / EXAMPLES).is_dir():
            shutil.rmtree(self.out / EXAMPLES)  # the stored examples of the discarded records
        self.log = RecordLog(self.out / RECORDS, full, fresh=fresh)
        self.broken = {"l2": np.full(self.n, np.inf), "linf": np.full(self.n, np.inf)}
        self.correct = np.zeros(self.n, dtype=bool)
        self.clean: dict[int, dict[str, Any]] = {}
        for r in self.log.records:
            self._absorb(r)

    # --- bookkeeping
    def _pos(self, sample: int) -> int:
        return sample - self.spec.start

    def _absorb(self, r: dict[str, Any]) -> None:
        p = self._pos(r["sample"])
        if r["attack"] == "clean":
            self.clean[p] = r
            self.correct[p] = r["correct"]
        elif r["success"]:
            self.broken["l2"][p] = min(self.broken["l2"][p], r["l2"])
            self.broken["linf"][p] = min(self.broken["linf"][p], r["linf"])

    def batches(self) -> list[np.ndarray]:
        b = self.spec.batch_size
        return [np.arange(i, min(i + b, self.n)) for i in range(0, self.n, b)]

    def units(self) -> list[Unit]:
        """Every unit of phases 2 to 5, in order (phase 1, clean, comes first and is separate)."""
        spec, nb = self.spec, len(self.batches())
        out: list[Unit] = []

        def add(e: AttackEntry, eps: float | None, source: str) -> None:
            out.extend(Unit(e.id, e.name, e.hyper, e.kind, e.norm, source, eps, b) for b in range(nb))

        white = [e for e in spec.entries if not e.transfer]
        transfer = [e for e in spec.entries if e.transfer] if spec.transfer and self.surrogate is not None else []
        for group in (white, transfer):
            for e in group:
                if e.kind == "minimal":
                    add(e, None, e.source)
            for norm in ("l2", "linf"):
                budget = [e for e in group if e.kind == "budget" and e.norm == norm]
                for eps in sorted({x for e in budget for x in spec.eps_for(e)}):
                    for e in budget:
                        if eps in spec.eps_for(e):
                            add(e, eps, e.source)
        if spec.sanity_eps > 0 and spec.sanity_samples > 0:
            out.append(Unit("sanity_pgd_linf", "pgd_linf", MappingProxyType({}), "budget", "linf", "sanity",
                            spec.sanity_eps, 0))
        return out

    def targets(self, unit: Unit) -> np.ndarray:
        """Positions the unit attacks: its batch's correct samples (minimal attacks), those still
        robust at eps (budget attacks), the first ``sanity_samples`` correct ones (sanity)."""
        if unit.source == "sanity":
            return np.flatnonzero(self.correct)[: self.spec.sanity_samples]
        pos = self.batches()[unit.batch]
        keep = self.correct[pos]
        if unit.kind == "budget" and unit.eps is not None:
            keep &= self.broken[unit.norm][pos] > unit.eps + DIST_TOL
        return pos[keep]

    # --- running
    def run(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        units = self.units()
        batches = self.batches()
        todo_clean = [b for b in range(len(batches)) if ("clean", None, b) not in self.log.done]
        todo = [u for u in units if u.key not in self.log.done]
        with tqdm(total=len(todo_clean) + len(todo), desc="audit", unit="batch", disable=not self.progress) as bar:
            for b in todo_clean:
                bar.set_postfix_str(f"clean batch {b}")
                self._clean(b, batches[b])
                bar.update()
            for u in todo:
                pos = self.targets(u)
                eps = "" if u.eps is None else f" eps={u.eps:g}"
                bar.set_postfix_str(f"{u.attack}{eps} batch {u.batch}: {len(pos)} samples")
                self._attack(u, pos)
                bar.update()
        self.log.close()
        return self.log.records

    def _commit(self, key: UnitKey, rows: list[dict[str, Any]]) -> None:
        self.log.commit(key, rows)
        for r in rows:
            self._absorb(r)
        if self.on_commit is not None:
            self.on_commit(key)

    def _clean(self, b: int, pos: np.ndarray) -> None:
        x, y = self.images[pos], self.labels[pos]
        seed = derive_seed(self.spec.seed, "clean", b)
        t0 = time.perf_counter()
        pred = self.setup.scorer.predict(x, seed=seed)
        dt = (time.perf_counter() - t0) / len(pos)
        rows = []
        for i, p in enumerate(pos):
            served = int(pred.labels[i])
            rows.append(self._row("clean", "clean", "clean", "clean", None, None, b, p, served,
                                  adv_pred=None, flagged=_at(pred.flagged, i), score=_at(pred.score, i),
                                  valid=True, reason="valid", success=False, d2=0.0, dinf=0.0, grads=0.0,
                                  seconds=dt, seed=pred.seed, correct=served == int(y[i])))
        self._commit(("clean", None, b), rows)

    def _attack(self, u: Unit, pos: np.ndarray) -> None:
        if len(pos) == 0:
            self._commit(u.key, [])
            return
        model = self.surrogate if u.source == "transfer" else self.model
        assert model is not None
        x, y = self.images[pos], self.labels[pos]
        spec = get_attack(u.name)
        seed = derive_seed(self.spec.seed, u.attack, u.eps, u.batch)
        hyper = dict(u.hyper)
        if u.kind == "budget":
            hyper["eps"] = u.eps
        if "seed" in spec.hyper_names and "seed" not in hyper:
            hyper["seed"] = seed
        model.reset(seed=seed)
        t0 = time.perf_counter()
        adv = run_attack(u.name, model, x, y, **hyper)
        seconds = (time.perf_counter() - t0) / len(pos)
        grads = model.gradients / len(pos)
        checked = check_adversarial(x, adv, ThreatModel(u.norm, u.eps if u.kind == "budget" else None, self.spec.levels))
        score_seed = derive_seed(self.spec.seed, "score", u.attack, u.eps, u.batch)
        pred = self.setup.scorer.predict(checked.adversarial, seed=score_seed)
        # the served label, except where the detector rejected the image (label -1 and flagged):
        # there the classifier's own label, so a flagged-but-fooled example is still visible (the
        # detector's true positives); a -1 without a flag (a smoothed pipeline's ABSTAIN) stays -1
        served = np.asarray(pred.labels, np.int64)
        rejected = (served == -1) & (np.asarray(pred.flagged, bool) if pred.flagged is not None else False)
        argmax = np.where(rejected, np.asarray(pred.probs).argmax(1), served)
        flagged = pred.flagged if (self.spec.flagged_is_failure and pred.flagged is not None) else None
        success = judge(checked, argmax, y, flagged=flagged)
        rows = []
        for i, p in enumerate(pos):
            rows.append(self._row(u.attack, u.name, u.source, u.kind, u.norm, u.eps, u.batch, p,
                                  int(self.clean[p]["clean_pred"]), adv_pred=int(argmax[i]),
                                  flagged=_at(pred.flagged, i), score=_at(pred.score, i),
                                  valid=bool(checked.valid[i]), reason=REASONS[int(checked.reason[i])],
                                  success=bool(success[i]), d2=float(checked.l2[i]), dinf=float(checked.linf[i]),
                                  grads=grads, seconds=seconds, seed=pred.seed, correct=True))
        if u.kind == "minimal" or u.source == "sanity":
            self._save_examples(u, pos, checked.adversarial)
        self._commit(u.key, rows)

    def _save_examples(self, u: Unit, pos: np.ndarray, adv: torch.Tensor) -> None:
        folder = self.out / EXAMPLES / u.attack
        folder.mkdir(parents=True, exist_ok=True)
        levels = self.spec.levels or 256
        images = np.round(adv.detach().cpu().numpy() * (levels - 1)).astype(np.uint8 if levels <= 256 else np.uint16)
        np.savez(folder / f"b{u.batch:05d}.npz", samples=pos + self.spec.start, images=images, levels=levels)

    def _row(self, attack: str, name: str, source: str, kind: str, norm: str | None, eps: float | None, batch: int,
             p: int, clean_pred: int, *, adv_pred: int | None, flagged: Any, score: Any, valid: bool, reason: str,
             success: bool, d2: float, dinf: float, grads: float, seconds: float, seed: Any, correct: bool) -> dict[str, Any]:
        return {
            "sample": int(p + self.spec.start), "attack": attack, "name": name, "source": source, "kind": kind,
            "norm": norm, "eps": eps, "batch": batch, "label": int(self.labels[p]), "clean_pred": clean_pred,
            "correct": bool(correct), "adv_pred": adv_pred, "flagged": flagged, "score": score, "valid": valid,
            "reason": reason, "success": success, "l2": d2, "linf": dinf, "gradients": grads,
            "seconds": round(seconds, 6), "seed": None if seed is None else int(seed),
        }


def _at(a: Any, i: int) -> Any:
    if a is None:
        return None
    v = np.asarray(a)[i]
    return bool(v) if v.dtype == bool else float(v)


def load_examples(out: Path, attack: str) -> dict[int, np.ndarray]:
    """The stored (rounded) adversarial images of a minimal or sanity attack: sample -> float32 CHW."""
    found: dict[int, np.ndarray] = {}
    for f in sorted((Path(out) / EXAMPLES / attack).glob("b*.npz")):
        with np.load(f, allow_pickle=False) as z:
            levels = int(z["levels"])
            for s, img in zip(z["samples"], z["images"]):
                found[int(s)] = img.astype(np.float32) / (levels - 1)
    return found


# --- probes for the masking checks -----------------------------------------------------------------

def gradient_probe(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                   seed: int = 0) -> dict[str, Any]:
    """Per-sample L2 norms of the input gradient of the margin and of the cross-entropy loss
    (through the attack model: BPDA, EOT, detector logit as the attacks see them)."""
    if hasattr(model, "reset"):
        model.reset(seed=seed)
    _, g_margin, z = value_and_grad(model, x, y, False, "margin")
    _, g_ce, _ = value_and_grad(model, x, y, False, "ce")
    n_margin, n_ce = l2(g_margin), l2(g_ce)
    return {
        "samples": len(x),
        "margin_grad_norm": [float(v) for v in n_margin],
        "ce_grad_norm": [float(v) for v in n_ce],
        "margin": [float(v) for v in margin(z, y, False)],
    }


def randomness_probe(scorer: Scorer, x: torch.Tensor) -> dict[str, Any]:
    """Two passes of the serving path with different seeds: do the probabilities differ?"""
    a = np.asarray(scorer.predict(x, seed=1).probs)
    b = np.asarray(scorer.predict(x, seed=2).probs)
    diff = float(np.abs(a - b).max())
    return {"declared": bool(getattr(scorer, "random", False)), "max_prob_diff": diff, "random": diff > 1e-6}


def run_probes(setup: Setup, images: np.ndarray, labels: np.ndarray, correct: np.ndarray, seed: int,
               n: int = 64) -> dict[str, Any]:
    pos = np.flatnonzero(correct)[:n]
    probes: dict[str, Any] = {"mode": setup.mode}
    x = torch.from_numpy(np.ascontiguousarray(images[: max(n, 1)], np.float32))
    probes["randomness"] = randomness_probe(setup.scorer, x)
    if len(pos):
        xs = torch.from_numpy(np.ascontiguousarray(images[pos], np.float32))
        ys = torch.from_numpy(np.asarray(labels[pos], np.int64))
        probes["gradients"] = gradient_probe(setup.model, xs, ys, seed)
    return probes


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# --- the certified-radius sanity check -------------------------------------------------------------

def certificate_check(
    base_for_sigma: Callable[[float], Callable[[torch.Tensor], torch.Tensor]],
    num_classes: int,
    cert_records: Sequence[Mapping[str, Any]],
    cert_spec: Any,
    out: Path,
    records: Sequence[Mapping[str, Any]],
    images: Mapping[int, np.ndarray],
    *,
    attack_model_for_sigma: Callable[[float], Any] | None = None,
    checks: int = 20,
    steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Look, on the smoothed classifier g, for adversarial examples inside certified radii.

    For up to ``checks`` audited samples per sigma certified correctly with radius R > 0: (a) each
    stored minimal-attack example of that sample with L2 distortion < R, and (b) when
    ``attack_model_for_sigma`` is given, PGD-L2 at eps = R against the EOT-smoothed pipeline (the
    base behind Gaussian noise of that sigma, gradients averaged over draws), clipped, checked and
    rounded like every audit example, are classified by g (PREDICT with ``cert_spec``'s n and
    alpha). g answering a class other than the label (not ABSTAIN) inside R violates the
    certificate. ``images``: clean image (float32 CHW) per sample index."""
    from tqdm.auto import tqdm

    from advshield.plugin.smoothing import ABSTAIN, SmoothedClassifier

    minimal = sorted({r["attack"] for r in records if r["kind"] == "minimal"})
    examples = {a: load_examples(out, a) for a in minimal}
    found = {(r["attack"], r["sample"]): r for r in records if r["kind"] == "minimal" and r["success"]}
    violations: list[dict[str, Any]] = []
    checked = 0
    for sigma in cert_spec.sigmas:
        rows = [r for r in cert_records if math.isclose(r["sigma"], sigma) and r["correct"] and r["radius"] > 0
                and r["index"] in images][:checks]
        if not rows:
            continue
        smoothed = SmoothedClassifier(base_for_sigma(sigma), num_classes, cert_spec.smoothing(sigma))
        model = attack_model_for_sigma(sigma) if attack_model_for_sigma is not None else None
        for r in tqdm(rows, desc=f"certificate check sigma={sigma:g}", disable=not progress, unit="img"):
            radius, label, sample = float(r["radius"]), int(r["label"]), int(r["index"])
            candidates: list[tuple[str, np.ndarray]] = []
            for a in minimal:
                rec = found.get((a, sample))
                if rec is not None and rec["l2"] < radius and sample in examples[a]:
                    candidates.append((a, examples[a][sample]))
            if model is not None:
                x = torch.from_numpy(np.ascontiguousarray(images[sample][None], np.float32))
                y = torch.tensor([label])
                model.reset(seed=derive_seed(seed, "certificate", sigma, sample))
                adv = run_attack("pgd_l2", model, x, y, eps=radius, steps=steps, seed=derive_seed(seed, sigma, sample))
                ok = check_adversarial(x, adv, ThreatModel("l2", radius))
                if bool(ok.valid[0]):
                    candidates.append(("pgd_l2 on the smoothed pipeline", ok.adversarial[0].numpy()))
            for name, adv_img in candidates:
                checked += 1
                pred = smoothed.predict(torch.from_numpy(np.ascontiguousarray(adv_img, np.float32)), index=sample)
                if pred not in (label, ABSTAIN):
                    violations.append({"sigma": sigma, "sample": sample, "label": label, "radius": radius,
                                       "attack": name, "smoothed_prediction": int(pred)})
    return {"checked": checked, "violations": violations}
