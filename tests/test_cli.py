"""Every CLI command end to end on tiny real data, and bad input answered with exit code 2."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cli_helpers import invoke
from medvl.data import load_dataset


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out,
                            "--epochs", 2, "--batch-size", 32, "-q")
    assert result.exit_code == 0, output
    return out


def test_help_lists_every_command():
    result, output = invoke("--help")
    assert result.exit_code == 0
    for command in ("demo", "phantom", "train", "eval", "bench", "predict", "models", "deid", "dicom-info",
                    "index", "search", "audit"):
        assert command in output


def test_models_lists_the_registry():
    result, output = invoke("models")
    assert result.exit_code == 0
    for name in ("phantom-tiny", "cxr-small", "derm-small", "medpix-small"):
        assert name in output


def test_models_lists_the_input_each_recipe_trains_and_refuses_a_missing_folder(tmp_path):
    from medvl.models.registry import model_summaries

    images = {row["name"]: row["image"] for row in model_summaries()}
    assert images["cxr-small"] == "resnet 96px x1" and images["derm-small"] == "resnet 64px x3"  # not the 128 px arch
    result, output = invoke("models", "--recipe", tmp_path / "no-such-model")
    assert result.exit_code == 2 and "not a model folder" in output, output


def test_phantom_command_writes_a_loadable_manifest(tmp_path):
    result, output = invoke("phantom", tmp_path / "ph", "--n", 12, "--size", 48, "-q")
    assert result.exit_code == 0, output
    assert (tmp_path / "ph" / "manifest.csv").is_file()
    again, output = invoke("phantom", tmp_path / "ph", "--n", 12, "--size", 48, "-q")
    assert again.exit_code == 2 and "ph: directory exists and is not empty" in output
    assert "--overwrite" in output  # the CLI's flag is named, not only the Python keyword


@pytest.mark.parametrize("args, message", [
    (["--n", 0], "--n must be an integer >= 1, got 0"),
    # past C's long: an OverflowError traceback from the split assignment
    (["--n", "99999999999999999999"], "--n must be <= 1000000, got 99999999999999999999"),
    (["--extra-finding-prob", 2], "--extra-finding-prob must be in [0, 1], got 2.0"),
    (["--shortcut", 2], "--shortcut must be <= 1, got 2.0"),
    (["--vqa", "--vqa-per-case", 0], "--vqa-per-case must be >= 1, got 0"),
])
def test_a_refused_number_is_named_as_the_option_the_user_typed(tmp_path, args, message):
    """The library names its Python argument (extra_finding_prob); the CLI said that name, not its option."""
    result, output = invoke("phantom", tmp_path / "ph", *args, "-q")
    assert result.exit_code == 2 and f"error: {message}" in " ".join(output.split()), output
    assert not (tmp_path / "ph").exists()


def test_an_option_is_named_as_its_command_spells_it():
    from medvl.cli.common import cli_name
    from medvl.cli.main import phantom_command
    from medvl.cli.report import draft_command

    assert cli_name(phantom_command, "out") == "OUT" and cli_name(phantom_command, "n") == "--n"
    assert cli_name(draft_command, "min_similarity") == "--min-similarity" and cli_name(draft_command, "k") == "--k"
    assert cli_name(draft_command, "no_such_argument") is None


def test_train_writes_model_and_metrics(trained):
    assert (trained / "model" / "config.json").is_file()
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert lines and "loss" in json.loads(lines[0])


def test_train_resume_continues_from_checkpoint(phantom_dir, tmp_path):
    out = tmp_path / "run"
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out,
                            "--epochs", 1, "--batch-size", 32, "-q")
    assert result.exit_code == 0, output
    refused, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out, "-q")
    assert refused.exit_code == 2 and "--resume" in output
    resumed, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out,
                             "--epochs", 1, "--batch-size", 32, "--resume", "-q")
    assert resumed.exit_code == 0, output
    settings = (out / "train_config.json").read_bytes()
    state = (out / "checkpoint" / "state.pt").read_bytes()
    for changed, named in ((["--model", "phantom-tiny", "--epochs", 3, "--batch-size", 16, "--lr", 0.01],
                            "changes batch_size 32 -> 16, epochs 1 -> 3, lr 0.001 -> 0.01"),
                           (["--model", "vit-tiny", "--epochs", 1, "--batch-size", 32], "model 'phantom-tiny' -> "
                                                                                         "'vit-tiny'")):
        refused, output = invoke("train", "--data", phantom_dir, "--out", out, "--resume", "-q", *changed)
        assert refused.exit_code == 2 and named in " ".join(output.split()), output  # it continued under them
    assert (out / "train_config.json").read_bytes() == settings and (out / "checkpoint" / "state.pt").read_bytes() \
        == state
    resumed, output = invoke("train", "--data", phantom_dir / "manifest.csv", "--model", "phantom-tiny", "--out", out,
                             "--epochs", 1, "--batch-size", 32, "--resume", "--workers", 0, "-q")
    assert resumed.exit_code == 0, output  # how the data is read is no setting of the run, nor how its path is spelt
    # a run started before text.vocab_min_texts existed resumes: its settings file lacks the field, held at its default
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["model"]["text"].pop("vocab_min_texts") == 5
    (out / "train_config.json").write_text(json.dumps(saved))
    resumed, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out,
                             "--epochs", 1, "--batch-size", 32, "--resume", "-q")
    assert resumed.exit_code == 0, output
    refused, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", out, "--epochs", 1,
                             "--batch-size", 32, "--resume", "-q", "--set", "text.vocab_min_texts=2")
    assert refused.exit_code == 2 and "model config" in output, output


def test_resume_refuses_data_whose_records_changed(phantom_dir, tmp_path):
    """The same path and record count, a report rewritten since: the checkpoint would go on learning other data."""
    import csv

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    out, args = tmp_path / "run", ["--model", "phantom-tiny", "--epochs", 1, "--batch-size", 32, "-q"]
    result, output = invoke("train", "--data", data, "--out", out, *args)
    assert result.exit_code == 0, output
    rows = list(csv.DictReader((data / "manifest.csv").open(newline="")))
    rows[0]["text"] = "IMPRESSION: normal."
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    refused, output = invoke("train", "--data", data, "--out", out, "--resume", *args)
    assert refused.exit_code == 2
    assert "this command changes the data's records (a report, label, split or image file changed since)" in \
        " ".join(output.split())


def test_eval_zero_shot_writes_json(trained, phantom_dir, tmp_path):
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", phantom_dir, "--split", "test",
                            "--json", tmp_path / "zs.json", "-q")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "zs.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_auc"):
        assert isinstance(metrics[key], float)
    assert "balanced_accuracy" in output


def test_zero_shot_scores_a_split_among_the_labels_classes_over_every_split(trained, phantom_dir, tmp_path):
    """A split lacking a class was scored among the classes it holds (an easier task, another AUC and chance,
    without a word); the candidates are now the label's classes over every split, and the absent ones are named.
    A split of one class is scored too (it was refused)."""
    import csv

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with (phantom_dir / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    every = sorted({row["finding"] for row in rows})
    gone = sorted({row["finding"] for row in rows if row["split"] == "test"})[0]
    kept = [row for row in rows if not (row["split"] == "test" and row["finding"] == gone)]
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", data, "--split", "test",
                            "--json", tmp_path / "zs.json")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "zs.json").read_text())
    assert metrics["classes"] == every and metrics["classes_absent"] == [gone]
    assert metrics["chance_balanced_accuracy"] == pytest.approx(1 / len(every))
    assert f"1 of the {len(every)} classes of 'finding' have no scored record" in " ".join(output.split())
    only = next(row["finding"] for row in kept if row["split"] == "test")
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if row["split"] != "test" or row["finding"] == only)
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", data, "--split", "test",
                            "--json", tmp_path / "one.json", "-q")
    assert result.exit_code == 0, output
    single = json.loads((tmp_path / "one.json").read_text())
    assert single["classes"] == every and single["macro_auc"] is None and 0 <= single["accuracy"] <= 1


def test_zero_shot_on_a_column_the_captions_do_not_describe_says_its_prompts_are_bare_names(trained, phantom_dir,
                                                                                           tmp_path):
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", phantom_dir, "--split", "test",
                            "--label-column", "view", "--json", tmp_path / "zs.json", "-q")
    assert result.exit_code == 0, output
    assert "the captions describe 2 of the 2 classes of label column 'view' not at all" in " ".join(output.split())
    prompts = json.loads((tmp_path / "zs.json").read_text())["prompts"]
    assert all("AP" in prompt for prompt in prompts["AP"])  # the bare name in every template
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", phantom_dir, "--split", "test", "-q")
    assert result.exit_code == 0 and "not at all" not in " ".join(output.split())
    film = sorted((phantom_dir / "images").glob("*.png"))[0]
    result, output = invoke("predict", film, "--model", trained, "--labels", "nodule,pneumonia")  # not a phantom class
    assert result.exit_code == 0 and "no label column of the captions describes all 2 classes asked for (1 of them " \
        "none does)" in " ".join(output.split())
    result, output = invoke("predict", film, "--model", trained, "--labels", "nodule,cardiomegaly")
    assert result.exit_code == 0 and "describes" not in output


def test_eval_retrieval_writes_json(trained, phantom_dir, tmp_path):
    result, output = invoke("eval", "retrieval", "--model", trained, "--data", phantom_dir, "--split", "test",
                            "--json", tmp_path / "rt.json", "-q")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "rt.json").read_text())
    assert isinstance(metrics["i2t_R@5"], float) and isinstance(metrics["t2i_R@1"], float)


def test_eval_linear_probe_writes_json(trained, phantom_dir, tmp_path):
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", phantom_dir,
                            "--test-data", phantom_dir, "--few-shot", "2", "--json", tmp_path / "lp.json", "-q")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "lp.json").read_text())
    assert isinstance(metrics["auc"], float) and isinstance(metrics["accuracy"], float)


def test_the_probe_json_names_the_data_and_splits_it_was_fitted_and_scored_on(trained, phantom_dir, tmp_path):
    """The probe's JSON had only the model: which data and splits the figures came from was lost."""
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", phantom_dir,
                            "--train-split", "train", "--test-data", phantom_dir, "--few-shot", "1",
                            "--json", tmp_path / "lp.json", "-q")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "lp.json").read_text())
    assert {key: metrics[key] for key in ("model", "train_data", "train_split", "test_data", "test_split")} == {
        "model": str(trained), "train_data": str(phantom_dir), "train_split": "train", "test_data": str(phantom_dir),
        "test_split": "test"}


