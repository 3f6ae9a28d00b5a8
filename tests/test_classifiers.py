import numpy as np
import onnx
import pytest
import torch

from advshield.core.errors import InputError, ModelError, ParityError
from advshield.plugin.classifiers import Classifier, OnnxClassifier, TwinClassifier


def test_both_satisfy_the_protocol(onnx_classifier, twin):
    for clf in (onnx_classifier, twin):
        assert isinstance(clf, Classifier)
        assert clf.input_shape == (1, 28, 28) and clf.num_classes == 10


def test_embedded_model_accuracy_on_the_real_test_set(onnx_classifier, fashion_test):
    preds = np.concatenate([
        onnx_classifier.run(fashion_test.as_float(i, i + 2000)).argmax(1) for i in range(0, 10_000, 2000)
    ])
    acc = float((preds == fashion_test.labels).mean())
    assert acc >= 0.90, acc


def test_twin_parity_on_real_images(twin, onnx_classifier, test_batch):
    x, _ = test_batch
    assert twin.parity.max_abs_diff < 1e-4
    with torch.no_grad():
        diff = (twin(x) - onnx_classifier(x)).abs().max().item()
    assert diff < 1e-4


def test_twin_is_differentiable(twin, test_batch):
    x, y = test_batch
    x = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_twin_gradient_matches_finite_differences(twin, test_batch):
    """Autograd through the converted graph equals a central difference (float64 copy of the twin).

    Random inputs: real Fashion-MNIST images have constant backgrounds, where max pooling meets
    exact ties and the function has no gradient (autograd returns one subgradient)."""
    import copy

    net = copy.deepcopy(twin.net).double()
    g = torch.Generator().manual_seed(0)
    x = (0.1 + 0.8 * torch.rand((1, 1, 28, 28), generator=g)).double()
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x)[0, 3], x)
    h = 1e-6
    for _ in range(3):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        d = d / d.norm()
        with torch.no_grad():
            fd = (net(x + h * d)[0, 3] - net(x - h * d)[0, 3]) / (2 * h)
        assert float((grad * d).sum()) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((2, 1, 28, 28), np.float64), "expected float32"),
        (np.zeros((2, 28, 28), np.float32), r"expected shape \[N, 1, 28, 28\] \(NCHW\), got \[2, 28, 28\]"),
        (np.zeros((2, 3, 28, 28), np.float32), r"got \[2, 3, 28, 28\]"),
        (np.full((1, 1, 28, 28), 2.0, np.float32), r"pixels must lie in \[0, 1\]"),
        (np.full((1, 1, 28, 28), np.nan, np.float32), "NaN"),
        (np.zeros((0, 1, 28, 28), np.float32), "empty batch"),
    ],
)
def test_input_validation_names_the_problem(onnx_classifier, twin, x, match):
    for clf in (onnx_classifier, twin):
        with pytest.raises(InputError, match=match):
            clf(torch.from_numpy(x))


def test_missing_and_broken_model(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        OnnxClassifier(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load"):
        OnnxClassifier(tmp_path / "bad.onnx")


def test_parity_failure_is_loud(tmp_path, model_path, onnx_classifier):
    """A twin built from a model whose last bias was changed must fail against the original."""
    m = onnx.load(str(model_path))
    init = {t.name: t for t in m.graph.initializer}
    bias = next(t for name, t in init.items() if len(t.dims) == 1 and t.dims[0] == 10)
    arr = onnx.numpy_helper.to_array(bias).copy()
    arr[0] += 0.5
    bias.CopyFrom(onnx.numpy_helper.from_array(arr, bias.name))
    onnx.save(m, str(tmp_path / "tampered.onnx"))
    with pytest.raises(ParityError, match=r"max \|logit difference\| 0.5"):
        TwinClassifier(tmp_path / "tampered.onnx", reference=onnx_classifier, device="cpu")


def test_threads_are_explicit(model_path):
    clf = OnnxClassifier(model_path, threads=1)
    assert clf.session.get_session_options().intra_op_num_threads == 1
    assert clf.providers[-1] == "CPUExecutionProvider"
