"""``advshield init MODEL.onnx --data DIR``: a pipeline file for a user's model and image folder.

What the file says is read from the model (input shape, layout, batch, classes, output kind) and
from the folder (class sub-folders); everything else gets a commented default: defense examples
to uncomment, an audit sized for the image size, and a gate with a robustness threshold, so that
``init``, ``fit`` and ``audit`` turn an ONNX file and a folder into a release verdict.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from advshield.core.errors import ConfigError, DataError
from advshield.plugin.config import folder_classes, load_pipeline
from advshield.plugin.datasets import MANIFEST_SUFFIXES, Listing, list_folder
from advshield.plugin.model_io import read_graph


@dataclass(frozen=True)
class InitResult:
    path: Path
    summary: dict


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _relative(target: Path, base: Path) -> str:
    return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()


def list_data_folder(directory: Path) -> Listing:
    """The image folder ``--data`` names, listed by the folder data set's own code (class
    sub-folders, train/ and test/ or val/ splits, a class folder without images refused)."""
    if not directory.is_dir():
        raise DataError(f"--data {directory}: not a folder")
    if not folder_classes(directory):
        raise DataError(f"--data {directory}: no class sub-folders (one folder per class, e.g. {directory}/cat/*.png)")
    return list_folder(directory, ())


def init_pipeline(model: str | Path, data: str | Path | None, out: str | Path | None = None, *,
                  name: str | None = None, mean: tuple[float, ...] = (), std: tuple[float, ...] = (),
                  scale: float = 1.0, layout: str = "auto", overwrite: bool = False) -> InitResult:
    """Write a pipeline file for ``model`` (and the image folder or manifest ``data``); the file is
    loaded back, so every disagreement between model, data and options is reported now."""
    model = Path(model)
    graph = read_graph(model, layout)
    c, h, w = graph.chw
    if c is None or h is None or w is None:
        raise ConfigError(f"{model.name}: the graph leaves its input size open ({graph.describe_input()}); "
                          "write the pipeline by hand with [input] channels, height and width")
    k = graph.num_classes
    out = Path(out) if out else Path(f"{model.stem}.toml")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    base = out.resolve().parent
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", model.stem) or "classifier"

    classes: list[str] = []
    data_lines = ["# no data yet: `advshield init MODEL --data FOLDER`, or `--data` on fit/audit/certify"]
    if data is not None:
        data = Path(data)
        if data.is_file() and data.suffix.lower() in MANIFEST_SUFFIXES:
            data_lines = ['dataset = "manifest"', f"manifest = {_toml_str(_relative(data, base))}"]
        else:
            listing = list_data_folder(data)
            classes = list(listing.classes)
            data_lines = ['dataset = "folder"', f"directory = {_toml_str(_relative(data, base))}",
                          f"# {len(classes)} classes from the class sub-folders of {data}"
                          + (f" (split by {listing.split_by})" if listing.split_by else "")]
            if k is not None and len(classes) != k:
                raise DataError(
                    f"--data {data}: {len(classes)} class folders but {model.name} has {k} outputs; the folder "
                    "needs one sub-folder per output class, in the model's output order when sorted "
                    "(name them e.g. 000_name, 001_name, ...)")
        data_lines += ["split_seed = 0", "fit_fraction = 0.5   # no train/ and test/ sub-folders: this share fits, the rest is audited",
                       'unreadable = "error" # or "skip" (skipped images are counted in the report)']

    big = max(h, w) >= 64
    resize = "crop" if big else "resize"
    output = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities"}.get(graph.final_op, "auto")
    eps_linf = [1, 2, 4, 8, 16] if big else [2, 4, 8, 16, 26]
    gate_k = 4 if big else 8
    model_lines = [f"path = {_toml_str(_relative(model, base))}",
                   f'layout = "{graph.layout}"          # read from the graph: input {graph.describe_input()}',
                   f'output = "{output}"' + ("           # auto: detected (Softmax / LogSoftmax / a probe batch)" if output == "auto"
                                            else f"  # the graph ends in {graph.final_op}")]
    if mean or std:
        model_lines += [f"mean = {list(mean)}", f"std = {list(std)}"]
    else:
        model_lines += ["# the model's own preprocessing, applied by advshield in front of it (pixels are in [0, 1]):",
                        "# mean = [0.485, 0.456, 0.406]", "# std = [0.229, 0.224, 0.225]"]
    if scale != 1.0:
        model_lines.append(f"scale = {scale}")
    model_lines += ["# surrogate = \"surrogate.onnx\"  # an independently trained model for transfer attacks (optional)",
                    "parity_tolerance = 1e-3"]
    batch = f"fixed batch {graph.batch}, run in chunks" if graph.batch else "dynamic batch"
    text = f"""# Written by `advshield init` for {model.name}: input {c}x{h}x{w} ({graph.layout.upper()}, {batch}), {k} classes.
