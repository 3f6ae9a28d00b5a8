"""A new user's path: a model as exported by a model zoo (RGB, mean/std normalization inside the
user's preprocessing, NHWC, fixed batch 4, softmax output) and a folder of PNGs, taken through
``advshield init``, ``fit``, ``audit``, ``serve`` and ``deploy triton`` by the CLI."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import onnx
import pytest
import torch

from advshield.cli import main
from advshield.core.errors import ConfigError, DataError
from advshield.plugin.classifiers import onnx_to_torch
from advshield.plugin.config import load_pipeline
from advshield.plugin.pipeline import DefendedClassifier

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


class ZooExport(torch.nn.Module):
    """The trained colour CNN as a zoo would export it: takes (x - mean) / std in NHWC, answers softmax."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN))
        self.register_buffer("std", torch.tensor(STD))

    def forward(self, x):
        return torch.softmax(self.net((x * self.std + self.mean).permute(0, 3, 1, 2)), dim=1)


@pytest.fixture(scope="module")
def zoo(rgb_cnn, tmp_path_factory):
    """(work folder, zoo model path, the raw trained model's path, test images uint8 NCHW, labels)."""
    from rgb_models import write_image_folder

    work = tmp_path_factory.mktemp("new_user")
    export = ZooExport(onnx_to_torch(rgb_cnn.path)).eval()
    path = work / "zoo.onnx"
    torch.onnx.export(export, torch.zeros(4, 32, 32, 3), path, input_names=["images"], output_names=["scores"],
                      dynamo=False, external_data=False, opset_version=17)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 32, 32, 3]  # fixed batch, NHWC: what the wrapping must handle
    write_image_folder(rgb_cnn.test, work / "images")
    return work, path, rgb_cnn


