"""Quality metrics, defined once: classification scores with scikit-learn's definitions, and the standard error
of a mean of 0/1 scores as lm-evaluation-harness computes it.

Classification scores come from confusion matrices (rows true labels, columns predictions, sklearn's
orientation); precision/recall/F1 follow sklearn's default average: binary (positive label 1) for two
classes, macro otherwise. Undefined ratios (no predicted or no true examples of a class) are 0, as sklearn's
``zero_division=0``. The same function scores one matrix (a task's result) or a stack of them (bootstrap
resamples in the report's statistics).
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels (sklearn's orientation)."""
    return np.bincount(y_true * num_labels + y_pred, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def per_class_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 of each class from confusion matrices (..., k, k): arrays (..., k)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(float)
    predicted, actual = confusion.sum(axis=-2), confusion.sum(axis=-1)
    return {
        "precision": _ratio(tp, predicted),
        "recall": _ratio(tp, actual),
        "f1": _ratio(2 * tp, predicted + actual),
    }


def classification_scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, precision, recall, F1 of confusion matrices (..., k, k)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    k = confusion.shape[-1]
    averaged = {name: v[..., 1] if k == 2 else v.mean(axis=-1) for name, v in per_class_scores(confusion).items()}
    return {"accuracy": tp.sum(axis=-1) / confusion.sum(axis=(-2, -1))} | averaged


def classification_metrics(y_true, y_pred, num_labels: int) -> dict:
    cm = confusion_matrix(np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64), num_labels)
    macro = {f"{name}_macro": float(v.mean()) for name, v in per_class_scores(cm).items()}
    return {
        **{name: float(v) for name, v in classification_scores(cm).items()},
        **macro,
        "confusion_matrix": cm.tolist(),
        "n_examples": int(cm.sum()),
    }


def accuracy_stderr(accuracy: float, n: int) -> float:
    """sqrt(p(1-p)/(n-1)): the sample standard deviation of 0/1 scores over sqrt(n), as lm-eval's mean stderr."""
    return float(np.sqrt(accuracy * (1 - accuracy) / (n - 1))) if n > 1 else float("nan")
