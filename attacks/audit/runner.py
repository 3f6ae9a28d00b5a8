"""The audit runner: phases and units over fixed batches, the cascade over the samples still
robust, every example checked, rounded and re-scored, one record per (sample, attack, eps).

Scoring. A deterministic pipeline is scored by one serving call per batch, its served label
(the classifier's own label where the detector rejected the image). A random one is scored as an
attacker meets it: by ``draws`` fresh serving draws that the attacks never used (draw d of batch b
seeded ``derive_seed(audit seed, "score", b, d)``); a clean image is correct, an adversarial
example a success, when the majority of its draws say so, and the records keep the share of
draws the pipeline got right (``clean_share``, ``adv_share``: the expected accuracy over draws).
Each image is scored in its sample's place of its full clean batch (the other places hold their
clean images): the defenses draw per place, not per content, so a sample's clean image and every
adversarial example of it meet the same draws, and a difference between them is the attack's
doing, not the dice. Per draw, an example succeeds when it is valid, differs from the clean image
(distortion 0 is the clean image: never a success), is misclassified and, with
``flagged_is_failure``, not flagged. Accuracy counts the classifier's own label whatever the
detector's ``reject``: flagged clean images are the detector's false positives, not accuracy loss.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from advshield.attacks.audit.attack_models import Setup, counted
from advshield.attacks.audit.records import (
    EXAMPLES,
    FORMAT,
    RECORDS,
    RecordLog,
    UnitKey,
    derive_seed,
    eps_key,
)
from advshield.attacks.audit.spec import DETECTOR_ATTACKS, RECORD_SETTINGS, AttackEntry, AuditSpec
from advshield.attacks.oracle import Oracle
from advshield.attacks.registry import get_attack, run_attack
from advshield.attacks.threat import DIST_TOL, REASONS, Checked, ThreatModel, check_adversarial, judge
from advshield.core.errors import InputError
from advshield.core.progress import progress as progress_bar
from advshield.core.validation import to_mapping


@dataclass(frozen=True)
class Scored:
    """The serving path's verdict on a batch over its k draws (k = 1: deterministic)."""

    labels: np.ndarray  # int64 [k, N]: the classifier's own label (the served one, except where rejected)
    flagged: np.ndarray | None  # bool [k, N]; None without a detector
    score: np.ndarray | None  # float [k, N]
    seed: int | None  # the serving seed of the first call

    @property
    def k(self) -> int:
        return len(self.labels)

    def majority(self, hits: np.ndarray) -> np.ndarray:
        """Per sample: more than half of the k draws are hits."""
        return hits.sum(0) * 2 > self.k

    def label(self, i: int) -> int:
        """The most frequent label of sample i over the draws (the smallest on a tie)."""
        return int(np.bincount(self.labels[:, i] + 1).argmax() - 1)

    def flag(self, i: int) -> bool | None:
        return None if self.flagged is None else bool(self.majority(self.flagged[:, i : i + 1])[0])

    def mean_score(self, i: int) -> float | None:
        return None if self.score is None else float(self.score[:, i].mean(dtype=np.float64))


def own_labels(pred: Any) -> np.ndarray:
    """The served labels, except where the detector rejected the image (label -1 and flagged):
    there the classifier's own label, so accuracy does not depend on ``reject`` and a flagged but
    fooled example stays visible (the detector's true positives); a -1 without a flag (a smoothed
    pipeline's ABSTAIN) stays -1."""
    served = np.asarray(pred.labels, np.int64)
    rejected = (served == -1) & (np.asarray(pred.flagged, bool) if pred.flagged is not None else False)
    return np.where(rejected, np.asarray(pred.probs).argmax(1), served)


def is_random(setup: Setup) -> bool:
    """Whether the serving path is random: declared by the scorer or the pipeline, or measured."""
    return bool(getattr(setup.scorer, "random", False) or setup.mode.get("random_declared")
                or setup.mode.get("random_measured"))


@dataclass(frozen=True)
class Unit:
    """One attack at one eps over the samples still robust in one batch."""

    attack: str  # id
    name: str  # registered attack
    hyper: Mapping[str, Any]
    kind: str
    norm: str
    source: str  # white-box, transfer, black-box, sanity
    eps: float | None
    batch: int

    @property
    def key(self) -> UnitKey:
        return (self.attack, eps_key(self.eps), self.batch)


