"""Data sets a team already has: image folders and manifests (advshield.plugin.datasets), the crop
policy shared with serving, the seeded fit/evaluation split, ``--data`` and ``predict`` on folders."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advshield.attacks.report import validate_report
from advshield.cli import main
from advshield.core.data import FASHION_CLASSES, Dataset
from advshield.core.errors import ConfigError, DataError
from advshield.plugin.config import DataSpec, InputSpec, load_pipeline, loads_pipeline
from advshield.plugin.datasets import (
    list_folder,
    load_data,
    read_manifest,
    stratified_split,
    with_data,
)
from advshield.plugin.decode import crop_geometry, decode_image, decode_pixels
from advshield.plugin.fitting import FitSpec, fit_counts

# --- helpers -----------------------------------------------------------------------------------------


def code_image(code: int, size: tuple[int, int], mode: str) -> np.ndarray:
    """An image (H, W[, 3]) whose top-left pixel (channel 0) holds ``code``: it tells images apart."""
    h, w = size
    rng = np.random.default_rng(code)
    a = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
    a[0, 0] = code
    return a


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path


def make_folder(root: Path, counts: dict[str, int], size=(8, 8), mode="RGB", start: int = 0) -> dict[int, str]:
    """One sub-folder per class with ``counts[class]`` PNGs; returns code -> class name."""
    codes: dict[int, str] = {}
    code = start
    for cls, n in counts.items():
        for i in range(n):
            write_png(root / cls / f"{i:03d}.png", code_image(code, size, mode))
            codes[code] = cls
            code += 1
    return codes


def pipeline(folder: Path, data: str, input_: str = "channels = 3\nheight = 8\nwidth = 8", name: str = "p.toml",
             extra: str = "") -> Path:
    """A pipeline file whose model is absent: loading it keeps the [input] given (no graph to read)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[model]\npath = "absent.onnx"\n[input]\n{input_}\n[data]\n{data}\n{extra}')
    return path


def codes_of(ds: Dataset) -> list[int]:
    return [int(c) for c in ds.images[:, 0, 0, 0]]


# --- folder data sets ----------------------------------------------------------------------------------

def test_folder_rgb_and_grey_labels_classes_and_dataset_contract(tmp_path):
    codes = make_folder(tmp_path / "data", {"b_dog": 5, "a_cat": 4}, mode="RGB")
    codes.update(make_folder(tmp_path / "data", {"c_grey": 3}, mode="L", start=100))
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "folder"\ndirectory = "data"'))
    assert cfg.data.class_names_at(cfg.root) == ("a_cat", "b_dog", "c_grey")  # sorted folder names
    train, test = load_data(cfg, "train"), load_data(cfg, "test")
    for part in (train, test):
        ds = part.data
        assert ds.classes == ("a_cat", "b_dog", "c_grey")
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (3, 8, 8) and ds.images.ndim == 4
        for code, label in zip(codes_of(ds), ds.labels, strict=True):
            assert ds.classes[label] == codes[code]
        # grey images converted to RGB (color = "convert"): three equal channels
        grey = [i for i, c in enumerate(codes_of(ds)) if c >= 100]
        assert grey and all((ds.images[i, 0] == ds.images[i, 1]).all() and (ds.images[i, 1] == ds.images[i, 2]).all()
                            for i in grey)
        x = ds.as_float(0, 2)
        assert x.dtype == np.float32 and x.shape == (2, 3, 8, 8) and np.allclose(x * 255, ds.images[:2])
        sub = ds.subset(1, 3)
        assert len(sub) == 2 and (sub.images == ds.images[1:3]).all() and sub.classes == ds.classes
    # disjoint, and together every image exactly once
    assert not set(codes_of(train.data)) & set(codes_of(test.data))
    assert sorted(codes_of(train.data) + codes_of(test.data)) == sorted(codes)
    # sha256 covers the colour pixels: one changed pixel value changes it
    ds = test.data
    changed = ds.images.copy()
    changed[0, 2, 3, 3] ^= 1
    assert Dataset(changed, ds.labels, ds.classes, ds.name).sha256() != ds.sha256()
    assert test.description["sha256"] == ds.sha256() and test.description["counts"] == {"train": 6, "test": 6}


