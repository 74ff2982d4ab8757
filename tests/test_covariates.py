"""Patient covariates fused with image classifiers: the encoding, the fusion, and the commands that use it
(``medvl train --train-set covariates=...``, ``medvl eval linear-probe``, ``medvl bench cv``, ``medvl bench run``)
on real ISIC images with their real age and sex."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logit
from sklearn.metrics import roc_auc_score

from cli_helpers import invoke, isic_rows, write_manifest
from medvl.data.record import Record
from medvl.errors import InputError
from medvl.eval.covariates import CovariateEncoder, CovariateModel, fuse_probabilities, parse_columns


def _record(i, **meta):
    return Record(id=f"r{i}", images=[], meta=meta)


def test_encoder_numeric_and_categorical_columns_with_missing_values():
    records = [_record(0, age="30", sex="female"), _record(1, age="50", sex="male"),
               _record(2, age="", sex="unknown"), _record(3, age=None, sex="male")]
    encoder = CovariateEncoder.fit(records, ["age", "sex"])
    assert encoder.numeric == {"age": (40.0, 10.0)} and encoder.categories == {"sex": ["female", "male"]}
    assert encoder.missing_share == {"age": 0.5, "sex": 0.25}
    x = encoder.transform(records + [_record(4, age="nan", sex="other"), _record(5)])
    assert x.tolist() == [[-1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0], [0, 1, 0, 1],
                          [0, 1, 0, 0],  # "nan" missing, an unseen category sets no indicator
                          [0, 1, 0, 0]]
    assert encoder.describe()["sex"] == {"kind": "categorical", "missing_share": 0.25, "values": ["female", "male"]}


def test_a_column_no_record_has_is_refused_with_its_name():
    records = [_record(0, age="30"), _record(1, age="")]
    with pytest.raises(InputError, match=r"train.csv: no record has a value for covariate column 'sex'.*age"):
        CovariateEncoder.fit(records, ["age", "sex"], "train.csv")


def test_a_column_of_free_text_or_ids_is_not_a_covariate():
    records = [_record(i, note=f"patient {i} says ...") for i in range(25)]
    with pytest.raises(InputError, match=r"notes.csv: covariate column 'note' has 25 distinct non-numeric values"):
        CovariateEncoder.fit(records, ["note"], "notes.csv")


def test_a_small_column_of_one_off_notes_is_not_a_covariate():
    """Fewer notes than the category limit, but each of one record: free text all the same, refused."""
    records = [_record(i, note=f"pt {i} reports itching") for i in range(12)]
    with pytest.raises(InputError, match=r"'note' has 12 distinct non-numeric values, 12 of them in one record"):
        CovariateEncoder.fit(records, ["note"], "notes.csv")
    few = [_record(i, site=["head", "trunk", "arm", "leg"][i % 4]) for i in range(12)]  # shared values: a category
    assert CovariateEncoder.fit(few, ["site"]).categories == {"site": ["arm", "head", "leg", "trunk"]}


def _labelled(i, label, **meta):
    return Record(id=f"r{i}", images=[], labels={"benign_malignant": label}, meta=meta)


def test_a_covariate_that_is_or_restates_the_label_is_refused():
    """The label itself, a category that maps one to one on the classes (ISIC's diagnosis beside
    benign_malignant), or a number whose ranges per class do not overlap would read the answer back."""
    from medvl.eval.covariates import check_not_label

    rng = np.random.default_rng(0)
    targets = ["malignant" if i % 3 == 0 else "benign" for i in range(60)]
    records = [_labelled(i, t, diagnosis="melanoma" if t == "malignant" else "nevus",
                         score=str(0.9 if t == "malignant" else 0.1 + rng.uniform(0, 0.3)),
                         age=str(int(rng.integers(20, 80))), sex=["female", "male"][i % 2])
               for i, t in enumerate(targets)]
    y = np.array([int(t == "malignant") for t in targets])
    with pytest.raises(InputError, match="'benign_malignant' is the label column"):
        check_not_label(records, ["age", "benign_malignant"], ["benign_malignant"], "isic.csv")
    for column in ("diagnosis", "score"):
        with pytest.raises(InputError, match=rf"isic.csv: covariate column '{column}' separates the classes"):
            CovariateModel.fit(records, y, 2, ["age", column], "isic.csv", label="benign_malignant")
    CovariateModel.fit(records, y, 2, ["age", "sex"], "isic.csv", label="benign_malignant")  # no leak: fits
    # below LEAK_MIN_RECORDS records a clean split can be chance: not refused
    check_not_label(records[:12], ["diagnosis"], ["benign_malignant"], "isic.csv")


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "1.7e308"])
def test_an_infinite_or_absurd_number_is_refused_naming_the_column(value):
    """Not turned into a category (inf) nor overflowing the standardisation (1.7e308): one clear error."""
    records = [_record(i, age=str(30 + i)) for i in range(10)] + [_record(10, age=value)]
    with pytest.raises(InputError, match=r"ages.csv: covariate column 'age' has a value that is not a finite number"):
        CovariateEncoder.fit(records, ["age"], "ages.csv")
    encoder = CovariateEncoder.fit(records[:10], ["age"], "ages.csv")  # in a scored record: the same error
    with pytest.raises(InputError, match=r"scored records: covariate column 'age'"):
        encoder.transform(records[10:])


def test_a_column_of_one_value_is_kept_with_a_warning(caplog):
    records = [_record(i, sex="female", age="50") for i in range(6)]
    with caplog.at_level("WARNING"):
        encoder = CovariateEncoder.fit(records, ["sex", "age"], "one.csv")
    assert encoder.categories == {"sex": ["female"]} and encoder.numeric == {"age": (50.0, 1.0)}
    assert caplog.text.count("has one value in every training record") == 2 and "female" not in caplog.text


def test_a_column_of_distinct_whole_numbers_is_kept_with_a_warning_that_it_looks_like_ids(caplog):
    rng = np.random.default_rng(0)
    rows = [_record(i, row=str(1000 + 7 * i), age=str(int(rng.integers(20, 80))), size=f"{rng.uniform(1, 9):.3f}")
            for i in range(25)]
    with caplog.at_level("WARNING"):
        encoder = CovariateEncoder.fit(rows, ["row", "age", "size"], "ids.csv")
    assert set(encoder.numeric) == {"row", "age", "size"}  # kept: a fine measurement can look the same
    assert "ids.csv: covariate column 'row' has its own whole number in every one of the 25 training records" \
        in caplog.text
    assert caplog.text.count("looks like an identifier") == 1  # not the repeating ages, not the fractional sizes
    caplog.clear()
    with caplog.at_level("WARNING"):
        CovariateEncoder.fit(rows[:19], ["row"], "few.csv")  # too few records to tell an id from chance
    assert "identifier" not in caplog.text


def test_train_config_checks_its_covariates_as_the_option_does():
    from medvl.train.loop import TrainConfig

    config = TrainConfig(covariates=[" sex", "age_approx"])
    config.validate()
    assert config.covariates == ["sex", "age_approx"]
    for bad, message in ((["sex", "sex"], "given more than once"), (["none", "sex"], "cannot be combined"),
                         ([1], "covariates must be a list of column names"), ("sex", "must be a list"),
                         (None, "must be a list")):
        with pytest.raises(InputError, match=message):
            TrainConfig(covariates=bad).validate()


def test_values_training_never_had_are_reported_as_unseen():
    """A category only the scored records have (a split column, a new site) counts as missing, and says so."""
    train = [_record(i, sex=["female", "male"][i % 2]) for i in range(8)]
    model = CovariateModel.fit(train, np.array([i % 2 for i in range(8)]), 2, ["sex"])
    scored = [_record(10, sex="other"), _record(11, sex="female"), _record(12), _record(13, sex="other")]
    described = model.describe(scored)["columns"]["sex"]
    assert described["missing_share_scored"] == 0.25 and described["unseen_share_scored"] == 0.5
    assert np.allclose(model.probabilities(scored[:1]), model.probabilities(scored[2:3]))  # unseen = missing


def test_a_number_outside_the_training_range_is_clipped_to_it_and_counted():
    """An age of 700 or -5 (a typo), scored by a model fitted on ages 20-80, is scored as 80 or 20: the linear
    model does not extrapolate it into a certainty, and the scored share outside the range is reported."""
    rng = np.random.default_rng(0)
    ages = rng.uniform(20, 80, 200)
    y = (rng.random(200) < 1 / (1 + np.exp(-(ages - 50) / 5))).astype(int)
    train = [_record(i, age=f"{age:.1f}") for i, age in enumerate(ages)]
    model = CovariateModel.fit(train, y, 2, ["age"])
    low, high = model.encoder.bounds["age"]
    assert low == pytest.approx(ages.min(), abs=0.05) and high == pytest.approx(ages.max(), abs=0.05)
    edge = [_record(0, age=f"{low}"), _record(1, age=f"{high}")]
    odd = [_record(2, age="-5"), _record(3, age="700")]
    assert np.allclose(model.probabilities(odd), model.probabilities(edge))
    assert model.probabilities(odd)[1, 1] < 0.999  # unclipped, 700 would be certain
    described = model.describe(odd + edge + [_record(4), _record(5, age="50")])["columns"]["age"]
    assert described["out_of_range_share_scored"] == pytest.approx(2 / 6, abs=1e-4)
    assert described["range"] == [round(low, 4), round(high, 4)]


def test_parse_columns():
    assert parse_columns("age_approx, sex") == ["age_approx", "sex"]
    assert parse_columns("none") == [] and parse_columns("") == [] and parse_columns(None) == []
    with pytest.raises(InputError, match=r"covariate column\(s\) sex given more than once: sex, age, sex"):
        parse_columns("sex,age,sex")
    with pytest.raises(InputError, match="'none' .the image alone. cannot be combined with column names"):
        parse_columns("none,sex")


def test_binary_fusion_is_the_sum_of_logits_minus_the_prior():
    image = np.array([[0.8, 0.2], [0.3, 0.7]])
    covariates = np.array([[0.6, 0.4], [0.1, 0.9]])
    prior = np.array([0.7, 0.3])
    fused = fuse_probabilities(image, covariates, prior)
    expected = logit(image[:, 1]) + logit(covariates[:, 1]) - logit(prior[1])
    assert np.allclose(logit(fused[:, 1]), expected)
    assert np.allclose(fused.sum(axis=1), 1)
    # covariates that say only the prior leave the image's probabilities as they were
    assert np.allclose(fuse_probabilities(image, np.tile(prior, (2, 1)), prior), image)


def test_a_class_the_image_classifier_never_saw_keeps_zero():
    image = np.array([[0.6, 0.0, 0.4], [0.2, 0.0, 0.8]])
    fused = fuse_probabilities(image, np.full((2, 3), 1 / 3), np.array([0.5, 0.0, 0.5]))
    assert fused[:, 1].tolist() == [0.0, 0.0] and np.allclose(fused.sum(axis=1), 1)


def test_fusion_adds_an_independent_covariate_signal():
    """A weak image score and an age that both carry the class: fused AUC beats either alone; shuffled ages
    (no signal) do not help."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    image_score = 1 / (1 + np.exp(-(y - 0.5) * 1.2 - rng.normal(0, 1, 600)))
    ages = 40 + 15 * y + rng.normal(0, 12, 600)
    records = [_record(i, age=f"{a:.0f}") for i, a in enumerate(ages)]
    train, test = slice(0, 300), slice(300, 600)
    model = CovariateModel.fit(records[train], y[train], 2, ["age"])
    image = np.stack([1 - image_score, image_score], axis=1)[test]
    fused = model.fuse(image, records[test])
    auc_image, auc_fused = roc_auc_score(y[test], image[:, 1]), roc_auc_score(y[test], fused[:, 1])
    auc_age = roc_auc_score(y[test], model.probabilities(records[test])[:, 1])
    assert auc_fused > max(auc_image, auc_age) + 0.03
    shuffled = [_record(i, age=r.meta["age"]) for i, r in enumerate(rng.permutation(records))]
    noise = CovariateModel.fit(shuffled[train], y[train], 2, ["age"]).fuse(image, shuffled[test])
    assert roc_auc_score(y[test], noise[:, 1]) < auc_image + 0.02


