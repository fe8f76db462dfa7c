"""The report's content, built once as document blocks (rendered to Markdown and HTML) and its charts."""

from __future__ import annotations

from quantarena.report.analysis import CellAnalysis, Group, Report, Run
from quantarena.report.document import Block, Bullets, Heading, Image, Paragraph, Table
from quantarena.report.format import (
    MB,
    describe,
    interval,
    latency_label,
    number,
    p_text,
    percent,
    quality_delta,
    title,
)
from quantarena.report.roofline import WHY_FEWER_BYTES_CAN_BE_SLOWER, explain, fewer_bytes_yet_slower
from quantarena.report.stats import CONFIDENCE, N_RESAMPLES, flipped_predictions
from quantarena.results import CellResult

FEW_UNITS = 30  # below this many examples/windows a percentile interval is rough


def peak_bytes(cell: CellResult, phase: str = "serve") -> int | None:
    """The peak memory of a phase ("serve": running the task; "load": loading and quantizing): the CUDA
    allocator's on a GPU, else the process's RSS."""
    m = cell.measurements
    return m.get(f"{phase}_peak_cuda_bytes", m.get(f"{phase}_peak_rss_bytes"))


def _significance(cell: CellResult, base: CellResult | None, analysis: CellAnalysis) -> str:
    if base is cell:
        return "baseline"
    tested = analysis.comparisons.get(cell.quality_metric)
    if tested is None:
        return ""
    if tested.significant:
        return f"{p_text(tested.p_value)} ({tested.test})"
    return f"not significant ({p_text(tested.p_value)})"


def comparison_row(report: Report, group: Group, cell: CellResult) -> dict[str, str]:
    row = {"Method": cell.method}
    if cell.status != "ok":
        return row | {"Status": f"{cell.status}: {cell.reason}"}
    analysis, base, results = report.analysis(group, cell), group.baseline, group.results
    metric, latency = cell.quality_metric, cell.latency_metric
    wbytes, lat = cell.measurements["weight_bytes"], cell.metrics[latency]
    row[title(metric)] = number(cell.metrics[metric], 4)
    row[f"{CONFIDENCE:.0%} CI"] = interval(analysis.estimates.get(metric), 4)
    if "f1" in cell.metrics:
        row["F1"] = number(cell.metrics["f1"], 4)
    if "kl_mean" in cell.metrics:
        row["KL mean"], row["KL p99"] = number(cell.metrics["kl_mean"], 5), number(cell.metrics["kl_p99"], 5)
    row[f"Δ vs {results.baseline}"] = quality_delta(cell, base) if base else ""
    row["Significance"] = _significance(cell, base, analysis)
    flipped = flipped_predictions(cell, base) if base is not None and base is not cell else None
    if flipped is not None:
        row["Flipped"] = str(flipped)
    row["Weight MB"] = number(wbytes / MB, 1)
    if base:
        ratio = base.measurements["weight_bytes"] / wbytes
        row["Memory saved"] = f"{(1 - 1 / ratio) * 100:.1f}% ({ratio:.2f}×)"
    row["Disk MB"] = number(cell.measurements["disk_bytes"] / MB, 1)
    row[latency_label(latency)] = number(lat, 3)
    if base:
        row["Latency ratio"] = f"{lat / base.metrics[latency]:.2f}×"
    for phase, column in (("serve", "Serve peak MB"), ("load", "Load peak MB")):
        peak = peak_bytes(cell, phase)
        row[column] = number(None if peak is None else peak / MB, 0)
    row["Quantize s"] = number(cell.measurements["quantize_s"], 2)
    if cell.variant_source:
        row["Variant"] = "from cache" if cell.variant_source == "cache" else "quantized"
    untrained = cell.measurements.get("untrained_head")
    return row | {"Status": "ok: its classification head was never trained" if untrained else "ok"}


def table_rows(report: Report, group: Group) -> tuple[list[str], list[dict[str, str]]]:
    rows = [comparison_row(report, group, c) for c in group.cells]
    columns = [*list(dict.fromkeys(k for r in rows for k in r if k != "Status")), "Status"]
    return columns, rows


