"""Binary operating points of the MedMNIST benchmark: prior re-weighting checked against data whose
class mix really is that prior, bootstrap intervals around the full-data figures."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cli_helpers import invoke
from medvl.bench.medmnist import _best_threshold, operating_points, prior_weighted_accuracy
from medvl.errors import InputError
from medvl.train.recipes import resolve_recipe


def _scores(n_pos: int, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array([1] * n_pos + [0] * n_neg)
    positive = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return np.stack([1 - positive, positive], axis=1), y


def _replicated(y: np.ndarray, *columns: np.ndarray, pos_copies: int, neg_copies: int):
    """The same records with positives repeated ``pos_copies`` times and negatives ``neg_copies``:
    a data set whose class mix is the re-weighted one."""
    repeat = np.where(y == 1, pos_copies, neg_copies)
    return (np.repeat(y, repeat), *(np.repeat(c, repeat, axis=0) for c in columns))


def test_prior_weighted_accuracy_is_the_accuracy_of_data_with_that_class_mix():
    probabilities, y = _scores(30, 20, seed=1)
    predicted = (probabilities[:, 1] >= 0.5).astype(int)
    # 30 positives x 1, 20 negatives x 9: 30 / 210 positives
    y_mix, predicted_mix = _replicated(y, predicted, pos_copies=1, neg_copies=9)
    assert prior_weighted_accuracy(y, predicted, 30 / 210) == pytest.approx((predicted_mix == y_mix).mean())
    assert prior_weighted_accuracy(y, predicted, 30 / 50) == pytest.approx((predicted == y).mean())


def test_threshold_for_a_prior_is_the_best_threshold_on_data_with_that_class_mix():
    probabilities, y = _scores(60, 20, seed=2)  # 75 % positives, like PneumoniaMNIST's train split
    y_mix, probabilities_mix = _replicated(y, probabilities, pos_copies=1, neg_copies=3)  # 50 %
    expected = _best_threshold(probabilities_mix, y_mix)
    chosen = _best_threshold(probabilities, y, prior=0.5)
    predicted_mix = (probabilities_mix[:, 1] >= chosen).astype(int)
    best_mix = (((probabilities_mix[:, 1] >= expected).astype(int)) == y_mix).mean()
    assert (predicted_mix == y_mix).mean() == pytest.approx(best_mix)  # as good as the best (ties allowed)
    assert _best_threshold(probabilities, y) != chosen  # the class mix matters on this data


def test_operating_points_report_full_data_figures_inside_bootstrap_intervals():
    calibration, calibration_y = _scores(150, 50, seed=3)
    scores, y = _scores(100, 60, seed=4)
    result = operating_points(calibration, calibration_y, scores, y, target_prior=0.625, resamples=300, seed=0)
    assert result["auc"]["value"] == pytest.approx(roc_auc_score(y, scores[:, 1]))
    assert result["scored_prior"] == pytest.approx(100 / 160) and result["calibration_prior"] == 0.75
    for name in ("max_accuracy", "max_accuracy_at_prior", "max_balanced_accuracy"):
        point = result[name]
        predicted = (scores[:, 1] >= point["threshold"]).astype(int)
        assert point["accuracy"]["value"] == pytest.approx((predicted == y).mean())
        assert point["sensitivity"]["value"] == pytest.approx(predicted[y == 1].mean())
        assert point["specificity"]["value"] == pytest.approx(1 - predicted[y == 0].mean())
        for metric in ("accuracy", "sensitivity", "specificity", "balanced_accuracy", "accuracy_at_prior"):
            figure = point[metric]
            assert figure["low"] <= figure["value"] <= figure["high"] and figure["high"] - figure["low"] < 0.3
    again = operating_points(calibration, calibration_y, scores, y, target_prior=0.625, resamples=300, seed=0)
    assert again == result  # seeded


def test_operating_point_intervals_are_the_plain_bootstrap_of_bench_run():
    """bench medmnist and bench run draw the same bootstrap (medvl.eval.bootstrap, the draws eval.subgroups.DRAWS
    names): accuracy over every plain draw, balanced accuracy over the plain draws holding both classes, AUC over
    draws stratified by class (it took the plain draws holding both classes: another interval); on a small split
    where some draws hold one class the two commands still give the same intervals for the same predictions."""
    from medvl.eval.bootstrap import bootstrap_ci
    from medvl.eval.subgroups import DRAWS, accuracy, balanced_accuracy, macro_auc

    calibration, calibration_y = _scores(30, 10, seed=3)
    scores, y = _scores(3, 11, seed=4)
    result = operating_points(calibration, calibration_y, scores, y, target_prior=0.5, resamples=300, seed=2)
    assert result["resamples"] == 300 and result["resamples_with_both_classes"] < 300
    auc = bootstrap_ci(macro_auc, y, scores, resamples=300, seed=2, **DRAWS["auc"])  # as bench run's auc row
    assert auc["resamples"] == 300
    assert result["auc"] == pytest.approx({key: auc[key] for key in ("value", "low", "high")})
    for name in ("max_accuracy", "max_balanced_accuracy"):
        predicted = np.eye(2)[(scores[:, 1] >= result[name]["threshold"]).astype(int)]
        plain = bootstrap_ci(accuracy, y, predicted, resamples=300, seed=2, need_both_classes=False)
        both = bootstrap_ci(balanced_accuracy, y, predicted, resamples=300, seed=2, stratified=False)
        assert result[name]["accuracy"] == pytest.approx({key: plain[key] for key in ("value", "low", "high")})
        assert result[name]["balanced_accuracy"] == pytest.approx({key: both[key] for key in ("value", "low", "high")})
        assert both["resamples"] == result["resamples_with_both_classes"]


def test_bad_priors_are_refused():
    scores, y = _scores(10, 10, seed=5)
    for prior in (0, 1, 1.5):
        with pytest.raises(InputError, match="prior"):
            operating_points(scores, y, scores, y, target_prior=prior)


def test_bench_medmnist_reports_operating_points_for_a_target_prior(tiny_npz, tmp_path):
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", tiny_npz,
                            "--test-split", "val", "--epochs", 1, "--ensemble", 1, "--target-prior", 0.625,
                            "--bootstrap", 200, "--json", tmp_path / "b.json", "-q")
    assert result.exit_code == 0, output
    saved = json.loads((tmp_path / "b.json").read_text())
    points = saved["operating_points"]
    assert points["target_prior"] == 0.625 and points["resamples"] == 200
    # the headline ACC is the recipe's operating point, scored on every record
    assert saved["operating_point"] == resolve_recipe("medmnist-small").operating_point
    assert points[saved["operating_point"]]["threshold"] == saved["threshold"]
    assert points[saved["operating_point"]]["accuracy"]["value"] == pytest.approx(saved["acc"])
    assert "max_balanced_accuracy" in output


def test_best_threshold_is_the_best_cut_of_the_calibration_data_every_record_positive_or_none_included():
    """Checked against every cut of the scores (each distinct score, or above them all): at a skewed prior, or for
    scores all under 0.5, calling every record positive (or none) can be the best; only 0.5 and the midpoints were
    tried, and the probe's ten records at prior 0.9 got threshold 0.225 (0.76) instead of every record (0.9)."""
    s = np.array([0.10, 0.15, 0.20, 0.25, 0.30, 0.32, 0.34, 0.36, 0.38, 0.40])
    y = np.array([1, 0, 0, 1, 0, 1, 0, 1, 0, 1])
    chosen = _best_threshold(np.stack([1 - s, s], 1), y, 0.9)
    assert (s >= chosen).all() and prior_weighted_accuracy(y, (s >= chosen).astype(int), 0.9) == pytest.approx(0.9)
    none = _best_threshold(np.stack([s, 1 - s], 1), 1 - y, 0.02)  # 1 - s reaches 0.9: none positive is best
    assert not (1 - s >= none).any()
    for seed in range(20):
        probabilities, labels = _scores(int(5 + seed), 12, seed=seed)
        cuts = np.append(np.unique(probabilities[:, 1]), np.inf)
        for prior in (None, 0.05, 0.5, 0.95):
            def accuracy(threshold, prior=prior, probabilities=probabilities, labels=labels):
                predicted = (probabilities[:, 1] >= threshold).astype(int)
                return (predicted == labels).mean() if prior is None else prior_weighted_accuracy(labels, predicted,
                                                                                                   prior)
            best = max(accuracy(cut) for cut in cuts)
            assert accuracy(_best_threshold(probabilities, labels, prior)) == pytest.approx(best)
