"""Calibration metrics against loop references on seeded random data; zero-shot calibration block."""

import math

import numpy as np
import pytest
import torch

import medvl
from cli_helpers import invoke, with_copied_films
from medvl.api import evaluate_zero_shot
from medvl.data import captions_for
from medvl.errors import InputError
from medvl.eval.calibration import (
    abstention_threshold,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    risk_coverage,
    softmax,
)
from medvl.train.loop import TrainConfig


def _random(seed, n=300, k=4, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * scale
    return logits, rng.integers(0, k, size=n)


def _generated(seed, n, k=3, sharpen=1.0):
    """Targets drawn from softmax(true logits); the model reports true logits * ``sharpen``."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, k)) * 2.0
    probs = softmax(true_logits)
    targets = np.array([rng.choice(k, p=row) for row in probs])
    return true_logits * sharpen, targets


def _reference_bins(probs, targets, bins):
    rows = []
    for b in range(bins):
        lower, upper = b / bins, (b + 1) / bins
        members = [i for i in range(len(probs))
                   if (lower < max(probs[i]) <= upper) or (b == 0 and max(probs[i]) == 0)]
        conf = [max(probs[i]) for i in members]
        hits = [float(int(np.argmax(probs[i])) == targets[i]) for i in members]
        rows.append((len(members), sum(conf) / len(conf) if conf else None, sum(hits) / len(hits) if hits else None))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reliability_and_ece_match_loops(seed):
    logits, targets = _random(seed)
    probs = softmax(logits)
    reference = _reference_bins(probs, targets, 10)
    table = reliability_bins(probs, targets, bins=10)
    for row, (count, conf, acc) in zip(table, reference, strict=True):
        assert row["count"] == count
        assert row["confidence"] == pytest.approx(conf) if conf is not None else row["confidence"] is None
        assert row["accuracy"] == pytest.approx(acc) if acc is not None else row["accuracy"] is None
    ece = sum(c * abs(a - f) for c, f, a in reference if c) / len(targets)
    assert expected_calibration_error(probs, targets, bins=10) == pytest.approx(ece)


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_and_nll_match_loops(seed):
    logits, targets = _random(seed, k=5)
    probs = softmax(logits)
    brier = sum(sum((probs[i, k] - (k == targets[i])) ** 2 for k in range(5)) for i in range(len(targets)))
    assert brier_score(probs, targets) == pytest.approx(brier / len(targets))
    nll = 0.0
    for i, row in enumerate(logits / 2.0):
        nll -= row[targets[i]] - math.log(sum(math.exp(v) for v in row))
    assert negative_log_likelihood(logits, targets, 2.0) == pytest.approx(nll / len(targets))


def test_brier_of_two_classes_is_twice_the_binary_score():
    """The documented convention (summed over the classes), against scikit-learn's binary ``brier_score_loss``."""
    from sklearn.metrics import brier_score_loss

    logits, targets = _random(2, k=2)
    probs = softmax(logits)
    assert brier_score(probs, targets) == pytest.approx(2 * brier_score_loss(targets, probs[:, 1]))
    assert brier_score(np.full((4, 2), 0.5), np.array([0, 1, 0, 1])) == pytest.approx(0.5)  # a 50/50 guess


def test_aurc_of_an_always_wrong_or_always_right_classifier():
    """The trapezoids from the first point gave an always-wrong classifier 1 - 1/N (0.75 here), or 1 when its
    confidences tie."""
    wrong = np.array([1, 1, 1, 1])
    for probs in ([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]], [[0.6, 0.4]] * 4):
        assert risk_coverage(np.array(probs), wrong)["aurc"] == pytest.approx(1.0)
        assert risk_coverage(np.array(probs), 1 - wrong)["aurc"] == pytest.approx(0.0)
    # one error among four, at the lowest confidence: risk 0, 0, 0, 1/4 at the four levels
    assert risk_coverage(np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]),
                         np.array([0, 0, 0, 1]))["aurc"] == pytest.approx(0.25 / 4)


