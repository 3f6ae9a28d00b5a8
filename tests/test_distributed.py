"""Audits and certification in shards: on a real local Ray cluster (started here, two CPUs) and as
shard folders of any scheduler, merged. The merged records and the report equal one process's for
the same seed (timings aside); a worker killed mid-shard loses and duplicates nothing; an
interrupted driver resumes from what it merged; merge refuses folders of different audits and
overlapping ones; the pipeline's files reach workers by content and are sha256-checked there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import tomli_w
import torch

from advshield import api
from advshield.attacks import distributed
from advshield.attacks.audit import RECORDS, read_records
from advshield.attacks.audit.shards import SHARD, merge_shards, plan_shards
from advshield.attacks.audit_pipeline import audit_pipeline
from advshield.attacks.bundle import Bundle, pack, unpack
from advshield.attacks.distributed import RAY_RUN, RayOptions, import_ray, ray_audit
from advshield.cli import main
from advshield.core.errors import ArtifactError, ConfigError
from advshield.plugin.config import load_pipeline

SAMPLES, BATCH = 32, 8  # 4 batches: 2 shards of 2
AUDIT = {
    "samples": SAMPLES, "batch_size": BATCH, "seed": 3, "eps_linf": [0.05, 0.1], "eps_l2": [1.0],
    "sanity_samples": 4, "probe_samples": 4, "probe_restarts": 2,
    "attacks": [{"name": "ddn", "steps": 8}, {"name": "fgsm"}, {"name": "pgd_linf", "steps": 4},
                {"name": "fgsm", "transfer": True}],
}
TIMING = {"seconds", "attack_seconds", "wall_seconds", "created", "command", "noise_samples_per_second",
          "images_per_second", "seconds_per_image"}


@pytest.fixture(scope="module", autouse=True)
def threads():
    """One torch thread, as each one-CPU shard task has: the single-process runs match them."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray cluster for this module (two CPUs, no dashboard), stopped at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _pipeline(folder: Path, example: str, **audit: Any) -> Path:
    """A working copy of a shipped example with the small [audit] above."""
    api.copy_examples(folder, overwrite=True)
    path = folder / "pipelines" / f"{example}.toml"
    table = tomllib.loads(path.read_text())
    table["audit"] = {**table.get("audit", {}), **AUDIT, **audit}
    path.write_text(tomli_w.dumps(table))
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return _pipeline(tmp_path_factory.mktemp("plain"), "fashion_mnist")


@pytest.fixture(scope="module")
def random_pipeline(tmp_path_factory) -> Path:
    return _pipeline(tmp_path_factory.mktemp("random"), "fashion_mnist_random", eot_samples=2, draws=3,
                     attacks=[{"name": "fgsm"}, {"name": "pgd_linf", "steps": 3}])


