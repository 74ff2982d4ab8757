"""The MedMNIST benchmark's scoring recipe: seed ensembles, test-time shifts and scales (checked
against plain references), the recipe's operating point behind the headline accuracy."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import medvl
from cli_helpers import invoke
from medvl.bench.medmnist import (
    benchmark_data,
    check_scored_data,
    ensemble_scores,
    medmnist_settings,
    run_medmnist,
    score_models,
    shifted_scores,
    view_pixels,
)
from medvl.data.loaders import load_dataset
from medvl.errors import InputError
from medvl.eval.head import class_targets, head_scores
from medvl.eval.robustness import CORRUPTIONS, corrupt
from medvl.models.registry import get_recipe
from medvl.train.recipes import resolve_recipe


def _model(seed: int):
    torch.manual_seed(seed)
    model = medvl.create_model("medmnist-small")
    model.add_head("label", ["0", "1"])
    return model


def test_identity_view_is_the_image_and_a_whole_pixel_shift_moves_it():
    pixels = torch.rand(2, 1, 28, 28)
    assert view_pixels(pixels, [0.0, 0.0, 1.0]) is pixels
    right_down = view_pixels(pixels, [1 / 28, 2 / 28, 1.0])
    # content moves one pixel right and two down; the first column / rows repeat the border
    assert torch.allclose(right_down[..., 2:, 1:], pixels[..., :-2, :-1], atol=1e-5)
    assert torch.allclose(right_down[..., 0, 1:], pixels[..., 0, :-1], atol=1e-5)


def test_scaling_keeps_the_centre_and_a_flat_image():
    flat = torch.full((1, 1, 28, 28), 0.3)
    assert torch.allclose(view_pixels(flat, [0.0, 0.0, 1.05]), flat)
    ramp = torch.linspace(0, 1, 28).expand(1, 1, 28, 28).contiguous()  # brightness grows to the right
    enlarged = view_pixels(ramp, [0.0, 0.0, 1.25])
    assert enlarged[0, 0, 0, -1] < ramp[0, 0, 0, -1] and enlarged[0, 0, 0, 0] > ramp[0, 0, 0, 0]
    assert enlarged[0, 0, 0, 13:15].mean().item() == pytest.approx(ramp[0, 0, 0, 13:15].mean().item(), abs=1e-5)


def test_ensemble_scores_are_the_mean_over_members_and_views(tiny_npz):
    records = load_dataset(tiny_npz, label_columns=["label"]).select("val")
    records = records.subset(records.records[:20])
    members = [_model(0), _model(1)]
    plain = ensemble_scores(members, records, "label", [], show_progress=False, chunk=8)
    reference = np.mean([head_scores(m, records, "label", show_progress=False) for m in members], axis=0)
    assert plain == pytest.approx(reference, abs=1e-5)
    view = [0.04, -0.04, 0.95]
    pixels = members[0].preprocessor.load_many([r.image for r in records])
    shifted = np.mean([m.head_probabilities("label", m.encode_images(view_pixels(pixels, view), features=True)).numpy()
                       for m in members], axis=0)
    with_view = ensemble_scores(members, records, "label", [view], show_progress=False, chunk=8)
    assert with_view == pytest.approx((reference + shifted) / 2, abs=1e-5)
    assert with_view.sum(axis=1) == pytest.approx(np.ones(len(records)))


def test_the_medmnist_recipe_carries_its_scoring_settings():
    recipe = get_recipe("medmnist-small")
    settings = resolve_recipe("medmnist-small")
    assert settings.ensemble == recipe.ensemble and settings.operating_point == recipe.operating_point
    assert settings.test_time_views == recipe.test_time_views
    assert all(view[:2] != [0, 0] or view[2] != 1 for view in settings.test_time_views)  # no identity duplicate
    changed = resolve_recipe("medmnist-small", ensemble=1, test_time_views=[], operating_point="max_accuracy")
    assert (changed.ensemble, changed.test_time_views, changed.operating_point) == (1, [], "max_accuracy")
    assert changed.train == settings.train


@pytest.mark.parametrize("options, message", [
    ({"ensemble": 0}, "ensemble"),
    ({"test_time_views": [[0.6, 0, 1]]}, "test-time view"),
    ({"test_time_views": [[0, 0]]}, "test-time view"),
    ({"test_time_views": [[0, 0, 3]]}, "test-time view"),
    ({"operating_point": "youden"}, "operating point"),
])
def test_bad_scoring_settings_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        resolve_recipe("medmnist-small", **options)


def test_threshold_at_a_prior_needs_the_prior_before_training(tiny_npz):
    with pytest.raises(InputError, match="target-prior"):
        run_medmnist(tiny_npz, tiny_npz, "val", operating_point="max_accuracy_at_prior", show_progress=False)


def test_bootstrap_without_a_prior_is_refused_before_training(tiny_npz, tmp_path):
    """--bootstrap sets the resamples of the --target-prior intervals: alone it was ignored."""
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", tiny_npz, "--test-split",
                            "val", "--bootstrap", 3000, "--out", tmp_path / "models", "-q")
    assert result.exit_code == 2 and "--bootstrap (resamples for the --target-prior intervals) needs --target-prior" \
        in " ".join(output.split()), output
    assert not (tmp_path / "models").exists()


def test_bench_medmnist_trains_an_ensemble_and_reports_the_operating_point(tiny_npz, tmp_path):
    out = tmp_path / "models"
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", tiny_npz,
                            "--test-split", "val", "--epochs", 1, "--ensemble", 2, "--tta",
                            "--operating-point", "max_balanced_accuracy", "--target-prior", 0.625,
                            "--bootstrap", 100, "--label-smoothing", 0.1, "--shifts", "2",
                            "--out", out, "--json", tmp_path / "b.json", "-q")
    assert result.exit_code == 0, output
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["ensemble"] == 2 and saved["operating_point"] == "max_balanced_accuracy"
    assert saved["test_time_views"] == len(get_recipe("medmnist-small").test_time_views)
    assert saved["threshold"] == saved["operating_points"]["max_balanced_accuracy"]["threshold"]
    assert saved["acc"] == saved["operating_points"]["max_balanced_accuracy"]["accuracy"]["value"]
    # every figure of the metrics block at that threshold (the balanced accuracy and the confusion matrix were
    # the argmax's beside the thresholded accuracy), the argmax ones kept apart
    point, metrics = saved["operating_points"]["max_balanced_accuracy"], saved["metrics"]
    assert metrics["balanced_accuracy"] == pytest.approx(point["balanced_accuracy"]["value"])
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    assert tp / (tp + fn) == pytest.approx(point["sensitivity"]["value"])
    assert tn / (tn + fp) == pytest.approx(point["specificity"]["value"])
    assert metrics["per_class"]["1"]["recall"] == pytest.approx(point["sensitivity"]["value"])
    argmax = {"accuracy_argmax", "balanced_accuracy_argmax", "confusion_matrix_argmax", "per_class_argmax"}
    assert argmax <= set(metrics)
    seeds = [json.loads((out / f"member-{i}" / "train_config.json").read_text())["train"]["seed"] for i in (0, 1)]
    assert seeds == [0, 1]
    smoothing = json.loads((out / "member-0" / "train_config.json").read_text())["train"]["label_smoothing"]
    assert smoothing == saved["settings"]["train"]["label_smoothing"] == 0.1
    # the split again under every corruption, for the ensemble and for each member alone
    for scored in (saved, *saved["members"]):
        shifted = scored["shifted"]
        assert shifted["severities"] == [2] and set(shifted["auc"]) == set(CORRUPTIONS)
        conditions = [(kind, values[0]) for kind, values in shifted["auc"].items()]
        assert shifted["worst"]["auc"] == min(value for _, value in conditions)
        assert shifted["mean_auc"] == pytest.approx(np.mean([value for _, value in conditions]))
    # each member alone is in the results, scored as the ensemble is: rescoring the saved member agrees
    assert [member["seed"] for member in saved["members"]] == [0, 1]
    data = benchmark_data(tiny_npz, tiny_npz, "val", seed=0)
    alone = score_models([medvl.load_model(out / "member-1")], data, get_recipe("medmnist-small").test_time_views,
                         "max_balanced_accuracy", target_prior=0.625, bootstrap=100, show_progress=False)
    recorded = saved["members"][1]
    assert (alone["auc"], alone["acc"], alone["threshold"]) == pytest.approx(
        (recorded["auc"], recorded["acc"], recorded["threshold"]), abs=1e-6)
    assert alone["operating_points"]["auc"] == pytest.approx(recorded["operating_points"]["auc"], abs=1e-6)
    # a corrupted copy is scored as the clean split is, at the clean threshold
    rescored = shifted_scores([medvl.load_model(out / "member-1")], data, get_recipe("medmnist-small").test_time_views,
                              alone["threshold"], [2], show_progress=False)
    for metric in ("auc", "balanced_accuracy"):  # per corruption kind, one value per severity
        assert set(rescored[metric]) == set(recorded["shifted"][metric]) == set(CORRUPTIONS)
        for kind, values in recorded["shifted"][metric].items():
            assert rescored[metric][kind] == pytest.approx(values, abs=1e-6), (metric, kind)


def test_shifted_scores_are_those_of_corrupted_copies(tiny_npz):
    data = benchmark_data(tiny_npz, tiny_npz, "val", seed=0)
    data.test = data.test.subset(data.test.records[:24])
    members = [_model(0), _model(1)]
    shifted = shifted_scores(members, data, [], 0.5, [1, 3], seed=5, show_progress=False)
    assert shifted["severities"] == [1, 3] and shifted["parameters"]["gamma"]["values"] == [1.25, 2.0]
    # blur at severity 1 (0.005 x 28 px) leaves every 28 px image as it was: said, not a hidden clean condition
    same = [[kind, s] for kind in CORRUPTIONS for s in (1, 3)
            if all(np.array_equal(corrupt(r.image, kind, s, 0), r.image) for r in data.test)]
    assert ["blur", 1] in same and shifted["unchanged"] == same
    kind, severity = "noise", 3
    seeds = [int(np.random.SeedSequence([5, i]).generate_state(1)[0]) for i in range(len(data.test))]
    copies = data.test.subset([dataclasses.replace(r, images=[corrupt(r.image, kind, severity, s)])
                               for r, s in zip(data.test, seeds, strict=True)])
    probabilities = ensemble_scores(members, copies, "label", [], show_progress=False)
    y_true = class_targets(copies, "label", data.classes)
    assert shifted["auc"][kind][1] == pytest.approx(roc_auc_score(y_true, probabilities[:, 1]), abs=1e-6)
    predicted = (probabilities[:, 1] >= 0.5).astype(int)
    balanced = (np.mean(predicted[y_true == 1] == 1) + np.mean(predicted[y_true == 0] == 0)) / 2
    assert shifted["balanced_accuracy"][kind][1] == pytest.approx(balanced)
    # noise is drawn per record from the seed: another seed gives other copies
    assert shifted_scores(members, data, [], 0.5, [3], seed=6, show_progress=False)["auc"]["noise"] != [
        shifted["auc"]["noise"][1]]


@pytest.mark.parametrize("shifts", ["0", "6", "1,1", "a", ","])
def test_bench_medmnist_refuses_bad_shift_severities(tiny_npz, tmp_path, shifts):
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", tiny_npz,
                            "--shifts", shifts, "--json", tmp_path / "b.json", "-q")
    assert result.exit_code == 2 and "--shifts" in output
    assert not (tmp_path / "b.json").exists()


def test_the_threshold_is_never_chosen_on_a_copy_of_the_scored_split(tiny_npz, tmp_path, caplog):
    """A copy of the train file given as --test-data (another path, the same images) made its val split, the
    scored records, the threshold data: the threshold was tuned in-sample. It now holds out 10 % of train."""
    import shutil

    copy = tmp_path / "copy.npz"
    shutil.copy(tiny_npz, copy)
    with caplog.at_level("WARNING"):
        data = benchmark_data(tiny_npz, copy, "val", seed=0)
    assert data.calibration_name == "10% of train held out"
    assert "scored images are in the train file's val split" in caplog.text
    assert benchmark_data(tiny_npz, tiny_npz, "val", seed=0).calibration_name == "10% of train held out"
    source = np.load(tiny_npz)
    other = tmp_path / "other.npz"  # a test file of other images: the train file's val chooses the threshold
    np.savez(other, test_images=255 - source["val_images"], test_labels=source["val_labels"])
    assert benchmark_data(tiny_npz, other, "test", seed=0).calibration_name == f"{tiny_npz.name}:val"
    # threshold data of one class: said before training, naming it (it failed after training, blaming the scored data)
    one = tmp_path / "one.npz"
    keep = source["val_labels"].reshape(-1) == 1
    np.savez(one, train_images=source["train_images"], train_labels=source["train_labels"],
             val_images=source["val_images"][keep], val_labels=source["val_labels"][keep])
    with pytest.raises(InputError, match=r"the threshold data \(one.npz:val\) holds only class"):
        benchmark_data(one, other, "test", seed=0)


def test_scored_copies_of_training_images_are_said_in_the_summary_and_refused_when_most(tiny_npz, tmp_path):
    """A copy of the train file given as --test-data scored its training images as a test (exit 0; only a log line
    and a JSON key said so): refused when most of the scored split copies training images, as the same file is;
    fewer are a row of the table, a flag line, and in benchmarks/medmnist.py's table."""
    import importlib.util
    import shutil
    from pathlib import Path

    copy = tmp_path / "copy.npz"
    shutil.copy(tiny_npz, copy)
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", copy, "--test-split",
                            "train", "--epochs", 1, "--out", tmp_path / "refused", "-q")
    assert result.exit_code == 2, output
    assert (f"--test-data {copy} --test-split train: 240 of 240 scored images are byte-for-byte copies of images in "
            f"the training split ({tiny_npz.name}:train)") in " ".join(output.split()), output
    assert not (tmp_path / "refused").exists()
    source = np.load(tiny_npz)  # 80 other images and 10 training images: 10 of 90 copied
    some = tmp_path / "some.npz"
    np.savez(some, test_images=np.concatenate([255 - source["val_images"], source["train_images"][:10]]),
             test_labels=np.concatenate([source["val_labels"], source["train_labels"][:10]]))
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", some, "--epochs", 1,
                            "--ensemble", 1, "--no-tta", "--train-set", "max_steps=1", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, output
    said = " ".join(output.split())
    assert "│ scored images copied from training │ 10 of 90 │" in said, output
    assert (f"flag leak: 10 of 90 scored images are byte-for-byte copies of images in the training split "
            f"({tiny_npz.name}:train)") in said, output
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["copies_in_fit"]["records"] == 10 and len(saved["flags"]) == 1
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "medmnist.py"
    spec = importlib.util.spec_from_file_location("benchmark_medmnist", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.headline_table(saved, "test")
    assert "scored images copied from training: 10 of 90" in table and f"flag {saved['flags'][0]}" in table


def test_scored_classes_and_image_shapes_are_checked_before_training_and_out_is_left_alone(tiny_npz, tmp_path):
    """A class the training data lacks, or images the model cannot read (3D arrays for a 2D model), in the scored
    split are refused before any member trains, naming the file (and the record), and --out is not created."""
    source = np.load(tiny_npz)
    unseen, volumes = tmp_path / "unseen_test.npz", tmp_path / "3d.npz"
    np.savez(unseen, test_images=source["val_images"], test_labels=np.where(source["val_labels"] == 1, 2, 0))
    np.savez(volumes, val_images=np.repeat(source["val_images"][:, None], 4, 1), val_labels=source["val_labels"])
    for test_data, split, message in (
            (unseen, "test", f"{unseen}:test: classes ['2'] were not in the training data"),
            (volumes, "val", f"{volumes} (record val_0): image shape (4, 28, 28) does not fit a 2D model")):
        out = tmp_path / f"out-{split}"
        result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", test_data,
                                "--test-split", split, "--epochs", 1, "--out", out, "-q")
        assert result.exit_code == 2, output
        assert message in " ".join(output.split()), output
        assert not out.exists()


