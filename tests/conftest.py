"""Shared fixtures: the real Fashion-MNIST test split and the embedded reference models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advshield.core.data import FASHION_MNIST_DIR, load_fashion_mnist
from advshield.core.resources import DEFAULT_PIPELINE

MODELS = Path(DEFAULT_PIPELINE).parent.parent / "models"

torch.set_num_threads(2)


def pytest_configure(config):
    if not FASHION_MNIST_DIR.is_dir():
        raise pytest.UsageError(
            f"Fashion-MNIST is missing at {FASHION_MNIST_DIR}: apt-get install -y dataset-fashion-mnist"
        )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of small models: on a shared 2-core machine a second thread adds
    only synchronisation (measured: C&W on the linear model 0.2 s with one thread, 18 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fashion_test():
    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def model_path() -> Path:
    return MODELS / "fashion_cnn.onnx"


@pytest.fixture(scope="session")
def surrogate_path() -> Path:
    return MODELS / "fashion_surrogate.onnx"


@pytest.fixture(scope="session")
def pipeline_path() -> Path:
    return Path(DEFAULT_PIPELINE)


@pytest.fixture(scope="session")
def onnx_classifier(model_path):
    from advshield.plugin.classifiers import OnnxClassifier

    return OnnxClassifier(model_path, device="cpu")


@pytest.fixture(scope="session")
def twin(model_path, onnx_classifier):
    from advshield.plugin.classifiers import TwinClassifier

    return TwinClassifier(model_path, reference=onnx_classifier, device="cpu")


@pytest.fixture()
def test_batch(fashion_test):
    """64 real test images (float32 NCHW in [0, 1]) and their labels."""
    return torch.from_numpy(fashion_test.as_float(0, 64)), torch.from_numpy(fashion_test.labels[:64])