def strip(obj: Any) -> Any:
    """Without timings: everything else must be reproducible."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def audit(pipeline: Path, out: Path, **kw: Any) -> api.AuditResult:
    return api.audit(pipeline, out=out, threads=1, progress=False, **kw)


@pytest.fixture(scope="module")
def one_process(plain, tmp_path_factory) -> api.AuditResult:
    return audit(plain, tmp_path_factory.mktemp("one") / "audit")


def committed_units(path: Path) -> list[tuple]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum("header" in row for row in lines) == 1
    return [tuple(row["commit"]) for row in lines if "commit" in row]


def assert_same_audit(got: api.AuditResult, want: api.AuditResult) -> None:
    assert strip(got.records) == strip(want.records)
    assert strip(got.report) == strip(want.report)
    assert got.gate.passed == want.gate.passed
    units = committed_units(got.out / RECORDS)
    assert len(units) == len(set(units)) == len(committed_units(want.out / RECORDS))  # nothing lost or twice
    for f in sorted((want.out / "examples").rglob("*.npz")):  # the minimal attack's stored examples
        with np.load(f) as a, np.load(got.out / f.relative_to(want.out)) as b:
            assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["samples"], b["samples"])


def test_the_batches_are_cut_into_contiguous_nearly_equal_shards():
    assert plan_shards(4, 2) == [range(0, 2), range(2, 4)]
    assert plan_shards(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_shards(2, 8) == [range(0, 1), range(1, 2)]
    with pytest.raises(ConfigError, match="shards: must be >= 1"):
        plan_shards(4, 0)


def test_sharded_audit_on_ray_equals_one_process(cluster, plain, one_process, tmp_path):
    got = audit(plain, tmp_path / "ray", ray=RayOptions(shards=2))
    assert_same_audit(got, one_process)
    run = json.loads((tmp_path / "ray" / RAY_RUN).read_text())
    assert run["shards"] == [[0, 2], [2, 4]] and run["retries"] == [] and run["duplicates"] == 0
    assert got.metrics["clean_accuracy"] > 0.5 and any(r["success"] for r in got.records)  # a real audit


def test_a_random_pipeline_sharded_on_ray_equals_one_process(cluster, random_pipeline, tmp_path):
    """Random scoring puts each image in its place of its full clean batch, seeded by the batch's
    number: the shards keep the single-process batches and numbers, so the draws are the same."""
    want = audit(random_pipeline, tmp_path / "one")
    assert want.records[0]["draws"] == 3 and want.report["mode"]["eot_samples"] == 2
    got = audit(random_pipeline, tmp_path / "ray", ray=RayOptions(shards=2))
    assert_same_audit(got, want)


def test_a_worker_killed_mid_shard_is_relaunched_and_nothing_is_lost_or_doubled(cluster, plain, one_process,
                                                                             tmp_path):
    killed: list[int] = []
    seen: dict[int, int] = {}

    def kill_once(shard: int, key: tuple, item: dict[str, Any]) -> None:
        seen[shard] = seen.get(shard, 0) + 1
        if shard == 1 and seen[shard] == 2 and not killed:  # shard 1 has units left to run
            os.kill(item["pid"], signal.SIGKILL)
            killed.append(item["pid"])

    cfg = load_pipeline(plain)
    torch.set_num_threads(1)
    got = audit_pipeline(cfg, out=tmp_path / "ray", progress=False,
                         shards=ray_audit(cfg, RayOptions(shards=2), progress=False, on_unit=kill_once))
    assert killed
    run = json.loads((tmp_path / "ray" / RAY_RUN).read_text())
    assert [r["shard"] for r in run["retries"]] == [1] and "WorkerCrashedError" in run["retries"][0]["error"]
    assert_same_audit(got, one_process)


def test_an_interrupted_driver_resumes_from_what_it_merged(cluster, plain, one_process, tmp_path):
    cfg = load_pipeline(plain)
    merged = []

    def interrupt(shard: int, key: tuple, item: dict[str, Any]) -> None:
        merged.append(key)
        if len(merged) == 3:
            raise KeyboardInterrupt

    torch.set_num_threads(1)
    with pytest.raises(KeyboardInterrupt):
        audit_pipeline(cfg, out=tmp_path / "ray", progress=False,
                       shards=ray_audit(cfg, RayOptions(shards=2), progress=False, on_unit=interrupt))
    _, _, done = read_records(tmp_path / "ray" / RECORDS)
    assert len(done) == 3
    got = audit(plain, tmp_path / "ray", ray=RayOptions(shards=2))
    run = json.loads((tmp_path / "ray" / RAY_RUN).read_text())
    total = len(committed_units(one_process.out / RECORDS)) - 1  # the sanity unit runs on the driver
    assert run["units"] == total - 3 and run["duplicates"] == 0
    assert_same_audit(got, one_process)


def test_shards_score_through_a_live_server_as_one_process_does(cluster, plain, tmp_path):
    """--target: every shard re-scores through the same advshield server over gRPC."""
    from server_helpers import start_server

    srv = start_server(plain, tmp_path / "server.log")
    try:
        kw: dict[str, Any] = {"target": f"grpc://{srv.url}/fashion_mnist", "samples": 16, "attacks": ["fgsm", "ddn"]}
        want = audit(plain, tmp_path / "one", **kw)
        got = audit(plain, tmp_path / "ray", ray=RayOptions(shards=2), **kw)
    finally:
        srv.stop()
    assert want.report["mode"]["scorer"].startswith("RemoteClassifier")
    assert_same_audit(got, want)


def test_the_audit_command_starts_and_stops_its_own_local_cluster(plain, tmp_path):
    """`advshield audit PIPELINE --ray` in a fresh process: a local cluster of its own, ended after."""
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "advshield", "audit", str(plain), "--ray", "--shards", "2",
                           "--samples", "16", "--attacks", "fgsm", "--threads", "1", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # the gate's verdict, not an error
    assert "Started a local Ray instance" in proc.stderr and "ray: 2 shards of 2 batches" in proc.stdout
    run = json.loads((out / RAY_RUN).read_text())
    assert run["units"] == 2 + 2 * 3 and (out / "report.json").is_file()


def test_certification_on_ray_equals_one_process(cluster, plain, tmp_path):
    kw: dict[str, Any] = {"sigmas": [0.25, 0.5], "samples": 6, "n0": 20, "n": 200, "batch_size": 100,
                          "progress": False}
    want = api.certify(plain, out=tmp_path / "one", **kw)
    got = api.certify(plain, out=tmp_path / "ray", ray=RayOptions(shards=2), **kw)
    rows = [(tmp_path / d / "certify_records.jsonl").read_text().splitlines() for d in ("one", "ray")]
    assert [strip(json.loads(r)) for r in rows[1]] == [strip(json.loads(r)) for r in rows[0]]
    assert len(rows[0]) == 12
    assert strip(got.summary) == strip(want.summary) and got.budget == want.budget
    assert json.loads((tmp_path / "ray" / RAY_RUN).read_text())["shards"] == [[0, 3], [3, 6]]


def test_the_certify_command_runs_on_ray_and_resumes(cluster, plain, tmp_path, capsys):
    args = ["certify", str(plain), "--sigma", "0.25", "--samples", "4", "--n0", "10", "--n", "100", "--quiet",
            "--out", str(tmp_path / "c"), "--ray", "--shards", "2"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "ray: 2 certification shards of 4 samples x 1 sigmas, 4 certificates to compute" in said
    first = (tmp_path / "c" / "certify_records.jsonl").read_text()
    assert main(args) == 0  # everything merged already: nothing to compute, the same records
    assert "0 certificates to compute, 4 merged already" in capsys.readouterr().out
    assert (tmp_path / "c" / "certify_records.jsonl").read_text() == first


def test_the_audits_certification_stage_runs_on_ray_too(cluster, tmp_path):
    """`advshield audit --ray --certify`: the certificates too are shards; budget and report equal."""
    path = _pipeline(tmp_path / "work", "fashion_mnist", samples=8, attacks=[{"name": "fgsm"}], certify_checks=2)
    table = tomllib.loads(path.read_text())
    table["certify"] = {"sigmas": [0.25], "samples": 4, "n0": 10, "n": 100, "batch_size": 100}
    path.write_text(tomli_w.dumps(table))
    want = audit(path, tmp_path / "one", certify=True)
    got = audit(path, tmp_path / "ray", certify=True, ray=RayOptions(shards=2))
    assert json.loads((tmp_path / "ray" / "certify" / RAY_RUN).read_text())["shards"] == [[0, 2], [2, 4]]
    assert got.budget is not None and strip(got.budget) == strip(want.budget)
    assert_same_audit(got, want)


def test_random_pipeline_certificates_do_not_depend_on_the_shard(cluster, random_pipeline, tmp_path):
    kw: dict[str, Any] = {"sigmas": [0.25], "samples": 4, "n0": 10, "n": 100, "batch_size": 100, "progress": False}
    want = api.certify(random_pipeline, out=tmp_path / "one", **kw)
    got = api.certify(random_pipeline, out=tmp_path / "ray", ray=RayOptions(shards=2), **kw)
    assert strip([vars(r) for r in got.records]) == strip([vars(r) for r in want.records])


# --- shard folders from any scheduler -----------------------------------------------------------------

@pytest.fixture(scope="module")
def shard_folders(plain, tmp_path_factory) -> list[Path]:
    """The two shards as an Indexed Job runs them: `advshield audit PIPELINE --shard I/2` each."""
    root = tmp_path_factory.mktemp("shards")
    for i in range(2):
        code = main(["audit", str(plain), "--shard", f"{i}/2", "--out", str(root / f"shard-{i}"), "--threads", "1",
                     "--quiet"])
        assert code == 0
    return [root / "shard-0", root / "shard-1"]


def test_merged_shard_folders_finish_as_one_process(shard_folders, one_process, plain, tmp_path, capsys):
    info = [json.loads((d / SHARD).read_text()) for d in shard_folders]
    assert [i["batches"] for i in info] == [[0, 2], [2, 4]] and [i["samples"] for i in info] == [[0, 16], [16, 32]]
    assert main(["audit", "merge", *map(str, shard_folders), "--out", str(tmp_path / "merged")]) == 0
    assert "merged 2 shard folders" in capsys.readouterr().out
    got = audit(plain, tmp_path / "merged")  # runs the sanity unit, the probes and the report
    assert_same_audit(got, one_process)


def _copy(src: Path, dest: Path, edit=None) -> Path:
    shutil.copytree(src, dest)
    if edit is not None:
        lines = (dest / RECORDS).read_text().splitlines()
        header = json.loads(lines[0])
        edit(header["header"])
        (dest / RECORDS).write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    return dest


def test_merge_refuses_shards_of_different_audits_naming_the_difference(shard_folders, tmp_path):
    a, b = shard_folders

    def other_model(h):
        h["settings"]["pipeline.files"]["model"] = "0" * 64

    def other_seed(h):
        h["settings"]["seed"] = 4

    with pytest.raises(ConfigError, match=r"different audits: pipeline\.files\.model: \"[0-9a-f]{64}\" vs \"0{64}\""):
        merge_shards([a, _copy(b, tmp_path / "model", other_model)], tmp_path / "m1")
    with pytest.raises(ConfigError, match=r"different audits: seed: 3 vs 4"):
        merge_shards([a, _copy(b, tmp_path / "seed", other_seed)], tmp_path / "m2")
    with pytest.raises(ConfigError, match=r"overlap: both hold samples 0-15"):
        merge_shards([a, _copy(a, tmp_path / "again")], tmp_path / "m3")
    with pytest.raises(ConfigError, match="holds no audit records"):
        merge_shards([a, tmp_path], tmp_path / "m4")
    assert not (tmp_path / "m1" / RECORDS).exists()


def test_merge_says_which_batches_are_missing(shard_folders, tmp_path):
    result = merge_shards(shard_folders[:1], tmp_path / "half")
    assert result.missing == [2, 3] and "missing batches 2-3 of 4" in result.describe()


# --- artifacts by content, errors --------------------------------------------------------------------

def test_workers_verify_every_file_by_sha256_before_use(plain, tmp_path):
    cfg = load_pipeline(plain)
    bundle = pack(cfg)
    assert set(bundle.checksums) == {"model", "surrogate"} and bundle.size > 100_000
    back, _ = unpack(bundle, tmp_path / "ok")
    assert back.checksums() == cfg.checksums() and back.class_names == cfg.class_names
    assert back.data.dataset == ""  # the images travel as arrays, not the data set
    name, data, sha = bundle.files["model"]
    bad = Bundle(bundle.table, {**bundle.files, "model": (name, data[:-1] + bytes([data[-1] ^ 1]), sha)})
    with pytest.raises(ArtifactError, match=r"model: sha256 mismatch on this worker .*the driver sent " + sha):
        unpack(bad, tmp_path / "bad")


def test_a_file_damaged_on_the_way_is_refused_by_the_worker(cluster, plain, tmp_path, monkeypatch):
    """End to end: the Ray worker checks the bytes it got; its ArtifactError reaches the driver."""
    def damaged(cfg, extra=None):
        bundle = pack(cfg, extra)
        name, data, sha = bundle.files["surrogate"]
        return Bundle(bundle.table, {**bundle.files, "surrogate": (name, data[:-1] + bytes([data[-1] ^ 1]), sha)})

    monkeypatch.setattr(distributed, "pack", damaged)
    with pytest.raises(ArtifactError, match=r"surrogate: sha256 mismatch on this worker"):
        audit(plain, tmp_path / "ray", ray=RayOptions(shards=2), samples=16)


def test_fitted_artifacts_and_their_sidecars_travel_by_content(tmp_path, fashion_test):
    """A detector threshold fitted without a pinned sha256 is verified on the worker through its
    sidecar, as at home; the unpacked pipeline scores exactly as the original."""
    api.copy_examples(tmp_path / "work")
    path = tmp_path / "work" / "pipelines" / "fashion_mnist_squeeze.toml"
    api.fit(path, calibration=200, progress=False)
    cfg = load_pipeline(path)
    bundle = pack(cfg)
    assert {"artifacts.squeeze_threshold", "artifacts.squeeze_threshold.meta.json"} <= set(bundle.files)
    back, _ = unpack(bundle, tmp_path / "worker")
    x = torch.from_numpy(fashion_test.as_float(0, 16))
    want, got = api.predict(cfg, x), api.predict(back, x)
    assert np.array_equal(got.labels, want.labels) and np.array_equal(got.flagged, want.flagged)
    assert np.allclose(got.score, want.score, atol=0) and want.flagged is not None
    (tmp_path / "worker" / "artifacts.squeeze_threshold" / "squeeze_threshold.json.meta.json").write_text("{}")
    with pytest.raises(ArtifactError):  # the sidecar is what vouches for an unpinned artifact
        api.predict(back, x)


def test_without_ray_installed_the_error_says_how_to_install_it(monkeypatch, plain, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"Ray is not installed .*pip install 'advshield\[ray\]'"):
        import_ray()
    assert main(["audit", str(plain), "--ray", "--quiet", "--out", "unused"]) == 2
    assert "pip install 'advshield[ray]'" in capsys.readouterr().err


def test_shard_flags_are_checked(plain, capsys):
    assert main(["audit", str(plain), "--shard", "2/2"]) == 2
    assert "need 0 <= INDEX < COUNT" in capsys.readouterr().err
    assert main(["audit", str(plain), "--shards", "2"]) == 2
    assert "only with --ray" in capsys.readouterr().err
    assert main(["audit", "merge", "a", "b"]) == 2
    assert "--out OUT" in capsys.readouterr().err




def test_ray_auto_joins_the_running_cluster_from_another_process(cluster, plain, tmp_path):
    """What a KubeRay job's entrypoint does: `--ray auto` finds the running cluster (this module's)
    and its shards run there; the cluster stays up for its owner."""
    out = tmp_path / "auto"
    proc = subprocess.run([sys.executable, "-m", "advshield", "audit", str(plain), "--ray", "auto", "--quiet",
                           "--samples", "16", "--attacks", "fgsm", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # the gate's verdict, not an error
    assert "Connected to Ray cluster" in proc.stderr and "ray: 2 shards of 2 batches" in proc.stdout
    run = json.loads((out / RAY_RUN).read_text())
    assert run["shards"] == [[0, 1], [1, 2]] and run["units"] == 2 + 2 * 3  # clean + fgsm at 3 eps, per batch
    assert cluster.is_initialized() and cluster.cluster_resources()["CPU"] == 2
