"""RGB models and images the tests build themselves (no download, no pretrained weights).

* ``colour_shapes``: a seeded synthetic colour data set, 10 classes of coloured shapes on tinted,
  noisy backgrounds, uint8 [N, 3, 32, 32]. A class is a shape (5) times a colour family (warm or
  cool), so a model has to use the channels, not only the grey level.
* ``train_rgb_cnn``: a small RGB CNN trained on it in a few seconds (about 97% on its own test
  split), exported to ONNX: plain NCHW float32 pixels in [0, 1] in, logits out, dynamic batch.
* ``resnet50_like``: a ResNet-50-shaped network (bottleneck blocks [3, 4, 6, 3], 224x224x3,
  1000 classes) written here in torch (torchvision cannot be imported with the CPU torch), random
  weights, batch-norm statistics calibrated on random images so activations stay in range, then
  exported to ONNX. ``width`` 64 is the real ResNet-50 (about 100 MB of weights: build it in a tmp
  dir, never commit it); the default suite uses a slimmer width for speed.
* ``foolbox_images``: the CIFAR-10 / ImageNet / MNIST sample images the foolbox wheel bundles
  (``foolbox/data/<dataset>_<index>_<label>.png|jpg``, found with importlib without importing
  foolbox, which needs eagerpy), written as an ImageFolder-style tree (one sub-folder per class).

Everything is deterministic given its seed; ``cached`` builders write under a caller's folder
and reuse what is already there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
COLOUR_CLASSES = tuple(f"{colour}_{shape}" for colour in ("warm", "cool")
                       for shape in ("disk", "square", "triangle", "stripes", "ring"))
SHAPES = ("disk", "square", "triangle", "stripes", "ring")


VERSION = 1  # bump when a builder changes what it writes: cached files of another version are rebuilt


def cache_dir() -> Path:
    """A per-user folder under the system tmp dir (or ADVSHIELD_TEST_CACHE) for built models."""
    folder = Path(os.environ.get("ADVSHIELD_TEST_CACHE") or Path(tempfile.gettempdir()) / f"advshield-tests-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- the synthetic colour data set ---------------------------------------------------------------

@dataclass(frozen=True)
class ColourSet:
    images: np.ndarray  # uint8 [N, 3, H, W]
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...] = COLOUR_CLASSES

    def as_float(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.images[start:stop].astype(np.float32) / np.float32(255.0)

    def __len__(self) -> int:
        return len(self.labels)


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A bool [size, size] mask of ``shape`` with random centre, extent and (stripes) phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    r = rng.uniform(size * 0.22, size * 0.34)
    if shape == "disk":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    if shape == "square":
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    if shape == "triangle":  # apex up
        top, bottom = cy - r, cy + r
        half = (yy - top) / (2 * r) * r * 1.1
        return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    if shape == "stripes":
        period = rng.uniform(5.0, 7.0)
        return ((xx + rng.uniform(0, period)) % period) < period / 2
    if shape == "ring":
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        return (d <= r) & (d >= r * 0.55)
    raise ValueError(shape)


def _colour(family: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB foreground colour in [0, 1]: family 0 warm (red/orange/yellow), 1 cool (blue/cyan/green-blue)."""
    hi, mid, lo = rng.uniform(0.75, 1.0), rng.uniform(0.1, 0.7), rng.uniform(0.0, 0.25)
    return np.array([hi, mid, lo] if family == 0 else [lo, mid, hi], np.float32)


