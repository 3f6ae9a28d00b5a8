"""Core commands: train, info, predict, demo. Each parses, calls ``advshield.api`` and prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from advshield import api
from advshield.core.errors import ImageError
from advshield.core.resources import DEFAULT_PIPELINE
from advshield.demo import run_demo
from advshield.plugin.decode import decode_image
from advshield.plugin.scoring import collect_images


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the reference CNN (and the transfer surrogate) on Fashion-MNIST")
    p.add_argument("--data-dir", default=None, help="folder with the IDX files (default: Debian's dataset-fashion-mnist)")
    p.add_argument("--out", default="runs/models", help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-sigma", type=float, default=0.0, help="Gaussian noise augmentation (for randomized smoothing)")
    p.add_argument("--no-surrogate", action="store_true", help="skip the transfer-attack surrogate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="show a pipeline file and the sha256 of every file it uses")
    p.add_argument("pipeline", nargs="?", default=str(DEFAULT_PIPELINE))
    p.add_argument("--parity", action="store_true", help="also build the differentiable twin and report parity")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("predict", help="classify image files through the defended pipeline")
    p.add_argument("pipeline")
    p.add_argument("images", nargs="+", help="PNG or JPEG files, or folders searched recursively (sorted)")
    p.add_argument("--top", type=int, default=3, help="probabilities shown per image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.add_argument("--seed", type=int, default=None, help="seed for random defenses")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="the main job on the embedded default: train, score, fit, audit, certify, report")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--reuse", action="store_true", help="reuse models already trained in --workdir")
    p.add_argument("--defense", default="fashion_mnist_patches",
                   choices=("fashion_mnist_patches", "fashion_mnist_squeeze", "fashion_mnist_random"),
                   help="packaged example pipeline to fit, audit and certify (default: %(default)s)")
    p.add_argument("--samples", type=int, default=100, help="test images audited (default: %(default)s)")
    p.add_argument("--certify-samples", type=int, default=100, help="test images certified (default: %(default)s)")
    p.add_argument("--noise-epochs", type=int, default=3, help="epochs of the noise-trained model (default: %(default)s)")
    p.add_argument("--score-only", action="store_true", help="stop after training and scoring")
    p.set_defaults(func=cmd_demo)


# --- train ---------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    api.train(args.out, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed, noise_sigma=args.noise_sigma,
              surrogate=not args.no_surrogate, threads=args.threads, progress=not args.quiet)
    return 0


# --- info ----------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    cfg = api.load_pipeline(args.pipeline)
    report = api.info(cfg, parity=args.parity)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"pipeline  {cfg.pipeline.name}  ({cfg.source})")
    sm = report.get("served_model")
    if sm is not None:
        if sm.get("endpoint"):
            print(f"served    {sm['name']} ({sm['platform']}, max_batch_size {sm['max_batch_size']}) at {sm['endpoint']}: "
                  f"input {sm['input']} ({sm['layout'].upper()}), output {sm['output']} read as {sm['output_kind']}, "
                  f"{sm['classes']} classes")
        else:
            print(f"served    {sm['name']} (no [model] served.endpoint: not asked)")
    if "served_parity" in report:
        sp = report["served_parity"]
        print(f"twin vs served model: max |logit difference| {sp['max_abs_logit_diff']:.3g} (tolerance "
              f"{sp['tolerance']:g}) on {sp['images']} images, argmax agreement {sp['argmax_agreement']:.1%}: "
              f"{'white-box audits possible' if sp['ok'] else 'MISMATCH: a white-box audit would be refused'}")
    m = report["model"]
    if m is None:  # a served model without an ONNX twin
        print(f"input     {report['input'] or 'read from the server'}; no ONNX twin: audits run transfer and "
              f"black-box attacks only")
        print(f"defenses  {', '.join(report['defenses']) or '(none)'}")
        print(f"detector  {report['detector'] or '(none)'}")
        for name, f in report["files"].items():
            print(f"{name:<22} {f['sha256']}  {f['path']}")
        return 0
    norm = ", ".join(f"{k} {v}" for k, v in (("scale", m["scale"]), ("mean", m["mean"]), ("std", m["std"]))
                     if v not in (1.0, [])) or "none (pixels in [0, 1])"
    print(f"input     {m['input']} pixels in [0, 1], resize={cfg.input.resize}")
    print(f"model     input {m['model_input']}, normalization: {norm}, output: {m['output']}, "
          f"batch: {'fixed ' + str(m['batch']) if m['batch'] != 'dynamic' else 'dynamic'}, {m['classes']} classes")
    print(f"wrapped   {m['wrapped_sha256']}  ({'; '.join(m['wrapped']) if m['wrapped'] else 'the file as it is'})")
    print(f"defenses  {', '.join(report['defenses']) or '(none)'}")
    print(f"detector  {report['detector'] or '(none)'}")
    print(f"random    {cfg.random}")
    for name, f in report["files"].items():
        print(f"{name:<22} {f['sha256']}  {f['path']}")
    if "twin_parity_max_abs_diff" in report:
        print(f"twin parity: max |logit difference| {report['twin_parity_max_abs_diff']:.3g} "
              f"(tolerance {cfg.model.parity_tolerance:g})")
    return 0


# --- predict -------------------------------------------------------------------------------------

def cmd_predict(args) -> int:
    clf = api.classifier(args.pipeline)
    assert clf.config is not None
    rows, arrays, errors = [], [], 0
    for name in map(str, collect_images(args.images)):  # folders: their PNG/JPEG files, recursively, sorted
        try:
            arrays.append(decode_image(Path(name).read_bytes(), clf.config.input))
            rows.append(name)
        except (ImageError, OSError) as e:
            errors += 1
            msg = str(e) if isinstance(e, ImageError) else f"cannot read file: {e.strerror}"
            if args.json:
                print(json.dumps({"image": name, "error": msg}))
            else:
                print(f"{name}: error: {msg}", file=sys.stderr)
    if arrays:
        pred = api.predict(clf, np.stack(arrays), seed=args.seed)
        names = clf.class_names
        for i, name in enumerate(rows):
            order = np.argsort(-pred.probs[i])[: args.top]
            none = "ABSTAIN" if pred.radius is not None else "REJECTED"
            rec: dict[str, Any] = {"image": name, "label": int(pred.labels[i]), "class": names[pred.labels[i]] if pred.labels[i] >= 0 else none,
                   "top": [{"class": names[j], "prob": round(float(pred.probs[i, j]), 6)} for j in order]}
            if pred.radius is not None:
                rec["certified_radius"] = float(pred.radius[i])
            if pred.seed is not None:
                rec["seed"] = pred.seed
            if pred.score is not None and pred.flagged is not None:
                rec["detector_score"] = float(pred.score[i])
                rec["flagged"] = bool(pred.flagged[i])
            if args.json:
                print(json.dumps(rec))
            else:
                top = "  ".join(f"{t['class']} {t['prob']:.3f}" for t in rec["top"])
                flag = f"  [{'FLAGGED' if rec['flagged'] else 'ok'} {rec['detector_score']:.3f}]" if "flagged" in rec else ""
                if "certified_radius" in rec:
                    flag += f"  [certified L2 radius {rec['certified_radius']:.3f}]"
                print(f"{name:<40} {rec['class']:<12} {top}{flag}")
    return 1 if errors else 0


# --- demo ----------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    run_demo(args.workdir, data_dir=args.data_dir, epochs=args.epochs, reuse=args.reuse, defense=args.defense,
             samples=args.samples, certify_samples=args.certify_samples, noise_epochs=args.noise_epochs,
             score_only=args.score_only)
    return 0
