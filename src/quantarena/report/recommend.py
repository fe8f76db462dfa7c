"""Which variant to use: the smallest (or fastest) one within the quality, memory and latency limits.

``max_drop`` is in the quality metric's own units, as the Δ columns: percentage points for accuracy-type
metrics (accuracy 0.912 -> 0.905 is a 0.7-point drop) and a relative % for the others (perplexity
20.0 -> 20.3 is a 1.5% drop). Memory is the weights' true size in MB (10^6 bytes); latency is the task's
latency figure in ms (ms/example at batch 1 for classification, ms/token for perplexity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from quantarena.errors import ConfigError
from quantarena.report.format import MB, drop_text, latency_label, milliseconds
from quantarena.report.stats import PairedTest, change_unit, quality_change
from quantarena.results import CellResult


@dataclass(frozen=True)
class Constraints:
    max_drop: float = 1.0
    max_memory_mb: float | None = None
    max_latency_ms: float | None = None
    prefer: Literal["memory", "latency"] = "memory"

    def __post_init__(self):
        """Limits that cannot mean anything (NaN, negative, infinite) are refused where they are given."""
        for name, value, strict in (
            ("max_drop", self.max_drop, False),
            ("max_memory_mb", self.max_memory_mb, True),
            ("max_latency_ms", self.max_latency_ms, True),
        ):
            if value is not None and not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
                bound = "above 0" if strict else "0 or more"
                raise ConfigError(f"{name} {value}: give a finite number {bound}")
        if self.prefer not in ("memory", "latency"):
            raise ConfigError(f"prefer {self.prefer!r}: use memory or latency")

    def describe(self, unit: str) -> str:
        parts = [f"quality drop ≤ {self.max_drop:g}{' pt' if unit == 'pt' else '%'}"]
        if self.max_memory_mb is not None:
            parts.append(f"weights ≤ {self.max_memory_mb:g} MB")
        if self.max_latency_ms is not None:
            parts.append(f"latency ≤ {self.max_latency_ms:g} ms")
        return ", ".join(parts)


@dataclass(frozen=True)
class Candidate:
    method: str
    drop: float | None  # quality lost vs the baseline in the metric's units; negative is a gain
    significant: bool | None  # whether the paired test tells the drop from noise; None without per-example data
    weight_mb: float | None
    latency_ms: float | None
    ruled_out_by: tuple[str, ...] = ()
    baseline: bool = False
    verdict: str = ""


@dataclass(frozen=True)
class Recommendation:
    model: str
    task: str
    device: str
    baseline: str
    quality_metric: str
    latency_metric: str
    constraints: Constraints
    choice: str | None
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def unit(self) -> str:
        return change_unit(self.quality_metric)

    def summary(self) -> str:
        limits = self.constraints.describe(self.unit)
        if self.choice is None:
            return f"no variant meets {limits}."
        c = next(c for c in self.candidates if c.method == self.choice)
        latency = latency_label(self.latency_metric)
        return f"use `{c.method}` ({_facts(c, self.unit, latency)}); limits: {limits}."


def _facts(c: Candidate, unit: str, latency: str) -> str:
    facts = [f"{c.weight_mb:,.1f} MB weights", f"{milliseconds(c.latency_ms)} {latency}"]
    if c.baseline:
        facts.append("the baseline itself")
    elif c.drop is not None:
        noise = "" if c.significant is None else (", significant" if c.significant else ", not significant")
        facts.append(f"quality drop {drop_text(c.drop, unit)}{noise}")
    return ", ".join(facts)


def drop_of(cell: CellResult, baseline: CellResult) -> float:
    change = quality_change(
        cell.quality_metric, cell.metrics[cell.quality_metric], baseline.metrics[cell.quality_metric]
    )
    # Rounded so that float noise (0.53 - 0.52 = 0.010000000000000009) cannot put a drop of exactly
    # the limit on the wrong side of it.
    return round(float(-change if cell.higher_is_better else change), 9)


def _candidate(
    cell: CellResult, baseline: CellResult | None, tested: PairedTest | None, limits: Constraints
) -> Candidate:
    if cell.status != "ok":
        return Candidate(cell.method, None, None, None, None, (f"{cell.status}: {cell.reason}",))
    unit = change_unit(cell.quality_metric)
    weight_mb, latency_ms = cell.measurements["weight_bytes"] / MB, cell.metrics[cell.latency_metric]
    drop = drop_of(cell, baseline) if baseline else None
    significant = tested.significant if tested else None
    violated = []
    if drop is None:
        violated.append("quality drop unknown (the baseline did not run)")
    elif drop > limits.max_drop:
        violated.append(f"quality drop {drop_text(drop, unit)} > {drop_text(limits.max_drop, unit)}")
    if limits.max_memory_mb is not None and weight_mb > limits.max_memory_mb:
        violated.append(f"weights {weight_mb:,.1f} MB > {limits.max_memory_mb:g} MB")
    if limits.max_latency_ms is not None and latency_ms > limits.max_latency_ms:
        violated.append(f"latency {milliseconds(latency_ms)} ms > {limits.max_latency_ms:g} ms")
    return Candidate(cell.method, drop, significant, weight_mb, latency_ms, tuple(violated), cell is baseline)


def recommend_group(
    baseline_method: str,
    baseline: CellResult | None,
    cells: list[CellResult],
    tests: list[PairedTest | None],
    limits: Constraints,
) -> Recommendation:
    """The choice among one model x task's variants, and a verdict on every other one; ``tests`` are the
    paired tests of each cell's quality against the baseline (computed once, by the report)."""
    first = cells[0]
    candidates = [_candidate(c, baseline, t, limits) for c, t in zip(cells, tests, strict=True)]

    def order(c: Candidate) -> tuple[float, float]:
        return (c.weight_mb, c.latency_ms) if limits.prefer == "memory" else (c.latency_ms, c.weight_mb)

    feasible = sorted((c for c in candidates if not c.ruled_out_by), key=order)
    choice = feasible[0] if feasible else None
    judged = []
    for c in candidates:
        if c.ruled_out_by:
            verdict = "ruled out by " + "; ".join(c.ruled_out_by)
        elif c is choice:
            verdict = f"chosen: the {'smallest' if limits.prefer == 'memory' else 'fastest'} within the limits"
        elif limits.prefer == "memory":
            verdict = (
                f"meets the limits, but {choice.method} is smaller ({choice.weight_mb:,.1f} vs {c.weight_mb:,.1f} MB)"
            )
        else:
            faster = f"{milliseconds(choice.latency_ms)} vs {milliseconds(c.latency_ms)} ms"
            verdict = f"meets the limits, but {choice.method} is faster ({faster})"
        judged.append(replace(c, verdict=verdict))
    quality = next((c.quality_metric for c in cells if c.quality_metric), "")
    latency = next((c.latency_metric for c in cells if c.latency_metric), "")
    return Recommendation(
        first.model,
        first.task,
        first.device,
        baseline_method,
        quality,
        latency,
        limits,
        choice.method if choice else None,
        judged,
    )


