"""Audits and certification beyond one process: one shard for any scheduler, and shards as Ray tasks.

``audit_shard`` runs shard I of N of an audit in this process into a shard folder (for a
Kubernetes Indexed Job or Slurm; ``attacks/audit/shards.py`` merges the folders). ``ray_audit``
and ``ray_certify`` are the drivers that ``audit_pipeline(shards=...)`` and
``certify_pipeline(run=...)`` take: they cut the work into shards, each a Ray task with its
resources (``RayOptions``: CPUs, GPUs), and stream every committed unit (audit) or certificate
(certification) back to the driver, which writes the one records file, drives one progress bar
and dedupes by unit.

* Same records as one process: audit shards are ranges of the single-process batches and run
  with its batch numbers (``Auditor(only=...)``), so seeds and clean-batch places are the same;
  certificates are seeded per (seed, sample). The driver then runs what no shard runs (the sanity
  unit), the probes and the report over the merged records in one process's order.
* By content: the pipeline's files travel through the object store (``attacks/bundle.py``) and
  are sha256-verified on the worker before anything loads them; the images travel as arrays.
* Faults: a task whose worker process or node died is relaunched (``RayOptions.retries`` times)
  from the units the driver has merged, so nothing is lost or run twice; an interrupted driver
  cancels its tasks, and a rerun resumes from its records file like any audit.

Ray is an optional heavy dependency (``pip install 'advshield[ray]'``), imported only by the
functions that need a cluster.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advshield.attacks.audit import RECORDS, Auditor, AuditSpec, build_setup, read_records, write_json
from advshield.attacks.audit.records import UnitKey, eps_key
from advshield.attacks.audit.shards import (
    SHARD,
    example_file,
    key_of,
    plan_shards,
    shard_info,
    shard_keys,
    write_prior,
)
from advshield.attacks.audit_pipeline import AuditInputs, audit_inputs
from advshield.attacks.bundle import Bundle, pack, unpack
from advshield.attacks.certify import (
    BaseForSigma,
    CertifySpec,
    CertRecord,
    certify_one,
    in_process_bases,
    remote_bases,
    summarize,
)
from advshield.core.errors import AdvshieldError, ArtifactError, ConfigError
from advshield.core.hashing import sha256_arrays
from advshield.core.progress import progress as progress_bar
from advshield.core.progress import write as progress_write
from advshield.core.validation import from_mapping, to_mapping
from advshield.plugin.classifiers import set_torch_threads
from advshield.plugin.client import RemoteClassifier, parse_target
from advshield.plugin.config import PipelineConfig
from advshield.plugin.smoothing import SmoothedClassifier

RAY_INSTALL = "pip install 'advshield[ray]' (or pip install ray)"
RAY_RUN = "ray.json"  # the driver's account of a Ray run: shards, retries, duplicates, seconds


def import_ray() -> Any:
    """The ``ray`` module, or a ``ConfigError`` that says how to install it."""
    try:
        import ray  # optional heavy dependency (advshield[ray]): only distributed runs import it
    except ImportError:
        raise ConfigError(f"--ray: Ray is not installed in this environment; install it with {RAY_INSTALL}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how the shards run. ``address``: "local" starts a cluster in this process (ended
    after the run), "auto" joins the running one (``RAY_ADDRESS``, a KubeRay head), else an address
    (HOST:PORT or ray://HOST:PORT). ``shards``: 0 is one per ``cpus`` of the cluster's CPUs (and
    per ``gpus`` of its GPUs), at most one per batch. ``retries``: relaunches of a shard whose
    worker died."""

    address: str = "local"
    shards: int = 0
    cpus: float = 1.0
    gpus: float = 0.0
    retries: int = 3
    local_cpus: int | None = None  # "local": the cluster's CPUs (None: Ray counts them)

    def __post_init__(self) -> None:
        if self.shards < 0:
            raise ConfigError(f"--shards: must be >= 1 (or 0: one per free slot of the cluster), got {self.shards}")
        if self.cpus <= 0:
            raise ConfigError(f"--shard-cpus: must be > 0, got {self.cpus}")
        if self.gpus < 0:
            raise ConfigError(f"--shard-gpus: must be >= 0, got {self.gpus}")
        if self.retries < 0:
            raise ConfigError(f"retries: must be >= 0, got {self.retries}")