def test_init_reads_model_and_folder(zoo, capsys):
    work, model, _ = zoo
    out = work / "zoo.toml"
    assert main(["init", str(model), "--data", str(work / "images"), "--out", str(out),
                 "--mean", *map(str, MEAN), "--std", *map(str, STD), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["input"] == [3, 32, 32] and summary["layout"] == "nhwc" and summary["batch"] == 4
    assert summary["output"] == "probabilities" and summary["classes"] == 10
    folders = sorted(p.name for p in (work / "images").iterdir())
    assert summary["class_names"] == folders
    cfg = load_pipeline(out)
    assert cfg.input.shape == (3, 32, 32) and cfg.class_names == tuple(folders)
    table = tomllib.loads(out.read_text())
    assert table["model"]["path"] == "zoo.onnx" and table["data"]["directory"] == "images"  # relative to the file
    assert table["gate"]["min_robust_accuracy"] > 0 and table["gate"]["gate_eps"] > 0  # a robustness threshold
    # the wrapped model answers as the raw trained model on [0, 1] NCHW pixels
    x = torch.rand(6, 3, 32, 32)
    raw = torch.softmax(onnx_to_torch(zoo[2].path)(x), 1).numpy()
    np.testing.assert_allclose(DefendedClassifier.from_config(cfg).predict(x).probs, raw, atol=1e-5)
    # a second init refuses to overwrite
    from advshield.api import init

    with pytest.raises(ConfigError, match="exists; pass --force"):
        init(model, work / "images", out)


def test_init_errors_name_the_problem(zoo, tmp_path):
    _, model, _ = zoo
    from advshield.api import init

    with pytest.raises(DataError, match="not a folder"):
        init(model, tmp_path / "missing", tmp_path / "a.toml")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders"):
        init(model, tmp_path / "flat", tmp_path / "b.toml")
    for i in range(3):
        (tmp_path / "three" / f"c{i}").mkdir(parents=True)
        (tmp_path / "three" / f"c{i}" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"3 class folders but zoo\.onnx has 10 outputs"):
        init(model, tmp_path / "three", tmp_path / "c.toml")
    assert not list(tmp_path.glob("*.toml"))


def _defended(text: str) -> str:
    """What the user does next: uncomment bit depth and the squeezing detector (Xu et al.'s colour setting)."""
    text = text.replace('# [[defenses]]\n# type = "bit_depth"\n# bits = 5', '[[defenses]]\ntype = "bit_depth"\nbits = 5')
    for block in ('# [detector]\n# type = "squeeze"\n', "# squeezers = [", '# fpr = 0.05\n# artifact = "squeeze_threshold"',
                  '# [artifacts.squeeze_threshold]\n# path = "artifacts/squeeze_threshold.json"'):
        assert block in text, block
        text = text.replace(block, block.replace("# ", ""))
    text = text.replace('{ type = "bit_depth", bits = 4 }', '{ type = "bit_depth", bits = 5 }')
    return text.replace("\n[audit]\n", "\n[audit]\nprobe_samples = 6   # masking probes on a few samples: a quick test\nprobe_restarts = 2\n")


def test_new_user_fit_audit_serve_deploy(zoo, tmp_path):
    from server_helpers import start_server

    from advshield.deploy.triton import serve_repository
    from advshield.plugin.client import RemoteClassifier
    from advshield.plugin.decode import encode_png

    work, model, trained = zoo
    out = work / "zoo_user.toml"
    assert main(["init", str(model), "--data", str(work / "images"), "--out", str(out), "--force",
                 "--mean", *map(str, MEAN), "--std", *map(str, STD)]) == 0
    out.write_text(_defended(out.read_text()))
    assert main(["fit", str(out), "--quiet"]) == 0
    assert (work / "artifacts" / "squeeze_threshold.json").is_file()  # next to the pipeline file
    audit_dir = tmp_path / "audit"
    main(["audit", str(out), "--out", str(audit_dir), "--samples", "24", "--batch-size", "24",
          "--attacks", "apgd_ce_linf", "fgsm", "--threads", "1", "--quiet", "--no-certify"])
    report = json.loads((audit_dir / "report.json").read_text())
    clean = report["metrics"]["clean_accuracy"]
    assert clean > 0.8  # the wrapped zoo model is the trained model
    robust = report["metrics"]["robust_accuracy"]["linf"]
    assert all(a <= clean + 1e-9 for a in robust["all attacks"])
    assert report["pipeline"]["data"]["dataset"] == "folder"

    cfg = load_pipeline(out)
    local = DefendedClassifier.from_config(cfg)
    images = trained.test.images[:8]
    pngs = [encode_png(img) for img in images]
    want = local.predict_bytes(pngs)
    server = start_server(out, tmp_path / "serve.log", "--host", "127.0.0.1")
    try:
        with RemoteClassifier(server.url) as remote:
            assert remote.input_shape == (3, 32, 32)
            got = remote.predict_bytes(pngs)
    finally:
        assert server.stop() == 0
    assert np.array_equal(got.labels, want.labels) and np.array_equal(got.flagged, want.flagged)

    repo_dir = tmp_path / "models"
    # no backend named: the fixed-batch export gets the Python-backend classifier (chunks of 4), which
    # is also the one the wheel's CPU tritonserver has
    assert main(["deploy", "triton", str(out), "--out", str(repo_dir)]) == 0
    assert 'backend: "python"' in (repo_dir / f"{cfg.pipeline.name}__classifier" / "config.pbtxt").read_text()
    triton = serve_repository(repo_dir, [cfg.pipeline.name], log_path=tmp_path / "triton.log", threads=1)
    try:
        with RemoteClassifier(triton.url, cfg.pipeline.name) as remote:
            served = remote.predict_bytes(pngs)
    finally:
        assert triton.stop() == 0, triton.log()[-3000:]
    assert np.array_equal(served.labels, want.labels) and np.array_equal(served.flagged, want.flagged)
    np.testing.assert_allclose(served.probs, want.probs, atol=1e-4)


def test_feature_layer_defense_on_the_fixed_batch_model(zoo, tmp_path):
    """Patch replacement between head and tail of the batch-4 zoo export: the split segments run in
    chunks of 4 (7 images give the labels of one-by-one calls), its twin matches segment by segment
    and passes gradients, and the split's fit learns the codebook from the folder."""
    from advshield.api import init
    from advshield.plugin.fitting import FitSpec, fit_pipeline
    from advshield.plugin.split import candidate_tensors, twin_of_split

    work, model, trained = zoo
    base = init(model, work / "images", work / "zoo_base.toml", mean=MEAN, std=STD, overwrite=True).path
    cfg0 = load_pipeline(base)
    wrapped = cfg0.wrapped_model().proto()
    cands = [t for t in candidate_tensors(wrapped) if t.op_type == "Relu" and isinstance(t.shape[1], int)]
    layer = cands[0]
    assert layer.shape[0] == 4  # the export fixes the batch of its feature tensors too
    text = base.read_text() + f'''
[[defenses]]
type = "patch_replacement"
layer = "{layer.name}"
depth = {layer.shape[1]}
radius = 1
stride = 2
codewords = 64
sample = 8192
fit_images = 100
artifact = "feature_codebook"

[artifacts.feature_codebook]
path = "artifacts/feature_codebook.npy"
'''
    path = work / "zoo_feature.toml"
    path.write_text(text)
    cfg = load_pipeline(path)
    fit_pipeline(cfg, FitSpec(samples=100), progress=False)
    clf = DefendedClassifier.from_config(cfg)
    x = torch.from_numpy(trained.test.images[:7].astype(np.float32) / 255)
    pred = clf.predict(x)
    one_by_one = np.concatenate([clf.predict(x[i : i + 1]).labels for i in range(7)])
    assert np.array_equal(pred.labels, one_by_one)
    assert (pred.labels == trained.test.labels[:7]).mean() >= 5 / 7
    twin = twin_of_split(clf.classifier, check_with=x)
    assert max(twin.parity) < 1e-3
    xg = x[:5].clone().requires_grad_(True)
    twin(xg)[:, 0].sum().backward()
    assert torch.isfinite(xg.grad).all() and float(xg.grad.abs().sum()) > 0