@pytest.mark.parametrize("seed", [0, 3])
def test_risk_coverage_and_abstention_match_loops(seed):
    logits, targets = _random(seed, n=120, k=3, scale=1.5)
    probs = softmax(logits).round(2)  # rounding makes ties in confidence
    probs /= probs.sum(1, keepdims=True)
    confidence, correct = probs.max(1), probs.argmax(1) == targets
    thresholds = sorted(set(confidence.tolist()), reverse=True)
    coverage = [float((confidence >= t).mean()) for t in thresholds]
    risk = [float(1 - correct[confidence >= t].mean()) for t in thresholds]
    curve = risk_coverage(probs, targets)
    assert curve["threshold"] == pytest.approx(thresholds)
    assert curve["coverage"] == pytest.approx(coverage)
    assert curve["risk"] == pytest.approx(risk)
    # the mean selective risk over the N coverage levels, each record at its tie's level (Geifman & El-Yaniv)
    per_record = [float(1 - correct[confidence >= c].mean()) for c in confidence]
    assert curve["aurc"] == pytest.approx(sum(per_record) / len(per_record))
    for target in (0.0, 0.2, 0.4, 1.0):
        passing = [t for t, r in zip(thresholds, risk, strict=True) if r <= target]
        found = abstention_threshold(probs, targets, target)
        if not passing:
            assert found is None
        else:
            assert found["threshold"] == pytest.approx(min(passing))
            assert found["coverage"] == pytest.approx(float((confidence >= min(passing)).mean()))
            assert found["risk"] <= target


def test_temperature_matches_a_fine_grid_and_is_positive():
    logits, targets = _generated(4, 400, sharpen=3.0)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    best = grid[np.argmin([negative_log_likelihood(logits, targets, t) for t in grid])]
    temperature = fit_temperature(logits, targets)
    assert temperature > 0
    assert temperature == pytest.approx(best, rel=2e-3)


def test_temperature_scaling_of_overconfident_logits_helps_on_held_out_data():
    fit_logits, fit_targets = _generated(10, 1000, sharpen=5.0)
    test_logits, test_targets = _generated(11, 1000, sharpen=5.0)
    temperature = fit_temperature(fit_logits, fit_targets)
    assert 3.5 < temperature < 7.0
    before, after = softmax(test_logits), softmax(test_logits / temperature)
    assert expected_calibration_error(after, test_targets) < 0.5 * expected_calibration_error(before, test_targets)
    assert negative_log_likelihood(test_logits, test_targets, temperature) < negative_log_likelihood(
        test_logits, test_targets)
    assert brier_score(after, test_targets) < brier_score(before, test_targets)


def test_temperature_of_calibrated_logits_is_close_to_one():
    logits, targets = _generated(12, 3000, sharpen=1.0)
    assert fit_temperature(logits, targets) == pytest.approx(1.0, abs=0.12)


def test_a_temperature_fitted_at_the_end_of_its_search_range_is_said(caplog):
    """Two confidently wrong records push the NLL's optimum past T = 100: every probability came out near uniform
    and 'ECE after' fell by flattening, reported as a plain temperature without a word."""
    from medvl.eval.calibration import calibration_report

    scored, y_scored = _random(4, n=60, k=3)
    wrong = np.array([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0]]), np.array([1, 2])
    with caplog.at_level("WARNING"):
        block = calibration_report(*wrong, scored, y_scored)
    assert block["temperature"] == pytest.approx(100.0) and block["temperature_at_bound"] == "upper"
    assert "the temperature fitted on 2 records is 100, the upper end of its search range 0.01..100" in caplog.text
    right = np.array([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0]]), np.array([0, 1])  # separable: T wants to go to 0
    assert calibration_report(*right, scored, y_scored)["temperature_at_bound"] == "lower"
    caplog.clear()
    logits, targets = _random(5, n=200, k=3)
    with caplog.at_level("WARNING"):
        fitted = calibration_report(logits + 3 * np.eye(3)[targets], targets, scored, y_scored)
    assert fitted["temperature_at_bound"] is None and 0.01 < fitted["temperature"] < 100
    assert "search range" not in caplog.text


