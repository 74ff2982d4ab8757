"""k-fold cross-validation: the folds, and ``medvl bench cv`` end to end on 40 real ISIC images."""

import json

import numpy as np
import pytest

from cli_helpers import invoke, isic_rows, write_manifest
from medvl.bench.cv import _groups, make_folds
from medvl.data import load_dataset
from medvl.errors import InputError
from medvl.eval.metrics import classification_metrics


@pytest.fixture(scope="module")
def isic_subset(shared_data, tmp_path_factory):
    """A manifest of 20 nevus + 20 melanoma ISIC images (read in place) with a fake patient column."""
    chosen = isic_rows(shared_data, "nevus")[:20] + isic_rows(shared_data, "melanoma")[:20]
    return write_manifest(tmp_path_factory.mktemp("isic") / "manifest.csv", ["image", "diagnosis", "patient"],
                          [[row["path"], row["diagnosis"], f"p{i // 2}"] for i, row in enumerate(chosen)])


def test_folds_are_stratified_and_partition_the_records():
    y = np.array([0] * 30 + [1] * 10)
    folds = make_folds(y, 5, seed=0)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(40))
    for train, test in folds:
        assert not set(train) & set(test)
        assert y[test].sum() == 2  # 10 positives over 5 folds
    assert [t.tolist() for _, t in make_folds(y, 5, seed=0)] == [t.tolist() for _, t in folds]


def test_group_folds_keep_each_group_on_one_side():
    y = np.array([0, 1] * 20)
    groups = np.array([f"p{i // 4}" for i in range(40)])
    for train, test in make_folds(y, 5, seed=1, groups=groups):
        assert not set(groups[train]) & set(groups[test])


def test_group_folds_whose_training_lacks_a_class_are_refused_and_one_class_test_folds_said(caplog):
    """Every record of one class in one group: the fold holding it trained on one class and ended in a sklearn
    traceback after training; a fold scoring one class left its AUC out of the mean without a word."""
    from medvl.bench.cv import SUMMARY_METRICS, _summarise

    y = np.array([1] * 6 + [0] * 24)
    one_group = np.array(["m0"] * 6 + [f"n{i}" for i in range(24)])
    with pytest.raises(InputError, match=r"fold \d of 3: its training records hold no class \[1\]"):
        make_folds(y, 3, seed=0, groups=one_group)
    two_groups = np.array(["m0"] * 3 + ["m1"] * 3 + [f"n{i}" for i in range(24)])
    with caplog.at_level("WARNING"):
        folds = make_folds(y, 3, seed=0, groups=two_groups)
    one_class = [fold for fold, (_, test) in enumerate(folds, 1) if len(set(y[test])) == 1]
    assert one_class and f"fold {one_class[0]} of 3 scores records of one class only" in caplog.text
    results = [{**dict.fromkeys(SUMMARY_METRICS, 0.8), "auc": None if fold in one_class else 0.7}
               for fold in range(1, 4)]
    summary = _summarise(results)
    assert summary["auc_folds"] == 3 - len(one_class) and "acc_folds" not in summary


