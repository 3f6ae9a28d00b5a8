"""Core commands: train, info, predict, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from advshield.errors import AdvshieldError, ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_PIPELINE = PACKAGE_DIR / "pipelines" / "fashion_mnist.toml"


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
    p.add_argument("images", nargs="+", help="PNG or JPEG files")
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

def train_models(out: Path, *, data_dir=None, epochs=4, seed=0, noise_sigma=0.0, surrogate=True,
                 threads=2, progress=True) -> dict[str, dict]:
    from advshield.data import load_fashion_mnist
    from advshield.training import TrainConfig, export_onnx, train, write_model_card

    train_ds, test_ds = load_fashion_mnist("train", data_dir), load_fashion_mnist("test", data_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("cnn", seed, noise_sigma, "fashion_cnn" + (f"_sigma{noise_sigma:g}" if noise_sigma else ""))]
    if surrogate:
        jobs.append(("surrogate", seed + 1000, 0.0, "fashion_surrogate"))
    cards = {}
    for arch, s, sigma, stem in jobs:
        cfg = TrainConfig(arch=arch, epochs=epochs, seed=s, noise_sigma=sigma, threads=threads)
        model, result = train(train_ds, test_ds, cfg, progress=progress)
        path = out / f"{stem}.onnx"
        diff = export_onnx(model, path, tuple(train_ds.as_float(0, 1).shape[1:]))
        card = json.loads(write_model_card(path, result, diff).read_text())
        cards[stem] = card
        print(f"{path}: test accuracy {result.test_accuracy:.4f} ({result.train_seconds:.0f} s, "
              f"ONNX parity {diff:.2g}, sha256 {card['sha256'][:12]})")
    return cards


def cmd_train(args) -> int:
    train_models(Path(args.out), data_dir=args.data_dir, epochs=args.epochs, seed=args.seed,
                 noise_sigma=args.noise_sigma, surrogate=not args.no_surrogate, threads=args.threads,
                 progress=not args.quiet)
    return 0


# --- info ----------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    from advshield.plugin.config import load_pipeline

    cfg = load_pipeline(args.pipeline)
    sums = cfg.checksums(verify=True)
    files = cfg.files()
    report = {
        "pipeline": cfg.pipeline.name,
        "source": str(cfg.source),
        "input": list(cfg.input.shape),
        "defenses": [e.type for e in cfg.defenses],
        "detector": cfg.detector.type if cfg.detector else None,
        "random": cfg.random,
        "files": {k: {"path": str(files[k][0]), "sha256": v} for k, v in sums.items()},
    }
    if args.parity:
        from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier

        twin = TwinClassifier(cfg.model_path, tolerance=cfg.model.parity_tolerance,
                              reference=OnnxClassifier(cfg.model_path, device="cpu"))
        report["twin_parity_max_abs_diff"] = twin.parity.max_abs_diff
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"pipeline  {cfg.pipeline.name}  ({cfg.source})")
    print(f"input     {cfg.input.channels}x{cfg.input.height}x{cfg.input.width}, resize={cfg.input.resize}")
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
    from advshield.errors import ImageError
    from advshield.plugin.decode import decode_image
    from advshield.plugin.pipeline import DefendedClassifier

    clf = DefendedClassifier.from_config(args.pipeline)
    assert clf.config is not None
    rows, arrays, errors = [], [], 0
    for name in args.images:
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
        import torch

        pred = clf.predict(torch.from_numpy(np.stack(arrays)), seed=args.seed)
        names = clf.class_names
        for i, name in enumerate(rows):
            order = np.argsort(-pred.probs[i])[: args.top]
            none = "ABSTAIN" if pred.radius is not None else "REJECTED"
            rec = {"image": name, "label": int(pred.labels[i]), "class": names[pred.labels[i]] if pred.labels[i] >= 0 else none,
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


# --- demo (the main job) -------------------------------------------------------------------------

def write_default_pipeline(workdir: Path, model: str = "fashion_cnn.onnx", surrogate: str = "fashion_surrogate.onnx") -> Path:
    text = DEFAULT_PIPELINE.read_text()
    text = text.replace("../models/fashion_cnn.onnx", model).replace("../models/fashion_surrogate.onnx", surrogate)
    path = workdir / "pipeline.toml"
    path.write_text(text)
    return path


def score_dataset(clf, dataset, batch_size: int = 500) -> dict:
    import torch

    from advshield.plugin.pipeline import DefendedClassifier

    assert isinstance(clf, DefendedClassifier)
    labels = np.empty(len(dataset), np.int64)
    t0 = time.perf_counter()
    for i in range(0, len(dataset), batch_size):
        labels[i : i + batch_size] = clf.predict(torch.from_numpy(dataset.as_float(i, i + batch_size)), seed=i).labels
    seconds = time.perf_counter() - t0
    correct = labels == dataset.labels
    per_class = {dataset.classes[c]: float(correct[dataset.labels == c].mean()) for c in range(len(dataset.classes))}
    return {"accuracy": float(correct.mean()), "per_class": per_class, "images": len(dataset),
            "seconds": seconds, "images_per_second": len(dataset) / seconds}


def demo_pipeline(workdir: Path, source: Path, noise_model: str, samples: int, cert_samples: int) -> Path:
    """A packaged example pipeline rewritten for the demo's own trained models and artifacts."""
    import tomllib

    import tomli_w

    table = tomllib.loads(source.read_text())
    table["model"]["path"] = "fashion_cnn.onnx"
    table["model"]["surrogate"] = "fashion_surrogate.onnx"
    for art in table.get("artifacts", {}).values():
        art["path"] = f"artifacts/{Path(art['path']).name}"
        art["sha256"] = ""
    table.setdefault("audit", {})["samples"] = samples
    table["certify"] = {"sigmas": [0.25], "models": [noise_model], "samples": cert_samples,
                        "n0": 100, "n": 1000, "alpha": 0.001}
    path = workdir / f"{table['pipeline']['name']}.toml"
    path.write_text("# generated by `advshield demo` from " + source.name + "\n" + tomli_w.dumps(table))
    return path