def test_the_abstention_threshold_is_chosen_on_the_calibration_records_not_the_scored_ones():
    """The threshold was the lowest confidence whose risk on the scored split's own labels was <= 0.1, then graded
    on those labels: tuned on the test set. It is now chosen on the calibration records and graded on the scored."""
    from medvl.eval.calibration import calibration_report

    fit_logits, fit_targets = _generated(20, 300, sharpen=1.0)
    logits, targets = _generated(21, 200, sharpen=1.0)
    block = calibration_report(fit_logits, fit_targets, logits, targets)
    temperature = block["temperature"]
    after, fit_after = softmax(logits / temperature), softmax(fit_logits / temperature)
    chosen = abstention_threshold(fit_after, fit_targets, 0.1)
    abstain = block["abstention_threshold_at_risk_0.1"]
    assert chosen is not None and abstain["threshold"] == pytest.approx(chosen["threshold"])
    assert abstain["chosen_on"] == "calibration" and abstain["n_chosen_on"] == 300 and abstain["reason"] is None
    assert (abstain["fit_coverage"], abstain["fit_risk"]) == pytest.approx((chosen["coverage"], chosen["risk"]))
    kept = after.max(1) >= chosen["threshold"]
    assert abstain["coverage"] == pytest.approx(kept.mean())
    assert abstain["risk"] == pytest.approx((after[kept].argmax(1) != targets[kept]).mean())
    assert abstain["threshold"] != pytest.approx(abstention_threshold(after, targets, 0.1)["threshold"])
    # calibration records on which no threshold reaches 10 % risk: none, with the reason, whatever the scored labels
    wrong = (fit_targets + 1) % 3
    none = calibration_report(fit_logits, wrong, logits, targets)["abstention_threshold_at_risk_0.1"]
    assert none["threshold"] is None and none["coverage"] is None and none["risk"] is None
    assert none["reason"] == "no confidence threshold keeps the selective risk <= 0.1 on the 300 calibration records"


def test_inputs_are_checked():
    probs, targets = softmax(np.zeros((4, 3))), np.array([0, 1, 2, 0])
    with pytest.raises(InputError, match="sum to 1"):
        brier_score(probs * 0.5, targets)
    with pytest.raises(InputError, match="targets must lie"):
        expected_calibration_error(probs, np.array([0, 1, 3, 0]))
    with pytest.raises(InputError, match="shape"):
        risk_coverage(probs, targets[:3])
    with pytest.raises(InputError, match="NaN"):
        fit_temperature(np.full((4, 3), np.nan), targets)
    with pytest.raises(InputError, match="integer"):
        reliability_bins(probs, targets.astype(float))
    with pytest.raises(InputError, match="target_risk"):
        abstention_threshold(probs, targets, 1.5)


@pytest.fixture(scope="module")
def phantom_model(phantom_dir, tmp_path_factory):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    config = TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=0)
    out = tmp_path_factory.mktemp("calibration") / "run"
    torch.manual_seed(0)
    medvl.train(medvl.create_model("phantom-tiny"), dataset, config, out, captions=captions_for(dataset),
                show_progress=False)
    return out / "model"


