"""Confidence intervals and paired tests for the quality metrics, computed from a cell's per-example record.

Every metric here is a function of column sums over examples (counts of (label, prediction) pairs for
classification; NLL and token sums over windows for perplexity), so one bootstrap serves them all: draw
``N_RESAMPLES`` resamples of the examples with replacement (seeded), sum the columns under each, and take
the 2.5th and 97.5th percentiles of the metric (the percentile interval).

Comparisons with the baseline are paired: both variants are resampled with the same example indices, so
the interval is on the difference itself. Accuracy uses McNemar's exact test (a two-sided binomial test on
the discordant pairs); F1 and perplexity use the paired bootstrap's p-value, the smallest alpha whose
percentile interval of the difference still excludes zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantarena.metrics import accuracy_stderr, classification_scores
from quantarena.results import CellResult

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
N_RESAMPLES = 2000
SEED = 0
Z_95 = 1.959963984540054
# Means of per-example 0/1 scores: their analytic standard error is exact.
MEANS_OF_SCORES = {"accuracy", "acc", "acc_norm", "last_token_acc"}
# Metrics in [0, 1]: differences read best in percentage points; others as a relative change in %.
PROPORTIONS = MEANS_OF_SCORES | {"precision", "recall", "f1", "f1_macro", "top1_agreement"}
# Paired comparisons made for each metric that has a per-example record, and their test.
COMPARED = {
    "accuracy": "McNemar exact",
    "f1": "paired bootstrap",
    "perplexity": "paired bootstrap",
    "acc": "McNemar exact",
    "word_perplexity": "paired bootstrap",
}


@dataclass(frozen=True)
class Estimate:
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int  # examples (or windows) resampled
    unit: str  # "examples" or "windows"
    # Analytic standard error where it is exact (accuracy: a mean of 0/1 scores).
    stderr: float | None = None


@dataclass(frozen=True)
class PairedTest:
    metric: str
    change: float  # variant vs baseline, in change_unit(metric): points or %
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    n: int
    discordant: tuple[int, int] | None = None  # McNemar: (baseline right only, variant right only)

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def change_unit(metric: str) -> str:
    return "pt" if metric in PROPORTIONS else "%"


def quality_change(metric: str, value: float | np.ndarray, reference: float | np.ndarray) -> float | np.ndarray:
    """Points for proportions, relative % otherwise: the units of Δ columns and of --max-drop."""
    if metric in PROPORTIONS:
        return (value - reference) * 100
    return (value / reference - 1) * 100


def mcnemar_exact(baseline_correct: np.ndarray, variant_correct: np.ndarray) -> tuple[float, int, int]:
    """Two-sided exact McNemar p-value and the discordant counts (baseline-only right, variant-only right)."""
    b = int(np.sum(baseline_correct & ~variant_correct))
    c = int(np.sum(~baseline_correct & variant_correct))
    if b + c == 0:
        return 1.0, b, c
    from scipy.stats import binom  # here: importing scipy.stats costs over a second

    return float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5))), b, c


def resampled_sums(columns: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Column sums of ``columns`` (n rows) under bootstrap resamples of its rows: shape (n_resamples, m)."""
    n = len(columns)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n)  # bounds the (chunk, n) count matrix
    sums = []
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, (size, n)) + np.arange(size)[:, None] * n
        counts = np.bincount(idx.ravel(), minlength=size * n).reshape(size, n)
        sums.append(counts @ columns)
    return np.concatenate(sums)


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.nanpercentile(samples, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(low), float(high)


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided: twice the smaller share of resampled differences on either side of zero (+1 smoothed)."""
    below, above = np.sum(differences <= 0), np.sum(differences >= 0)
    return float(min(1.0, 2 * (min(below, above) + 1) / (len(differences) + 1)))


@dataclass(frozen=True)
class Sample:
    """A cell's per-example record as columns whose sums determine every metric."""

    columns: np.ndarray  # (n, m)
    metrics: Callable[[np.ndarray], dict[str, np.ndarray]]  # sums (..., m) -> metric -> (...)
    unit: str
    key: tuple  # what must match for two samples to be paired (labels, window sizes)
    correct: np.ndarray | None = None  # per-example 0/1 correctness, for McNemar


def sample_of(cell: CellResult) -> Sample | None:
    """None when the record has no per-example data (results written before it was stored)."""
    per = cell.per_example
    if cell.task_name == "classification" and per.get("predictions") and per.get("labels"):
        labels, predictions = np.asarray(per["labels"]), np.asarray(per["predictions"])
        k = len(cell.metrics.get("confusion_matrix") or []) or int(max(labels.max(), predictions.max())) + 1
        columns = np.zeros((len(labels), k * k))
        columns[np.arange(len(labels)), labels * k + predictions] = 1
        return Sample(
            columns,
            lambda sums: classification_scores(sums.reshape(*sums.shape[:-1], k, k)),
            "examples",
            tuple(per["labels"]),
            labels == predictions,
        )
    if per.get("predictions_norm") and per.get("labels"):  # multiple choice: acc and acc_norm
        labels = np.asarray(per["labels"])
        correct = np.asarray(per["predictions"]) == labels
        columns = np.column_stack([correct, np.asarray(per["predictions_norm"]) == labels, np.ones(len(labels))])
        return Sample(
            columns.astype(float),
            lambda sums: {"acc": sums[..., 0] / sums[..., 2], "acc_norm": sums[..., 1] / sums[..., 2]},
            "examples",
            tuple(per["labels"]),
            correct,
        )
    if per.get("correct") and per.get("last_token_correct"):  # LAMBADA
        correct = np.asarray(per["correct"], dtype=bool)
        columns = np.column_stack([correct, per["last_token_correct"], np.ones(len(correct))]).astype(float)
        return Sample(
            columns,
            lambda sums: {"acc": sums[..., 0] / sums[..., 2], "last_token_acc": sums[..., 1] / sums[..., 2]},
            "examples",
            (len(correct),),
            correct,
        )
    if per.get("doc_logprob") and per.get("doc_words"):  # WikiText documents
        columns = np.column_stack([-np.asarray(per["doc_logprob"]), per["doc_words"], per["doc_bytes"]]).astype(float)
        return Sample(
            columns,
            lambda sums: {
                "word_perplexity": np.exp(sums[..., 0] / sums[..., 1]),
                "byte_perplexity": np.exp(sums[..., 0] / sums[..., 2]),
                "bits_per_byte": sums[..., 0] / sums[..., 2] / np.log(2),
            },
            "documents",
            tuple(per["doc_words"]),
        )
    if per.get("doc_scores"):  # lm-eval tasks: each mean-aggregated metric's per-document values
        names = list(per["doc_scores"])
        columns = np.column_stack([*(per["doc_scores"][m] for m in names), np.ones(len(per["doc_scores"][names[0]]))])
        acc = per["doc_scores"].get("acc")
        return Sample(
            columns.astype(float),
            lambda sums: {m: sums[..., i] / sums[..., -1] for i, m in enumerate(names)},
            "examples",
            (cell.task_config.get("task"), len(columns)),
            np.asarray(acc) == 1 if acc is not None else None,
        )
    if cell.task_name == "perplexity" and per.get("window_nll_sum") and per.get("window_tokens"):
        columns = np.column_stack([per["window_nll_sum"], per["window_tokens"]]).astype(float)
        return Sample(
            columns,
            lambda sums: {"perplexity": np.exp(sums[..., 0] / sums[..., 1])},
            "windows",
            tuple(per["window_tokens"]),
        )
    return None


def estimates(cell: CellResult) -> dict[str, Estimate]:
    """95% bootstrap interval of every quality metric the record allows; empty without per-example data."""
    sample = sample_of(cell)
    if sample is None:
        return {}
    point = sample.metrics(sample.columns.sum(axis=0))
    boot = sample.metrics(resampled_sums(sample.columns))
    n = len(sample.columns)
    out = {}
    for metric, samples in boot.items():
        value = float(point[metric])
        stderr = accuracy_stderr(value, n) if metric in MEANS_OF_SCORES else None
        out[metric] = Estimate(metric, value, *percentile_interval(samples), n, sample.unit, stderr)
    return out


def compare(cell: CellResult, baseline: CellResult) -> dict[str, PairedTest]:
    """Paired comparisons of the variant with the baseline on the same examples; empty if they cannot be paired."""
    sample, base = sample_of(cell), sample_of(baseline)
    if sample is None or base is None or sample.key != base.key:
        return {}
    m = sample.columns.shape[1]
    sums = resampled_sums(np.hstack([sample.columns, base.columns]))
    variant_boot, base_boot = sample.metrics(sums[:, :m]), base.metrics(sums[:, m:])
    variant_point, base_point = sample.metrics(sample.columns.sum(axis=0)), base.metrics(base.columns.sum(axis=0))
    n = len(sample.columns)
    out = {}
    for metric, test in COMPARED.items():
        if metric not in variant_point:
            continue
        changes = quality_change(metric, variant_boot[metric], base_boot[metric])
        change = float(quality_change(metric, variant_point[metric], base_point[metric]))
        low, high = percentile_interval(changes)
        if test == "McNemar exact":
            p, b, c = mcnemar_exact(base.correct, sample.correct)
            out[metric] = PairedTest(metric, change, low, high, p, test, n, (b, c))
        else:
            out[metric] = PairedTest(metric, change, low, high, bootstrap_p_value(changes), test, n)
    return out


def flipped_predictions(cell: CellResult, baseline: CellResult) -> int | None:
    """Examples whose prediction differs from the baseline's; None when they cannot be paired."""
    mine, theirs = cell.per_example.get("predictions"), baseline.per_example.get("predictions")
    if not mine or not theirs or len(mine) != len(theirs):
        return None
    if cell.per_example.get("labels") != baseline.per_example.get("labels"):
        return None
    return sum(a != b for a, b in zip(mine, theirs, strict=True))
