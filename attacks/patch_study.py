"""The patch-replacement study (H. Zhang's thesis, ch. 6, Tables 6.1-6.4), on one model and data set.

Each *configuration* is a list of defense tables exactly as a pipeline file's ``[[defenses]]``
(patch replacement on the image, on a feature layer, or both stacked; or a squeezer: bit depth,
median, JPEG; or nothing). For each one the study measures:

* **fit**: the seconds to learn its codebooks on clean training images (codebooks of equal
  parameters are learnt once and reused: strategies and eps do not change a codebook);
* **clean accuracy** and **throughput** (images/s) through the serving path (ONNX Runtime, the
  model split around feature-layer defenses);
* **adaptive attacks**: the audit's minimal attacks, DDN and BP, through BPDA (every
  non-differentiable step's backward pass is its approximation, the identity for patch
  replacement and bit depth), crafted on the differentiable twin; every example clipped, rounded to
  8 bits and re-scored through the serving path, as the audit does. Per sample the least
  distortion of the two that succeeded: P_suc (over the correct samples), the conditional mean L2
  distortion D-bar and the median (+inf for samples not broken);
* **smooth examples** (``smooth=True``, the thesis's open problem 2): sC&W through BPDA (adaptive),
  and transfer: DDN, C&W and sC&W examples crafted once on the *undefended* twin, then scored
  through each configuration's serving path (the thesis's Table 6.2 setting).

``run_patch_study`` returns the rows; ``markdown_table`` and ``plot_study`` render them (clean
accuracy against the distortion adaptive attacks need). Grids: ``default_configurations``
(a few minutes on 2 CPU cores) and ``grid_configurations`` (the full sweep).
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from advshield.attacks import metrics as M
from advshield.attacks.adaptive import AttackModel
from advshield.attacks.boundary_projection import bp
from advshield.attacks.carlini_wagner import cw_l2
from advshield.attacks.decoupled_direction_norm import ddn
from advshield.attacks.smooth import scw_l2
from advshield.attacks.threat import ThreatModel, check_adversarial
from advshield.core.errors import ConfigError
from advshield.core.progress import progress as progress_bar
from advshield.core.progress import write as progress_write
from advshield.defenses.base import Defense
from advshield.defenses.registry import build_defense, parse_defense
from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier
from advshield.plugin.split import IMAGE_LAYER, attach_feature_defenses, feature_extractor, layer_of

Table = Mapping[str, Any]
STRATEGY_EPS = {"plain": 0.0, "l2": 0.5, "linf": 0.1, "linear": 0.5}  # a mid value per strategy


@dataclass(frozen=True)
class Configuration:
    """One defended classifier of the study: a label, its family (``none``, ``patches``,
    ``bit_depth``, ``median``, ``jpeg``) and its defense tables in pipeline order."""

    label: str
    family: str
    defenses: tuple[Table, ...] = ()


@dataclass(frozen=True)
class StudySettings:
    samples: int = 50  # test images attacked (the first ones)
    clean: int = 1000  # test images for clean accuracy and throughput
    attack_steps: int = 100  # DDN and BP iterations (the audit's default)
    smooth: bool = False  # sC&W adaptive + DDN/C&W/sC&W transfer (open problem 2)
    smooth_steps: int = 20  # sC&W / C&W: steps per binary-search step (5 of them)
    sample: int = 65_536  # training patches per slice for k-means
    fit_images: int = 5_000
    iterations: int = 10  # k-means iterations
    seed: int = 0
    feature_layer: str = "relu"  # the "first feature layer" of the model
    batch: int = 50  # images per attack batch

    def __post_init__(self) -> None:
        for name in ("samples", "clean", "attack_steps", "smooth_steps", "sample", "fit_images", "iterations", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"study: {name} must be >= 1, got {getattr(self, name)}")


# --- configurations ------------------------------------------------------------------------------

def patch_table(settings: StudySettings, *, layer: str = IMAGE_LAYER, codewords: int = 4096, radius: int = 1,
                stride: int = 2, depth: int | None = None, strategy: str = "plain", eps: float | None = None,
                artifact: str = "") -> dict[str, Any]:
    feature = layer != IMAGE_LAYER
    return {
        "type": "patch_replacement", "layer": settings.feature_layer if layer == "feature" else layer,
        "depth": depth or (4 if feature else 1), "radius": radius, "stride": stride, "codewords": codewords,
        "strategy": strategy, "eps": STRATEGY_EPS[strategy] if eps is None else eps,
        "sample": settings.sample, "fit_images": settings.fit_images, "iterations": settings.iterations,
        "seed": settings.seed, "artifact": artifact or "codebook",
    }


def _patch_label(t: Table) -> str:
    where = "img" if t["layer"] == IMAGE_LAYER else f"{t['layer']}/d{t['depth']}"
    k = 2 * t["radius"] + 1
    strat = t["strategy"] if t["strategy"] == "plain" else f"{t['strategy']}({t['eps']:g})"
    return f"{where} K{t['codewords']} {k}x{k} c{t['stride']} {strat}"


def patches(label: str, *tables: Table) -> Configuration:
    return Configuration(label or " + ".join(_patch_label(t) for t in tables), "patches", tuple(tables))


def squeezers(full: bool = False) -> list[Configuration]:
    bits = (1, 2, 3, 4, 5) if full else (1, 2, 3)
    qualities = (10, 25, 50, 75, 90) if full else (10, 25, 50)
    return ([Configuration(f"bit{b}", "bit_depth", ({"type": "bit_depth", "bits": b},)) for b in bits]
            + [Configuration(f"median{s}", "median", ({"type": "median", "size": s},)) for s in (2, 3)]
            + [Configuration(f"jpeg{q}", "jpeg", ({"type": "jpeg", "quality": q},)) for q in qualities])


def default_configurations(settings: StudySettings) -> list[Configuration]:
    """A few points of each axis around the shipped configuration (image layer, K = 4096, 3x3,
    stride 2, plain): codebook size, patch size, stride, strategy, layer; plus the squeezers."""
    p = lambda **kw: patch_table(settings, **kw)  # noqa: E731
    out = [Configuration("undefended", "none")]
    out += [patches("", p(codewords=k)) for k in (64, 256, 4096)]
    out += [patches("", p(radius=2, stride=3)), patches("", p(stride=1))]
    out += [patches("", p(codewords=256, strategy=s)) for s in ("l2", "linf", "linear")]
    feat = p(layer="feature", codewords=256, strategy="linf", eps=0.3, artifact="codebook_feature")
    out += [patches("", feat), patches("", p(), feat)]
    return out + squeezers()


def grid_configurations(settings: StudySettings) -> list[Configuration]:
    """The full sweep: K x patch size x stride x strategy (two eps each) on the image; K x strategy
    on the first feature layer; the image's best-known codebook stacked with each feature one."""
    out = [Configuration("undefended", "none")]
    strategies = [("plain", 0.0), ("l2", 0.25), ("l2", 1.0), ("linf", 0.05), ("linf", 0.2),
                  ("linear", 0.3), ("linear", 0.7)]
    for k, radius, (s, e) in itertools.product((64, 256, 1024, 4096), (1, 2), strategies):
        for stride in sorted({1, radius + 1, 2 * radius + 1}):
            out.append(patches("", patch_table(settings, codewords=k, radius=radius, stride=stride, strategy=s, eps=e)))
    feats = []
    for k, (s, e) in itertools.product((64, 256, 1024), [("plain", 0.0), ("linf", 0.1), ("linf", 0.3), ("l2", 0.5)]):
        feats.append(patch_table(settings, layer="feature", codewords=k, strategy=s, eps=e, artifact="codebook_feature"))
    out += [patches("", f) for f in feats]
    out += [patches("", patch_table(settings), f) for f in feats]
    return out + squeezers(full=True)


