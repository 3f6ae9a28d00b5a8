"""Cutting the ONNX model at a feature layer: head then tail equals the full model; defenses
between them; the pipeline runs feature-layer patch replacement inside the split model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from advshield.core.errors import ConfigError, ModelError
from advshield.defenses.base import NonDifferentiableError
from advshield.defenses.patches import PatchReplacementConfig, build, extract_patches
from advshield.plugin.split import (
    SplitClassifier,
    bind_feature_extractors,
    candidate_tensors,
    check_split,
    feature_extractor,
    split_model,
    split_onnx_classifier,
    split_twin,
)

FIRST_LAYER = "relu"  # output of the first convolution + ReLU: [N, 32, 28, 28]


def test_candidate_tensors_are_the_4d_feature_maps_in_graph_order(model_path):
    tensors = candidate_tensors(model_path)
    names = [t.name for t in tensors]
    assert names.index("conv2d") < names.index(FIRST_LAYER) < names.index("max_pool2d")
    assert all(len(t.shape) == 4 for t in tensors)
    first = tensors[names.index(FIRST_LAYER)]
    assert first.shape[1:] == (32, 28, 28) and first.op_type == "Relu"
    assert "logits" not in names and "images" not in names


def test_head_then_tail_equals_the_full_model_at_every_candidate(model_path, onnx_classifier, test_batch):
    x, _ = test_batch
    full = onnx_classifier(x)
    for t in candidate_tensors(model_path):
        head, tail = split_model(model_path, [t.name])
        assert [i.name for i in head.graph.output] == [t.name] == [i.name for i in tail.graph.input]
        split = split_onnx_classifier(model_path, [t.name], device="cpu")
        diff = (split(x) - full).abs().max().item()
        assert diff <= 1e-5, (t.name, diff)
    assert check_split(onnx_classifier, split, 1e-5, x) <= 1e-5


def test_two_cuts_make_three_segments(model_path, onnx_classifier, test_batch):
    x, _ = test_batch
    split = split_onnx_classifier(model_path, ["max_pool2d", FIRST_LAYER], device="cpu")  # any order
    assert split.cuts == (FIRST_LAYER, "max_pool2d") and len(split.segments) == 3
    assert (split(x) - onnx_classifier(x)).abs().max().item() <= 1e-5
    assert split.features(x, 2).shape == (len(x), 32, 14, 14)


def test_twin_split_matches_onnx_and_the_full_twin_gradient(model_path, onnx_classifier, twin, test_batch):
    x, y = test_batch
    split = split_twin(model_path, [FIRST_LAYER], device="cpu", tolerance=1e-4, check_with=x)
    with torch.no_grad():
        assert (split(x) - onnx_classifier(x)).abs().max().item() <= 1e-4
    xs, xf = x[:8].clone().requires_grad_(True), x[:8].clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(torch.nn.functional.cross_entropy(split(xs), y[:8]), xs)
    (gf,) = torch.autograd.grad(torch.nn.functional.cross_entropy(twin(xf), y[:8]), xf)
    torch.testing.assert_close(gs, gf, rtol=1e-4, atol=1e-6)


def test_unknown_tensor_names_the_candidates(model_path):
    with pytest.raises(ConfigError, match=r"layer: 'conv9' is not an intermediate tensor of the model; 4-D candidates: .*relu"):
        split_model(model_path, ["conv9"])
    with pytest.raises(ConfigError, match="'logits' is not an intermediate tensor"):
        split_model(model_path, ["logits"])


def test_a_tensor_that_does_not_separate_the_graph_is_refused():
    """x -> relu -> a; out = mean(a + x): cutting at a leaves the tail needing x too."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4, 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 1, 1, 1])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Add", ["a", "x"], ["b"]),
        helper.make_node("GlobalAveragePool", ["b"], ["out"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "skip", [x], [out]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=r"reads \['x'\], from before the cut; this tensor does not separate the graph"):
        split_model(model, ["a"])
    _, tail = split_model(model, ["b"])  # b does separate it
    assert [n.op_type for n in tail.graph.node] == ["GlobalAveragePool"]


def test_feature_extractor_is_the_head(model_path, test_batch):
    x, _ = test_batch
    head, _ = split_model(model_path, [FIRST_LAYER])
    f = feature_extractor(model_path, FIRST_LAYER, device="cpu", batch=16)(x)
    assert f.shape == (len(x), 32, 28, 28) and bool((f >= 0).all())  # after a ReLU
    import onnxruntime as ort

    ref = ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    np.testing.assert_array_equal(f.numpy(), ref)


def test_feature_layer_defense_between_head_and_tail(model_path, test_batch):
    """With a codebook holding every feature patch the defense is the identity (logits unchanged);
    under autograd it fails loudly unless BPDA is on, and BPDA's backward is then the identity."""
    x, y = test_batch
    x = x[:2]
    cfg = PatchReplacementConfig(layer=FIRST_LAYER, depth=4, radius=1, stride=1, artifact="cb", codewords=16, sample=16)
    d = build(cfg)
    feats = feature_extractor(model_path, FIRST_LAYER, device="cpu")(x)
    d.set_codebooks(extract_patches(feats, cfg).numpy())  # 8 slices x 1568 codewords of dim 36
    onnx_split = split_onnx_classifier(model_path, {FIRST_LAYER: [d]}, device="cpu")
    plain = split_onnx_classifier(model_path, [FIRST_LAYER], device="cpu")
    torch.testing.assert_close(onnx_split(x), plain(x), rtol=0, atol=1e-4)

    tw = split_twin(model_path, {FIRST_LAYER: [d]}, device="cpu")
    tw_plain = split_twin(model_path, [FIRST_LAYER], device="cpu")
    xg = x.clone().requires_grad_(True)
    with pytest.raises(NonDifferentiableError, match="patch_replacement"):
        tw(xg)
    loss = torch.nn.functional.cross_entropy(tw(xg, bpda=True), y[:2])
    (g,) = torch.autograd.grad(loss, xg)
    xp = x.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(torch.nn.functional.cross_entropy(tw_plain(xp), y[:2]), xp)
    torch.testing.assert_close(g, gp, rtol=1e-3, atol=1e-5)
    tw.bpda = True  # for callers that only call clf(x)
    assert tw(xg).requires_grad
    assert isinstance(tw, SplitClassifier) and tw.input_shape == (1, 28, 28) and tw.num_classes == 10


PIPELINE = """
[pipeline]
name = "patches_test"

[model]
path = "{model}"

[data]
dataset = "fashion-mnist"

[[defenses]]
type = "patch_replacement"
layer = "image"
radius = 1
stride = 1
codewords = 256
sample = 20000
fit_images = 1000
iterations = 8
fit_threads = 1
artifact = "image_codebook"

[[defenses]]
type = "patch_replacement"
layer = "relu"
depth = 4
radius = 1
stride = 2
codewords = 64
sample = 8192
fit_images = 200
iterations = 8
strategy = "linf"
eps = 0.5
fit_threads = 1
artifact = "relu_codebook"

[artifacts.image_codebook]
path = "artifacts/image.npy"

[artifacts.relu_codebook]
path = "artifacts/relu.npy"
"""


def test_pipeline_stacks_image_and_first_layer(tmp_path, model_path, fashion_test, onnx_classifier):
    """Two layers stacked (thesis 6.3.5): fit both codebooks (the feature one on the model's head),
    then from_config serves image replacement -> head -> feature replacement -> tail."""
    from advshield.core.data import load_fashion_mnist
    from advshield.defenses.registry import build_defense
    from advshield.plugin.config import load_pipeline
    from advshield.plugin.pipeline import DefendedClassifier

    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE.format(model=model_path.as_posix()))
    cfg = load_pipeline(path)
    defenses = [build_defense(e.type, e.config) for e in cfg.defenses]
    assert bind_feature_extractors(cfg, defenses) == 1
    train = torch.from_numpy(load_fashion_mnist("train").as_float(0, 1000))
    files = {name: cfg.artifact_path(name) for name in cfg.artifacts}
    for d in defenses:
        d.fit(train, files, seed=0, data_sha256="0" * 64)
    assert files["relu_codebook"].is_file() and np.load(files["relu_codebook"]).shape == (8, 64, 36)

    clf = DefendedClassifier.from_config(path)
    assert isinstance(clf.classifier, SplitClassifier) and clf.classifier.cuts == ("relu",)
    assert [d.config.layer for d in clf.defenses] == ["image"]
    x = torch.from_numpy(fashion_test.as_float(0, 128))
    labels = fashion_test.labels[:128]
    pred = clf.predict(x)
    assert pred.probs.shape == (128, 10)
    # the same thing by hand: image replacement, head, feature replacement, tail
    img, feat = clf.defenses[0], clf.classifier.steps[0][0]
    split = split_onnx_classifier(model_path, [FIRST_LAYER], device="cpu")
    h = feat.transform(split.segments[0](img.transform(x)))
    np.testing.assert_allclose(pred.probs, torch.softmax(split.segments[1](h), 1).numpy(), atol=1e-5)
    # both codebooks are coarse here (K = 256 and 64), yet clean accuracy stays close to the model's
    base = float((onnx_classifier(x).argmax(1).numpy() == labels).mean())
    acc = float((pred.labels == labels).mean())
    print(f"clean accuracy {acc:.3f} (model alone {base:.3f})")
    assert acc >= base - 0.08, (acc, base)
