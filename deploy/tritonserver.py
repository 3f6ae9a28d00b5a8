"""A real ``tritonserver`` on this machine: the binary inside the ``nvidia-pytriton`` wheel.

The wheel (``pip install --no-deps nvidia-pytriton==0.7.0``) carries Triton 2.51 with the
ensemble scheduler and the Python backend, and one ``triton_python_backend_stub`` per Python
version; it has no onnxruntime backend (generate the repository with
``classifier_backend="python"`` for it). Used by the tests, ``advshield deploy triton --serve``
and ``benchmarks/triton.py``:

* ``find_triton()``: the binary, its backends, the stub for this interpreter, the libraries.
* ``start_triton(repository, models)``: a backend folder set up in a temp dir (the wheel's
  backends plus this Python's stub), loopback addresses on free ports, explicit model control,
  no GPU memory pools, a unique shared-memory prefix; waits until the server and the models are
  ready. The stub's Python runs from ``stub_python_bin()`` (first on PATH): this venv, or, since
  the wheel's stub garbles tensors under numpy 2, an overlay venv with numpy 1.26 that chains to
  this venv's packages (``make_stub_env``, i.e. ``advshield deploy triton-env``, once at set-up).
* ``TritonServer.stop()``: SIGTERM to that PID, wait, SIGKILL after the grace period, then
  remove the shared-memory files with its prefix from /dev/shm and the temp dir.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from advshield.core.errors import AdvshieldError

SHM_DIR = Path("/dev/shm")
INSTALL_HINT = "pip install --no-deps nvidia-pytriton==0.7.0  (the wheel that carries a tritonserver binary)"
STUB_NUMPY = "numpy==1.26.4"
STUB_ENV_VAR = "ADVSHIELD_TRITON_STUB_ENV"  # overlay venv the Python backend stub runs in (numpy < 2)


class TritonError(AdvshieldError):
    """tritonserver is missing, cannot start, or its models do not become ready."""


@dataclass(frozen=True)
class TritonInstall:
    root: Path  # .../pytriton/tritonserver
    binary: Path
    backends: Path  # the wheel's backends/ (python)
    stub: Path  # triton_python_backend_stub for this interpreter's version
    caches: Path  # response cache implementations (local)
    libs: tuple[Path, ...]  # LD_LIBRARY_PATH entries
    python_bin: Path  # put first on PATH: the stub's embedded Python takes its prefix from python3 there

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for the server: libpython + the wheel's libraries on LD_LIBRARY_PATH, and the
        stub environment's bin folder first on PATH (the stub's Python finds its packages there)."""
        env = dict(os.environ if base is None else base)
        ld = [str(p) for p in self.libs] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
        env["PATH"] = os.pathsep.join([str(self.python_bin), env.get("PATH", "")])
        env.setdefault("PYTHONNOUSERSITE", "1")
        return env


def default_stub_env() -> Path:
    return Path(os.environ.get(STUB_ENV_VAR) or Path(sys.prefix) / "triton-stub-env")


def _numpy_major(site: Path | None = None) -> int | None:
    """Major version of numpy in site-packages folder ``site`` (dist-info), or the running one's."""
    if site is None:
        import numpy

        return int(numpy.__version__.split(".")[0])
    for info in sorted(site.glob("numpy-*.dist-info")):
        return int(info.name.split("-")[1].split(".")[0])
    return None


def _site_packages(env_dir: Path) -> Path:
    return env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def stub_python_bin() -> Path:
    """The bin folder whose ``python3`` the Python backend stub starts from.

    The stub's embedded interpreter ignores PYTHONPATH; it takes its prefix (hence its
    site-packages) from the ``python3`` it finds first on PATH. And the wheel's stub (Triton 2.51)
    is compiled with a pybind11 that predates numpy 2: under numpy 2 every tensor it hands to
    Python is garbled (outputs arrive empty, BYTES inputs crash the stub while they are
    deserialized). So: with numpy < 2 in this venv, its own bin folder; else a small overlay venv
    (``$ADVSHIELD_TRITON_STUB_ENV``, default ``<venv>/triton-stub-env``, made once at set-up by
    ``advshield deploy triton-env``) with numpy 1.26 in its site-packages and a ``.pth`` that
    appends this venv's site-packages: torch, onnxruntime and advshield run unchanged on numpy 1.26."""
    if (_numpy_major() or 0) < 2:
        return Path(sys.executable).parent
    env_dir = default_stub_env()
    major = _numpy_major(_site_packages(env_dir)) if env_dir.is_dir() else None
    if major is None or major >= 2 or not (env_dir / "bin" / "python3").exists():
        raise TritonError(
            f"the Python backend stub of this tritonserver needs numpy < 2 and this venv has numpy "
            f"{_numpy_version()}: create its overlay environment once with `advshield deploy triton-env` "
            f"(a venv at {env_dir} with '{STUB_NUMPY}'; needs the package index), or point "
            f"${STUB_ENV_VAR} at one"
        )
    return env_dir / "bin"