@pytest.fixture(scope="module")
def isic_with_age(shared_data, tmp_path_factory):
    """60 real ISIC images (30 nevus, 30 melanoma; 40 train, 20 test) with their real age and sex."""
    chosen = isic_rows(shared_data, "nevus")[:30] + isic_rows(shared_data, "melanoma")[:30]
    return write_manifest(tmp_path_factory.mktemp("isic-age") / "manifest.csv",
                          ["image", "split", "diagnosis", "age_approx", "sex"],
                          [[row["path"], "test" if i % 3 == 0 else "train", row["diagnosis"], row["age_approx"],
                            row["sex"]] for i, row in enumerate(chosen)])


@pytest.fixture(scope="module")
def model_with_covariates(isic_with_age, tmp_path_factory):
    out = tmp_path_factory.mktemp("covariate-model") / "run"
    result, output = invoke("train", "--allow-outside-root", "--data", isic_with_age, "--model", "phantom-tiny",
                            "--epochs", 1, "--batch-size", 8, "--label-column", "diagnosis",
                            "--train-set", 'covariates=["age_approx", "sex"]', "--out", out, "-q")
    assert result.exit_code == 0, output
    return out / "model"


def test_the_model_remembers_its_covariates_and_the_probe_fuses_them(model_with_covariates, isic_with_age, tmp_path):
    meta = json.loads((model_with_covariates / "meta.json").read_text())
    assert meta["covariates"] == ["age_approx", "sex"]
    common = ("eval", "linear-probe", "--allow-outside-root", "--model", model_with_covariates, "--train-data",
              isic_with_age, "--test-data", isic_with_age, "--label-column", "diagnosis", "--few-shot", "4", "-q")
    result, output = invoke(*common, "--json", tmp_path / "fused.json")
    assert result.exit_code == 0, output
    assert "image + age_approx, sex" in output and "covariates only" in output
    fused = json.loads((tmp_path / "fused.json").read_text())
    # the few-shot probe scores the image alone: its row and its JSON entry say so beside the fused headline
    assert "4-shot auc (image only)" in output and fused["few_shot"]["4"]["image_only"] is True
    assert fused["covariates"]["columns"]["age_approx"]["kind"] == "numeric"
    assert fused["covariates"]["columns"]["sex"]["values"] == ["female", "male"]
    assert 0 <= fused["covariates"]["auc"] <= 1
    result, output = invoke(*common, "--covariates", "none", "--json", tmp_path / "image.json")
    assert result.exit_code == 0, output
    plain = json.loads((tmp_path / "image.json").read_text())
    assert "covariates" not in plain and "image_only" not in plain
    assert "image_only" not in plain["few_shot"]["4"] and "(image only)" not in output  # every row is the image's
    assert plain["few_shot"]["4"]["auc_mean"] == pytest.approx(fused["few_shot"]["4"]["auc_mean"])
    # the fused run's image-only figures are the plain probe's, the headline is the fusion
    assert fused["image_only"]["auc"] == pytest.approx(plain["auc"])
    assert fused["auc"] != pytest.approx(plain["auc"])