def test_a_probe_scored_on_a_split_lacking_a_class_names_it(trained, phantom_dir, tmp_path):
    """The probe left a class without a scored record out of its macro AUC without a word (zero-shot says it)."""
    import csv

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with (phantom_dir / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    gone = sorted({row["finding"] for row in rows if row["split"] == "test"})[0]
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(row for row in rows if not (row["split"] == "test" and row["finding"] == gone))
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", data, "--test-data", data,
                            "--few-shot", "1", "--json", tmp_path / "lp.json")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "lp.json").read_text())
    assert metrics["classes_absent"] == [gone] and gone in metrics["classes"]
    n_classes = len(metrics["classes"])
    assert f"1 of the {n_classes} classes of 'finding' have no scored record; the macro AUC leaves them out: " \
        f"{gone}" in " ".join(output.split())


def test_a_dataset_with_several_default_label_columns_needs_one_named(trained, tmp_path):
    """A multi-label npz has every column as a default label: zero-shot and linear-probe scored the first one
    alone and left the others out without a word; they now ask for --label-column, naming the columns."""
    rng = np.random.default_rng(0)
    data = tmp_path / "multi.npz"
    sizes = {"train": 24, "test": 12}
    np.savez(data, **{f"{s}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8) for s, n in sizes.items()},
             **{f"{s}_labels": np.tile([[0, 1, 1], [1, 0, 0]], (n // 2, 1)).astype(np.uint8)
                for s, n in sizes.items()})
    columns = "the dataset has 3 default label columns (label_0, label_1, label_2)"
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", data, "--split", "test",
                            "--json", tmp_path / "zs.json", "-q")
    assert_clean_failure(result, output, "multi.npz", columns, "--label-column")
    assert not (tmp_path / "zs.json").exists()
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", data, "--test-data", data,
                            "--few-shot", "1", "-q")
    assert_clean_failure(result, output, "multi.npz", columns, "--label-column")
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", data, "--split", "test",
                            "--label-column", "label_1", "--json", tmp_path / "zs.json", "-q")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "zs.json").read_text())["label"] == "label_1"


