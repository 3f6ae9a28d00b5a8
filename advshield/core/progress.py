"""Progress bars that stay bars in a terminal and become a few plain lines in a log file.

On a TTY ``progress(...)`` is an ordinary tqdm bar. When stderr is not a terminal (CI, ``make demo
> log``, a Kubernetes pod) the bar is redrawn at most once every ``LOG_INTERVAL_S`` seconds, each
redraw written as its own line without carriage returns, plus the final state on close: a stage
of any length costs a handful of lines in the log, not thousands of frames.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
LOG_INTERVAL_S = 30.0


class _LineWriter:
    """A file-like wrapper turning tqdm's carriage-return frames into whole lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable[T] | None = None, *, enabled: bool = True, file: IO[str] | None = None,
             **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (or with ``total=``), disabled when ``enabled`` is false.

    ``kwargs`` go to tqdm (desc, total, unit...). Not on a terminal: a rate-limited line log.
    """
    stream = file if file is not None else sys.stderr
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if is_terminal(stream):
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.setdefault("maxinterval", LOG_INTERVAL_S * 10)
    return tqdm(iterable, file=_LineWriter(stream), ascii=True, ncols=100, dynamic_ncols=False, **kwargs)


def write(message: str) -> None:
    """Print a line without breaking an active bar."""
    tqdm.write(message, file=sys.stderr)
