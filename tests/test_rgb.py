"""The engine on RGB models the tests build (tests/rgb_models.py): the small CNN trained on the
synthetic colour set (3x32x32) and the ResNet-50-shaped graph (224x224x3, random weights).

Pipelines are TOML text with an explicit ``[input]``; the data set is the colour set written as
an image folder (train/ and test/ sub-folders). Covered: the squeeze detector fitted on RGB, patch
replacement on 3 channels (checked against a brute-force nearest search) and on a feature layer of
the ResNet (its first bottleneck stage's output), random resize/pad + noise, the audit (adaptive
and transfer; without a surrogate the transfer attack is reported as skipped), certification, the
gRPC server on a loopback port and a real tritonserver, each compared with the in-process labels.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rgb_models import COLOUR_CLASSES, RESNET_STAGE1, foolbox_data_dir

from advshield.attacks.audit.records import load_examples
from advshield.cli import main
from advshield.core.errors import ModelError
from advshield.defenses.detector import SqueezeDetector, SqueezeDetectorConfig
from advshield.defenses.patches import PatchReplacement, PatchReplacementConfig, extract_patches
from advshield.defenses.registry import build_defense, parse_defense
from advshield.plugin.classifiers import OnnxClassifier, TwinClassifier
from advshield.plugin.config import load_pipeline, loads_pipeline
from advshield.plugin.pipeline import DefendedClassifier

HEADER = """
[pipeline]
name = "{name}"

[model]
path = "{model}"
{surrogate}

[input]
channels = 3
height = 32
width = 32

[data]
dataset = "folder"
directory = "{data}"
"""

PIPELINES = {
    # 3x3x3 patches (one slice of depth 3) then a squeeze detector in Xu et al.'s colour setting
    "rgb_patches": """
[[defenses]]
type = "patch_replacement"
layer = "image"
depth = 3
radius = 1
stride = 2
codewords = 256
sample = 30000
fit_images = 300
iterations = 10
artifact = "codebook"

[detector]
type = "squeeze"
squeezers = [{type = "bit_depth", bits = 5}, {type = "median", size = 2}]
fpr = 0.1
artifact = "threshold"

[artifacts.codebook]
path = "artifacts/rgb_codebook.npy"

[artifacts.threshold]
path = "artifacts/rgb_threshold.json"

[fit]
samples = 300
calibration = 700
""",
    "rgb_random": """
[[defenses]]
type = "random_resize_pad"
min_size = 28
max_size = 31
padded_size = 34
interpolation = "bilinear"

[[defenses]]
type = "gaussian_noise"
sigma = 0.03
""",
    "rgb_plain": """
[[defenses]]
type = "bit_depth"
bits = 5
""",
}


def as_png(chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(buf, format="PNG")
    return buf.getvalue()


def folder_images(root: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` images of root/<class>/*.png in sorted order: uint8 NCHW, labels."""
    files = sorted(root.glob("*/*.png"))[:n]
    x = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    return x, np.array([names.index(f.parent.name) for f in files], np.int64)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    return None


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, rgb_cnn, rgb_surrogate, colour_folder):
    """The pipeline files, fitted by ``advshield fit``'s code on the folder's train/ images."""
    from advshield.plugin.fitting import fit_pipeline, fit_spec

    folder = tmp_path_factory.mktemp("rgb_pipelines")
    paths, summaries = {}, {}
    for name, body in PIPELINES.items():
        surrogate = f'surrogate = "{rgb_surrogate.path.as_posix()}"' if name == "rgb_plain" else ""
        path = folder / f"{name}.toml"
        path.write_text(HEADER.format(name=name, model=rgb_cnn.path.as_posix(), surrogate=surrogate,
                                      data=colour_folder.as_posix()) + body)
        cfg = load_pipeline(path)
        summaries[name] = fit_pipeline(cfg, fit_spec(cfg), progress=False)
        paths[name] = path
    return paths, summaries


