"""Our default budget cascade against torchattacks' AutoAttack (standard: APGD-CE, APGD-T, FAB-T,
Square), on the same model and images in one run.

For each budget (L-inf 4/255, 8/255, 13/255, 26/255; L2 0.5, 1.0): robust accuracy after every
adversarial example is clipped, rounded to 8 bits and re-scored (``check_adversarial``, as the
audit does), and wall time. Ours is the audit's default cascade for that norm: APGD-CE, then
APGD-T with the targeted DLR loss on the samples APGD-CE left robust (``advshield.attacks``).
Also printed: our attack time against the gradient floor, i.e. gradient evaluations x images per
second as a share of the twin's forward+backward rate at the same batch.

torchattacks is installed for this benchmark only (``pip install --no-deps torchattacks``); the
script says so and stops when it is missing. Run it on a quiet machine and give the load average:

    python benchmarks/autoattack.py [--n 100] [--threads 2] [--json runs/bench/autoattack.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

# triton.py in this folder would shadow the `triton` package torch._dynamo probes: keep it off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from advshield.attacks import apgd, apgd_t  # noqa: E402
from advshield.attacks.primitives import Counted  # noqa: E402
from advshield.attacks.threat import ThreatModel, check_adversarial  # noqa: E402
from advshield.core.data import load_fashion_mnist  # noqa: E402
from advshield.plugin.classifiers import TwinClassifier  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "advshield" / "models" / "fashion_cnn.onnx"
BUDGETS = [("linf", 4 / 255), ("linf", 8 / 255), ("linf", 13 / 255), ("linf", 26 / 255), ("l2", 0.5), ("l2", 1.0)]


def robust(model, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, norm: str, eps: float) -> np.ndarray:
    """Per image: still correctly classified after the example is checked and rounded to 8 bits."""
    checked = check_adversarial(x, adv, ThreatModel(norm=norm, eps=eps, levels=256))  # type: ignore[arg-type]
    with torch.no_grad():
        pred = model(checked.adversarial).argmax(1)
    broken = (pred != y) & checked.valid
    return (~broken).cpu().numpy()


def ours(model: Counted, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, seed: int) -> tuple[torch.Tensor, int]:
    adv = apgd(model, x, y, eps=eps, norm=norm, loss="ce", seed=seed)
    left = torch.from_numpy(robust(model, x, y, adv, norm, eps))
    if left.any():
        idx = left.nonzero().flatten()
        adv[idx] = apgd_t(model, x[idx], y[idx], eps=eps, norm=norm, seed=seed + 1)
    return adv, model.gradients


def fwd_bwd_rate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 20) -> float:
    t0 = time.perf_counter()
    for _ in range(repeats):
        xi = x.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(net(xi), y).backward()
    return repeats * len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="Fashion-MNIST test images (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if importlib.util.find_spec("torchattacks") is None:
        sys.exit("torchattacks is not installed: pip install --no-deps torchattacks (benchmark only)")
    import torchattacks  # lazy: an optional, benchmark-only dependency

    torch.set_num_threads(args.threads)
    test = load_fashion_mnist("test")
    x = torch.from_numpy(test.as_float(0, args.n))
    y = torch.from_numpy(test.labels[: args.n].astype(np.int64))
    net = TwinClassifier(MODEL, device="cpu", validate=False)
    with torch.no_grad():
        clean = (net(x).argmax(1) == y).numpy()
    floor = fwd_bwd_rate(net, x, y)
    print(f"{args.n} Fashion-MNIST test images, clean accuracy {clean.mean():.3f}; twin forward+backward "
          f"{floor:.0f} img/s at batch {args.n}; torch threads {args.threads}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'budget':<14} {'ours':>6} {'AutoAttack':>10} {'diff (pts)':>10} {'ours s':>7} {'AA s':>7} {'grad floor':>10}")
    rows = []
    for norm, eps in BUDGETS:
        model = Counted(net)
        t0 = time.perf_counter()
        adv, grads = ours(model, x, y, norm, eps, args.seed)
        t_ours = time.perf_counter() - t0
        r_ours = robust(net, x, y, adv, norm, eps) & clean
        aa = torchattacks.AutoAttack(net, norm="Linf" if norm == "linf" else "L2", eps=eps, version="standard",
                                     n_classes=10, seed=args.seed)
        t0 = time.perf_counter()
        adv_aa = aa(x, y)
        t_aa = time.perf_counter() - t0
        r_aa = robust(net, x, y, adv_aa, norm, eps) & clean
        share = grads / t_ours / floor if t_ours > 0 else float("nan")
        label = f"{norm} {round(eps * 255)}/255" if norm == "linf" else f"{norm} {eps:g}"
        row = {"norm": norm, "eps": eps, "ours": float(r_ours.mean()), "autoattack": float(r_aa.mean()),
               "ours_seconds": t_ours, "autoattack_seconds": t_aa, "gradients": grads, "gradient_floor_share": share,
               "both_robust": float((r_ours & r_aa).mean())}
        rows.append(row)
        print(f"{label:<14} {row['ours']:>6.3f} {row['autoattack']:>10.3f} {100 * (row['ours'] - row['autoattack']):>+10.1f} "
              f"{t_ours:>7.1f} {t_aa:>7.1f} {share:>10.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"n": args.n, "floor_img_s": floor, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