def test_a_scored_split_stored_as_another_dtype_than_the_training_split_is_refused_before_training(tiny_npz,
                                                                                                 tmp_path):
    """uint8 pixels are divided by 255, float pixels stretched between each image's own minimum and maximum: the
    same values as float32 would reach a model trained on uint8 as other inputs (AUC 0.64 fell to 0.25). Refused
    before training, naming both files and both dtypes; a float64 copy of float32 training images is read alike."""
    source = np.load(tiny_npz)
    as_float = tmp_path / "float_test.npz"
    np.savez(as_float, test_images=source["val_images"].astype(np.float32), test_labels=source["val_labels"])
    out = tmp_path / "out"
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", as_float, "--epochs", 1,
                            "--out", out, "-q")
    assert result.exit_code == 2, output
    assert (f"{as_float}:test: images are float32 (stretched between each image's own minimum and maximum), but the "
            f"training images ({tiny_npz}:train) are uint8 (divided by 255)") in " ".join(output.split()), output
    assert not out.exists()
    float_train = tmp_path / "float_train.npz"
    np.savez(float_train, train_images=source["train_images"].astype(np.float32),
             train_labels=source["train_labels"], val_images=source["val_images"].astype(np.float32),
             val_labels=source["val_labels"])
    np.savez(as_float, test_images=source["val_images"].astype(np.float64), test_labels=source["val_labels"])
    data = benchmark_data(float_train, as_float, "test", seed=0)
    check_scored_data(data, medmnist_settings(), f"{as_float}:test", f"{float_train}:train")  # no error