def test_folder_pixels_are_what_serving_decodes(tmp_path):
    """Data sets and serving share one decoder: a folder image's pixels equal decode_image's."""
    write_png(tmp_path / "d" / "x" / "a.png", code_image(7, (20, 12), "RGB"))
    write_png(tmp_path / "d" / "x" / "b.png", code_image(8, (20, 12), "RGB"))
    write_png(tmp_path / "d" / "y" / "c.png", code_image(9, (9, 30), "L"))
    write_png(tmp_path / "d" / "y" / "e.png", code_image(10, (9, 30), "L"))
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "folder"\ndirectory = "d"',
                                 'channels = 3\nheight = 8\nwidth = 8\nresize = "crop"\ncrop_fraction = 0.8'))
    files = {p.name: p for p in (tmp_path / "d").rglob("*.png")}
    for split in ("train", "test"):
        part = load_data(cfg, split).data
        assert part.images.shape[1:] == (3, 8, 8)
        for img in part.images:  # resampled: find each image's file by comparing with what serving decodes
            matches = [n for n, p in files.items()
                       if np.array_equal(np.rint(decode_image(p.read_bytes(), cfg.input) * 255).astype(np.uint8), img)]
            assert len(matches) == 1


def test_explicit_classes_and_classes_file_define_the_label_order(tmp_path):
    make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "folder"\ndirectory = "data"\nclasses = ["dog", "bird", "cat"]'))
    part = load_data(cfg, "test").data
    assert part.classes == ("dog", "bird", "cat")
    names = {codes_of(part)[i]: part.classes[lab] for i, lab in enumerate(part.labels)}
    assert all(v == ("cat" if k < 2 else "dog") for k, v in names.items())
    (tmp_path / "names.txt").write_text("dog\n\n  cat  \n")
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "folder"\ndirectory = "data"\nclasses_file = "names.txt"'))
    assert cfg.data.class_names_at(cfg.root) == ("dog", "cat")
    assert load_data(cfg, "train").data.classes == ("dog", "cat")
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "folder"\ndirectory = "data"\nclasses = ["dog", "bird"]'))
    with pytest.raises(DataError, match=r"data/cat: class folder 'cat' is not in data.classes"):
        load_data(cfg, "test")


def test_train_and_test_subfolders_are_the_split(tmp_path):
    make_folder(tmp_path / "data" / "train", {"a": 3, "b": 2})
    make_folder(tmp_path / "data" / "val", {"a": 1, "b": 2}, start=50)
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "folder"\ndirectory = "data"'))
    assert cfg.data.class_names_at(cfg.root) == ("a", "b")
    train, test = load_data(cfg, "train"), load_data(cfg, "test")
    assert sorted(codes_of(train.data)) == list(range(5)) and sorted(codes_of(test.data)) == [50, 51, 52]
    assert test.description["split_by"] == "the sub-folders train/ and val/"
    assert test.description["counts"] == {"train": 5, "test": 3}


# --- manifests -----------------------------------------------------------------------------------------

def test_csv_and_jsonl_manifests_paths_relative_to_the_manifest(tmp_path):
    for i in range(6):
        write_png(tmp_path / "imgs" / f"{i}.png", code_image(i, (8, 8), "RGB"))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "m.csv").write_text("path,label,extra\n" + "".join(
        f"../imgs/{i}.png,{'cat' if i < 3 else 'dog'},x\n" for i in range(6)))
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "manifest"\nmanifest = "lists/m.csv"'))
    both = [load_data(cfg, s).data for s in ("train", "test")]
    assert both[0].classes == ("cat", "dog")
    for ds in both:
        assert all(ds.classes[lab] == ("cat" if c < 3 else "dog") for c, lab in zip(codes_of(ds), ds.labels, strict=True))
    assert sorted(codes_of(both[0]) + codes_of(both[1])) == list(range(6))
    # JSONL: indices into the class list, absolute and relative paths, a split column
    rows = [{"path": str(tmp_path / "imgs" / "0.png"), "label": 1, "split": "train"},
            {"path": "../imgs/1.png", "label": "0", "split": "train"},
            {"path": "../imgs/2.png", "label": "ant", "split": "test"},
            {"path": "../imgs/3.png", "label": 2, "split": "test"}]
    (lists / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "manifest"\nmanifest = "lists/m.jsonl"\n'
                                           'classes = ["ant", "bee", "cow"]'))
    train, test = load_data(cfg, "train"), load_data(cfg, "test")
    assert dict(zip(codes_of(train.data), train.data.labels.tolist(), strict=True)) == {0: 1, 1: 0}
    assert dict(zip(codes_of(test.data), test.data.labels.tolist(), strict=True)) == {2: 0, 3: 2}
    assert "split column" in test.description["split_by"]
    # without a class list, integer labels are indices "0".."K-1"
    assert read_manifest(lists / "m.jsonl", ()).classes == ("0", "1", "2", "ant")  # a name among them: all names
    (lists / "ints.csv").write_text("path,label\n../imgs/0.png,2\n../imgs/1.png,0\n")
    assert read_manifest(lists / "ints.csv", ()).classes == ("0", "1", "2")