@pytest.fixture(scope="module")
def test_images(colour_folder):
    """The 400 held-out test images of the folder (uint8 NCHW) and labels."""
    return folder_images(colour_folder / "test", 400)


# --- the fixtures themselves ----------------------------------------------------------------------

def test_rgb_cnn_is_accurate_and_its_twin_matches(rgb_cnn):
    assert rgb_cnn.accuracy > 0.9, rgb_cnn
    onnx_clf = OnnxClassifier(rgb_cnn.path, device="cpu")
    assert onnx_clf.input_shape == (3, 32, 32) and onnx_clf.num_classes == 10
    x = torch.from_numpy(rgb_cnn.test.as_float(0, 200))
    pred = onnx_clf(x).argmax(1).numpy()
    assert (pred == rgb_cnn.test.labels[:200]).mean() > 0.9
    twin = TwinClassifier(rgb_cnn.path, device="cpu", reference=onnx_clf, check_with=x[:16])
    assert twin.parity.ok and twin.parity.argmax_agreement == 1.0


def test_colour_matters(rgb_cnn):
    """The classes differ by colour family, not only shape: swapping red and blue moves most
    images to the other family (warm_x <-> cool_x)."""
    x = rgb_cnn.test.as_float(0, 200)
    clf = OnnxClassifier(rgb_cnn.path, device="cpu")
    swapped = clf(torch.from_numpy(np.ascontiguousarray(x[:, ::-1]))).argmax(1).numpy()
    expected = (rgb_cnn.test.labels[:200] + 5) % 10
    assert (swapped == expected).mean() > 0.7


def test_foolbox_images_form_an_image_folder(foolbox_cifar10, foolbox_imagenet):
    assert foolbox_data_dir().is_dir()
    assert len(foolbox_cifar10.files) == 20 and len(foolbox_imagenet.files) == 20
    assert foolbox_cifar10.classes[3] == "cat" and len(foolbox_imagenet.classes) == 1000
    for tree in (foolbox_cifar10, foolbox_imagenet):
        for f, label in zip(tree.files, tree.labels):
            assert f.parent.parent == tree.root and f.parent.name == tree.classes[label]
            assert Image.open(f).mode == "RGB"
        assert tree.classes_file.read_text().split() == list(tree.classes)
    assert Image.open(foolbox_cifar10.files[0]).size == (32, 32)


@pytest.mark.parametrize("kind", ["cifar10", "imagenet"])
def test_foolbox_folders_as_folder_data_sets(kind, foolbox_cifar10, foolbox_imagenet, rgb_cnn, resnet_slim):
    """foolbox's CIFAR-10 (32x32 PNG) and ImageNet (512x512 JPEG, centre-cropped to 224) samples
    through the folder data set, with the full class list from the classes file: every image
    lands in one split with the label of its file name."""
    from advshield.plugin.datasets import load_data

    tree, model, extra = ((foolbox_cifar10, rgb_cnn.path, "") if kind == "cifar10"
                          else (foolbox_imagenet, resnet_slim, 'resize = "crop"'))
    cfg = loads_pipeline(f"""
[model]
path = "{Path(model).as_posix()}"

[input]
{extra}

[data]
dataset = "folder"
directory = "{tree.root.as_posix()}"
classes_file = "{tree.classes_file.as_posix()}"
""")
    size = 32 if kind == "cifar10" else 224
    parts = [load_data(cfg, split).data for split in ("train", "test")]
    for d in parts:
        assert d.images.shape[1:] == (3, size, size) and d.classes == tree.classes
    assert sorted(np.concatenate([d.labels for d in parts]).tolist()) == sorted(tree.labels)


# --- patch replacement on 3 channels -----------------------------------------------------------------

def _nearest_numpy(patches: np.ndarray, book: np.ndarray) -> np.ndarray:
    d = ((patches[:, None, :] - book[None]) ** 2).sum(-1)
    return d.argmin(1)