def test_zero_shot_calibration_block(phantom_model, phantom_dir):
    splits = medvl.load_dataset(phantom_dir).splits
    fit_split = "val" if "val" in splits else "train"
    result = evaluate_zero_shot(phantom_model, phantom_dir, "test", calibration_split=fit_split,
                                show_progress=False)
    block = result["calibration"]
    assert "logits" not in result and "y_true" not in result
    assert block["split"] == fit_split and block["n"] == result["n"]
    assert block["temperature"] > 0
    for key in ("ece_before", "ece_after", "brier_before", "brier_after"):
        assert 0 <= block[key] <= 2
    assert block["nll_before"] >= 0 and block["nll_after"] >= 0
    for when in ("before", "after"):
        assert sum(b["count"] for b in block["reliability"][when]) == result["n"]
    curve = block["risk_coverage"]
    assert curve["coverage"][-1] == pytest.approx(1.0)
    assert curve["risk"][-1] == pytest.approx(1 - result["accuracy"])
    assert 0 <= curve["aurc"] <= 1
    abstain = block["abstention_threshold_at_risk_0.1"]
    assert abstain["chosen_on"] == "calibration" and abstain["n_chosen_on"] == block["n_fit"]
    assert abstain["threshold"] is None or (abstain["fit_risk"] <= 0.1 and 0 <= abstain["coverage"] <= 1)
    with pytest.raises(InputError, match="different split"):
        evaluate_zero_shot(phantom_model, phantom_dir, "test", calibration_split="test", show_progress=False)
    # the table names the Brier form: with two classes it is twice the binary figure papers give
    _, output = invoke("eval", "zero-shot", "--model", phantom_model, "--data", phantom_dir, "--split", "test",
                       "--calibration-split", fit_split, "-q")
    rows = [[cell.strip() for cell in line.split("│") if cell.strip()] for line in output.splitlines()
            if "Brier" in line]
    assert [name for name, _ in rows] == ["Brier (sum over classes) before", "Brier (sum over classes) after"]
    assert [float(value) for _, value in rows] == pytest.approx([block["brier_before"], block["brier_after"]],
                                                                abs=5e-4)
    with pytest.raises(InputError, match=r"--calibration-split 'all' holds \d+ images of the evaluated split 'test'"):
        evaluate_zero_shot(phantom_model, phantom_dir, "test", calibration_split="all", show_progress=False)