def test_an_unknown_covariate_column_fails_before_training(isic_with_age, tmp_path):
    result, output = invoke("train", "--allow-outside-root", "--data", isic_with_age, "--model", "phantom-tiny",
                            "--epochs", 1, "--label-column", "diagnosis", "--train-set", 'covariates=["weight"]',
                            "--out", tmp_path / "run", "-q")
    assert result.exit_code == 2
    assert "covariate column 'weight'" in output and "age_approx" in output and "Traceback" not in output
    assert not (tmp_path / "run").exists()


def test_bench_cv_reports_fused_and_image_only_figures(isic_with_age, tmp_path):
    out = tmp_path / "cv.json"
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_with_age, "--label-column",
                            "diagnosis", "--model", "phantom-tiny", "--folds", 2, "--epochs", 1, "--batch-size", 16,
                            "--covariates", "age_approx,sex", "--json", out, "-q")
    assert result.exit_code == 0, output
    assert "auc + covariates (age_approx, sex)" in output and "covariates-only auc" in output
    metrics = json.loads(out.read_text())
    assert metrics["covariates"] == ["age_approx", "sex"] and metrics["train"]["covariates"] == ["age_approx", "sex"]
    for key in ("fused_auc", "probe_fused_auc", "covariates_auc", "fused_auc_pooled", "auc", "probe_auc"):
        assert 0 <= metrics[key] <= 1, key
    fold = metrics["folds"][0]
    assert len(fold["fused_probabilities"]) == fold["n_test"] and fold["fused_auc"] != fold["auc"]