def cmd_demo(args) -> int:
    """The main job: train, score, fit the defenses, audit the defended pipeline, certify, report."""
    import torch

    from advshield.cli import main as cli_main
    from advshield.data import load_fashion_mnist
    from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier
    from advshield.plugin.config import load_pipeline
    from advshield.plugin.pipeline import DefendedClassifier

    workdir = Path(args.workdir)
    t_start = time.perf_counter()
    summary: dict = {}
    steps = 6
    have = lambda *names: all((workdir / n).is_file() for n in names)  # noqa: E731
    if not (args.reuse and have("fashion_cnn.onnx", "fashion_surrogate.onnx")):
        print(f"[1/{steps}] training the reference CNN and the transfer surrogate into {workdir}/")
        summary["models"] = train_models(workdir, data_dir=args.data_dir, epochs=args.epochs)
    else:
        print(f"[1/{steps}] reusing the models in {workdir}/")
    pipeline = write_default_pipeline(workdir)
    cfg = load_pipeline(pipeline)
    test = load_fashion_mnist("test", args.data_dir)
    print(f"[2/{steps}] scoring the {len(test)} test images through the serving path ({pipeline})")
    clf = DefendedClassifier.from_config(cfg)
    summary["score"] = s = score_dataset(clf, test)
    print(f"      accuracy {s['accuracy']:.4f}  ({s['images_per_second']:.0f} images/s, {clf.classifier!r})")
    worst = sorted(s["per_class"].items(), key=lambda kv: kv[1])[:3]
    print("      hardest classes: " + ", ".join(f"{k} {v:.3f}" for k, v in worst))
    onnx_clf = clf.classifier if isinstance(clf.classifier, OnnxClassifier) else OnnxClassifier(cfg.model_path)
    twin = TwinClassifier(cfg.model_path, reference=onnx_clf, tolerance=cfg.model.parity_tolerance,
                          check_with=torch.from_numpy(test.as_float(0, 256)))
    summary["twin_parity_max_abs_diff"] = twin.parity.max_abs_diff
    print(f"      differentiable twin vs ONNX Runtime: max |logit difference| {twin.parity.max_abs_diff:.3g} "
          f"on {twin.parity.samples} inputs (tolerance {cfg.model.parity_tolerance:g})")
    if s["accuracy"] < 0.9:
        raise AdvshieldError(f"test accuracy {s['accuracy']:.4f} is below the expected 0.90")
    if args.score_only:
        summary["seconds"] = time.perf_counter() - t_start
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"done in {summary['seconds']:.0f} s (--score-only); summary in {workdir / 'summary.json'}")
        return 0

    noise = f"fashion_cnn_sigma{0.25:g}.onnx"
    if not (args.reuse and have(noise)):
        print(f"[3/{steps}] training the base model for randomized smoothing (Gaussian noise sigma 0.25)")
        summary["noise_model"] = train_models(workdir, data_dir=args.data_dir, epochs=args.noise_epochs,
                                              noise_sigma=0.25, surrogate=False)
    else:
        print(f"[3/{steps}] reusing {workdir / noise}")
    defended = demo_pipeline(workdir, PACKAGE_DIR / "pipelines" / f"{args.defense}.toml", noise,
                             args.samples, args.certify_samples)
    print(f"[4/{steps}] fitting the defenses of {defended.name} (training split only)")
    if cli_main(["fit", str(defended)]) != 0:
        raise AdvshieldError("advshield fit failed")
    print(f"[5/{steps}] auditing {defended.name}: white-box, adaptive (BPDA/EOT), transfer attacks, certification")
    out = workdir / "audit"
    gate_status = cli_main(["audit", str(defended), "--out", str(out), "--certify", "--fresh", "--threads", "1"])
    if gate_status not in (0, 1):
        raise AdvshieldError("advshield audit failed")
    summary["audit"] = {"report": str(out / "report.md"), "gate": "pass" if gate_status == 0 else "fail"}
    summary["seconds"] = time.perf_counter() - t_start
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[6/{steps}] done in {summary['seconds']:.0f} s")
    print(f"      report:  {out / 'report.md'} (plots in {out / 'plots'}), records in {out / 'records.jsonl'}")
    print(f"      gate:    {summary['audit']['gate'].upper()} (thresholds in the [gate] section of {defended})")
    print(f"      serve:   advshield serve {defended} --port 8001   then   advshield score --url 127.0.0.1:8001 IMAGE.png")
    print(f"      triton:  advshield deploy triton {defended} --out {workdir / 'model_repository'} --serve")
    return 0


__all__ = ["ConfigError", "register"]
