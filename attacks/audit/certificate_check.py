"""The certified-radius sanity check: adversarial examples inside certified radii, on the smoothed
classifier that was certified."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advshield.attacks.audit.records import derive_seed, load_examples
from advshield.attacks.registry import run_attack
from advshield.attacks.threat import ThreatModel, check_adversarial
from advshield.core.progress import progress as progress_bar
from advshield.plugin.smoothing import ABSTAIN, SmoothedClassifier


def certificate_check(
    base_for_sigma: Callable[[float], Callable[[torch.Tensor], torch.Tensor]],
    num_classes: int,
    cert_records: Sequence[Mapping[str, Any]],
    cert_spec: Any,
    out: Path,
    records: Sequence[Mapping[str, Any]],
    images: Mapping[int, np.ndarray],
    *,
    attack_model_for_sigma: Callable[[float], Any] | None = None,
    checks: int = 20,
    steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Look, on the smoothed classifier g, for adversarial examples inside certified radii.

    For up to ``checks`` audited samples per sigma certified correctly with radius R > 0: (a) each
    stored minimal-attack example of that sample with L2 distortion < R, and (b) when
    ``attack_model_for_sigma`` is given, PGD-L2 at eps = R against the EOT-smoothed pipeline (the
    base that was certified, behind Gaussian noise of that sigma, gradients averaged over draws;
    for a noise-trained base model, that model's twin), clipped, checked and
    rounded like every audit example, are classified by g (PREDICT with ``cert_spec``'s n and
    alpha). g answering a class other than the label (not ABSTAIN) inside R violates the
    certificate. ``images``: clean image (float32 CHW) per sample index."""
    minimal = sorted({r["attack"] for r in records if r["kind"] == "minimal"})
    examples = {a: load_examples(out, a) for a in minimal}
    found = {(r["attack"], r["sample"]): r for r in records if r["kind"] == "minimal" and r["success"]}
    violations: list[dict[str, Any]] = []
    checked = 0
    for sigma in cert_spec.sigmas:
        rows = [r for r in cert_records if math.isclose(r["sigma"], sigma) and r["correct"] and r["radius"] > 0
                and r["index"] in images][:checks]
        if not rows:
            continue
        # the smoothed classifier that was certified, with noise independent of the certification's
        # own stream (its seed would replay the very draws the certificate was computed from)
        config = replace(cert_spec.smoothing(sigma), seed=derive_seed(seed, "certificate check", sigma))
        smoothed = SmoothedClassifier(base_for_sigma(sigma), num_classes, config)
        model = attack_model_for_sigma(sigma) if attack_model_for_sigma is not None else None
        for r in progress_bar(rows, desc=f"certificate check sigma={sigma:g}", enabled=progress, unit="img"):
            radius, label, sample = float(r["radius"]), int(r["label"]), int(r["index"])
            candidates: list[tuple[str, np.ndarray]] = []
            for a in minimal:
                rec = found.get((a, sample))
                if rec is not None and rec["l2"] < radius and sample in examples[a]:
                    candidates.append((a, examples[a][sample]))
            if model is not None:
                x = torch.from_numpy(np.ascontiguousarray(images[sample][None], np.float32))
                y = torch.tensor([label])
                model.reset(seed=derive_seed(seed, "certificate", sigma, sample))
                adv = run_attack("pgd_l2", model, x, y, eps=radius, steps=steps, seed=derive_seed(seed, sigma, sample))
                ok = check_adversarial(x, adv, ThreatModel("l2", radius))
                if bool(ok.valid[0]):
                    candidates.append(("pgd_l2 on the smoothed pipeline", ok.adversarial[0].numpy()))
            for name, adv_img in candidates:
                checked += 1
                pred = smoothed.predict(torch.from_numpy(np.ascontiguousarray(adv_img, np.float32)), index=sample)
                if pred not in (label, ABSTAIN):
                    violations.append({"sigma": sigma, "sample": sample, "label": label, "radius": radius,
                                       "attack": name, "smoothed_prediction": int(pred)})
    return {"checked": checked, "violations": violations}