def test_bench_cv_checks_every_folds_training_records_before_training(isic_with_age, tmp_path):
    """A column with one value in the file: some fold's training records have none, named before any training."""
    with isic_with_age.open(newline="") as handle:
        rows = list(csv.reader(handle))
    manifest = write_manifest(tmp_path / "bmi.csv", [*rows[0], "bmi"],
                              [[*row, "24.5" if i == 0 else ""] for i, row in enumerate(rows[1:])])
    out = tmp_path / "cv.json"
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", manifest, "--label-column", "diagnosis",
                            "--model", "phantom-tiny", "--folds", 2, "--epochs", 1, "--covariates", "bmi",
                            "--json", out)
    assert result.exit_code == 2, output
    message = " ".join(output.split())
    assert re.search(r"bmi.csv \(fold [12] training records\): no record has a value for covariate column 'bmi'",
                     message), message
    assert not out.exists()


def test_scored_records_without_covariates_keep_the_image_ranking(model_with_covariates, isic_with_age, tmp_path,
                                                                   caplog):
    """Test images with no age and a sex training never saw: the covariate model says the same for each, so the
    fused AUC is the image probe's exactly, and the log says so per column (names only, no value)."""
    from medvl.data import load_dataset
    from medvl.eval.linear_probe import linear_probe
    from medvl.models.registry import load_model

    dataset = load_dataset(isic_with_age, allow_outside_root=True)
    train, held_out = dataset.select("train"), dataset.select("test")  # held_out: the calibration records
    # no age, and a sex value training never had (it counts as missing): every test record alike
    bare = dataset.subset([Record(id=r.id, images=r.images, labels={"diagnosis": r.labels["diagnosis"]},
                                  meta={"sex": "other"}, split=r.split) for r in held_out])
    with caplog.at_level("WARNING"):
        result = linear_probe(load_model(model_with_covariates), train, bare, "diagnosis", few_shot=(),
                              show_progress=False, covariates=["age_approx", "sex"], calibration_data=held_out)
    assert result["covariates"]["columns"]["age_approx"]["missing_share_scored"] == 1.0
    assert result["covariates"]["columns"]["sex"]["unseen_share_scored"] == 1.0
    assert "covariate column 'sex' has no value in the 20 scored records that the training records had" in caplog.text
    assert "other" not in caplog.text
    assert result["auc"] == pytest.approx(result["image_only"]["auc"])
    # the calibration records have age and sex: their probabilities are the image probe's fused with them
    plain = linear_probe(load_model(model_with_covariates), train, bare, "diagnosis", few_shot=(),
                         show_progress=False, calibration_data=held_out)
    y_train = np.array([result["classes"].index(r.labels["diagnosis"]) for r in train])
    covariates = CovariateModel.fit(train.records, y_train, 2, ["age_approx", "sex"])
    image = np.array(plain["calibration"]["probabilities"])
    expected = fuse_probabilities(image, covariates.probabilities(held_out.records), covariates.prior)
    calibration = np.array(result["calibration"]["probabilities"])
    assert np.allclose(calibration, expected) and not np.allclose(calibration, image, atol=1e-3)
    assert "covariate column 'age_approx' is missing in all 20 scored records" in caplog.text