def test_a_group_fold_scoring_two_of_three_classes_is_left_out_of_the_auc_mean_as_its_warning_says(caplog):
    """A held-out fold missing one class of three was warned about as "one class only ... left out of their means"
    while its macro AUC (over the 2 classes it holds: another, easier task) and balanced accuracy went into them."""
    from medvl.bench.cv import SUMMARY_METRICS, _fold_metrics, _summarise

    y = np.array([0] * 12 + [1] * 12 + [2] * 6)  # class 2 in two groups of three images
    groups = np.array([f"p{i // 2}" for i in range(24)] + ["q0"] * 3 + ["q1"] * 3)
    with caplog.at_level("WARNING"):
        folds = make_folds(y, 3, seed=0, groups=groups)
    partial = [fold for fold, (_, test) in enumerate(folds, 1) if len(set(y[test])) == 2]
    assert len(partial) == 1 and all(len(set(y[test])) in (2, 3) for _, test in folds)
    assert f"fold {partial[0]} of 3 scores 2 of the 3 classes only" in caplog.text
    assert "one class only" not in caplog.text
    rng = np.random.default_rng(0)
    results = []
    for _, test in folds:
        metrics = _fold_metrics(y[test], rng.dirichlet([1, 1, 1], len(test)), ["a", "b", "c"])
        results.append({**dict.fromkeys(SUMMARY_METRICS, 0.5), "auc": metrics["macro_auc"],
                        "acc": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"]})
    assert results[partial[0] - 1]["auc"] is None and results[partial[0] - 1]["balanced_accuracy"] is None
    summary = _summarise(results)
    assert summary["auc_folds"] == summary["balanced_accuracy_folds"] == 2 and "acc_folds" not in summary
    assert summary["auc"] == pytest.approx(np.mean([r["auc"] for r in results if r["auc"] is not None]))


def test_folds_need_enough_records_per_class():
    with pytest.raises(InputError, match="smallest class has 3"):
        make_folds(np.array([0] * 20 + [1] * 3), 5, seed=0)


def test_bench_cv_end_to_end(isic_subset, tmp_path):
    out = tmp_path / "cv.json"
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_subset, "--label-column", "diagnosis",
                            "--model", "phantom-tiny", "--folds", 2, "--epochs", 1, "--seed", 0,
                            "--batch-size", 16, "--group-column", "patient", "--json", out, "-q")
    assert result.exit_code == 0, output
    assert "auc" in output
    metrics = json.loads(out.read_text())
    for key in ("auc", "auc_std", "acc", "balanced_accuracy", "zero_shot_auc", "probe_auc", "probe_auc_std",
                "probe_balanced_accuracy", "probe_auc_pooled"):
        assert isinstance(metrics[key], float) and 0 <= metrics[key] <= 1, key
    assert "linear-probe auc" in output
    assert metrics["classes"] == ["melanoma", "nevus"]
    assert [f["n_test"] for f in metrics["folds"]] == [20, 20]
    ids = [set(f["test_ids"]) for f in metrics["folds"]]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 40
    assert "copies_in_fit" not in metrics and "copies" not in output  # no image is filed twice
    # each fold's figures are those of the probabilities the file keeps (rounded ones tied the argmax and ranks)
    labels = {r.id: r.labels["diagnosis"] for r in load_dataset(isic_subset, allow_outside_root=True).records}
    for fold in metrics["folds"]:
        y = np.array([metrics["classes"].index(labels[i]) for i in fold["test_ids"]])
        recomputed = classification_metrics(y, np.array(fold["probabilities"]), metrics["classes"])
        assert (recomputed["macro_auc"], recomputed["accuracy"], recomputed["balanced_accuracy"]) == (
            fold["auc"], fold["acc"], fold["balanced_accuracy"])


def test_bench_cv_unknown_label_column_is_a_one_line_error(isic_subset):
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_subset,
                            "--label-column", "mole_colour", "--model", "phantom-tiny", "--folds", 2,
                            "--epochs", 1, "-q")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "mole_colour" in errors[0] and "available: diagnosis" in errors[0]
    assert "Traceback" not in output
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_subset, "--label-column",
                            "diagnosis", "--group-column", "patient_id", "--model", "phantom-tiny", "--folds", 2,
                            "--epochs", 1, "-q")  # the group columns are the metadata's, not the label's
    assert result.exit_code == 2
    assert "unknown group column 'patient_id'; columns: diagnosis, patient" in " ".join(output.split())


