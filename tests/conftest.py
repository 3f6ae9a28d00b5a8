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


# --- RGB models and images the tests build (tests/rgb_models.py) ----------------------------------

@pytest.fixture(scope="session")
def rgb_cache() -> Path:
    """Where the built RGB models live: reused across sessions (each is rebuilt when its settings
    change); ADVSHIELD_TEST_CACHE overrides the folder."""
    from rgb_models import cache_dir

    return cache_dir()


@pytest.fixture(scope="session")
def rgb_cnn(rgb_cache):
    """The small RGB CNN on the synthetic colour set (``TrainedRGB``: path, train, test, accuracy)."""
    from rgb_models import train_rgb_cnn

    return train_rgb_cnn(rgb_cache)


@pytest.fixture(scope="session")
def resnet_slim(rgb_cache) -> Path:
    """A ResNet-50-shaped graph (bottlenecks [3, 4, 6, 3], 224x224x3, 1000 classes) at width 16:
    the real architecture's tensors and names, an eighth of its channels."""
    from rgb_models import resnet50_like

    return resnet50_like(rgb_cache, width=16)


@pytest.fixture(scope="session")
def foolbox_cifar10(tmp_path_factory):
    from rgb_models import foolbox_images

    return foolbox_images("cifar10", tmp_path_factory.mktemp("foolbox") / "cifar10")


@pytest.fixture(scope="session")
def foolbox_imagenet(tmp_path_factory):
    from rgb_models import foolbox_images

    return foolbox_images("imagenet", tmp_path_factory.mktemp("foolbox") / "imagenet")


@pytest.fixture(scope="session")
def rgb_surrogate(rgb_cache):
    """An independently trained twin of ``rgb_cnn`` (other weights seed and training images), for
    transfer attacks."""
    from rgb_models import train_rgb_cnn

    return train_rgb_cnn(rgb_cache, name="rgb_surrogate", seed=1, data_seed=10)


@pytest.fixture(scope="session")
def colour_folder(rgb_cache) -> Path:
    """The synthetic colour set as an image folder: train/<class>/*.png (1000) and test/<class>/*.png (400)."""
    from rgb_models import colour_folder

    return colour_folder(rgb_cache / "colour_folder")
