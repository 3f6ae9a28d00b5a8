"""The report dict and its files: ``report.json``, ``report.md`` and one self-contained
``report.html``, plus the PNG plots.

``build_report`` assembles the dict (JSON-ready: see ``jsonable``) that ``report.schema.json``
describes. Both documents are rendered from that same dict, read back from its JSON, by Jinja2
templates (``templates/report.md.j2`` and ``templates/report.html.j2``) over one shared context:
the templates hold the wording and layout, ``_context`` picks the rows, the filters below format
every number, so the two documents cannot disagree. The HTML embeds its plots as base64 PNG data
URIs and its CSS inline: it needs no other file and loads no external resource.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import numpy as np
import torch

from advshield.attacks.report.aggregates import NORM_LABEL, NORMS
from advshield.attacks.report.plots import plot_budget, plot_operating_characteristic, plot_robust_accuracy
from advshield.attacks.report.validate import REPORT_FORMAT
from advshield.core.validation import to_mapping
from advshield.core.version import __version__

TEMPLATES = Path(__file__).resolve().parent / "templates"
PLOTS = {  # plot key -> file under plots/
    "oc": "operating_characteristic.png",
    "robust_linf": "robust_accuracy_linf.png",
    "robust_l2": "robust_accuracy_l2.png",
    "budget": "distortion_budget.png",
}


def jsonable(obj: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, +-inf the strings "inf" / "-inf" (a distortion
    of inf means "not broken"); numpy scalars become Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, Path):
        return str(obj)
    return obj


def build_report(*, pipeline: Mapping[str, Any], spec: Any, probes: Mapping[str, Any], metrics: Mapping[str, Any],
                 warnings: Sequence[Mapping[str, Any]], gate: Mapping[str, Any], budget: Mapping[str, Any] | None,
                 command: str = "", seconds: float | None = None) -> dict[str, Any]:
    """The report dict: provenance, pipeline, audit settings, probes, metrics, budget, warnings, gate."""
    gp = probes.get("gradients") or {}
    return jsonable({
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "advshield": __version__,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "command": command,
        "wall_seconds": seconds,
        "pipeline": dict(pipeline),
        "audit": {k: v for k, v in to_mapping(spec).items() if k != "attacks"} | {"attacks": [e.describe() for e in spec.entries]},
        "mode": probes.get("mode", {}),
        "probes": {
            "randomness": probes.get("randomness"),
            "gradients": {k: (float(np.median(v)) if isinstance(v, list) and v else v) for k, v in gp.items()} if gp else None,
            "attacks": _attack_probe_summary(probes.get("attacks")),
            "bpda": probes.get("bpda"),
            "client": probes.get("client"),  # requests through a live endpoint (--target)
        },
        "metrics": metrics,
        "distortion_budget": budget,
        "warnings": list(warnings),
        "gate": gate,
    })


def _attack_probe_summary(p: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The attack probe without its per-sample lists (probes.json keeps them)."""
    if not p:
        return None
    return {"samples": len(p["samples"]), "norm": p["norm"], "eps": p["eps"], "eps_from": p["eps_from"],
            "skipped": dict(p.get("skipped", {})),
            "runs": {k: {f: r[f] for f in ("attack", "name", "source", "hyper", "success_rate", "gradients_per_image")}
                     for k, r in p["runs"].items()}}


# --- number formatting (the templates' filters) ----------------------------------------------------

