"""Shards of an audit: the cut, the records a shard resumes from, and the merge of shard folders.

A shard is a contiguous range of the audit's batches. Every unit of the audit belongs to one batch
(the sanity unit excepted: it attacks the first correct samples of the whole range, so it runs
where the shards are merged), and a unit's seed, its samples and, for a random pipeline, the clean
batch its images are scored in are those of the single-process run (``Auditor(only=...)``): cut at
the batch boundaries of one process, shards write exactly the records one process writes, in
another order. ``canonical`` puts merged records back in one process's order, so the metrics and
the report are computed over the same list.

A shard folder is an audit folder (``records.jsonl`` with the audit's header, ``examples/``) plus
``shard.json`` (index, count, batches, samples). ``merge_shards`` joins folders from any scheduler
(``advshield audit PIPELINE --shard I/N`` under a Kubernetes Indexed Job, Slurm, Ray): it refuses
folders whose headers differ (pipeline files, settings, data, target: the message names the
differing keys and the folders) and folders that share samples, and writes one records file that
``advshield audit PIPELINE --out MERGED`` resumes (running only what no shard ran, then the
probes and the report).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advshield.attacks.audit.records import EXAMPLES, RECORDS, UnitKey, eps_key, read_records, write_json
from advshield.attacks.audit.runner import Auditor
from advshield.core.errors import ConfigError

SHARD = "shard.json"


def plan_shards(batches: int, shards: int) -> list[range]:
    """``shards`` contiguous, nearly equal ranges of ``batches`` batch numbers (fewer when there
    are fewer batches than shards)."""
    if shards < 1:
        raise ConfigError(f"shards: must be >= 1, got {shards}")
    return [range(int(c[0]), int(c[-1]) + 1) for c in np.array_split(np.arange(batches), min(shards, batches))
            if len(c)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0 <= I < N) -> (I, N), as ``--shard`` takes it."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise ConfigError(f"--shard: expected INDEX/COUNT such as 0/4, got {text!r}")
    i, n = int(index), int(count)
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard: need 0 <= INDEX < COUNT, got {text!r}")
    return i, n


def key_of(row: Mapping[str, Any]) -> UnitKey:
    return (row["attack"], eps_key(row["eps"]), int(row["batch"]))


def shard_keys(auditor: Auditor, only: range) -> list[UnitKey]:
    """The units a shard over batches ``only`` commits: its clean batches, then its units."""
    return [("clean", None, b) for b in only] + [u.key for u in auditor.units() if u.batch in only and u.source != "sanity"]


def unit_order(auditor: Auditor) -> dict[UnitKey, int]:
    """The position of every unit in one process's run: the clean batches, then ``units()``."""
    keys = [("clean", None, b) for b in range(len(auditor.batches()))] + [u.key for u in auditor.units()]
    return {k: i for i, k in enumerate(keys)}


def canonical(records: Sequence[dict[str, Any]], order: Mapping[UnitKey, int]) -> list[dict[str, Any]]:
    """The records in one process's order (by unit, then sample); units it does not know last."""
    last = len(order)
    return sorted(records, key=lambda r: (order.get(key_of(r), last), str(key_of(r)), r["sample"]))


