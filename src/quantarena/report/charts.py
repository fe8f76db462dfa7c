"""PNG charts: bars per metric, Pareto fronts of quality vs cost, confusion matrices.

Drawn on matplotlib's Agg canvas through Figure objects: no pyplot state, no display needed. The drawing
functions take plain points, not results, and ``draw_charts`` makes them from the numbers the report also
prints.
"""

from __future__ import annotations

import hashlib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from quantarena.report.analysis import Group, Report
from quantarena.report.document import Image
from quantarena.report.format import MB, latency_label
from quantarena.report.format import title as metric_title

DPI = 110
COLORS = matplotlib.colormaps["tab10"].colors


@dataclass(frozen=True)
class Bar:
    group: str  # model (and run) the bar belongs to
    method: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass(frozen=True)
class Point:
    group: str
    method: str
    cost: float  # weight MB or latency ms: lower is better
    quality: float


def _label(value: float) -> str:
    return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def bar_chart(bars: list[Bar], title: str, ylabel: str, path: Path) -> Path:
    """Methods along x, one bar per group within each method, value labels on the bars, 95% CI whiskers."""
    methods = list(dict.fromkeys(b.method for b in bars))
    groups = list(dict.fromkeys(b.group for b in bars))
    width = 0.8 / len(groups)
    fig = Figure(figsize=(max(6.0, 1.1 * len(methods) * max(1, len(groups) * 0.7)), 4.2), dpi=DPI)
    ax = fig.subplots()
    for g, group in enumerate(groups):
        by_method = {b.method: b for b in bars if b.group == group}
        xs = [i + (g - (len(groups) - 1) / 2) * width for i, m in enumerate(methods) if m in by_method]
        chosen = [by_method[m] for m in methods if m in by_method]
        values = [b.value for b in chosen]
        with_ci = [b for b in chosen if b.ci_low is not None]
        errors = [
            [b.value - b.ci_low if b.ci_low is not None else 0.0 for b in chosen],
            [b.ci_high - b.value if b.ci_high is not None else 0.0 for b in chosen],
        ]
        rects = ax.bar(
            xs,
            values,
            width * 0.92,
            color=COLORS[g % len(COLORS)],
            label=group,
            yerr=errors if with_ci else None,
            capsize=3,
            error_kw={"elinewidth": 1, "ecolor": "#333"},
        )
        for rect, b in zip(rects, chosen, strict=True):  # above the whisker, where there is one
            top = b.value if b.ci_high is None else max(b.value, b.ci_high)
            x = rect.get_x() + rect.get_width() / 2
            ax.annotate(_label(b.value), (x, top), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    crowded = sum(len(m) + 2 for m in methods) > fig.get_figwidth() * 7  # about the characters that fit
    ax.set_xticks(range(len(methods)), methods, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(_wrap(title, fig), fontsize=10, loc="left")
    ax.margins(y=0.15)
    ax.spines[["top", "right"]].set_visible(False)
    if len(groups) > 1:
        ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)


def pareto_front(points: list[Point], higher_is_better: bool) -> list[Point]:
    """Points no other point beats on both cost and quality, cheapest first."""
    sign = 1 if higher_is_better else -1
    front, best = [], -np.inf
    for p in sorted(points, key=lambda p: (p.cost, -sign * p.quality)):
        if sign * p.quality > best:
            front.append(p)
            best = sign * p.quality
    return front


def pareto_chart(
    panels: list[tuple[str, list[Point]]], quality_label: str, higher_is_better: bool, title: str, path: Path
) -> Path:
    """One panel per cost (weight MB, latency ms): every variant, and each group's front as a dashed step line."""
    fig = Figure(figsize=(6.2 * len(panels), 4.4), dpi=DPI)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (cost_label, points) in zip(axes[0], panels, strict=True):
        groups = list(dict.fromkeys(p.group for p in points))
        for g, group in enumerate(groups):
            color = COLORS[g % len(COLORS)]
            mine = sorted((p for p in points if p.group == group), key=lambda p: p.cost)
            ax.scatter([p.cost for p in mine], [p.quality for p in mine], color=color, s=36, zorder=3, label=group)
            # Neighbours along the cost axis take turns above and below their point, so labels collide less.
            for i, p in enumerate(mine):
                offset = (5, 4) if i % 2 == 0 else (5, -11)
                ax.annotate(p.method, (p.cost, p.quality), textcoords="offset points", xytext=offset, fontsize=8)
            front = pareto_front(mine, higher_is_better)
            ax.step([p.cost for p in front], [p.quality for p in front], where="post", color=color, alpha=0.6, ls="--")
            ax.scatter([p.cost for p in front], [p.quality for p in front], s=110, facecolors="none", edgecolors=color)
        ax.set_xlabel(f"{cost_label} (lower is better)")
        ax.set_ylabel(f"{quality_label} ({'higher' if higher_is_better else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.12)
        ax.spines[["top", "right"]].set_visible(False)
        if len(groups) > 1:
            ax.legend(fontsize=8, frameon=False)
    fig.suptitle(_wrap(f"{title} (ringed and dashed: the Pareto front)", fig), fontsize=10, x=0.01, ha="left")
    return _save(fig, path)


def confusion_chart(matrices: dict[str, list[list[int]]], title: str, path: Path) -> Path:
    """One heat map per method: rows true labels, columns predictions, counts written in the cells."""
    fig = Figure(figsize=(2.9 * len(matrices) + 0.6, 3.6), dpi=DPI)
    axes = fig.subplots(1, len(matrices), squeeze=False)
    for ax, (method, matrix) in zip(axes[0], matrices.items(), strict=True):
        cm = np.asarray(matrix)
        ax.imshow(cm, cmap="Blues", vmin=0)
        for (i, j), count in np.ndenumerate(cm):
            ax.text(j, i, f"{count:,}", ha="center", va="center", color="white" if count > cm.max() / 2 else "black")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(len(cm)))
        ax.set_yticks(range(len(cm)))
    fig.suptitle(_wrap(title, fig), fontsize=10, x=0.01, ha="left")
    return _save(fig, path)


def _wrap(title: str, fig: Figure) -> str:
    # Task labels carry their options (a=1,b=2) and can be long: let them break after commas, to the figure's width.
    chars = int(fig.get_figwidth() * 11)
    return "\n".join(textwrap.wrap(title.replace(",", ", "), chars, break_on_hyphens=False))


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug if len(slug) <= 40 else f"{slug[:32]}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def draw_charts(report: Report, chart_dir: Path) -> list[Image]:
    """Per task: a bar chart per metric (quality, latency, weight MB), the Pareto fronts, and for
    classification the confusion matrices. Groups of the same task share a chart."""
    images = []
    by_task: dict[str, list[Group]] = {}
    for group in report.groups:
        by_task.setdefault(group.cells[0].task, []).append(group)
    for task, groups in by_task.items():
        ok = [(g, c) for g in groups for c in g.cells if c.status == "ok"]
        if not ok:
            continue
        first = ok[0][1]
        name = _slug(task)
        # The quality metric, and F1 beside accuracy; precision and recall intervals are in the tables.
        metrics = [first.quality_metric, *(["f1"] if "f1" in first.metrics and first.quality_metric != "f1" else [])]
        for metric in metrics:
            bars = []
            for g, c in ok:
                est = report.analysis(g, c).estimates.get(metric)
                low, high = (est.ci_low, est.ci_high) if est else (None, None)
                bars.append(Bar(g.series, c.method, c.metrics[metric], low, high))
            ci = " (95% CI whiskers)" if any(b.ci_low is not None for b in bars) else ""
            path = bar_chart(
                bars, f"{metric_title(metric)}{ci} · {task}", metric_title(metric), chart_dir / f"{name}-{metric}.png"
            )
            images.append(Image(path, f"{metric}: {task}"))
        latency = latency_label(first.latency_metric)
        for label, key, value in (
            ("Latency", "latency", lambda c: c.metrics[c.latency_metric]),
            ("Weight memory", "weight-mb", lambda c: c.measurements["weight_bytes"] / MB),
        ):
            unit = latency if key == "latency" else "MB"
            bars = [Bar(g.series, c.method, value(c)) for g, c in ok]
            path = bar_chart(bars, f"{label} ({unit}) · {task}", unit, chart_dir / f"{name}-{key}.png")
            images.append(Image(path, f"{label}: {task}"))
        quality = first.quality_metric
        panels = [
            (
                "weight MB",
                [Point(g.series, c.method, c.measurements["weight_bytes"] / MB, c.metrics[quality]) for g, c in ok],
            ),
            (
                latency,
                [Point(g.series, c.method, c.metrics[c.latency_metric], c.metrics[quality]) for g, c in ok],
            ),
        ]
        front_title, path = f"Pareto fronts · {task}", chart_dir / f"{name}-pareto.png"
        path = pareto_chart(panels, metric_title(quality), first.higher_is_better, front_title, path)
        images.append(Image(path, f"Pareto: {task}"))
        for g in groups:
            matrices = {
                c.method: c.metrics["confusion_matrix"]
                for c in g.cells
                if c.status == "ok" and "confusion_matrix" in c.metrics
            }
            if matrices:
                path = confusion_chart(
                    matrices, f"Confusion matrices · {g.title}", chart_dir / f"{_slug(g.title)}-confusion.png"
                )
                images.append(Image(path, f"Confusion matrices: {g.title}"))
    return images