# --- evaluation ----------------------------------------------------------------------------------

def _codebook_key(cfg: Any) -> tuple:
    return (cfg.layer, cfg.depth, cfg.radius, cfg.stride, cfg.padding, cfg.codewords, cfg.sample, cfg.fit_images,
            cfg.iterations, cfg.seed)


class CodebookFitter:
    """Fits patch codebooks, once per distinct set of codebook parameters."""

    def __init__(self, model: Any, train: torch.Tensor, work: Path, seed: int) -> None:
        self.model, self.train, self.work, self.seed = model, train, work, seed
        self.cache: dict[tuple, tuple[np.ndarray, float]] = {}
        self.features: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, defense: Defense) -> float:
        """Fit (or reuse) ``defense``'s codebook; the seconds its fit took (0 for nothing to fit)."""
        if not getattr(defense, "needs_fit", False):
            return 0.0
        cfg = defense.config
        key = _codebook_key(cfg)
        if key not in self.cache:
            layer = layer_of(defense)
            if layer != IMAGE_LAYER:
                if layer not in self.features:
                    self.features[layer] = feature_extractor(self.model, layer, device="cpu", threads=1)
                defense.bind_features(self.features[layer])  # type: ignore[attr-defined]
            path = self.work / f"codebook_{len(self.cache)}.npy"
            t0 = time.perf_counter()
            defense.fit(self.train, {cfg.artifact: path}, seed=self.seed, progress=False)  # type: ignore[call-arg]
            self.cache[key] = (np.load(path, allow_pickle=False), time.perf_counter() - t0)
        centroids, seconds = self.cache[key]
        defense.set_codebooks(centroids)  # type: ignore[attr-defined]
        return seconds


