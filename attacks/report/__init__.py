"""The audit's report: its numbers from the records, its plots, and its files.

* ``aggregates``: ``compute_metrics`` (records -> the statistics), ``distortion_budget`` and
  ``empirical_budget`` (certified against empirical), ``quantiles``;
* ``plots``: the three matplotlib plots, each written as a PNG;
* ``render``: ``build_report`` (the report dict), ``render_markdown`` / ``render_html`` (Jinja2
  templates in ``templates/``) and ``write_report`` (report.json, report.md, report.html, plots);
* ``validate``: the report's JSON Schema (``schema/report.schema.json``) and ``validate_report``.
"""

from advshield.attacks.report.aggregates import (
    NORM_LABEL,
    NORMS,
    compute_metrics,
    distortion_budget,
    empirical_budget,
    quantiles,
)
from advshield.attacks.report.plots import plot_budget, plot_operating_characteristic, plot_robust_accuracy
from advshield.attacks.report.render import (
    PLOTS,
    ReportFiles,
    build_report,
    data_uri,
    jsonable,
    render_html,
    render_markdown,
    write_plots,
    write_report,
)
from advshield.attacks.report.validate import REPORT_FORMAT, ReportSchemaError, load_schema, validate_report

__all__ = [
    "NORMS",
    "NORM_LABEL",
    "PLOTS",
    "REPORT_FORMAT",
    "ReportFiles",
    "ReportSchemaError",
    "build_report",
    "compute_metrics",
    "data_uri",
    "distortion_budget",
    "empirical_budget",
    "jsonable",
    "load_schema",
    "plot_budget",
    "plot_operating_characteristic",
    "plot_robust_accuracy",
    "quantiles",
    "render_html",
    "render_markdown",
    "validate_report",
    "write_plots",
    "write_report",
]