@pytest.mark.parametrize("search", ["faiss", "torch"])
def test_rgb_patches_are_brute_force_nearest_codewords(rgb_cnn, search):
    """Non-overlapping 3x3x3 patches (stride 3): every patch of the output is a codeword, the one a
    brute-force search finds nearest to the input's patch (layout rows, columns, channels)."""
    cfg = PatchReplacementConfig(depth=3, radius=1, stride=3, codewords=32, sample=32, artifact="c", search=search)
    d = PatchReplacement(cfg)
    x = torch.from_numpy(rgb_cnn.test.as_float(0, 4))
    rng = np.random.default_rng(0)
    pool = extract_patches(x, cfg)[0].numpy()
    book = pool[rng.choice(len(pool), 32, replace=False)] + rng.normal(0, 0.01, (32, 27)).astype(np.float32)
    d.set_codebooks(book[None].astype(np.float32))
    with torch.no_grad():
        y = d(x).numpy()
    assert y.shape == x.shape
    xs = x.numpy()
    for n in range(len(xs)):
        for r in range(3, 30, 3):  # interior centres: the whole patch inside the image
            for c in range(3, 30, 3):
                p = xs[n, :, r - 1 : r + 2, c - 1 : c + 2].transpose(1, 2, 0).reshape(1, 27)
                q = y[n, :, r - 1 : r + 2, c - 1 : c + 2].transpose(1, 2, 0).reshape(27)
                np.testing.assert_allclose(q, book[_nearest_numpy(p, book)[0]], atol=1e-6)


def test_rgb_overlapping_patches_search_matches_brute_force(rgb_cnn):
    cfg = PatchReplacementConfig(depth=3, radius=1, stride=1, codewords=64, sample=64, artifact="c")
    d = PatchReplacement(cfg)
    x = torch.from_numpy(rgb_cnn.test.as_float(0, 2))
    patches = extract_patches(x, cfg)
    assert patches.shape == (1, 2 * 32 * 32, 27)
    book = np.random.default_rng(1).random((1, 64, 27), dtype=np.float32)
    d.set_codebooks(book)
    got = d.codebooks.nearest(patches)[0].numpy()
    want = _nearest_numpy(patches[0].numpy(), book[0])
    assert (got == want).mean() > 0.999  # float ties aside


def test_rgb_pipeline_fit_codebook_and_detector(pipelines, rgb_cnn, test_images):
    paths, summaries = pipelines
    s = summaries["rgb_patches"]
    codebook = np.load(s["artifacts"]["codebook"]["path"])
    assert codebook.shape == (1, 256, 27) and codebook.min() >= -1e-6 and codebook.max() <= 1 + 1e-6
    det = s["detector"]
    assert det["samples"] == 700 and "warning" not in det
    clf = DefendedClassifier.from_config(paths["rgb_patches"])
    x, y = test_images
    pred = clf.predict(torch.from_numpy(x.astype(np.float32) / 255))
    # the stated false-positive rate holds on held-out clean images (calibrated on 700 training images)
    assert abs(pred.flagged.mean() - 0.1) < 0.06, pred.flagged.mean()
    assert (pred.labels == y).mean() > 0.85
    # the defended images are built from codewords: 3x3x3 patches replaced, averaged back
    steps = clf.defenses
    assert steps[0].codebooks.centroids.shape == (1, 256, 27)


def test_detector_warns_when_ties_hide_the_target_rate():
    """1-bit depth on colour images flips many clean predictions outright (score 2): the
    threshold sits at 2 and the detector flags far fewer images than asked; calibration says so."""
    det = SqueezeDetector(SqueezeDetectorConfig(fpr=0.05))
    scores = np.concatenate([np.full(20, 2.0), np.linspace(0, 1, 80)])
    rec = det.calibrate(scores)
    assert rec["threshold"] == 2.0 and rec["fpr_calibration"] == 0.0
    assert "milder squeezers" in rec["warning"]
    assert "warning" not in SqueezeDetector(SqueezeDetectorConfig(fpr=0.05)).calibrate(np.linspace(0, 1, 100))


