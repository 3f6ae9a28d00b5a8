"""``advshield certify``: randomized-smoothing certification over the defended pipeline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from advshield.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certify", help="certify test images with randomized smoothing over the whole pipeline")
    p.add_argument("pipeline")
    p.add_argument("--sigma", type=float, action="append", help="noise level (repeatable; default: [certify] sigmas)")
    p.add_argument("--model", action="append", help="noise-trained base model per --sigma (repeatable, same order; "
                   "e.g. from `advshield train --noise-sigma S`)")
    p.add_argument("--n0", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--samples", type=int)
    p.add_argument("--start", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--target", default=None,
                   help="score through a live server instead of in process: grpc://HOST:PORT[/MODEL]")
    p.add_argument("--token", default=None, help="bearer token for --target")
    p.add_argument("--out", default=None, help="output folder (default: runs/certify/<pipeline name>)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_certify)


def parse_target(url: str) -> tuple[str, str | None]:
    """grpc://HOST:PORT[/MODEL] -> (HOST:PORT, MODEL or None)."""
    rest = url.removeprefix("grpc://")
    if "://" in rest:
        raise ConfigError(f"--target: only grpc:// URLs are supported, got {url!r}")
    hostport, _, model = rest.partition("/")
    if ":" not in hostport:
        raise ConfigError(f"--target: expected grpc://HOST:PORT[/MODEL], got {url!r}")
    return hostport, model or None


def pipeline_base(cfg, model_path=None):
    """The defended pipeline as a smoothing base classifier (noise goes in before the defenses)."""
    from advshield.plugin.classifiers import OnnxClassifier
    from advshield.plugin.pipeline import DefendedClassifier

    clf = None
    if model_path is not None:
        clf = OnnxClassifier(cfg.resolve(model_path), device=cfg.model.device, threads=cfg.model.threads, validate=False)
    defended = DefendedClassifier.from_config(cfg, classifier=clf)
    if clf is None and hasattr(defended.classifier, "validate"):
        defended.classifier.validate = False  # noisy inputs leave [0, 1] on purpose
    return defended


def in_process_bases(cfg, spec):
    """``base_for_sigma(sigma)``: the defended pipeline (with the noise-trained model ``spec``
    names for that sigma, if any) as the smoothing base classifier; pipelines built once per model."""
    import torch

    cache: dict = {}

    def base_for_sigma(sigma: float):
        model = spec.models[spec.sigmas.index(sigma)] if spec.models else None
        if model not in cache:
            cache[model] = pipeline_base(cfg, model)
        defended = cache[model]
        gen = torch.Generator().manual_seed(spec.seed)
        return lambda x: defended.logits(x, gen if defended.random else None)

    return base_for_sigma


def cmd_certify(args) -> int:
    from advshield.attacks.certify import budget, certify_spec, plot_certified_accuracy, run_certification
    from advshield.data import load_dataset
    from advshield.plugin.config import load_pipeline

    cfg = load_pipeline(args.pipeline)
    overrides = {"n0": args.n0, "n": args.n, "alpha": args.alpha, "samples": args.samples, "start": args.start,
                 "batch_size": args.batch_size, "seed": args.seed,
                 "sigmas": tuple(args.sigma) if args.sigma else None,
                 # paths on the command line are relative to the working folder, in the file to the file
                 "models": tuple(str(Path(m).resolve()) for m in args.model) if args.model else None}
    if args.sigma and not args.model and cfg.extra.get("certify", {}).get("models"):
        overrides["models"] = ()
    spec = certify_spec(cfg, **overrides)
    data = load_dataset(cfg.data.dataset, "test", cfg.data.directory or None)
    stop = min(spec.start + spec.samples, len(data))
    images, labels = data.as_float(spec.start, stop), data.labels[spec.start:stop]
    out = Path(args.out or f"runs/certify/{cfg.pipeline.name}")

    if args.target:
        from advshield.plugin.client import RemoteClassifier

        url, model = parse_target(args.target)
        remote = RemoteClassifier(url, model, token=args.token)
        num_classes = remote.num_classes

        def base_for_sigma(sigma):
            def f(x):
                return remote(x.clamp(0, 1)) if not spec.clip else remote(x)
            return f
        print(f"certifying through {remote!r} (noise is clipped to [0, 1] on the wire)")
    else:
        base_for_sigma = in_process_bases(cfg, spec)
        num_classes = len(cfg.data.class_names)

    summary = run_certification(base_for_sigma, num_classes, images, labels, spec, out, progress=not args.quiet)
    target = cfg.gate.certified_accuracy_target
    budgets = budget(summary, target)
    summary.pop("records")
    summary["certified_budget"] = budgets
    summary["certified_accuracy_target"] = target
    (out / "certify_summary.json").write_text(json.dumps(summary, indent=2))
    plot = plot_certified_accuracy(summary, out / "certified_accuracy.png", target)
    radii = spec.radii
    print(f"\ncertified accuracy ({len(images)} test images, n0={spec.n0}, n={spec.n}, alpha={spec.alpha}):")
    print("sigma   " + "".join(f"r={r:<6g}" for r in radii) + "  abstain  budget@" + f"{target:g}" + "  seconds")
    for sigma, v in summary["sigmas"].items():
        print(f"{sigma:<8}" + "".join(f"{a:<8.3f}" for a in v["certified_accuracy"])
              + f"  {v['abstain_rate']:<7.3f}  {budgets[sigma]:<9g}  {v['seconds']:.1f}")
    print(f"records: {out / 'certify_records.jsonl'}\nplot:    {plot}")
    return 0