def test_the_recipes_covariates_are_left_out_on_data_without_them(isic_with_age, shared_data, tmp_path, caplog):
    """derm-small's recipe fuses age and sex; on dermoscopy data without them it trains on the image alone
    (with a warning naming the columns), while the same columns given as an option are required."""
    from medvl.data import load_dataset
    from medvl.train.recipes import covariates_for, resolve_recipe

    rows = isic_rows(shared_data, "nevus")[:3] + isic_rows(shared_data, "melanoma")[:3]
    bare = load_dataset(write_manifest(tmp_path / "bare.csv", ["image", "diagnosis"],
                                       [[r["path"], r["diagnosis"]] for r in rows]), allow_outside_root=True)
    recipe = resolve_recipe("derm-small")
    assert covariates_for(load_dataset(isic_with_age, allow_outside_root=True), recipe) == ["age_approx", "sex"]
    with caplog.at_level("WARNING"):
        assert covariates_for(bare, recipe) == []
    assert "covariate column(s) age_approx, sex" in caplog.text
    with pytest.raises(InputError, match="no record has a value for covariate column 'age_approx'"):
        covariates_for(bare, resolve_recipe("derm-small", covariates=["age_approx", "sex"]))


def test_a_recipe_covariate_that_is_the_runs_label_column_is_left_out_with_a_warning(isic_with_age, tmp_path,
                                                                                    caplog):
    """``medvl train --model derm-small -l sex`` was refused ("'sex' is the label column; it cannot also be a
    covariate") although the user named no covariate: the recipe's. It is left out, with a warning naming the
    recipe; the same column given as an option is still refused."""
    result, output = invoke("train", "--allow-outside-root", "--data", isic_with_age, "--model", "derm-small",
                            "--max-steps", 1, "-l", "sex", "--out", tmp_path / "run", "-q")
    assert result.exit_code == 0, output
    assert "the derm-small recipe's covariate(s) sex are label columns of this run, so they are left out" in \
        " ".join((output + caplog.text).split())
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]["covariates"] == ["age_approx"]
    assert json.loads((tmp_path / "run" / "model" / "meta.json").read_text())["covariates"] == ["age_approx"]
    result, output = invoke("train", "--allow-outside-root", "--data", isic_with_age, "--model", "derm-small",
                            "--max-steps", 1, "-l", "sex", "--train-set", 'covariates=["sex"]',
                            "--out", tmp_path / "given", "-q")
    assert result.exit_code == 2 and "'sex' is the label column; it cannot also be a covariate" in output