def build_configuration(conf: Configuration) -> list[Defense]:
    out = []
    for i, table in enumerate(conf.defenses):
        name, config = parse_defense(dict(table), f"study[{conf.label}].defenses[{i}]")
        out.append(build_defense(name, config))
    return out


class Served:
    """A configuration's serving path: image-layer defenses, then the ONNX Runtime classifier (split
    around the feature-layer defenses)."""

    def __init__(self, model: Any, defenses: Sequence[Defense]) -> None:
        self.classifier, self.image = attach_feature_defenses(None, OnnxClassifier(model, device="cpu", threads=1,
                                                                                  validate=False), defenses)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 500) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch):
            h = x[i : i + batch]
            for d in self.image:
                h = d(h)
            out.append(self.classifier(h).argmax(1).cpu().numpy())
        return np.concatenate(out)


def attack_view(model: Any, defenses: Sequence[Defense]) -> AttackModel:
    """The configuration as the adaptive attacker sees it: BPDA through every non-differentiable
    step, the differentiable twin (split around feature-layer defenses)."""
    twin = TwinClassifier(model, device="cpu", validate=False)
    clf, image = attach_feature_defenses(None, twin, defenses)
    return AttackModel(clf, image)


def judge_served(served: Served, x: torch.Tensor, y: np.ndarray, adv: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The audit's never-trust check: clip, round to 8 bits, re-score through the serving path.
    (success [N], L2 distortion [N])."""
    checked = check_adversarial(x, adv, ThreatModel(levels=256))
    pred = served.predict(checked.adversarial)
    return (pred != y) & checked.valid.numpy(), checked.l2.numpy().astype(np.float64)


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)])


def _summary(prefix: str, success: np.ndarray, dist: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    return {f"{prefix}_p_suc": M.success_probability(success, correct),
            f"{prefix}_mean_l2": M.conditional_distortion(dist, success, correct),
            f"{prefix}_median_l2": M.median_distortion(dist, success, correct)}


def evaluate(conf: Configuration, model: Any, fitter: CodebookFitter, test_x: torch.Tensor, test_y: np.ndarray,
             settings: StudySettings, transfer: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """One row of the study (see the module docstring)."""
    defenses = build_configuration(conf)
    fit_s = sum(fitter(d) for d in defenses)
    served = Served(model, defenses)
    clean_x, clean_y = test_x[: settings.clean], test_y[: settings.clean]
    served.predict(clean_x[:50])  # warm-up
    t0 = time.perf_counter()
    pred = served.predict(clean_x)
    throughput = len(clean_x) / (time.perf_counter() - t0)
    row: dict[str, Any] = {
        "label": conf.label, "family": conf.family, "defenses": [dict(t) for t in conf.defenses],
        "fit_seconds": round(fit_s, 2), "clean_accuracy": float((pred == clean_y).mean()),
        "clean_images": len(clean_x), "images_per_second": round(throughput, 1),
    }
    x, y = test_x[: settings.samples], test_y[: settings.samples]
    yt = torch.from_numpy(y).long()
    correct = served.predict(x) == y
    model_view = attack_view(model, defenses)
    t0 = time.perf_counter()
    results = {}
    for name, fn in (("ddn", lambda a, b: ddn(model_view, a, b, steps=settings.attack_steps)),
                     ("bp", lambda a, b: bp(model_view, a, b, steps=settings.attack_steps))):
        results[name] = judge_served(served, x, y, _batched(fn, x, yt, settings.batch))
    success, dist = M.best_of(np.stack([results[k][0] for k in results]), np.stack([results[k][1] for k in results]))
    dist = np.where(np.isfinite(dist), dist, 0.0)
    row.update(_summary("bpda", success & correct, dist, correct))
    row.update({f"bpda_{k}_p_suc": M.success_probability(s & correct, correct) for k, (s, _) in results.items()})
    row["attacked"] = len(x)
    row["correct"] = int(correct.sum())
    if settings.smooth:
        adv = _batched(lambda a, b: scw_l2(model_view, a, b, steps=settings.smooth_steps), x, yt, settings.batch)
        s, d = judge_served(served, x, y, adv)
        row.update(_summary("scw_adaptive", s & correct, d, correct))
        for name, adv in (transfer or {}).items():
            s, d = judge_served(served, x, y, adv)
            row.update(_summary(f"{name}_transfer", s & correct, d, correct))
    row["attack_seconds"] = round(time.perf_counter() - t0, 1)
    return row


def transfer_examples(model: Any, x: torch.Tensor, y: np.ndarray, settings: StudySettings) -> dict[str, torch.Tensor]:
    """DDN, C&W and sC&W examples crafted once on the undefended twin (the defense unknown to the
    attacker), reused for every configuration."""
    twin = TwinClassifier(model, device="cpu", validate=False)
    yt = torch.from_numpy(y).long()
    s = settings.smooth_steps
    return {
        "ddn": _batched(lambda a, b: ddn(twin, a, b, steps=settings.attack_steps), x, yt, settings.batch),
        "cw": _batched(lambda a, b: cw_l2(twin, a, b, steps=s), x, yt, settings.batch),
        "scw": _batched(lambda a, b: scw_l2(twin, a, b, steps=s), x, yt, settings.batch),
    }


def run_patch_study(model: Any, train: np.ndarray | torch.Tensor, test: tuple[np.ndarray, np.ndarray],
                    configurations: Sequence[Configuration], settings: StudySettings, *, progress: bool = True,
                    on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every configuration's row (fit, clean accuracy, throughput, adaptive P_suc / D-bar, and with
    ``settings.smooth`` sC&W adaptive and transfer); ``model``: an ONNX file or WrappedModel whose
    input is pixels in [0, 1]; ``train``: clean training images [N, C, H, W]; ``test``: images and labels."""
    labels = [c.label for c in configurations]
    dup = sorted({v for v in labels if labels.count(v) > 1})
    if dup:
        raise ConfigError(f"study: configurations {dup} appear twice")
    train_t = torch.as_tensor(np.asarray(train, np.float32))
    test_x, test_y = torch.as_tensor(np.asarray(test[0], np.float32)), np.asarray(test[1], np.int64)
    transfer = None
    if settings.smooth:
        transfer = transfer_examples(model, test_x[: settings.samples], test_y[: settings.samples], settings)
    rows = []
    with tempfile.TemporaryDirectory(prefix="advshield-study-") as work:
        fitter = CodebookFitter(model, train_t, Path(work), settings.seed)
        for conf in progress_bar(configurations, enabled=progress, desc="study", unit="config"):
            row = evaluate(conf, model, fitter, test_x, test_y, settings, transfer)
            rows.append(row)
            if progress:
                progress_write(f"{row['label']:<34} clean {row['clean_accuracy']:.3f}  P_suc {row['bpda_p_suc']:.2f}  "
                               f"D-bar {row['bpda_mean_l2']:.3f}  {row['images_per_second']:.0f} img/s")
            if on_row is not None:
                on_row(row)
    return mark_comparable(rows)


COMPARABLE = 0.005  # clean accuracy a squeezer may lose and still count as comparable (half a point)


def mark_comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each patch configuration: the squeezer of nearest clean accuracy, and the *best*
    squeezer at comparable clean accuracy (at least the patch's minus ``COMPARABLE``: the one
    adaptive attacks need the most distortion against) with the ratio of the two D-bars (> 1:
    patch replacement needs more distortion than any squeezer that is as accurate)."""
    squeeze = [r for r in rows if r["family"] in ("bit_depth", "median", "jpeg")]
    for r in rows:
        if r["family"] != "patches" or not squeeze:
            continue
        near = min(squeeze, key=lambda s: abs(s["clean_accuracy"] - r["clean_accuracy"]))
        r["nearest_squeezer"] = near["label"]
        r["nearest_squeezer_mean_l2"] = near["bpda_mean_l2"]
        ok = [s for s in squeeze if s["clean_accuracy"] >= r["clean_accuracy"] - COMPARABLE
              and np.isfinite(s["bpda_mean_l2"])]
        if ok:
            best = max(ok, key=lambda s: s["bpda_mean_l2"])
            r["best_comparable_squeezer"] = best["label"]
            r["best_comparable_squeezer_mean_l2"] = best["bpda_mean_l2"]
            r["ratio_to_best_comparable_squeezer"] = r["bpda_mean_l2"] / best["bpda_mean_l2"]
    return rows


# --- rendering -----------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], smooth: bool = False) -> str:
    head = ["configuration", "clean acc", "fit s", "img/s", "BPDA P_suc", "BPDA D-bar", "BPDA median",
            "nearest squeezer (D-bar)", "best squeezer >= acc - 0.5 pt (D-bar)", "D-bar / that"]
    if smooth:
        head += ["sC&W adapt. P_suc", "sC&W adapt. D-bar", "DDN transfer P_suc", "C&W transfer P_suc",
                 "sC&W transfer P_suc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        near = f"{r['nearest_squeezer']} ({_fmt(r['nearest_squeezer_mean_l2'])})" if "nearest_squeezer" in r else "-"
        best = (f"{r['best_comparable_squeezer']} ({_fmt(r['best_comparable_squeezer_mean_l2'])})"
                if "best_comparable_squeezer" in r else "-")
        cells = [r["label"], _fmt(r["clean_accuracy"]), _fmt(r["fit_seconds"], 1), _fmt(r["images_per_second"], 0),
                 _fmt(r["bpda_p_suc"], 2), _fmt(r["bpda_mean_l2"]), _fmt(r["bpda_median_l2"]), near, best,
                 _fmt(r.get("ratio_to_best_comparable_squeezer"), 2)]
        if smooth:
            cells += [_fmt(r.get("scw_adaptive_p_suc"), 2), _fmt(r.get("scw_adaptive_mean_l2")),
                      _fmt(r.get("ddn_transfer_p_suc"), 2), _fmt(r.get("cw_transfer_p_suc"), 2),
                      _fmt(r.get("scw_transfer_p_suc"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


MARKERS = {"none": ("black", "*"), "patches": ("tab:blue", "o"), "bit_depth": ("tab:orange", "s"),
           "median": ("tab:green", "^"), "jpeg": ("tab:red", "D")}


def plot_study(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Clean accuracy (x) against the mean L2 distortion adaptive BPDA attacks need (y)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for family, (color, marker) in MARKERS.items():
        pts = [r for r in rows if r["family"] == family and np.isfinite(r["bpda_mean_l2"])]
        if pts:
            ax.scatter([r["clean_accuracy"] for r in pts], [r["bpda_mean_l2"] for r in pts], c=color, marker=marker,
                       label=family, s=36)
            for r in pts:
                if family in ("none", "patches"):
                    ax.annotate(r["label"], (r["clean_accuracy"], r["bpda_mean_l2"]), fontsize=6,
                                xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("BPDA (DDN/BP best) mean L2 distortion of successes")
    ax.set_title(title or "patch replacement vs squeezers under adaptive attacks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