def use_cases(baseline: CellResult | None, cells: list[CellResult], limits: Constraints) -> dict[str, str]:
    """A 'best use case' line per method: what it is the best choice for, or why it never is."""
    ok = [c for c in cells if c.status == "ok"]
    lines = {c.method: f"did not run here ({c.status}: {c.reason})" for c in cells if c.status != "ok"}
    if not ok:
        return lines

    def quality(c: CellResult) -> float:
        value = c.metrics[c.quality_metric]
        return value if c.higher_is_better else -value

    def size(c: CellResult) -> float:
        return c.measurements["weight_bytes"]

    def latency(c: CellResult) -> float:
        return c.metrics[c.latency_metric]

    within = [c for c in ok if baseline and drop_of(c, baseline) <= limits.max_drop]
    for c in ok:
        uses = []
        if quality(c) == max(map(quality, ok)):
            uses.append("best quality: when quality matters more than cost")
        if within and c is min(within, key=size):
            uses.append("memory-constrained deployment (smallest within the quality limit)")
        if within and c is min(within, key=latency):
            uses.append("latency-critical serving on this hardware (fastest within the quality limit)")
        if baseline and c not in within:
            drop = drop_text(drop_of(c, baseline), change_unit(c.quality_metric))
            if c is min(ok, key=size):
                uses.append(f"smallest overall, if a {drop} quality drop is acceptable")
            if c is min(ok, key=latency):
                uses.append(f"fastest overall, if a {drop} quality drop is acceptable")
        dominating = [
            o.method
            for o in ok
            if quality(o) >= quality(c)
            and size(o) <= size(c)
            and latency(o) <= latency(c)
            and (quality(o) > quality(c) or size(o) < size(c) or latency(o) < latency(c))
        ]
        if dominating and not uses:
            uses.append(f"none here: {dominating[0]} is at least as good on quality, size and speed")
        if c is baseline:
            uses.insert(0, "the reference the others are measured against")
        lines[c.method] = "; ".join(uses) or "a middle ground: neither the smallest, the fastest nor the most accurate"
    return lines
