"""Why a budget attack's D-bar says little about a defense (docs/thesis.md, Table 6.4, reason 3).

The thesis's BPDA row (20 iterations) reports the mean L2 of the successes of a fixed-iteration
attack. For a budget attack that number follows the budget: PGD-L2 at eps = 3 ends on the sphere
whatever the defense. This runs PGD-L2 (eps 3) and BIM (L-inf 8/255), 20 steps, through BPDA on a few
configurations of the patch study (Fashion-MNIST, first 50 test images; 8-bit rounding, re-scored
on the serving path).

    python benchmarks/bpda_budget.py [--n 50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from advshield.attacks import metrics as M  # noqa: E402
from advshield.attacks.gradient import bim, pgd  # noqa: E402
from advshield.attacks.patch_study import (  # noqa: E402
    CodebookFitter,
    Served,
    StudySettings,
    attack_view,
    build_configuration,
    default_configurations,
    judge_served,
)
from advshield.core.data import load_fashion_mnist  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "advshield" / "models" / "fashion_cnn.onnx"
LABELS = ("undefended", "img K4096 3x3 c2 plain", "img K4096 5x5 c3 plain", "bit2", "bit3", "median2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    x = torch.from_numpy(test.as_float(0, args.n))
    y = test.labels[: args.n].astype(np.int64)
    yt = torch.from_numpy(y)
    confs = [c for c in default_configurations(StudySettings()) if c.label in LABELS]
    with tempfile.TemporaryDirectory() as work:
        fit = CodebookFitter(MODEL, torch.from_numpy(train.as_float(0, 5000)), Path(work), 0)
        for conf in confs:
            defenses = build_configuration(conf)
            for d in defenses:
                fit(d)
            served, view = Served(MODEL, defenses), attack_view(MODEL, defenses)
            ok = served.predict(x) == y
            cells = []
            for name, run in (("PGD-L2 eps 3", lambda v=view: pgd(v, x, yt, eps=3.0, norm="l2", steps=20, random_start=False)),
                              ("BIM L-inf 8/255", lambda v=view: bim(v, x, yt, eps=8 / 255, steps=20))):
                s, d = judge_served(served, x, y, run())
                cells.append(f"{name}: P_suc {M.success_probability(s & ok, ok):.2f} "
                             f"D-bar {M.conditional_distortion(d, s & ok, ok):.2f}")
            print(f"{conf.label:<24} " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