def test_scoring_the_split_the_model_trained_on_is_said_in_the_result_and_a_warning(trained, phantom_dir, tmp_path):
    train_size = len(load_dataset(phantom_dir).select("train"))
    meta = json.loads((trained / "model" / "meta.json").read_text())["training"]
    assert meta["splits"] == ["train"] and len(meta["data_sha256"]) == 64  # the path itself is not added
    seen = {"records": train_size, "of": train_size, "splits": ["train"], "records_trained": train_size}
    for split, expected in (("test", None), ("train", seen)):
        result, output = invoke("eval", "zero-shot", "--model", trained, "--data", phantom_dir, "--split", split,
                                "--json", tmp_path / f"z-{split}.json", "-q")
        assert result.exit_code == 0, output
        assert json.loads((tmp_path / f"z-{split}.json").read_text()).get("trained_on_scored") == expected
        assert ("training figures, not a test" in " ".join(output.split())) == (expected is not None)
    result, output = invoke("eval", "retrieval", "--model", trained, "--data", phantom_dir, "--split", "all",
                            "--json", tmp_path / "r.json", "-q")  # every split: the train records among them
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "r.json").read_text())["trained_on_scored"]["records"] == train_size
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", phantom_dir, "--test-data",
                            phantom_dir, "--train-split", "test", "--test-split", "train", "--few-shot", "1",
                            "--json", tmp_path / "lp.json", "-q")  # probe apart from its scored images, model not
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "lp.json").read_text())["trained_on_scored"]["records"] == train_size
    result, output = invoke("index", "build", "--model", trained, "--data", phantom_dir, "--split", "test", "--out",
                            tmp_path / "idx", "-q")
    assert result.exit_code == 0, output
    for split, expected in (("val", None), ("train", train_size)):
        result, output = invoke("eval", "case-retrieval", "--index", tmp_path / "idx", "--data", phantom_dir,
                                "--split", split, "-k", 3, "--json", tmp_path / f"cr-{split}.json", "-q")
        assert result.exit_code == 0, output
        seen = json.loads((tmp_path / f"cr-{split}.json").read_text()).get("trained_on_scored")
        assert (seen and seen["records"]) == expected