@contextmanager
def connected(options: RayOptions) -> Iterator[Any]:
    """``ray``, connected as ``options.address`` says; a cluster started here is shut down after.
    When this process is connected already (a test's cluster, a Ray job), that connection is used."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            if options.address == "local":
                ray.init(num_cpus=options.local_cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=options.address, log_to_driver=False)
        except Exception as e:  # ConnectionError, or Ray's own errors: said with the address
            what = "cannot start a local Ray cluster" if options.address == "local" else "cannot connect to a Ray cluster"
            raise ConfigError(f"--ray {options.address}: {what}: {type(e).__name__}: {e}") from None
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _shard_count(ray: Any, options: RayOptions, batches: int) -> int:
    if options.shards:
        return min(options.shards, batches)
    res = ray.cluster_resources()
    slots = int(res.get("CPU", 1) // options.cpus)
    if options.gpus > 0:
        slots = min(slots, int(res.get("GPU", 0) // options.gpus))
    if slots < 1:
        raise ConfigError(f"--ray: the cluster has {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs; a shard "
                          f"asks for {options.cpus:g} CPUs and {options.gpus:g} GPUs")
    return min(slots, batches)


def _threads(options: RayOptions) -> int:
    return max(1, int(options.cpus))


def _worker_setup(threads: int) -> None:
    """torch and ONNX Runtime on the CPUs the task was given (``ADVSHIELD_THREADS``)."""
    os.environ["ADVSHIELD_THREADS"] = str(threads)
    set_torch_threads(threads)


def _unpack_verified(bundle: Bundle, folder: Path, expected: Mapping[str, str]) -> tuple[PipelineConfig, dict[str, Path]]:
    """The bundle written and verified (every file's sha256 against the driver's), and the pipeline
    loaded from it, whose files' checksums must be those of the audit's header."""
    cfg, paths = unpack(bundle, folder)
    sums = cfg.checksums(verify=True)
    diff = sorted(k for k in set(sums) | set(expected) if sums.get(k) != expected.get(k))
    if diff:
        raise ArtifactError(f"worker: the pipeline's files differ from the driver's: {', '.join(diff)}")
    return cfg, paths


@dataclass
class ShardFailure:
    shard: int
    error: str


@dataclass
class RayRun:
    """The driver's account: shards, retries after a worker died, units merged and duplicates dropped."""

    shards: list[list[int]]
    cpus: float
    gpus: float
    units: int = 0
    duplicates: int = 0
    retries: list[ShardFailure] = field(default_factory=list)
    shard_seconds: dict[int, float] = field(default_factory=dict)  # launch to last unit
    first_unit_seconds: dict[int, float] = field(default_factory=dict)  # launch to first unit: start-up + one unit
    wall_seconds: float = 0.0


# --- the audit ---------------------------------------------------------------------------------------

