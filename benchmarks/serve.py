"""Load test of the scoring endpoint: advshield's own gRPC server (and Triton serving the same
pipeline, when given) under concurrent tritonclient clients, each level a fixed number of seconds.

Per server and concurrency level: throughput (images/s, requests/s), p50/p99 latency, errors by
status code, and the resident memory of the server's process tree over time; the in-process
``predict`` rate as the floor the server's overhead is measured against; with Triton, the
advshield/Triton ratios.

    python benchmarks/serve.py [--pipeline advshield/pipelines/fashion_mnist.toml]
        [--concurrency 1,4,16,64] [--seconds 5] [--images-per-request 1] [--input image|pixels]
        [--bad 0.2] [--client aio|tritonclient] [--max-batch-size 64] [--max-queue-delay-ms 2]
        [--threads 1] [--triton | --triton-url HOST:PORT [--triton-model NAME]] [--out results.json]

The load generator (``--client aio``, the default) is one asyncio gRPC connection per 8 clients with
every request serialized before the clock starts, so that it takes as little of the machine as it
can; its own CPU use is measured (``getrusage``) and printed as cores beside each row.
``--bad F``: that share of the requests is malformed (a corrupt PNG, a truncated JPEG, a wrong
dtype, a bad seed), each must come back INVALID_ARGUMENT; throughput counts good images only, and
any good request that fails or bad request that does not get INVALID_ARGUMENT is counted as wrong.

Triton: ``--triton`` generates the pipeline's Triton repository (``advshield.deploy.triton``,
Python-backend classifier: the wheel's tritonserver has no onnxruntime backend) and starts the
``nvidia-pytriton`` wheel's tritonserver with the same thread count; ``--triton-url`` measures a
Triton already serving the same pipeline. Without either, the Triton rows are not measured.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from advshield.core.data import load_fashion_mnist
from advshield.plugin import protocol as P
from advshield.plugin.decode import encode_png

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = ROOT / "advshield" / "pipelines" / "fashion_mnist.toml"


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in children.read_text().split())
    return out


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` and its descendants (Triton's Python-backend stubs are children)."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024 if total else None


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (0 when unknown)."""
    if pid is None:
        return 0.0
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for p in _descendants(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def start_advshield(args, log_path: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "advshield", "serve", args.pipeline, "--port", "0", "--no-request-log",
           "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
           "--threads", str(args.threads), "--workers", str(args.workers), "--max-inflight", str(max(64, 2 * max(args.concurrency)))]
    log = open(log_path, "w")  # noqa: SIM115 - the server's log for its lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    port, t_end = None, time.monotonic() + 120
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise SystemExit(f"advshield serve exited with {proc.returncode}:\n{log_path.read_text()}")
        ready = 0
        for line in log_path.read_text().splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                port = rec["port"] if rec.get("event") == "listening" else port
                ready += rec.get("event") == "ready"
                if ready >= args.workers and port:
                    return proc, port
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("advshield serve did not become ready in 120 s")


def make_inputs(kind: str, images: list[bytes], pixels: np.ndarray, k: int, n: int):
    import tritonclient.grpc as grpcclient

    idx = [(k * n + j) % len(images) for j in range(n)]
    if kind == "image":
        data = np.empty((n, 1), dtype=np.object_)
        for j, i in enumerate(idx):
            data[j, 0] = images[i]
        inp = grpcclient.InferInput(P.INPUT_IMAGE, [n, 1], "BYTES")
    else:
        data = np.ascontiguousarray(pixels[idx])
        inp = grpcclient.InferInput(P.INPUT_PIXELS, list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return [inp]


def load_level(url: str, model: str, concurrency: int, seconds: float, args, images, pixels, pid: int | None) -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: collections.Counter = collections.Counter()
    lock = threading.Lock()
    memory: list[tuple[float, float]] = []
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def worker(w: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        outputs = [grpcclient.InferRequestedOutput(n) for n in P.OUTPUTS]
        prepared = [make_inputs(args.input, images, pixels, w * 64 + k, args.images_per_request) for k in range(16)]
        client.infer(model, prepared[0], outputs=outputs)  # warm-up, connection set up
        start.wait()
        k = 0
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                client.infer(model, prepared[k % len(prepared)], outputs=outputs, client_timeout=30)
                latencies[w].append(time.perf_counter() - t0)
            except InferenceServerException as e:
                with lock:
                    errors[str(e.status()).removeprefix("StatusCode.")] += 1
            k += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 1e9  # workers start the clock together
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    while time.perf_counter() < stop_at[0]:
        if pid is not None and (m := rss_mb(pid)) is not None:
            memory.append((round(time.perf_counter() - t0, 2), round(m, 1)))
        time.sleep(min(0.5, max(0.0, stop_at[0] - time.perf_counter())))
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.zeros(0)
    requests = len(lat)
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 2),
        "requests": requests,
        "requests_per_s": requests / wall,
        "images_per_s": requests * args.images_per_request / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000) if requests else None,
        "p99_ms": float(np.percentile(lat, 99) * 1000) if requests else None,
        "errors": dict(errors),
        "memory_mb": memory,
    }


