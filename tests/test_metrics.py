"""Metrics against plain reference computations on seeded random data."""

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medvl.eval.metrics import classification_metrics, recall_at_k, retrieval_ranks


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, size=300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y_true]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    metrics = classification_metrics(y_true, probabilities, ["a", "b", "c", "d"])
    assert np.isclose(metrics["accuracy"], (probabilities.argmax(1) == y_true).mean())
    assert np.isclose(metrics["balanced_accuracy"], balanced_accuracy_score(y_true, probabilities.argmax(1)))
    assert np.isclose(metrics["macro_auc"], roc_auc_score(y_true, probabilities, multi_class="ovr"))
    assert sum(row["support"] for row in metrics["per_class"].values()) == 300
    assert np.array(metrics["confusion_matrix"]).sum() == 300


def test_retrieval_ranks_match_a_full_sort():
    rng = np.random.default_rng(1)
    similarity = rng.normal(size=(50, 40))
    relevant = [list(rng.choice(40, size=rng.integers(1, 4), replace=False)) for _ in range(50)]
    ranks = retrieval_ranks(similarity, relevant)
    for row, targets in enumerate(relevant):
        order = list(np.argsort(-similarity[row]))
        assert ranks[row] == min(order.index(t) for t in targets) + 1
    recalls = recall_at_k(ranks, (1, 5))
    assert recalls["R@1"] == np.mean(ranks == 1) and recalls["R@5"] == np.mean(ranks <= 5)


def test_retrieval_ties_rank_pessimistically():
    similarity = np.array([[1.0, 1.0, 0.0]])
    assert retrieval_ranks(similarity, [[0]])[0] == 2