def test_bench_cv_folds_keep_a_figure1_patients_films_together(shared_data):
    """``--group-column patient_id`` on the Figure 1 table: each patient's 2-3 films fall in one fold (ungrouped
    folds put COVID-00039's three films on both sides); the table's own ``patientid`` names films, not patients."""
    dataset = load_dataset(shared_data / "figure1-covid-cxr", ["finding"])
    classes = dataset.classes("finding")
    y = np.array([classes.index(record.labels["finding"]) for record in dataset])
    groups = _groups(dataset, "patient_id")  # what bench cv hands make_folds for --group-column patient_id
    assert len(set(groups)) == 36 < len(dataset) == 40  # COVID-00015, 00039 and 00043: 2, 3 and 2 labelled films
    for seed in range(4):
        fold_of = {}
        for fold, (_, test) in enumerate(make_folds(y, 2, seed, groups)):
            fold_of |= {int(i): fold for i in test}
        for patient in set(groups):
            assert len({fold_of[i] for i in np.flatnonzero(groups == patient)}) == 1, (seed, patient)
    result, output = invoke("bench", "cv", "--data", shared_data / "figure1-covid-cxr", "-l", "finding", "--model",
                            "phantom-tiny", "--folds", 2, "--epochs", 1, "--group-column", "patientid", "-q")
    assert result.exit_code == 2 and "unknown group column 'patientid'" in output
    assert "patient_id" in output.split("columns:")[1]  # the error offers the patient column


@pytest.mark.parametrize("repeats", [0, -2])
def test_bench_cv_refuses_fewer_than_one_repeat(isic_subset, tmp_path, repeats):
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_subset, "--label-column", "diagnosis",
                            "--model", "phantom-tiny", "--folds", 2, "--repeats", repeats, "--epochs", 1,
                            "--json", tmp_path / "cv.json", "-q")
    assert result.exit_code == 2 and f"repeats must be >= 1, got {repeats}" in output  # it ran one CV without a word
    assert not (tmp_path / "cv.json").exists()


def test_bench_cv_repeats_use_other_folds_and_pool_every_fold(isic_subset, tmp_path):
    out = tmp_path / "cv.json"
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_subset, "--label-column", "diagnosis",
                            "--model", "phantom-tiny", "--folds", 2, "--repeats", 2, "--epochs", 1, "--seed", 5,
                            "--batch-size", 16, "--json", out, "-q")
    assert result.exit_code == 0, output
    assert "pooled out-of-fold auc per repeat" in output
    metrics = json.loads(out.read_text())
    assert metrics["seeds"] == [5, 6] and [r["seed"] for r in metrics["repeats"]] == [5, 6]
    aucs = [f["auc"] for r in metrics["repeats"] for f in r["folds"]]
    assert len(aucs) == 4 and metrics["auc"] == pytest.approx(np.mean(aucs))
    assert metrics["auc_std"] == pytest.approx(np.std(aucs, ddof=1))
    assert metrics["auc_pooled"] == [r["auc_pooled"] for r in metrics["repeats"]]
    first, second = ([set(f["test_ids"]) for f in r["folds"]] for r in metrics["repeats"])
    assert first != second and first[0] | first[1] == second[0] | second[1]  # other folds of the same records


@pytest.fixture(scope="module")
def isic_mixed(shared_data, tmp_path_factory):
    """8 nevus + 8 melanoma ISIC images from the start of the archive, where most files are streaked
    (every row the same), and 8 + 8 from later ids, which are not."""
    chosen = []
    for diagnosis in ("nevus", "melanoma"):
        ranked = isic_rows(shared_data, diagnosis)
        chosen += ranked[:8] + ranked[-8:]
    return write_manifest(tmp_path_factory.mktemp("isic-mixed") / "manifest.csv", ["image", "diagnosis"],
                          [[row["path"], row["diagnosis"]] for row in chosen])