def _num(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals; "-" for a missing one, "inf" for an unbroken distortion."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _g(v: Any) -> str:
    return f"{v:g}"


def eps_label(eps: float, norm: str = "linf", levels: int = 256) -> str:
    """An eps as the threat check applies it: L-inf budgets on the 8-bit lattice read k/255 with
    their value; one between two grey levels says which level it really is after rounding."""
    if norm != "linf" or not levels:
        return f"{eps:g}"
    k = eps * (levels - 1)
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/{levels - 1} ({eps:.4g})"
    return f"{eps:g} (= {math.floor(k + 1e-9)}/{levels - 1} after rounding)"


def _dash(v: Any) -> str:
    """A value as recorded (the gate's thresholds and measurements), "-" when there is none."""
    return "-" if v is None else str(v)


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters.update(num=_num, pct=_pct, g=_g, dash=_dash, eps=eps_label)


def _context(report: Mapping[str, Any], plots: Mapping[str, str]) -> dict[str, Any]:
    """What both templates render: the report's sections, with the table rows picked out."""
    m = report["metrics"]
    minimal = [(a, v) for a, v in m["attacks"].items() if v["kind"] == "minimal"]
    robust = []
    for norm in NORMS:
        t = m["robust_accuracy"][norm]
        rows = [(label, t[label]) for label in ("all attacks", "white-box")]
        rows += [(f"{a} alone", v["robust_accuracy"] if norm == "l2" else v["robust_accuracy_linf"]) for a, v in minimal]
        robust.append({"norm": norm, "label": NORM_LABEL[norm], "eps": t["eps"], "rows": rows,
                       "success": t["success_rate"], "plot": plots.get(f"robust_{norm}")})
    minimal_rows = [{"name": a, "best": False, **v} for a, v in minimal]
    if "best_minimal" in m:
        minimal_rows.append({**m["best_minimal"], "name": "best of " + ", ".join(m["best_minimal"]["attacks"]),
                             "best": True, "source": "white-box", "cost": None})
    return {
        "report": report, "m": m, "p": report["pipeline"], "mode": report["mode"], "audit": report["audit"],
        "gate": report["gate"], "randomness": report["probes"].get("randomness") or {},
        "robust": robust, "minimal": minimal_rows,
        "budget_attacks": [(a, v) for a, v in m["attacks"].items() if v["kind"] == "budget"],
        "detector": m.get("detector"), "budget": report.get("distortion_budget"), "plots": plots,
        "client": report["probes"].get("client"),
    }


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """``report.md``; ``plots`` maps a plot key (``PLOTS``) to its path relative to the file."""
    return _ENV.get_template("report.md.j2").render(_context(report, plots))


def render_html(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """``report.html``; ``plots`` maps a plot key to its ``src`` (``data_uri`` for a standalone file)."""
    return _ENV.get_template("report.html.j2").render(_context(report, plots))


def data_uri(png: Path) -> str:
    """A PNG file as a ``data:`` URI, to embed it in the HTML."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


class ReportFiles(NamedTuple):
    """What ``write_report`` wrote (a tuple, so ``json_path, md_path, *rest = write_report(...)``
    reads too); ``plots`` maps a plot key (``PLOTS``) to its PNG."""

    json: Path
    markdown: Path
    html: Path
    plots: Mapping[str, Path]


def write_plots(folder: Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Every plot the report has data for, as PNGs in ``folder``, by plot key."""
    folder.mkdir(parents=True, exist_ok=True)
    m = report["metrics"]
    plots: dict[str, Path] = {}
    oc = plot_operating_characteristic(m, folder / PLOTS["oc"], report["audit"]["d_upp"])
    if oc is not None:
        plots["oc"] = oc
    for norm in NORMS:
        plots[f"robust_{norm}"] = plot_robust_accuracy(m, norm, folder / PLOTS[f"robust_{norm}"])
    if report.get("distortion_budget"):
        plots["budget"] = plot_budget(report["distortion_budget"], folder / PLOTS["budget"])
    return plots


def write_report(out: Path, report: Mapping[str, Any]) -> ReportFiles:
    """report.json, plots/*.png, report.md (linking the plots) and report.html (embedding them) in
    ``out``. Both documents render the JSON as written, read back: exactly what report.json says."""
    out = Path(out)
    json_path = out / "report.json"
    out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    data = json.loads(json_path.read_text())
    plots = write_plots(out / "plots", data)
    md_path = out / "report.md"
    md_path.write_text(render_markdown(data, {k: p.relative_to(out).as_posix() for k, p in plots.items()}))
    html_path = out / "report.html"
    html_path.write_text(render_html(data, {k: data_uri(p) for k, p in plots.items()}))
    return ReportFiles(json_path, md_path, html_path, plots)