def test_the_leak_block_counts_the_scored_records_only(phantom_dir, tmp_path):
    """Records left out of the scoring (no label for zero-shot, linear-probe and case-retrieval, no report for
    retrieval) are not counted in trained_on_scored; they were, so '48 of 48 scored records' came from a split
    with 24 scored."""
    import csv

    folder = shutil.copytree(phantom_dir, tmp_path / "data")
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for number, row in enumerate(rows):  # the scored split (train) only: the probe is fitted on all of test
        if row["split"] == "train":
            row["finding"] = "" if number % 2 else row["finding"]
            row["text"] = "" if number % 3 == 0 else row["text"]
    with (folder / "part.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "text", "split", "finding"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "dataset.json").write_text(json.dumps({"manifest": "part.csv", "label_columns": ["finding"]}))
    train = [row for row in rows if row["split"] == "train"]
    labelled, reported = sum(bool(row["finding"]) for row in train), sum(bool(row["text"]) for row in train)
    assert labelled < len(train) and reported < len(train)
    data, run = folder / "part.csv", tmp_path / "run"
    result, output = invoke("train", "--data", data, "--model", "phantom-tiny", "--out", run, "-l", "finding",
                            "--epochs", 1, "-q")
    assert result.exit_code == 0, output
    commands = {"zero-shot": (labelled, ["eval", "zero-shot", "--model", run, "--data", data, "-l", "finding"]),
                "retrieval": (reported, ["eval", "retrieval", "--model", run, "--data", data]),
                "linear-probe": (labelled, ["eval", "linear-probe", "--model", run, "--train-data", data,
                                            "--test-data", data, "--train-split", "test", "--few-shot", "1",
                                            "-l", "finding"]),
                "case-retrieval": (labelled, ["eval", "case-retrieval", "--index", tmp_path / "idx", "--data", data,
                                              "-k", 3])}  # compares the index's label column
    result, output = invoke("index", "build", "--model", run, "--data", data, "--split", "test", "--out",
                            tmp_path / "idx", "-q")
    assert result.exit_code == 0, output
    for name, (scored, command) in commands.items():
        split = ["--test-split", "train"] if name == "linear-probe" else ["--split", "train"]
        result, output = invoke(*command, *split, "--json", tmp_path / f"{name}.json", "-q")
        assert result.exit_code == 0, output
        seen = json.loads((tmp_path / f"{name}.json").read_text())["trained_on_scored"]
        assert (name, seen["records"], seen["of"]) == (name, scored, scored)
        assert f"{scored} of {scored} scored" in " ".join(output.split())


def test_a_probe_fitted_on_the_images_it_is_scored_on_is_refused(trained, phantom_dir, tmp_path):
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", phantom_dir,
                            "--test-data", phantom_dir, "--train-split", "all", "--json", tmp_path / "lp.json", "-q")
    test_size = len(load_dataset(phantom_dir).select("test"))
    assert result.exit_code == 2 and f"holds {test_size} of the {test_size} scored images" in " ".join(output.split())
    assert not (tmp_path / "lp.json").exists()
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", phantom_dir,
                            "--test-data", phantom_dir, "--train-split", "train", "--few-shot", "1", "-q")
    assert result.exit_code == 0, output  # another split of the same folder: apart, accepted


