"""Black-box attacks, measured side by side in one run.

1. Our Square (``advshield.attacks.square``) against torchattacks' Square at equal query budgets,
   on the same model (the reference CNN's differentiable twin, answers only) and the same
   correctly classified Fashion-MNIST test images: success rate after every example is clipped,
   rounded to 8 bits and re-scored (as the audit judges), the share of its queries each spent,
   and wall time. torchattacks does not round its queries to the grid: its success is given
   before and after rounding.
2. Queries per second through gRPC (a live ``advshield serve`` of the shipped undefended
   pipeline, started by this script on a free loopback port) against in process
   (``DefendedClassifier``), with our Square on the same images and budget: the ratio is what the
   wire costs a black-box audit.

torchattacks is installed for this benchmark only (``pip install --no-deps torchattacks``); the
script says so and stops when it is missing. Run it on a quiet machine and give the load average:

    python benchmarks/blackbox.py [--n 100] [--queries 1000] [--threads 1] [--json runs/bench/blackbox.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# triton.py in this folder would shadow the `triton` package torch._dynamo probes: keep it off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from advshield.attacks.oracle import Oracle  # noqa: E402
from advshield.attacks.square import square  # noqa: E402
from advshield.attacks.threat import ThreatModel, check_adversarial  # noqa: E402
from advshield.core.data import load_fashion_mnist  # noqa: E402
from advshield.plugin.classifiers import TwinClassifier  # noqa: E402
from advshield.plugin.client import RemoteClassifier  # noqa: E402
from advshield.plugin.config import load_pipeline  # noqa: E402
from advshield.plugin.pipeline import DefendedClassifier, Prediction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "advshield" / "models" / "fashion_cnn.onnx"
PIPELINE = ROOT / "advshield" / "pipelines" / "fashion_mnist.toml"
BUDGETS = [("linf", 8 / 255), ("linf", 13 / 255), ("l2", 1.0)]


class Answers:
    """The twin as a serving path: probabilities and labels, no gradients."""

    random = False

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def predict(self, x: torch.Tensor, seed: int | None = None) -> Prediction:
        p = torch.softmax(self.model(torch.as_tensor(x)), 1).numpy()
        return Prediction(p.argmax(1).astype(np.int64), p)


def judged(model, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, norm: str, eps: float, levels: int) -> float:
    checked = check_adversarial(x, adv, ThreatModel(norm=norm, eps=eps, levels=levels))  # type: ignore[arg-type]
    with torch.no_grad():
        pred = model(checked.adversarial).argmax(1)
    return float(((pred != y) & checked.valid).float().mean())


def versus_torchattacks(model, x, y, queries: int, seed: int) -> list[dict]:
    import torchattacks

    rows = []
    for norm, eps in BUDGETS:
        o = Oracle(Answers(model), len(x), seed=seed)
        t0 = time.perf_counter()
        ours = square(o, x, y, eps=eps, norm=norm, queries=queries, seed=seed)
        t_ours = time.perf_counter() - t0
        ta = torchattacks.Square(model, norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=queries,
                                 n_restarts=1, p_init=0.8, loss="margin", resc_schedule=True, seed=seed)
        t0 = time.perf_counter()
        theirs = ta(x, y)
        t_theirs = time.perf_counter() - t0
        rows.append({
            "norm": norm, "eps": eps, "queries": queries,
            "ours_success": judged(model, x, y, ours, norm, eps, 256),
            "ours_median_queries": float(np.median(o.queries)),
            "ours_seconds": t_ours,
            "torchattacks_success_rounded": judged(model, x, y, theirs, norm, eps, 256),
            "torchattacks_success_float": judged(model, x, y, theirs, norm, eps, 0),
            "torchattacks_seconds": t_theirs,
        })
        r = rows[-1]
        print(f"{norm} eps={eps:.4f} queries={queries}: ours {r['ours_success']:.1%} in {t_ours:.1f} s "
              f"(median {r['ours_median_queries']:.0f} queries) | torchattacks {r['torchattacks_success_rounded']:.1%} "
              f"rounded, {r['torchattacks_success_float']:.1%} unrounded, in {t_theirs:.1f} s | "
              f"time ratio ours/theirs {t_ours / t_theirs:.2f}", flush=True)
    return rows


def start_serve(log: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    out = open(log, "w")  # noqa: SIM115 - owned by the subprocess
    proc = subprocess.Popen([sys.executable, "-m", "advshield", "serve", str(PIPELINE), "--port", "0",
                             "--max-batch-size", "256", "--threads", str(threads), "--no-request-log"],
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end:
        port = None
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                port = rec.get("port", port) if rec.get("event") == "listening" else port
                if rec.get("event") == "ready" and port:
                    return proc, f"127.0.0.1:{port}"
        if proc.poll() is not None:
            raise SystemExit(f"advshield serve exited:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"advshield serve not ready after 120 s:\n{log.read_text()}")


def wire_cost(x, y, queries: int, seed: int, threads: int) -> dict:
    local = DefendedClassifier.from_config(load_pipeline(PIPELINE))
    norm, eps = "linf", 8 / 255
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_serve(Path(tmp) / "serve.log", threads)
        try:
            with RemoteClassifier(url) as remote:
                out = {}
                for name, scorer in (("in process", local), ("grpc", remote)):
                    o = Oracle(scorer, len(x), seed=seed)
                    t0 = time.perf_counter()
                    square(o, x, y, eps=eps, norm=norm, queries=queries, seed=seed)
                    dt = time.perf_counter() - t0
                    out[name] = {"queries": int(o.queries.sum()), "seconds": dt, "queries_per_second": o.queries.sum() / dt}
                    print(f"Square linf 8/255 {name}: {o.queries.sum()} queries in {dt:.1f} s = "
                          f"{o.queries.sum() / dt:.0f} queries/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    out["ratio_grpc_over_in_process"] = out["grpc"]["queries_per_second"] / out["in process"]["queries_per_second"]
    print(f"queries/s through gRPC / in process: {out['ratio_grpc_over_in_process']:.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="correctly classified test images")
    ap.add_argument("--queries", type=int, default=1000, help="query budget per image")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if importlib.util.find_spec("torchattacks") is None:
        raise SystemExit("torchattacks is not installed: pip install --no-deps torchattacks (for this benchmark only)")
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}; torch threads {args.threads}", flush=True)
    data = load_fashion_mnist("test")
    model = TwinClassifier(MODEL, validate=False, device="cpu")
    x_all = torch.from_numpy(data.as_float(0, 4 * args.n))
    y_all = torch.from_numpy(np.asarray(data.labels[: 4 * args.n], np.int64))
    with torch.no_grad():
        ok = (model(x_all).argmax(1) == y_all).nonzero().flatten()[: args.n]
    x, y = x_all[ok], y_all[ok]
    result = {"images": len(x), "load_average": os.getloadavg(),
              "versus_torchattacks": versus_torchattacks(model, x, y, args.queries, args.seed),
              "wire": wire_cost(x, y, args.queries, args.seed, args.threads)}
    result["load_average_after"] = os.getloadavg()
    print(f"load average after {result['load_average_after']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