# --- randomization on RGB --------------------------------------------------------------------------

def test_random_resize_pad_and_noise_on_rgb(pipelines, test_images):
    paths, _ = pipelines
    clf = DefendedClassifier.from_config(paths["rgb_random"])
    x, y = test_images
    xt = torch.from_numpy(x[:100].astype(np.float32) / 255)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = clf.defend(xt, g1), clf.defend(xt, g2)
    assert a.shape == xt.shape and torch.equal(a, b) and float(a.min()) >= 0 and float(a.max()) <= 1
    c = clf.defend(xt, torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)
    # the noise is drawn per channel, not shared across R, G, B
    noise = build_defense(*parse_defense({"type": "gaussian_noise", "sigma": 0.1, "clip": False}, "n"))
    z = noise(torch.full((1, 3, 32, 32), 0.5), torch.Generator().manual_seed(0)) - 0.5
    assert not torch.allclose(z[:, 0], z[:, 1])
    p1, p2 = clf.predict(xt, seed=5), clf.predict(xt, seed=5)
    assert np.array_equal(p1.labels, p2.labels) and p1.seed == 5
    assert (p1.labels == y[:100]).mean() > 0.8


# --- a feature layer of a real architecture ------------------------------------------------------------

def imagenet_batch(n: int) -> torch.Tensor:
    """foolbox's ImageNet samples (512x512 JPEG) resized to 224x224, float32 NCHW in [0, 1]."""
    files = sorted(foolbox_data_dir().glob("imagenet_*.jpg"))[:n]
    arr = [np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)) for f in files]
    return torch.from_numpy(np.stack(arr).transpose(0, 3, 1, 2).astype(np.float32) / 255)


RESNET_FEATURE = """
[pipeline]
name = "r50_feature"

[model]
path = "{model}"

[input]
channels = 3
height = 224
width = 224

[[defenses]]
type = "patch_replacement"
layer = "{layer}"
depth = 8
radius = 1
stride = 3
codewords = 32
sample = 4096
fit_images = 6
iterations = 5
strategy = "linf"
eps = 0.5
artifact = "stage1"

[artifacts.stage1]
path = "artifacts/stage1.npy"

[deploy]
max_batch_size = 8
"""


@pytest.fixture(scope="module")
def resnet_feature_pipeline(resnet_slim, tmp_path_factory):
    """Patch replacement on ResNet's first-stage output, its codebook learnt on that layer's
    features of six foolbox ImageNet images (the defense's own fit, the model's head bound)."""
    from advshield.plugin.split import bind_feature_extractors

    path = tmp_path_factory.mktemp("r50_feature") / "r50_feature.toml"
    path.write_text(RESNET_FEATURE.format(model=resnet_slim.as_posix(), layer=RESNET_STAGE1))
    cfg = load_pipeline(path)
    step = build_defense(cfg.defenses[0].type, cfg.defenses[0].config)
    assert bind_feature_extractors(cfg, [step]) == 1
    step.fit(imagenet_batch(6), {"stage1": cfg.artifact_path("stage1")}, seed=0, progress=False)
    assert step.codebooks.centroids.shape == (8, 32, 72)  # 64 channels / depth 8, 3x3x8 patches
    return path


