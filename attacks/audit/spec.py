"""The pipeline file's ``[audit]`` section: which attacks run, on which eps grids, in which mode."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from advshield.attacks.masking import BPDA_TOLERANCE, CONVERGENCE_TOLERANCE
from advshield.attacks.registry import AttackSpec, get_attack
from advshield.core.errors import ConfigError
from advshield.core.validation import check, from_mapping, to_mapping

# the [audit] keys the records depend on (the others only change the report): resuming with
# other values is refused
RECORD_SETTINGS = ("eps_linf", "eps_l2", "samples", "start", "batch_size", "seed", "adaptive", "eot_samples",
                   "detector_aware", "detector_weight", "flagged_is_failure", "transfer", "levels", "sanity_eps",
                   "sanity_samples", "draws", "protocol", "black_box")

_ATTACK_KEYS = ("name", "id", "transfer", "eps")
# the default cascade: minimal attacks for the per-sample distortion, then AutoAttack's gradient
# pair per norm (APGD-CE, then APGD-T with the targeted DLR loss on what it left), the one-step
# attack, a transfer attack from the surrogate, and the black-box stage: Square (score-based) on
# what every gradient attack left robust, HopSkipJump (decision-based) for each sample's distortion
DEFAULT_ATTACKS: tuple[Mapping[str, Any], ...] = tuple(MappingProxyType(a) for a in (
    {"name": "ddn"},
    {"name": "bp"},
    {"name": "apgd_ce_linf"},
    {"name": "apgd_t_linf"},
    {"name": "detector_sweep_linf"},  # with a detector only: classifier + detector loss, lambda sweep
    {"name": "opgd_linf"},  # with a detector only: orthogonal PGD (Bryniarski et al. 2022)
    {"name": "apgd_ce_l2"},
    {"name": "apgd_t_l2"},
    {"name": "detector_sweep_l2"},
    {"name": "opgd_l2"},
    {"name": "fgsm"},
    {"name": "pgd_linf", "transfer": True},
    {"name": "square_linf"},
    {"name": "hsj_l2"},
))
# attacks that only make sense against a detector: the runner skips them when the attack model has none
DETECTOR_ATTACKS = ("detector_sweep_linf", "detector_sweep_l2", "opgd_linf", "opgd_l2")
# L-inf budgets on the 8-bit lattice: an example is rounded to 8 bits before it is judged, so an
# eps between two grey levels is really the lower one; the defaults are k/255
DEFAULT_EPS_LINF = tuple(k / 255 for k in (2, 4, 8, 13, 26, 38, 51))


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
    def black_box(self) -> bool:
        return self.spec.black_box

    @property
    def source(self) -> str:
        return "transfer" if self.transfer else "black-box" if self.black_box else "white-box"

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
    if transfer and spec.black_box:
        raise ConfigError(f"{where}.transfer: {name!r} is a black-box attack (it queries the serving path); "
                          f"it has no surrogate to craft on, remove transfer")
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
    eps_linf: tuple[float, ...] = DEFAULT_EPS_LINF  # 2/255 ... 51/255 (0.0078 ... 0.2)
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
    # cascade: each budget attack on the samples still robust (the audit's worst case, cheapest);
    # independent: the thesis's protocol (ch. 3, Table 5.2): every attack on every correct sample at
    # every eps of its grid, each with its own P_suc, conditional distortion and P_upp, judged with
    # and without 8-bit rounding
    protocol: Literal["cascade", "independent"] = "cascade"
    draws: int = 11  # random pipelines: fresh serving draws per image, scored by majority (odd: no ties)
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
    # the masking probes (attacks/audit/probes.py), run after the cascade on a seeded subsample of
    # the correct samples; they leave the records alone (not in RECORD_SETTINGS)
    probe_samples: int = 32  # correct samples the attack and BPDA probes run on (0: no such probes)
    probe_eps: float = 0.0  # budget (norm gate_norm) of the attack probes; 0: gate_eps, else mid-grid
    # the iterative white-box attack the probes run, a name or a table as in ``attacks`` (budget, of
    # norm gate_norm, not transfer); "": the audit's first such attack with steps, else apgd_ce_<norm>
    probe_attack: Any = ""
    probe_restarts: int = 5  # random restarts of the restart probe (twice the attack's own when not more)
    # 0.02: success rising by more than this with twice the steps: the attack has not converged
    convergence_tolerance: float = CONVERGENCE_TOLERANCE
    # 0.5: mean ||defense(x) - approximation(x)||_2 / ||x||_2 above this: BPDA follows another function
    bpda_tolerance: float = BPDA_TOLERANCE
    probe_entry: AttackEntry | None = field(init=False, repr=False, compare=False, default=None)
    # the black-box stage (Square, HopSkipJump: attacks that only query the serving path), after
    # the white-box and transfer attacks; through --target they query the live endpoint
    black_box: bool = True
    query_rate: float = 0.0  # through --target: at most this many images per second (0: no limit)
    query_concurrency: int = 1  # through --target: requests in flight at once
    query_retries: int = 3  # through --target: retries of a request answered UNAVAILABLE (backing off)

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
        check(self.draws >= 1, f"audit.draws: must be >= 1 (serving draws that score each image of a random "
                               f"pipeline, by majority; odd avoids ties), got {self.draws}")
        check(self.detector_weight > 0, f"audit.detector_weight: must be > 0, got {self.detector_weight}")
        check(self.levels == 0 or self.levels >= 2, f"audit.levels: must be 0 or >= 2, got {self.levels}")
        check(self.d_upp > 0, f"audit.d_upp: must be > 0, got {self.d_upp}")
        check(all(0 < q < 1 for q in self.quantiles), f"audit.quantiles: must lie in (0, 1), got {list(self.quantiles)}")
        check(0 <= self.sanity_eps <= 1, f"audit.sanity_eps: must be within [0, 1], got {self.sanity_eps}")
        check(self.sanity_samples >= 0, f"audit.sanity_samples: must be >= 0, got {self.sanity_samples}")
        check(0 <= self.masking_tolerance < 1, f"audit.masking_tolerance: must be within [0, 1), got {self.masking_tolerance}")
        check(self.certify_checks >= 0, f"audit.certify_checks: must be >= 0, got {self.certify_checks}")
        check(self.probe_samples >= 0, f"audit.probe_samples: must be >= 0 (0: no attack probes), got {self.probe_samples}")
        check(self.probe_eps >= 0, f"audit.probe_eps: must be >= 0 (0: the gate's eps), got {self.probe_eps}")
        check(self.gate_norm != "linf" or self.probe_eps <= 1,
              f"audit.probe_eps: an L-inf eps is at most 1 (pixels in [0, 1]), got {self.probe_eps}")
        check(self.probe_restarts >= 2, f"audit.probe_restarts: must be >= 2, got {self.probe_restarts}")
        check(0 <= self.convergence_tolerance < 1,
              f"audit.convergence_tolerance: must be within [0, 1), got {self.convergence_tolerance}")
        check(self.bpda_tolerance > 0, f"audit.bpda_tolerance: must be > 0, got {self.bpda_tolerance}")
        check(self.query_rate >= 0, f"audit.query_rate: must be >= 0 images per second (0: no limit), got {self.query_rate}")
        check(self.query_concurrency >= 1, f"audit.query_concurrency: must be >= 1, got {self.query_concurrency}")
        check(self.query_retries >= 0, f"audit.query_retries: must be >= 0, got {self.query_retries}")
        object.__setattr__(self, "probe_entry", self._probe_entry())

    def _probe_entry(self) -> AttackEntry | None:
        if isinstance(self.probe_attack, str) and not self.probe_attack:
            return None
        e = parse_attack(self.probe_attack, "audit.probe_attack")
        where = f"audit.probe_attack: {e.name!r}"
        check(not e.transfer and not e.black_box, f"{where} must be a white-box attack (transfer = false, not black-box)")
        check(e.kind == "budget", f"{where} is a minimal attack; the probes need a budget attack with steps")
        check(e.norm == self.gate_norm, f"{where} is an {e.norm} attack; the probes run in gate_norm = {self.gate_norm!r}")
        check("steps" in e.spec.hyper_names, f"{where} has no steps: the probes need an iterative attack")
        check(not e.eps, f"{where}: remove eps, the probes run at probe_eps (or the gate's eps)")
        return e

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
