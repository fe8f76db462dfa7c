import numpy as np
import pytest
from sklearn import metrics as sk

from quantarena.metrics import classification_metrics


@pytest.mark.parametrize("num_labels", [2, 3, 5])
@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(num_labels, seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_labels, 200)
    # Mostly right, and on some seeds one class never predicted: exercises zero division.
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, max(1, num_labels - seed % 2), 200))
    ours = classification_metrics(y_true, y_pred, num_labels)
    average = "binary" if num_labels == 2 else "macro"
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    for name, fn in (("precision", sk.precision_score), ("recall", sk.recall_score), ("f1", sk.f1_score)):
        assert ours[name] == pytest.approx(fn(y_true, y_pred, average=average, zero_division=0))
        assert ours[f"{name}_macro"] == pytest.approx(
            fn(y_true, y_pred, average="macro", labels=range(num_labels), zero_division=0)
        )
    assert ours["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=range(num_labels)).tolist()


def test_metrics_when_nothing_is_predicted_positive():
    y_true, y_pred = [1, 1, 0, 0], [0, 0, 0, 0]
    ours = classification_metrics(y_true, y_pred, 2)
    assert ours["precision"] == sk.precision_score(y_true, y_pred, zero_division=0) == 0.0
    assert ours["f1"] == 0.0
    assert ours["accuracy"] == 0.5
