import json

import pytest
import torch

from advshield.core.data import load_fashion_mnist
from advshield.core.errors import ConfigError
from advshield.training import TrainConfig, accuracy, export_onnx, surrogate, train


def test_training_is_seeded_and_reproducible():
    tr = load_fashion_mnist("train").subset(0, 1024)
    te = load_fashion_mnist("test").subset(0, 256)
    cfg = TrainConfig(epochs=1, batch_size=64, seed=3)
    a, ra = train(tr, te, cfg, progress=False)
    b, rb = train(tr, te, cfg, progress=False)
    c, _ = train(tr, te, TrainConfig(epochs=1, batch_size=64, seed=4), progress=False)
    for (ka, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), ka
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    assert ra.test_accuracy == rb.test_accuracy


def test_noise_augmentation_changes_training():
    tr = load_fashion_mnist("train").subset(0, 512)
    te = load_fashion_mnist("test").subset(0, 128)
    a, _ = train(tr, te, TrainConfig(epochs=1, batch_size=64), progress=False)
    b, _ = train(tr, te, TrainConfig(epochs=1, batch_size=64, noise_sigma=0.25), progress=False)
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_export_parity_and_single_file(tmp_path):
    m = surrogate()
    diff = export_onnx(m, tmp_path / "s.onnx", (1, 28, 28))
    assert diff < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["s.onnx"]  # no external .onnx.data file


def test_bad_train_config():
    with pytest.raises(ConfigError, match="unknown architecture 'vit'"):
        TrainConfig(arch="vit")
    with pytest.raises(ConfigError, match="noise_sigma: must be >= 0"):
        TrainConfig(noise_sigma=-1)


def test_model_cards_describe_the_embedded_models(model_path, surrogate_path):
    from advshield.core.hashing import sha256_file

    for path, arch in ((model_path, "cnn"), (surrogate_path, "surrogate")):
        card = json.loads(path.with_suffix(".json").read_text())
        assert card["sha256"] == sha256_file(path)
        assert card["train"]["arch"] == arch
    assert json.loads(model_path.with_suffix(".json").read_text())["test_accuracy"] >= 0.90


@pytest.mark.slow
def test_full_training_reaches_90_percent(tmp_path):
    tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
    model, result = train(tr, te, TrainConfig(epochs=4), progress=False)
    assert result.test_accuracy >= 0.90
    assert accuracy(model, te) == result.test_accuracy
