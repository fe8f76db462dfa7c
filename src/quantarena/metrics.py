"""Classification metrics from the confusion matrix, with scikit-learn's definitions.

Undefined ratios (no predicted or no true examples of a class) are 0, as sklearn's
``zero_division=0``.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """Rows are true labels, columns predicted labels (sklearn's orientation)."""
    return np.bincount(y_true * num_labels + y_pred, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=float), where=den > 0)


def classification_metrics(y_true, y_pred, num_labels: int) -> dict:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = confusion_matrix(y_true, y_pred, num_labels)
    tp = np.diag(cm).astype(float)
    precision = _ratio(tp, cm.sum(axis=0))
    recall = _ratio(tp, cm.sum(axis=1))
    f1 = _ratio(2 * tp, cm.sum(axis=0) + cm.sum(axis=1))
    metrics = {
        "accuracy": float(tp.sum() / cm.sum()),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "confusion_matrix": cm.tolist(),
        "n_examples": int(cm.sum()),
    }
    # precision/recall/f1 follow sklearn's default average: binary (positive label 1) for two
    # classes, macro otherwise.
    if num_labels == 2:
        metrics |= {"precision": float(precision[1]), "recall": float(recall[1]), "f1": float(f1[1])}
    else:
        metrics |= {k: metrics[f"{k}_macro"] for k in ("precision", "recall", "f1")}
    return metrics