def test_a_probe_fitted_on_a_copy_of_the_scored_images_is_warned_and_reported(trained, phantom_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(phantom_dir, copy)  # another folder: the path check cannot see it
    test_size = len(load_dataset(phantom_dir).select("test"))
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", copy, "--test-data",
                            phantom_dir, "--train-split", "all", "--few-shot", "1", "--json", tmp_path / "lp.json",
                            "-q")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "lp.json").read_text())["copies_in_fit"] == {
        "records": test_size, "of": test_size, "fit": "the probe's training split 'all'"}
    assert f"{test_size} of {test_size} scored images are byte-for-byte copies" in " ".join(output.split())
    result, output = invoke("eval", "retrieval", "--model", trained, "--data", phantom_dir, "--split", "test",
                            "--bridge-data", copy, "--bridge-split", "test", "--json", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "r.json").read_text())["copies_in_fit"]["records"] == test_size
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", copy, "--test-data",
                            phantom_dir, "--few-shot", "1", "--json", tmp_path / "apart.json", "-q")
    assert result.exit_code == 0, output  # the copy's train split against the test split: apart, nothing said
    assert "copies_in_fit" not in json.loads((tmp_path / "apart.json").read_text())
    assert "byte-for-byte" not in output


def test_a_few_shot_k_above_the_smallest_class_is_skipped_and_said(trained, phantom_dir, tmp_path):
    result, output = invoke("eval", "linear-probe", "--model", trained, "--train-data", phantom_dir,
                            "--test-data", phantom_dir, "--few-shot", "1,500", "--json", tmp_path / "lp.json", "-q")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "lp.json").read_text())
    assert list(metrics["few_shot"]) == ["1"] and "fewer than 500" in metrics["few_shot_skipped"]["500"]
    assert "500-shot auc" in output and "skipped (too few training images)" in output  # not left out without a word


