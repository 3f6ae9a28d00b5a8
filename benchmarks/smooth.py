"""Smooth adversarial examples (thesis ch. 4, Table 4.1): the six attacks side by side.

FGSM and I-FGSM (L-inf) and PGD2 / qPGD2 (L2) are *budget* attacks: as in the thesis (Figure 4.5:
"PGD2 and qPGD2 are tested with target distortion D in [1, 6]") each runs over a grid of budgets
and a sample's distortion is the L2 norm of its example at the smallest budget that broke it.
C&W and sC&W are minimal attacks (5 x 20 steps, the audit's default; sC&W also at alpha = 0.99);
qPGD2 also as the minimal
bisection ``qpgd2``; DDN as the reference. Every example is rounded to 8 bits and re-scored.
Columns: P_suc and D-bar over the correct images, the median L2 of the broken ones, and the
*flat variation* of the perturbation: over pixel pairs where the clean image is flat, the mean
|r_i - r_j| over the mean |r| (1.4 for white noise; lower is smoother).

    python benchmarks/smooth.py [--n 100] [--dataset fashion-mnist|mnist-5k|both] [--threads 1]
                                [--json runs/bench/smooth.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from advshield.attacks import metrics as M  # noqa: E402
from advshield.attacks.carlini_wagner import cw_l2  # noqa: E402
from advshield.attacks.decoupled_direction_norm import ddn  # noqa: E402
from advshield.attacks.gradient import bim, fgsm, pgd  # noqa: E402
from advshield.attacks.laplacian import LaplacianSmoother, SmoothingConfig  # noqa: E402
from advshield.attacks.smooth import qpgd2, qpgd_l2, scw_l2  # noqa: E402
from advshield.attacks.threat import ThreatModel, check_adversarial  # noqa: E402
from advshield.core.data import load_fashion_mnist  # noqa: E402
from advshield.plugin.classifiers import TwinClassifier  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "advshield" / "models" / "fashion_cnn.onnx"
LINF_GRID = tuple(k / 255 for k in (2, 4, 8, 13, 26, 38, 51, 77))
L2_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def flat_variation(x: torch.Tensor, adv: torch.Tensor) -> np.ndarray:
    r = adv - x
    num, mag = torch.zeros(len(x)), torch.zeros(len(x))
    for a, b in (((..., slice(None), slice(1, None)), (..., slice(None), slice(None, -1))),
                 ((..., slice(1, None), slice(None)), (..., slice(None, -1), slice(None)))):
        flat = (x[a] == x[b]).float()
        num += ((r[a] - r[b]).abs() * flat).flatten(1).sum(1)
        mag += ((r[a].abs() + r[b].abs()) / 2 * flat).flatten(1).sum(1)
    return (num / mag.clamp_min(1e-12)).numpy()


def judged(model, x, y, adv):
    checked = check_adversarial(x, adv, ThreatModel(levels=256))
    with torch.no_grad():
        s = (model(checked.adversarial).argmax(1) != y).numpy() & checked.valid.numpy()
    return s, checked.l2.numpy().astype(np.float64), checked.adversarial


def over_grid(model, x, y, attack: Callable[[float], torch.Tensor], grid) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Per sample: the example at the smallest budget that broke it (the thesis's target distortions)."""
    success = np.zeros(len(x), bool)
    dist = np.full(len(x), np.inf)
    best = x.clone()
    for eps in grid:
        s, d, a = judged(model, x, y, attack(eps))
        new = s & ~success
        success |= s
        dist[new] = d[new]
        best[torch.from_numpy(new)] = a[torch.from_numpy(new)]
    return success, dist, best


def noise_variation(x: torch.Tensor) -> dict[str, float]:
    """The operator alone: flat variation of smoothed white noise (std 0.1) guided by ``x``."""
    z = 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return {str(a): float(np.median(flat_variation(x, x + LaplacianSmoother(x, SmoothingConfig(alpha=a)).apply(z))))
            for a in (0.0, 0.95, 0.99, 0.997)}