def _audit_task(bundle: Bundle, spec_table: dict[str, Any], header: dict[str, Any], fingerprint: str,
                target: str | None, token: str | None, part: np.ndarray, offset: int, labels: np.ndarray,
                probe: np.ndarray, only: range, prior_done: list[list[Any]], prior_rows: list[dict[str, Any]],
                threads: int, shards: int) -> Iterator[dict[str, Any]]:
    """One shard on a Ray worker: yields every committed unit (key, records, stored examples).
    Through ``target`` the shard takes 1/``shards`` of ``[audit] query_rate``: the endpoint sees
    the audit's limit, not one per shard."""
    _worker_setup(threads)
    with tempfile.TemporaryDirectory(prefix="advshield-shard-") as tmp:
        cfg, _ = _unpack_verified(bundle, Path(tmp) / "pipeline", header["pipeline.files"])
        spec = from_mapping(AuditSpec, spec_table, "audit")
        scorer = (RemoteClassifier(*parse_target(target), token=token, rate=spec.query_rate / shards,
                                   concurrency=spec.query_concurrency, retries=spec.query_retries)
                  if target else None)
        setup = build_setup(cfg, spec, torch.from_numpy(probe), scorer=scorer)
        images = np.zeros((len(labels), *part.shape[1:]), np.float32)  # only the shard's batches are read
        images[offset : offset + len(part)] = part
        out = Path(tmp) / "out"
        write_prior(out / RECORDS, [(a, eps_key(e), int(b)) for a, e, b in prior_done], prior_rows)
        commits: queue.Queue[Any] = queue.Queue()
        auditor = Auditor(setup, spec, images, labels, out, progress=False, header=header, only=only,
                          on_commit=commits.put)
        got = (read_records(out / RECORDS)[0] or {}).get("fingerprint")
        if got != fingerprint:
            raise ConfigError("worker: this shard's audit settings differ from the driver's (pipeline files, "
                              "attack setup or the randomness measured); same advshield and packages on every node?")
        seen = len(auditor.log.records)

        def run() -> None:
            try:
                auditor.run()
                commits.put(None)
            except BaseException as e:  # handed to the generator, raised in the task
                commits.put(e)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while True:
            item = commits.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            rows = auditor.log.records[seen:]
            seen = len(auditor.log.records)
            f = example_file(out, item)
            yield {"key": list(item), "rows": rows, "examples": f.read_bytes() if f.is_file() else None,
                   "pid": os.getpid()}
        worker.join()
        if scorer is not None:  # what this shard sent to the endpoint, for the audit's totals
            yield {"client": scorer.stats(), "pid": os.getpid()}


def _lost_worker(ray: Any, e: BaseException) -> bool:
    """The task's worker process or node died (relaunch), as opposed to an error the task raised."""
    ex = ray.exceptions
    kinds = tuple(getattr(ex, n) for n in ("WorkerCrashedError", "NodeDiedError", "ObjectLostError",
                                           "OwnerDiedError", "LocalRayletDiedError") if hasattr(ex, n))
    return isinstance(e, kinds)


def _raise_task_error(ray: Any, e: BaseException) -> None:
    """An error inside a task: the original exception where Ray kept it (an ``AdvshieldError``'s
    message reaches the user as it was raised)."""
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, AdvshieldError):
            raise cause from None
    raise e


def _stream(ray: Any, launch: Callable[[int], Any], shards: Sequence[int], options: RayOptions, run: RayRun,
            accept: Callable[[int, dict[str, Any]], None]) -> None:
    """Launch every shard, hand each streamed item to ``accept``; relaunch a shard whose worker died
    (``launch`` builds its task again from what has been merged); cancel everything on the way out."""
    pending: dict[Any, int] = {}
    tries = dict.fromkeys(shards, 0)
    started: dict[int, float] = {}
    for i in shards:
        pending[launch(i)] = i
        started[i] = time.perf_counter()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for gen in ready:
                i = pending[gen]
                try:
                    item = ray.get(next(gen))
                except StopIteration:
                    del pending[gen]
                    run.shard_seconds[i] = round(time.perf_counter() - started[i], 3)
                    continue
                except Exception as e:
                    del pending[gen]
                    if not _lost_worker(ray, e):
                        _raise_task_error(ray, e)
                    if tries[i] >= options.retries:
                        raise ConfigError(f"--ray: shard {i} lost its worker {tries[i] + 1} times; last: {e}") from None
                    tries[i] += 1
                    run.retries.append(ShardFailure(i, f"{type(e).__name__}: {str(e).splitlines()[0]}"))
                    progress_write(f"shard {i}: worker lost ({type(e).__name__}); relaunched from the merged units")
                    pending[launch(i)] = i
                    continue
                run.first_unit_seconds.setdefault(i, round(time.perf_counter() - started[i], 3))
                accept(i, item)
    finally:
        for gen in pending:
            with suppress(Exception):  # the task may be gone already
                ray.cancel(gen, force=True)