def _run_line(run: Run) -> str:
    env, results = run.results.environment, run.results
    hw, pk = env.get("hardware", {}), env.get("packages", {})
    bandwidth = (
        f"Memory bandwidth {run.bandwidth_bytes_per_s / 1e9:.1f} GB/s ({run.bandwidth_source})"
        if run.bandwidth_bytes_per_s
        else "Memory bandwidth unknown (pass --bandwidth-gbs)"
    )
    head = f"**{run.label}**: " if run.label else ""
    machine = f"{hw.get('gpu') or hw.get('cpu')} ({hw.get('cpu_count')} CPU threads)" if hw else "unknown hardware"
    versions = "".join(f", {p} {v}" for p in ("torch", "transformers") if (v := pk.get(p)))
    return f"{head}{machine}{versions}. Baseline: `{results.baseline}`. {bandwidth}."


def _recommendation_blocks(report: Report) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Recommendation")]
    for group in report.groups:
        rec = report.recommendation(group)
        blocks.append(Paragraph(f"**{group.title}**: {rec.summary()}"))
        others = [f"`{c.method}`: {c.verdict}" for c in rec.candidates if c.method != rec.choice]
        if others:
            blocks.append(Bullets(others))
    return blocks


def _tradeoff_table(report: Report) -> Table:
    rows, keys = [], {}
    for group in report.groups:
        lines = report.use_cases(group)
        base = group.baseline
        for cell in group.cells:
            row = {"Model · task": group.short, "Method": cell.method, "Best use case": lines[cell.method]}
            if cell.status == "ok":
                analysis = report.analysis(group, cell)
                wbytes, lat = cell.measurements["weight_bytes"], cell.metrics[cell.latency_metric]
                value = cell.metrics[cell.quality_metric]
                row["Quality"] = f"{value:.4f} {cell.quality_metric}"
                keys[len(rows), "Quality"] = value
                if base:
                    sig = _significance(cell, base, analysis)
                    row["Quality Δ"] = quality_delta(cell, base) + (f", {sig}" if sig.startswith("not") else "")
                    smaller, faster = (
                        base.measurements["weight_bytes"] / wbytes,
                        base.metrics[cell.latency_metric] / lat,
                    )
                    row["Size"] = f"{smaller:.2f}× smaller" if smaller >= 1 else f"{1 / smaller:.2f}× larger"
                    row["Speed"] = f"{faster:.2f}× faster" if faster >= 1 else f"{1 / faster:.2f}× slower"
                    keys[len(rows), "Size"], keys[len(rows), "Speed"] = smaller, faster
            rows.append(row)
    columns = [*dict.fromkeys(k for r in rows for k in r if k != "Best use case"), "Best use case"]
    return Table(columns, rows, keys)


def _stats_blocks(report: Report, group: Group) -> list[Block]:
    rows, ns = [], set()
    for cell in group.cells:
        analysis = report.analysis(group, cell)
        for metric, est in analysis.estimates.items():
            ns.add((est.n, est.unit))
            tested = analysis.comparisons.get(metric)
            rows.append(
                {
                    "Method": cell.method,
                    "Metric": metric,
                    "Value": f"{est.value:.4f}",
                    f"{CONFIDENCE:.0%} CI (bootstrap)": interval(est, 4),
                    "SE (analytic)": "" if est.stderr is None else f"{est.stderr:.4f} (95%: ±{1.96 * est.stderr:.4f})",
                    f"Δ vs {group.results.baseline} [{CONFIDENCE:.0%} CI]": describe(tested) if tested else "",
                    "Test": tested.test if tested else "",
                }
            )
    if not rows:
        return [
            Heading(3, "Statistics"),
            Paragraph(
                "No per-example record in these results (written before quantarena stored one): confidence "
                "intervals and paired tests are absent. Rerun the sweep with this version to get them."
            ),
        ]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    blocks: list[Block] = [Heading(3, "Statistics"), Table(columns, rows)]
    for n, unit in sorted(ns):
        if n < FEW_UNITS:
            blocks.append(
                Paragraph(
                    f"Only {n} {unit}: bootstrap intervals and p-values over so few units are rough and optimistic "
                    f"(with {n} {unit} even an exact sign test cannot go below p = {2 / 2**n:.2g}); score more "
                    f"{unit} for firm conclusions."
                )
            )
    return blocks


