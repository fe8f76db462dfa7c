"""Derived views of a Results set: Rich table, Markdown, CSV and JSON, all from the same rows."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantarena.results import CellResult, Results, write_atomic

MB = 1e6
LATENCY_LABELS = {"ms_per_token": "ms/token", "latency_ms_median": "ms/example (batch 1)"}
# Metrics in [0, 1]: their differences read best in percentage points.
PROPORTIONS = {"accuracy", "precision", "recall", "f1", "f1_macro"}

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
]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _peak_bytes(cell: CellResult) -> int | None:
    m = cell.measurements
    return m.get("peak_cuda_allocated_bytes", m.get("peak_rss_bytes"))


def quality_delta(cell: CellResult, base: CellResult) -> str:
    metric = cell.quality_metric
    value, ref = cell.metrics[metric], base.metrics[metric]
    if metric in PROPORTIONS:
        return f"{(value - ref) * 100:+.2f} pt"
    return f"{value - ref:+.3f} ({(value / ref - 1) * 100:+.1f}%)"


def comparison_row(results: Results, cell: CellResult) -> dict[str, str]:
    row = {"Method": cell.method}
    if cell.status != "ok":
        return row | {"Status": f"{cell.status}: {cell.reason}"}
    base = results.baseline_of(cell)
    metric, latency = cell.quality_metric, cell.latency_metric
    wbytes, lat = cell.measurements["weight_bytes"], cell.metrics[latency]
    row[metric.replace("_", " ").title()] = _fmt(cell.metrics[metric], 4)
    if "f1" in cell.metrics:
        row["F1"] = _fmt(cell.metrics["f1"], 4)
    row[f"Δ vs {results.baseline}"] = quality_delta(cell, base) if base else ""
    row["Weight MB"] = _fmt(wbytes / MB, 1)
    if base:
        ratio = base.measurements["weight_bytes"] / wbytes
        row["Memory saved"] = f"{(1 - 1 / ratio) * 100:.1f}% ({ratio:.2f}×)"
    row["Disk MB"] = _fmt(cell.measurements["disk_bytes"] / MB, 1)
    row[LATENCY_LABELS.get(latency, latency)] = _fmt(lat, 3)
    if base:
        row["Latency ratio"] = f"{lat / base.metrics[latency]:.2f}×"
    row["Peak MB"] = _fmt(_peak_bytes(cell) / MB, 0)
    row["Quantize s"] = _fmt(cell.measurements["quantize_s"], 2)
    return row | {"Status": "ok"}


def grouped(results: Results) -> dict[tuple[str, str], list[CellResult]]:
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for cell in results.cells:
        groups.setdefault((cell.model, cell.task), []).append(cell)
    return groups


def _table_rows(results: Results, cells: list[CellResult]) -> tuple[list[str], list[dict[str, str]]]:
    rows = [comparison_row(results, c) for c in cells]
    columns = [*list(dict.fromkeys(k for r in rows for k in r if k != "Status")), "Status"]
    return columns, rows


def rich_tables(results: Results) -> list[Table]:
    tables = []
    for (model, task), cells in grouped(results).items():
        columns, rows = _table_rows(results, cells)
        table = Table(title=f"{model} · {task} · {cells[0].device}", title_justify="left")
        for col in columns:
            text = col in ("Method", "Status")
            table.add_column(col, justify="left" if text else "right", no_wrap=not text or col == "Method")
        for row in rows:
            table.add_row(*(row.get(c, "") for c in columns))
        tables.append(table)
    return tables


def print_tables(results: Results, console: Console | None = None) -> None:
    console = console or Console()
    for table in rich_tables(results):
        console.print(table)


def markdown(results: Results) -> str:
    hw = results.environment.get("hardware", {})
    pk = results.environment.get("packages", {})
    lines = [
        "# quantarena results",
        "",
        f"Hardware: {hw.get('gpu') or hw.get('cpu')} ({hw.get('cpu_count')} CPU threads). "
        f"torch {pk.get('torch')}, transformers {pk.get('transformers')}. Baseline: `{results.baseline}`.",
    ]
    for (model, task), cells in grouped(results).items():
        columns, rows = _table_rows(results, cells)
        lines += ["", f"## {model} · {task} · {cells[0].device}", ""]
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" if c in ("Method", "Status") else "---:" for c in columns) + "|")
        lines += ["| " + " | ".join(r.get(c, "").replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_row(cell: CellResult) -> dict[str, object]:
    m, meas = cell.metrics, cell.measurements

    def mb(key: str) -> float | None:
        return None if meas.get(key) is None else meas[key] / MB

    peak = _peak_bytes(cell)
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
    }


def csv_text(results: Results) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cell in results.cells:
        writer.writerow({k: "" if v is None else v for k, v in csv_row(cell).items()})
    return out.getvalue()


def write_all(results: Results, output_dir: Path) -> None:
    """results.json is the record; the CSV and Markdown are views regenerated from it."""
    write_atomic(output_dir / "results.json", json.dumps(results.to_json(), indent=1))
    write_atomic(output_dir / "results.csv", csv_text(results))
    write_atomic(output_dir / "results.md", markdown(results))
