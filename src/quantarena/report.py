"""Derived views of results: Rich tables, Markdown, CSV, JSON, PNG charts and one HTML file, all from the same rows.

analysis.py computes each cell's statistics and roofline once; report_sections.py turns them into the document
and charts; this module writes the views.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table as RichTable

from quantarena.analysis import CellAnalysis, Report, Run, load_runs
from quantarena.document import Image
from quantarena.document import markdown as render_markdown
from quantarena.html_report import html
from quantarena.recommend import LATENCY_LABELS, Constraints, use_cases
from quantarena.report_sections import MB, comparison_row, document, draw_charts, peak_bytes, quality_delta, table_rows
from quantarena.results import CellResult, Results, write_atomic
from quantarena.stats import PROPORTIONS, change_unit

# Names other modules and tests import from here.
__all__ = [
    "CSV_COLUMNS",
    "LATENCY_LABELS",
    "PROPORTIONS",
    "Report",
    "Run",
    "comparison_row",
    "load_runs",
    "markdown",
    "print_tables",
    "quality_delta",
    "write_all",
    "write_report",
]

CSV_COLUMNS = [
    "Model",
    "Quantization",
    "Accuracy",
    "Precision",
    "Recall",
    "F1",
    "Inference Time (s)",
    "Inference Speed (examples/s)",
    "Inference Time per Example (s)",
    "Task",
    "Perplexity",
    "Tokens Scored",
    "Latency (ms)",
    "Latency Metric",
    "Weight Memory (MB)",
    "Disk Size (MB)",
    "Peak Memory (MB)",
    "Load Time (s)",
    "Quantization Time (s)",
    "Device",
    "Status",
    "Reason",
    "Run",
    "Quality Metric",
    "Quality CI Low",
    "Quality CI High",
    "Quality Stderr",
    "Change vs Baseline",
    "Change Unit",
    "Change CI Low",
    "Change CI High",
    "p-value",
    "Test",
    "Significant",
    "Memory Floor (ms)",
    "Roofline Efficiency",
]


# ---- terminal ---------------------------------------------------------------------------------


def rich_tables(results: Results | Report) -> list[RichTable]:
    report = results if isinstance(results, Report) else Report.of(results)
    tables = []
    for group in report.groups:
        columns, rows = table_rows(report, group)
        table = RichTable(title=group.title, title_justify="left")
        for col in columns:
            text = col in ("Method", "Status", "Significance")
            table.add_column(col, justify="left" if text else "right", no_wrap=col != "Status")
        for row in rows:
            table.add_row(*(row.get(c, "") for c in columns))
        tables.append(table)
    return tables


def print_tables(results: Results | Report, console: Console | None = None) -> None:
    console = console or Console()
    for table in rich_tables(results):
        console.print(table)


def print_recommendations(report: Report, console: Console) -> None:
    for group in report.groups:
        rec = report.recommendation(group)
        console.print(f"[bold]{group.title}[/]: {rec.summary()}", highlight=False)
        for c in rec.candidates:
            if c.method != rec.choice:
                console.print(f"  {c.method}: {c.verdict}", highlight=False)


# ---- the document: Markdown and HTML ---------------------------------------------------------------


def markdown(results: Results | Report, images: list[Image] | None = None) -> str:
    report = results if isinstance(results, Report) else Report.of(results)
    return render_markdown(document(report, images))


# ---- CSV and JSON ------------------------------------------------------------------------------------


def csv_row(cell: CellResult, analysis: CellAnalysis | None = None, run: str = "") -> dict[str, object]:
    m, meas = cell.metrics, cell.measurements

    def mb(key: str) -> float | None:
        return None if meas.get(key) is None else meas[key] / MB

    peak = peak_bytes(cell)
    analysis = analysis or CellAnalysis({}, {}, None)
    est = analysis.estimates.get(cell.quality_metric or "")
    tested = analysis.comparisons.get(cell.quality_metric or "")
    line = analysis.roofline
    return {
        "Model": cell.model,
        "Quantization": cell.method,
        "Accuracy": m.get("accuracy"),
        "Precision": m.get("precision"),
        "Recall": m.get("recall"),
        "F1": m.get("f1"),
        "Inference Time (s)": m.get("inference_s"),
        "Inference Speed (examples/s)": m.get("examples_per_s"),
        "Inference Time per Example (s)": m.get("s_per_example"),
        "Task": cell.task,
        "Perplexity": m.get("perplexity"),
        "Tokens Scored": m.get("n_tokens"),
        "Latency (ms)": m.get(cell.latency_metric) if cell.latency_metric else None,
        "Latency Metric": cell.latency_metric,
        "Weight Memory (MB)": mb("weight_bytes"),
        "Disk Size (MB)": mb("disk_bytes"),
        "Peak Memory (MB)": None if peak is None else peak / MB,
        "Load Time (s)": meas.get("load_s"),
        "Quantization Time (s)": meas.get("quantize_s"),
        "Device": cell.device,
        "Status": cell.status,
        "Reason": cell.reason,
        "Run": run,
        "Quality Metric": cell.quality_metric,
        "Quality CI Low": est and est.ci_low,
        "Quality CI High": est and est.ci_high,
        "Quality Stderr": est and est.stderr,
        "Change vs Baseline": tested and tested.change,
        "Change Unit": tested and change_unit(tested.metric),
        "Change CI Low": tested and tested.ci_low,
        "Change CI High": tested and tested.ci_high,
        "p-value": tested and tested.p_value,
        "Test": tested and tested.test,
        "Significant": tested and tested.significant,
        "Memory Floor (ms)": line and line.floor_ms,
        "Roofline Efficiency": line and line.efficiency,
    }


def csv_text(results: Results | Report) -> str:
    report = results if isinstance(results, Report) else Report.of(results)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for group in report.groups:
        for cell in group.cells:
            row = csv_row(cell, report.analysis(group, cell), group.run.label)
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
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
                "use_cases": use_cases(group.results, group.cells, report.limits),
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


# ---- files -------------------------------------------------------------------------------------------


def write_all(results: Results, output_dir: Path) -> None:
    """results.json is the record; the CSV and Markdown are views regenerated from it (cheap: no charts)."""
    report = Report.of(results)
    write_atomic(output_dir / "results.json", json.dumps(results.to_json(), indent=1))
    write_atomic(output_dir / "results.csv", csv_text(report))
    write_atomic(output_dir / "results.md", markdown(report))


def write_report(runs: list[Run], output_dir: Path, limits: Constraints | None = None) -> Report:
    """Every view of the runs into output_dir: results.md, results.csv, report.json, charts/*.png, report.html."""
    output_dir.mkdir(parents=True, exist_ok=True)
    report = Report(runs, limits)
    images = [Image(img.path.relative_to(output_dir), img.alt) for img in draw_charts(report, output_dir / "charts")]
    blocks = document(report, images)
    write_atomic(output_dir / "results.md", render_markdown(blocks))
    write_atomic(output_dir / "results.csv", csv_text(report))
    write_atomic(output_dir / "report.json", json.dumps(report_json(report), indent=1))
    write_atomic(output_dir / "report.html", html(blocks, output_dir, "quantarena report"))
    return report