def test_a_scored_split_of_one_class_is_refused_before_training_naming_the_file_and_split(tiny_npz, tmp_path):
    """Its AUC is undefined and its balanced accuracy would be one class's recall; --target-prior failed only after
    training, naming no file."""
    source = np.load(tiny_npz)
    negatives = source["val_labels"][:, 0] == 0
    one_class = tmp_path / "one_class.npz"
    np.savez(one_class, test_images=source["val_images"][negatives], test_labels=source["val_labels"][negatives])
    for n, options in enumerate(([], ["--target-prior", 0.6], ["--shifts", "1"])):
        out = tmp_path / f"out{n}"
        result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", one_class,
                                "--epochs", 1, "--out", out, "-q", *options)
        assert result.exit_code == 2, output
        assert f"{one_class}:test holds one class of 'label' (0); its AUC is undefined" in " ".join(output.split())
        assert not out.exists()


def test_scoring_errors_name_the_file_and_record():
    """An array that fails when scored is named by its file and record, not <array>."""
    dataset = load_dataset_from_arrays(np.zeros((2, 4, 28, 28), np.float32))
    with pytest.raises(medvl.errors.DataError, match=r"volumes.npz \(record test_0\): image shape \(4, 28, 28\)"):
        ensemble_scores([_model(0)], dataset, "label", [], show_progress=False)