def test_bad_classes_in_the_scored_or_the_calibration_split_are_refused_before_any_image_is_embedded(
        phantom_dir, tmp_path):
    """The checks come before the model is even loaded: a model path that does not exist is never reached."""
    import csv

    rows = list(csv.DictReader((phantom_dir / "manifest.csv").open()))
    test = [r for r in rows if r["split"] == "test"]
    one_class = [dict(r, finding="cardiomegaly") for r in test]  # a scored split of one class
    val = [dict(r, split="val", finding="") for r in rows if r["split"] == "train"][:6]  # a split without labels
    for name, manifest_rows in (("one", one_class), ("other", test + val)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "images").symlink_to(phantom_dir / "images")
        with (folder / "manifest.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(manifest_rows)
    with pytest.raises(InputError, match=r"label 'finding' needs at least 2 classes, got \['cardiomegaly'\]"):
        evaluate_zero_shot(tmp_path / "no-model", tmp_path / "one", "test", label_columns=["finding"],
                           allow_outside_root=True)  # the images are the phantom's, linked
    with pytest.raises(InputError, match=r"no records with label 'finding'"):
        evaluate_zero_shot(tmp_path / "no-model", tmp_path / "other", "test", label_columns=["finding"],
                           calibration_split="val", allow_outside_root=True)


def test_a_calibration_split_lacking_classes_is_named_as_such_not_as_the_scored_split(phantom_model, phantom_dir,
                                                                                        tmp_path, caplog):
    """A calibration split holding 2 classes of the label used to warn that the others "have no scored record",
    as if the evaluated split lacked them; the warning now names the calibration split, and the scored split,
    which holds every class, gets none."""
    import csv
    import logging

    rows = list(csv.DictReader((phantom_dir / "manifest.csv").open()))
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    kept = sorted({r["finding"] for r in train})[:2]
    val = [dict(r, split="val") for r in train if r["finding"] in kept][:6]
    classes = {r["finding"] for r in test}
    assert {r["finding"] for r in val} == set(kept) and len(classes) > 2
    (tmp_path / "images").symlink_to(phantom_dir / "images")
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(test + val)
    with caplog.at_level(logging.WARNING, logger="medvl.eval.zero_shot"):
        result = evaluate_zero_shot(phantom_model, tmp_path, "test", label_columns=["finding"],
                                    calibration_split="val", allow_outside_root=True, show_progress=False)
    assert "classes_absent" not in result and result["calibration"]["n_fit"] == len(val)
    assert "no scored record" not in caplog.text
    absent = len(classes) - 2
    assert (f"the calibration split 'val' has no record of {absent} of the {len(classes)} classes of 'finding': "
            "the temperature is fitted without them") in caplog.text


def test_cli_prints_the_calibration_table(phantom_model, phantom_dir):
    from cli_helpers import invoke

    fit_split = "val" if "val" in medvl.load_dataset(phantom_dir).splits else "train"
    result, output = invoke("eval", "zero-shot", "--model", phantom_model, "--data", phantom_dir,
                            "--calibration-split", fit_split, "--quiet")
    assert result.exit_code == 0, output
    assert "ECE before" in output and "temperature" in output
    assert f"abstain below (risk <= 0.1 on {fit_split})" in output and "coverage kept on test" in output
    refused, output = invoke("eval", "zero-shot", "--model", phantom_model, "--data", phantom_dir,
                             "--calibration-split", "test", "--quiet")
    assert refused.exit_code == 2 and "different split" in output


def test_a_class_named_twice_is_scored_once(phantom_model, phantom_dir):
    from medvl.eval import zero_shot
    from medvl.models.registry import load_model

    net, test = load_model(phantom_model), medvl.load_dataset(phantom_dir).select("test")
    classes = test.classes("finding")
    once = zero_shot(net, test, "finding", classes=classes, show_progress=False, keep_scores=True)
    twice = zero_shot(net, test, "finding", classes=classes + classes[:2], show_progress=False, keep_scores=True)
    assert twice["classes"] == classes  # not a softmax over the repeated names
    np.testing.assert_allclose(twice["probabilities"], once["probabilities"], atol=1e-6)


def test_calibration_images_that_copy_scored_images_are_reported(phantom_model, phantom_dir, tmp_path):
    """Two calibration rows whose films are renamed copies of test films: not the same file, so not refused;
    counted in the calibration block."""
    fit_split = "val" if "val" in medvl.load_dataset(phantom_dir).splits else "train"
    data, n_test = with_copied_films(phantom_dir, tmp_path / "data", "test", fit_split, 2)
    result = evaluate_zero_shot(phantom_model, data, "test", calibration_split=fit_split, show_progress=False)
    assert result["calibration"]["copies_in_fit"] == {"records": 2, "of": n_test,
                                                      "fit": f"the calibration split {fit_split!r}"}
    plain = evaluate_zero_shot(phantom_model, phantom_dir, "test", calibration_split=fit_split, show_progress=False)
    assert "copies_in_fit" not in plain["calibration"]


def test_the_risk_coverage_area_is_reported_before_and_after_scaling():
    """With three classes a temperature can reorder records by confidence: the area after scaling (what the abstention
    threshold applies to) is not the model's own; both are reported, ``aurc_before`` from the unscaled scores."""
    from medvl.eval.calibration import calibration_report, softmax

    # record 0 right with a close runner-up, record 1 wrong and more confident unscaled: the temperature (100, at its
    # bound) flattens record 1's lead more, so the right record comes first after scaling
    logits = np.array([[3.0, 2.7, -4.0], [1.5, 0.2, 0.0]])
    targets = np.array([0, 1])
    fit_logits = np.array([[1.0, 0.9, 0.8], [0.2, 1.0, 0.1], [0.1, 0.3, 1.0]])
    fit_targets = np.array([1, 0, 0])
    block = calibration_report(fit_logits, fit_targets, logits, targets)
    before = risk_coverage(softmax(logits), targets)["aurc"]
    after = risk_coverage(softmax(logits / block["temperature"]), targets)["aurc"]
    assert block["risk_coverage"]["aurc_before"] == pytest.approx(before) == pytest.approx(0.75)
    assert block["risk_coverage"]["aurc"] == pytest.approx(after) == pytest.approx(0.25)
