"""The installed distribution exposes only the `advshield` namespace, and the console command works."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import advshield


def _top_level_names(dist) -> set[str]:
    names = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info")) or parts[0] in ("..", "bin"):
            continue
        if parts[0].startswith("__editable__"):
            # editable install: the finder's mapping names the top-level packages
            src = Path(str(dist.locate_file(f))).read_text() if str(f).endswith(".py") else ""
            for line in src.splitlines():
                if line.startswith("MAPPING"):
                    names |= {k.split(".")[0] for k in eval(line.split("=", 1)[1])}  # literal dict
            continue
        if parts[0].endswith(".pth") or parts[0] == "__pycache__":
            continue
        names.add(parts[0].removesuffix(".py"))
    return names


def test_distribution_exposes_only_advshield():
    import site

    # the installed distribution (site-packages), not an egg-info a build may leave in the checkout
    (dist,) = importlib.metadata.distributions(name="advshield", path=site.getsitepackages())
    names = _top_level_names(dist)
    assert names == {"advshield"}, names
    for sub in ("plugin", "defenses", "attacks", "deploy"):
        mod = __import__(f"advshield.{sub}", fromlist=["x"])
        assert mod.__name__ == f"advshield.{sub}"


def test_wheel_contains_only_the_advshield_namespace(tmp_path):
    """What `pip install .` installs: build the wheel and list its top-level entries."""
    import shutil
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                            "__pycache__", ".*_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("advshield-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"advshield"}, tops
    for sub in ("plugin", "defenses", "attacks", "deploy", "commands"):
        assert f"advshield/{sub}/__init__.py" in names
    assert "advshield/models/fashion_cnn.onnx" in names
    assert "advshield/pipelines/fashion_mnist.toml" in names


def test_generic_names_are_not_importable_top_level():
    code = "import importlib.util,sys; sys.exit(any(importlib.util.find_spec(n) for n in ('plugin','defenses','attacks','deploy')))"
    # run from a neutral folder so the repository root is not on sys.path
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_console_command():
    out = subprocess.run(["advshield", "--version"], capture_output=True, text=True, check=True,
                         env={"PATH": str(Path(sys.executable).parent)})
    assert out.stdout.strip() == f"advshield {advshield.__version__}"


def _torch_pin() -> str:
    """The torch the set-up promises: what `make setup` wrote into the venv's constraints file, else
    the Makefile's TORCH_SPEC default."""
    root = Path(__file__).resolve().parent.parent
    constraints = Path(sys.prefix) / "constraints.txt"
    if constraints.is_file():
        return constraints.read_text().strip()
    for line in (root / "Makefile").read_text().splitlines():
        if line.startswith("TORCH_SPEC"):
            return line.split("=", 1)[1].strip().lstrip("=").strip()
    raise AssertionError("no TORCH_SPEC in the Makefile")


def test_installed_torch_is_the_pinned_build():
    """`pip install -e .[test]` must not replace the pinned CPU torch (onnx2torch pulls torchvision,
    whose newest release pins a newer CUDA torch): the installed torch is the pin, and no NVIDIA
    CUDA wheels came along with a CPU pin."""
    spec = _torch_pin()
    assert spec.startswith("torch"), spec
    if "==" not in spec:
        return  # an unpinned TORCH_SPEC elsewhere (make TORCH_SPEC=torch ...): nothing promised
    want = spec.split("==", 1)[1]
    have = importlib.metadata.version("torch")
    assert have == want, f"installed torch {have}, the set-up pins {spec}"
    if want.endswith("+cpu"):
        cuda = sorted(d.metadata["Name"] for d in importlib.metadata.distributions()
                      if (d.metadata["Name"] or "").lower().startswith("nvidia-") and "pytriton" not in d.metadata["Name"].lower())
        assert not cuda, f"CUDA wheels installed next to a CPU torch: {cuda}"