# Relative paths resolve against this file's folder. Next:
#   advshield info {out.name}      advshield fit {out.name}      advshield audit {out.name}

[pipeline]
name = {_toml_str(name)}
description = {_toml_str(f"{model.name} behind advshield")}

[model]
{chr(10).join(model_lines)}

[input]
# channels, height and width are read from the model ({c}x{h}x{w})
resize = "{resize}"{'          # shorter side to H / crop_fraction, then the centre H x W (ImageNet evaluation)' if big else '        # bilinear to the model size'}
{"crop_fraction = 0.875" if big else '# resize = "exact" refuses images of another size'}

[data]
{chr(10).join(data_lines)}

# Defenses run in file order; uncomment one or more (README: "Defenses" lists every key):
# [[defenses]]
# type = "bit_depth"
# bits = 5
#
# [[defenses]]
# type = "median"
# size = 2
#
# [[defenses]]
# type = "jpeg"
# quality = 75
#
# [[defenses]]
# type = "random_resize_pad"            # random: the audit applies EOT
# min_size = {h}
# max_size = {h + max(2, h // 10)}
# padded_size = {h + max(3, h // 8)}
#
# [[defenses]]
# type = "patch_replacement"            # H. Zhang's thesis, ch. 6: a faiss k-means codebook, `advshield fit` learns it
# layer = "image"
# depth = {c}
# radius = 1
# stride = 2
# codewords = 4096
# artifact = "patches_image"
#
# [artifacts.patches_image]
# path = "artifacts/patches_image.npy"
#
# The feature-squeezing detector (Xu et al., NDSS 2018), threshold calibrated by `advshield fit`:
# [detector]
# type = "squeeze"
# squeezers = [{{ type = "bit_depth", bits = 4 }}, {{ type = "median", size = 2 }}]
# fpr = 0.05
# artifact = "squeeze_threshold"
#
# [artifacts.squeeze_threshold]
# path = "artifacts/squeeze_threshold.json"

[gate]
min_clean_accuracy = 0.0          # set it from the first audit's clean accuracy
# robustness, not only clean accuracy: at L-inf {gate_k}/255 at least half the audited images must
# stay correctly classified under the audit's strongest attacks
min_robust_accuracy = 0.5
gate_eps = {gate_k / 255!r}   # {gate_k}/255

[audit]
samples = 100
batch_size = {16 if big else 100}
eps_linf = [{", ".join(repr(k_ / 255) for k_ in eps_linf)}]   # {", ".join(f"{k_}/255" for k_ in eps_linf)}
eps_l2 = {[0.25, 0.5, 1.0, 2.0] if big else [0.25, 0.5, 1.0, 1.5]}
# the default cascade ends with the black-box stage: Square (1,000 queries per image at each eps it
# runs) and HopSkipJump (1,000 per image) through the serving path; on a slow CPU model that is the
# longest stage: `black_box = false` skips it, or list the attacks with smaller budgets, e.g.
# attacks = ["ddn", "apgd_ce_linf", "apgd_t_linf", {{ name = "square_linf", queries = 300 }}]
# black_box = false
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    try:
        cfg = load_pipeline(out)
    except Exception:
        if not overwrite:
            out.unlink()
        raise
    summary = {"pipeline": str(out), "model": str(model), "input": [c, h, w], "layout": graph.layout,
               "batch": graph.batch, "classes": k, "output": output,
               "class_names": list(cfg.class_names),
               "data": data_lines[0]}
    return InitResult(out, summary)
