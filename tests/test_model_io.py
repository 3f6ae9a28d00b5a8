"""The model as users export it (plugin/model_io.py): normalization, NHWC, fixed batch, softmax
outputs, defaults read from the graph; the Python API's pixel conversion; thread counts."""

from __future__ import annotations

import hashlib
import io
import logging
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torch import nn

from advshield import api
from advshield.cli import main as cli_main
from advshield.core.errors import ConfigError, InputError, ModelError
from advshield.plugin import classifiers as C
from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier, default_threads, set_torch_threads
from advshield.plugin.config import load_pipeline
from advshield.plugin.model_io import load_model, read_graph, wrap_model
from advshield.plugin.pipeline import DefendedClassifier
from advshield.plugin.pixels import to_pixels

MEAN = (123.7, 116.3, 103.5)  # in the model's 0-255 input units
STD = (58.4, 57.1, 57.4)
K = 5


class NhwcNet(nn.Module):
    """Takes [N, H, W, 3] in 0-255 units normalized by MEAN/STD, as a TF/Keras-style export would."""

    def __init__(self, k: int = K, softmax: bool = False, flatten_batch: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, k)
        self.softmax, self.flatten_batch = softmax, flatten_batch

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        x = x.reshape(self.flatten_batch, -1) if self.flatten_batch else x.flatten(1)
        x = self.fc(x)
        return torch.softmax(x, 1) if self.softmax else x


class NchwNet(nn.Module):
    def __init__(self, k: int = K, channels: int = 3, softmax: str = "", flatten_batch: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, k)
        self.softmax, self.flatten_batch = softmax, flatten_batch

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        x = x.reshape(self.flatten_batch, -1) if self.flatten_batch else x.flatten(1)
        x = self.fc(x) * 3
        if self.softmax == "op":
            return torch.softmax(x, 1)
        if self.softmax == "decomposed":  # exported as Exp / ReduceSum / Div: only the probe can tell
            e = torch.exp(x - x.max(1, keepdim=True).values)
            return e / e.sum(1, keepdim=True)
        return x


def export(net: nn.Module, path, shape, *, dynamic: bool = True):
    torch.manual_seed(0)
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    net.eval()
    kwargs = {"dynamic_axes": {"x": {0: "N"}, "y": {0: "N"}}} if dynamic else {}
    torch.onnx.export(net, (torch.rand(shape) * (255 if shape[-1] == 3 else 1),), str(path), input_names=["x"],
                      output_names=["y"], opset_version=17, dynamo=False, external_data=False, **kwargs)
    return path


def raw_run(path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]


def pipeline(tmp_path, model: str, extra: str = "", name: str = "p.toml"):
    (tmp_path / name).write_text(f'[model]\npath = "{model}"\n{extra}')
    return tmp_path / name


@pytest.fixture(scope="module")
def nhwc(tmp_path_factory):
    return export(NhwcNet(), tmp_path_factory.mktemp("nhwc") / "nhwc.onnx", (2, 16, 16, 3))


@pytest.fixture()
def pixels():
    return torch.rand((6, 3, 16, 16), generator=torch.Generator().manual_seed(1))


# --- wrapping -----------------------------------------------------------------------------------

def test_wrapped_nhwc_normalized_model_equals_the_reference(tmp_path, nhwc, pixels):
    cfg = load_pipeline(pipeline(tmp_path, nhwc.as_posix(), f"scale = 255.0\nmean = {list(MEAN)}\nstd = {list(STD)}\n"))
    assert cfg.input.shape == (3, 16, 16)  # read from the NHWC graph
    assert cfg.graph is not None and cfg.graph.layout == "nhwc"
    # the reference: what the user's own preprocessing does before calling the raw model
    x = pixels.numpy()
    units = (x * 255.0 - np.array(MEAN, np.float32).reshape(1, 3, 1, 1)) / np.array(STD, np.float32).reshape(1, 3, 1, 1)
    want = raw_run(nhwc, units.transpose(0, 2, 3, 1))
    onnx_clf = C.classifier_from_config(cfg, device="cpu")
    got = onnx_clf(pixels).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    twin = C.twin_from_config(cfg, device="cpu", reference=onnx_clf)
    np.testing.assert_allclose(twin(pixels).detach().numpy(), want, rtol=1e-4, atol=1e-4)
    assert twin.parity.max_abs_diff < 1e-4
    # without the normalization the answer is different: the test can tell
    plain = OnnxClassifier(nhwc, device="cpu")(pixels).numpy()
    assert np.abs(plain - want).max() > 1e-2
    # pinned: sha256 of the wrapped bytes, not of the file; nothing written next to the model
    w = cfg.wrapped_model()
    assert w.sha256 == hashlib.sha256(w.data).hexdigest() != hashlib.sha256(nhwc.read_bytes()).hexdigest()
    assert sorted(p.name for p in nhwc.parent.iterdir()) == ["nhwc.onnx"]
    assert w.describe()["layout"] == "nhwc" and w.describe()["batch"] == "dynamic"


