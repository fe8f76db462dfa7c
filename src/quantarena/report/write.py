"""The report's one writer: every file view of a report, from the statistics it computed once.

``write_report`` writes results.json (the records of a one-run report), results.csv, results.md, report.json,
charts/*.png and one self-contained report.html. analysis.py computes what is derived; sections.py turns it
into the document that both Markdown and HTML render; charts.py draws the figures.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from quantarena.report.analysis import CellAnalysis, Report
from quantarena.report.charts import draw_charts
from quantarena.report.document import Image
from quantarena.report.document import markdown as render_markdown
from quantarena.report.format import MB
from quantarena.report.html import html
from quantarena.report.sections import document, peak_bytes
from quantarena.report.stats import change_unit
from quantarena.results import CellResult, strict_json, write_atomic


def _mb(value: float | None) -> float | None:
    return None if value is None else value / MB


Getter = Callable[[CellResult, CellAnalysis, str], object]


def _metric(name: str) -> Getter:
    return lambda cell, analysis, run: cell.metrics.get(name)


def _measured_mb(get_bytes: Callable[[CellResult], float | None]) -> Getter:
    return lambda cell, analysis, run: _mb(get_bytes(cell))


def _of(part: Callable[[CellResult, CellAnalysis], object], attribute: str) -> Getter:
    return lambda cell, analysis, run: (found := part(cell, analysis)) and getattr(found, attribute)


def _estimate(cell: CellResult, analysis: CellAnalysis):
    return analysis.estimates.get(cell.quality_metric or "")


def _tested(cell: CellResult, analysis: CellAnalysis):
    return analysis.comparisons.get(cell.quality_metric or "")


def _roofline(cell: CellResult, analysis: CellAnalysis):
    return analysis.roofline


# The CSV, column by column: (header, value of a cell given its analysis and run label). The first columns
# are those of the notebooks quantarena replaces.
CSV_SPEC: list[tuple[str, Getter]] = [
    ("Model", lambda cell, analysis, run: cell.model),
    ("Quantization", lambda cell, analysis, run: cell.method),
    ("Accuracy", _metric("accuracy")),
    ("Precision", _metric("precision")),
    ("Recall", _metric("recall")),
    ("F1", _metric("f1")),
    ("Inference Time (s)", _metric("inference_s")),
    ("Inference Speed (examples/s)", _metric("examples_per_s")),
    ("Inference Time per Example (s)", _metric("s_per_example")),
    ("Task", lambda cell, analysis, run: cell.task),
    ("Perplexity", _metric("perplexity")),
    ("Tokens Scored", _metric("n_tokens")),
    ("Latency (ms)", lambda cell, analysis, run: cell.metrics.get(cell.latency_metric or "")),
    ("Latency Metric", lambda cell, analysis, run: cell.latency_metric),
    ("Weight Memory (MB)", _measured_mb(lambda cell: cell.measurements.get("weight_bytes"))),
    ("Disk Size (MB)", _measured_mb(lambda cell: cell.measurements.get("disk_bytes"))),
    ("Peak Memory (MB)", _measured_mb(lambda cell: peak_bytes(cell, "serve"))),
    ("Load Peak Memory (MB)", _measured_mb(lambda cell: peak_bytes(cell, "load"))),
    ("Load Time (s)", lambda cell, analysis, run: cell.measurements.get("load_s")),
    ("Quantization Time (s)", lambda cell, analysis, run: cell.measurements.get("quantize_s")),
    ("Variant Source", lambda cell, analysis, run: cell.variant_source),
    ("Device", lambda cell, analysis, run: cell.device),
    ("Status", lambda cell, analysis, run: cell.status),
    ("Reason", lambda cell, analysis, run: cell.reason),
    ("Run", lambda cell, analysis, run: run),
    ("Quality Metric", lambda cell, analysis, run: cell.quality_metric),
    ("Quality CI Low", _of(_estimate, "ci_low")),
    ("Quality CI High", _of(_estimate, "ci_high")),
    ("Quality Stderr", _of(_estimate, "stderr")),
    ("Change vs Baseline", _of(_tested, "change")),
    ("Change Unit", lambda cell, analysis, run: (t := _tested(cell, analysis)) and change_unit(t.metric)),
    ("Change CI Low", _of(_tested, "ci_low")),
    ("Change CI High", _of(_tested, "ci_high")),
    ("p-value", _of(_tested, "p_value")),
    ("Test", _of(_tested, "test")),
    ("Significant", _of(_tested, "significant")),
    ("Memory Floor (ms)", _of(_roofline, "floor_ms")),
    ("Roofline Efficiency", _of(_roofline, "efficiency")),
]
CSV_COLUMNS = [header for header, _ in CSV_SPEC]


def csv_text(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for group in report.groups:
        for cell in group.cells:
            analysis = report.analysis(group, cell)
            writer.writerow(["" if (v := get(cell, analysis, group.run.label)) is None else v for _, get in CSV_SPEC])
    return out.getvalue()


def report_json(report: Report) -> dict:
    """Everything derived, per cell, so a figure in the HTML can be traced to its numbers."""
    groups = []
    for group in report.groups:
        cells = []
        for cell in group.cells:
            analysis = report.analysis(group, cell)
            cells.append(
                {
                    "method": cell.method,
                    "status": cell.status,
                    "estimates": {k: asdict(v) for k, v in analysis.estimates.items()},
                    "comparisons": {
                        k: asdict(v) | {"significant": v.significant} for k, v in analysis.comparisons.items()
                    },
                    "roofline": analysis.roofline
                    and asdict(analysis.roofline) | {"efficiency": analysis.roofline.efficiency},
                }
            )
        rec = report.recommendation(group)
        groups.append(
            {
                "title": group.title,
                "run": group.run.label,
                "model": group.cells[0].model,
                "task": group.cells[0].task,
                "device": group.cells[0].device,
                "cells": cells,
                "use_cases": report.use_cases(group),
                "recommendation": asdict(rec),
            }
        )
    runs = [
        {
            "label": r.label,
            "baseline": r.results.baseline,
            "hardware": r.results.environment.get("hardware", {}),
            "memory_bandwidth_bytes_per_s": r.bandwidth_bytes_per_s,
            "memory_bandwidth_source": r.bandwidth_source,
        }
        for r in report.runs
    ]
    return {"runs": runs, "limits": asdict(report.limits), "groups": groups}


def write_report(report: Report, output_dir: Path) -> None:
    """Every view of the report into output_dir: results.json (one run), results.md, results.csv, report.json,
    charts/*.png and report.html."""
    output_dir.mkdir(parents=True, exist_ok=True)
    images = [Image(img.path.relative_to(output_dir), img.alt) for img in draw_charts(report, output_dir / "charts")]
    blocks = document(report, images)
    if len(report.runs) == 1:
        write_atomic(output_dir / "results.json", strict_json(report.runs[0].results.to_json()))
    write_atomic(output_dir / "results.md", render_markdown(blocks))
    write_atomic(output_dir / "results.csv", csv_text(report))
    write_atomic(output_dir / "report.json", strict_json(report_json(report)))
    write_atomic(output_dir / "report.html", html(blocks, output_dir, "quantarena report"))