def test_predict_answers_each_image(trained, phantom_dir, tmp_path):
    images = sorted((phantom_dir / "images").glob("*.png"))[:2]
    result, output = invoke("predict", "--model", trained, *images, "--labels", "no_finding,cardiomegaly,nodule",
                            "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert len(predictions) == 2
    for item in predictions:
        assert item["prediction"] in ("no_finding", "cardiomegaly", "nodule")
        assert abs(sum(item["probabilities"].values()) - 1) < 1e-4


def test_predict_json_names_each_image_by_its_file_name_only(trained, phantom_dir, tmp_path):
    """medvl predict --json wrote each image's full path, with folders above that may name a patient; it names
    them as report generate and search do: by the last path component."""
    folder = tmp_path / "Doe_John_MRN12345"
    folder.mkdir()
    shutil.copy(sorted((phantom_dir / "images").glob("*.png"))[0], folder / "cxr.png")
    result, output = invoke("predict", "--model", trained, folder / "cxr.png", "--labels", "no_finding,nodule",
                            "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    assert [item["image"] for item in json.loads((tmp_path / "p.json").read_text())["predictions"]] == ["cxr.png"]
    assert "Doe_John" not in (tmp_path / "p.json").read_text()


def test_predict_takes_repeated_labels_and_refuses_an_undescribed_label_column(trained, phantom_dir, tmp_path):
    image = sorted((phantom_dir / "images").glob("*.png"))[0]
    result, output = invoke("predict", "--model", trained, image, "--labels", "no_finding,cardiomegaly",
                            "--labels", " nodule ", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, output
    answer = json.loads((tmp_path / "p.json").read_text())["predictions"][0]
    assert list(answer["probabilities"]) == ["no_finding", "cardiomegaly", "nodule"]  # every repeat, trimmed
    result, output = invoke("predict", "--model", trained, image, "--labels", "no_finding,cardiomegaly,no_finding",
                            "--labels", "nodule,cardiomegaly", "--json", tmp_path / "p.json", "--overwrite")
    assert result.exit_code == 0, output
    repeated = json.loads((tmp_path / "p.json").read_text())["predictions"][0]["probabilities"]
    assert repeated == pytest.approx(answer["probabilities"])  # a repeated name is one class: sums to 1 as before
    # a misspelt column used to fall back to the bare class names without a word
    result, output = invoke("predict", "--model", trained, image, "--labels", "no_finding,cardiomegaly",
                            "--label-column", "findings")
    assert result.exit_code == 2 and "unknown label column 'findings'; the captions describe finding" in output
    # two labels the tokenizer reads alike were two classes of one embedding, the probability split between them
    result, output = invoke("predict", "--model", trained, image, "--labels", "nodule,cardiomegaly,Cardiomegaly")
    assert result.exit_code == 2, output
    assert "labels 'cardiomegaly' and 'Cardiomegaly' read as the same text to the model" in " ".join(output.split())


@pytest.mark.parametrize("split", ["train", "all"])
def test_bench_medmnist_refuses_to_score_the_training_images(tiny_npz, tmp_path, split):
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", tiny_npz,
                            "--test-split", split, "--epochs", 1, "--json", tmp_path / "b.json", "-q")
    assert result.exit_code == 2 and "holds the training images" in " ".join(output.split())
    assert not (tmp_path / "b.json").exists()  # refused before any training


def test_bench_medmnist_reports_auc_and_acc(tiny_npz, tmp_path):
    test_only = tmp_path / "test_only.npz"
    source = np.load(tiny_npz)
    # other images than the train file's val (a copy of it would make the threshold data the scored images)
    np.savez(test_only, test_images=255 - source["val_images"], test_labels=source["val_labels"])
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", test_only,
                            "--test-split", "test", "--epochs", 1, "--json", tmp_path / "b.json", "-q")
    assert result.exit_code == 0, output
    metrics = json.loads((tmp_path / "b.json").read_text())
    assert 0 <= metrics["auc"] <= 1 and 0 <= metrics["acc"] <= 1
    assert metrics["threshold_from"].endswith(":val")


def test_demo_end_to_end_small(tmp_path):
    out = tmp_path / "demo"
    result, output = invoke("demo", "--out", out, "--n", 60, "--epochs", 1, "--model", "phantom-tiny",
                            "--size", 64, "--image-size", 0, "-q")
    assert result.exit_code == 0, output
    page = (out / "report.html").read_text()
    assert "zero-shot balanced accuracy" in page and "data:image/png;base64" in page
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results["zero_shot_balanced_accuracy"], float)
    # scored among every finding of the phantom, as medvl eval zero-shot is, though this small test split lacks one
    zero_shot = results["zero_shot"]
    findings = sorted({r.labels["finding"] for r in load_dataset(out / "data")})
    absent = [name for name in findings if zero_shot["per_class"][name]["support"] == 0]
    assert zero_shot["classes"] == findings and len(findings) == 6 and absent
    assert zero_shot["chance_balanced_accuracy"] == pytest.approx(1 / 6)
    assert f"<tr><td>{absent[0]}</td><td>0</td>" in page and "<td>-</td></tr>" in page  # no AUC, not 0.000


def test_demo_refuses_a_bad_model_before_making_any_data(tmp_path):
    result, output = invoke("demo", "--out", tmp_path / "demo", "--n", 60, "--model", "no-such-model", "-q")
    assert result.exit_code == 2 and "unknown model" in output, output
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("args, needle", [
    (["--size", 5], "size must be 32-2048 pixels, got 5"),
    (["--seed", -1], "seed"),
    (["--model", "ct3d-tiny"], "takes 3D volumes"),
])
def test_a_bad_demo_rerun_leaves_the_finished_demo_as_it_was(tmp_path, args, needle):
    """A bad --size / --seed or a 3D model is refused before the folder is touched: a finished demo keeps its
    report and results, and a new folder is not made."""
    out = tmp_path / "demo"
    out.mkdir()
    finished = {"demo.json": '{"n": 60, "seed": 0, "size": 32, "epochs": 1, "complete": true}',
                "results.json": '{"n": 60}', "report.html": "<html>the finished demo</html>"}
    for name, text in finished.items():
        (out / name).write_text(text)
    result, output = invoke("demo", "--out", out, "--n", 60, "--epochs", 1, *args, "-q")
    assert result.exit_code == 2 and needle in output, output
    assert {p.name: p.read_text() for p in out.iterdir()} == finished
    result, output = invoke("demo", "--out", tmp_path / "new", "--n", 60, "--epochs", 1, *args, "-q")
    assert result.exit_code == 2 and needle in output, output
    assert not (tmp_path / "new").exists()