def test_the_probe_leaves_out_the_models_covariates_the_training_data_lacks(model_with_covariates, shared_data,
                                                                            tmp_path):
    """A model trained to fuse age and sex, probed on images without them: the image alone, with a warning;
    the same columns asked for explicitly are an error (exit 2) naming the column."""
    rows = isic_rows(shared_data, "nevus")[40:48] + isic_rows(shared_data, "melanoma")[40:48]
    bare = write_manifest(tmp_path / "bare.csv", ["image", "split", "diagnosis"],
                          [[r["path"], "test" if i % 2 else "train", r["diagnosis"]] for i, r in enumerate(rows)])
    common = ("eval", "linear-probe", "--allow-outside-root", "--model", model_with_covariates, "--train-data", bare,
              "--test-data", bare, "--label-column", "diagnosis", "--few-shot", "2")
    result, output = invoke(*common, "--json", tmp_path / "lp.json")
    assert result.exit_code == 0, output
    assert "the model's covariate column(s) age_approx, sex" in " ".join(output.split())  # the log, unwrapped
    assert "covariates" not in json.loads((tmp_path / "lp.json").read_text())
    result, output = invoke(*common, "--covariates", "age_approx")
    assert result.exit_code == 2 and "covariate column 'age_approx'" in output


def test_a_benchmark_suite_probes_with_the_models_covariates(model_with_covariates, isic_with_age, tmp_path):
    """``medvl bench run``'s linear-probe task fuses the model's covariates as ``medvl eval linear-probe`` does,
    with the image-only and covariates-only figures as rows of their own."""
    import shutil

    import yaml

    folder = tmp_path / "isic"  # a suite reads a dataset's own files only: copies next to the manifest
    (folder / "images").mkdir(parents=True)
    with isic_with_age.open(newline="") as handle:
        rows = list(csv.reader(handle))
    for row in rows[1:]:
        row[0] = f"images/{Path(shutil.copy(row[0], folder / 'images')).name}"
    write_manifest(folder / "manifest.csv", rows[0], rows[1:])
    suite = tmp_path / "isic.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "isic-age", "seed": 0, "bootstrap": 100,
        "datasets": {"isic": {"path": str(folder), "split": "test", "train_split": "train", "label": "diagnosis"}},
        "tasks": [{"task": "linear-probe", "dataset": "isic"}], "checks": []}))
    result, output = invoke("bench", "run", suite, "--model", model_with_covariates, "--out", tmp_path / "out",
                            "-q")
    assert result.exit_code == 0, output
    rows = {row["metric"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert {"auc", "image-only auc", "image-only balanced_accuracy", "covariates-only auc"} <= set(rows)
    # each row names what was fused into its figure
    assert rows["auc"]["covariates"] == rows["covariates-only auc"]["covariates"] == ["age_approx", "sex"]
    assert rows["image-only auc"]["covariates"] == []
    assert rows["auc"]["low"] <= rows["auc"]["value"] <= rows["auc"]["high"]
    assert rows["auc"]["value"] != pytest.approx(rows["image-only auc"]["value"])
    # covariates: none in the task scores the image alone: its auc is the fused run's image-only one
    plain = yaml.safe_load(suite.read_text())
    plain["tasks"][0]["covariates"] = "none"
    suite.write_text(yaml.safe_dump(plain))
    result, output = invoke("bench", "run", suite, "--model", model_with_covariates, "--out", tmp_path / "plain",
                            "-q")
    assert result.exit_code == 0, output
    rows_plain = {row["metric"]: row for row in json.loads((tmp_path / "plain" / "results.json").read_text())["rows"]}
    assert "image-only auc" not in rows_plain and rows_plain["auc"]["covariates"] == []
    assert rows_plain["auc"]["value"] == pytest.approx(rows["image-only auc"]["value"])


def test_a_few_non_numeric_ages_are_missing_not_a_reason_to_make_the_column_categorical(caplog):
    """One "85+" among 19 ages made the whole column categorical (ages as categories), in those folds of a
    cross-validation whose training records held it and not in the others; now it is a numeric column in every
    fold, the odd value read as missing and counted (not quoted) in a warning."""
    ages = [str(20 + 3 * i) for i in range(19)]
    with_odd = [_record(i, age=age) for i, age in enumerate(ages)] + [_record(19, age="85+")]
    without = [_record(i, age=age) for i, age in enumerate(ages)]
    with caplog.at_level("WARNING"):
        encoder = CovariateEncoder.fit(with_odd, ["age"], "fold 1")
    assert "age" in encoder.numeric and not encoder.categories
    assert encoder.numeric["age"] == CovariateEncoder.fit(without, ["age"]).numeric["age"]
    assert "'age' is numeric but 1 of its 20 present values are not numbers" in caplog.text
    assert "85+" not in caplog.text
    assert encoder.transform([_record(0, age="85+")]).tolist() == [[0.0, 1.0]]  # missing
    described = encoder.describe()["age"]
    assert described["kind"] == "numeric" and described["non_numeric_share"] == 0.05
    # a column mostly of words stays categorical: three codes among numbers
    mixed = [_record(i, stage=["1", "2", "I", "II", "III"][i % 5]) for i in range(20)]
    assert CovariateEncoder.fit(mixed, ["stage"]).categories == {"stage": ["1", "2", "I", "II", "III"]}


def test_the_share_of_non_numeric_scored_values_is_reported():
    from medvl.eval.covariates import CovariateModel

    train = [_labelled(i, ["benign", "malignant"][i % 2], age=str(30 + i)) for i in range(20)]
    model = CovariateModel.fit(train, np.array([i % 2 for i in range(20)]), 2, ["age"])
    scored = [_labelled(0, "benign", age="adult"), _labelled(1, "benign", age="40"), _labelled(2, "benign")]
    described = model.describe(scored)["columns"]["age"]
    assert described["non_numeric_share_scored"] == 0.3333 and described["missing_share_scored"] == 0.3333
