"""Metrics against plain reference computations on seeded random data."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medvl.errors import InputError
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


def test_report_intervals_by_case_match_a_written_out_cluster_bootstrap_and_without_cases_are_unchanged():
    """Several reports of one case are not independent: with ``groups`` (a case id per report) whole cases are
    drawn (each draw: as many cases as there are, with replacement, each with all its reports), checked against
    such a bootstrap written out here and scored the slow way (``report_metrics`` on each draw's reports); without
    them the draws are the plain per-report ones of before. On cases whose reports are all right or all wrong the
    by-case intervals are wider."""
    from medvl.eval.report import report_intervals, report_metrics
    from medvl.rag import ReportLabeller

    labeller = ReportLabeller()  # read once: the scoring of each draw below is the slow part
    right = [("Small left pleural effusion.", "Small left pleural effusion."),
             ("Cardiomegaly with a right effusion.", "Cardiomegaly with a right effusion."),
             ("Heart size is normal. Lungs are clear.", "Heart size is normal. Lungs are clear.")]
    wrong = [("Right upper zone nodule.", "No acute abnormality."), ("Left pneumothorax.", "Heart size is normal."),
             ("Large right effusion.", "Lungs are clear.")]
    pairs = right * 2 + wrong * 2 + right[:1] + wrong[:1]
    references, candidates = [r for r, _ in pairs], [c for _, c in pairs]
    cases = ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3 + ["e", "f"]  # a, b right; c, d wrong
    keys = ("bleu_4", "rouge_l", "micro_f1", "macro_f1")

    def written_out(units: list[str] | None) -> dict[str, tuple[float, float]]:
        rng = np.random.default_rng(7)
        order = list(dict.fromkeys(units or range(len(pairs))))
        members = [[i for i, unit in enumerate(units or range(len(pairs))) if unit == name] for name in order]
        values: dict[str, list[float]] = {key: [] for key in keys}
        for _ in range(60):
            drawn = ([i for g in rng.integers(0, len(order), len(order)) for i in members[g]] if units
                     else list(rng.integers(0, len(pairs), len(pairs))))
            scores = report_metrics([references[i] for i in drawn], [candidates[i] for i in drawn], labeller)
            for key in keys:
                values[key].append(scores[key])
        return {key: tuple(np.percentile(values[key], [2.5, 97.5])) for key in keys}

    by_case = report_intervals(references, candidates, resamples=60, seed=7, labeller=labeller, groups=cases)
    by_report = report_intervals(references, candidates, resamples=60, seed=7, labeller=labeller)
    for intervals, units in ((by_case, cases), (by_report, None)):
        expected = written_out(units)
        for key in keys:
            assert (intervals[key]["low"], intervals[key]["high"]) == pytest.approx(expected[key], abs=1e-12), key
    for key in ("rouge_l", "micro_f1", "cider"):
        assert by_case[key]["value"] == by_report[key]["value"]
        assert by_case[key]["high"] - by_case[key]["low"] > by_report[key]["high"] - by_report[key]["low"], key
    with pytest.raises(InputError, match="one id per record"):
        report_intervals(references, candidates, resamples=10, groups=cases[:-1])


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