def colour_shapes(n: int, seed: int = 0, size: int = 32) -> ColourSet:
    """``n`` images, balanced over the 10 classes (label = family * 5 + shape), uint8 NCHW."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = np.empty((n, 3, size, size), np.uint8)
    for i, label in enumerate(labels):
        family, shape = divmod(int(label), 5)
        background = rng.uniform(0.25, 0.6) * np.ones(3, np.float32) + rng.uniform(-0.08, 0.08, 3).astype(np.float32)
        img = np.broadcast_to(background[:, None, None], (3, size, size)).copy()
        mask = _shape_mask(SHAPES[shape], size, rng)
        img[:, mask] = _colour(family, rng)[:, None]
        img += rng.normal(0.0, 0.04, img.shape).astype(np.float32)
        images[i] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return ColourSet(images, labels.astype(np.int64))


def write_image_folder(data: ColourSet, root: str | Path) -> Path:
    """``data`` as PNG files root/<class>/<index>.png (ImageFolder layout; class folders named by
    ``data.classes``, which sort into label order: warm_* after cool_* would not, so they are
    prefixed with the label, ``0_warm_disk``). Existing files are kept."""
    from PIL import Image

    root = Path(root)
    for i, (img, label) in enumerate(zip(data.images, data.labels)):
        dest = root / folder_name(data.classes, int(label)) / f"{i:05d}.png"
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(dest)
    return root


def folder_name(classes: tuple[str, ...], label: int) -> str:
    """The class folder of ``label``: ``<label>_<name>``, so that sorted folders are in label order."""
    return f"{label}_{classes[label]}"


def colour_folder(root: str | Path, *, train_n: int = 1000, test_n: int = 400, data_seed: int = 100) -> Path:
    """The colour set as <root>/<settings>/train/<class>/*.png (seed ``data_seed``) and
    .../test/<class>/*.png (``data_seed + 1``): fresh images of the distribution ``train_rgb_cnn``
    learns, not its own. The folder is named by the settings (reused, never mixed)."""
    folder = Path(root) / f"v{VERSION}_train{train_n}_test{test_n}_seed{data_seed}"
    done = folder / ".complete"
    if not done.is_file():
        write_image_folder(colour_shapes(train_n, seed=data_seed), folder / "train")
        write_image_folder(colour_shapes(test_n, seed=data_seed + 1), folder / "test")
        done.write_text("")
    return folder


# --- the small RGB CNN -----------------------------------------------------------------------------

class SmallRGBNet(nn.Module):
    """conv 3->16 -> pool -> conv 16->32 -> pool -> conv 32->32 -> pool -> linear 512->10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def export_onnx(model: nn.Module, path: Path, shape: tuple[int, int, int], *, opset: int = 17) -> Path:
    """torch.onnx.export (TorchScript exporter, weights inside the file), input ``images``
    [batch, C, H, W], output ``logits`` [batch, K], dynamic batch."""
    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.onnx")
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.zeros((2, *shape)),), str(tmp), input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
            dynamo=False, external_data=False,
        )
    tmp.replace(path)  # a half-written file is never left under the final name
    return path


@dataclass(frozen=True)
class TrainedRGB:
    path: Path  # the ONNX file
    train: ColourSet
    test: ColourSet
    accuracy: float  # torch model on ``test``
    seconds: float


def train_rgb_cnn(folder: str | Path, *, train_n: int = 3000, test_n: int = 1000, epochs: int = 5,
                  seed: int = 0, threads: int = 1, name: str = "rgb_cnn", data_seed: int = 0) -> TrainedRGB:
    """Train ``SmallRGBNet`` on ``colour_shapes`` and export ``folder/<name>.onnx`` (reused when
    its sidecar records the same settings). ``seed`` sets the weights and the batch order,
    ``data_seed`` the data set (train: data_seed, test: data_seed + 1): a surrogate for transfer
    attacks is the same recipe with another ``seed`` (and, for independence, another ``data_seed``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, meta_file = folder / f"{name}.onnx", folder / f"{name}.json"
    settings = {"version": VERSION, "train_n": train_n, "test_n": test_n, "epochs": epochs, "seed": seed,
                "data_seed": data_seed}
    train, test = colour_shapes(train_n, seed=data_seed), colour_shapes(test_n, seed=data_seed + 1)
    if path.is_file() and meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("settings") == settings:
            return TrainedRGB(path, train, test, meta["accuracy"], meta["seconds"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        torch.manual_seed(seed)
        net = SmallRGBNet()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        x, y = torch.from_numpy(train.as_float()), torch.from_numpy(train.labels)
        g = torch.Generator().manual_seed(seed)
        steps = epochs * ((len(x) + 63) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = order[i : i + 64]
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            pred = torch.cat([net(torch.from_numpy(test.as_float(i, i + 500))).argmax(1)
                              for i in range(0, len(test), 500)])
        accuracy = float((pred.numpy() == test.labels).mean())
        export_onnx(net, path, (3, 32, 32))
    finally:
        torch.set_num_threads(before)
    seconds = round(time.perf_counter() - t0, 2)
    meta_file.write_text(json.dumps({"settings": settings, "accuracy": accuracy, "seconds": seconds,
                                     "classes": list(COLOUR_CLASSES)}, indent=2))
    return TrainedRGB(path, train, test, accuracy, seconds)


# --- the ResNet-50-shaped network -------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, as torchvision's v1.5) -> 1x1 expand (x4), + shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet50Like(nn.Module):
    """ResNet-50's layout: 7x7/2 stem, 3x3/2 max pool, stages of [3, 4, 6, 3] bottlenecks of widths
    w, 2w, 4w, 8w (w = 64 for ResNet-50: 25.6 M parameters), global average pool, linear."""

    def __init__(self, width: int = 64, classes: int = 1000, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        stages = []
        for i, n in enumerate(blocks):
            w = width * 2**i
            layers = []
            for j in range(n):
                layers.append(Bottleneck(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def random_resnet50(width: int = 64, classes: int = 1000, seed: int = 0, calibrate: int = 8,
                    size: int = 224) -> ResNet50Like:
    """Random weights (He initialisation), batch-norm running statistics measured on ``calibrate``
    random images so every layer's activations stay normalised, the last BN of each block scaled
    down (residual branches add to, rather than swamp, the shortcut), eval mode."""
    torch.manual_seed(seed)
    net = ResNet50Like(width, classes)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    for m in net.modules():
        if isinstance(m, Bottleneck):
            nn.init.constant_(m.bn3.weight, 0.3)
    nn.init.normal_(net.fc.weight, std=0.5 / np.sqrt(net.fc.in_features))
    nn.init.zeros_(net.fc.bias)
    g = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        for _ in range(max(1, calibrate // 4)):
            net(torch.rand((4, 3, size, size), generator=g))
    return net.eval()


def resnet50_like(folder: str | Path, *, width: int = 64, classes: int = 1000, seed: int = 0,
                  size: int = 224) -> Path:
    """``folder/resnet50_w{width}.onnx`` (built once, reused when present)."""
    path = Path(folder) / f"resnet50_w{width}_{size}_c{classes}_s{seed}_v{VERSION}.onnx"
    if not path.is_file():
        net = random_resnet50(width, classes, seed, size=size)
        export_onnx(net, path, (3, size, size))
    return path


# The tensor at the output of ResNet's first bottleneck stage, as the TorchScript exporter names it.
RESNET_STAGE1 = "/layer1/layer1.2/relu_2/Relu_output_0"


# --- foolbox's bundled sample images ------------------------------------------------------------------

def foolbox_data_dir() -> Path:
    """The ``foolbox/data`` folder of the installed wheel (without importing foolbox)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("foolbox is not installed (pip install --no-deps foolbox)")
    folder = Path(spec.origin).parent / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"foolbox is installed but has no data folder at {folder}")
    return folder


KINDS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "mnist": 10, "fashionMNIST": 10}


@dataclass(frozen=True)
class ImageTree:
    root: Path  # root/<class>/<file>
    classes: tuple[str, ...]  # every class of the data set in output order (folder names)
    classes_file: Path  # one name per line, beside the tree
    files: tuple[Path, ...]  # the written images, in foolbox's index order
    labels: tuple[int, ...]  # their labels


def class_folder(kind: str, label: int) -> str:
    """Folder names that sort into output order: CIFAR-10's names (already alphabetical), else the
    label zero-padded (``0243``)."""
    if kind == "cifar10":
        return CIFAR10_CLASSES[label]
    return f"{label:04d}"


def foolbox_images(kind: str, root: str | Path | None = None) -> ImageTree:
    """Write foolbox's 20 sample images of ``kind`` (cifar10, cifar100, imagenet, mnist,
    fashionMNIST) under ``root`` as root/<class>/<dataset>_<index>.<ext> (ImageFolder layout),
    plus ``<root>.classes.txt`` listing every class of the data set. Without ``root``: a
    folder under the system tmp dir."""
    if kind not in KINDS:
        raise ValueError(f"kind: one of {', '.join(KINDS)}, got {kind!r}")
    source = foolbox_data_dir()
    found = []
    for p in source.iterdir():
        stem = p.stem.split("_")
        if len(stem) == 3 and stem[0] == kind and p.suffix.lower() in (".png", ".jpg", ".jpeg"):
            found.append((int(stem[1]), int(stem[2]), p))
    if not found:
        raise FileNotFoundError(f"no {kind} images in {source}")
    found.sort()
    if root is None:
        root = Path(tempfile.mkdtemp(prefix=f"foolbox_{kind}_")) / kind
    root = Path(root)
    files, labels = [], []
    for index, label, p in found:
        dest = root / class_folder(kind, label) / f"{kind}_{index:02d}{p.suffix.lower()}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.is_file():
            shutil.copyfile(p, dest)
        files.append(dest)
        labels.append(label)
    classes = tuple(class_folder(kind, i) for i in range(KINDS[kind]))
    classes_file = root.parent / f"{root.name}.classes.txt"
    classes_file.write_text("\n".join(classes) + "\n")
    return ImageTree(root, classes, classes_file, tuple(files), tuple(labels))