def ray_audit(cfg: PipelineConfig, options: RayOptions, *, progress: bool = True,
              on_unit: Callable[[int, UnitKey, dict[str, Any]], None] | None = None
              ) -> Callable[[Auditor, AuditInputs], None]:
    """The ``shards`` hook of ``audit_pipeline``: the audit's batches cut into shards that run as
    Ray tasks; each committed unit is merged into the driver's auditor as it arrives.
    ``on_unit(shard, key, item)`` is called after each merge (``item["pid"]``: the worker)."""
    import_ray()  # before the audit loads anything: a missing Ray is said at once

    def drive(auditor: Auditor, inputs: AuditInputs) -> None:
        t0 = time.perf_counter()
        with connected(options) as ray:
            nb = len(auditor.batches())
            plan = plan_shards(nb, _shard_count(ray, options, nb))
            run = RayRun([[r.start, r.stop] for r in plan], options.cpus, options.gpus)
            expected = [set(shard_keys(auditor, r)) for r in plan]
            todo = [i for i, keys in enumerate(expected) if keys - auditor.log.done]
            bundle = ray.put(pack(cfg))
            size = inputs.spec.batch_size
            parts = {i: ray.put(inputs.images[plan[i].start * size : plan[i].stop * size]) for i in todo}
            labels, probe = ray.put(inputs.labels), ray.put(inputs.images[:16])
            spec_table = to_mapping(inputs.spec)
            header, _, _ = read_records(auditor.out / RECORDS)
            fingerprint = (header or {}).get("fingerprint")
            task = ray.remote(_audit_task).options(num_cpus=options.cpus, num_gpus=options.gpus, max_retries=0)

            def launch(i: int) -> Any:
                done = [k for k in auditor.log.done if k in expected[i]]
                rows = [r for r in auditor.log.records if key_of(r) in expected[i]]
                return task.remote(bundle, spec_table, inputs.header, fingerprint, inputs.target, inputs.token,
                                   parts[i], plan[i].start * size, labels, probe, plan[i],
                                   [list(k) for k in done], rows, _threads(options), len(todo))

            total = sum(len(expected[i] - auditor.log.done) for i in todo)
            print(f"ray: {len(plan)} shards of {nb} batches ({options.cpus:g} CPUs, {options.gpus:g} GPUs each), "
                  f"{total} units to run, {len(auditor.log.done)} merged already")
            with progress_bar(total=total, desc=f"audit on {len(todo)} shards", unit="unit", enabled=progress) as bar:
                def accept(i: int, item: dict[str, Any]) -> None:
                    if "client" in item:
                        if hasattr(inputs.setup.scorer, "add_stats"):
                            inputs.setup.scorer.add_stats(item["client"])
                        return
                    a, e, b = item["key"]
                    key = (a, eps_key(e), int(b))
                    if key not in expected[i]:
                        raise RuntimeError(f"shard {i} committed unit {key} outside its batches {plan[i]}")
                    if key in auditor.log.done:
                        run.duplicates += 1
                    else:
                        if item["examples"] is not None:
                            dest = example_file(auditor.out, key)
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            dest.write_bytes(item["examples"])
                        auditor.merge(key, item["rows"])
                        run.units += 1
                        bar.update()
                    if on_unit is not None:
                        on_unit(i, key, item)

                _stream(ray, launch, todo, options, run, accept)
            run.wall_seconds = round(time.perf_counter() - t0, 3)
            write_json(auditor.out / RAY_RUN, asdict(run))
            if run.retries or run.duplicates:
                print(f"ray: {len(run.retries)} shard relaunches, {run.duplicates} duplicate units dropped")

    return drive


# --- one shard, for any scheduler --------------------------------------------------------------------

@dataclass
class ShardResult:
    out: Path
    info: dict[str, Any]
    records: int
    units: int

    def describe(self) -> str:
        i = self.info
        return (f"shard {i['index']} of {i['count']}: batches {i['batches'][0]}-{i['batches'][1] - 1}, samples "
                f"{i['samples'][0]}-{i['samples'][1] - 1}, {self.units} units, {self.records} records in "
                f"{self.out / RECORDS}")