def test_resnet_feature_layer_split_fit_and_twin(resnet_slim, resnet_feature_pipeline):
    """Patch replacement on the output of ResNet's first bottleneck stage: the cut separates the
    graph (a tensor inside a residual block does not), the codebook is learnt on that layer's
    features, the served split model runs head -> replacement -> tail, and its differentiable twin
    matches it segment by segment and passes gradients (BPDA)."""
    from advshield.plugin.split import candidate_tensors, split_model, twin_of_split

    cands = {t.name: t.shape for t in candidate_tensors(resnet_slim)}
    assert cands[RESNET_STAGE1][1:] == (64, 56, 56)
    with pytest.raises(ModelError, match="does not separate"):
        split_model(resnet_slim, ["/layer1/layer1.2/conv3/Conv_output_0"])  # the shortcut also reads the block input
    x = imagenet_batch(8)
    clf = DefendedClassifier.from_config(resnet_feature_pipeline)
    split = clf.classifier
    assert split.cuts == (RESNET_STAGE1,) and clf.num_classes == 1000
    pred = clf.predict(x[:4])
    # head -> replacement -> tail by hand
    head = split.segments[0](x[:4])
    assert tuple(head.shape) == (4, 64, 56, 56)
    with torch.no_grad():
        manual = split.segments[1](split.steps[0][0](head))
    assert np.array_equal(manual.argmax(1).numpy(), pred.labels)
    twin = twin_of_split(split, check_with=x[:4])
    assert max(twin.parity) < 1e-3
    xg = x[:2].clone().requires_grad_(True)
    out = twin(xg)
    out[:, 0].sum().backward()
    assert torch.isfinite(xg.grad).all() and float(xg.grad.abs().sum()) > 0


# --- the audit and certification ------------------------------------------------------------------------

AUDIT = dict(samples=24, batch_size=24, progress=False, fresh=True)
AUDIT_SECTION = """
[gate]
gate_eps = 0.03137254901960784

[audit]
eps_linf = [0.0078431372549, 0.03137254901960784]
eps_l2 = [0.25, 1.0]
probe_samples = 4
probe_restarts = 2
sanity_samples = 8
attacks = [{name = "ddn"}, {name = "apgd_ce_linf"}, {name = "apgd_ce_l2"}, {name = "pgd_linf", transfer = true}]
"""


def _with_audit(path: Path, tag: str, drop_surrogate: bool = False) -> Path:
    """A copy of the pipeline file with the [audit] section, beside it (same artifacts)."""
    text = path.read_text()
    if drop_surrogate:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("surrogate"))
    out = path.with_name(f"{path.stem}_{tag}.toml")
    out.write_text(text + AUDIT_SECTION)
    return out


def _check_audit(res, transfer: bool) -> None:
    rows = [r for r in res.records if r.get("kind") == "budget" and r.get("valid") and r.get("source") != "sanity"]
    assert rows
    for r in rows:  # every example within its budget (rounded to 8 bits, then checked)
        assert r[r["norm"]] <= r["eps"] * (1 + 1e-6) + 1e-6, r
    m = res.metrics
    clean = m["clean_accuracy"]
    assert clean > 0.8
    for name, a in m["attacks"].items():
        for v in a.get("robust_accuracy", []) + a.get("robust_accuracy_linf", []):
            assert v <= clean + 1e-9, (name, v, clean)
    assert ("transfer_pgd_linf" in m["attacks"]) == transfer


def test_audit_rgb_adaptive_with_transfer(pipelines, tmp_path):
    from advshield.attacks.audit_pipeline import audit_pipeline

    paths, _ = pipelines
    cfg = load_pipeline(_with_audit(paths["rgb_plain"], "transfer"))
    res = audit_pipeline(cfg, out=tmp_path / "audit", **AUDIT)
    _check_audit(res, transfer=True)
    assert res.report["mode"]["surrogate"] == "rgb_surrogate.onnx" and "transfer_skipped" not in res.report["mode"]
    assert res.report["mode"]["bpda"] == ["bit_depth"]
    examples = load_examples(res.out, "ddn")
    assert examples and all(e.shape == (3, 32, 32) for e in examples.values())


