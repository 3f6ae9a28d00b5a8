"""The pipeline file: one TOML file that drives predict, fit, serve, audit, certify and deploy.

Relative paths in the file are resolved against the file's own folder. Every table becomes a
frozen dataclass; an unknown key or a bad value raises ``ConfigError`` naming it.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from advshield.core.data import dataset_classes
from advshield.core.errors import ArtifactError, ConfigError, ModelError
from advshield.core.hashing import sha256_file
from advshield.core.validation import check, from_mapping, to_mapping
from advshield.defenses.registry import parse_defense, parse_detector
from advshield.plugin.model_io import GraphInfo, WrappedModel, load_model, read_graph, resolve_shape
from advshield.plugin.smoothing import SmoothingConfig


@dataclass(frozen=True)
class PipelineInfo:
    name: str = "classifier"  # also the served model name (Triton ensemble, gRPC server)
    description: str = ""

    def __post_init__(self) -> None:
        check(
            bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
            f"pipeline.name: {self.name!r} must be non-empty letters, digits, '-', '_' or '.'",
        )


SERVED_INPUT_TYPES = ("FP32", "FP16", "FP64", "UINT8")  # what advshield can hand a served model
SERVED_OUTPUT_TYPES = ("FP32", "FP16", "FP64")


@dataclass(frozen=True)
class ServedSpec:
    """``[model] served``: a classifier that a Triton (KServe v2 gRPC) server already serves.

    What is left empty is read from the server's ModelMetadata and ModelConfig (or, for ``deploy
    triton``, from the model's config.pbtxt in the repository); what is given is checked against
    them (``plugin/served.py``), every mismatch named. ``name = ""``: no served model."""

    endpoint: str = ""  # host:port of its gRPC endpoint (serve, predict, audit; deploy triton does not need it)
    name: str = ""  # the model's name in the server (its folder in the model repository)
    version: str = ""  # "": the server's policy (latest)
    input: str = ""  # input tensor name; "": the model's only input
    output: str = ""  # output tensor name; "": the model's only output
    datatype: str = ""  # of the input: FP32 | FP16 | FP64 | UINT8; "": the model's
    timeout_s: float = 10.0  # deadline of each request to the model
    retries: int = 3  # retries of a request answered UNAVAILABLE (exponential back-off)
    concurrency: int = 2  # requests in flight when one classifier call needs several
    batch_size: int = 0  # images per request; 0: the model's max_batch_size

    def __post_init__(self) -> None:
        check(self.name == "" or all(c.isalnum() or c in "-_." for c in self.name),
              f"model.served.name: {self.name!r} must be letters, digits, '-', '_' or '.'")
        check(self.name != "" or self.endpoint == "", "model.served: endpoint given without the model's name")
        host, _, port = self.endpoint.rpartition(":")
        check(self.endpoint == "" or (bool(host) and port.isdigit() and 0 < int(port) < 65536),
              f"model.served.endpoint: expected HOST:PORT (the server's gRPC port), got {self.endpoint!r}")
        check(self.version == "" or self.version.isdigit(),
              f"model.served.version: expected \"\" (the server's latest) or an integer, got {self.version!r}")
        check(self.datatype in ("", *SERVED_INPUT_TYPES),
              f"model.served.datatype: {self.datatype!r} is not one advshield can feed; expected one of "
              f"{', '.join(SERVED_INPUT_TYPES)} (or \"\": the model's)")
        check(self.timeout_s > 0, f"model.served.timeout_s: must be > 0, got {self.timeout_s}")
        check(self.retries >= 0, f"model.served.retries: must be >= 0, got {self.retries}")
        check(self.concurrency >= 1, f"model.served.concurrency: must be >= 1, got {self.concurrency}")
        check(self.batch_size >= 0, f"model.served.batch_size: must be >= 0 (0: the model's), got {self.batch_size}")

    @property
    def enabled(self) -> bool:
        return bool(self.name)


@dataclass(frozen=True)
class ModelSpec:
    path: str = ""  # the ONNX file; with ``served``: the served model's ONNX twin (optional)
    served: ServedSpec = field(default_factory=ServedSpec)  # a model Triton already serves
    sha256: str = ""  # verified when given
    surrogate: str = ""  # independently trained model for transfer attacks
    parity_tolerance: float = 1e-3  # max |logit difference| between the twin and ONNX Runtime
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = the CPUs this process may use (affinity, quota)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the model as exported; advshield wraps it so that it takes float32 NCHW pixels in [0, 1]
    # (plugin/model_io.py): model input = (pixels * scale - mean) / std, transposed for NHWC
    mean: tuple[float, ...] = ()  # per channel (or one value), in the model's input units; () = none
    std: tuple[float, ...] = ()  # per channel (or one value); () = none
    scale: float = 1.0  # 255.0 for a model that takes 0-255 pixels
    layout: Literal["auto", "nchw", "nhwc"] = "auto"  # auto: read from the graph's input
    output: Literal["auto", "logits", "probabilities", "log_probabilities"] = "auto"  # auto: detected
    classes: tuple[str, ...] = ()  # class names in output order
    classes_file: str = ""  # one class name per line (relative to the pipeline file)

    def __post_init__(self) -> None:
        check(bool(self.path) or self.served.enabled,
              "model: give path (an ONNX file) or served (a model Triton already serves: "
              "served = { endpoint = \"HOST:PORT\", name = \"...\" })")
        check(
            self.sha256 == "" or (len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256)),
            f"model.sha256: {self.sha256!r} is not a lowercase hex sha256 (64 characters)",
        )
        check(self.parity_tolerance > 0, f"model.parity_tolerance: must be > 0, got {self.parity_tolerance}")
        check(self.threads >= 0, f"model.threads: must be >= 0, got {self.threads}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            check(len(values) in (0, 1, 3), f"model.{key}: give one value or one per channel (1 or 3), got {len(values)}")
            check(all(math.isfinite(v) for v in values), f"model.{key}: values must be finite, got {list(values)}")
        check(all(v > 0 for v in self.std), f"model.std: every value must be > 0, got {list(self.std)}")
        check(math.isfinite(self.scale) and self.scale > 0, f"model.scale: must be > 0, got {self.scale}")
        check(not (self.classes and self.classes_file), "model: give classes or classes_file, not both")
        check(all(c for c in self.classes), "model.classes: class names must be non-empty strings")
        dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
        check(not dup, f"model.classes: duplicate class name{'s' if len(dup) > 1 else ''} {', '.join(map(repr, dup))}")

    @property
    def normalized(self) -> bool:
        """True when the model takes something else than [0, 1] pixels (scale, mean or std set)."""
        return self.scale != 1.0 or bool(self.mean) or bool(self.std)


@dataclass(frozen=True)
class InputSpec:
    channels: int = 0  # 0 (default): read from the model when the pipeline is loaded
    height: int = 0
    width: int = 0
    resize: Literal["exact", "resize", "crop"] = "exact"  # exact: wrong size is an error; resize: bilinear
    # to HxW; crop: shorter side to round(max(H, W) / crop_fraction), then the centre HxW (bilinear)
    crop_fraction: float = 0.875  # the share of the resized image the centre crop keeps (ImageNet: 0.875)
    color: Literal["convert", "strict"] = "convert"  # strict: grey model rejects colour images
    max_bytes: int = 4 << 20  # encoded size limit
    max_pixels: int = 4096 * 4096  # decoded size limit (decompression bombs)
    max_request_pixels: int = 2 * 4096 * 4096  # all of one request's images together, checked before any is decoded
    # why channels/height/width are still 0 (set when the pipeline is loaded without its model file)
    _unresolved: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check(self.channels in (0, 1, 3), f"input.channels: must be 1 or 3, got {self.channels} (0 or absent: read from the model)")
        check(self.height >= 0 and self.width >= 0, f"input: height and width must be >= 1, got {self.height}x{self.width}")
        check(self.max_bytes >= 64, f"input.max_bytes: must be >= 64, got {self.max_bytes}")
        check(0.0 < self.crop_fraction <= 1.0, f"input.crop_fraction: must be within (0, 1], got {self.crop_fraction}")
        check(self.max_pixels >= self.height * self.width, f"input.max_pixels: must be >= height*width = {self.height * self.width}, got {self.max_pixels}")
        check(self.max_request_pixels >= self.max_pixels, f"input.max_request_pixels: must be >= input.max_pixels = {self.max_pixels}, got {self.max_request_pixels}")

    @property
    def resolved(self) -> bool:
        """True once channels, height and width are known (given, or read from the model)."""
        return self.channels > 0 and self.height > 0 and self.width > 0

    @property
    def shape(self) -> tuple[int, int, int]:
        if not self.resolved:
            raise ConfigError(self._unresolved or "input: channels, height and width are not known: they are read "
                              "from the model when the pipeline file is loaded (or give them in [input])")
        return (self.channels, self.height, self.width)


DATA_SETS = ("folder", "manifest", "fashion-mnist", "mnist-5k", "idx")
SPLIT_FOLDERS = ("train", "test", "val")  # a folder data set holding train/ and test/ (or val/) is split already


@dataclass(frozen=True)
class DataSpec:
    """``[data]``: the labelled images ``fit`` learns from and ``audit``/``certify`` evaluate.

    ``folder``: one sub-folder per class (torchvision's ImageFolder convention), or ``train/`` and
    ``test/`` (or ``val/``) sub-folders each holding them; ``manifest``: a CSV (header path,label)
    or JSONL file of {"path", "label"} (paths relative to the manifest). Without train/test
    sub-folders (or a manifest ``split`` column) a seeded split stratified per class gives
    ``fit_fraction`` of each class to ``fit`` and the rest to the evaluation. Paths are relative
    to the pipeline file. ``dataset = ""`` (the default): no data set.
    """

    dataset: str = ""  # "" (none) | folder | manifest | fashion-mnist | mnist-5k | idx
    directory: str = ""  # folder / IDX root (fashion-mnist default: the Debian package's folder)
    manifest: str = ""  # CSV or JSONL file (dataset = "manifest")
    classes: tuple[str, ...] = ()  # class names in label order (default: the data's own)
    classes_file: str = ""  # one class name per line
    split_seed: int = 0
    fit_fraction: float = 0.5  # share of each class that `fit` learns from when the data is not split already
    unreadable: Literal["error", "skip"] = "error"  # skip: unreadable images are skipped, counted and reported

    def __post_init__(self) -> None:
        check(self.dataset == "" or self.dataset in DATA_SETS,
              f"data.dataset: unknown data set {self.dataset!r}; expected one of "
              f"{', '.join(map(repr, DATA_SETS))} (or leave it out: no data set)")
        if self.dataset == "":
            check(not (self.directory or self.manifest),
                  "data: directory/manifest given without data.dataset (set dataset = \"folder\", "
                  "\"manifest\", \"idx\" or \"fashion-mnist\")")
        check(self.dataset != "folder" or bool(self.directory),
              "data.directory: dataset \"folder\" needs the folder of images (one sub-folder per class)")
        check(self.dataset != "idx" or bool(self.directory), "data.directory: dataset \"idx\" needs the folder of the IDX files")
        check(self.dataset != "manifest" or bool(self.manifest),
              "data.manifest: dataset \"manifest\" needs the CSV or JSONL file of path, label")
        check(not self.manifest or self.dataset == "manifest",
              f"data.manifest: only with dataset = \"manifest\" (dataset is {self.dataset!r})")
        check(not (self.classes and self.classes_file), "data: give classes or classes_file, not both")
        check(all(isinstance(c, str) and c for c in self.classes), "data.classes: class names must be non-empty strings")
        dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
        check(not dup, f"data.classes: duplicate class name{'s' if len(dup) > 1 else ''} {', '.join(map(repr, dup))}")
        check(self.split_seed >= 0, f"data.split_seed: must be >= 0, got {self.split_seed}")
        check(0.0 < self.fit_fraction < 1.0, f"data.fit_fraction: must be within (0, 1), got {self.fit_fraction}")

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names known without reading files: ``classes``, or a named data set's."""
        if self.classes:
            return self.classes
        return dataset_classes(self.dataset) if self.dataset in ("fashion-mnist", "mnist-5k", "idx") else ()

    def class_names_at(self, root: Path) -> tuple[str, ...]:
        """The data's class names in label order, relative paths resolved against ``root`` (the
        pipeline file's folder): ``classes``; ``classes_file`` (one per line); a folder data set's
        sorted class folders (one listdir; () while the folder is absent, e.g. on a server); a
        named data set's names; () without a data set or for a manifest without a class list."""
        if self.classes:
            return self.classes
        if self.classes_file:
            return read_class_file(_under(root, self.classes_file), "data.classes_file")
        if self.dataset == "folder":
            return folder_classes(_under(root, self.directory))
        return self.class_names

    def standalone(self, root: Path) -> DataSpec:
        """No data set, only the class names: a copy of the pipeline that serves without the data."""
        return DataSpec(classes=self.class_names_at(root))


def _under(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root / p).resolve()


def read_class_file(path: Path, where: str) -> tuple[str, ...]:
    """One class name per line (surrounding blanks stripped, empty lines ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read {path} ({e})") from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise ConfigError(f"{where}: {path} names no classes (one class name per line)")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ConfigError(f"{where}: {path} repeats class name{'s' if len(dup) > 1 else ''} {', '.join(map(repr, dup))}")
    return names


def folder_classes(directory: Path) -> tuple[str, ...]:
    """Sorted class-folder names of an ImageFolder tree (of its train/ and test/ or val/ sub-folders
    when it has them); hidden folders are ignored; () when the folder is absent."""
    if not directory.is_dir():
        return ()
    subs = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    split = [s for s in subs if s in SPLIT_FOLDERS]
    if "train" in split and len(split) > 1:
        return tuple(sorted({c.name for s in split for c in (directory / s).iterdir()
                             if c.is_dir() and not c.name.startswith(".")}))
    return tuple(subs)


@dataclass(frozen=True)
class ArtifactSpec:
    path: str
    sha256: str = ""

    def __post_init__(self) -> None:
        check(bool(self.path), "artifact path must not be empty")


@dataclass(frozen=True)
class DefenseEntry:
    type: str
    config: Any  # the registered frozen config dataclass


@dataclass(frozen=True)
class GateSpec:
    """Release gate thresholds; a threshold left at its default is not checked."""
    min_clean_accuracy: float = 0.0
    min_robust_accuracy: float = 0.0  # at every eps of the audit's grid up to gate_eps
    gate_eps: float = 0.0
    max_success_rate: float = 1.0  # P_suc of the strongest attack
    min_median_distortion: float = 0.0  # median minimal L2 distortion (empirical upper bound)
    min_certified_budget: float = 0.0  # certified L2 radius meeting the certified-accuracy target
    certified_accuracy_target: float = 0.5
    max_warnings: int = -1  # -1: warnings do not fail the gate

    def __post_init__(self) -> None:
        for name in ("min_clean_accuracy", "min_robust_accuracy", "max_success_rate", "certified_accuracy_target"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"gate.{name}: must be within [0, 1], got {v}")
        for name in ("gate_eps", "min_median_distortion", "min_certified_budget"):
            check(getattr(self, name) >= 0, f"gate.{name}: must be >= 0, got {getattr(self, name)}")
        check(self.max_warnings >= -1, f"gate.max_warnings: must be >= -1, got {self.max_warnings}")


@dataclass(frozen=True)
class PipelineConfig:
    root: Path  # folder of the pipeline file: relative paths resolve against it
    source: Path | None
    pipeline: PipelineInfo
    model: ModelSpec
    input: InputSpec
    data: DataSpec
    defenses: tuple[DefenseEntry, ...] = ()
    detector: DefenseEntry | None = None
    artifacts: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    gate: GateSpec = field(default_factory=GateSpec)
    extra: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # sections of later stages
    # read from the model file when the pipeline is loaded (None while the file is missing)
    graph: GraphInfo | None = field(default=None, compare=False)
    # a served model's tensors as its server (or its config.pbtxt) declares them, checked against
    # [model] and [input] (``plugin/served.py``: ``ServedModel``); None until read
    served: Any = field(default=None, compare=False)
    model_class_names: tuple[str, ...] = ()  # [model] classes, or the lines of classes_file

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()

    @property
    def has_onnx(self) -> bool:
        """True when [model] names an ONNX file (the model itself, or a served model's twin)."""
        return bool(self.model.path)

    @property
    def served_model(self) -> bool:
        """True when the classifier is a model Triton already serves ([model] served)."""
        return self.model.served.enabled

    @property
    def model_path(self) -> Path:
        if not self.model.path:
            raise ModelError(f"model: pipeline {self.pipeline.name!r} classifies with the served model "
                             f"{self.model.served.name!r} and names no ONNX file ([model] path: its ONNX twin)")
        return self.resolve(self.model.path)

    @property
    def surrogate_path(self) -> Path | None:
        return self.resolve(self.model.surrogate) if self.model.surrogate else None

    @property
    def num_classes(self) -> int | None:
        """The model's number of classes K as its graph declares it (None: not known without running it)."""
        if self.served is not None:
            return int(self.served.num_classes)
        return self.graph.num_classes if self.graph is not None else None

    @property
    def class_names(self) -> tuple[str, ...]:
        """The K class names in the model's output order: [model] classes (or classes_file), else the
        data set's class names, else "0" .. "K-1". A list whose length is not the model's K is a
        ``ConfigError`` naming both."""
        k = self.num_classes
        if not k and self.has_onnx and self.model_path.is_file():
            try:  # a class dimension the graph leaves open: the wrapped model ran a probe batch
                k = self.wrapped_model().num_classes
            except ModelError:
                k = None
        names, where = self.model_class_names, "model.classes"
        if not names:
            names, where = self.data.class_names_at(self.root), "data (its class names)"
        if names:
            if k and len(names) != k:
                what = self.model_path.name if self.served is None else f"the served model {self.served.name!r}"
                raise ConfigError(f"{where}: the pipeline names {len(names)} classes but {what} outputs {k}")
            return tuple(names)
        if not k and not self.has_onnx:
            raise ConfigError(f"model: the class names are read from the served model {self.model.served.name!r}, "
                              f"which advshield has not asked yet (give classes in [model], or let serve/audit/"
                              f"deploy read its config)")
        if not k:
            raise ConfigError(f"model: the class names are read from the model, and the model file {self.model_path} "
                              f"is missing (create it, or give classes in [model])")
        return tuple(str(i) for i in range(k))

    def wrapped_model(self) -> WrappedModel:
        """The model wrapped as [model] describes it: float32 NCHW pixels in [0, 1] -> logits
        (``plugin/model_io.py``; remembered per file and spec)."""
        if not self.model_path.is_file():
            raise ModelError(f"ONNX model not found: {self.model_path}")
        return load_model(self.model_path, self.model, input_shape=self.input.shape)

    @property
    def random(self) -> bool:
        """True when any defense step is random (the audit then applies EOT)."""
        return any(getattr(d.config, "random", False) for d in self.defenses)

    def artifact_path(self, name: str) -> Path:
        if name not in self.artifacts:
            raise ConfigError(f"artifacts: no artifact named {name!r}; known: {', '.join(sorted(self.artifacts)) or 'none'}")
        return self.resolve(self.artifacts[name].path)

    def files(self) -> dict[str, tuple[Path, str]]:
        """Every file the pipeline depends on: name -> (path, declared sha256 or '')."""
        out = {"model": (self.model_path, self.model.sha256)} if self.has_onnx else {}
        if self.surrogate_path is not None:
            out["surrogate"] = (self.surrogate_path, "")
        for name, a in self.artifacts.items():
            out[f"artifacts.{name}"] = (self.resolve(a.path), a.sha256)
        return out

    def checksums(self, verify: bool = True) -> dict[str, str]:
        """sha256 of every file; with ``verify``, a declared sha256 that differs is an error."""
        out = {}
        for name, (path, declared) in self.files().items():
            if not path.is_file():
                hint = " (run `advshield fit` on the pipeline file to create it)" if name.startswith("artifacts.") else ""
                raise ArtifactError(f"{name}: file not found: {path}{hint}")
            digest = sha256_file(path)
            if verify and declared and declared != digest:
                raise ArtifactError(f"{name}: sha256 mismatch for {path}: file has {digest}, pipeline declares {declared}")
            out[name] = digest
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pipeline": to_mapping(self.pipeline),
            "model": to_mapping(self.model),
            "input": to_mapping(self.input),
            "data": to_mapping(self.data),
        }
        if self.defenses:
            d["defenses"] = [{"type": e.type, **to_mapping(e.config)} for e in self.defenses]
        if self.detector is not None:
            d["detector"] = {"type": self.detector.type, **to_mapping(self.detector.config)}
        if self.artifacts:
            d["artifacts"] = {k: to_mapping(v) for k, v in self.artifacts.items()}
        d["gate"] = to_mapping(self.gate)
        d.update(to_mapping(self.extra))
        return d

    def dumps(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


_SECTIONS = {"pipeline", "model", "input", "data", "defenses", "detector", "artifacts", "gate"}
# Sections owned by later stages (validated by their own modules when used).
EXTRA_SECTIONS = {"audit", "certify", "serve", "deploy", "fit", "smoothing"}


def parse_pipeline(table: dict[str, Any], root: Path, source: Path | None = None) -> PipelineConfig:
    unknown = sorted(set(table) - _SECTIONS - EXTRA_SECTIONS)
    if unknown:
        raise ConfigError(
            f"unknown section{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_SECTIONS | EXTRA_SECTIONS))}"
        )
    if "model" not in table:
        raise ConfigError("missing required section [model] (with path = \"model.onnx\")")
    defenses_raw = table.get("defenses", [])
    if not isinstance(defenses_raw, list):
        raise ConfigError("defenses: expected an array of tables ([[defenses]])")
    defenses = tuple(
        DefenseEntry(*parse_defense(spec, f"defenses[{i}]")) for i, spec in enumerate(defenses_raw)
    )
    detector = DefenseEntry(*parse_detector(table["detector"])) if "detector" in table else None
    artifacts_raw = table.get("artifacts", {})
    if not isinstance(artifacts_raw, dict):
        raise ConfigError("artifacts: expected a table of {path, sha256} tables")
    artifacts = MappingProxyType(
        {k: from_mapping(ArtifactSpec, v, f"artifacts.{k}") for k, v in artifacts_raw.items()}
    )
    extra = MappingProxyType({k: table[k] for k in EXTRA_SECTIONS if k in table})
    if "smoothing" in table:  # validated now, built by the defended classifier

        from_mapping(SmoothingConfig, table["smoothing"], "smoothing")
    return resolve_model(PipelineConfig(
        root=root,
        source=source,
        pipeline=from_mapping(PipelineInfo, table.get("pipeline", {}), "pipeline"),
        model=from_mapping(ModelSpec, table["model"], "model"),
        input=from_mapping(InputSpec, table.get("input", {}), "input"),
        data=from_mapping(DataSpec, table.get("data", {}), "data"),
        defenses=defenses,
        detector=detector,
        artifacts=artifacts,
        gate=from_mapping(GateSpec, table.get("gate", {}), "gate"),
        extra=extra,
    ))


def resolve_model(cfg: PipelineConfig) -> PipelineConfig:
    """Fill in what the model decides: ``[input]`` channels/height/width left at 0 are read from
    the graph's input (the graph only, no weights), [model] classes/classes_file are read, and a
    given value the model contradicts is a ``ConfigError`` naming both sides. While the model file
    does not exist, the input stays unresolved (using its shape says the file is missing)."""
    m = cfg.model
    names = m.classes or (read_class_file(cfg.resolve(m.classes_file), "model.classes_file") if m.classes_file else ())
    if not cfg.has_onnx:  # a served model without an ONNX twin: its server says the rest (plugin/served.py)
        if not cfg.input.resolved:
            object.__setattr__(cfg.input, "_unresolved",
                               f"input: the input shape is read from the served model {m.served.name!r} when advshield "
                               f"asks its server (serve, predict, audit) or its config.pbtxt (deploy triton); or give "
                               f"channels, height and width in [input]")
        return replace(cfg, model_class_names=names)
    path = cfg.model_path
    if not path.is_file():
        if not cfg.input.resolved:
            object.__setattr__(cfg.input, "_unresolved",
                               f"input: the input shape is read from the model, and the model file {path} is missing "
                               f"(create it, or give channels, height and width in [input])")
        return replace(cfg, model_class_names=names)
    graph = read_graph(path, m.layout)
    inp = cfg.input
    c, h, w = resolve_shape(graph, (inp.channels, inp.height, inp.width))
    for key in ("mean", "std"):
        values = getattr(m, key)
        check(len(values) in (0, 1, c), f"model.{key}: give one value or one per channel ({c} for {path.name}), "
                                        f"got {len(values)}")
    cfg = replace(cfg, input=replace(inp, channels=c, height=h, width=w), graph=graph, model_class_names=names)
    if cfg.num_classes:
        _ = cfg.class_names  # a class list of the wrong length is an error now, not at the first prediction
    return cfg


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"pipeline file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ConfigError(f"{path}: cannot read pipeline file ({e})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    try:
        return parse_pipeline(table, path.resolve().parent, path.resolve())
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def loads_pipeline(text: str, root: str | Path = ".") -> PipelineConfig:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}") from None
    return parse_pipeline(table, Path(root).resolve())
