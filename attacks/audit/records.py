"""The audit's records on disk: an append-only JSONL write-ahead log (a header, then per batch its
records and a commit line), the stored adversarial examples, and the seeds units derive."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from advshield.core.errors import ConfigError

RECORDS = "records.jsonl"
EXAMPLES = "examples"
FORMAT = "advshield.audit/1"


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from the parts (same parts, same seed, in every process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**31 - 1)


def eps_key(eps: float | None) -> float | None:
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
                key = (a, eps_key(e), int(b))
                records += pending.pop(key, [])
                done.add(key)
            else:
                key = (row["attack"], eps_key(row["eps"]), int(row["batch"]))
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
            rows_of: dict[UnitKey, list[dict[str, Any]]] = {}
            for r in records:
                rows_of.setdefault((r["attack"], eps_key(r["eps"]), int(r["batch"])), []).append(r)
            for key in sorted(done - rows_of.keys(), key=str):  # committed units with no records (no
                rows_of[key] = []                               # sample left to attack) stay committed
            for key, rows in rows_of.items():
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


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _check_entries(old: Mapping[str, Any], new: Mapping[str, Any], path: Path) -> None:
    changed = [k for k in new if k in old and old[k] != new[k]]
    if changed:
        raise ConfigError(f"{path}: attack {', '.join(map(repr, changed))} was run with other hyper-parameters; "
                          f"use --fresh, --out elsewhere, or give the changed attack a new id")


def load_examples(out: Path, attack: str) -> dict[int, np.ndarray]:
    """The stored (rounded) adversarial images of a minimal or sanity attack: sample -> float32 CHW."""
    found: dict[int, np.ndarray] = {}
    for f in sorted((Path(out) / EXAMPLES / attack).glob("b*.npz")):
        with np.load(f, allow_pickle=False) as z:
            levels = int(z["levels"])
            for s, img in zip(z["samples"], z["images"]):
                found[int(s)] = img.astype(np.float32) / (levels - 1)
    return found


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