def test_audit_rgb_without_surrogate_says_transfer_was_skipped(pipelines, tmp_path):
    from advshield.attacks.audit_pipeline import audit_pipeline

    paths, _ = pipelines
    cfg = load_pipeline(_with_audit(paths["rgb_plain"], "no_surrogate", drop_surrogate=True))
    assert cfg.surrogate_path is None
    res = audit_pipeline(cfg, out=tmp_path / "audit", **AUDIT)
    _check_audit(res, transfer=False)
    assert "no [model] surrogate" in res.report["mode"]["transfer_skipped"]
    assert "skipped: the pipeline has no [model] surrogate" in res.paths["report_md"].read_text()


def test_audit_rgb_patches_and_detector(pipelines, tmp_path):
    """The patch + detector pipeline: BPDA through the replacement, the detector-aware attack
    model; norms within budget and robust accuracy at most the clean accuracy."""
    from advshield.attacks.audit_pipeline import audit_pipeline

    paths, _ = pipelines
    cfg = load_pipeline(_with_audit(paths["rgb_patches"], "audit"))
    res = audit_pipeline(cfg, out=tmp_path / "audit", samples=16, batch_size=16, progress=False, fresh=True,
                         attacks=["apgd_ce_linf"])
    _check_audit(res, transfer=False)
    assert res.report["mode"]["detector_aware"] and "patch_replacement" in res.report["mode"]["bpda"]


def test_certify_rgb(pipelines, tmp_path):
    from advshield.attacks.certify import certify_pipeline, certify_spec

    paths, _ = pipelines
    cfg = load_pipeline(paths["rgb_plain"])
    spec = certify_spec(cfg, samples=12, n0=16, n=64, batch_size=64, sigmas=(0.12,))
    res = certify_pipeline(cfg, spec, tmp_path / "certify", progress=False)
    rows = [json.loads(line) for line in res.records_path.read_text().splitlines() if line.strip()]
    assert len(rows) == 12
    normal = torch.distributions.Normal(0.0, 1.0)
    for r in rows:  # radius = sigma * Phi^-1(p_A lower bound) where certified, 0 where ABSTAIN
        if r["predicted"] == -1:
            assert r["radius"] == 0
        else:
            assert r["radius"] == pytest.approx(0.12 * float(normal.icdf(torch.tensor(r["p_lower"]))), rel=1e-4)
    values = res.summary["sigmas"]["0.12"]["certified_accuracy"]
    assert len(values) == len(spec.radii)
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(values))  # non-increasing in the radius
    assert values[0] > 0.5


# --- serving: advshield's gRPC server and a real tritonserver ---------------------------------------------

def test_serve_rgb_png_bytes_over_grpc(pipelines, test_images):
    """A real gRPC server on a free loopback port; RGB PNG bytes through advshield's client give the
    in-process labels, probabilities and detector flags."""
    from advshield.plugin.client import RemoteClassifier
    from advshield.plugin.server import ScoringServer, serve_spec

    paths, _ = pipelines
    cfg = load_pipeline(paths["rgb_patches"])
    local = DefendedClassifier.from_config(cfg)
    x, _ = test_images
    pngs = [as_png(img) for img in x[:24]]
    want = local.predict_bytes(pngs)
    assert np.array_equal(want.labels, local.predict(torch.from_numpy(x[:24].astype(np.float32) / 255)).labels)
    server = ScoringServer(local, serve_spec(cfg, host="127.0.0.1", port=0, max_batch_size=8, threads=1),
                           model_name=cfg.pipeline.name).start()
    try:
        with RemoteClassifier(f"127.0.0.1:{server.port}") as remote:
            assert remote.input_shape == (3, 32, 32) and remote.num_classes == 10
            got = remote.predict_bytes(pngs)
            pixels = remote.predict(torch.from_numpy(x[:24].astype(np.float32) / 255))
    finally:
        server.stop(grace=1.0)
    assert np.array_equal(got.labels, want.labels) and np.array_equal(pixels.labels, want.labels)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-5)
    assert np.array_equal(got.flagged, want.flagged)


