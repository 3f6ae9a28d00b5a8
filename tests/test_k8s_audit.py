"""deploy/k8s/audit/: the KubeRay RayJob and the Indexed Job + merge, checked offline against their
schemas (Kubernetes' own, from the kubernetes-validate package, strict: unknown fields fail; the
RayJob's fields against the KubeRay v1 CRD's as written below, its pod templates against
Kubernetes') and against advshield: every command parses with advshield's own CLI and the shards,
folders, CPUs and volumes agree."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from advshield.attacks.audit.shards import parse_shard
from advshield.cli import build_parser

K8S_AUDIT = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "audit"
KUBERNETES = "1.34"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object"}  # checked against Kubernetes' PodTemplateSpec below
# The fields of KubeRay's ray.io/v1 RayJob this repository may use, with their types (from the
# v1 CRD's openAPIV3Schema); anything else is an error, as a typo would be on a cluster.
_WORKER_GROUP = {
    "type": "object", "additionalProperties": False,
    "required": ["groupName", "minReplicas", "maxReplicas", "template"],
    "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                   "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                   "numOfHosts": {"type": "integer"}, "idleTimeoutSeconds": {"type": "integer"},
                   "rayStartParams": _STR_MAP, "labels": _STR_MAP, "suspend": {"type": "boolean"},
                   "template": _POD_TEMPLATE},
}
RAYJOB_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["entrypoint", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"}, "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": {"type": "integer"},
                "activeDeadlineSeconds": {"type": "integer"}, "backoffLimit": {"type": "integer"},
                "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
                "suspend": {"type": "boolean"}, "metadata": _STR_MAP, "submitterPodTemplate": _POD_TEMPLATE,
                "rayClusterSpec": {
                    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
                    "properties": {
                        "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                        "headGroupSpec": {
                            "type": "object", "additionalProperties": False, "required": ["template"],
                            "properties": {"rayStartParams": _STR_MAP, "serviceType": {"type": "string"},
                                           "enableIngress": {"type": "boolean"}, "labels": _STR_MAP,
                                           "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
                    },
                },
            },
        },
    },
}


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S_AUDIT / name).read_text()) if d]


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    (doc,) = _docs("rayjob.yaml")
    return doc


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _docs("indexed-job.yaml")}


def _check_pod_template(template: dict[str, Any]) -> None:
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                  "template": template}, KUBERNETES, strict=True)


def _templates(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    spec = rayjob["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def _audit_args(command: str) -> Any:
    words = shlex.split(command)
    assert words[:2] == ["advshield", "audit"], command
    return build_parser().parse_args(words[1:])


def _cpus(container: dict[str, Any]) -> float:
    return float(container["resources"]["requests"]["cpu"])


def test_every_manifest_passes_its_schema(rayjob, jobs):
    jsonschema.validate(rayjob, RAYJOB_SCHEMA)
    for template in _templates(rayjob):
        _check_pod_template(template)
    for doc in [*jobs.values(), *_docs("rbac.yaml")]:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_schemas_catch_a_misspelled_field(rayjob, jobs):
    """The checks above would fail on a typo: strict schemas reject unknown fields."""
    job = {**jobs["advshield-audit-shards"], "spec": {**jobs["advshield-audit-shards"]["spec"], "completionsMode": "Indexed"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES, strict=True)
    bad = {**rayjob, "spec": {**rayjob["spec"], "shutdownAfterJobFinish": True}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_SCHEMA)
    (container,) = _templates(rayjob)[1]["spec"]["containers"]
    with pytest.raises(kubernetes_validate.ValidationError):
        _check_pod_template({"spec": {"containers": [{**container, "resource": {}}]}})


def test_the_rayjob_runs_the_audit_on_ray_with_shards_the_workers_can_hold(rayjob):
    spec = rayjob["spec"]
    args = _audit_args(spec["entrypoint"])
    assert args.ray == "auto" and args.func.__name__ == "cmd_audit"  # joins the cluster KubeRay made
    cluster = spec["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    per_pod = int(_cpus(worker) // args.shard_cpus)
    assert per_pod >= 1 and group["replicas"] * per_pod == args.shards  # every shard has a slot at once
    assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no shard on the driver's pod
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"] for m in head["volumeMounts"]}
    assert any(args.pipeline.startswith(m + "/") for m in mounts) and any(args.out.startswith(m + "/") for m in mounts)
    assert "volumeMounts" not in worker or all(m["name"] == "shm" for m in worker["volumeMounts"])  # by content
    assert head["image"] == worker["image"] and cluster["rayVersion"] in (K8S_AUDIT / "Dockerfile").read_text()
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1  # a rerun resumes


def test_the_indexed_job_runs_each_shard_once_and_the_merge_finishes_the_audit(jobs):
    shards, merge = jobs["advshield-audit-shards"], jobs["advshield-audit-merge"]
    spec = shards["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "-c"]
    outs = []
    for index in range(spec["completions"]):  # the shell's expansion of $JOB_COMPLETION_INDEX
        script = container["args"][0].replace("$JOB_COMPLETION_INDEX", str(index))
        args = _audit_args(script.removeprefix("exec "))
        assert parse_shard(args.shard) == (index, spec["completions"])
        assert args.threads == _cpus(container)
        outs.append(args.out)
    assert len(set(outs)) == len(outs)
    (merger,) = merge["spec"]["template"]["spec"]["containers"]
    script = merger["args"][0]
    merge_cmd = script[script.index("advshield audit merge"): script.index(";")]
    words = shlex.split(merge_cmd)
    folders, out = words[3], words[words.index("--out") + 1]
    assert all(Path(o).match(folders) for o in outs)  # the glob takes every shard folder, nothing else
    finish = _audit_args(script[script.index("exec ") + 5:])
    assert finish.out == out and finish.pipeline == args.pipeline and finish.shard is None and finish.ray is None
    volumes = [{v["name"]: v["persistentVolumeClaim"]["claimName"] for v in j["spec"]["template"]["spec"]["volumes"]}
               for j in (shards, merge)]
    assert volumes[0] == volumes[1]  # the merge reads the volume the shards wrote
    (wait,) = merge["spec"]["template"]["spec"]["initContainers"]
    assert f"job/{shards['metadata']['name']}" in wait["command"] and "--for=condition=complete" in wait["command"]
    (role,) = [d for d in _docs("rbac.yaml") if d["kind"] == "Role"]
    assert role["rules"][0]["resourceNames"] == [shards["metadata"]["name"]]
    assert merge["spec"]["template"]["spec"]["serviceAccountName"] == role["metadata"]["name"]
