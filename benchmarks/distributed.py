"""Audit wall time in one process against the same audit as Ray shards on a local cluster (1 and 2
workers), the overhead as a ratio, and the projection to N machines from the measured unit time
and overhead.

    python benchmarks/distributed.py [--samples 64] [--batch-size 16] [--pipeline P.toml] [--out DIR]

Every run audits the same images with the same seed (the records are checked equal). Times:

* ``one process``: ``advshield.audit`` (the CLI's call), torch on 1 thread;
* ``ray, k workers``: ``advshield.audit(ray=RayOptions(shards=k))`` on a local cluster of k CPUs
  started before the clock (``ray.init`` is reported separately); each shard task has 1 CPU;
* ``shard phase``: the driver's time from launching the shards to the last merged unit
  (``ray.json``): worker start, imports, the bundle's unpacking and checks, the setup, the units;
* the driver's own part (data, setup, the sanity unit, the probes, the report) is the wall time
  minus the shard phase, the same in every run.

Projection: with u = the units' time in one process (its wall time minus the driver's own part)
and o = a shard's start-up (launch to its first merged unit, one unit included: an upper bound of
the per-shard overhead; the shard phase minus u is printed too, but as the difference of two wall
times it is noisy), an audit of S
samples on N machines of s one-CPU shards each takes about driver + o + u * (S / samples) / min(N * s,
batches), the driver's part taken as fixed (its probes are; its data loading grows with S).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tomllib
from pathlib import Path
from typing import Any

import ray
import tomli_w
import torch

from advshield import api
from advshield.attacks.distributed import RAY_RUN, RayOptions

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = [{"name": "ddn", "steps": 20}, {"name": "fgsm"}, {"name": "pgd_linf", "steps": 10},
           {"name": "fgsm", "transfer": True}]


def pipeline(out: Path, samples: int, batch_size: int, source: str | None) -> Path:
    if source:
        return Path(source)
    api.copy_examples(out / "work", overwrite=True)
    path = out / "work" / "pipelines" / "fashion_mnist.toml"
    table = tomllib.loads(path.read_text())
    table["audit"] = {**table["audit"], "samples": samples, "batch_size": batch_size, "attacks": ATTACKS,
                      "eps_linf": [2 / 255, 8 / 255, 26 / 255], "eps_l2": [1.0], "probe_samples": 8, "probe_restarts": 2}
    path.write_text(tomli_w.dumps(table))
    return path


def strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=None, help="default: the shipped fashion_mnist.toml with a small [audit]")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="runs/bench-distributed")
    ap.add_argument("--project", type=int, default=1000, help="samples of the projected audit")
    ap.add_argument("--shards-per-machine", type=int, default=8, help="one-CPU shards a machine runs at once")
    args = ap.parse_args()
    out = Path(args.out)
    path = pipeline(out, args.samples, args.batch_size, args.pipeline)
    print(f"load average before: {os.getloadavg()}")

    t0 = time.perf_counter()
    one = api.audit(path, out=out / "one", fresh=True, threads=1, progress=False)
    single = time.perf_counter() - t0
    rows = {"one process": {"wall_s": single}}
    for workers in (1, 2):
        t0 = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            res = api.audit(path, out=out / f"ray{workers}", fresh=True, threads=1, progress=False,
                            ray=RayOptions(shards=workers))
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        assert strip(res.records) == strip(one.records), "records differ from one process's"
        run = json.loads((out / f"ray{workers}" / RAY_RUN).read_text())
        rows[f"ray, {workers} worker{'s' * (workers > 1)}"] = {
            "wall_s": wall, "ray_init_s": started, "shard_phase_s": run["wall_seconds"],
            "shard_s": list(run["shard_seconds"].values()), "first_unit_s": list(run["first_unit_seconds"].values())}
    torch.set_num_threads(1)

    r1, r2 = rows["ray, 1 worker"], rows["ray, 2 workers"]
    driver = r1["wall_s"] - r1["shard_phase_s"]  # data, setup, sanity unit, probes, report
    units = single - driver
    overhead = r1["shard_phase_s"] - units  # noisy: the difference of two wall times
    startup = r1["first_unit_s"][0]  # launch to first unit: start-up and one unit, the projection's o
    print(f"\naudit: {args.samples} samples, batches of {args.batch_size}, attacks {[a['name'] for a in ATTACKS]}, "
          f"{len(one.records)} records (equal in every run)")
    print(f"{'run':<18}{'wall s':>9}{'ratio':>8}{'shard phase s':>15}{'per shard s':>16}{'first unit s':>16}"
          f"{'ray.init s':>12}")
    for name, row in rows.items():
        shard = ", ".join(f"{s:.1f}" for s in row.get("shard_s", []))
        first = ", ".join(f"{s:.1f}" for s in row.get("first_unit_s", []))
        print(f"{name:<18}{row['wall_s']:>9.1f}{row['wall_s'] / single:>8.2f}{row.get('shard_phase_s', 0):>15.1f}"
              f"{shard:>16}{first:>16}{row.get('ray_init_s', 0):>12.1f}")
    print(f"\ndriver's own part {driver:.1f} s; units in one process u = {units:.1f} s; shard phase - u = "
          f"{overhead:.1f} s; a shard's start-up (to its first unit) o = {startup:.1f} s\n"
          f"ratio ray-1 / one process = {r1['wall_s'] / single:.2f}, speed-up with 2 workers = "
          f"{single / r2['wall_s']:.2f}")
    scale = args.project / args.samples
    per = args.shards_per_machine
    print(f"\nprojection, {args.project} samples (u x {scale:g} = {units * scale:.0f} s of units), "
          f"machines of {per} one-CPU shards:")
    print(f"{'machines':>9}{'wall s':>10}{'vs one process':>16}")
    base = driver + units * scale
    for n in (1, 2, 4, 8, 16, 32):
        shards = min(per * n, -(-args.project // args.batch_size))  # at most one shard per batch
        t = driver + startup + units * scale / shards
        print(f"{n:>9}{t:>10.0f}{base / t:>15.1f}x")
    print(f"\nload average after: {os.getloadavg()}")
    (out / "bench.json").write_text(json.dumps({"rows": rows, "driver_s": driver, "units_s": units,
                                                "overhead_s": overhead, "startup_s": startup,
                                                "samples": args.samples}, indent=2))


if __name__ == "__main__":
    main()
