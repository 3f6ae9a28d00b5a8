"""Structured logs of the server: one JSON object per line on the ``advshield.serve`` logger."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("advshield.serve")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus the record's ``fields`` dict."""

    def format(self, record: logging.LogRecord) -> str:
        rec: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rec.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            rec["exc"] = self.formatException(record.exc_info)
        return json.dumps(rec, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    """Send the server's log to stderr as JSON lines (and only there: no propagation)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def log_event(level: int, msg: str, **fields: Any) -> None:
    """One log line carrying ``fields`` as JSON keys."""
    if log.isEnabledFor(level):
        log.log(level, msg, extra={"fields": fields})