def _roofline_blocks(report: Report, group: Group) -> list[Block]:
    blocks: list[Block] = [Heading(3, "Roofline")]
    if not group.run.bandwidth_bytes_per_s:
        return [
            *blocks,
            Paragraph("Memory bandwidth unknown for this run: give it with `--bandwidth-gbs` to see the floors."),
        ]
    base = group.baseline
    rows, keys = [], {}
    for cell in group.cells:
        line = report.analysis(group, cell).roofline
        if line is None:
            continue
        label = latency_label(line.latency_metric)
        keys[len(rows), "Efficiency"] = line.efficiency
        rows.append(
            {
                "Method": cell.method,
                f"Measured {label}": f"{line.measured_ms:.4g}",
                "Memory floor": f"{line.floor_ms:.4g}",
                "Efficiency": percent(line.efficiency),
                "Where the time goes": explain(cell, line, base),
            }
        )
    if not rows:
        return [
            *blocks,
            Paragraph(
                "These records lack the number of forward passes behind their latency figure (written before "
                "quantarena stored it, or a task that does not count them): no roofline."
            ),
        ]
    bw = group.run.bandwidth_bytes_per_s / 1e9
    intro = Paragraph(
        f"Floor = weight bytes / memory bandwidth ({bw:.1f} GB/s) for each full read of the weights behind the "
        "figure; efficiency = floor / measured (100% = as fast as reading the weights allows)."
    )
    blocks += [intro, Table(list(rows[0]), rows, keys)]
    lines = [(c, report.analysis(group, c).roofline) for c in group.cells]
    if any(line and fewer_bytes_yet_slower(c, line, base) for c, line in lines):
        blocks.append(Paragraph(WHY_FEWER_BYTES_CAN_BE_SLOWER))
    return blocks


def _method_notes() -> list[Block]:
    return [
        Heading(2, "How these numbers are computed"),
        Bullets(
            [
                f"Confidence intervals: percentile bootstrap, {N_RESAMPLES} resamples (seed 0) of the examples "
                "(classification) or of the scored windows (perplexity, whose NLL and token counts are summed per "
                "window). For accuracy the analytic standard error sqrt(p(1−p)/(n−1)) is shown beside it (lm-eval's "
                "stderr of a mean of 0/1 scores; its normal interval is ±1.96 SE).",
                "Paired tests against the baseline on the same examples: McNemar's exact test (two-sided binomial "
                "test on the examples exactly one of the two gets right) for accuracy; a paired bootstrap (same "
                "resampled indices for both) for F1 and perplexity, whose p-value is the smallest α at which the "
                "interval of the difference excludes zero. p ≥ 0.05 reads “not significant”.",
                "Δ units: percentage points for accuracy-type metrics, relative % for perplexity; `--max-drop` uses "
                "the same units. Memory limits are on the true weight bytes (MB = 10⁶ bytes).",
                "Roofline: a forward pass reads every weight at least once, so weight bytes / bandwidth is a floor "
                "on its time. Bandwidth: a large tensor copy (bytes read + written), recorded with the run, "
                "measured when the report is made on the same hardware, or configured.",
            ]
        ),
    ]


def document(report: Report, images: list[Image] | None = None) -> list[Block]:
    blocks: list[Block] = [Heading(1, "quantarena report")]
    lines = [_run_line(run) for run in report.runs]
    blocks.append(Bullets(lines) if len(lines) > 1 else Paragraph(lines[0]))
    if not report.groups:
        return [*blocks, Paragraph("No cell has finished yet.")]
    blocks += _recommendation_blocks(report)
    blocks += [Heading(2, "Trade-offs"), _tradeoff_table(report)]
    for group in report.groups:
        columns, rows = table_rows(report, group)
        blocks += [Heading(2, group.title), Table(columns, rows)]
        caveats = dict.fromkeys((c.method, c.caveat) for c in group.cells if c.caveat)
        blocks += [Paragraph(f"{method}: {caveat}.") for method, caveat in caveats]
        if any(c.status == "ok" for c in group.cells):
            blocks += _stats_blocks(report, group) + _roofline_blocks(report, group)
    if images:
        blocks += [Heading(2, "Charts"), *images]
    return blocks + _method_notes()