# --- the crop policy -------------------------------------------------------------------------------------

def test_crop_policy_by_hand():
    """64x32 image, 16x16 input, crop_fraction 0.5: shorter side 32 = round(16 / 0.5) already, so no
    resampling; the centre crop starts at ((64 - 16) / 2, (32 - 16) / 2) = (24, 8)."""
    a = code_image(3, (32, 64), "RGB")
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    spec = InputSpec(channels=3, height=16, width=16, resize="crop", crop_fraction=0.5)
    got = decode_pixels(out.getvalue(), spec)
    assert got.shape == (3, 16, 16) and got.dtype == np.uint8
    assert np.array_equal(got, a[8:24, 24:40].transpose(2, 0, 1))
    assert np.allclose(decode_image(out.getvalue(), spec) * 255, got)
    # with resampling: 100x50 to 20x20 at 0.8: shorter side round(20 / 0.8) = 25, longer 50; crop at
    # (round(15), round(2.5)) = (15, 2) (round half to even, as torchvision's CenterCrop)
    assert crop_geometry(100, 50, 20, 20, 0.8) == ((50, 25), (15, 2))
    assert crop_geometry(50, 100, 20, 20, 0.8) == ((25, 50), (2, 15))
    assert crop_geometry(500, 375, 224, 224, 0.875) == ((341, 256), (58, 16))  # ImageNet: 256 then 224
    b = code_image(4, (50, 100), "L")
    out = io.BytesIO()
    Image.fromarray(b).save(out, format="PNG")
    spec = InputSpec(channels=1, height=20, width=20, resize="crop", crop_fraction=0.8)
    expected = np.asarray(Image.fromarray(b).resize((50, 25), Image.Resampling.BILINEAR))[2:22, 15:35]
    assert np.array_equal(decode_pixels(out.getvalue(), spec)[0], expected)
    # the same policy applies to an image of exactly the input's size (equal content, equal pixels)
    c = code_image(5, (20, 20), "L")
    out = io.BytesIO()
    Image.fromarray(c).save(out, format="PNG")
    zoomed = np.asarray(Image.fromarray(c).resize((25, 25), Image.Resampling.BILINEAR))[2:22, 2:22]
    assert np.array_equal(decode_pixels(out.getvalue(), spec)[0], zoomed)
    with pytest.raises(ConfigError, match=r"input.crop_fraction: must be within \(0, 1\]"):
        InputSpec(crop_fraction=1.5)


# --- the split --------------------------------------------------------------------------------------------

