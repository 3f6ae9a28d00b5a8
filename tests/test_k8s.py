"""The Kubernetes manifests, the Dockerfile and the guide's `docker run` line agree with each
other and with the repository `advshield deploy triton` generates (parsed, no cluster needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from advshield.core.resources import DEFAULT_PIPELINE
from advshield.deploy.triton import generate_repository, verify_repository
from advshield.plugin.config import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"Deployment", "Service"} and len(docs) == 2
    return by_kind


def _flags(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        key, _, value = a.partition("=")
        out[key] = value
    return out


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_wiring(manifests):
    dep = manifests["Deployment"]
    assert dep["apiVersion"] == "apps/v1"
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    c = _container(dep)
    flags = _flags(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(flags["--http-port"]), "grpc": int(flags["--grpc-port"]),
                     "metrics": int(flags["--metrics-port"])}
    assert flags["--model-control-mode"] == "explicit"
    # the repository volume: mounted read-only where --model-repository points, backed by the PVC
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (repo_mount,) = [m for m in mounts.values() if m["mountPath"] == flags["--model-repository"]]
    assert repo_mount.get("readOnly") is True
    assert "persistentVolumeClaim" in volumes[repo_mount["name"]]
    # /dev/shm in memory: the Python backend's tensors go through it
    (shm,) = [m for m in mounts.values() if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])


def _port(container: dict, ref) -> int:
    if isinstance(ref, int):
        return ref
    return {p["name"]: p["containerPort"] for p in container["ports"]}[ref]


def test_probes_hit_triton_health_endpoints(manifests):
    c = _container(manifests["Deployment"])
    http = int(_flags(c["args"])["--http-port"])
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("startupProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and _port(c, get["port"]) == http, probe
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 120  # model loads


def test_service_exposes_the_container_ports(manifests):
    svc, dep = manifests["Service"], manifests["Deployment"]
    c = _container(dep)
    assert svc["apiVersion"] == "v1"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(by_name) == {"grpc", "http", "metrics"}
    for name, p in by_name.items():
        assert _port(c, p["targetPort"]) == _port(c, name) == p["port"]


def test_the_loaded_model_is_the_generated_ensemble(manifests, tmp_path):
    """--load-model names the default pipeline's ensemble, which the generator (GPU target) writes."""
    name = load_pipeline(DEFAULT_PIPELINE).pipeline.name
    assert _flags(_container(manifests["Deployment"])["args"])["--load-model"] == name
    repo = generate_repository(DEFAULT_PIPELINE, tmp_path, gpu=True)
    assert repo.ensemble == name and (tmp_path / name / "config.pbtxt").is_file()
    assert repo.config(f"{name}__classifier").backend == "onnxruntime"
    verify_repository(tmp_path, name)


def test_dockerfile_and_guide_agree_with_the_manifest(manifests):
    args = _flags(_container(manifests["Deployment"])["args"])
    docker = (K8S / "Dockerfile").read_text()
    tag = re.search(r"ARG TRITON_TAG=(\d+)\.(\d+)-py3", docker)
    assert tag and (int(tag[1]), int(tag[2])) >= (24, 12)  # Ubuntu 24.04 / Python 3.12: advshield needs >= 3.11
    assert "FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}" in docker and '"numpy<2"' in docker
    assert f'"--load-model={args["--load-model"]}"' in docker

    guide = (ROOT / "docs" / "deploy.md").read_text()
    match = re.search(r"^docker run .*?(?<!\\)$", guide, flags=re.M | re.S)
    assert match, "docs/deploy.md has no docker run command"
    words = shlex.split(match.group(0).replace("\\\n", " "))
    published = {w.split(":")[1] for w, prev in zip(words[1:], words) if prev == "-p"}
    assert published == {str(_port(_container(manifests["Deployment"]), n)) for n in ("http", "grpc", "metrics")}
    volume = next(w for w, prev in zip(words[1:], words) if prev == "-v")
    assert volume.split(":")[1] == args["--model-repository"] == _flags(words)["--model-repository"]
    assert _flags(words)["--load-model"] == args["--load-model"] and "--gpus" in words
