"""Certification over the pipeline: the command, its records, and a remote base classifier."""

import json

import numpy as np
import pytest

from advshield.attacks.certify import CertifySpec, run_certification
from advshield.cli import main
from advshield.core.errors import ConfigError


def test_certify_command_writes_records_summary_and_plot(tmp_path, pipeline_path, capsys):
    out = tmp_path / "cert"
    rc = main(["certify", str(pipeline_path), "--sigma", "0.25", "--n0", "10", "--n", "100",
               "--samples", "4", "--batch-size", "100", "--out", str(out), "--quiet"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "certify_records.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert (r["predicted"] == -1) == (r["radius"] == 0.0)
        assert r["radius"] <= 0.25 * 2.33  # n = 100, alpha = 0.001: p_lower <= 0.001**(1/100)
    summary = json.loads((out / "certify_summary.json").read_text())
    acc = summary["sigmas"]["0.25"]["certified_accuracy"]
    assert acc == sorted(acc, reverse=True)  # certified accuracy cannot grow with the radius
    assert (out / "certified_accuracy.png").stat().st_size > 1000
    assert "certified accuracy" in capsys.readouterr().out


def test_certify_spec_validation(pipeline_path):
    with pytest.raises(ConfigError, match=r"certify.models: 1 models for 2 sigmas"):
        CertifySpec(sigmas=(0.12, 0.25), models=("a.onnx",))
    with pytest.raises(ConfigError, match=r"certify.radii: must be increasing"):
        CertifySpec(radii=(0.5, 0.25))


def test_remote_certification_equals_in_process(tmp_path, pipeline_path, onnx_classifier, fashion_test):
    """Same seed, same noise: certifying through advshield's gRPC server gives the same records."""
    from server_helpers import start_server

    from advshield.plugin.client import RemoteClassifier

    spec = CertifySpec(sigmas=(0.25,), n0=10, n=100, samples=3, batch_size=50, clip=True, seed=7)
    x, y = fashion_test.as_float(0, 3), fashion_test.labels[:3]

    def local_base(sigma):
        onnx_classifier.validate = False
        return onnx_classifier

    local = run_certification(local_base, 10, x, y, spec, progress=False)["records"]
    server = start_server(pipeline_path, tmp_path / "server.log")
    try:
        remote = RemoteClassifier(server.url)
        got = run_certification(lambda s: remote, 10, x, y, spec, progress=False)["records"]
        remote.close()
    finally:
        server.stop()
        onnx_classifier.validate = True
    assert [r.predicted for r in got] == [r.predicted for r in local]
    np.testing.assert_allclose([r.radius for r in got], [r.radius for r in local], rtol=0, atol=1e-12)
