"""The report's JSON Schema (``schema/report.schema.json``, draft 2020-12) and its check.

The schema's ``$id`` is the report format, ``REPORT_FORMAT``, which every report carries in its
``"format"`` field: a change to the report's shape bumps both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from advshield.core.errors import AdvshieldError

REPORT_FORMAT = "advshield.audit-report/2"
SCHEMA = Path(__file__).resolve().parent / "schema" / "report.schema.json"


class ReportSchemaError(AdvshieldError, ValueError):
    """A report does not match ``report.schema.json`` (the message lists where and why)."""


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


def load_schema() -> dict[str, Any]:
    """The report's JSON Schema (a fresh copy)."""
    return json.loads(json.dumps(_schema()))


def validate_report(report: Mapping[str, Any], *, max_errors: int = 10) -> None:
    """Raise ``ReportSchemaError`` naming up to ``max_errors`` places where ``report`` (the dict as
    read back from report.json) violates the schema."""
    # jsonschema is an optional dependency (the `test` extra): only checking a report needs it
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"{'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors[:max_errors]]
        more = f" (and {len(errors) - max_errors} more)" if len(errors) > max_errors else ""
        raise ReportSchemaError(f"report does not match {REPORT_FORMAT}: " + "; ".join(lines) + more)
