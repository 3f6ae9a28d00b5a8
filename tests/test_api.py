"""The public Python API: the README's example runs as written, and the API equals the CLI."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import advshield
from advshield.core import progress as P

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### The Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's API section has no python example"
    return match.group(1)


def test_the_readme_api_example_runs(tmp_path):
    code = readme_example()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    said = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}
    assert float(said["threshold"][0]) > 0  # the detector's threshold
    assert len(said["labels"]) >= 8 and "flagged" in said["labels"]
    assert 0.5 < float(said["clean"][0]) <= 1.0
    assert said["gate"][0] in ("True", "False") and Path(ROOT, said["gate"][2]).is_file()
    assert said["certified"][0].startswith("[")


def test_top_level_names_are_the_api():
    for name in ("load_pipeline", "fit", "audit", "certify", "predict", "serve", "deploy_triton", "info", "train"):
        assert callable(getattr(advshield, name)), name
    assert advshield.AuditResult.__name__ == "AuditResult"
    try:
        advshield.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("unknown attribute did not raise")


def test_progress_bars_in_a_log_file_are_few_plain_lines():
    """Not on a terminal, a bar of 5,000 steps writes a handful of lines and no carriage returns."""
    log = io.StringIO()
    for _ in P.progress(range(5000), desc="stage", file=log):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and "5000/5000" in lines[-1] and lines[-1].startswith("stage")


def test_progress_bars_disabled_write_nothing():
    log = io.StringIO()
    for _ in P.progress(range(10), enabled=False, file=log):
        pass
    assert log.getvalue() == ""


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_stay_bars():
    term = _Tty()
    for _ in P.progress(range(3), desc="x", file=term, mininterval=0):
        pass
    assert "\r" in term.getvalue()