def test_a_model_needing_nothing_is_used_as_it_is(model_path):
    w = load_model(model_path)
    assert not w.wrapped and w.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert w.output == "logits" and w.input_shape == (1, 28, 28) and w.num_classes == 10


@pytest.mark.parametrize("batch", [1, 4])
def test_fixed_batch_model_runs_in_chunks(tmp_path, batch):
    path = export(NchwNet(flatten_batch=batch), tmp_path / f"b{batch}.onnx", (batch, 3, 16, 16), dynamic=False)
    assert read_graph(path).batch == batch
    with pytest.raises(Exception):  # noqa: B017 - ONNX Runtime itself refuses another batch size
        raw_run(path, np.zeros((batch + 1, 3, 16, 16), np.float32))
    clf = OnnxClassifier(path, device="cpu")
    twin = TwinClassifier(path, reference=clf, device="cpu")
    x = torch.rand((9, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    one_by_one = np.concatenate([raw_run(path, np.concatenate([x[i : i + 1].numpy()] * batch))[:1] for i in range(9)])
    for n in (2, 3, 9):
        np.testing.assert_allclose(clf(x[:n]).numpy(), one_by_one[:n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(twin(x[:n]).detach().numpy(), one_by_one[:n], rtol=1e-4, atol=1e-4)
    # the twin's chunks keep the autograd graph
    xg = x[:3].clone().requires_grad_(True)
    twin(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_softmax_output_is_not_softmaxed_again(tmp_path, pixels):
    path = export(NchwNet(softmax="op"), tmp_path / "sm.onnx", (2, 3, 16, 16))
    clf = DefendedClassifier.from_config(pipeline(tmp_path, "sm.onnx"))
    model = clf.classifier.model  # type: ignore[attr-defined]
    assert model.output == "probabilities" and "log of the probabilities" in model.steps
    probs = clf.predict(pixels).probs
    want = raw_run(path, pixels.numpy())
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-5)
    assert want.max() > 0.5  # a confident model: applying softmax twice would flatten it a lot
    twice = torch.softmax(torch.from_numpy(want), 1).numpy()
    assert np.abs(twice - want).max() > 0.1


def test_probabilities_found_by_the_probe_are_logged(tmp_path, pixels, caplog):
    path = export(NchwNet(softmax="decomposed"), tmp_path / "dec.onnx", (2, 3, 16, 16))
    assert read_graph(path).final_op == "Div"
    with caplog.at_level(logging.WARNING, logger="advshield.plugin.model_io"):
        w = wrap_model(path)
    assert w.output == "probabilities"
    assert any("look like probabilities" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    probs = torch.softmax(OnnxClassifier(w, device="cpu")(pixels), 1).numpy()
    np.testing.assert_allclose(probs, raw_run(path, pixels.numpy()), rtol=1e-5, atol=1e-5)


def test_softmax_declared_as_logits_warns(tmp_path, caplog):
    export(NchwNet(softmax="op"), tmp_path / "sm.onnx", (2, 3, 16, 16))
    cfg = load_pipeline(pipeline(tmp_path, "sm.onnx", 'output = "logits"\n'))
    with caplog.at_level(logging.WARNING, logger="advshield.plugin.model_io"):
        w = cfg.wrapped_model()
    assert w.output == "logits" and not w.wrapped  # the user's word is kept ...
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("softmax would be applied twice" in m and 'output = "probabilities"' in m for m in msgs)  # ... with a warning
    caplog.clear()
    export(NchwNet(), tmp_path / "lg.onnx", (2, 3, 16, 16))
    with caplog.at_level(logging.WARNING, logger="advshield.plugin.model_io"):
        load_pipeline(pipeline(tmp_path, "lg.onnx", 'output = "logits"\n', "q.toml")).wrapped_model()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # real logits: silent


def test_non_float_input_is_a_model_error(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 192])
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["xf"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "u8.onnx"))
    with pytest.raises(ModelError, match=r"input 'x' is uint8, advshield feeds the model float32 pixels"):
        OnnxClassifier(tmp_path / "u8.onnx")


# --- defaults from the model ---------------------------------------------------------------------

def test_input_and_classes_come_from_the_model(tmp_path):
    export(NchwNet(k=1000), tmp_path / "big.onnx", (2, 3, 16, 16))
    cfg = load_pipeline(pipeline(tmp_path, "big.onnx"))
    assert cfg.input.shape == (3, 16, 16) and cfg.num_classes == 1000
    assert cfg.class_names == tuple(str(i) for i in range(1000))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "a.png").write_bytes(buf.getvalue())
    assert cli_main(["predict", str(tmp_path / "p.toml"), str(tmp_path / "a.png"), "--json"]) == 0  # no IndexError
    report = api.info(cfg)
    assert report["model"]["input"] == "3x16x16" and report["model"]["classes"] == 1000
    assert report["model"]["wrapped_sha256"] == hashlib.sha256((tmp_path / "big.onnx").read_bytes()).hexdigest()


def test_disagreeing_input_or_classes_name_both_sides(tmp_path, nhwc, model_path):
    with pytest.raises(ConfigError, match=r"input.channels: the pipeline says 1 but nhwc.onnx takes 3"):
        load_pipeline(pipeline(tmp_path, nhwc.as_posix(), "[input]\nchannels = 1\n"))
    with pytest.raises(ConfigError, match=r"input.height: the pipeline says 28 but nhwc.onnx takes 16"):
        load_pipeline(pipeline(tmp_path, nhwc.as_posix(), "[input]\nheight = 28\n"))
    with pytest.raises(ConfigError, match=r"model.classes: the pipeline names 3 classes but nhwc.onnx outputs 5"):
        load_pipeline(pipeline(tmp_path, nhwc.as_posix(), 'classes = ["a", "b", "c"]\n'))
    with pytest.raises(ConfigError, match=r"data \(its class names\): the pipeline names 10 classes but nhwc.onnx outputs 5"):
        load_pipeline(pipeline(tmp_path, nhwc.as_posix(), '[data]\ndataset = "fashion-mnist"\n'))
    grey = model_path
    with pytest.raises(ConfigError, match=r"model.std: give one value or one per channel \(1 for fashion_cnn.onnx\), got 3"):
        load_pipeline(pipeline(tmp_path, grey.as_posix(), "std = [1.0, 2.0, 3.0]\n"))
    (tmp_path / "names.txt").write_text("a\nb\nc\nd\ne\n")
    cfg = load_pipeline(pipeline(tmp_path, nhwc.as_posix(), 'classes_file = "names.txt"\n'))
    assert cfg.class_names == ("a", "b", "c", "d", "e")


def test_missing_model_leaves_the_input_unresolved(tmp_path):
    cfg = load_pipeline(pipeline(tmp_path, "later.onnx"))
    assert not cfg.input.resolved
    with pytest.raises(ConfigError, match=r"model file .*later.onnx is missing"):
        _ = cfg.input.shape
    explicit = load_pipeline(pipeline(tmp_path, "later.onnx", "[input]\nchannels = 3\nheight = 8\nwidth = 8\n", "q.toml"))
    assert explicit.input.shape == (3, 8, 8)


def test_bad_model_keys_are_named():
    from advshield.plugin.config import loads_pipeline

    for extra, match in (("std = [0.0]", r"model.std: every value must be > 0"),
                         ('layout = "chw"', r"model.layout: expected 'auto' or 'nchw' or 'nhwc'"),
                         ("scale = -1.0", r"model.scale: must be > 0"),
                         ('output = "softmax"', r"model.output: expected 'auto' or 'logits'"),
                         ("mean = [1.0, 2.0]", r"model.mean: give one value or one per channel")):
        with pytest.raises(ConfigError, match=match):
            loads_pipeline(f'[model]\npath = "m.onnx"\n{extra}\n')


# --- pixels handed to the Python API --------------------------------------------------------------

def test_to_pixels_conversions():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)  # NHWC uint8
    want = torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    got = to_pixels(u8, (3, 16, 16))
    assert got.dtype == torch.float32 and got.shape == (2, 3, 16, 16)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(to_pixels(u8[0], (3, 16, 16)), want[:1])  # one image [H, W, C]
    torch.testing.assert_close(to_pixels(torch.from_numpy(u8[0]).permute(2, 0, 1), (3, 16, 16)), want[:1])  # [C, H, W]
    f64 = rng.random((2, 1, 28, 28))
    torch.testing.assert_close(to_pixels(f64, (1, 28, 28)), torch.from_numpy(f64.astype(np.float32)))
    torch.testing.assert_close(to_pixels(f64[:, 0].astype(np.float16), (1, 28, 28)),
                               torch.from_numpy(f64[:, :1].astype(np.float16).astype(np.float32)))  # [N, H, W] grey
    assert to_pixels(f64[0, 0], (1, 28, 28)).shape == (1, 1, 28, 28)  # [H, W] grey


def test_to_pixels_errors_name_the_expected_dtype_and_layout():
    with pytest.raises(InputError, match=r"expected float32 pixels in \[0, 1\] \(or uint8 0-255\) shaped "
                                         r"\[N, 3, 16, 16\] \(NCHW\) or \[N, 16, 16, 3\] \(NHWC\).*of dtype int64"):
        to_pixels(np.zeros((2, 3, 16, 16), np.int64), (3, 16, 16))
    with pytest.raises(InputError, match=r"\(NHWC\), or one image \[3, 16, 16\] or \[16, 16, 3\]; got shape \[2, 16, 3, 16\]"):
        to_pixels(np.zeros((2, 16, 3, 16), np.float32), (3, 16, 16))
    with pytest.raises(InputError, match=r"got shape \[16, 16\]"):
        to_pixels(np.zeros((16, 16), np.float32), (3, 16, 16))  # a grey image for an RGB model
    with pytest.raises(InputError, match=r"values up to 255 \(0-255 values\? divide by 255 or pass uint8\)"):
        to_pixels(np.full((1, 3, 16, 16), 255.0), (3, 16, 16))
    with pytest.raises(InputError, match=r"a numpy array or a torch tensor"):
        to_pixels([[0.0]], (1, 28, 28))


def test_predict_takes_float64_and_uint8(pipeline_path):
    clf = api.classifier(pipeline_path)
    x = np.random.default_rng(0).random((2, 1, 28, 28))
    a = api.predict(clf, x)  # the example: float64 used to fail
    b = api.predict(clf, x.astype(np.float32))
    np.testing.assert_array_equal(a.labels, b.labels)
    u8 = (x * 255).round().astype(np.uint8)
    c = api.predict(clf, u8[:, 0])  # [N, H, W] uint8 grey
    np.testing.assert_allclose(c.probs, api.predict(clf, u8.astype(np.float32) / 255).probs, atol=1e-6)


# --- the Triton repository serves the wrapped graph -------------------------------------------------

def test_triton_repository_holds_the_wrapped_graph(tmp_path, nhwc):
    from advshield.deploy.triton import generate_repository

    cfg = load_pipeline(pipeline(tmp_path, nhwc.as_posix(), f"scale = 255.0\nmean = {list(MEAN)}\nstd = {list(STD)}\n"))
    repo = generate_repository(cfg, tmp_path / "repo", classifier_backend="python")
    onnx_file = repo.root / f"{cfg.pipeline.name}__classifier" / "1" / "model.onnx"
    assert hashlib.sha256(onnx_file.read_bytes()).hexdigest() == cfg.wrapped_model().sha256
    assert list(repo.config(f"{cfg.pipeline.name}__classifier").input[0].dims) == [3, 16, 16]
    # the generated pipeline of the Python models describes the wrapped graph (no second normalization)
    inner = load_pipeline(repo.root / f"{cfg.pipeline.name}__postprocess" / "1" / "pipeline.toml")
    assert inner.model.mean == () and inner.model.scale == 1.0 and inner.input.shape == (3, 16, 16)
    assert not inner.wrapped_model().wrapped


# --- threads -----------------------------------------------------------------------------------------

@pytest.fixture()
def four_cpus(monkeypatch):
    monkeypatch.delenv("ADVSHIELD_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_threads_follow_the_cgroup_quota(tmp_path, four_cpus, monkeypatch):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    root = tmp_path / "fs"
    root.mkdir()
    assert default_threads(cgroup_root=root, proc_cgroup=proc) == 4  # no quota: the affinity
    (root / "cpu.max").write_text("max 100000\n")
    assert default_threads(cgroup_root=root, proc_cgroup=proc) == 4
    (root / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs
    assert default_threads(cgroup_root=root, proc_cgroup=proc) == 2
    (root / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert default_threads(cgroup_root=root, proc_cgroup=proc) == 1
    # nested cgroup: a quota on an ancestor counts
    proc.write_text("0::/a/b\n")
    (root / "cpu.max").write_text("max 100000\n")
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
    (root / "a" / "cpu.max").write_text("300000 100000\n")
    assert default_threads(cgroup_root=root, proc_cgroup=proc) == 3
    # cgroup v1
    proc.write_text("4:cpu,cpuacct:/job\n")
    v1 = root / "cpu,cpuacct" / "job"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert default_threads(cgroup_root=root, proc_cgroup=proc) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert default_threads(cgroup_root=root, proc_cgroup=proc) == 4
    monkeypatch.setenv("ADVSHIELD_THREADS", "3")
    assert default_threads(cgroup_root=root, proc_cgroup=proc) == 3


def test_affinity_limits_threads_and_torch_follows(monkeypatch):
    monkeypatch.delenv("ADVSHIELD_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert default_threads() == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert set_torch_threads() == 1 and torch.get_num_threads() == 1
        assert set_torch_threads(2) == 2  # an explicit count is kept
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("ADVSHIELD_THREADS", "0")
    with pytest.raises(ConfigError, match="ADVSHIELD_THREADS: expected a positive integer"):
        default_threads()