def test_bench_cv_keeps_out_of_fold_scores_and_can_skip_flagged_images(isic_mixed, tmp_path):
    from medvl.data import load_dataset
    from medvl.data.audit import audit_dataset, flagged_ids
    from medvl.eval.metrics import classification_metrics

    out = tmp_path / "cv.json"
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_mixed, "--label-column", "diagnosis",
                            "--model", "phantom-tiny", "--folds", 2, "--epochs", 1, "--seed", 3, "--batch-size", 16,
                            "--skip-flagged", "--json", out, "-q")
    assert result.exit_code == 0, output
    metrics = json.loads(out.read_text())
    assert metrics["train"]["skip_flagged"] is True
    flagged = flagged_ids(audit_dataset(load_dataset(isic_mixed, allow_outside_root=True), show_progress=False))
    assert 8 <= len(flagged) <= 16  # the early ISIC files in the shared copy are streaked (a real defect)
    for fold in metrics["folds"]:  # with 2 folds, a fold trains on the other fold's test records
        other = next(f for f in metrics["folds"] if f is not fold)
        assert fold["n_train"] == len(other["test_ids"])
        assert fold["n_trained"] == len(set(other["test_ids"]) - flagged) < fold["n_train"]
        scores = np.array(fold["probabilities"])  # every held-out image is scored, flagged or not
        assert scores.shape == (fold["n_test"], 2) and np.allclose(scores.sum(1), 1, atol=1e-4)
    # the pooled AUC is the AUC of the saved out-of-fold scores
    ids = [i for f in metrics["folds"] for i in f["test_ids"]]
    scores = np.concatenate([np.array(f["probabilities"]) for f in metrics["folds"]])
    labels = {r.id: r.labels["diagnosis"] for r in load_dataset(isic_mixed, allow_outside_root=True).records}
    y = np.array([metrics["classes"].index(labels[i]) for i in ids])
    assert len(set(ids)) == len(ids) == 32
    pooled = classification_metrics(y, scores, metrics["classes"])["macro_auc"]
    assert pooled == pytest.approx(metrics["auc_pooled"], abs=1e-4)


