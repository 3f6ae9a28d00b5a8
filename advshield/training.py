"""Reference models: small CNNs for 28x28 images, trained here, exported to single-file ONNX.

Inputs are float32 NCHW in [0, 1]; the data set's mean/std normalization is folded into the
model, so every epsilon is in pixel units. Training is seeded and reproducible on a given machine
(same seed, same thread count -> same weights).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from advshield.core.data import Dataset, load_fashion_mnist
from advshield.core.errors import ConfigError, ParityError
from advshield.core.hashing import sha256_file
from advshield.core.progress import progress as progress_bar
from advshield.core.progress import write as progress_write

log = logging.getLogger(__name__)


class Normalize(nn.Module):
    """(x - mean) / std inside the model, so the model's inputs stay in [0, 1]."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def cnn(channels: int = 1, classes: int = 10, mean: float = 0.2860, std: float = 0.3530) -> nn.Sequential:
    """The reference classifier: 3x3 convolutions, max pooling, ReLU (~0.43 M parameters)."""
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        nn.Linear(128, classes),
    )


def surrogate(channels: int = 1, classes: int = 10, mean: float = 0.2860, std: float = 0.3530) -> nn.Sequential:
    """The transfer-attack surrogate: a different architecture (5x5 convolutions, average pooling,
    ELU, wider dense layer), trained from an independent initialisation."""
    return nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(channels, 24, 5, padding=2), nn.ELU(),
        nn.AvgPool2d(2),
        nn.Conv2d(24, 48, 5, padding=2), nn.ELU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(48 * 7 * 7, 256), nn.ELU(),
        nn.Linear(256, classes),
    )


ARCHITECTURES: dict[str, Callable[..., nn.Sequential]] = {"cnn": cnn, "surrogate": surrogate}


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "cnn"
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3  # peak of the one-cycle schedule (Adam)
    seed: int = 0
    noise_sigma: float = 0.0  # Gaussian augmentation (for randomized smoothing)
    threads: int = 2

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch: unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.noise_sigma < 0:
            raise ConfigError(f"noise_sigma: must be >= 0, got {self.noise_sigma}")


@dataclass(frozen=True)
class TrainResult:
    config: TrainConfig
    test_accuracy: float
    train_seconds: float
    train_sha256: str
    history: tuple[float, ...]  # test accuracy after each epoch


def _to_tensor(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.as_float()), torch.from_numpy(ds.labels)


@torch.no_grad()
def accuracy(model: nn.Module, ds: Dataset, batch_size: int = 1000, noise_sigma: float = 0.0, seed: int = 0) -> float:
    model.eval()
    x, y = _to_tensor(ds)
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if noise_sigma:
            xb = xb + noise_sigma * torch.randn(xb.shape, generator=g)
        correct += int((model(xb).argmax(1) == y[i : i + batch_size]).sum())
    return correct / len(x)


def train(train_ds: Dataset, test_ds: Dataset, cfg: TrainConfig, progress: bool = True) -> tuple[nn.Module, TrainResult]:
    """Train ``cfg.arch`` on ``train_ds``; seeded; returns the model (eval mode) and a summary."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = _to_tensor(train_ds)
    channels = x.shape[1]
    mean, std = float(x.mean()), float(x.std())
    model = ARCHITECTURES[cfg.arch](channels=channels, classes=len(train_ds.classes), mean=mean, std=std)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr / 10)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    history = []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        bar = progress_bar(range(steps_per_epoch), desc=f"{cfg.arch} epoch {epoch + 1}/{cfg.epochs}", enabled=progress,
                           unit="batch", leave=False)
        for step in bar:
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if cfg.noise_sigma:
                xb = xb + cfg.noise_sigma * torch.randn(xb.shape, generator=g)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = accuracy(model, test_ds, noise_sigma=cfg.noise_sigma, seed=cfg.seed)
        history.append(acc)
        if progress:
            progress_write(f"{cfg.arch}: epoch {epoch + 1}/{cfg.epochs} test accuracy {acc:.4f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    result = TrainResult(cfg, history[-1], time.perf_counter() - t0, train_ds.sha256(), tuple(history))
    return model, result


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], tolerance: float = 1e-4) -> float:
    """Export to one self-contained ONNX file (dynamic batch) and check it against torch.

    Returns the max |logit difference| between ONNX Runtime and torch on a probe batch; raises
    ParityError above ``tolerance``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    # the dynamo exporter logs an error when it cannot import torchvision (CPU torch builds)
    reg_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = reg_log.level
    reg_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation chatter
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, external_data=False,
                input_names=["images"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},), verbose=False,
            )
    finally:
        reg_log.setLevel(level)
    strip_source_paths(path)
    probe = torch.rand((64, *input_shape), generator=torch.Generator().manual_seed(1))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(probe).numpy()
    out = sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})[0]
    diff = float(np.abs(out - ref).max())
    if diff > tolerance:
        raise ParityError(f"exported ONNX disagrees with torch: max |logit difference| {diff:.3g} > {tolerance:.3g}")
    return diff


def strip_source_paths(path: str | Path) -> None:
    """Remove what the exporter records about the machine that exported the model (node doc
    strings and metadata holding Python stack traces with absolute source paths); the graph and
    its weights are unchanged."""
    import onnx

    model = onnx.load(str(path))

    def clean(graph) -> None:
        graph.doc_string = ""
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    clean(attr.g)
                for g in attr.graphs:
                    clean(g)
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            vi.doc_string = ""
            del vi.metadata_props[:]

    clean(model.graph)
    model.doc_string = ""
    del model.metadata_props[:]
    onnx.save(model, str(path))


def write_model_card(onnx_path: str | Path, result: TrainResult, parity: float, **extra) -> Path:
    card = {
        "model": Path(onnx_path).name,
        "sha256": sha256_file(onnx_path),
        "train": asdict(result.config),
        "test_accuracy": result.test_accuracy,
        "accuracy_per_epoch": list(result.history),
        "train_seconds": round(result.train_seconds, 1),
        "train_data_sha256": result.train_sha256,
        "onnx_parity_max_abs_diff": parity,
        "torch_version": torch.__version__,
        **extra,
    }
    out = Path(str(onnx_path).removesuffix(".onnx") + ".json")
    out.write_text(json.dumps(card, indent=2))
    return out


def train_models(out: Path, *, data_dir: str | Path | None = None, epochs: int = 4, seed: int = 0,
                 noise_sigma: float = 0.0, surrogate: bool = True, threads: int = 2,
                 progress: bool = True) -> dict[str, dict]:
    """Train the reference CNN (and the transfer surrogate) on Fashion-MNIST, export each to ONNX
    with its model card in ``out``; returns the cards by file stem."""
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
