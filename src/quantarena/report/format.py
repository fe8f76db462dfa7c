"""Every rule that turns a number into report text, in one place: the tables, the recommendation, the statistics
and the charts' labels all read the same way."""

from __future__ import annotations

from quantarena.report.stats import PROPORTIONS, Estimate, PairedTest
from quantarena.results import CellResult

MB = 1e6
LATENCY_LABELS = {"ms_per_token": "ms/token", "latency_ms_median": "ms/example (batch 1)"}


def number(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def title(text: str) -> str:
    return text.replace("_", " ").title()


def latency_label(metric: str) -> str:
    return LATENCY_LABELS.get(metric, metric)


def quality_delta(cell: CellResult, base: CellResult) -> str:
    """'+0.40 pt' for proportions; '+0.054 (+0.3%)' for the others (perplexity)."""
    metric = cell.quality_metric
    value, ref = cell.metrics[metric], base.metrics[metric]
    if metric in PROPORTIONS:
        return f"{(value - ref) * 100:+.2f} pt"
    return f"{value - ref:+.3f} ({(value / ref - 1) * 100:+.1f}%)"


def interval(estimate: Estimate | None, digits: int) -> str:
    return "" if estimate is None else f"[{estimate.ci_low:.{digits}f}, {estimate.ci_high:.{digits}f}]"


def percent(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.095 else f"{fraction * 100:.2g}%"


def milliseconds(latency_ms: float) -> str:
    return f"{latency_ms:,.0f}" if latency_ms >= 100 else f"{latency_ms:.3g}"


def drop_text(value: float, unit: str) -> str:
    """A quality drop in its unit: points ('pt') or relative percent."""
    return f"{value:.2f} pt" if unit == "pt" else f"{value:.2f}%"


def p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def change_text(metric: str, value: float) -> str:
    return f"{value:+.2f} pt" if metric in PROPORTIONS else f"{value:+.2f}%"


def describe(test: PairedTest) -> str:
    """'-2.10 pt [-3.40, -0.80], p=0.002' or '+0.27% [-0.10, +0.60], not significant (p=0.410)'."""
    text = f"{change_text(test.metric, test.change)} [{test.ci_low:+.2f}, {test.ci_high:+.2f}]"
    if test.significant:
        return f"{text}, {p_text(test.p_value)}"
    return f"{text}, not significant ({p_text(test.p_value)})"
