"""Attacks side by side, on the same model and images in one run.

1. Our PGD (L-inf), C&W-L2 and DDN next to the same attacks from peer libraries (torchattacks,
   foolbox; installed for the benchmark only, skipped with a note when missing): adversarial
   images per second, and for the minimal attacks the conditional average L2 distortion at equal
   iteration counts (PGD-40; C&W 5 x 20 or 1 x 100; DDN 100).
2. Our BP against our DDN at 20 and 100 iterations (the thesis's Table 5.2 comparison) on
   Fashion-MNIST (the embedded model) and on MNIST-5k (a small CNN trained here on 4,000 of its
   digits, attacked on held-out ones): P_suc, D-bar and P_upp.

Every adversarial example is judged like the audit does: clipped, rounded to 8 bits
(``advshield.attacks.threat.check_adversarial``) and re-scored; the "float" columns repeat the
success and distortion without the rounding. Metrics are over the correctly classified images.

    python benchmarks/attacks.py [--n 200] [--mnist-n 200] [--threads 2] [--device auto]
                                 [--no-peers] [--json runs/bench/attacks.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# This folder holds triton.py (the Triton benchmark), which as the script's folder on sys.path
# would shadow the `triton` package that torch._dynamo probes when torch.optim first loads it
# (torchattacks' C&W uses Adam). Keep the folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from advshield.attacks import metrics as M  # noqa: E402
from advshield.attacks.boundary_projection import bp  # noqa: E402
from advshield.attacks.carlini_wagner import cw_l2  # noqa: E402
from advshield.attacks.decoupled_direction_norm import ddn  # noqa: E402
from advshield.attacks.gradient import pgd  # noqa: E402
from advshield.attacks.primitives import Counted  # noqa: E402
from advshield.attacks.threat import ThreatModel, check_adversarial  # noqa: E402
from advshield.core.data import Dataset, load_fashion_mnist, load_mnist5k  # noqa: E402
from advshield.plugin.classifiers import TwinClassifier, pick_device  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "advshield" / "models" / "fashion_cnn.onnx"


class CountForwards(torch.nn.Module):
    """Counts the images through the model, whoever calls it (our attacks or a peer's)."""

    def __init__(self, net: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += int(x.shape[0])
        return self.net(x)


def judge(model: Callable, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, correct: np.ndarray,
          norm: str = "l2", eps: float | None = None, d_upp: float | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for tag, levels in (("", 256), ("float_", 0)):
        checked = check_adversarial(x, adv, ThreatModel(norm=norm, eps=eps, levels=levels))  # type: ignore[arg-type]
        with torch.no_grad():
            pred = model(checked.adversarial).argmax(1)
        success = ((pred != y) & checked.valid).cpu().numpy()
        dist = checked.l2.cpu().numpy()
        out[tag + "p_suc"] = M.success_probability(success, correct)
        out[tag + "mean_l2"] = M.conditional_distortion(dist, success, correct)
        if d_upp is not None:
            out[tag + "p_upp"] = M.p_upp(dist, success, correct, d_upp)
    return out


def timed(model: CountForwards, run: Callable[[], torch.Tensor], n: int, sync: Callable[[], None]) -> tuple[torch.Tensor, dict[str, float]]:
    model.images = 0
    sync()
    t0 = time.perf_counter()
    adv = run().detach()
    sync()
    seconds = time.perf_counter() - t0
    return adv, {"seconds": seconds, "images_per_second": n / seconds, "forwards_per_image": model.images / n}


def peers_section(model: CountForwards, x: torch.Tensor, y: torch.Tensor, correct: np.ndarray, args, sync) -> list[dict[str, Any]]:
    n, eps, steps = len(x), args.eps, args.pgd_steps
    alpha = 2.5 * eps / steps
    rows: list[tuple[str, str, str, str, Callable[[], torch.Tensor]]] = [
        ("advshield", "PGD-Linf", f"{steps}", "linf", lambda: pgd(Counted(model), x, y, eps=eps, steps=steps, step_size=alpha)),
        ("advshield", "C&W-L2", "5x20", "l2", lambda: cw_l2(Counted(model), x, y, binary_search_steps=5, steps=20, lr=0.1, initial_const=1.0)),
        ("advshield", "DDN", "100", "l2", lambda: ddn(Counted(model), x, y, steps=100)),
    ]
    try:
        import torchattacks as ta

        rows += [
            ("torchattacks " + ta.__version__, "PGD-Linf", f"{steps}", "linf",
             lambda: ta.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)),
            ("torchattacks " + ta.__version__, "C&W-L2", "1x100", "l2",
             lambda: ta.CW(model, c=1.0, kappa=0, steps=100, lr=0.1)(x, y)),
        ]
    except Exception as e:  # a missing or broken peer library only removes its rows
        print(f"(torchattacks unavailable: {type(e).__name__}: {e})")
    try:
        import foolbox as fb

        fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
        rows += [
            ("foolbox " + fb.__version__, "PGD-Linf", f"{steps}", "linf",
             lambda: fb.attacks.LinfPGD(abs_stepsize=alpha, steps=steps, random_start=True)(fmodel, x, y, epsilons=eps)[1]),
            ("foolbox " + fb.__version__, "C&W-L2", "5x20", "l2",
             lambda: fb.attacks.L2CarliniWagnerAttack(binary_search_steps=5, steps=20, stepsize=0.1, initial_const=1.0,
                                                      abort_early=False)(fmodel, x, y, epsilons=None)[1]),
            ("foolbox " + fb.__version__, "DDN", "100", "l2",
             lambda: fb.attacks.DDNAttack(init_epsilon=1.0, steps=100, gamma=0.05)(fmodel, x, y, epsilons=None)[1]),
        ]
    except Exception as e:
        print(f"(foolbox unavailable: {type(e).__name__}: {e})")
    results = []
    for lib, attack, iters, norm, run in sorted(rows, key=lambda r: (r[1], r[0] != "advshield", r[0])):
        torch.manual_seed(args.seed)
        adv, speed = timed(model, run, n, sync)
        stats = judge(model, x, y, adv, correct, norm, eps if norm == "linf" else None, args.d_upp_fashion)
        results.append({"library": lib, "attack": attack, "iterations": iters, **speed, **stats})
        print_row(results[-1], peers=True)
    return results


def bp_vs_ddn(name: str, model: CountForwards, x: torch.Tensor, y: torch.Tensor, d_upp: float, args, sync) -> list[dict[str, Any]]:
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).cpu().numpy()
    print(f"\n[{name}] {len(x)} images, clean accuracy {correct.mean():.3f}, D_upp = {d_upp}")
    print_header(peers=False)
    out = []
    for steps in (20, 100):
        for attack, run in (
            ("DDN", lambda s=steps: ddn(Counted(model), x, y, steps=s)),
            ("BP", lambda s=steps: bp(Counted(model), x, y, steps=s)),
            ("BP shrink", lambda s=steps: bp(Counted(model), x, y, steps=s, out_fallback="shrink")),
        ):
            adv, speed = timed(model, run, len(x), sync)
            row = {"dataset": name, "attack": attack, "iterations": str(steps), "library": "advshield", **speed,
                   **judge(model, x, y, adv, correct, "l2", None, d_upp)}
            out.append(row)
            print_row(row, peers=False)
    return out


def print_header(peers: bool) -> None:
    first = f"{'library':<22}" if peers else ""
    print(f"{first}{'attack':<11}{'iters':>6}{'img/s':>9}{'fwd/img':>9}{'P_suc':>7}{'D-bar':>7}{'P_upp':>7}"
          f"{'P_suc(float)':>14}{'D-bar(float)':>14}")


def print_row(r: dict[str, Any], peers: bool) -> None:
    first = f"{r['library']:<22}" if peers else ""
    fmt = lambda v: "   -" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"  # noqa: E731
    print(f"{first}{r['attack']:<11}{r['iterations']:>6}{r['images_per_second']:>9.1f}{r['forwards_per_image']:>9.1f}"
          f"{fmt(r['p_suc']):>7}{fmt(r['mean_l2']):>7}{fmt(r.get('p_upp')):>7}"
          f"{fmt(r['float_p_suc']):>14}{fmt(r['float_mean_l2']):>14}", flush=True)


def mnist_model(args, device: torch.device) -> tuple[torch.nn.Module, Dataset]:
    """A small CNN trained on 4,000 random MNIST-5k digits; the other 1,000 are held out."""
    from advshield.training import TrainConfig, accuracy, train

    ds = load_mnist5k()
    perm = np.random.default_rng(args.seed).permutation(len(ds))
    part = lambda idx, tag: Dataset(ds.images[idx], ds.labels[idx], ds.classes, f"mnist-5k-{tag}")  # noqa: E731
    train_ds, test_ds = part(perm[:4000], "train"), part(perm[4000:], "test")
    t0 = time.perf_counter()
    net, _ = train(train_ds, test_ds, TrainConfig(arch="cnn", epochs=args.mnist_epochs, threads=args.threads,
                                                       seed=args.seed), progress=False)
    print(f"\nMNIST-5k CNN: {args.mnist_epochs} epochs on 4,000 digits in {time.perf_counter() - t0:.0f} s, "
          f"held-out accuracy {accuracy(net, test_ds):.3f}")
    return net.to(device), test_ds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="Fashion-MNIST test images (default: %(default)s)")
    ap.add_argument("--mnist-n", type=int, default=200, help="held-out MNIST-5k digits, at most 1000 (default: %(default)s)")
    ap.add_argument("--eps", type=float, default=0.1, help="L-inf budget of the PGD rows (default: %(default)s)")
    ap.add_argument("--pgd-steps", type=int, default=40)
    ap.add_argument("--d-upp-fashion", type=float, default=1.0, help="D_upp on Fashion-MNIST (default: %(default)s)")
    ap.add_argument("--d-upp-mnist", type=float, default=2.0, help="D_upp on MNIST-5k, the thesis's (default: %(default)s)")
    ap.add_argument("--mnist-epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peers", action="store_true", help="skip the peer-library section")
    ap.add_argument("--no-mnist", action="store_true", help="skip MNIST-5k")
    ap.add_argument("--json", default="", help="also write every row to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_start = time.perf_counter()

    twin = TwinClassifier(MODEL, device=args.device, validate=False)
    model = CountForwards(twin).eval()
    fashion = load_fashion_mnist("test")
    x = torch.from_numpy(fashion.as_float(0, args.n)).to(device)
    y = torch.from_numpy(fashion.labels[: args.n]).to(device)
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).cpu().numpy()
    print(f"model {MODEL.name} on {device}, {args.threads} CPU threads, torch {torch.__version__}; "
          f"{args.n} Fashion-MNIST test images, clean accuracy {correct.mean():.3f}")
    rows: list[dict[str, Any]] = []
    if not args.no_peers:
        print(f"\n[peers] PGD-Linf eps={args.eps}: P_suc is the success rate within the budget; "
              f"minimal attacks: D-bar over successes, P_upp at D_upp = {args.d_upp_fashion}")
        print_header(peers=True)
        rows += [{"section": "peers", "dataset": "fashion-mnist", **r} for r in peers_section(model, x, y, correct, args, sync)]
    rows += [{"section": "bp_vs_ddn", **r} for r in bp_vs_ddn("fashion-mnist", model, x, y, args.d_upp_fashion, args, sync)]
    if not args.no_mnist:
        net, held_out = mnist_model(args, device)
        m = min(args.mnist_n, len(held_out))
        xm = torch.from_numpy(held_out.as_float(0, m)).to(device)
        ym = torch.from_numpy(held_out.labels[:m]).to(device)
        rows += [{"section": "bp_vs_ddn", **r} for r in bp_vs_ddn("mnist-5k", CountForwards(net).eval(), xm, ym, args.d_upp_mnist, args, sync)]
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