def _bad_requests(model: str, images: list[bytes], pixels: np.ndarray, n: int) -> list:
    """Malformed requests of ``n`` images, each of which must be INVALID_ARGUMENT."""
    import io

    from PIL import Image
    from tritonclient.grpc import service_pb2

    def req(name, datatype, shape, raw, **params):
        r = service_pb2.ModelInferRequest(model_name=model)
        r.inputs.add(name=name, datatype=datatype, shape=shape)
        r.raw_input_contents.append(raw)
        for k, v in params.items():
            r.parameters[k].string_param = v
        return r

    buf = io.BytesIO()
    Image.fromarray((pixels[0, 0] * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    corrupt = images[0][:40] + b"\0" * 60
    cut = jpeg[: len(jpeg) * 2 // 3] + b"\xff\xd9"
    shape = [n, *pixels.shape[1:]]
    return [
        req(P.INPUT_IMAGE, "BYTES", [n, 1], P.serialize_bytes([corrupt] * n)),
        req(P.INPUT_IMAGE, "BYTES", [n, 1], P.serialize_bytes([cut] * n)),
        req(P.INPUT_PIXELS, "FP64", shape, np.zeros(shape, np.float64).tobytes()),
        req(P.INPUT_PIXELS, "FP32", shape, np.ascontiguousarray(pixels[:n]).tobytes(), seed="\u00b2"),
    ]


def _good_requests(model: str, kind: str, images: list[bytes], pixels: np.ndarray, k: int, n: int) -> list:
    from tritonclient.grpc import service_pb2

    out = []
    for j in range(16):
        idx = [((k * 16 + j) * n + i) % len(images) for i in range(n)]
        r = service_pb2.ModelInferRequest(model_name=model)
        if kind == "image":
            r.inputs.add(name=P.INPUT_IMAGE, datatype="BYTES", shape=[n, 1])
            r.raw_input_contents.append(P.serialize_bytes([images[i] for i in idx]))
        else:
            r.inputs.add(name=P.INPUT_PIXELS, datatype="FP32", shape=[n, *pixels.shape[1:]])
            r.raw_input_contents.append(np.ascontiguousarray(pixels[idx]).tobytes())
        out.append(r.SerializeToString())
    return out


def load_level_aio(url: str, model: str, concurrency: int, seconds: float, args, images, pixels, pid: int | None) -> dict:
    """``concurrency`` clients, each with one request in flight at a time, on asyncio gRPC
    connections (8 clients a connection) in this process; requests serialized in advance."""
    import asyncio
    import resource

    import grpc

    n = args.images_per_request
    good = {w: _good_requests(model, args.input, images, pixels, w, n) for w in range(concurrency)}
    bad = [r.SerializeToString() for r in _bad_requests(model, images, pixels, n)]
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    errors: collections.Counter = collections.Counter()
    wrong = [0]
    memory: list[tuple[float, float]] = []
    method = "/inference.GRPCInferenceService/ModelInfer"

    async def run() -> tuple[float, float]:
        # a connection of its own per channel (gRPC shares one between channels to the same
        # target by default): the kernel spreads connections over serve.workers
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(url, options=options) for _ in range((concurrency + 7) // 8)]
        calls = [ch.unary_unary(method, request_serializer=None, response_deserializer=None) for ch in channels]
        per = max(1, -(-concurrency // len(channels)))
        for c in calls:
            await c(good[0][0], timeout=60)  # connections set up, model warm
        stop_at = [0.0]
        is_bad = rng.random((concurrency, 4096)) < args.bad

        async def client(w: int) -> None:
            call, k = calls[w // per], 0
            while time.perf_counter() < stop_at[0]:
                b = bool(is_bad[w, k % 4096])
                payload = bad[k % len(bad)] if b else good[w][k % 16]
                t0 = time.perf_counter()
                try:
                    await call(payload, timeout=30)
                    if b:
                        wrong[0] += 1
                    else:
                        latencies.append(time.perf_counter() - t0)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] += 1
                    if not b or e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        wrong[0] += 1
                k += 1

        async def sample_memory() -> None:
            t0 = time.perf_counter()
            while time.perf_counter() < stop_at[0]:
                if pid is not None and (m := rss_mb(pid)) is not None:
                    memory.append((round(time.perf_counter() - t0, 2), round(m, 1)))
                await asyncio.sleep(0.5)

        r0, s0, t0 = resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(pid), time.perf_counter()
        stop_at[0] = t0 + seconds
        await asyncio.gather(sample_memory(), *(client(w) for w in range(concurrency)))
        wall, r1, s1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF), cpu_seconds(pid)
        for ch in channels:
            await ch.close()
        return wall, (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / wall, (s1 - s0) / wall

    wall, client_cores, server_cores = asyncio.run(run())
    lat = np.asarray(latencies)
    requests = len(lat)
    return {
        "concurrency": concurrency,
        "seconds": round(wall, 2),
        "requests": requests,
        "requests_per_s": requests / wall,
        "images_per_s": requests * n / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1000) if requests else None,
        "p99_ms": float(np.percentile(lat, 99) * 1000) if requests else None,
        "errors": dict(errors),
        "wrong": wrong[0],
        "client_cores": round(client_cores, 2),
        "server_cores": round(server_cores, 2) if pid is not None else None,
        "memory_mb": memory,
    }


def in_process_rate(pipeline: str, pixels: np.ndarray, batch: int, seconds: float, threads: int) -> float:
    import torch

    from advshield.plugin.pipeline import DefendedClassifier

    torch.set_num_threads(threads)
    os.environ["ADVSHIELD_THREADS"] = str(threads)
    clf = DefendedClassifier.from_config(pipeline)
    x = torch.from_numpy(pixels[:batch])
    clf.predict(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        clf.predict(x)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def run_server(name: str, url: str, model: str, pid: int | None, args, images, pixels) -> list[dict]:
    rows = []
    level = load_level_aio if args.client == "aio" else load_level
    for c in args.concurrency:
        r = level(url, model, c, args.seconds, args, images, pixels, pid)
        r["server"] = name
        r["of_floor"] = r["images_per_s"] / args.floor
        rows.append(r)
        mem = r["memory_mb"]
        mem_s = f"{mem[0][1]:.0f}->{mem[-1][1]:.0f} MB (peak {max(m for _, m in mem):.0f})" if mem else "n/a"
        p50 = f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "-"
        print(f"{name:<10} {c:>5} {r['images_per_s']:>10.0f} {r['of_floor']:>8.2f} {r['requests_per_s']:>9.0f} {p50:>9} "
              f"{p99:>9} {sum(r['errors'].values()):>6} {r.get('wrong', 0):>6} {r.get('client_cores', float('nan')):>7.2f} "
              f"{r.get('server_cores') or float('nan'):>7.2f}  "
              f"{mem_s}", flush=True)
    return rows


def run_generated_triton(args, cfg, images, pixels) -> list[dict]:
    """Generate the pipeline's Triton repository in a temp dir, serve it, load-test it."""
    import tempfile

    try:
        from advshield.deploy.triton import generate_repository, serve_repository

        with tempfile.TemporaryDirectory(prefix="advshield-bench-triton-") as tmp:
            repo = generate_repository(cfg, Path(tmp) / "repo", classifier_backend="python",
                                       max_batch_size=args.max_batch_size,
                                       max_queue_delay_us=int(args.max_queue_delay_ms * 1000), threads=args.threads)
            server = serve_repository(repo, threads=args.threads)
            try:
                return run_server("triton", server.url, cfg.pipeline.name, server.pid, args, images, pixels)
            finally:
                server.stop()
    except Exception as e:  # the Triton side is optional: report why it was not measured
        print(f"\ntriton: not measured ({type(e).__name__}: {e})")
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=str(DEFAULT_PIPELINE))
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each level (default: %(default)s)")
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--input", choices=["image", "pixels"], default="image", help="IMAGE (PNG bytes) or PIXELS")
    ap.add_argument("--bad", type=float, default=0.0, help="share of malformed requests (default: %(default)s)")
    ap.add_argument("--client", choices=["aio", "tritonclient"], default="aio",
                    help="load generator: pre-serialized asyncio gRPC (light) or tritonclient threads")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="server torch/ONNX Runtime threads (per worker)")
    ap.add_argument("--workers", type=int, default=1, help="advshield serve worker processes (default: %(default)s)")
    ap.add_argument("--triton", action="store_true", help="generate the Triton repository and start tritonserver")
    ap.add_argument("--triton-url", default=None, help="HOST:PORT of Triton serving the same pipeline")
    ap.add_argument("--triton-model", default=None, help="model name on Triton (default: the pipeline's name)")
    ap.add_argument("--out", default=None, help="write all numbers to this JSON file")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    from advshield.plugin.config import load_pipeline

    cfg = load_pipeline(args.pipeline)
    test = load_fashion_mnist("test")
    pixels = test.as_float(0, 512)
    images = [encode_png(a) for a in pixels]
    print(f"pipeline {cfg.pipeline.name} ({args.pipeline}); input {args.input}, {args.images_per_request} image(s) "
          f"per request; {args.seconds:g} s per level; server threads {args.threads}, max_batch_size "
          f"{args.max_batch_size}, max_queue_delay_ms {args.max_queue_delay_ms:g}; {os.cpu_count()} CPU cores "
          f"shared by server and clients")
    floor = {b: in_process_rate(args.pipeline, pixels, b, 2.0, args.threads) for b in (1, args.max_batch_size)}
    args.floor = floor[args.max_batch_size]
    print(f"in-process DefendedClassifier.predict: {floor[1]:.0f} images/s at batch 1, "
          f"{floor[args.max_batch_size]:.0f} images/s at batch {args.max_batch_size} (the floor)")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print(f"{'server':<10} {'conc':>5} {'images/s':>10} {'/floor':>8} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'errors':>6} {'wrong':>6} {'client':>7} {'server':>7}  memory (RSS)")
    print(f"{'':<10} {'':>5} {'(good)':>10} {'':>8} {'(good)':>9} {'':>9} {'':>9} {'(bad)':>6} {'':>6} {'cores':>7} {'cores':>7}")
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"advshield-bench-serve-{os.getpid()}.log"
    proc, port = start_advshield(args, log_path)
    try:
        rows = run_server("advshield", f"127.0.0.1:{port}", cfg.pipeline.name, proc.pid, args, images, pixels)
    finally:
        proc.terminate()
        proc.wait(30)
        log_path.unlink(missing_ok=True)
    triton_rows: list[dict] = []
    if args.triton and not args.triton_url:
        triton_rows = run_generated_triton(args, cfg, images, pixels)
    elif args.triton_url:
        triton_rows = run_server("triton", args.triton_url, args.triton_model or cfg.pipeline.name, None, args,
                                 images, pixels)
    if triton_rows:
        print("\nadvshield / Triton:")
        for a, t in zip(rows, triton_rows):
            ratio = a["images_per_s"] / t["images_per_s"] if t["images_per_s"] else float("nan")
            p99 = (a["p99_ms"] / t["p99_ms"]) if a["p99_ms"] and t["p99_ms"] else float("nan")
            print(f"  concurrency {a['concurrency']:>3}: throughput x{ratio:.2f}, p99 latency x{p99:.2f}")
    elif not args.triton:
        print("\ntriton: not measured (pass --triton to generate and start it, or --triton-url HOST:PORT)")
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.out:
        Path(args.out).write_text(json.dumps({"in_process_images_per_s": floor, "advshield": rows, "triton": triton_rows},
                                             indent=2))
        print(f"numbers in {args.out}")


if __name__ == "__main__":
    main()