def run(name: str, model, x, y, args) -> list[dict]:
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).numpy()
    print(f"\n[{name}] {len(x)} images, clean accuracy {correct.mean():.3f}")
    noise = noise_variation(x)
    print("flat variation of smoothed white noise by alpha: " + ", ".join(f"{a}: {v:.2f}" for a, v in noise.items()))
    print(f"{'attack':<10}{'P_suc':>7}{'D-bar':>8}{'median':>8}{'flat var':>10}{'seconds':>9}")
    rows = []
    attacks: list[tuple[str, Callable[[], tuple[np.ndarray, np.ndarray, torch.Tensor]]]] = [
        ("FGSM", lambda: over_grid(model, x, y, lambda e: fgsm(model, x, y, eps=e), LINF_GRID)),
        ("I-FGSM", lambda: over_grid(model, x, y, lambda e: bim(model, x, y, eps=e, steps=10), LINF_GRID)),
        ("PGD2", lambda: over_grid(model, x, y, lambda e: pgd(model, x, y, eps=e, norm="l2", steps=20,
                                                             random_start=False), L2_GRID)),
        ("C&W", lambda: judged(model, x, y, cw_l2(model, x, y))),
        ("qPGD2", lambda: over_grid(model, x, y, lambda e: qpgd_l2(model, x, y, eps=e, steps=20), L2_GRID)),
        ("qpgd2 bis.", lambda: judged(model, x, y, qpgd2(model, x, y))),
        ("sC&W", lambda: judged(model, x, y, scw_l2(model, x, y))),
        ("sC&W a.99", lambda: judged(model, x, y, scw_l2(model, x, y, alpha=0.99))),
        ("DDN", lambda: judged(model, x, y, ddn(model, x, y))),
    ]
    for attack, fn in attacks:
        t0 = time.perf_counter()
        s, d, adv = fn()
        s = s & correct
        fv = flat_variation(x, adv)
        row = {"dataset": name, "attack": attack, "p_suc": M.success_probability(s, correct),
               "mean_l2": M.conditional_distortion(d, s, correct),
               "median_l2_broken": float(np.median(d[s])) if s.any() else float("nan"),
               "flat_variation": float(np.median(fv[s])) if s.any() else float("nan"),
               "seconds": round(time.perf_counter() - t0, 1)}
        row["noise_flat_variation"] = noise
        rows.append(row)
        print(f"{attack:<10}{row['p_suc']:>7.2f}{row['mean_l2']:>8.3f}{row['median_l2_broken']:>8.3f}"
              f"{row['flat_variation']:>10.2f}{row['seconds']:>9.1f}", flush=True)
    return rows


def mnist_model(args):
    from advshield.core.data import Dataset, load_mnist5k
    from advshield.training import TrainConfig, train

    ds = load_mnist5k()
    perm = np.random.default_rng(0).permutation(len(ds))
    part = lambda idx, tag: Dataset(ds.images[idx], ds.labels[idx], ds.classes, f"mnist-5k-{tag}")  # noqa: E731
    tr, te = part(perm[:4000], "train"), part(perm[4000:], "test")
    net, res = train(tr, te, TrainConfig(arch="cnn", epochs=4, threads=args.threads, seed=0), progress=False)
    print(f"MNIST-5k CNN: held-out accuracy {res.test_accuracy:.3f}")
    return net, te


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--dataset", choices=["fashion-mnist", "mnist-5k", "both"], default="both")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    if args.dataset in ("fashion-mnist", "both"):
        twin = TwinClassifier(MODEL, device="cpu", validate=False)
        te = load_fashion_mnist("test")
        x, y = torch.from_numpy(te.as_float(0, args.n)), torch.from_numpy(te.labels[: args.n]).long()
        rows += run("fashion-mnist", twin, x, y, args)
    if args.dataset in ("mnist-5k", "both"):
        net, te = mnist_model(args)
        x, y = torch.from_numpy(te.as_float(0, args.n)), torch.from_numpy(te.labels[: args.n]).long()
        rows += run("mnist-5k", net, x, y, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