def test_an_ensemble_fold_averages_members_trained_with_their_own_seeds(isic_subset):
    """Member m of fold f trains with seed * 100 + f + m * MEMBER_SEED_STRIDE: the two-member fold's
    scores are the mean of the two one-member folds with those seeds (training is deterministic)."""
    import dataclasses

    from medvl.bench.cv import MEMBER_SEED_STRIDE, _run_fold, cv_settings
    from medvl.data import captions_for, load_dataset
    from medvl.eval.head import class_targets

    dataset = load_dataset(isic_subset, label_columns=["diagnosis"], allow_outside_root=True)
    classes = ["melanoma", "nevus"]
    train, test = make_folds(class_targets(dataset, "diagnosis", classes), 2, seed=0)[1]
    settings = cv_settings("phantom-tiny", "diagnosis", seed=2, epochs=1, batch_size=16, ensemble=2)
    settings.captions = captions_for(dataset, settings.captions)
    both, both_fold = _run_fold(dataset, "diagnosis", classes, train, test, settings, 1, False)
    both_scores, both_probe = both_fold["head"], both_fold["probe"]
    alone, alone_probe = [], []
    for seed in (2, 2 + MEMBER_SEED_STRIDE // 100):  # fold 1, member 0 and 1: 201 and 10201
        single = dataclasses.replace(settings, ensemble=1, train=dataclasses.replace(settings.train, seed=seed))
        _, fold_scores = _run_fold(dataset, "diagnosis", classes, train, test, single, 1, False)
        alone.append(fold_scores["head"])
        alone_probe.append(fold_scores["probe"])
    assert not np.allclose(alone[0], alone[1])  # the members differ
    np.testing.assert_allclose(both_scores, (alone[0] + alone[1]) / 2, atol=1e-6)
    assert both["probabilities"] == both_scores.tolist()  # unrounded: the fold's figures recompute from them
    np.testing.assert_allclose(both_probe, (alone_probe[0] + alone_probe[1]) / 2, atol=1e-6)


def test_the_fold_probe_is_the_linear_probe_a_user_runs_on_a_trained_model(isic_subset, tmp_path):
    """The CV's linear-probe column scores a fold as ``medvl eval linear-probe`` scores new images with a
    model trained on the training folds: the same classifier on the same features, fitted on every
    training-fold record."""
    from medvl.bench.cv import _probe, cv_settings
    from medvl.data import captions_for, load_dataset
    from medvl.eval.head import class_targets
    from medvl.eval.linear_probe import linear_probe
    from medvl.eval.metrics import classification_metrics
    from medvl.train.recipes import train_recipe

    dataset = load_dataset(isic_subset, label_columns=["diagnosis"], allow_outside_root=True)
    classes = ["melanoma", "nevus"]
    train, test = make_folds(class_targets(dataset, "diagnosis", classes), 2, seed=0)[0]
    train_set = dataset.subset([dataset[int(i)] for i in train])
    test_set = dataset.subset([dataset[int(i)] for i in test])
    settings = cv_settings("phantom-tiny", "diagnosis", seed=4, epochs=2, batch_size=16)
    settings.captions = captions_for(dataset, settings.captions)
    model = train_recipe(settings, train_set, tmp_path, show_progress=False)
    y_test = class_targets(test_set, "diagnosis", classes)
    fold = _probe(model, train_set, class_targets(train_set, "diagnosis", classes), test_set, y_test, classes)
    user = linear_probe(model, train_set, test_set, "diagnosis", few_shot=(), show_progress=False, keep_scores=True)
    assert user["classes"] == classes and user["y_true"] == y_test.tolist()
    np.testing.assert_allclose(fold, user["probabilities"], atol=1e-9)
    assert fold.shape == (20, 2) and np.allclose(fold.sum(1), 1)
    assert classification_metrics(y_test, fold, classes)["macro_auc"] == pytest.approx(user["auc"])


def test_bench_cv_ensemble_option(isic_subset, tmp_path):
    out = tmp_path / "cv.json"
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_subset, "--label-column", "diagnosis",
                            "--model", "phantom-tiny", "--folds", 2, "--epochs", 1, "--batch-size", 16,
                            "--ensemble", 2, "--label-smoothing", 0.2, "--train-set", "mixup=0.4", "--json", out,
                            "-q")
    assert result.exit_code == 0, output
    saved = json.loads(out.read_text())
    assert saved["ensemble"] == 2 and saved["train"]["label_smoothing"] == 0.2 and saved["train"]["mixup"] == 0.4
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", isic_subset, "--label-column", "diagnosis",
                            "--model", "phantom-tiny", "--folds", 2, "--epochs", 1, "--ensemble", 0, "-q")
    assert result.exit_code == 2 and "ensemble" in output


def test_a_fold_scoring_one_class_leaves_balanced_accuracy_out_of_the_mean_like_auc(tmp_path):
    """Groups that put only negatives in a held-out fold: a one-class answer has a recall of 1.0 there, which is no
    balanced accuracy; it is left out of every balanced-accuracy mean (head, zero-shot, probe) and counted."""
    import csv

    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "ph", n=80, seed=0, size=32)
    rows = list(csv.DictReader((tmp_path / "ph" / "manifest.csv").open(newline="")))
    positives = negatives = 0
    for row in rows:  # the positives in two groups, the negatives in six
        if row["cardiomegaly"] == "1":
            row["patient"], positives = f"P{positives % 2}", positives + 1
        else:
            row["patient"], negatives = f"N{negatives % 6}", negatives + 1
    with (tmp_path / "ph" / "grouped.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result, output = invoke("bench", "cv", "--data", tmp_path / "ph" / "grouped.csv", "--label-column", "cardiomegaly",
                            "--model", "phantom-tiny", "--folds", 3, "--epochs", 1, "--group-column", "patient",
                            "--json", tmp_path / "cv.json", "-q")
    assert result.exit_code == 0, output
    saved = json.loads((tmp_path / "cv.json").read_text())
    one_class = [fold for fold in saved["folds"] if min(map(sum, fold["confusion_matrix"])) == 0]
    both = [fold for fold in saved["folds"] if fold not in one_class]
    assert one_class and both
    for prefix in ("", "zero_shot_", "probe_"):
        key = f"{prefix}balanced_accuracy"
        assert all(fold[key] is None for fold in one_class), key
        assert saved[key] == pytest.approx(np.mean([fold[key] for fold in both])), key
        assert saved[f"{key}_folds"] == len(both) == saved[f"{prefix}auc_folds"], key
    assert f"({len(both)} of 3 folds)" in output