def test_a_complete_demo_is_run_again_only_with_overwrite(tmp_path):
    """The same command rerun on a finished demo deleted its model folder, with the OOD guard, the ONNX export and
    any file the user had put there, and trained it again without a word."""
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--n", 60, "--epochs", 1, "--model", "phantom-tiny", "--size", 32,
            "--image-size", 0, "-q"]
    result, output = invoke(*args)
    assert result.exit_code == 0, output
    (out / "train" / "model" / "NOTES.txt").write_text("my notes")
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again, output = invoke(*args[:-1])  # the same command: the results of the run, nothing redone or deleted
    assert again.exit_code == 0 and "was complete: its results, not run again" in " ".join(output.split()), output
    assert f"{json.loads((out / 'results.json').read_text())['i2t_R@5']:.3f}" in output
    other, output = invoke(*args[:4], 72, *args[5:])  # other settings: refused
    assert other.exit_code == 2, output
    assert "holds a complete demo of other settings (n); --overwrite" in " ".join(output.split()), output
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    marker = json.loads((out / "demo.json").read_text())  # a demo finished before the marker named its model
    kept = ("n", "seed", "size", "epochs", "complete")
    (out / "demo.json").write_text(json.dumps({key: marker[key] for key in kept}))
    again, output = invoke(*args[:-1])  # the same: its results.json names the model and the image size
    assert again.exit_code == 0 and "not run again" in " ".join(output.split()), output
    other, output = invoke(*args[:8], "cxr-small", *args[9:])
    assert other.exit_code == 2 and "of other settings (model" in " ".join(output.split()), output
    redone, output = invoke(*args, "--overwrite")
    assert redone.exit_code == 0, output
    assert not (out / "train" / "model" / "NOTES.txt").exists() and (out / "report.html").is_file()