def write_prior(path: Path, done: Iterable[UnitKey], records: Iterable[dict[str, Any]]) -> None:
    """A records file without a header holding committed units (``done``) and their records: an
    ``Auditor`` opened on it resumes them and writes its own header (no fingerprint to check)."""
    rows: dict[UnitKey, list[dict[str, Any]]] = {k: [] for k in done}
    for r in records:
        if key_of(r) in rows:
            rows[key_of(r)].append(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for key, unit_rows in rows.items():
            f.writelines(json.dumps(r) + "\n" for r in unit_rows)
            f.write(json.dumps({"commit": list(key)}) + "\n")


def example_file(out: Path, key: UnitKey) -> Path:
    """Where the runner stores the examples of a minimal or sanity unit (``Auditor._save_examples``)."""
    return Path(out) / EXAMPLES / key[0] / f"b{key[2]:05d}.npz"


def shard_info(index: int, count: int, only: range, batch_size: int, start: int, n: int) -> dict[str, Any]:
    first, stop = only.start * batch_size, min(only.stop * batch_size, n)
    return {"index": index, "count": count, "batches": [only.start, only.stop],
            "samples": [start + first, start + stop]}


# --- merging shard folders ---------------------------------------------------------------------------

@dataclass
class MergeResult:
    out: Path
    folders: list[Path]
    units: int
    records: int
    batches: int  # batches of the audit
    missing: list[int] = field(default_factory=list)  # batches no folder had a clean record of

    def describe(self) -> str:
        text = (f"merged {len(self.folders)} shard folders: {self.units} units, {self.records} records, "
                f"into {self.out / RECORDS}")
        if self.missing:
            text += (f"\nmissing batches {_ranges(self.missing)} of {self.batches}: the finishing run audits them "
                     f"in its own process")
        return text


def _ranges(values: Sequence[int]) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, with both values (files: both sha256s)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        if isinstance(x, Mapping) and isinstance(y, Mapping) and k in ("pipeline.files", "data"):
            out += _differences(x, y, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}: {json.dumps(x, default=str)[:80]} vs {json.dumps(y, default=str)[:80]}")
    return out


def merge_shards(folders: Sequence[str | Path], out: str | Path) -> MergeResult:
    """Join shard folders into ``out/records.jsonl`` (and ``out/examples``). Refuses a folder
    without records, folders of different audits (header: pipeline files, settings, data, target,
    attacks) and folders that hold the same samples or units, naming them; ``out`` must not hold
    records yet."""
    dirs = [Path(f) for f in folders]
    out = Path(out)
    if not dirs:
        raise ConfigError("audit merge: give the shard folders to merge")
    if (out / RECORDS).exists():
        raise ConfigError(f"audit merge: {out / RECORDS} exists; merge into a new --out folder")
    if len({d.resolve() for d in dirs}) != len(dirs):
        raise ConfigError("audit merge: a folder is given twice")
    loaded = []
    for d in dirs:
        header, records, done = read_records(d / RECORDS)
        if header is None:
            raise ConfigError(f"audit merge: {d} holds no audit records ({d / RECORDS} missing or without a header)")
        loaded.append((d, header, records, done))
    d0, h0 = loaded[0][0], loaded[0][1]
    for d, h, _, _ in loaded[1:]:
        if h.get("settings") != h0.get("settings") or h.get("fingerprint") != h0.get("fingerprint"):
            diff = _differences(h0.get("settings", {}), h.get("settings", {})) or ["fingerprint"]
            raise ConfigError(f"audit merge: {d} and {d0} are shards of different audits: " + "; ".join(diff))
        changed = sorted(k for k in set(h["attacks"]) & set(h0["attacks"]) if h["attacks"][k] != h0["attacks"][k])
        if changed or set(h["attacks"]) != set(h0["attacks"]):
            names = changed or sorted(set(h["attacks"]) ^ set(h0["attacks"]))
            raise ConfigError(f"audit merge: {d} and {d0} ran different attacks: {', '.join(names)}")
    owner_sample: dict[int, Path] = {}
    owner_unit: dict[UnitKey, Path] = {}
    for d, _, records, done in loaded:
        clash = sorted({r["sample"] for r in records if r["sample"] in owner_sample})
        if clash:
            other = owner_sample[clash[0]]
            raise ConfigError(f"audit merge: {d} and {other} overlap: both hold samples {_ranges(clash)}")
        units = sorted((k for k in done if k in owner_unit), key=str)
        if units:
            raise ConfigError(f"audit merge: {d} and {owner_unit[units[0]]} overlap: both ran units "
                              f"{', '.join(f'{a} eps={e} batch {b}' for a, e, b in units[:5])}")
        owner_sample.update({r["sample"]: d for r in records})
        owner_unit.update({k: d for k in done})
    settings = h0.get("settings", {})
    lo, hi = settings.get("data", {}).get("range", [0, 0])
    batches = math.ceil((hi - lo) / int(settings.get("batch_size", 1))) if hi > lo else 0
    clean = {k[2] for k in owner_unit if k[0] == "clean"}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (RECORDS + ".tmp")
    n_records = 0
    with tmp.open("w") as f:
        f.write(json.dumps({"header": h0}) + "\n")
        for d, _, records, done in loaded:
            rows: dict[UnitKey, list[dict[str, Any]]] = {k: [] for k in sorted(done, key=str)}
            for r in records:
                rows[key_of(r)].append(r)
            for key, unit_rows in rows.items():
                src = example_file(d, key)
                if src.is_file():
                    dest = example_file(out, key)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)
                f.writelines(json.dumps(r) + "\n" for r in unit_rows)
                f.write(json.dumps({"commit": list(key)}) + "\n")
                n_records += len(unit_rows)
    tmp.replace(out / RECORDS)
    write_json(out / "merge.json", {"folders": [str(d) for d in dirs], "units": len(owner_unit),
                                    "records": n_records, "batches": batches})
    return MergeResult(out, dirs, len(owner_unit), n_records, batches, sorted(set(range(batches)) - clean))