def test_a_saved_model_folder_is_refused_as_the_model_to_cross_validate(phantom_dir, tmp_path):
    """Cross-validation trains each fold from a registered config; a saved model folder (perhaps trained on the
    records it would score) is refused before any training, as it was before the 2D/3D record rule."""
    import medvl

    medvl.create_model("phantom-tiny").save_pretrained(tmp_path / "saved")
    result, output = invoke("bench", "cv", "--data", phantom_dir, "--label-column", "finding",
                            "--model", tmp_path / "saved", "--epochs", 1, "-q")
    assert result.exit_code == 2, output
    assert "unknown model" in output and "registered:" in output, output


def test_class_names_that_are_digits_but_not_numbers_are_cross_validated(phantom_dir, tmp_path):
    """A grade column holding "²" ended ``medvl bench cv`` in a traceback (str.isdigit, then int() in the sort of
    the classes): numbers sort by value, such names as text."""
    import csv

    with (phantom_dir / "manifest.csv").open(newline="") as handle:
        images = [row["image"] for row in csv.DictReader(handle)][:16]
    write_manifest(tmp_path / "manifest.csv", ["image", "grade"],
                   [[phantom_dir / image, "²" if i % 2 else "10"] for i, image in enumerate(images)])
    out = tmp_path / "cv.json"
    result, output = invoke("bench", "cv", "--allow-outside-root", "--data", tmp_path / "manifest.csv",
                            "--label-column", "grade", "--model", "phantom-tiny", "--set", "image.image_size=32",
                            "--folds", 2, "--epochs", 1, "--batch-size", 8, "--json", out, "-q")
    assert result.exit_code == 0, output
    assert "Traceback" not in output
    assert json.loads(out.read_text())["classes"] == ["10", "²"]


def test_held_out_copies_of_training_fold_images_are_counted_per_fold_and_said(phantom_dir, tmp_path):
    """Folds are drawn on records: an image filed twice under two names can sit on both sides of a fold, and the
    held-out copy then scores what the fold model trained on. Each fold's count is in the JSON, a warning and the
    printed table, equal to a count by file hash."""
    import csv
    import hashlib
    import shutil

    from medvl.data import load_dataset

    with (phantom_dir / "manifest.csv").open(newline="") as handle:
        source = list(csv.DictReader(handle))[:40]
    (tmp_path / "dup" / "images").mkdir(parents=True)
    rows = []
    for i, row in enumerate(source):
        names = [f"images/a{i:03d}.png"] + ([f"images/b{i:03d}.png"] if i < 16 else [])
        for name in names:
            shutil.copyfile(phantom_dir / row["image"], tmp_path / "dup" / name)
            rows.append([name, row["sex"]])
    write_manifest(tmp_path / "dup" / "manifest.csv", ["image", "sex"], rows)
    out = tmp_path / "cv.json"
    result, output = invoke("bench", "cv", "--data", tmp_path / "dup", "--label-column", "sex", "--model",
                            "phantom-tiny", "--folds", 2, "--epochs", 1, "--batch-size", 16, "--json", out)
    assert result.exit_code == 0, output
    metrics = json.loads(out.read_text())
    dataset = load_dataset(tmp_path / "dup", label_columns=["sex"])
    digests = [hashlib.sha256(record.image.read_bytes()).hexdigest() for record in dataset]
    y = np.array([metrics["classes"].index(record.labels["sex"]) for record in dataset])
    expected = [sum(digests[i] in {digests[j] for j in train} for i in test)
                for train, test in make_folds(y, 2, metrics["seed"])]
    assert all(expected) and sum(expected) <= 2 * 16  # each copy of a pair split apart is held out once
    assert [fold["copies_in_fit"]["records"] for fold in metrics["folds"]] == expected
    assert metrics["copies_in_fit"] == {"records": sum(expected), "of": len(rows), "per_fold": expected}
    flat = " ".join(output.split())
    assert f"{expected[0]} of {metrics['folds'][0]['n_test']} held-out images of fold 1 are byte-for-byte" in flat
    assert f"held-out copies of training-fold images │ {sum(expected)} of {len(rows)} (per fold: " in flat


