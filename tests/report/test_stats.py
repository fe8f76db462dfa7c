"""Statistics against references: scipy's binomial test and statsmodels' McNemar, numpy's standard error,
metrics.py's point values, and the normal-theory interval of a mean."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from statsmodels.stats.contingency_tables import mcnemar

from quantarena.metrics import accuracy_stderr, classification_metrics, classification_scores
from quantarena.report.format import describe
from quantarena.report.stats import (
    N_RESAMPLES,
    bootstrap_p_value,
    compare,
    estimates,
    mcnemar_exact,
    percentile_interval,
    quality_change,
    resampled_sums,
)
from quantarena.results import CellResult


def classification_cell(predictions, labels, method="x") -> CellResult:
    return CellResult(
        model="m",
        method=method,
        task="classification",
        status="ok",
        task_name="classification",
        quality_metric="accuracy",
        metrics=classification_metrics(labels, predictions, 2),
        per_example={"predictions": list(predictions), "labels": list(labels)},
    )


def perplexity_cell(nll, tokens, method="x") -> CellResult:
    return CellResult(
        model="m",
        method=method,
        task="perplexity",
        status="ok",
        task_name="perplexity",
        quality_metric="perplexity",
        higher_is_better=False,
        metrics={"perplexity": math.exp(sum(nll) / sum(tokens))},
        per_example={"window_nll_sum": list(nll), "window_tokens": list(tokens)},
    )


@pytest.mark.parametrize(("b", "c"), [(0, 0), (3, 0), (5, 9), (20, 7), (40, 41), (1, 30)])
def test_mcnemar_exact_matches_binomtest_and_statsmodels(b, c):
    # Baseline right only on b examples, variant right only on c, both right on 50, both wrong on 11.
    base = np.array([True] * b + [False] * c + [True] * 50 + [False] * 11)
    variant = np.array([False] * b + [True] * c + [True] * 50 + [False] * 11)
    p, got_b, got_c = mcnemar_exact(base, variant)
    assert (got_b, got_c) == (b, c)
    reference = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    assert p == pytest.approx(reference, rel=1e-9)
    table = [[50, b], [c, 11]]
    assert p == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9)


def test_accuracy_stderr_is_the_sample_standard_error():
    scores = np.array([1] * 37 + [0] * 63, dtype=float)
    assert accuracy_stderr(scores.mean(), len(scores)) == pytest.approx(scores.std(ddof=1) / np.sqrt(len(scores)))


@pytest.mark.parametrize("k", [2, 3])
def test_classification_scores_of_a_stack_match_sklearn_per_matrix(k):
    """The bootstrap scores stacks of confusion matrices at once; each must score as sklearn scores its data."""
    from sklearn import metrics as sk

    rng = np.random.default_rng(1)
    samples = [(rng.integers(0, k, 60), rng.integers(0, k, 60)) for _ in range(4)]
    stack = np.stack([sk.confusion_matrix(y, p, labels=range(k)) for y, p in samples]).astype(float)
    got = classification_scores(stack)
    average = "binary" if k == 2 else "macro"
    for i, (y, p) in enumerate(samples):
        assert got["accuracy"][i] == pytest.approx(sk.accuracy_score(y, p))
        for name, fn in (("precision", sk.precision_score), ("recall", sk.recall_score), ("f1", sk.f1_score)):
            assert got[name][i] == pytest.approx(fn(y, p, average=average, zero_division=0))


def test_resampled_sums_are_seeded_resamples_of_rows():
    columns = np.column_stack([np.ones(50), np.arange(50.0)])
    sums = resampled_sums(columns, n_resamples=300)
    assert sums.shape == (300, 2)
    assert np.all(sums[:, 0] == 50)  # every resample draws n rows
    assert np.array_equal(sums, resampled_sums(columns, n_resamples=300))
    assert sums[:, 1].mean() == pytest.approx(np.arange(50.0).sum(), rel=0.02)


def test_bootstrap_interval_of_a_mean_agrees_with_normal_theory():
    x = np.random.default_rng(2).normal(10, 2, 400)
    means = resampled_sums(x[:, None])[:, 0] / len(x)
    low, high = percentile_interval(means)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert low == pytest.approx(x.mean() - half, abs=0.05)
    assert high == pytest.approx(x.mean() + half, abs=0.05)


def test_bootstrap_p_value():
    assert bootstrap_p_value(np.ones(N_RESAMPLES)) == pytest.approx(2 / (N_RESAMPLES + 1))
    assert bootstrap_p_value(np.zeros(N_RESAMPLES)) == 1.0
    assert bootstrap_p_value(np.r_[-np.ones(500), np.ones(500)]) == 1.0


def test_quality_change_units():
    assert quality_change("accuracy", 0.905, 0.912) == pytest.approx(-0.7)  # points
    assert quality_change("perplexity", 20.3, 20.0) == pytest.approx(1.5)  # relative %


def test_accuracy_estimate():
    labels = [i % 2 for i in range(300)]
    predictions = [y if i % 4 else 1 - y for i, y in enumerate(labels)]  # 75% right
    est = estimates(classification_cell(predictions, labels))
    acc = est["accuracy"]
    assert acc.value == pytest.approx(0.75) and acc.n == 300 and acc.unit == "examples"
    assert acc.stderr == pytest.approx(accuracy_stderr(0.75, 300))
    # The bootstrap and the analytic normal interval agree for a proportion this far from 0 and 1.
    assert acc.ci_low == pytest.approx(0.75 - 1.96 * acc.stderr, abs=0.012)
    assert acc.ci_high == pytest.approx(0.75 + 1.96 * acc.stderr, abs=0.012)
    assert set(est) == {"accuracy", "precision", "recall", "f1"}
    assert all(e.ci_low <= e.value <= e.ci_high for e in est.values())


def test_records_without_per_example_data_have_no_statistics():
    old = CellResult(
        model="m", method="x", task="perplexity", status="ok", task_name="perplexity", metrics={"perplexity": 20.0}
    )
    assert estimates(old) == {}
    assert compare(old, old) == {}


def test_mcnemar_comparison_on_cells():
    labels = [i % 2 for i in range(200)]
    base = classification_cell(labels, labels, "fp32")  # all right
    worse = [1 - y if i < 12 else y for i, y in enumerate(labels)]  # 12 newly wrong
    result = compare(classification_cell(worse, labels), base)
    acc = result["accuracy"]
    assert acc.test == "McNemar exact" and acc.discordant == (12, 0)
    assert acc.change == pytest.approx(-6.0)  # points
    assert acc.p_value == pytest.approx(binomtest(0, 12, 0.5).pvalue)
    assert acc.significant and acc.ci_high < 0
    assert result["f1"].test == "paired bootstrap"
    same = compare(classification_cell(labels, labels), base)["accuracy"]
    assert same.p_value == 1.0 and not same.significant and "not significant" in describe(same)


def test_unpaired_records_are_not_compared():
    a = classification_cell([0, 1, 1], [0, 1, 0])
    b = classification_cell([0, 1, 1], [1, 1, 0])
    assert compare(a, b) == {}


def test_paired_bootstrap_on_perplexity_windows():
    rng = np.random.default_rng(3)
    tokens = [512] * 40
    base_nll = rng.uniform(1400, 1700, 40)
    base = perplexity_cell(base_nll, tokens, "fp32")
    # Every window 2% more NLL: a consistent, significant loss in the variant.
    worse = compare(perplexity_cell(base_nll * 1.02, tokens), base)["perplexity"]
    expected = (math.exp(1.02 * base_nll.sum() / sum(tokens)) / math.exp(base_nll.sum() / sum(tokens)) - 1) * 100
    assert worse.change == pytest.approx(expected)
    assert worse.significant and worse.ci_low > 0
    # Noise around zero on each window: no significant change.
    noisy = compare(perplexity_cell(base_nll + rng.normal(0, 20, 40), tokens), base)["perplexity"]
    assert noisy.ci_low < 0 < noisy.ci_high or not noisy.significant
    est = estimates(base)["perplexity"]
    assert est.unit == "windows" and est.n == 40 and est.ci_low < est.value < est.ci_high