def audit_shard(cfg: PipelineConfig, shard: tuple[int, int], *, out: str | Path | None = None,
                fresh: bool = False, progress: bool = True, **overrides: Any) -> ShardResult:
    """Shard ``shard`` = (I, N) of the audit ``overrides`` describe (``audit_pipeline``'s), in this
    process: its batches' units with the single-process seeds, into ``out`` (records.jsonl,
    examples/, shard.json). Resumable like an audit; ``merge_shards`` joins the N folders."""
    index, count = shard
    inputs = audit_inputs(cfg, out=out or f"runs/audit/{cfg.pipeline.name}/shard-{index}-of-{count}",
                          shard=shard, **overrides)
    assert inputs.only is not None
    auditor = Auditor(inputs.setup, inputs.spec, inputs.images, inputs.labels, inputs.out, fresh=fresh,
                      progress=progress, header=inputs.header, only=inputs.only)
    records = auditor.run()
    info = shard_info(index, count, inputs.only, inputs.spec.batch_size, inputs.spec.start, len(inputs.labels))
    write_json(inputs.out / SHARD, info)
    return ShardResult(inputs.out, info, len(records), len(auditor.log.done))


# --- certification -----------------------------------------------------------------------------------

CERT_LOG = "certify_shards.jsonl"  # the driver's merged certificates (a header line, then records): resumable


def _certify_task(bundle: Bundle, spec_table: dict[str, Any], checksums: dict[str, str], target: str | None,
                  token: str | None, num_classes: int, images: np.ndarray, labels: np.ndarray, first: int,
                  todo: list[list[Any]], threads: int) -> Iterator[dict[str, Any]]:
    """One certification shard on a Ray worker: yields a record per (sigma, index) of ``todo``
    (``images[i]`` is sample ``first + i``)."""
    _worker_setup(threads)
    with tempfile.TemporaryDirectory(prefix="advshield-certify-") as tmp:
        cfg, paths = _unpack_verified(bundle, Path(tmp) / "pipeline", checksums)  # noise models verified too
        table = dict(spec_table)
        if table.get("models"):
            table["models"] = [str(paths[f"certify.models[{j}]"]) for j in range(len(table["models"]))]
        spec = from_mapping(CertifySpec, table, "certify")
        base_for_sigma: BaseForSigma = (remote_bases(RemoteClassifier(*parse_target(target), token=token), spec)
                                        if target else in_process_bases(cfg, spec))
        smoothed: dict[float, SmoothedClassifier] = {}
        pid = os.getpid()
        for sigma, index in todo:
            if sigma not in smoothed:
                smoothed[sigma] = SmoothedClassifier(base_for_sigma(sigma), num_classes, spec.smoothing(sigma))
            i = int(index) - first
            rec = certify_one(smoothed[sigma], float(sigma), images[i], int(labels[i]), int(index))
            yield {"record": asdict(rec), "pid": pid}