def test_an_interrupted_demo_is_continued_by_the_same_command(tmp_path):
    """Ctrl-C (a real SIGINT to ``python -m medvl demo``) once the demo's data is written leaves a folder the
    demo recognises as its own: the same command then runs to the end in it."""
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--n", 72, "--epochs", 1, "--model", "phantom-tiny", "--size", 64,
            "--image-size", 0, "-q"]
    process = subprocess.Popen([sys.executable, "-m", "medvl", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "data" / "manifest.csv").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 130 and not (out / "report.html").exists(), errors
    assert json.loads((out / "demo.json").read_text())["complete"] is False
    result, output = invoke(*args)
    assert result.exit_code == 0, output
    marker = json.loads((out / "demo.json").read_text())
    assert marker["complete"] is True and marker["n"] == 72 and (out / "report.html").is_file()
    # another run into it, interrupted: the earlier report and results go, not left to describe a deleted model
    again, output = invoke(*args[:4], "60", *args[5:])  # a complete demo is not replaced without --overwrite
    assert again.exit_code == 2, output
    assert "holds a complete demo of other settings (n); --overwrite" in " ".join(output.split()), output
    assert (out / "report.html").is_file() and json.loads((out / "demo.json").read_text())["complete"] is True
    process = subprocess.Popen([sys.executable, "-m", "medvl", *map(str, args[:4]), "60", *map(str, args[5:]),
                                "--overwrite"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while json.loads((out / "demo.json").read_text())["complete"]:
        assert process.poll() is None and time.monotonic() < deadline + 300, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=300)
    assert process.returncode == 130, errors
    assert not (out / "report.html").exists() and not (out / "results.json").exists()


# -- bad input: one line naming the file, exit code 2, no traceback, nothing written ------------

def assert_clean_failure(result, output, *needles):
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    for needle in needles:
        assert str(needle) in output


def test_corrupt_image_fails_cleanly(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    train_rows = [line for line in (data / "manifest.csv").read_text().splitlines() if ",train," in line]
    broken = data / train_rows[3].split(",")[0]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    out = tmp_path / "out"
    result, output = invoke("train", "--data", data, "--model", "phantom-tiny", "--out", out, "-q")
    assert_clean_failure(result, output, broken.name)
    assert not out.exists()


def test_npz_without_requested_split_fails_cleanly(tiny_npz, tmp_path):
    result, output = invoke("bench", "medmnist", "--train-data", tiny_npz, "--test-data", tiny_npz,
                            "--test-split", "test", "--json", tmp_path / "b.json", "-q")
    assert_clean_failure(result, output, tiny_npz.name, "test")
    assert not (tmp_path / "b.json").exists()


def test_unknown_label_column_fails_cleanly(phantom_dir, trained, tmp_path):
    result, output = invoke("eval", "zero-shot", "--model", trained, "--data", phantom_dir,
                            "--label-column", "no_such_column", "--json", tmp_path / "z.json", "-q")
    assert_clean_failure(result, output, "no_such_column", "manifest")
    assert not (tmp_path / "z.json").exists()


def test_empty_manifest_fails_cleanly(tmp_path):
    manifest = tmp_path / "empty.csv"
    manifest.write_text("")
    out = tmp_path / "out"
    result, output = invoke("train", "--data", manifest, "--model", "phantom-tiny", "--out", out, "-q")
    assert_clean_failure(result, output, "empty.csv")
    assert not out.exists()


def test_missing_model_folder_fails_cleanly(phantom_dir, tmp_path):
    result, output = invoke("eval", "retrieval", "--model", tmp_path / "nope", "--data", phantom_dir)
    assert_clean_failure(result, output, "nope")


def test_a_dataset_without_a_train_split_is_not_trained_on_whole_and_case_variants_are_said(phantom_dir, tmp_path):
    """Train / Val / Test: without --split the run would train on every record, test included: refused. A
    split column mixing 'train' and 'Train': the 'Train' records are left out of 'train', with a warning."""
    import csv

    rows = list(csv.DictReader((phantom_dir / "manifest.csv").open(newline="")))
    for name, rename in (("capital", lambda split, i: split.capitalize()),
                         ("mixed", lambda split, i: "Train" if split == "train" and i % 2 else split)):
        data = tmp_path / name
        shutil.copytree(phantom_dir, data)
        with (data / "manifest.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({**row, "split": rename(row["split"], i)} for i, row in enumerate(rows))
    result, output = invoke("train", "--data", tmp_path / "capital", "--model", "phantom-tiny", "--out",
                            tmp_path / "run", "--epochs", 1, "-q")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()
    splits = ", ".join(dict.fromkeys(row["split"].capitalize() for row in rows))
    assert f"no split 'train' (splits: {splits}); pass --split NAME" in " ".join(output.split())
    moved = sum(row["split"] == "train" and i % 2 for i, row in enumerate(rows))
    result, output = invoke("audit", "--data", tmp_path / "mixed", "--split", "train", "-q")
    assert result.exit_code == 0, output
    assert f"split 'train' leaves out {moved} records of split(s) 'Train'" in " ".join(output.split())


def test_label_columns_given_as_one_name_is_one_column(phantom_dir, tmp_path):
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--epochs", 1, "--train-set", 'label_columns="finding"', "-q")
    assert result.exit_code == 0, output  # it was read letter by letter: "unknown label column 'f'"
    assert json.loads((tmp_path / "run" / "model" / "meta.json").read_text())["label_columns"] == ["finding"]


@pytest.mark.parametrize("command, holds", [
    (("report", "generate"), "generated reports"), (("index", "add"), "counts"), (("index", "build"), "index"),
    (("index", "info"), "index"), (("predict",), "predictions"), (("vqa",), "answer"), (("audit",), "audit"),
    (("dicom-info",), "series"), (("eval", "zero-shot"), "metrics"),
])
def test_json_option_help_says_what_the_file_holds(command, holds):
    """Every --json said "Write the metrics to this JSON file", also where the file holds generated reports,
    index counts, predictions or answers."""
    import typer

    from medvl.cli.main import app

    group = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]  # type: ignore[attr-defined]
    (option,) = [p for p in group.params if "--json" in p.opts]
    assert option.help.startswith(f"Write the {holds}") and option.help.endswith("to this JSON file.")
