"""Metrics against plain reference computations on seeded random data."""

import numpy as np
import pytest
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


def test_report_intervals_match_pycocoevalcap_on_all_reports_and_on_a_resample():
    from pycocoevalcap.bleu.bleu import Bleu

    from medvl.eval.report import _corpus_bleu_4, metric_tokens, report_intervals, report_metrics

    references = ["Small left pleural effusion. No pneumothorax.", "Heart size is normal. Lungs are clear.",
                  "Right upper zone nodule measuring 8 mm.", "No acute cardiopulmonary abnormality.",
                  "Cardiomegaly. Moderate right effusion with blunting."]
    candidates = ["Left pleural effusion, small.", "Normal heart size; clear lungs.", "", "No acute abnormality.",
                  "Enlarged heart and a right effusion."]
    intervals = report_intervals(references, candidates, resamples=300, seed=1)
    expected = report_metrics(references, candidates)
    for key, interval in intervals.items():
        assert interval["value"] == pytest.approx(expected[key], abs=1e-12), key
        assert interval["low"] <= interval["value"] + 1e-12 and interval["high"] >= interval["value"] - 1e-12
        assert interval["resamples"] == 300
    index = np.array([4, 4, 0, 2, 1])  # a draw with repeats, scored the slow way
    tokens = [metric_tokens(t) for t in references], [metric_tokens(t) for t in candidates]  # "" scores nothing
    slow = Bleu(4).compute_score({k: [tokens[0][i]] for k, i in enumerate(index)},
                                 {k: [tokens[1][i]] for k, i in enumerate(index)}, verbose=0)[0][3]
    assert _corpus_bleu_4(*tokens)(index) == pytest.approx(slow, abs=1e-12)


def test_a_prediction_of_a_class_absent_from_the_truth_counts_as_an_error_without_a_warning():
    import warnings

    y_true = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])  # class 2: none
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's "y_pred contains classes not in y_true" would raise here
        metrics = classification_metrics(y_true, probabilities, ["a", "b", "c"])
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)  # recall 1/2 on a, 2/2 on b; c has no truth
    assert metrics["per_class"]["c"]["auc"] is None


def test_balanced_accuracy_of_a_one_class_split_matches_sklearn_without_a_warning():
    """A scored split of one class that the model predicts throughout made sklearn print "A single label was
    found in 'y_true' and 'y_pred'" on stderr, between the log lines. Balanced accuracy now comes from the
    confusion matrix, equal to sklearn's on seeded random data (classes absent from the truth or predicted
    nowhere included)."""
    import warnings

    one_class = np.zeros(6, dtype=int)
    probabilities = np.tile([0.9, 0.1], (6, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(one_class, probabilities, ["a", "b"])
    assert metrics["balanced_accuracy"] == 1.0 and metrics["accuracy"] == 1.0
    rng = np.random.default_rng(3)
    for _ in range(50):
        k = int(rng.integers(2, 6))
        y_true = rng.choice(rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False), size=40)
        logits = rng.normal(size=(40, k)) + np.eye(k)[y_true]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's own warnings on these draws
            expected = balanced_accuracy_score(y_true, logits.argmax(1))
        assert classification_metrics(y_true, logits, [str(c) for c in range(k)])["balanced_accuracy"] == \
            pytest.approx(expected, abs=1e-12)
