"""Plain metric functions on numpy arrays; each is checked against a reference in the tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray,
                           class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro one-vs-rest AUC and a per-class table.

    ``y_true`` holds class indices (N,), ``probabilities`` is (N, K). Classes absent from
    ``y_true`` get AUC None and are left out of the macro AUC.
    """
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    y_pred = probabilities.argmax(1)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    aucs: list[float | None] = []
    for k in labels:
        positives = y_true == k
        aucs.append(float(roc_auc_score(positives, probabilities[:, k]))
                    if 0 < positives.sum() < len(y_true) else None)
    present = [a for a in aucs if a is not None]
    per_class = {
        name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
               "support": int(support[k]), "auc": aucs[k]}
        for k, name in enumerate(class_names)
    }
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "macro_auc": float(np.mean(present)) if present else None,
        "n": int(len(y_true)),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, len(class_names)).tolist(),
    }


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (sklearn's ``balanced_accuracy_score``), from the
    confusion matrix: a prediction of a class absent from them (a few-shot probe's, a zero-shot answer) is an
    error like any other, and a scored split of one class is no reason for a warning of sklearn's on stderr."""
    if not len(y_true):
        raise ValueError("balanced accuracy of no records")
    matrix = confusion_matrix(y_true, y_pred, int(max(y_true.max(), y_pred.max())) + 1)
    support = matrix.sum(axis=1)
    present = support > 0
    return float(np.mean(matrix.diagonal()[present] / support[present]))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def retrieval_ranks(similarity: np.ndarray, relevant: Sequence[Sequence[int]]) -> np.ndarray:
    """1-based rank of the best-ranked relevant item for each query row of ``similarity``.

    Ties are broken pessimistically (an item scoring equal to the relevant one ranks before it).
    """
    ranks = np.empty(len(similarity), dtype=int)
    for row, targets in enumerate(relevant):
        best = similarity[row, list(targets)].max()
        ranks[row] = int((similarity[row] >= best).sum() - (similarity[row, list(targets)] >= best).sum() + 1)
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    return {f"R@{k}": float((ranks <= k).mean()) for k in ks}