class Auditor:
    """Runs the phases over ``images`` (float32 NCHW) / ``labels`` and writes ``out/records.jsonl``."""

    def __init__(self, setup: Setup, spec: AuditSpec, images: np.ndarray, labels: np.ndarray, out: Path, *,
                 fresh: bool = False, progress: bool = True, header: Mapping[str, Any] | None = None,
                 on_commit: Callable[[UnitKey], None] | None = None, only: range | None = None) -> None:
        """``only``: the batches this auditor runs, a shard of the audit (``attacks/audit/shards.py``):
        their clean batches and units, with the batch numbers, seeds and places in the clean batch of
        the whole run, and no sanity unit (it needs every batch's clean records); None: everything."""
        if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
            raise InputError(f"audit: need images [N, C, H, W] and labels [N], got {list(images.shape)} and {list(labels.shape)}")
        self.setup, self.spec, self.out = setup, spec, Path(out)
        self.images = torch.from_numpy(np.ascontiguousarray(images, np.float32))
        self.labels = torch.from_numpy(np.asarray(labels, np.int64))
        self.n = len(images)
        self.progress = progress
        self.on_commit = on_commit
        self.only = only
        self.random = is_random(setup)
        self.draws = spec.draws if self.random else 1  # serving draws that score each image
        self.model = counted(setup.model)
        self.surrogate = counted(setup.surrogate) if setup.surrogate is not None else None
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

        # the detector attacks of the default cascade only run where there is a detector to evade
        # (without one they would repeat PGD); the report's mode says whether attacks were detector-aware
        aware = bool(self.setup.mode.get("detector_aware"))
        white = [e for e in spec.entries
                 if not e.transfer and not e.black_box and (aware or e.name not in DETECTOR_ATTACKS)
                 and self.setup.white_box]  # a served model without a twin: no gradient attacks
        transfer = [e for e in spec.entries if e.transfer] if spec.transfer and self.surrogate is not None else []
        # the black-box stage: after every attack that had gradients, on what they left robust
        black = [e for e in spec.entries if e.black_box] if spec.black_box else []
        for group in (white, transfer, black):
            for e in group:
                if e.kind == "minimal":
                    add(e, None, e.source)
            for norm in ("l2", "linf"):
                budget = [e for e in group if e.kind == "budget" and e.norm == norm]
                for eps in sorted({x for e in budget for x in spec.eps_for(e)}):
                    for e in budget:
                        if eps in spec.eps_for(e):
                            add(e, eps, e.source)
        if self.only is not None:
            return [u for u in out if u.batch in self.only]
        if spec.sanity_eps > 0 and spec.sanity_samples > 0 and self.setup.white_box:
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
        if unit.kind == "budget" and unit.eps is not None and self.spec.protocol == "cascade":
            keep &= self.broken[unit.norm][pos] > unit.eps + DIST_TOL
        return pos[keep]

    # --- running
    def run(self) -> list[dict[str, Any]]:
        units = self.units()
        batches = self.batches()
        todo_clean = [b for b in (self.only or range(len(batches))) if ("clean", None, b) not in self.log.done]
        todo = [u for u in units if u.key not in self.log.done]
        with progress_bar(total=len(todo_clean) + len(todo), desc="audit", unit="batch", enabled=self.progress) as bar:
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

    def merge(self, key: UnitKey, rows: list[dict[str, Any]]) -> bool:
        """Commit a unit run elsewhere (a shard's, ``attacks/audit/shards.py``) as if run here;
        False (and nothing written) when the unit is committed already."""
        if key in self.log.done:
            return False
        self._commit(key, rows)
        return True

    def _commit(self, key: UnitKey, rows: list[dict[str, Any]]) -> None:
        self.log.commit(key, rows)
        for r in rows:
            self._absorb(r)
        if self.on_commit is not None:
            self.on_commit(key)

    def judge_examples(self, pos: np.ndarray, checked: Checked, y: torch.Tensor, seed: int) -> tuple[Scored, np.ndarray]:
        """The serving path's verdict on checked examples of the samples at ``pos``: the scored
        draws and, per draw and sample, whether the example is a success there (valid, moved off
        the clean image, misclassified and, with ``flagged_is_failure``, not flagged)."""
        s = self._score(pos, checked.adversarial, seed)
        moved = (checked.linf > 0).cpu().numpy()  # distortion 0 is the clean image: never a success
        flags = s.flagged if self.spec.flagged_is_failure else None
        wins = np.stack([judge(checked, s.labels[d], y, flagged=None if flags is None else flags[d])
                         for d in range(s.k)]) & moved
        return s, wins

    def _score(self, pos: np.ndarray, x: torch.Tensor, seed: int) -> Scored:
        """The serving path's verdict on images ``x`` of the samples at ``pos``: one call seeded
        ``seed`` (deterministic), or ``draws`` calls per clean batch, each image in its sample's
        place of the full clean batch (random; see the module docstring)."""
        if not self.random:
            pred = self.setup.scorer.predict(x, seed=seed)
            return Scored(own_labels(pred)[None], _stack([pred.flagged], bool), _stack([pred.score], None), pred.seed)
        size, k = self.spec.batch_size, self.draws
        labels = np.zeros((k, len(pos)), np.int64)
        flagged: np.ndarray | None = None
        score: np.ndarray | None = None
        first: int | None = None
        for b in np.unique(pos // size):
            rows = np.flatnonzero(pos // size == b)
            at = pos[rows] % size  # the samples' places in their clean batch
            full = self.images[self.batches()[b]].clone()
            full[torch.from_numpy(at)] = x[torch.from_numpy(rows)].to(full)
            for d in range(k):
                pred = self.setup.scorer.predict(full, seed=derive_seed(self.spec.seed, "score", int(b), d))
                labels[d, rows] = own_labels(pred)[at]
                if pred.flagged is not None:
                    flagged = np.zeros((k, len(pos)), bool) if flagged is None else flagged
                    flagged[d, rows] = np.asarray(pred.flagged, bool)[at]
                if pred.score is not None:
                    score = np.zeros((k, len(pos)), np.float32) if score is None else score
                    score[d, rows] = np.asarray(pred.score)[at]
                first = pred.seed if first is None else first
        return Scored(labels, flagged, score, first)

    def _clean(self, b: int, pos: np.ndarray) -> None:
        x, y = self.images[pos], self.labels[pos]
        seed = derive_seed(self.spec.seed, "clean", b)
        t0 = time.perf_counter()
        s = self._score(pos, x, seed)
        dt = (time.perf_counter() - t0) / len(pos)
        right = s.labels == y.numpy()[None]  # the classifier's own label: a flag is no accuracy loss
        correct, share = s.majority(right), right.mean(0)
        rows = []
        for i, p in enumerate(pos):
            rows.append(self._row("clean", "clean", "clean", "clean", None, None, b, p, s.label(i),
                                  adv_pred=None, flagged=s.flag(i), score=s.mean_score(i),
                                  valid=True, reason="valid", success=False, d2=0.0, dinf=0.0, grads=0.0,
                                  seconds=dt, seed=s.seed, correct=bool(correct[i]), clean_share=float(share[i]),
                                  adv_share=None))
        self._commit(("clean", None, b), rows)

    def _attack(self, u: Unit, pos: np.ndarray) -> None:
        if len(pos) == 0:
            self._commit(u.key, [])
            return
        x, y = self.images[pos], self.labels[pos]
        spec = get_attack(u.name)
        seed = derive_seed(self.spec.seed, u.attack, u.eps, u.batch)
        hyper = dict(u.hyper)
        if u.kind == "budget":
            hyper["eps"] = u.eps
        if "seed" in spec.hyper_names and "seed" not in hyper:
            hyper["seed"] = seed
        oracle = None
        if spec.black_box:
            # the serving path as an outside attacker meets it: answers only, each call a fresh draw
            oracle = Oracle(self.setup.scorer, len(pos), seed=seed, flagged_is_failure=self.spec.flagged_is_failure)
            model: Any = oracle
            if "levels" in spec.hyper_names and "levels" not in hyper:
                hyper["levels"] = self.spec.levels
        else:
            model = self.surrogate if u.source == "transfer" else self.model
            assert model is not None
            model.reset(seed=seed)
        t0 = time.perf_counter()
        adv = run_attack(u.name, model, x, y, **hyper)
        seconds = (time.perf_counter() - t0) / len(pos)
        grads = 0.0 if oracle is not None else model.gradients / len(pos)
        queries = oracle.queries if oracle is not None else np.zeros(len(pos), np.int64)
        checked = check_adversarial(x, adv, ThreatModel(u.norm, u.eps if u.kind == "budget" else None, self.spec.levels))
        s, wins = self.judge_examples(pos, checked, y, derive_seed(self.spec.seed, "score", u.attack, u.eps, u.batch))
        success, share = s.majority(wins), (s.k - wins.sum(0)) / s.k
        unrounded = self._unrounded(u, pos, x, y, adv) if self.spec.protocol == "independent" else None
        rows = []
        for i, p in enumerate(pos):
            clean = self.clean[p]
            rows.append(self._row(u.attack, u.name, u.source, u.kind, u.norm, u.eps, u.batch, p,
                                  int(clean["clean_pred"]), adv_pred=s.label(i),
                                  flagged=s.flag(i), score=s.mean_score(i),
                                  valid=bool(checked.valid[i]), reason=REASONS[int(checked.reason[i])],
                                  success=bool(success[i]), d2=float(checked.l2[i]), dinf=float(checked.linf[i]),
                                  grads=grads, seconds=seconds, seed=s.seed, correct=True,
                                  clean_share=float(clean.get("clean_share", float(clean["correct"]))),
                                  adv_share=float(share[i]), queries=int(queries[i])))
            if unrounded is not None:
                rows[-1].update({k: v[i] for k, v in unrounded.items()})
        if u.kind == "minimal" or u.source == "sanity":
            self._save_examples(u, pos, checked.adversarial)
        self._commit(u.key, rows)

    def _unrounded(self, u: Unit, pos: np.ndarray, x: torch.Tensor, y: torch.Tensor,
                   adv: torch.Tensor) -> dict[str, list[Any]]:
        """The thesis protocol's second judgement: the same example checked without 8-bit rounding
        and re-scored (``float_success``, ``float_l2``, ``float_linf``)."""
        checked = check_adversarial(x, adv, ThreatModel(u.norm, u.eps if u.kind == "budget" else None, 0))
        s, wins = self.judge_examples(pos, checked, y, derive_seed(self.spec.seed, "score float", u.attack, u.eps, u.batch))
        success = s.majority(wins)
        return {"float_success": [bool(v) for v in success], "float_l2": [float(v) for v in checked.l2],
                "float_linf": [float(v) for v in checked.linf]}

    def _save_examples(self, u: Unit, pos: np.ndarray, adv: torch.Tensor) -> None:
        folder = self.out / EXAMPLES / u.attack
        folder.mkdir(parents=True, exist_ok=True)
        levels = self.spec.levels or 256
        images = np.round(adv.detach().cpu().numpy() * (levels - 1)).astype(np.uint8 if levels <= 256 else np.uint16)
        np.savez(folder / f"b{u.batch:05d}.npz", samples=pos + self.spec.start, images=images, levels=levels)

    def _row(self, attack: str, name: str, source: str, kind: str, norm: str | None, eps: float | None, batch: int,
             p: int, clean_pred: int, *, adv_pred: int | None, flagged: Any, score: Any, valid: bool, reason: str,
             success: bool, d2: float, dinf: float, grads: float, seconds: float, seed: Any, correct: bool,
             clean_share: float, adv_share: float | None, queries: int = 0) -> dict[str, Any]:
        return {
            "sample": int(p + self.spec.start), "attack": attack, "name": name, "source": source, "kind": kind,
            "norm": norm, "eps": eps, "batch": batch, "label": int(self.labels[p]), "clean_pred": clean_pred,
            "correct": bool(correct), "adv_pred": adv_pred, "flagged": flagged, "score": score, "valid": valid,
            "reason": reason, "success": success, "l2": d2, "linf": dinf, "gradients": grads,
            "seconds": round(seconds, 6), "seed": None if seed is None else int(seed),
            # the k serving draws that scored the image (1: deterministic) and the share of them
            # the pipeline got right: on the clean image (classified correctly), on the adversarial
            # example (not a success: classified correctly, flagged, invalid or unchanged)
            "draws": self.draws, "clean_share": clean_share, "adv_share": adv_share,
            # images the attack sent to the serving path for this sample (black-box attacks; 0: none)
            "queries": queries,
        }


def _stack(arrays: list[Any], dtype: Any) -> np.ndarray | None:
    return None if arrays[0] is None else np.stack([np.asarray(a, dtype) for a in arrays])