def ray_certify(cfg: PipelineConfig, options: RayOptions, *, target: str | None = None, token: str | None = None,
                on_record: Callable[[int, dict[str, Any]], None] | None = None) -> Callable[..., dict]:
    """The ``run`` hook of ``certify_pipeline``: the samples cut into shards that certify as Ray
    tasks; certificates stream into ``out/certify_shards.jsonl`` (a rerun resumes from it), then
    ``certify_records.jsonl`` and the summary are written as one process writes them."""
    import_ray()

    def run(base_for_sigma: BaseForSigma, num_classes: int, images: np.ndarray, labels: np.ndarray,
            spec: CertifySpec, out: Path | None = None, progress: bool = True) -> dict:
        assert out is not None
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        header = {"spec": json.loads(json.dumps(to_mapping(spec))), "checksums": cfg.checksums(verify=True),
                  "images_sha256": _array_sha(images, labels), "target": target}
        done = _read_cert_log(out / CERT_LOG, header)
        extra = {f"certify.models[{j}]": cfg.resolve(m) for j, m in enumerate(spec.models)}
        with connected(options) as ray:
            plan = plan_shards(len(images), _shard_count(ray, options, len(images)))
            run_info = RayRun([[spec.start + r.start, spec.start + r.stop] for r in plan], options.cpus, options.gpus)
            expected = [{(float(s), spec.start + i) for s in spec.sigmas for i in r} for r in plan]
            todo = [i for i, keys in enumerate(expected) if keys - done.keys()]
            bundle = ray.put(pack(cfg, extra))
            parts = {i: (ray.put(images[plan[i].start : plan[i].stop]), labels[plan[i].start : plan[i].stop]) for i in todo}
            spec_table = to_mapping(spec)
            task = ray.remote(_certify_task).options(num_cpus=options.cpus, num_gpus=options.gpus, max_retries=0)
            checksums = header["checksums"]

            def launch(i: int) -> Any:
                left = sorted(expected[i] - done.keys())  # sigma-major, as one process certifies
                return task.remote(bundle, spec_table, checksums, target, token, num_classes, parts[i][0],
                                   parts[i][1], spec.start + plan[i].start, [list(k) for k in left],
                                   _threads(options))

            total = sum(len(expected[i] - done.keys()) for i in todo)
            print(f"ray: {len(plan)} certification shards of {len(images)} samples x {len(spec.sigmas)} sigmas, "
                  f"{total} certificates to compute, {len(done)} merged already")
            tmp = out / (CERT_LOG + ".tmp")  # what was merged, rewritten without a torn tail
            tmp.write_text("".join(json.dumps(r) + "\n" for r in [{"header": header}, *done.values()]))
            tmp.replace(out / CERT_LOG)
            with (out / CERT_LOG).open("a") as log, progress_bar(total=total, desc=f"certify on {len(todo)} shards",
                                                                unit="img", enabled=progress) as bar:

                def accept(i: int, item: dict[str, Any]) -> None:
                    rec = item["record"]
                    key = (float(rec["sigma"]), int(rec["index"]))
                    if key in done:
                        run_info.duplicates += 1
                    else:
                        done[key] = rec
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        os.fsync(log.fileno())
                        run_info.units += 1
                        bar.update()
                    if on_record is not None:
                        on_record(i, item)

                _stream(ray, launch, todo, options, run_info, accept)
        run_info.wall_seconds = round(time.perf_counter() - t0, 3)
        write_json(out / RAY_RUN, asdict(run_info))
        summary: dict = {"spec": asdict(spec), "sigmas": {}}
        records: list[CertRecord] = []
        with (out / "certify_records.jsonl").open("w") as sink:
            for sigma in spec.sigmas:
                rows = [CertRecord(**done[(float(sigma), spec.start + i)]) for i in range(len(images))]
                sink.writelines(json.dumps(asdict(r)) + "\n" for r in rows)
                records += rows
                summary["sigmas"][f"{sigma:g}"] = summarize(rows, spec.radii, sum(r.seconds for r in rows),
                                                            (spec.n0 + spec.n) * len(rows))
        (out / "certify_summary.json").write_text(json.dumps(summary, indent=2))
        summary["records"] = records
        return summary

    return run


def _array_sha(images: np.ndarray, labels: np.ndarray) -> str:
    return sha256_arrays(np.ascontiguousarray(images), np.asarray(labels, np.int64))


def _read_cert_log(path: Path, header: dict[str, Any]) -> dict[tuple[float, int], dict[str, Any]]:
    """The certificates a previous run of the same certification merged (none when it differs)."""
    if not path.is_file():
        return {}
    done: dict[tuple[float, int], dict[str, Any]] = {}
    with path.open() as f:
        for n, line in enumerate(f):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line
            if n == 0:
                if row.get("header") != header:
                    return {}
                continue
            done[(float(row["sigma"]), int(row["index"]))] = row
    return done
