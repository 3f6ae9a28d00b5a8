"""The main job end to end on small settings (slow: it trains a noise model for one epoch)."""

import json
import shutil

import pytest

from advshield.cli import main


@pytest.mark.slow
def test_demo_main_job(tmp_path, model_path, surrogate_path, capsys):
    for p in (model_path, surrogate_path):
        shutil.copy(p, tmp_path / p.name)
    rc = main(["demo", "--workdir", str(tmp_path), "--reuse", "--samples", "10", "--certify-samples", "5",
               "--noise-epochs", "1"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["score"]["accuracy"] >= 0.9
    assert summary["audit"]["gate"] in ("pass", "fail")
    report = (tmp_path / "audit" / "report.md").read_text()
    assert "## Distortion budget" in report and "## Gate" in report
    assert "advshield serve" in capsys.readouterr().out
