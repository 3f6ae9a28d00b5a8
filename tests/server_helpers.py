"""Helpers for the server tests: start ``advshield serve`` in a subprocess and talk raw KServe v2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from advshield.plugin import protocol as P


@dataclass
class RunningServer:
    proc: subprocess.Popen
    port: int
    metrics_port: int | None
    log_path: Path
    token: str | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str] | None:
        return {P.AUTH_HEADER: f"Bearer {self.token}"} if self.token else None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((P.AUTH_HEADER, f"Bearer {self.token}"),) if self.token else ()

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(pipeline: Path, log_path: Path, *args: str, token: str | None = None,
                 timeout: float = 90.0) -> RunningServer:
    """``python -m advshield serve PIPELINE --port 0 ...``; waits for its 'ready' log line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if token:
        env["ADVSHIELD_TOKEN"] = token
    log = open(log_path, "w")  # noqa: SIM115 - owned by the subprocess for its lifetime
    proc = subprocess.Popen([sys.executable, "-m", "advshield", "serve", str(pipeline), "--port", "0", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    t_end = time.monotonic() + timeout
    port = metrics_port = None
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if rec.get("event") == "listening":
                port, metrics_port = rec["port"], rec.get("metrics_port")
            if rec.get("event") == "ready" and port:
                return RunningServer(proc, port, metrics_port, log_path, token)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout} s:\n{log_path.read_text()}")


def raw_request(model: str, inputs: list[tuple[str, str, list[int], bytes | None]], *, outputs=(),
                version: str = "", parameters: dict | None = None) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest built by hand (for malformed requests tritonclient would refuse)."""
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    raws = []
    for name, datatype, shape, raw in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        raws.append(raw)
    if any(r is not None for r in raws):
        req.raw_input_contents.extend([r or b"" for r in raws])
    for name in outputs:
        req.outputs.add(name=name)
    for k, v in (parameters or {}).items():
        if isinstance(v, str):
            req.parameters[k].string_param = v
        elif isinstance(v, bool):
            req.parameters[k].bool_param = v
        elif isinstance(v, int):
            req.parameters[k].int64_param = v
        else:
            req.parameters[k].double_param = v
    return req


def image_tensor(images: list[bytes]) -> bytes:
    return P.serialize_bytes(images)


def stub(url: str) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    ch = grpc.insecure_channel(url, options=[("grpc.max_send_message_length", 64 << 20)])
    return ch, service_pb2_grpc.GRPCInferenceServiceStub(ch)


def call(stub_, request, metadata=(), timeout: float = 30.0):
    """(code, message, response or None)."""
    try:
        resp = stub_.ModelInfer(request, metadata=metadata, timeout=timeout)
        return grpc.StatusCode.OK, "", resp
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def outputs_of(resp) -> dict[str, np.ndarray]:
    out = {}
    for t, raw in zip(resp.outputs, resp.raw_output_contents):
        dtype = P.DATATYPES[t.datatype][0]
        out[t.name] = np.frombuffer(raw, dtype=dtype).reshape(list(t.shape))
    return out