def test_advshield_serve_command_on_rgb(pipelines, test_images, tmp_path):
    """``advshield serve`` in its own process (port 0, the port read from its log): RGB PNG bytes
    through the client give the in-process labels."""
    from server_helpers import start_server

    from advshield.plugin.client import RemoteClassifier

    paths, _ = pipelines
    x, _ = test_images
    pngs = [as_png(img) for img in x[:12]]
    want = DefendedClassifier.from_config(paths["rgb_patches"]).predict_bytes(pngs)
    server = start_server(paths["rgb_patches"], tmp_path / "serve.log", "--host", "127.0.0.1")
    try:
        with RemoteClassifier(server.url) as remote:
            got = remote.predict_bytes(pngs)
    finally:
        assert server.stop() == 0
    assert np.array_equal(got.labels, want.labels) and np.array_equal(got.flagged, want.flagged)


def test_deploy_triton_rgb(pipelines, test_images, tmp_path):
    """``advshield deploy triton``'s repository for the RGB patch + detector pipeline, served by the
    wheel's tritonserver: labels and flags equal the in-process pipeline's."""
    from advshield.deploy.triton import generate_repository, serve_repository
    from advshield.plugin.client import RemoteClassifier

    paths, _ = pipelines
    t0 = time.perf_counter()
    assert main(["deploy", "triton", str(paths["rgb_patches"]), "--out", str(tmp_path / "models"),
                 "--classifier-backend", "python"]) == 0
    repo = generate_repository(paths["rgb_patches"], tmp_path / "models", classifier_backend="python", overwrite=True)
    ens = repo.config("rgb_patches")
    dims = {i.name: list(i.dims) for i in ens.input}
    assert dims["PIXELS"] == [-1, 3, 32, 32]  # the public model: not batching, batch dimension -1
    server = serve_repository(repo, log_path=tmp_path / "triton.log", threads=1)
    x, _ = test_images
    batch = torch.from_numpy(x[:16].astype(np.float32) / 255)
    try:
        with RemoteClassifier(server.url, "rgb_patches") as remote:
            got = remote.predict(batch)
            got_png = remote.predict_bytes([as_png(i) for i in x[:16]])
    finally:
        assert server.stop() == 0, server.log()[-4000:]
    want = DefendedClassifier.from_config(paths["rgb_patches"]).predict(batch)
    assert np.array_equal(got.labels, want.labels) and np.array_equal(got_png.labels, want.labels)
    assert np.array_equal(got.flagged, want.flagged)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    assert time.perf_counter() - t0 < 300


def test_deploy_triton_resnet_feature_layer(resnet_feature_pipeline, tmp_path):
    """The ResNet split at its first stage's output as a Triton ensemble (head -> replacement ->
    tail, tensor names with '/' as the exporter writes them): the in-process labels and scores."""
    from advshield.deploy.triton import generate_repository, serve_repository
    from advshield.plugin.client import RemoteClassifier

    repo = generate_repository(resnet_feature_pipeline, tmp_path / "models", classifier_backend="python")
    seg0 = repo.config("r50_feature__segment0")
    assert [(o.name, list(o.dims)) for o in seg0.output] == [(RESNET_STAGE1, [64, 56, 56])]
    x = imagenet_batch(4)
    server = serve_repository(repo, log_path=tmp_path / "triton.log", threads=1)
    try:
        with RemoteClassifier(server.url, "r50_feature") as remote:
            assert remote.input_shape == (3, 224, 224) and remote.num_classes == 1000
            got = remote.predict(x)
    finally:
        assert server.stop() == 0, server.log()[-4000:]
    want = DefendedClassifier.from_config(resnet_feature_pipeline).predict(x)
    assert np.array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)


def test_class_names_of_the_colour_folder(colour_folder):
    names = sorted(p.name for p in (colour_folder / "test").iterdir())
    assert [n.split("_", 1)[1] for n in names] == list(COLOUR_CLASSES)
