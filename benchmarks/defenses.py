"""Images/s of the undefended classifier, of each defense (alone and in front of the classifier) and
of the squeezing detector, measured side by side in one run, with ratios; the detector's cost next
to its floor of (1 + number of squeezers) classifier passes; the fast paths next to their reference
implementations (scipy's median filter; OpenCV's non-local means when opencv-python is installed).

    python benchmarks/defenses.py [--batch 64] [--seconds 2] [--threads 2] [--json out.json]

Defenses run on the CPU, and on the GPU too when torch sees one (the classifier is ONNX Runtime:
CUDA provider with onnxruntime-gpu, else CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from advshield.core.data import load_fashion_mnist
from advshield.defenses.registry import build_defense, build_detector, parse_defense, parse_detector
from advshield.plugin.classifiers import OnnxClassifier

MODEL = Path(__file__).resolve().parents[1] / "advshield" / "models" / "fashion_cnn.onnx"

DEFENSES = [
    {"type": "bit_depth", "bits": 5},
    {"type": "median", "size": 2},
    {"type": "median", "size": 3},
    {"type": "non_local_means", "search": 11, "patch": 3, "strength": 4.0},
    {"type": "jpeg", "quality": 75},
    {"type": "random_resize_pad"},
    {"type": "gaussian_noise", "sigma": 0.1},
]
DETECTORS = [
    [{"type": "bit_depth", "bits": 2}, {"type": "median", "size": 2}],  # the example pipeline's
    [{"type": "bit_depth", "bits": 5}, {"type": "median", "size": 2},
     {"type": "non_local_means", "search": 11, "patch": 3, "strength": 4.0}],  # Xu et al.'s ImageNet set
]


def rate(fn, batch: int, seconds: float) -> float:
    fn()  # warm-up (caches, tables)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def label(spec: dict) -> str:
    return spec["type"] + "(" + ", ".join(f"{k}={v}" for k, v in spec.items() if k != "type") + ")"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x_cpu = torch.from_numpy(load_fashion_mnist("test").as_float(0, args.batch))
    clf = OnnxClassifier(args.model, device="auto", threads=args.threads, validate=False)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"model {Path(args.model).name} ({clf.providers[0]}), batch {args.batch}, {args.threads} threads, "
          f"torch {torch.__version__}, {args.seconds:g} s per row")
    results: dict = {"batch": args.batch, "threads": args.threads, "rows": []}
    for dev in devices:
        bench_device(dev, clf, x_cpu, args, results)
    bench_references(x_cpu, args, results)
    if len(devices) == 1:
        print("\n(no CUDA device visible: GPU rows not measured)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def bench_device(dev: str, clf: OnnxClassifier, x_cpu: torch.Tensor, args, results: dict) -> None:
    x = x_cpu.to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)

    def classify(z: torch.Tensor) -> torch.Tensor:
        return clf(z)

    base = rate(lambda: classify(x), args.batch, args.seconds)
    print(f"\n[{dev}] defenses (torch on {dev}); classifier: ONNX Runtime")
    print(f"{'step':<58}{'alone img/s':>13}{'+ classifier':>14}{'vs undefended':>15}")
    print(f"{'undefended classifier':<58}{'':>13}{base:>14,.0f}{1.0:>14.2f}x")
    rows = [{"device": dev, "step": "undefended classifier", "with_classifier": base, "ratio": 1.0}]
    with torch.no_grad():
        for spec in DEFENSES:
            d = build_defense(*parse_defense(spec))

            def alone(d=d):
                d(x, g)
                sync()

            def both(d=d):
                classify(d(x, g))

            a, b = rate(alone, args.batch, args.seconds), rate(both, args.batch, args.seconds)
            rows.append({"device": dev, "step": label(spec), "alone": a, "with_classifier": b, "ratio": b / base})
            print(f"{label(spec):<58}{a:>13,.0f}{b:>14,.0f}{b / base:>14.2f}x")

        print(f"\n[{dev}] squeezing detector: prediction + score from one stacked classifier call")
        print(f"{'squeezers':<58}{'img/s':>13}{'cost':>14}{'floor':>15}")
        for squeezers in DETECTORS:
            det = build_detector(*parse_detector({"type": "squeeze", "squeezers": squeezers}))
            s = len(squeezers)
            full = rate(lambda det=det: det.logits_and_score(x, classify), args.batch, args.seconds)
            stacked = det.stack(x)
            call_only = rate(lambda stacked=stacked: classify(stacked), args.batch, args.seconds)
            separate = rate(lambda det=det: [classify(z) for z in [x] + [q(x) for q in det.squeezers]], args.batch, args.seconds)
            name = " + ".join(label(q) for q in squeezers)
            cost = base / full
            rows.append({"device": dev, "detector": name, "images_per_s": full, "cost_in_classifier_passes": cost,
                         "floor": 1 + s, "stacked_call_only_images_per_s": call_only,
                         "separate_calls_images_per_s": separate})
            print(f"{name[:57]:<58}{full:>13,.0f}{cost:>13.2f}x{1 + s:>14d}x")
            print(f"{'  of which: the stacked classifier call alone':<58}{call_only:>13,.0f}{base / call_only:>13.2f}x")
            print(f"{'  same work, 1 + S separate classifier calls':<58}{separate:>13,.0f}{base / separate:>13.2f}x")
    results["rows"].extend(rows)


def bench_references(x: torch.Tensor, args, results: dict) -> None:
    """Fast paths next to reference implementations on the same batch (CPU)."""
    import scipy.ndimage as ndi

    from advshield.defenses.squeeze import median_filter, non_local_means

    print("\n[cpu] fast paths vs reference implementations")
    print(f"{'operation':<58}{'ours img/s':>13}{'reference':>14}{'speed-up':>15}")
    xn = x.numpy()
    pairs = [
        ("median 2x2 vs scipy.ndimage.median_filter", lambda: median_filter(x, 2),
         lambda: ndi.median_filter(xn, size=(1, 1, 2, 2), mode="reflect")),
        ("median 3x3 vs scipy.ndimage.median_filter", lambda: median_filter(x, 3),
         lambda: ndi.median_filter(xn, size=(1, 1, 3, 3), mode="reflect")),
        ("median 5x5 (sort path) vs scipy", lambda: median_filter(x, 5),
         lambda: ndi.median_filter(xn, size=(1, 1, 5, 5), mode="reflect")),
    ]
    agreement = ""
    try:
        import cv2

        cv2.setNumThreads(args.threads)
        u8 = (xn[:, 0] * 255).round().astype(np.uint8)
        pairs.append(("non-local means 11-3-4 vs OpenCV fastNlMeansDenoising", lambda: non_local_means(x, 11, 3, 4.0),
                      lambda: [cv2.fastNlMeansDenoising(im, None, h=4.0, templateWindowSize=3, searchWindowSize=11) for im in u8]))
        ref = np.stack([cv2.fastNlMeansDenoising(im, None, h=4.0, templateWindowSize=3, searchWindowSize=11) for im in u8])
        ours = np.rint(non_local_means(x, 11, 3, 4.0)[:, 0].numpy() * 255)
        diff = np.abs(ours - ref)
        agreement = (f"non-local means agreement with OpenCV (11-3-4, 8-bit output): mean |diff| "
                     f"{diff.mean():.4f} grey levels, max {diff.max():.0f}")
        results["nlm_vs_opencv"] = {"mean_abs_diff_grey_levels": float(diff.mean()), "max": float(diff.max())}
    except ImportError:
        agreement = "(opencv-python not installed: the OpenCV non-local means row is not measured)"
    for name, ours, ref in pairs:
        a, b = rate(ours, args.batch, args.seconds), rate(ref, args.batch, args.seconds)
        results["rows"].append({"device": "cpu", "reference": name, "ours": a, "reference_images_per_s": b})
        print(f"{name:<58}{a:>13,.0f}{b:>14,.0f}{a / b:>14.2f}x")
    print(agreement)


if __name__ == "__main__":
    main()