def _numpy_version() -> str:
    import numpy

    return str(numpy.__version__)


def make_stub_env(dest: str | Path | None = None) -> Path:
    """Create the stub's overlay venv (set-up time; pip downloads numpy 1.26 unless cached):
    ``python -m venv --without-pip DEST``, numpy 1.26 into its site-packages, and a ``.pth`` that
    runs ``site.addsitedir(<this venv's site-packages>)`` (so editable installs' hooks run too)."""
    import site as site_module

    env_dir = Path(dest) if dest is not None else default_stub_env()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env_dir)], check=True)
    target = _site_packages(env_dir)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), STUB_NUMPY],
                   check=True)
    mains = [p for p in site_module.getsitepackages() if Path(p).is_dir() and Path(p).resolve() != target.resolve()]
    lines = [f"import site; site.addsitedir({p!r})" for p in mains]
    (target / "_advshield_main_venv.pth").write_text("\n".join(lines) + "\n")
    return env_dir


def find_triton() -> TritonInstall:
    """Locate the wheel's tritonserver; ``TritonError`` naming the install command when absent."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        raise TritonError(f"tritonserver not found: the nvidia-pytriton wheel is not installed ({INSTALL_HINT})")
    root = Path(spec.origin).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonError(f"tritonserver not found at {binary} ({INSTALL_HINT})")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"the wheel has no Python backend stub for Python {version} (looked for {stub})")
    libdir = sysconfig.get_config_var("LIBDIR")
    libs = tuple(p for p in (Path(libdir) if libdir else None, root.parent.parent / "nvidia_pytriton.libs")
                 if p is not None and p.is_dir())
    return TritonInstall(root, binary, root / "backends", stub, root / "caches", libs, stub_python_bin())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def clean_shm(prefix: str) -> list[Path]:
    """Remove /dev/shm entries whose name starts with ``prefix`` (the Python backend's regions)."""
    if not prefix:
        raise ValueError("clean_shm: an empty prefix would match every shared-memory file")
    removed = []
    if SHM_DIR.is_dir():
        for p in SHM_DIR.iterdir():
            if p.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def prepare_backends(install: TritonInstall, dest: Path) -> Path:
    """A backend directory: the wheel's backends with this interpreter's stub in ``python/``."""
    out = dest / "backends"
    shutil.copytree(install.backends, out, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, out / "python" / "triton_python_backend_stub")
    return out


@dataclass
class TritonServer:
    """A running tritonserver process started by ``start_triton``."""

    proc: subprocess.Popen
    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    repository: Path
    workdir: Path
    shm_prefix: str
    log_path: Path
    models: tuple[str, ...] = ()
    _log_file: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """gRPC endpoint (what tritonclient.grpc and RemoteClassifier take)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def http_status(self, path: str, timeout: float = 2.0) -> int:
        """HTTP status code of GET ``path`` (e.g. /v2/health/ready); 0 when nothing answers."""
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, OSError):
            return 0

    def metrics(self, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as r:
            return r.read().decode()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM, wait up to ``grace`` s (then SIGKILL), clean /dev/shm and the temp dir (a log
        inside it is kept when the exit status is not 0). Returns the exit status."""
        atexit.unregister(self.stop)
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            if self._log_file is not None:
                with contextlib.suppress(Exception):
                    self._log_file.close()  # type: ignore[attr-defined]
            clean_shm(self.shm_prefix)
            shutil.rmtree(self.workdir / "backends", ignore_errors=True)
            if self.proc.returncode == 0 or not self.log_path.is_relative_to(self.workdir):
                shutil.rmtree(self.workdir, ignore_errors=True)  # else its log stays for a look
        return int(self.proc.returncode)

    def wait_until_interrupted(self) -> int:
        """Serve until SIGINT/SIGTERM, then stop: the exit status (>= 0), or minus the status when
        the server exited on its own first (its log is kept)."""
        interrupted = threading.Event()
        previous = {s: signal.signal(s, lambda *_: interrupted.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not interrupted.wait(0.5):
                if not self.alive():
                    return -abs(self.stop() or 1)  # stop() still cleans up; the log is kept
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return self.stop()

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def triton_command(install: TritonInstall, repository: Path, backends: Path, *, models: Sequence[str], host: str,
                   grpc_port: int, http_port: int, metrics_port: int, shm_prefix: str,
                   cache_bytes: int = 0, extra_args: Iterable[str] = ()) -> list[str]:
    """The command line: explicit model control, loopback, CPU-only memory settings."""
    cmd = [
        str(install.binary),
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        *[f"--load-model={m}" for m in models],
        f"--backend-directory={backends}",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        "--cuda-memory-pool-byte-size=0:0",
        "--strict-readiness=true",
        "--exit-timeout-secs=10",
        "--log-info=true",
    ]
    if cache_bytes > 0:
        cmd += [f"--cache-directory={install.caches}", f"--cache-config=local,size={int(cache_bytes)}"]
    return cmd + list(extra_args)


def start_triton(repository: str | Path, models: Sequence[str], *, host: str = "127.0.0.1",
                 grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0, log_path: str | Path | None = None,
                 threads: int = 1, cache_bytes: int = 0, timeout: float = 120.0, extra_args: Iterable[str] = (),
                 env: Mapping[str, str] | None = None, attempts: int = 3) -> TritonServer:
    """Start tritonserver on ``repository`` with ``models`` loaded; return once the server and the
    models are ready. Port 0: a free port (chosen here; a start that loses the race for it is retried
    with new ports up to ``attempts`` times). ``threads``: OMP/torch/ONNX Runtime threads inside
    the Python backend models. ``cache_bytes`` > 0 enables the local response cache."""
    install = find_triton()
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise TritonError(f"model repository not found: {repository}")
    missing = [m for m in models if not (repository / m / "config.pbtxt").is_file()]
    if missing:
        raise TritonError(f"{repository}: no config.pbtxt for models {missing}")
    workdir = Path(tempfile.mkdtemp(prefix="advshield-triton-"))
    log_file_path = Path(log_path) if log_path else workdir / "tritonserver.log"
    run_env = install.env(env)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ADVSHIELD_THREADS"):
        run_env[var] = str(threads)
    last_error = ""
    for _ in range(max(1, attempts)):
        ports = [p or free_port(host) for p in (grpc_port, http_port, metrics_port)]
        prefix = f"advshield_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        workdir.mkdir(parents=True, exist_ok=True)
        backends = workdir / "backends" if (workdir / "backends").is_dir() else prepare_backends(install, workdir)
        cmd = triton_command(install, repository, backends, models=models, host=host, grpc_port=ports[0],
                             http_port=ports[1], metrics_port=ports[2], shm_prefix=prefix,
                             cache_bytes=cache_bytes, extra_args=extra_args)
        log_file = open(log_file_path, "w")  # noqa: SIM115 - owned by the server object
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=run_env, cwd=workdir,
                                start_new_session=True)
        server = TritonServer(proc, host, ports[0], ports[1], ports[2], repository, workdir, prefix,
                              log_file_path, tuple(models), log_file)
        atexit.register(server.stop)  # never leave a server behind when the caller dies
        try:
            wait_ready(server, models, timeout)
            return server
        except TritonError as e:
            text = server.log()
            server.stop(grace=10)
            last_error = str(e)
            if "address already in use" not in text.lower() or any((grpc_port, http_port, metrics_port)):
                break
    shutil.rmtree(workdir, ignore_errors=True)
    raise TritonError(last_error)


def wait_ready(server: TritonServer, models: Sequence[str], timeout: float) -> None:
    """Poll /v2/health/ready and each model's /ready over HTTP until all answer 200."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if not server.alive():
            raise TritonError(f"tritonserver exited with status {server.proc.returncode} while starting:\n"
                              f"{_tail(server.log())}")
        if server.http_status("/v2/health/ready") == 200 and all(
                server.http_status(f"/v2/models/{m}/ready") == 200 for m in models):
            return
        time.sleep(0.1)
    raise TritonError(f"tritonserver not ready after {timeout:g} s:\n{_tail(server.log())}")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