def test_split_is_seeded_disjoint_and_stratified():
    labels = np.array([0] * 10 + [1] * 6 + [2] * 1 + [3] * 2)
    a = stratified_split(labels, 0.5, seed=3)
    assert not set(a["train"]) & set(a["test"])
    assert sorted([*a["train"], *a["test"]]) == list(range(len(labels)))
    assert [int((labels[a["train"]] == c).sum()) for c in range(4)] == [5, 3, 0, 1]
    assert [int((labels[a["test"]] == c).sum()) for c in range(4)] == [5, 3, 1, 1]
    b = stratified_split(labels, 0.5, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = stratified_split(labels, 0.5, seed=4)
    assert set(c["train"]) != set(a["train"])
    quarter = stratified_split(labels, 0.25, seed=0)
    assert [int((labels[quarter["train"]] == c).sum()) for c in range(4)] == [2, 2, 0, 1]  # round(2.5), round(1.5)
    # the evaluation order mixes the classes (an audit's first samples are not all one class)
    big = np.repeat(np.arange(4), 50)
    first = big[stratified_split(big, 0.5, seed=0)["test"][:20]]
    assert len(set(first.tolist())) > 1


def test_split_seed_and_fit_fraction_through_the_pipeline(tmp_path):
    make_folder(tmp_path / "data", {"a": 8, "b": 4})

    def train_codes(data: str) -> set[int]:
        cfg = load_pipeline(pipeline(tmp_path, 'dataset = "folder"\ndirectory = "data"\n' + data))
        return set(codes_of(load_data(cfg, "train").data))

    same = train_codes("split_seed = 1")
    assert same == train_codes("split_seed = 1") and same != train_codes("split_seed = 2")
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "folder"\ndirectory = "data"\nfit_fraction = 0.25'))
    train, test = load_data(cfg, "train"), load_data(cfg, "test")
    assert np.bincount(train.data.labels).tolist() == [2, 1] and np.bincount(test.data.labels).tolist() == [6, 3]
    assert test.description["fit_fraction"] == 0.25 and test.description["split_seed"] == 0


def test_relative_paths_resolve_against_the_pipeline_file(tmp_path, monkeypatch):
    make_folder(tmp_path / "conf" / "data", {"a": 2, "b": 2})
    (tmp_path / "conf" / "names.txt").write_text("a\nb\n")
    pipeline(tmp_path / "conf", 'dataset = "folder"\ndirectory = "data"\nclasses_file = "names.txt"')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_pipeline(Path("..") / "conf" / "p.toml")
    assert cfg.data.class_names_at(cfg.root) == ("a", "b")
    part = load_data(cfg, "test")
    assert len(part.data) == 2 and part.description["source"] == str(tmp_path / "conf" / "data")
    # manifests likewise
    (tmp_path / "conf" / "m.csv").write_text("path,label\ndata/a/000.png,a\ndata/b/000.png,b\n")
    cfg = load_pipeline(pipeline(tmp_path / "conf", 'dataset = "manifest"\nmanifest = "m.csv"', name="m.toml"))
    assert len(load_data(cfg, "test").data) == 2


# --- errors ---------------------------------------------------------------------------------------------

def test_folder_errors_name_the_path(tmp_path):
    def cfg_for(directory: str, extra: str = ""):
        return load_pipeline(pipeline(tmp_path, f'dataset = "folder"\ndirectory = "{directory}"\n{extra}'))

    with pytest.raises(DataError, match=r"data folder not found: .*missing"):
        load_data(cfg_for("missing"), "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: empty data folder"):
        load_data(cfg_for("empty"), "test")
    write_png(tmp_path / "loose" / "x.png", code_image(1, (8, 8), "RGB"))
    with pytest.raises(DataError, match=r"loose: empty data folder"):
        load_data(cfg_for("loose"), "test")
    with pytest.raises(DataError, match=r"loose: no class sub-folders \(it holds 1 image directly"):
        list_folder(tmp_path / "loose", ("a",))
    make_folder(tmp_path / "hollow", {"a": 2})
    (tmp_path / "hollow" / "b").mkdir()
    (tmp_path / "hollow" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"hollow/b: class folder 'b' holds no PNG or JPEG images"):
        load_data(cfg_for("hollow"), "test")


def test_unreadable_images_error_or_skip_and_count(tmp_path):
    make_folder(tmp_path / "data", {"a": 4, "b": 4})
    bad = tmp_path / "data" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = 'dataset = "folder"\ndirectory = "data"\nfit_fraction = 0.1\n'  # nearly everything is evaluated
    cfg = load_pipeline(pipeline(tmp_path, base))
    with pytest.raises(DataError, match=r"data/b/broken.png: unreadable image: .*unreadable = \"skip\""):
        load_data(cfg, "test")
    big = write_png(tmp_path / "data" / "a" / "big.png", code_image(60, (9, 8), "RGB"))  # wrong size: "exact"
    cfg = load_pipeline(pipeline(tmp_path, base + 'unreadable = "skip"'))
    parts = [load_data(cfg, s) for s in ("train", "test")]
    d_train, d_test = parts[0].description, parts[1].description
    assert d_train["skipped"] + d_test["skipped"] == 2
    assert d_train["counts"] == d_test["counts"] == {"train": 2, "test": 8}
    assert len(parts[0].data) + len(parts[1].data) == 8
    skipped = [s for d in (d_train, d_test) for s in d.get("skipped_files", [])]
    assert any(str(bad) in s for s in skipped) and any(str(big) in s and "wrong size" in s for s in skipped)


def test_label_and_manifest_row_errors(tmp_path):
    write_png(tmp_path / "a.png", code_image(1, (8, 8), "RGB"))
    cases = {
        "outside.csv": ("path,label\na.png,zebra\n", r"outside.csv line 2: label 'zebra' is outside the class list"),
        "index.jsonl": ('{"path": "a.png", "label": 5}\n', r"index.jsonl line 1: label 5 is outside the class list"),
        "nolabel.csv": ("path,label\na.png,\n", r"nolabel.csv line 2: missing 'label'"),
        "nopath.jsonl": ('{"label": "cat"}\n', r"nopath.jsonl line 1: missing 'path'"),
        "header.csv": ("file,label\na.png,cat\n", r"header.csv: the header row must name path and label"),
        "notjson.jsonl": ("{oops\n", r"notjson.jsonl line 1: not a JSON object"),
        "empty.csv": ("path,label\n", r"empty.csv: empty manifest"),
        "split.csv": ("path,label,split\na.png,cat,holdout\n", r"split.csv line 2: split 'holdout' must be train, test or val"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        cfg = load_pipeline(pipeline(tmp_path, f'dataset = "manifest"\nmanifest = "{name}"\nclasses = ["cat", "dog"]',
                                     name=f"{name}.toml"))
        with pytest.raises(DataError, match=message):
            load_data(cfg, "test")
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "manifest"\nmanifest = "gone.csv"'))
    with pytest.raises(DataError, match=r"manifest not found: .*gone.csv"):
        load_data(cfg, "test")


def test_data_section_validation():
    cases = {
        'dataset = "folder"': r"data.directory: dataset \"folder\" needs the folder",
        'dataset = "manifest"': r"data.manifest: dataset \"manifest\" needs the CSV or JSONL file",
        'dataset = "imagenet"': r"data.dataset: unknown data set 'imagenet'",
        'directory = "x"': r"data: directory/manifest given without data.dataset",
        'dataset = "folder"\ndirectory = "d"\nfit_fraction = 1.0': r"data.fit_fraction: must be within \(0, 1\)",
        'dataset = "folder"\ndirectory = "d"\nclasses = ["a"]\nclasses_file = "c.txt"': r"give classes or classes_file, not both",
        'dataset = "folder"\ndirectory = "d"\nclasses = ["a", "a"]': r"data.classes: duplicate class name 'a'",
        'dataset = "folder"\ndirectory = "d"\nunreadable = "ignore"': r"data.unreadable: expected 'error' or 'skip'",
        'dataset = "folder"\ndirectory = "d"\nsplit_seed = -1': r"data.split_seed: must be >= 0",
    }
    for body, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            loads_pipeline(f'[model]\npath = "absent.onnx"\n[input]\nchannels = 1\nheight = 8\nwidth = 8\n[data]\n{body}\n')


def test_no_data_set_by_default(tmp_path, capsys):
    path = pipeline(tmp_path, "", "channels = 1\nheight = 28\nwidth = 28")
    cfg = load_pipeline(path)
    assert cfg.data == DataSpec() and cfg.data.dataset == "" and cfg.data.class_names_at(cfg.root) == ()
    with pytest.raises(ConfigError, match=r"no data set: set \[data\] dataset in p.toml or pass --data DIR"):
        load_data(cfg, "test")
    assert DataSpec(dataset="fashion-mnist").class_names_at(tmp_path) == FASHION_CLASSES
    # through the commands: an error (exit 2) naming both ways out
    model = Path(__file__).resolve().parents[1] / "advshield" / "models" / "fashion_cnn.onnx"
    path.write_text(f'[model]\npath = "{model.as_posix()}"\n[audit]\nsamples = 2\nattacks = [{{ name = "fgsm" }}]\n')
    assert main(["audit", str(path), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "no data set: set [data] dataset in p.toml or pass --data DIR" in capsys.readouterr().err


def test_with_data_picks_the_kind(tmp_path):
    cfg = load_pipeline(pipeline(tmp_path, 'dataset = "fashion-mnist"\nclasses = ["x", "y"]\nsplit_seed = 3'))
    (tmp_path / "imgs").mkdir()
    got = with_data(cfg, tmp_path / "imgs")
    assert (got.data.dataset, got.data.directory, got.data.classes, got.data.split_seed) == \
        ("folder", str(tmp_path / "imgs"), ("x", "y"), 3)
    named = load_pipeline(pipeline(tmp_path, 'dataset = "fashion-mnist"', name="named.toml"))
    assert with_data(named, tmp_path / "imgs").data.classes == FASHION_CLASSES  # the label space stays
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    assert with_data(cfg, tmp_path / "idx").data.dataset == "fashion-mnist"
    plain = load_pipeline(pipeline(tmp_path, "", name="plain.toml"))
    assert with_data(plain, tmp_path / "idx").data.dataset == "idx"
    (tmp_path / "m.jsonl").write_text("")
    got = with_data(cfg, tmp_path / "m.jsonl")
    assert (got.data.dataset, got.data.manifest, got.data.directory) == ("manifest", str(tmp_path / "m.jsonl"), "")
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(DataError, match=r"--data: .*m.txt is not a folder or a manifest"):
        with_data(cfg, tmp_path / "m.txt")
    with pytest.raises(DataError, match=r"--data: .*nowhere not found"):
        with_data(cfg, tmp_path / "nowhere")
    assert with_data(cfg, None) is cfg


def test_fit_defaults_shrink_to_a_small_training_split(tmp_path):
    cfg = load_pipeline(pipeline(tmp_path, ""))
    train = Dataset(np.zeros((30, 1, 2, 2), np.uint8), np.zeros(30, np.int64), ("a",), "folder-train")
    assert fit_counts(cfg, FitSpec(), 20000, 10000, train) == (20, 10)  # both defaults: 2:1
    assert fit_counts(cfg, FitSpec(), 0, 10000, train) == (0, 30)  # no learner: the detector takes all
    assert fit_counts(cfg, FitSpec(samples=25), 25, 10000, train) == (25, 5)  # a given count is kept
    with pytest.raises(ConfigError, match=r"samples \(40\) \+ calibration \(0\) exceed the 30 images of folder-train"):
        fit_counts(cfg, FitSpec(samples=40), 40, 0, train)
    pinned = load_pipeline(pipeline(tmp_path, "", extra="[fit]\ncalibration = 10000\n", name="f.toml"))
    with pytest.raises(ConfigError, match=r"calibration \(10000\) exceed the 30 images"):
        fit_counts(pinned, FitSpec(), 0, 10000, train)  # the default value, but written in [fit]


# --- the commands on a tiny grey folder with the shipped reference model -----------------------------------

SQUEEZE = """
[[defenses]]
type = "bit_depth"
bits = 4

[detector]
type = "squeeze"
squeezers = [{ type = "bit_depth", bits = 2 }]
fpr = 0.2
artifact = "thr"

[artifacts.thr]
path = "artifacts/thr.json"

[audit]
samples = 4
batch_size = 4
sanity_samples = 2
probe_samples = 2
eps_linf = [0.05]
eps_l2 = [1.0]
attacks = [{ name = "fgsm" }]

[gate]
min_clean_accuracy = 0.0
"""


@pytest.fixture()
def grey_folder(tmp_path, fashion_test) -> Path:
    """12 real Fashion-MNIST test images as 28x28 grey PNGs: 6 Trousers, 6 Bags, named as the model's classes."""
    root = tmp_path / "shots"
    for cls in ("Trouser", "Bag"):
        k = FASHION_CLASSES.index(cls)
        for i, j in enumerate(np.flatnonzero(fashion_test.labels == k)[:6]):
            write_png(root / cls / f"{i}.png", fashion_test.images[j])
    return root


@pytest.mark.usefixtures("one_thread")
def test_fit_and_audit_with_data_on_a_folder(tmp_path, grey_folder, model_path, capsys):
    path = tmp_path / "conf" / "p.toml"
    path.parent.mkdir()
    # the pipeline names Fashion-MNIST; --data replaces it and keeps the class list
    classes = json.dumps(list(FASHION_CLASSES))
    path.write_text(f'[model]\npath = "{model_path.as_posix()}"\n[input]\nchannels = 1\nheight = 28\nwidth = 28\n'
                    f'[data]\ndataset = "fashion-mnist"\nclasses = {classes}\n{SQUEEZE}')
    assert main(["fit", str(path), "--data", str(grey_folder), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    d = summary["data"]
    assert (d["dataset"], d["source"], d["split"], d["counts"]) == ("folder", str(grey_folder), "train",
                                                                    {"train": 6, "test": 6})
    # no [fit] calibration: the default 10,000 shrinks to the 6 training images
    assert summary["detector"]["samples"] == 6 and (tmp_path / "conf" / "artifacts" / "thr.json").is_file()
    assert "calibration 6" in summary["scaled"]

    out = tmp_path / "audit"
    assert main(["audit", str(path), "--data", str(grey_folder), "--out", str(out), "--threads", "1", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    data = report["pipeline"]["data"]
    assert data["dataset"] == "folder" and data["split"] == "test" and data["range"] == [0, 4]
    assert data["counts"] == {"train": 6, "test": 6} and len(data["evaluated_sha256"]) == 64
    assert report["metrics"]["samples"] == 4 and report["metrics"]["clean_accuracy"] >= 0.75
    validate_report(report)  # the schema describes pipeline.data
    assert f"Data: folder `{grey_folder}`, test split" in (out / "report.md").read_text()
    header = json.loads((out / "records.jsonl").read_text().splitlines()[0])["header"]
    assert header["settings"]["data"]["evaluated_sha256"] == data["evaluated_sha256"]
    # the evaluated images are the test side of the split: none of them was used by fit
    cfg = with_data(load_pipeline(path), grey_folder)
    train, test = load_data(cfg, "train").data, load_data(cfg, "test").data
    assert data["evaluated_sha256"] == test.subset(0, 4).sha256()
    assert not {im.tobytes() for im in train.images} & {im.tobytes() for im in test.images}
    assert set(test.labels.tolist()) <= {FASHION_CLASSES.index("Trouser"), FASHION_CLASSES.index("Bag")}


@pytest.mark.usefixtures("one_thread")
def test_certify_with_data_on_a_folder(tmp_path, grey_folder, pipeline_path, capsys):
    out = tmp_path / "cert"
    assert main(["certify", str(pipeline_path), "--data", str(grey_folder), "--sigma", "0.25", "--n0", "10",
                 "--n", "50", "--samples", "2", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "certify_summary.json").read_text())
    d = summary["data"]
    assert (d["dataset"], d["source"], d["split"], d["range"]) == ("folder", str(grey_folder), "test", [0, 2])
    assert summary["sigmas"]["0.25"]["samples"] == 2
    records = [json.loads(line) for line in (out / "certify_records.jsonl").read_text().splitlines()]
    shots = {FASHION_CLASSES.index("Trouser"), FASHION_CLASSES.index("Bag")}
    assert len(records) == 2 and {r["label"] for r in records} <= shots  # the folder's labels, not Fashion-MNIST's


def test_predict_on_a_folder(tmp_path, grey_folder, pipeline_path, capsys):
    assert main(["predict", str(pipeline_path), str(grey_folder), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = sorted(str(p) for p in grey_folder.rglob("*.png"))
    assert [r["image"] for r in rows] == expected and len(rows) == 12
    right = sum(r["class"] == Path(r["image"]).parent.name for r in rows)
    assert right >= 10
    (tmp_path / "void").mkdir()
    assert main(["predict", str(pipeline_path), str(tmp_path / "void")]) == 2
    assert "no PNG or JPEG files in folder" in capsys.readouterr().err