def test_the_splits_pooled_into_the_folds_are_said_and_split_chooses_them(tmp_path):
    """Every split is pooled by default (the test split too: a later test figure is then not independent of the
    CV): said by a warning, a printed row and --json; --split (repeatable, or a comma list) draws the folds from
    the records of those splits only, and a split the data lacks is refused naming the file."""
    from medvl.data import load_dataset
    from medvl.data.phantom import generate_phantom

    phantom_dir = tmp_path / "ph"
    generate_phantom(phantom_dir, n=60, seed=0, size=32)
    counts = {split: len(load_dataset(phantom_dir).select(split)) for split in ("train", "val", "test")}
    args = ("bench", "cv", "--data", phantom_dir, "--label-column", "sex", "--model", "phantom-tiny", "--folds", 2,
            "--epochs", 1, "--batch-size", 32)
    result, output = invoke(*args, "--json", tmp_path / "all.json")
    assert result.exit_code == 0, output
    pooled = json.loads((tmp_path / "all.json").read_text())
    assert pooled["splits"] == {split: counts[split] for split in pooled["splits"]} and len(pooled["splits"]) == 3
    flat = " ".join(output.split())
    assert "the folds pool every split" in flat and "its test split too" in flat, output
    assert "splits pooled │ " in flat
    result, output = invoke(*args, "--split", "train,val", "--split", "val", "--json", tmp_path / "tv.json")
    assert result.exit_code == 0, output
    chosen = json.loads((tmp_path / "tv.json").read_text())
    assert chosen["splits"] == {"train": counts["train"], "val": counts["val"]}
    assert chosen["n"] == counts["train"] + counts["val"]
    held_out = {record_id for fold in chosen["folds"] for record_id in fold["test_ids"]}
    assert held_out == {record.id for record in load_dataset(phantom_dir) if record.split in ("train", "val")}
    assert "the folds pool every split" not in " ".join(output.split())
    result, output = invoke(*args, "--split", "trian")
    assert result.exit_code == 2 and "no split 'trian'; splits present:" in output, output


def test_a_chosen_split_whose_records_all_lack_the_label_is_said_not_missing(tmp_path):
    """bench cv dropped the unlabelled records of every split before choosing the splits: --split test of data whose
    test rows are not yet annotated was "no split 'test'", although the split is there."""
    import csv

    from medvl.data.phantom import generate_phantom

    phantom_dir = tmp_path / "ph"
    generate_phantom(phantom_dir, n=40, seed=0, size=32)
    manifest = phantom_dir / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row["split"] == "test":
            row["sex"] = ""
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tests = sum(row["split"] == "test" for row in rows)
    result, output = invoke("bench", "cv", "--data", phantom_dir, "--label-column", "sex", "--model", "phantom-tiny",
                            "--folds", 2, "--epochs", 1, "--split", "test")
    assert result.exit_code == 2, output
    assert f"the {tests} records of split test have no value in label column 'sex'" in " ".join(output.split())
