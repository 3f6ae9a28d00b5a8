"""Scoring image files through a live scoring server (the library behind ``advshield score``).

``collect_images`` expands the files and folders given; ``score_files`` sends them in requests of
``clf.batch_size`` encoded images and yields one ``ImageScore`` per file. A file that cannot be
read, or an image the server refuses (INVALID_ARGUMENT fails its whole request: the request is
then resent image by image to find it), becomes a record with ``error`` and the others are
still scored; any other server error propagates as ``RemoteError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from advshield.core.errors import AdvshieldError
from advshield.core.progress import progress
from advshield.plugin import protocol as P
from advshield.plugin.client import RemoteClassifier, RemoteError
from advshield.plugin.pipeline import Prediction

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageScore:
    """The server's answer for one image file, or why there is none (``error`` non-empty).

    ``label`` -1: rejected by the detector. ``detector_score`` / ``flagged``: 0 / False without
    a detector (as on the wire). ``seed``: the seed a random pipeline used for the request."""

    image: str
    label: int = -1
    probs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [K]; empty on error
    detector_score: float = 0.0
    flagged: bool = False
    seed: int | None = None
    error: str = ""


def collect_images(items: Sequence[str | Path]) -> list[Path]:
    """Files as given (any suffix), folders searched recursively for PNG/JPEG files."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise AdvshieldError(f"no PNG or JPEG files in folder {p}")
            out.extend(found)
        else:
            out.append(p)
    return out


def score_files(clf: RemoteClassifier, files: Sequence[Path], *, seed: int | None = None,
                show_progress: bool = True) -> Iterator[ImageScore]:
    """One ``ImageScore`` per file, request by request (request k uses ``seed + k``); within a
    request, the errors come first. A progress bar on stderr when there is more than one request."""
    step = clf.batch_size
    with progress(total=len(files), unit="img", enabled=show_progress and len(files) > step) as bar:
        for k, start in enumerate(range(0, len(files), step)):
            batch = files[start : start + step]
            names, datas = [], []
            for f in batch:
                try:
                    datas.append(f.read_bytes())
                    names.append(str(f))
                except OSError as e:
                    yield ImageScore(str(f), error=f"cannot read file: {e.strerror}")
            request_seed = None if seed is None else seed + k
            try:
                answered = [(names, clf.predict_bytes(datas, request_seed))] if datas else []
            except RemoteError as e:
                if e.code != "INVALID_ARGUMENT":
                    raise
                answered = []
                for name, data in zip(names, datas):
                    try:
                        answered.append(([name], clf.predict_bytes([data], request_seed)))
                    except RemoteError as e1:
                        if e1.code != "INVALID_ARGUMENT":
                            raise
                        yield ImageScore(name, error=e1.detail.removeprefix(f"{P.INPUT_IMAGE}[0]: "))
            for group, pred in answered:
                yield from _records(group, pred)
            bar.update(len(batch))


def _records(names: list[str], pred: Prediction) -> Iterator[ImageScore]:
    for i, name in enumerate(names):
        yield ImageScore(
            name, int(pred.labels[i]), pred.probs[i],
            0.0 if pred.score is None else float(pred.score[i]),
            False if pred.flagged is None else bool(pred.flagged[i]),
            pred.seed,
        )