def load_dataset_from_arrays(images: np.ndarray):
    """A dataset of in-memory arrays as the npz loader makes them, with ``volumes.npz`` as its source."""
    from medvl.data.record import Dataset, Record

    records = [Record(id=f"test_{i}", images=[image], labels={"label": "0"}, split="test")
               for i, image in enumerate(images)]
    return Dataset(records, source="volumes.npz", label_names=["label"])


def test_an_used_out_folder_is_refused_in_the_commands_words_and_overwrite_replaces_an_earlier_model(tiny_npz,
                                                                                                   tmp_path):
    out = tmp_path / "o3"
    args = ("bench", "medmnist", "--train-data", tiny_npz, "--test-data", tiny_npz, "--test-split", "val",
            "--epochs", 1, "--ensemble", 1, "--out", out, "-q")
    result, output = invoke(*args)
    assert result.exit_code == 0, output
    first = (out / "model" / "model.safetensors").read_bytes()
    result, output = invoke(*args)
    text = " ".join(output.split())
    assert result.exit_code == 2 and "--resume" not in text, output
    assert f"{out}: --out exists and is not empty; choose a new --out, or --overwrite to replace" in text
    result, output = invoke(*args, "--overwrite", "--seed", 1)
    assert result.exit_code == 0, output
    assert (out / "model" / "model.safetensors").read_bytes() != first  # the new run's model
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("mine")
    result, output = invoke(*args[:-3], "--out", other, "--overwrite", "-q")
    assert result.exit_code == 2 and "not a bench medmnist output" in " ".join(output.split()), output
    assert (other / "mine.txt").read_text() == "mine"


def test_binary_only_options_on_a_task_of_more_classes_are_refused_before_training(tiny_npz, tmp_path):
    source = np.load(tiny_npz)
    three = tmp_path / "three.npz"
    np.savez(three, train_images=source["train_images"], train_labels=np.arange(240) % 3,
             val_images=source["val_images"], val_labels=np.arange(80) % 3)
    for options, named in ((["--target-prior", 0.6], "--target-prior"),
                           (["--operating-point", "max_balanced_accuracy"], "--operating-point")):
        result, output = invoke("bench", "medmnist", "--train-data", three, "--test-data", three, "--test-split",
                                "val", "--epochs", 1, "-q", *options)
        assert result.exit_code == 2, output
        assert f"{named} applies to binary tasks; {three} has 3 classes" in " ".join(output.split()), output
