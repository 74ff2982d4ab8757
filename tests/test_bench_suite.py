"""``medvl bench run``: suites of tasks and trust checks over several models, on a real phantom and two
tiny models trained by ``medvl train``; results.json rows, report.html, resuming, and the errors a bad
suite gets before any work starts."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cli_helpers import invoke
from medvl.bench.html import skip_line
from medvl.bench.suite import load_suite, shipped_suites
from medvl.data import load_dataset
from medvl.errors import InputError
from serve_helpers import train_tiny_model

ROW_KEYS = {"model", "task", "dataset", "split", "metric", "value", "low", "high", "seed", "data_hashes", "versions"}


def write_suite(folder: Path, data: Path, **changes) -> Path:
    suite = {
        "name": "tiny", "seed": 0, "bootstrap": 200,
        "datasets": {"phantom": {"path": str(data), "split": "test", "train_split": "train",
                                 "calibration_split": "val", "label": "finding", "subgroups": ["sex", "view"]}},
        "tasks": [{"task": "zero-shot", "dataset": "phantom"}, {"task": "linear-probe", "dataset": "phantom"},
                  {"task": "few-shot", "dataset": "phantom", "shots": [1, 2], "repeats": 2},
                  {"task": "retrieval", "dataset": "phantom"}, {"task": "case-retrieval", "dataset": "phantom"}],
        "checks": ["sanity", "calibration", "subgroups", "corruption", "counterfactual", "shortcut", "ood"],
        "corruption": {"kinds": ["noise", "blur"], "severities": [1, 5], "max_images": 24},
        "counterfactual": {"n": 8, "size": 64},
    }
    suite.update(changes)
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def two_models(phantom_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-models")
    first = train_tiny_model(phantom_dir, folder / "alpha")
    second = train_tiny_model(phantom_dir, folder / "beta")
    return first, second


@pytest.fixture(scope="module")
def finished_run(two_models, phantom_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-run")
    suite = write_suite(folder, phantom_dir)
    out = folder / "out"
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--model", two_models[1],
                            "--out", out, "-q")
    assert result.exit_code == 0, output
    return suite, out, json.loads((out / "results.json").read_text())


def test_results_have_one_row_per_model_task_metric_with_intervals(finished_run):
    _, out, results = finished_run
    rows = results["rows"]
    assert {row["model"] for row in rows} == {"alpha", "beta"}
    assert {row["task"] for row in rows} == {"zero-shot", "linear-probe", "few-shot", "retrieval", "case-retrieval"}
    assert all(ROW_KEYS <= set(row) for row in rows)
    keys = [(r["model"], r["task"], r["dataset"], r.get("label"), r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    with_interval = [r for r in rows if r["low"] is not None]
    assert len(with_interval) >= 20
    assert all(r["low"] - 1e-9 <= r["value"] <= r["high"] + 1e-9 for r in with_interval if r["metric"] in (
        "auc", "accuracy", "balanced_accuracy", "i2t_R@5"))
    assert results["data_hashes"]["phantom"]["files"] > 96
    assert results["versions"]["torch"].startswith("2.13")
    metrics = {r["metric"] for r in rows}
    for expected in ("auc", "calibration: ece_before", "calibration: ece_after", "i2t_R@5",
                     "counterfactual: pair accuracy", "shortcut: masked balanced accuracy drop", "1-shot auc"):
        assert expected in metrics, expected
    assert any(m.startswith("sanity: ") for m in metrics)
    probe = {r["metric"] for r in rows if r["task"] == "linear-probe"}
    assert {"calibration: ece_before", "calibration: ece_after", "calibration: temperature"} <= probe
    # the Brier rows name their form (summed over the classes: twice the binary figure for two classes)
    brier = {"calibration: brier_before (sum over classes)", "calibration: brier_after (sum over classes)"}
    assert brier <= probe and brier <= metrics and not any(m.startswith("calibration: brier") for m in metrics - brier)
    assert any(m.startswith("subgroup sex=") for m in metrics)
    assert any(m.startswith("corruption noise s5") for m in metrics)
    assert (out / "report.html").stat().st_size > 10_000


def test_a_rerun_reuses_every_cell_and_a_changed_model_is_recomputed(finished_run, two_models, tmp_path):
    suite, out, results = finished_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--model", two_models[1],
                            "--out", copy, "-q")
    assert result.exit_code == 0, output
    again = json.loads((copy / "results.json").read_text())
    assert again["cells"] == {"total": 10, "computed": 0, "reused": 10}
    assert again["rows"] == results["rows"]
    # the second model changes: only its cells run again
    changed = tmp_path / "beta" / "model"
    shutil.copytree(two_models[1], changed)
    weights = next(changed.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: a different model
    weights.write_bytes(bytes(data))
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--model", changed,
                            "--out", copy, "-q")
    assert result.exit_code == 0, output
    assert json.loads((copy / "results.json").read_text())["cells"]["computed"] == 5


def test_the_report_draws_every_plot_in_chromium(finished_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip(f"{chromium} is not installed (scripts/chromium.sh install)")
    _, out, results = finished_run
    assert len(results["plots"]) >= 8
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((out / "report.html").resolve().as_uri())
        drawn = page.eval_on_selector_all(
            "img.plot", "imgs => imgs.map(i => [i.dataset.plot, i.complete && i.naturalWidth > 0])")
        browser.close()
    assert sorted(plot for plot, _ in drawn) == sorted(results["plots"])
    assert all(ok for _, ok in drawn), [plot for plot, ok in drawn if not ok]


@pytest.mark.parametrize("change, message", [
    ({"tasks": [{"task": "segmentation", "dataset": "phantom"}]}, "unknown task 'segmentation'"),
    ({"checks": ["sanity", "vibes"]}, "unknown check(s) vibes"),
    ({"tasks": [{"task": "zero-shot", "dataset": "chest"}]}, "names dataset 'chest'"),
    ({"tasks": [{"task": "vqa", "dataset": "phantom"}]}, "vqa needs a dataset of kind vqa"),
    ({"colour": "blue"}, "unknown key(s) colour"),
    ({"corruption": {"kinds": ["fog"]}}, "fog"),
    ({"corruption": {"severities": [6]}}, "severity"),
    ({"corruption": ["noise"]}, "expected a mapping"),
    ({"tasks": [{"task": "zero-shot", "dataset": "phantom"}, {"task": "zero-shot", "dataset": "phantom"}]},
     "zero-shot@phantom given twice"),
    ({"tasks": [{"task": "linear-probe", "dataset": "phantom", "covariates": 3}]},
     "covariates must be a list of column names or 'none'"),
    ({"tasks": [{"task": "linear-probe", "dataset": "phantom", "covariates": ["sex", "sex"]}]},
     "task 1: covariate column(s) sex given more than once"),
    ({"tasks": [{"task": "linear-probe", "dataset": "phantom", "covariates": ["agee"]}], "checks": ["sanity"]},
     "no record has a value for covariate column 'agee'"),
    ({"tasks": [{"task": "linear-probe", "dataset": "phantom", "checks": ["corruption", "sanity"]}]},
     "task linear-probe@phantom lists check(s) a linear-probe task cannot take: corruption applies to zero-shot"),
    ({"tasks": [{"task": "zero-shot", "dataset": "phantom", "label": ["finding"]}]},
     "task 1: label must be a name, got ['finding']"),
    ({"datasets": {"phantom": {"path": "PHANTOM", "split": 2020, "label": "finding"}}},
     "dataset 'phantom' has no split 2020"),
    ({"datasets": {"phantom": {"path": "PHANTOM", "label": "finding", "captions": "prompts.yaml"}}},
     "prompts.yaml: caption file of dataset 'phantom'"),
    ({"datasets": {"phantom": {"path": "PHANTOM", "train_split": None, "label": "finding"}}},
     "dataset 'phantom' has no train_split for task linear-probe@phantom"),  # not after the zero-shot cell ran
    ({"datasets": {"phantom": {"path": "PHANTOM", "split": None, "label": "finding"}}},
     "suite.yaml: dataset 'phantom': split must be a name, got None"),  # were tracebacks, exit 1
    ({"datasets": {"phantom": {"path": "PHANTOM", "label": "finding", "subgroups": [{"a": 1}]}}},
     "suite.yaml: dataset 'phantom': subgroups must be a list of column names, got {'a': 1} in it"),
    ({"datasets": {"phantom": {"path": "PHANTOM", "label": "finding", "subgroups": [2020]}}},
     "dataset 'phantom' has no column 2020 for subgroups"),
    ({"name": ["a", "b"]}, "suite.yaml: name must be a name, got ['a', 'b']"),  # ran as the suite "['a', 'b']"
    ({"name": {"a": 1}}, "suite.yaml: name must be a name, got {'a': 1}"),
    # a list inside a list of names: were TypeError tracebacks (unhashable type: 'list'), exit 1
    ({"checks": [["sanity"]]}, "suite.yaml: checks: expected check names, got ['sanity']"),
    ({"tasks": [{"task": "zero-shot", "dataset": "phantom", "checks": [["sanity"]]}]},
     "suite.yaml: task 1: checks: expected check names, got ['sanity']"),
    ({"corruption": {"kinds": [["noise"]], "severities": [1]}}, "suite.yaml: corruption kinds must be names (noise,"),
    # the suite's checks that run on no task: were dropped, and the run reported no flag and nothing skipped
    ({"tasks": [{"task": "retrieval", "dataset": "phantom"}, {"task": "few-shot", "dataset": "phantom", "shots": [1]}],
      "checks": ["sanity", "calibration", "ood"]},
     "the suite's check(s) calibration, ood run on none of its tasks (calibration applies to zero-shot, linear-probe; "
     "ood applies to zero-shot; the tasks taking the suite's checks: retrieval@phantom, few-shot@phantom)"),
    ({"tasks": [{"task": "zero-shot", "dataset": "phantom", "checks": ["sanity"]},
                {"task": "retrieval", "dataset": "phantom"}], "checks": ["ood"]},
     "the suite's check(s) ood run on none of its tasks (ood applies to zero-shot; the tasks taking the suite's "
     "checks: retrieval@phantom)"),
])
def test_a_bad_suite_is_refused_before_any_work(change, message, two_models, phantom_dir, tmp_path):
    change = json.loads(json.dumps(change).replace('"PHANTOM"', json.dumps(str(phantom_dir))))
    suite = write_suite(tmp_path, phantom_dir, **change)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2, output
    assert message in " ".join(output.split()), output
    assert not (tmp_path / "out").exists()


def test_a_suite_without_a_name_is_named_by_its_file(phantom_dir, tmp_path):
    """name is optional (the file's stem): a suite without it failed with KeyError: 'name' since a71cd46."""
    path = write_suite(tmp_path, phantom_dir)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    del raw["name"]
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert load_suite(unnamed).name == "unnamed"


def test_a_training_split_that_holds_scored_images_is_refused_before_any_model_runs(two_models, phantom_dir, tmp_path):
    spec = {"path": str(phantom_dir), "split": "test", "train_split": "test", "label": "finding"}
    tasks = [{"task": "zero-shot", "dataset": "phantom"}, {"task": "linear-probe", "dataset": "phantom"}]
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=[], tasks=tasks)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    test_size = len(load_dataset(phantom_dir).select("test"))
    assert result.exit_code == 2, output
    assert (f"task linear-probe@phantom: train_split 'test' of dataset 'phantom' holds {test_size} images of the "
            "scored split 'test'") in " ".join(output.split())
    assert not (tmp_path / "out" / "cells").exists()  # not even the zero-shot task ran


def test_a_training_split_that_copies_scored_images_is_a_flag_of_the_run(two_models, phantom_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(phantom_dir, copy)
    datasets = {"phantom": {"path": str(phantom_dir), "split": "test", "label": "finding"},
                "copy": {"path": str(copy), "split": "test", "train_split": "test", "label": "finding"}}
    tasks = [{"task": "linear-probe", "dataset": "phantom", "train_dataset": "copy"}]
    suite = write_suite(tmp_path, phantom_dir, datasets=datasets, checks=[], tasks=tasks)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    test_size = len(load_dataset(phantom_dir).select("test"))
    flag = (f"linear-probe@phantom (fitted on copy) / leak: {test_size} of {test_size} scored images of split "
            "'test' are byte-for-byte copies of images in train_split 'test' of dataset 'copy'")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["flags"] == [flag]
    assert flag in (tmp_path / "out" / "report.html").read_text().replace("&#x27;", "'")


def test_scoring_the_split_a_model_trained_on_is_a_flag_of_each_task(two_models, phantom_dir, tmp_path):
    spec = {"path": str(phantom_dir), "split": "train", "train_split": "val", "label": "finding"}
    tasks = [{"task": "zero-shot", "dataset": "phantom"}, {"task": "retrieval", "dataset": "phantom"}]
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=[], tasks=tasks)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    n_train = len(load_dataset(phantom_dir).select("train"))
    flags = json.loads((tmp_path / "out" / "results.json").read_text())["flags"]
    assert flags == [f"alpha / {task}@phantom / leak: the model was trained on split(s) train of this data: {n_train} "
                     f"of the {n_train} scored records are training figures, not a test"
                     for task in ("zero-shot", "retrieval")]


def test_the_leak_flag_counts_the_records_each_task_scores(phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    train = [row for row in rows if row["split"] == "train"]
    for row in train[:3]:
        row["finding"] = ""  # zero-shot does not score these
    for row in train[3:5]:
        row["text"] = ""  # retrieval does not score these
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = {"path": str(data), "split": "train", "train_split": "val", "label": "finding"}
    tasks = [{"task": "zero-shot", "dataset": "phantom"}, {"task": "retrieval", "dataset": "phantom"}]
    suite = write_suite(tmp_path, data, datasets={"phantom": spec}, checks=[], tasks=tasks)
    model = train_tiny_model(data, tmp_path / "run")  # trained on the edited data's train split
    result, output = invoke("bench", "run", suite, "--model", model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    flags = json.loads((tmp_path / "out" / "results.json").read_text())["flags"]
    counts = [re.search(r"(\d+) of the (\d+) scored records", flag).groups() for flag in flags]
    assert counts == [(str(len(train) - 3),) * 2, (str(len(train) - 2),) * 2], flags


def test_a_suite_file_that_is_not_utf8_or_not_yaml_is_refused_naming_the_file(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: r\xe9sum\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.yaml: not valid UTF-8 \(byte offset 7\); save it as UTF-8"):
        load_suite(latin1)
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"broken.yaml: not valid YAML at line 2, column 1: expected the node "
                                         r"content, but found '<stream end>'$"):
        load_suite(broken)  # one line: the place and the problem, not the parser's quoted snippet


def test_a_missing_dataset_path_split_or_column_is_refused_before_any_work(two_models, phantom_dir, tmp_path):
    suite = write_suite(tmp_path, tmp_path / "nowhere")
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2 and "nowhere" in output and "--data phantom=PATH" in " ".join(output.split())
    suite = write_suite(tmp_path, phantom_dir)
    for args, message in ((["--split", "phantom=holdout"], "no split holdout"),
                          (["--data", "chest=/tmp"], "no such dataset"),
                          (["--data", "phantom"], "NAME=VALUE")):
        result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out",
                                "-q", *args)
        assert result.exit_code == 2 and message in output, output
        assert not (tmp_path / "out" / "cells").exists()
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": {"path": str(phantom_dir), "label": "finding",
                                                                     "subgroups": ["blood_type"]}})
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2 and "no column blood_type" in output, output


def test_a_subgroup_column_of_free_text_is_refused_before_any_work_without_its_values(two_models, phantom_dir,
                                                                                       tmp_path):
    """A column of notes or identifiers made one group per record: each was listed by its value (a patient's name
    and MRN) as a group too small to score, in the console, results.json and report.html, and the run passed."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    rows = list(csv.DictReader((data / "manifest.csv").open(newline="")))
    for index, row in enumerate(rows):
        row["history"] = f"Mr Patient{index} aged {40 + index % 30}, smoker, MRN {100000 + index}"
        row["ward"] = ("A", "B", "C")[index % 3]  # a category: kept
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = {"path": str(data), "split": "test", "label": "finding", "subgroups": ["sex", "ward", "age", "history"]}
    suite = write_suite(tmp_path, data, datasets={"phantom": spec}, checks=["subgroups"],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2, output
    message = (f"{data}: dataset 'phantom': subgroup column 'history' has {len(rows)} distinct values in {len(rows)} "
               f"records, {len(rows)} of them in one record only; a subgroup is a category shared by records, not an "
               "identifier or free text")
    assert "".join(message.split()) in "".join(output.split()), output
    assert "Patient" not in output and "MRN" not in output
    assert not (tmp_path / "out").exists()


def test_notes_in_an_age_column_and_patient_ids_are_refused_and_unreadable_ages_are_counted_never_quoted():
    """A column whose name holds the word age (``age_note``) was exempt from the refusal by its name alone, and the
    first value that did not read as an age was quoted in the skipped reason ("e.g. 'Mr John Smith of 12 '"): in the
    console, results.json and report.html. Its values that are not ages are now held to the identifier rule, and
    unreadable ages are counted only."""
    from medvl.bench.runner import _unscored_groups
    from medvl.data.record import Record
    from medvl.eval.subgroups import check_group_column

    def records(values):
        return [Record(id=f"r{i}", images=[f"r{i}.png"], meta={"age_note": value}) for i, value in enumerate(values)]

    notes = [f"Mr Patient{i} seen aged {60 + i}" for i in range(6)]
    with pytest.raises(InputError, match=re.escape("subgroup column 'age_note' has 6 distinct values that are not "
                                                   "ages in 6 records, 6 of them in one record only")) as caught:
        check_group_column(records([str(40 + i % 30) for i in range(30)] + notes), "age_note")
    assert "Patient" not in str(caught.value)
    check_group_column(records([str(40 + i % 30) for i in range(30)] + ["67+", "67+", "early 40s", "early 40s"]),
                       "age_note")  # ages, and a few unreadable ones shared by records: a category, kept
    # a patient id over two images each: no value once, yet every group a patient, listed by its id as too small
    mrn = [Record(id=f"r{i}", images=[f"r{i}.png"], meta={"mrn": f"MRN{100 + i // 2}"}) for i in range(40)]
    with pytest.raises(InputError, match=re.escape("subgroup column 'mrn' has 20 distinct values in 40 records (under "
                                                   "3 records a value)")) as caught:
        check_group_column(mrn, "mrn")
    assert "MRN1" not in str(caught.value)
    check_group_column([Record(id=f"r{i}", images=[f"r{i}.png"], meta={"ward": f"W{i % 9}"}) for i in range(20)],
                       "ward")  # nine wards over 20 records: a category
    block = {"missing": 2, "too_small": {}, "groups": {}, "gap": None}
    reason = _unscored_groups(block, 40, 10, ["Mr John Smith of 12 Elm Street", "67+"])
    assert reason is not None and "2 of 40 have an age that cannot be read" in reason
    assert "Smith" not in reason and "67+" not in reason


def test_a_category_column_with_a_few_rare_values_is_kept_and_ids_or_notes_still_refused():
    """A view column of PA 88, AP 29 and three views seen once was refused as "an identifier or free text" (over
    half of its 5 values in one record): values seen once are an identifier or free text only when they hold a
    quarter of the records with a value. The big groups are scored, the rare ones too small."""
    import numpy as np

    from medvl.data.record import Record
    from medvl.eval.subgroups import check_group_column, groups_from_records, subgroup_metrics

    def records(values):
        return [Record(id=f"r{i}", images=[f"r{i}.png"], meta={"view": value}) for i, value in enumerate(values)]

    views = records(["PA"] * 88 + ["AP"] * 29 + ["AP supine", "PA lordotic", "lateral decubitus"])
    check_group_column(views, "view")
    y_true = np.arange(len(views)) % 2
    probabilities = np.stack([1 - y_true * 0.8 - 0.1, y_true * 0.8 + 0.1], axis=1)
    block = subgroup_metrics(y_true, probabilities, groups_from_records(views, ["view"]), resamples=20)
    assert sorted(block["columns"]["view"]["groups"]) == ["AP", "PA"]
    # values too rare to score are counted, never named (such a value may be a note), in results and words
    assert block["columns"]["view"]["too_small"] == {}
    assert block["columns"]["view"]["unnamed_small_groups"] == 3
    from medvl.bench.runner import _unscored_groups
    words = _unscored_groups(block["columns"]["view"], len(views), 10, [])
    assert "3 values under 10 records not scored (3 records; values not shown)" in words
    assert "decubitus" not in words
    # one patient's note on two films passes the identifier rule: it is counted too, never shown (docs probe)
    noted = records(["PA"] * 88 + ["AP"] * 29 + ["Mr Doe MRN 4711 seen at home"] * 2)
    check_group_column(noted, "view")
    block = subgroup_metrics(y_true[:119], probabilities[:119], groups_from_records(noted, ["view"]), resamples=20)
    column = block["columns"]["view"]
    assert column["too_small"] == {} and (column["unnamed_small_groups"], column["unnamed_small_records"]) == (1, 2)
    assert "Doe" not in json.dumps(column) and "Doe" not in _unscored_groups(column, len(noted), 10, [])
    # 30 notes beside 90 records in two groups: the single-record values hold a quarter of the records, refused
    # (a patient id over two images each stays refused by the other rule: the test above)
    notes = records(["PA"] * 60 + ["AP"] * 30 + [f"Mr Patient{i} seen at home" for i in range(30)])
    with pytest.raises(InputError, match=re.escape("subgroup column 'view' has 32 distinct values in 120 records, 30 "
                                                   "of them in one record only")) as caught:
        check_group_column(notes, "view")
    assert "Patient" not in str(caught.value)


def test_a_model_that_cannot_do_a_task_is_refused_before_any_work(two_models, phantom_dir, tmp_path):
    vqa_model = tmp_path / "vqa-model"
    vqa_model.mkdir()
    (vqa_model / "config.json").write_text(json.dumps({"kind": "vqa"}))
    suite = write_suite(tmp_path, phantom_dir)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--model", vqa_model,
                            "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2, output
    assert "cannot do task zero-shot" in " ".join(output.split()), output
    assert not (tmp_path / "out").exists()


def test_one_model_given_twice_is_refused_before_any_work(two_models, phantom_dir, tmp_path):
    """Its run folder and its model/, or the folder through a link: every cell would be scored twice under two
    names."""
    suite = write_suite(tmp_path, phantom_dir, tasks=[{"task": "zero-shot", "dataset": "phantom"}], checks=[])
    (tmp_path / "link").symlink_to(two_models[0])
    for other in (two_models[0].parent, tmp_path / "link"):
        result, output = invoke("bench", "run", suite, "--model", two_models[0], "--model", other,
                                "--out", tmp_path / "out", "-q")
        message = f"the same model folder is given twice ({two_models[0]} and {other}): a suite scores each model once"
        assert result.exit_code == 2 and message in " ".join(output.split()), output
        assert not (tmp_path / "out").exists()


def test_an_output_folder_of_something_else_is_refused(two_models, phantom_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    suite = write_suite(tmp_path, phantom_dir)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2 and "not a bench run folder" in output, output


def test_a_damaged_state_file_is_refused_in_one_line_and_a_damaged_cell_file_is_scored_again(two_models, phantom_dir,
                                                                                               tmp_path):
    """suite.json cut short, not UTF-8 or not an object was a traceback (exit 1), with --overwrite too; a cell file
    holding a list crashed where an unparsable one was scored again."""
    suite = write_suite(tmp_path, phantom_dir, tasks=[{"task": "zero-shot", "dataset": "phantom"}], checks=[])
    out = tmp_path / "out"
    args = ("bench", "run", suite, "--model", two_models[0], "--out", out, "-q")
    result, output = invoke(*args)
    assert result.exit_code == 0, output
    state = out / "suite.json"
    for damaged, problem in ((b'{"suite":\n', "not JSON: Expecting value at line 2"), (b"\xff\xfe{", "not UTF-8 text"),
                             (b"[1, 2]", "a JSON list, not an object")):
        state.write_bytes(damaged)
        result, output = invoke(*args)
        assert result.exit_code == 2, output
        assert f"{state}: not a bench run state file ({problem}); use a new --out, or --overwrite" in \
            " ".join(output.split()), output
    result, output = invoke(*args, "--overwrite")
    assert result.exit_code == 0, output
    for damaged in (b"[]", b"\xff\xfe{"):
        for cell in (out / "cells").glob("*.json"):
            cell.write_bytes(damaged)
        result, output = invoke(*args)
        assert result.exit_code == 0, output
        assert json.loads((out / "results.json").read_text())["cells"] == {"total": 1, "computed": 1, "reused": 0}


@pytest.mark.parametrize("damage", [
    {"rows": None}, {"rows": {"a": 1}}, {"rows": [{"metric": None}]}, {"rows": [{"metric": "auc", "value": "high"}]},
    {"flags": None}, {"flags": [None]}, {"skipped": 1.5}, {"skipped": {"sanity": [{}]}}, {"plots": "x"},
    {"skipped_metrics": None}, {"skipped_metrics": {"16-shot": 3}},
    {"model": ["x"]}, {"dataset": None},
    # docs probe: rows without their model (KeyError in every rerun), or naming another model and task
    {"each_row": {"model": None}}, {"each_row": {"model": "other-model", "key": "other-task"}},
])
def test_a_cell_file_damaged_behind_its_fingerprint_is_scored_again(damage, two_models, phantom_dir, tmp_path):
    """A cell file whose fingerprint matches was reused as it was: damaged rows, flags, skipped checks or names
    crashed every rerun (TypeError / AttributeError / KeyError in the results or the report). It is scored again,
    with a warning naming the file."""
    suite = write_suite(tmp_path, phantom_dir, tasks=[{"task": "zero-shot", "dataset": "phantom"}], checks=[])
    out = tmp_path / "out"
    args = ("bench", "run", suite, "--model", two_models[0], "--out", out, "-q")
    result, output = invoke(*args)
    assert result.exit_code == 0, output
    [path] = (out / "cells").glob("*.json")
    damage, cell = dict(damage), json.loads(path.read_text())
    each_row = damage.pop("each_row", {})
    for row in cell["rows"]:
        row.update(each_row)
    (path.write_text(json.dumps({**cell, **damage})))
    result, output = invoke(*args)
    assert result.exit_code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert results["cells"] == {"total": 1, "computed": 1, "reused": 0} and results["rows"]
    assert f"scoring again, its cell file {path.name} is damaged" in " ".join(output.split()), output
    assert json.loads(path.read_text())["rows"] == results["rows"]  # written again, whole


def test_a_cell_computed_under_another_library_version_is_scored_again(two_models, phantom_dir, tmp_path,
                                                                      monkeypatch, caplog):
    """The fingerprint covered medvl's version and code but not torch / numpy / scikit-learn: after an upgrade a
    rerun reused figures the new versions would not give, under results.json's new versions. A run whose recorded
    torch version differs (the installed one stands in for an upgrade) scores the cell again and says why."""
    import logging

    from medvl.bench import runner

    suite = write_suite(tmp_path, phantom_dir, tasks=[{"task": "zero-shot", "dataset": "phantom"}], checks=[])
    installed = runner.package_versions()
    monkeypatch.setattr(runner, "package_versions", lambda: {**installed, "torch": "2.0.0"})
    first = runner.run_suite(load_suite(suite), [two_models[0]], tmp_path / "out", show_progress=False)
    assert first["cells"]["computed"] == 1
    assert runner.run_suite(load_suite(suite), [two_models[0]], tmp_path / "out",
                            show_progress=False)["cells"]["reused"] == 1  # same versions: reused
    monkeypatch.setattr(runner, "package_versions", lambda: installed)
    with caplog.at_level(logging.INFO, logger="medvl.bench.runner"):
        again = runner.run_suite(load_suite(suite), [two_models[0]], tmp_path / "out", show_progress=False)
    assert again["cells"] == {"total": 1, "computed": 1, "reused": 0}
    assert "these changed: torch's version" in caplog.text
    assert {row["versions"]["torch"] for row in again["rows"]} == {installed["torch"]}


@pytest.mark.parametrize("name", ["phantom", "pneumoniamnist", "isic", "medpix"])
def test_every_shipped_suite_parses_and_names_its_data(name, tmp_path, monkeypatch):
    assert name in shipped_suites()
    monkeypatch.delenv("MEDVL_DATA", raising=False)
    suite = load_suite(name, data={dataset: str(tmp_path) for dataset in load_suite_names(name)})
    assert suite.tasks and all(task.dataset in suite.datasets for task in suite.tasks)
    assert all(suite.datasets[d].path == str(tmp_path) for d in suite.datasets)


def load_suite_names(name: str) -> list[str]:
    from medvl.bench.suite import suite_path

    return list(yaml.safe_load(suite_path(name).read_text())["datasets"])


def test_a_shipped_suite_without_its_data_says_how_to_give_it(two_models, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVL_DATA", raising=False)
    result, output = invoke("bench", "run", "pneumoniamnist", "--model", two_models[0], "--out", tmp_path / "o")
    assert result.exit_code == 2, output
    text = " ".join(output.split())
    assert "set MEDVL_DATA or give its location with --data pneumoniamnist=PATH" in text, output


VQA_TINY = ["--image-model", "phantom-tiny", "--image-size", "32", "--question-encoder", "bert", "--hidden-size", "32",
            "--fusion-layers", "1", "--set", "text.hidden_size=32", "--set", "text.intermediate_size=64",
            "--set", "text.num_layers=1", "--batch-size", "32", "--quiet"]


def test_a_vqa_suite_scores_accuracy_beside_the_blank_image_and_question_only_baselines(tmp_path):
    from medvl.data.phantom import generate_phantom

    data = tmp_path / "phantom"
    generate_phantom(data, n=60, seed=5, size=32, vqa=True, vqa_per_case=4)
    result, output = invoke("train", "vqa", "--data", data / "vqa", "--out", tmp_path / "vqa", "--epochs", "1",
                            "--max-steps", "2", *VQA_TINY)
    assert result.exit_code == 0, output
    suite = tmp_path / "vqa.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "phantom-vqa", "bootstrap": 200,
        "datasets": {"questions": {"path": str(data / "vqa"), "kind": "vqa", "split": "test"}},
        "tasks": [{"task": "vqa", "dataset": "questions"}], "checks": ["sanity"]}))
    result, output = invoke("bench", "run", suite, "--model", tmp_path / "vqa", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["metric"]: row for row in results["rows"]}
    overall = rows["overall_accuracy"]
    assert overall["low"] <= overall["value"] <= overall["high"]
    assert results["bootstrap_unit"] == {"questions": "question image"}  # 4 questions a film: films are drawn
    assert "sanity: blank image overall_accuracy" in rows and "sanity: question only overall_accuracy" in rows
    assert any(plot.endswith("/per_question_type") for plot in results["plots"])
    # a dual encoder cannot answer questions: refused before any work
    result, output = invoke("bench", "run", suite, "--model", tmp_path / "vqa", "--model",
                            train_tiny_model(data, tmp_path / "dual"), "--out", tmp_path / "out2", "-q")
    assert result.exit_code == 2 and "cannot do task vqa" in " ".join(output.split()), output


def test_a_vqa_suite_scores_the_questions_a_model_held_out(tmp_path):
    """Split ``heldout`` of a question file names the questions a model held out of its training (medvl eval vqa
    --split heldout); bench run refused it ("the model holds out no questions") for every model. It now scores
    each model's own held-out questions, as eval vqa does, and refuses a model that holds none out before any
    model runs."""
    from medvl.data.phantom import generate_phantom
    from medvl.models.vqa import load_vqa_model

    data = tmp_path / "phantom"
    generate_phantom(data, n=60, seed=5, size=32, vqa=True, vqa_per_case=4)
    result, output = invoke("train", "vqa", "--data", data / "vqa", "--out", tmp_path / "held", "--epochs", "1",
                            "--max-steps", "2", "--holdout", "0.2", "--split", "all", *VQA_TINY)
    assert result.exit_code == 0, output
    suite = tmp_path / "held.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "phantom-vqa-held", "bootstrap": 200,
        "datasets": {"questions": {"path": str(data / "vqa"), "kind": "vqa", "split": "heldout"}},
        "tasks": [{"task": "vqa", "dataset": "questions"}]}))
    result, output = invoke("bench", "run", suite, "--model", tmp_path / "held", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    rows = {row["metric"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    result, output = invoke("eval", "vqa", "--model", tmp_path / "held", "--data", data / "vqa", "--split", "heldout",
                            "--json", tmp_path / "eval.json", "-q")
    assert result.exit_code == 0, output
    scored = json.loads((tmp_path / "eval.json").read_text())
    held = len(load_vqa_model(tmp_path / "held").meta["holdout"]["questions"])
    assert scored["n"] == held  # the same questions: the same accuracy
    assert rows["overall_accuracy"]["value"] == pytest.approx(scored["overall_accuracy"])
    # a model trained without --holdout: refused before anything is scored
    result, output = invoke("train", "vqa", "--data", data / "vqa", "--out", tmp_path / "all", "--epochs", "1",
                            "--max-steps", "2", *VQA_TINY)
    assert result.exit_code == 0, output
    result, output = invoke("bench", "run", suite, "--model", tmp_path / "held", "--model", tmp_path / "all",
                            "--out", tmp_path / "out2", "-q")
    text = " ".join(output.split())
    assert result.exit_code == 2 and "holds out no questions" in text and str(tmp_path / "all") in text, output
    assert not list((tmp_path / "out2").glob("cells/*.json"))


def test_a_report_suite_scores_the_generator_beside_the_nearest_report(phantom_dir, tmp_path):
    """The generator's and the nearest report's figures, each interval drawn by case on data with case ids (a case
    with several reports counts once per draw): ``report_intervals`` with the scored reports' cases."""
    from medvl.eval.report import evaluate_report_generator, report_intervals
    from medvl.models.decoder import load_report_generator

    data = tmp_path / "data"
    _with_case_ids(phantom_dir, data)
    tiny = ["--set", "decoder.hidden_size=32", "--set", "decoder.num_heads=2", "--set", "decoder.num_layers=1",
            "--set", "decoder.intermediate_size=64", "--set", "decoder.max_length=48",
            "--set", "decoder.vocab_size=400"]
    result, output = invoke("train", "report", "--data", data, "--out", tmp_path / "gen", "--image-model",
                            "phantom-tiny", "--epochs", "1", "--max-steps", "2", "--batch-size", "16", "-q", *tiny)
    assert result.exit_code == 0, output
    suite = tmp_path / "report.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "phantom-report", "bootstrap": 200,
        "datasets": {"phantom": {"path": str(data), "split": "test", "train_split": "train"}},
        "tasks": [{"task": "report", "dataset": "phantom"}], "checks": ["sanity"]}))
    result, output = invoke("bench", "run", suite, "--model", tmp_path / "gen", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["bootstrap_unit"] == {"phantom": "case_id"}
    rows = {row["metric"]: row for row in results["rows"]}
    for metric in ("bleu_4", "rouge_l", "cider", "micro_f1"):
        assert rows[metric]["value"] is not None and f"sanity: nearest_report {metric}" in rows, metric
    dataset = load_dataset(data)
    scored = evaluate_report_generator(load_report_generator(tmp_path / "gen"), dataset.select("test"),
                                       dataset.select("train"), show_progress=False, keep_texts=True)["texts"]
    cases = [record.labels.get("case_id", record.meta.get("case_id")) for record in dataset.select("test")]
    assert len(scored["references"]) == len(cases) and len(set(cases)) < len(cases)
    for source, name in (("generated", ""), ("nearest", "sanity: nearest_report ")):
        expected = report_intervals(scored["references"], scored[source], resamples=200, seed=0, groups=cases)
        for metric, interval in expected.items():
            row = rows[f"{name}{metric}"]
            assert (row["low"], row["high"]) == pytest.approx((interval["low"], interval["high"]), abs=1e-12), metric


def test_a_failing_task_input_is_found_before_anything_is_written(two_models, phantom_dir, tmp_path):
    """A probe whose scored split holds a class its training split lacks is refused before any cell runs,
    naming the training split; a failed rerun into a finished folder leaves no results of the earlier suite
    beside the new suite.json."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    rows = list(csv.DictReader((data / "manifest.csv").open(newline="")))
    moved = sorted({row["finding"] for row in rows if row["split"] == "test"})[0]
    for row in rows:
        if row["split"] == "train" and row["finding"] == moved:
            row["split"] = "val"
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    first = write_suite(tmp_path / "first", data, tasks=[{"task": "retrieval", "dataset": "phantom"}], checks=[])
    result, output = invoke("bench", "run", first, "--model", two_models[0], "--out", out, "-q")
    assert result.exit_code == 0 and (out / "results.json").is_file(), output
    second = write_suite(tmp_path / "second", data, tasks=[{"task": "retrieval", "dataset": "phantom"},
                                                {"task": "linear-probe", "dataset": "phantom"}], checks=[])
    result, output = invoke("bench", "run", second, "--model", two_models[0], "--out", out, "-q")
    assert result.exit_code == 2, output
    assert "train_split 'train'" in output and "not in training classes" in " ".join(output.split())
    assert moved in output
    assert len(list((out / "cells").glob("*.json"))) == 1  # the first run's cell only: nothing ran
    assert json.loads((out / "suite.json").read_text())["suite"]["tasks"] == [
        {**json.loads(json.dumps(load_suite(first).tasks[0].__dict__))}]  # the finished run's suite, untouched
    # a rerun that fails inside a task (a model whose weights are cut short loads only there): the earlier
    # results go, suite.json is the new run's
    broken = tmp_path / "broken" / "model"
    shutil.copytree(two_models[0], broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    result, output = invoke("bench", "run", first, "--model", broken, "--out", out, "-q")
    assert result.exit_code == 2, output
    assert not (out / "results.json").exists() and not (out / "report.html").exists()
    assert list(json.loads((out / "suite.json").read_text())["models"].values()) == [str(broken)]


def test_a_probe_calibration_class_training_lacks_is_refused_before_any_task_runs(two_models, phantom_dir, tmp_path):
    """The probe refused such a calibration split only once it ran, after the zero-shot cell was scored and written."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    rows = list(csv.DictReader((data / "manifest.csv").open(newline="")))
    next(row for row in rows if row["split"] == "val")["finding"] = "rare_thing"
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    suite = write_suite(tmp_path, data, tasks=[{"task": "zero-shot", "dataset": "phantom"},
                                               {"task": "linear-probe", "dataset": "phantom"}], checks=["calibration"])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2, output
    message = (f"{suite}: task linear-probe@phantom: calibration_split 'val': {data / 'manifest.csv'}: calibration "
               "classes ['rare_thing'] not in training classes")
    assert "".join(message.split()) in "".join(output.split()), output
    assert not list((tmp_path / "out").glob("cells/*.json"))  # nothing ran


def test_a_probe_calibration_split_holding_its_training_images_is_refused_before_any_work(two_models, phantom_dir,
                                                                                          tmp_path):
    """A temperature and abstention threshold fitted on the probe's own (over-confident) training predictions
    calibrate nothing: the suite is refused naming the task and both splits, and so is the library call."""
    from medvl import load_model
    from medvl.eval.linear_probe import linear_probe

    spec = {"path": str(phantom_dir), "split": "test", "train_split": "train", "calibration_split": "train",
            "label": "finding"}
    tasks = [{"task": "zero-shot", "dataset": "phantom"}, {"task": "linear-probe", "dataset": "phantom"}]
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=["calibration"], tasks=tasks)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    train = load_dataset(phantom_dir).select("train")
    assert result.exit_code == 2, output
    assert (f"task linear-probe@phantom: the calibration split 'train' of dataset 'phantom' holds {len(train)} images "
            "of the train_split 'train' of dataset 'phantom'") in " ".join(output.split()), output
    assert not (tmp_path / "out" / "cells").exists()  # not even the zero-shot task ran
    with pytest.raises(InputError, match=f"{len(train)} of the {len(train)} calibration records have an image the "
                                         "probe is fitted on"):
        linear_probe(load_model(two_models[0]), train, load_dataset(phantom_dir).select("test"), "finding",
                     few_shot=(), show_progress=False, calibration_data=train)


def test_calibration_images_copied_from_the_scored_split_are_a_flag_of_the_run(two_models, phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    rows = list(csv.DictReader((data / "manifest.csv").open(newline="")))
    test, val = [r for r in rows if r["split"] == "test"], [r for r in rows if r["split"] == "val"]
    for fitted, scored in zip(val, test, strict=False):  # each val film a byte copy of a test film, same labels
        shutil.copyfile(data / scored["image"], data / fitted["image"])
        fitted.update({key: value for key, value in scored.items() if key not in ("image", "split", "id")})
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    copied = min(len(val), len(test))
    suite = write_suite(tmp_path, data, tasks=[{"task": "zero-shot", "dataset": "phantom"}], checks=["calibration"])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    flags = json.loads((tmp_path / "out" / "results.json").read_text())["flags"]
    assert (f"zero-shot@phantom / leak: {copied} of {len(test)} scored images of split 'test' are byte-for-byte "
            "copies of images in the calibration split 'val' of dataset 'phantom'") in flags


def test_tasks_fitted_on_different_datasets_are_two_rows_sections_and_summary_lines(two_models, phantom_dir,
                                                                                    tmp_path):
    datasets = {"phantom": {"path": str(phantom_dir), "split": "test", "label": "finding"},
                "other": {"path": str(phantom_dir), "split": "test", "train_split": "train", "label": "finding"}}
    tasks = [{"task": "linear-probe", "dataset": "phantom", "covariates": "none"},
             {"task": "linear-probe", "dataset": "phantom", "train_dataset": "other", "covariates": "none"}]
    suite = write_suite(tmp_path, phantom_dir, datasets=datasets, tasks=tasks, checks=[])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = [row for row in results["rows"] if row["metric"] == "auc"]
    assert sorted((row["key"], row["train_dataset"]) for row in rows) == [
        ("linear-probe@phantom", "phantom"), ("linear-probe@phantom (fitted on other)", "other")]
    text = " ".join(output.split())
    assert "linear-probe@phantom auc" in text and "linear-probe@phantom (fitted on other) auc" in text
    page = (tmp_path / "out" / "report.html").read_text()
    assert "linear-probe on phantom (test, label finding)" in page
    assert "linear-probe on phantom (test, label finding, fitted on other)" in page


def test_keys_that_slug_alike_keep_their_own_cells_and_resume(two_models, phantom_dir, tmp_path):
    datasets = {"ph": {"path": str(phantom_dir), "split": "test", "label": "finding"},
                "ph_sex": {"path": str(phantom_dir), "split": "val", "label": "finding"}}
    tasks = [{"task": "zero-shot", "dataset": "ph", "label": "sex"}, {"task": "zero-shot", "dataset": "ph_sex"}]
    suite = write_suite(tmp_path, phantom_dir, datasets=datasets, tasks=tasks, checks=[])
    for computed in (2, 0):
        result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
        assert result.exit_code == 0, output
        assert json.loads((tmp_path / "out" / "results.json").read_text())["cells"]["computed"] == computed
    assert len(list((tmp_path / "out" / "cells").glob("*.json"))) == 2


def test_a_changed_caption_file_is_scored_again_and_its_path_is_the_suite_files(two_models, phantom_dir, tmp_path):
    (tmp_path / "prompts").mkdir()
    captions = tmp_path / "prompts" / "captions.yaml"
    captions.write_text('templates: ["a chest x-ray showing {}."]\n', encoding="utf-8")
    datasets = {"phantom": {"path": str(phantom_dir), "split": "test", "label": "finding",
                            "captions": "prompts/captions.yaml"}}
    suite = write_suite(tmp_path, phantom_dir, datasets=datasets, tasks=[{"task": "zero-shot", "dataset": "phantom"}],
                        checks=[])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = Path.cwd()
    os.chdir(elsewhere)  # the caption path is the suite file's, not the working folder's
    try:
        aucs = []
        for template, computed in (("a chest x-ray showing {}.", 1), ("a chest x-ray showing {}.", 0),
                                   ("radiograph, finding: {}", 1)):
            captions.write_text(f'templates: ["{template}"]\n', encoding="utf-8")
            result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
            assert result.exit_code == 0, output
            results = json.loads((tmp_path / "out" / "results.json").read_text())
            assert results["cells"]["computed"] == computed
            aucs.append(next(row["value"] for row in results["rows"] if row["metric"] == "auc"))
    finally:
        os.chdir(cwd)
    assert aucs[0] == aucs[1] != aucs[2]


def test_few_shot_sizes_a_class_cannot_fill_are_named_as_skipped_metrics_not_checks(two_models, phantom_dir,
                                                                                     tmp_path):
    """A shot count a class cannot fill is a figure of the task not scored: it was counted as a skipped check, and the
    report's flag section said that checks "did not pass" in a suite that asked for none."""
    suite = write_suite(tmp_path, phantom_dir, tasks=[{"task": "few-shot", "dataset": "phantom", "shots": [1, 500],
                                                       "repeats": 2}], checks=[])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    cell = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())
    assert cell["skipped"] == {} and "fewer than 500 training images" in cell["skipped_metrics"]["500-shot"]
    assert {row["metric"] for row in cell["rows"]} == {"1-shot auc", "1-shot accuracy"}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["skipped"] == [] and [(s["model"], s["key"], s["metric"]) for s in results["skipped_metrics"]] == [
        ("alpha", "few-shot@phantom", "500-shot")]
    reason = results["skipped_metrics"][0]["reason"]  # every class short of 500 named, with its count
    assert reason.startswith(f"{len(load_dataset(phantom_dir).select('train').classes('finding'))} classes '")
    flat = " ".join(output.split())
    assert "skipped checks │ 0" in flat and "skipped metrics │ 1" in flat, output
    assert f"skipped metric alpha / few-shot@phantom / 500-shot: {reason}" in flat, output
    report = (tmp_path / "out" / "report.html").read_text().replace("&#x27;", "'")
    assert "No check flagged any model." in report and "did not pass" not in report
    assert f"Not scored: alpha: 500-shot: {reason}" in report



def _ood_check_of_a_guard(model_dir, phantom_dir, tmp_path, *fit_options) -> dict:
    """results.json of the ood check on the phantom's test split, for a copy of ``model_dir`` (tmp_path / "guarded")
    given a guard by ``medvl ood fit`` with ``fit_options``."""
    model = tmp_path / "guarded"
    shutil.copytree(model_dir, model)
    result, output = invoke("ood", "fit", "--model", model, "--data", phantom_dir, *fit_options, "-q")
    assert result.exit_code == 0, output
    spec = {"path": str(phantom_dir), "split": "test", "label": "finding"}
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=["ood"],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_an_ood_row_on_the_split_the_guard_was_calibrated_on_is_a_leak_flag(two_models, phantom_dir, tmp_path):
    """A guard calibrated on the scored split set its threshold on those very images: the ood row is flagged."""
    results = _ood_check_of_a_guard(two_models[0], phantom_dir, tmp_path, "--calibration-split", "test")
    n_test = len(load_dataset(phantom_dir).select("test"))
    flags = results["flags"]
    assert (f"guarded / zero-shot@phantom / leak: the OOD guard was calibrated on split(s) test of this data: {n_test} "
            f"of the {n_test} scored records; the share it flags among them is not a test") in flags, flags


def test_the_ood_check_flags_only_a_share_significantly_above_what_the_guard_flags_by_design(two_models, phantom_dir,
                                                                                             tmp_path):
    """A guard at quantile 0.8 flags about 20 % of in-distribution images on purpose: scoring another split of its
    own phantom raised the ood flag (any share above a fixed 5 %). The share is now tested against the guard's own
    expected share (one-sided beta-binomial: the threshold is drawn from the calibration split), and both are
    stored."""
    import math

    from scipy.stats import betabinom

    results = _ood_check_of_a_guard(two_models[0], phantom_dir, tmp_path, "--split", "train", "--calibration-split",
                                    "val", "--quantile", "0.8")
    row = next(row for row in results["rows"] if row["metric"] == "ood: flagged share")
    from medvl.models.ood import OODGuard

    info = OODGuard.load(tmp_path / "guarded").info
    expected = info["expected_flagged_share"]
    assert row["expected_flagged_share"] == expected > 0.1
    flagged = round(row["value"] * row["n"])
    assert row["value"] > 0.05  # flagged by the old fixed 5 % rule
    rank = math.ceil((info["calibration_images"] + 1) * 0.8 - 1e-9)  # the threshold's rank among the calibration
    assert row["test"] == "beta-binomial" and row["p_value"] == pytest.approx(
        betabinom.sf(flagged - 1, row["n"], info["calibration_images"] + 1 - rank, rank))
    assert row["p_value"] >= 0.01 and not any("/ ood:" in flag for flag in results["flags"]), results["flags"]
    assert any(r["metric"] == "ood: expected flagged share (in distribution)" and r["value"] == expected
               for r in results["rows"])


def test_checks_of_2d_images_are_skipped_for_a_3d_model_and_refused_in_its_task_list(tmp_path):
    """corruption and shortcut transform or mask 2D images: with a CT model, the suite's list skips them with the
    reason (named in the cell and the report) instead of failing after the task ran; a task's own list naming them
    is refused before any work."""
    import medvl
    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "ct", n=24, seed=1, size=32, kind="ct3d", progress=False)
    model = tmp_path / "ct-model"
    medvl.create_model("ct3d-tiny").save_pretrained(model)
    spec = {"path": str(tmp_path / "ct"), "split": "test", "label": "finding"}
    suite = write_suite(tmp_path, tmp_path / "ct", datasets={"ct": spec}, checks=["sanity", "shortcut", "corruption"],
                        tasks=[{"task": "zero-shot", "dataset": "ct"}])
    result, output = invoke("bench", "run", suite, "--model", model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    cell = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())
    assert set(cell["skipped"]) == {"shortcut", "corruption"}
    assert all("defined for 2D images; this model takes 3D volumes" in reason for reason in cell["skipped"].values())
    assert any(row["metric"].startswith("sanity: ") for row in cell["rows"])
    assert "shortcut: masking a region is defined for 2D images" in (tmp_path / "out" / "report.html").read_text()
    suite = write_suite(tmp_path, tmp_path / "ct", datasets={"ct": spec}, checks=[],
                        tasks=[{"task": "zero-shot", "dataset": "ct", "checks": ["sanity", "shortcut"]}])
    result, output = invoke("bench", "run", suite, "--model", model, "--out", tmp_path / "out2", "-q")
    assert result.exit_code == 2, output
    assert "takes 3D volumes, and task zero-shot@ct of" in " ".join(output.split()) and "shortcut" in output
    assert not (tmp_path / "out2").exists()


def _blank_split(data: Path, manifest: Path, split: str) -> None:
    """Every image of ``split`` (as ``manifest`` names them, relative to ``data``) replaced by a black one."""
    from PIL import Image

    for row in csv.DictReader(manifest.open(newline="")):
        if row["split"] == split:
            with Image.open(data / row["image"]) as image:
                mode, size = image.mode, image.size
            Image.new(mode, size, 0).save(data / row["image"])


def test_a_manifest_file_dataset_is_scored_again_when_the_images_it_names_change(two_models, phantom_dir, tmp_path):
    """The data hash of a dataset given as a manifest file covers the images its records name, not the manifest
    alone: new pixels under the same names make the cell run again, with another recorded hash."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    spec = {"path": str(data / "manifest.csv"), "split": "test", "label": "finding"}
    suite = write_suite(tmp_path, data, datasets={"phantom": spec}, checks=[],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    runs = []
    for change in (None, "blank"):
        if change:
            _blank_split(data, data / "manifest.csv", "test")
        result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
        assert result.exit_code == 0, output
        runs.append(json.loads((tmp_path / "out" / "results.json").read_text()))
    assert "scoring again, since it was computed, these changed: the scored data" in " ".join(output.split())
    assert runs[1]["cells"]["computed"] == 1
    assert runs[0]["data_hashes"]["phantom"]["sha256"] != runs[1]["data_hashes"]["phantom"]["sha256"]
    # the manifest, its images and the phantom's dataset.json (its marker box and twins are read from it)
    assert runs[1]["data_hashes"]["phantom"]["files"] == 1 + len(load_dataset(data)) + 1


def test_a_run_folder_inside_the_dataset_folder_is_not_part_of_the_data_and_resumes(two_models, phantom_dir,
                                                                                    tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    suite = write_suite(tmp_path, data, checks=[], tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "apart", "-q")
    assert result.exit_code == 0, output
    apart = json.loads((tmp_path / "apart" / "results.json").read_text())["data_hashes"]
    runs = []
    for _ in range(2):
        result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", data / "bench", "-q")
        assert result.exit_code == 0, output
        runs.append(json.loads((data / "bench" / "results.json").read_text()))
    assert [run["cells"]["computed"] for run in runs] == [1, 0]
    assert runs[0]["data_hashes"] == runs[1]["data_hashes"] == apart  # the run's own files are not data


def test_a_file_name_in_the_data_that_is_not_utf8_is_hashed_by_its_bytes(two_models, phantom_dir, tmp_path):
    """A file name may hold any bytes: the data hash covers a Latin-1 ``\xe9`` name (and tells it from another)."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    notes = Path(os.fsdecode(bytes(data) + b"/notes_\xe9.txt"))
    notes.write_text("notes\n")
    suite = write_suite(tmp_path, data, checks=[], tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    hashes = []
    for name in (None, b"/notes_\xe8.txt"):
        if name:
            notes.rename(os.fsdecode(bytes(data) + name))
        result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
        assert result.exit_code == 0, output
        hashes.append(json.loads((tmp_path / "out" / "results.json").read_text())["data_hashes"]["phantom"])
    assert hashes[0]["files"] == hashes[1]["files"] and hashes[0]["sha256"] != hashes[1]["sha256"]


def test_a_generated_phantom_is_made_again_when_any_generate_setting_changes(two_models, tmp_path):
    """Not only n, seed and size: a changed shortcut (or extra finding, kind, vqa) setting generates the data
    again, and suite.json says what the data in the run folder was generated with."""
    runs = []
    for generate in ({"n": 30, "size": 64, "seed": 5}, {"n": 30, "size": 64, "seed": 5, "shortcut": 1.0},
                     {"n": 30, "size": 64, "seed": 5, "shortcut": 1.0}):
        spec = {"path": None, "generate": generate, "split": "test", "label": "finding"}
        suite = write_suite(tmp_path, tmp_path, datasets={"phantom": spec}, checks=[],
                            tasks=[{"task": "zero-shot", "dataset": "phantom"}])
        result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
        assert result.exit_code == 0, output
        said = " ".join(output.split())
        assert ("generating again, its generate settings changed" in said) == (len(runs) == 1), said
        written = json.loads((tmp_path / "out" / "data" / "phantom" / "dataset.json").read_text())["generator"]
        state = json.loads((tmp_path / "out" / "suite.json").read_text())
        assert state["generated"]["phantom"] == written
        runs.append((written, json.loads((tmp_path / "out" / "results.json").read_text())))
    assert "shortcut" not in runs[0][0] and runs[1][0]["shortcut"]["probability"] == 1.0
    assert runs[0][1]["data_hashes"] != runs[1][1]["data_hashes"] == runs[2][1]["data_hashes"]
    assert [run["cells"]["computed"] for _, run in runs] == [1, 1, 0]  # the same settings: data and cell reused
    # a folder of a medvl that recorded neither the generate settings nor what a cell depends on: both say so
    (tmp_path / "out" / "data" / "phantom.generate.json").unlink()
    for cell in (tmp_path / "out" / "cells").glob("*.json"):
        cell.write_text(json.dumps({k: v for k, v in json.loads(cell.read_text()).items() if k != "fingerprint_parts"}
                                   | {"fingerprint": "older"}))
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    said = " ".join(output.split())
    assert result.exit_code == 0, output
    assert "generating again, no record of the settings it was generated with" in said
    assert "scoring again, it was computed by an earlier medvl that did not record what it depends on" in said


def test_accuracy_intervals_are_a_plain_bootstrap_over_the_scored_images(two_models, phantom_dir, tmp_path):
    """bench run's accuracy interval is the plain bootstrap over records (bench medmnist's), and balanced
    accuracy's the plain one without the draws lacking a class; recomputed from the model's own answers."""
    import numpy as np

    from medvl.data import captions_for
    from medvl.eval import zero_shot
    from medvl.eval.bootstrap import bootstrap_ci
    from medvl.eval.subgroups import accuracy, balanced_accuracy
    from medvl.eval.zero_shot import label_classes
    from medvl.models.registry import load_model

    suite = write_suite(tmp_path, phantom_dir, checks=[], tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    rows = {row["metric"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    dataset, net = load_dataset(phantom_dir), load_model(two_models[0])
    test = dataset.select("test")
    scored = zero_shot(net, test, "finding", captions=captions_for(test, None, net), keep_scores=True,
                       show_progress=False, classes=label_classes(dataset, "finding"))
    y, probabilities = np.array(scored["y_true"]), np.array(scored["probabilities"])
    settings = {"resamples": 200, "seed": 0, "stratified": False}
    for metric, function, needs_classes in (("accuracy", accuracy, False), ("balanced_accuracy", balanced_accuracy,
                                                                             True)):
        expected = bootstrap_ci(function, y, probabilities, need_both_classes=needs_classes, **settings)
        assert (rows[metric]["value"], rows[metric]["low"], rows[metric]["high"]) == pytest.approx(
            (expected["value"], expected["low"], expected["high"])), metric


def test_a_model_named_through_a_symlink_keeps_the_name_the_user_gave(tmp_path):
    from medvl.bench.runner import model_labels

    trained = tmp_path / "runs" / "demo" / "train" / "model"
    trained.mkdir(parents=True)
    (tmp_path / "clean").symlink_to(trained)
    (tmp_path / "shortcut").mkdir()
    (tmp_path / "shortcut" / "model").mkdir()
    labels = model_labels([tmp_path / "clean", tmp_path / "shortcut" / "model", trained, tmp_path / "shortcut" / "."])
    assert list(labels.values()) == ["clean", "shortcut", "train", "shortcut-2"]


def _image_blind_copy(model: Path, out: Path) -> Path:
    """``model`` with a rank-1 image projection: every image gets the same embedding (a model that ignores it)."""
    import torch

    import medvl

    net = medvl.load_model(model)
    weight = net.image_projection.weight
    with torch.no_grad():
        weight.copy_(weight[:, :1].clone() * torch.ones(1, weight.shape[1]))
    net.save_pretrained(out)
    return out


def _unlabel(data: Path, split: str, count: int, column: str = "finding") -> None:
    """The first ``count`` records of ``split`` lose their value of ``column`` in the manifest of ``data``."""
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in [row for row in rows if row["split"] == split][:count]:
        row[column] = ""
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_zero_shot_sanity_runs_on_the_labelled_records_when_some_lack_the_label(two_models, phantom_dir, tmp_path):
    """Records without the label are not scored; the sanity check still runs on those that have it, and an
    image-blind model is flagged there as on fully labelled data."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    _unlabel(data, "test", 4)
    model = _image_blind_copy(two_models[0], tmp_path / "blind")
    spec = {"path": str(data), "split": "test", "label": "finding"}
    suite = write_suite(tmp_path, data, datasets={"phantom": spec}, checks=["sanity"],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    cell = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())
    assert "sanity" not in cell["skipped"]
    assert cell["plots"]["sanity"]["n"] == len(load_dataset(data).select("test").with_labels(["finding"]))
    assert "sanity: blank image balanced_accuracy" in {row["metric"] for row in cell["rows"]}
    flags = json.loads((tmp_path / "out" / "results.json").read_text())["flags"]
    assert any("/ sanity: balanced accuracy" in flag and "blank-image baseline" in flag for flag in flags), flags


def test_shortcut_and_counterfactual_of_a_zero_shot_cell_judge_zero_shot_not_the_head(phantom_dir, tmp_path):
    """A model with a supervised head on the label: the zero-shot cell's shortcut and counterfactual checks answer
    with zero-shot (the classifier whose rows the cell reports), not with the head."""
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--epochs", 1, "--batch-size", 32, "--supervised-weight", 1, "-l", "finding", "-q")
    assert result.exit_code == 0, output
    spec = {"path": str(phantom_dir), "split": "test", "label": "finding"}
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=["shortcut", "counterfactual"],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}], counterfactual={"n": 2, "size": 64})
    result, output = invoke("bench", "run", suite, "--model", tmp_path / "run" / "model", "--out", tmp_path / "out",
                            "-q")
    assert result.exit_code == 0, output
    cell = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())
    rows = {row["metric"]: row["value"] for row in cell["rows"]}
    assert cell["plots"]["shortcut"]["method"] == "zero_shot"
    assert cell["plots"]["counterfactual"]["method"] == "zero_shot"
    assert cell["plots"]["shortcut"]["accuracy"] == pytest.approx(rows["accuracy"])
    assert cell["plots"]["shortcut"]["balanced_accuracy"] == pytest.approx(rows["balanced_accuracy"])


def test_few_shot_spreads_are_told_apart_from_bootstrap_intervals(two_models, phantom_dir, tmp_path):
    """A few-shot row's bounds are the mean ± 1.96 sd of its draws of the training shots (the scored records held
    fixed), not a bootstrap 95 % interval: the summary and report.html write them apart, as the row's
    ``interval_kind`` says; the zero-shot AUC beside them keeps its ``[low, high]``."""
    spec = {"path": str(phantom_dir), "split": "test", "train_split": "train", "label": "finding"}
    tasks = [{"task": "zero-shot", "dataset": "phantom"},
             {"task": "few-shot", "dataset": "phantom", "shots": [2], "repeats": 3}]
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=[], tasks=tasks)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {(row["task"], row["metric"]): row for row in results["rows"]}
    spread, zero_shot = rows["few-shot", "2-shot auc"], rows["zero-shot", "auc"]
    assert spread["interval_kind"] == "mean ± 1.96 sd over the draws, within [0, 1]" and spread["repeats"] == 3
    shown = f"(±1.96 sd, 3 draws: {spread['low']:.3f}–{spread['high']:.3f})"
    flat = " ".join(output.split())
    assert f"alpha few-shot@phantom 2-shot auc │ {spread['value']:.3f} {shown}" in flat, output
    report = (tmp_path / "out" / "report.html").read_text()
    assert f"{spread['value']:.3f} <span class='ci spread' title='mean ± 1.96 sd over the draws, within [0, 1]'>" \
           f"{html.escape(shown)}</span>" in report
    assert f"alpha zero-shot@phantom auc │ {zero_shot['value']:.3f} [{zero_shot['low']:.3f}, {zero_shot['high']:.3f}]" \
           in flat, output


def test_skipped_checks_are_in_results_the_summary_and_the_report_banner(two_models, phantom_dir, tmp_path):
    """A check that did not run is not a pass: results.json lists it with the reason, so do the printed summary
    and the report's first section, which then does not say that no check flagged any model; a probe's sanity
    check names the blank-image baseline it leaves out."""
    spec = {"path": str(phantom_dir), "split": "test", "train_split": "train", "label": "finding"}
    tasks = [{"task": "zero-shot", "dataset": "phantom", "checks": ["ood"]},
             {"task": "linear-probe", "dataset": "phantom", "checks": ["sanity"]}]
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=[], tasks=tasks)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    skipped = json.loads((tmp_path / "out" / "results.json").read_text())["skipped"]
    assert [(s["model"], s["key"], s["check"]) for s in skipped] == [
        ("alpha", "zero-shot@phantom", "ood"), ("alpha", "linear-probe@phantom", "sanity: blank_image")]
    assert skipped[0]["reason"] == "the model has no OOD guard (medvl ood fit)"
    lines = [f"{s['model']} / {s['key']} / {s['check']}: {s['reason']}" for s in skipped]
    flat = " ".join(output.split())
    assert "skipped checks │ 2" in flat and all(f"skipped {line}" in flat for line in lines), output
    report = (tmp_path / "out" / "report.html").read_text().replace("&#x27;", "'")
    first = report[:report.index("zero-shot on phantom")]  # the Run and Flags sections
    assert "No check flagged any model." not in report and all(line in first for line in lines)


def test_headline_intervals_over_a_class_of_few_records_are_marked_rough_as_subgroup_rows_are(two_models,
                                                                                            phantom_dir, tmp_path):
    """A headline 95 % interval over a scored split holding a class of 2 records covers the true value far less
    often than 95 %; it was printed plainly while a subgroup with the same class mix was marked ``rough``. The
    headline rows now take the subgroup rows' rule (``eval.subgroups.rough_mark``): ``smallest_class`` and
    ``rough`` on the row, ``rough`` in report.html and in the printed summary, with the reason."""
    from medvl.eval.subgroups import SMALL_CLASS

    test = load_dataset(phantom_dir).select("test")
    smallest = {label: min(Counter(str(record.labels[label]) for record in test).values())
                for label in ("finding", "no_finding")}
    assert smallest["finding"] < SMALL_CLASS <= smallest["no_finding"]  # what the phantom's test split holds
    tasks = [{"task": "zero-shot", "dataset": "phantom"}, {"task": "zero-shot", "dataset": "phantom",
                                                            "label": "no_finding"}]
    suite = write_suite(tmp_path, phantom_dir, checks=[], tasks=tasks)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    for key, label in (("zero-shot@phantom", "finding"), ("zero-shot@phantom:no_finding", "no_finding")):
        headline = [row for row in rows if row["key"] == key and row["metric"] in ("auc", "accuracy",
                                                                                     "balanced_accuracy")]
        assert len(headline) == 3
        assert all(row["smallest_class"] == smallest[label] for row in headline), headline
        assert all(row["rough"] is (label == "finding") for row in headline), headline
    flat = " ".join(output.split())
    auc = {row["key"]: row for row in rows if row["metric"] == "auc"}
    rough, plain = auc["zero-shot@phantom"], auc["zero-shot@phantom:no_finding"]
    assert f"alpha zero-shot@phantom auc │ {rough['value']:.3f} [{rough['low']:.3f}, {rough['high']:.3f}] rough" \
           in flat, output
    assert f"[{plain['low']:.3f}, {plain['high']:.3f}] │" in flat, output  # no mark
    assert (f"rough alpha zero-shot@phantom auc: a class of its scored records has {smallest['finding']} records "
            f"(under {SMALL_CLASS})") in flat, output
    assert "rough alpha zero-shot@phantom:no_finding" not in flat, output
    report = (tmp_path / "out" / "report.html").read_text()
    rough_table = report[report.index("zero-shot on phantom (test, label finding)"):
                         report.index("zero-shot on phantom (test, label no_finding)")]
    plain_table = report[report.index("zero-shot on phantom (test, label no_finding)"):]
    assert rough_table.count(">rough</span>") == 3 and ">rough</span>" not in plain_table


def test_a_subgroup_column_scored_in_part_is_partly_scored_not_a_check_that_did_not_run(two_models, phantom_dir,
                                                                                       tmp_path):
    """A subgroup column that scored its large groups and left a small one out was counted and headed as a check
    that "did not run ... so they did not pass either". It ran: results.json keeps its entry under ``skipped`` with
    ``partly_scored`` true, the summary counts it apart and the report lists it as partly scored; a column no scored
    record fills (no rows) still did not run."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["ward"] = "" if row["split"] == "test" else "W1"  # no scored record has a ward
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sexes = Counter(row["sex"] for row in rows if row["split"] == "test")
    assert min(sexes.values()) < 10 <= max(sexes.values())  # one sex scored, the other too small
    spec = {"path": str(data), "split": "test", "label": "no_finding", "subgroups": ["sex", "ward"]}
    suite = write_suite(tmp_path, data, datasets={"phantom": spec}, checks=["subgroups"],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert any(row["metric"].startswith("subgroup sex=") for row in results["rows"])  # the column was scored
    assert [(skip["check"], skip["partly_scored"]) for skip in results["skipped"]] == [
        ("subgroups: ward", False), ("subgroups: sex", True)]
    ward, sex = (skip_line(skip) for skip in results["skipped"])
    assert "1 value under 10 records not scored" in sex  # what it left out
    flat = " ".join(output.split())
    assert "skipped checks │ 1" in flat and "partly scored checks │ 1" in flat, output
    assert f"skipped {ward}" in flat and f"partly scored {sex}" in flat and f"skipped {sex}" not in flat, output
    report = html.unescape((tmp_path / "out" / "report.html").read_text())
    flags = report[report.index("<h2>Flags</h2>"):report.index("zero-shot on phantom")]
    assert ("No check that ran flagged any model; 1 did not run (below), so they did not pass either; 1 check was "
            "partly scored (below): what it left out was not checked.") in flags
    not_run, partly = flags.split("Partly scored:")
    assert ward in not_run.split("Not run:")[1] and sex in partly and sex not in not_run


@pytest.mark.parametrize("task", ["zero-shot", "linear-probe", "few-shot"])
def test_a_scored_split_of_one_class_is_refused_before_any_work(task, two_models, phantom_dir, tmp_path):
    """AUC, the headline row with its interval, needs two classes: a scored split holding one class of the label
    is one line naming the suite, the task, the split, the data and the class, before anything is written."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [row for row in rows if row["split"] != "test" or row["finding"] == "pneumothorax"]
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    spec = {"path": str(data), "split": "test", "train_split": "train", "label": "finding"}
    suite = write_suite(tmp_path, data, datasets={"phantom": spec}, checks=[],
                        tasks=[{"task": task, "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2, output
    expected = f"{suite}: task {task}@phantom: split 'test' of {data} holds one class of 'finding' (pneumothorax)"
    assert "".join(expected.split()) in "".join(output.split()).replace("/manifest.csv", ""), output
    assert not (tmp_path / "out").exists()


def test_phantom_twins_are_never_films_of_a_larger_phantom_of_the_same_seed(two_models, phantom_dir, tmp_path):
    """Case i of a phantom seed is the same film whatever the phantom's size: twins of a small phantom of the seed
    the models trained on (96 cases) must still be patients the models never saw."""
    import numpy as np
    from PIL import Image

    from medvl.data.phantom import generate_phantom
    from medvl.eval.counterfactual import phantom_counterfactual_pairs

    generate_phantom(tmp_path / "small", n=24, seed=3, size=64, progress=False)
    spec = {"path": str(tmp_path / "small"), "split": "test", "label": "finding"}
    suite = write_suite(tmp_path, tmp_path / "small", datasets={"phantom": spec}, checks=["counterfactual"],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}], counterfactual={"n": 2, "size": 64})
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    source = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())["plots"]["counterfactual"]
    seed, first = re.search(r"patients (\d+)/(\d+) on", source["source"]).groups()
    twins = phantom_counterfactual_pairs(int(seed), 2, 64, start=int(first))
    assert len(twins) == source["n_pairs"]
    trained = [np.array(Image.open(phantom_dir / record.image)) for record in load_dataset(phantom_dir)]
    assert not any(np.array_equal(film, image) for pair in twins for image in (pair.image_a, pair.image_b)
                   for film in trained)


def test_subgroups_report_each_metric_per_group_and_name_what_they_could_not_score(two_models, phantom_dir,
                                                                                    tmp_path):
    """Per group: AUC, balanced accuracy and accuracy rows. A column whose values are all unreadable, or whose
    groups are too small or of one class, is named as skipped with the reason instead of vanishing."""
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    with (data / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = [row for row in rows if row["split"] == "test"]
    for row in rows:  # site: the abnormal films (one class of no_finding) and the normal ones (fewer than 10)
        row["site"] = "x" if row["split"] != "test" else ("A" if row["no_finding"] == "0" else "small")
        if row["split"] == "test":  # no scored age: half empty, half present but unreadable
            row["age"] = "67+" if test.index(row) % 2 else ""
        row["ward"] = "" if row["split"] == "test" else "W1"  # a column no scored record fills: failed mid-run
    # desk: group P holds every abnormal film and 2 normal ones: scored, but rough (a class of 2 records)
    normals = [row for row in test if row["no_finding"] == "1"]
    for row in rows:
        row["desk"] = "x" if row["split"] != "test" else ("P" if row not in normals[2:] else "Q")
    with (data / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    normal = sum(row["no_finding"] == "1" for row in test)
    assert 0 < normal < 10 <= len(test) - normal  # what the site column is made of
    assert 2 < normal < 10  # desk: group Q is too small
    spec = {"path": str(data), "split": "test", "train_split": "train", "label": "no_finding",
            "subgroups": ["sex", "age", "site", "ward", "desk"]}
    suite = write_suite(tmp_path, data, datasets={"phantom": spec}, checks=["subgroups"],
                        tasks=[{"task": "linear-probe", "dataset": "phantom", "covariates": "none"}])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    metrics = {row["metric"] for row in results["rows"]}
    cell = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())
    scored = [(column, group) for column, block in cell["plots"]["subgroups"].items() for group in block["groups"]]
    assert ("site", "A") in scored
    assert {f"subgroup {column}={group}: {metric}" for column, group in scored
            for metric in ("balanced_accuracy", "accuracy")} <= metrics
    assert "subgroup site=A: auc" not in metrics  # one class: no AUC
    skipped = {skip["check"]: skip["reason"] for skip in results["skipped"]}
    unreadable = len(test) // 2  # told apart from the empty ones (all were "have no value")
    assert skipped["subgroups: age"].startswith(f"{len(test) - unreadable} of {len(test)} scored records have no "
                                                f"value; {unreadable} of {len(test)} have an age that cannot be "
                                                "read;")  # counted, never quoted
    assert skipped["subgroups: site"] == (f"1 value under 10 records not scored ({normal} records; values "
                                          "not shown); groups of one class (no AUC): A; no worst-group gap (it "
                                          "needs two groups with an AUC and every class at 5 records or more)")
    report = (tmp_path / "out" / "report.html").read_text()
    assert "subgroups: site: 1 value under 10" in report
    # rough groups: kept with their rows marked, counted (never named) in the skipped list and the report, no gap
    desk_rows = [row for row in results["rows"] if row["metric"].startswith("subgroup desk=")]
    assert "subgroup desk=P: auc" in {row["metric"] for row in desk_rows}
    assert all(row["rough"] is True and row["smallest_class"] == 2 for row in desk_rows)
    assert all(row["rough"] is (row["smallest_class"] < 5) for row in results["rows"]
               if row["metric"].startswith("subgroup ") and "smallest_class" in row)
    assert cell["plots"]["subgroups"]["desk"]["groups"]["P"]["rough"] is True
    rough = ("1 scored group with a class of fewer than 5 records: rough intervals (rows marked rough), left out "
             "of the worst-group gap")
    assert rough in skipped["subgroups: desk"] and "P" not in skipped["subgroups: desk"].replace(rough, "")
    assert rough in report and ">rough</span>" in report
    assert skipped["subgroups: ward"] == f"none of the {len(test)} scored records has a value"
    # site and desk scored some groups (rows): partly scored; age and ward none: they did not run
    partly = {skip["check"]: skip["partly_scored"] for skip in results["skipped"]}
    assert partly["subgroups: site"] and partly["subgroups: desk"]
    assert not partly["subgroups: age"] and not partly["subgroups: ward"]


def test_a_shortcut_phantom_given_as_its_manifest_file_gets_the_same_checks_as_its_folder(two_models, tmp_path):
    """The marker box and the twins come from the phantom's dataset.json, whether the suite names the folder or
    the manifest file in it: the same shortcut and counterfactual rows."""
    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "sc", n=60, seed=3, size=64, shortcut=1.0, progress=False)
    cells = {}
    for name, path in (("folder", tmp_path / "sc"), ("file", tmp_path / "sc" / "manifest.csv")):
        spec = {"path": str(path), "split": "test", "label": "finding"}
        suite = write_suite(tmp_path, path, datasets={"phantom": spec}, checks=["shortcut", "counterfactual"],
                            tasks=[{"task": "zero-shot", "dataset": "phantom"}], counterfactual={"n": 2, "size": 64})
        result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / name, "-q")
        assert result.exit_code == 0, output
        cells[name] = json.loads(next((tmp_path / name / "cells").glob("*.json")).read_text())
    for cell in cells.values():
        assert cell["plots"]["shortcut"]["masked_region"] == "box"
        assert cell["plots"]["counterfactual"]["source"].startswith("phantom twins")
    rows = [{row["metric"]: (row["value"], row.get("region")) for row in cell["rows"]} for cell in cells.values()]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("corruption, message", [
    ({"severities": [1, 7]}, "corruption severity must be a whole number from 1 to 5, got 7"),
    ({"kinds": ["fog"]}, "unknown corruption 'fog'"),
    ({"kinds": ["noise", "noise", "blur"]}, "corruption kind 'noise' is given twice; list each kind once"),
    ({"severities": [1, 1]}, "corruption severity 1 is given twice; list each severity once"),  # were scored twice
])
def test_a_bad_corruption_setting_names_the_suite_file(corruption, message, two_models, phantom_dir, tmp_path):
    suite = write_suite(tmp_path, phantom_dir, corruption=corruption)
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2, output
    assert "".join(f"{suite}: {message}".split()) in "".join(output.split()), output
    assert not (tmp_path / "out").exists()


def test_report_plots_draw_an_auc_below_0_3_and_the_balanced_accuracy_the_shortcut_check_uses():
    """The corruption axes reach down to the lowest AUC; the shortcut bars are the balanced accuracy the check and
    its flag use, named by the region hidden (the marker box, or a corner)."""
    from medvl.bench.html import _corruption, _shortcut

    curves = {"curves": {"noise": [{"severity": 1, "auc": 0.21}, {"severity": 5, "auc": 0.12}]},
              "clean": {"auc": 0.213}}
    bottom, top = _corruption([("phantom", curves)]).axes[0].get_ylim()
    assert bottom <= 0.12 and top >= 1.0
    block = {"accuracy": 0.9, "balanced_accuracy": 0.8, "masked_accuracy": 0.7, "masked_balanced_accuracy": 0.6,
             "masked_region": "box"}
    axis = _shortcut([("sc", block), ("clean", {**block, "masked_region": "top_left"})]).axes[0]
    labels = [label.get_text() for label in axis.get_xticklabels()]
    assert labels == ["balanced accuracy", "marker box hidden", "top left corner hidden"]
    heights = [bar.get_height() for bar in axis.patches]
    assert heights[:2] == [0.8, 0.6]


def test_the_reliability_bins_name_the_scored_split_and_the_split_the_temperature_was_fitted_on(finished_run):
    """The bins are the scored split's (test), before and after a temperature fitted on val: they were stored and
    drawn under ``split: val`` (the calibration split's name) or no split at all."""
    from medvl.bench.html import _reliability

    _, out, _ = finished_run
    cells = [json.loads(path.read_text()) for path in (out / "cells").glob("*.json")]
    block = next(cell["plots"]["calibration"] for cell in cells if "calibration" in cell["plots"])
    assert (block["fitted_on"], block["split"]) == ("val", "test")
    axis = _reliability([("alpha", block)]).axes[0]
    assert axis.get_title() == "alpha: test"
    assert [text.get_text() for text in axis.get_legend().get_texts()] == [
        "before temperature scaling", "after a temperature fitted on val"]


def test_the_sanity_plot_draws_every_compared_metric_and_names_it():
    """The figure read a ``metric`` key the sanity block does not have, so it always drew balanced accuracy, unnamed,
    beside a headline row and flags about AUC: now one panel per compared metric, named on its axis."""
    from medvl.bench.html import _sanity

    block = {"compared": ["auc", "balanced_accuracy"], "model": {"auc": 0.518, "balanced_accuracy": 0.537},
             "baselines": {"blank_image": {"auc": 0.5, "balanced_accuracy": 0.5},
                           "label_prior": {"auc": 0.5, "balanced_accuracy": 0.45}}}
    axes = _sanity([("m", block)]).axes
    assert [axis.get_ylabel() for axis in axes] == ["AUC: model vs sanity baselines",
                                                    "balanced accuracy: model vs sanity baselines"]
    assert [[bar.get_height() for bar in axis.patches] for axis in axes] == [[0.518, 0.5, 0.5], [0.537, 0.5, 0.45]]


def test_case_retrieval_takes_the_sanity_check_and_an_image_blind_model_is_flagged(two_models, phantom_dir,
                                                                                    tmp_path):
    """precision@k against a random ranking: an image-blind model does not beat it and is flagged, whether the
    suite's checks or the task's own list name sanity."""
    model = _image_blind_copy(two_models[0], tmp_path / "blind")
    spec = {"path": str(phantom_dir), "split": "test", "label": "finding"}
    for name, task, checks in (("suite", {}, ["sanity"]), ("task", {"checks": ["sanity"]}, [])):
        suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=checks,
                            tasks=[{"task": "case-retrieval", "dataset": "phantom", **task}])
        result, output = invoke("bench", "run", suite, "--model", model, "--out", tmp_path / name, "-q")
        assert result.exit_code == 0, output
        results = json.loads((tmp_path / name / "results.json").read_text())
        rows = {row["metric"]: row["value"] for row in results["rows"]}
        assert rows["precision_at_k"] < rows["sanity: precision_at_k of a random ranking"] + 0.05
        assert [flag for flag in results["flags"] if "/ sanity: precision@5" in flag] == [
            f"blind / case-retrieval@phantom / sanity: precision@5 {rows['precision_at_k']:.3f} does not beat a "
            f"random ranking ({rows['sanity: precision_at_k of a random ranking']:.3f}) by 0.05"]


def test_a_retrieval_recall_exactly_0_05_above_chance_beats_it(two_models, phantom_dir, tmp_path):
    """"Beats chance by 0.05" allows for float rounding, as sanity.compare_to_baselines does: an image-blind
    model ranks every image's texts alike, so 11 of 44 images whose text is among the top 5 of 25 gallery
    texts give i2t R@5 = 0.25 against a chance recall of 5/25, which floats give as 0.2000000000000003
    (it was flagged)."""
    import torch

    import medvl
    from medvl.embed import embed_images

    model = _image_blind_copy(two_models[0], tmp_path / "blind")
    net = medvl.load_model(model)
    phantom = load_dataset(phantom_dir)
    records = list(phantom)[:44]
    blank = embed_images(net, phantom.subset(records), show_progress=False)
    assert float((blank @ blank[0]).min()) > 0.9999  # one image embedding for all: the texts' order is fixed
    texts = list(dict.fromkeys(r.text for r in phantom))[:25]
    with torch.no_grad():
        scores = (net.encode_texts(texts) @ blank[0]).tolist()
    ranked = [text for _, text in sorted(zip(scores, texts, strict=True), key=lambda pair: -pair[0])]
    counts = [3, 2, 2, 2, 2] + [2] * 13 + [1] * 7  # the top 5 texts held by 11 images, 20 others by 33
    pairs = zip([text for text, count in zip(ranked, counts, strict=True) for _ in range(count)], records,
                strict=True)
    (tmp_path / "data" / "images").mkdir(parents=True)
    with (tmp_path / "data" / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text", "split"])
        for text, record in pairs:
            shutil.copy(record.image, tmp_path / "data" / "images" / Path(record.image).name)
            writer.writerow([f"images/{Path(record.image).name}", text, "test"])
    suite = write_suite(tmp_path, tmp_path / "data", checks=["sanity"],
                        datasets={"d": {"path": str(tmp_path / "data"), "split": "test"}},
                        tasks=[{"task": "retrieval", "dataset": "d"}])
    result, output = invoke("bench", "run", suite, "--model", model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["metric"]: row["value"] for row in results["rows"]}
    chance = rows["sanity: i2t_R@5 with shuffled pairing (chance)"]
    assert rows["i2t_R@5"] == 11 / 44 and rows["i2t_R@5"] < chance + 0.05  # exactly 0.05 above, in floats below
    assert not [flag for flag in results["flags"] if "sanity: i2t R@5" in flag]


def test_a_phantom_label_the_twins_do_not_carry_gets_other_pairs_and_says_so(two_models, phantom_dir, tmp_path):
    """The twins vary the finding and carry only the finding columns: for the phantom's view the counterfactual
    check pairs nearest scored images instead and the shortcut check scores its masked drop without the pair
    criterion, each saying so under skipped (it failed mid-run with 'pairs: N images have no 'view' label')."""
    spec = {"path": str(phantom_dir), "split": "test", "label": "view"}
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=["counterfactual", "shortcut"],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}], counterfactual={"n": 2, "size": 64})
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    skipped = {skip["check"]: skip["reason"] for skip in results["skipped"]}
    assert skipped["counterfactual: phantom twins"].startswith(
        "the phantom twins vary the finding and carry no 'view' label")
    assert skipped["shortcut: phantom twins"].endswith("the pair criterion is left out; the masked-region drop is "
                                                       "scored")
    # the suite's counterfactual n and size make twins, which no check of this cell uses: said, not ignored
    assert skipped["counterfactual settings"] == ("counterfactual n, size set the phantom twins; the twins carry no "
                                                  "'view' label: not used")
    cell = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())
    assert cell["plots"]["counterfactual"]["source"].startswith("nearest-neighbour images")
    metrics = {row["metric"] for row in cell["rows"]}
    assert {"counterfactual: pair accuracy", "shortcut: masked balanced accuracy drop"} <= metrics
    assert "shortcut: pair accuracy" not in metrics


def test_subgroup_columns_are_names_like_splits_and_labels(phantom_dir, tmp_path):
    """YAML reads ``subgroups: [2020]`` as a number: it is the column "2020", as ``split: 2020`` is the split."""
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": {"path": str(phantom_dir), "label": "finding",
                                                                     "subgroups": [2020, 1.5, "sex"]}})
    assert load_suite(suite).datasets["phantom"].subgroups == ["2020", "1.5", "sex"]


def test_corruption_rows_give_the_clean_auc_of_their_own_sample_drawn_per_class(two_models, phantom_dir, tmp_path):
    """The curves run on a sample of max_images scored images: its clean AUC is a row beside the corrupted ones
    (the whole split's ``auc`` row is another set of images), with n, and the sample holds every class it can."""
    from medvl.bench.runner import _sample

    spec = {"path": str(phantom_dir), "split": "test", "label": "no_finding"}
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=["corruption"],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}],
                        corruption={"kinds": ["noise"], "severities": [1], "max_images": 6})
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, output
    cell = json.loads(next((tmp_path / "out" / "cells").glob("*.json")).read_text())
    rows = {row["metric"]: row for row in cell["rows"]}
    assert rows["corruption clean: auc"]["value"] == pytest.approx(cell["plots"]["corruption"]["clean"]["auc"])
    assert rows["corruption clean: auc"]["n"] == rows["corruption noise s1: auc"]["n"] == 6
    assert "corruption clean: auc" in (tmp_path / "out" / "report.html").read_text()
    scored = load_dataset(phantom_dir).select("test").with_labels(["no_finding"])
    counts = {name: sum(r.labels["no_finding"] == name for r in scored) for name in scored.classes("no_finding")}
    rare = min(counts, key=counts.get)
    for seed in range(20):  # two images of a split with both classes: one of each, whatever the draw
        drawn = _sample(scored, 2, seed, "no_finding")
        assert sorted(r.labels["no_finding"] for r in drawn) == sorted(counts)
        drawn = _sample(scored, 12, seed, "no_finding")
        assert sum(r.labels["no_finding"] == rare for r in drawn) == round(12 * counts[rare] / len(scored))


def test_a_manifest_naming_images_elsewhere_is_scored_with_allow_outside_root(two_models, phantom_dir, tmp_path):
    """The loader refuses it and advises --allow-outside-root, which bench run now has (as train, eval and bench cv
    do); the images outside the folder are part of the cell's data hash."""
    with (phantom_dir / "manifest.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    (tmp_path / "ext").mkdir()
    with (tmp_path / "ext" / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "split", "finding"])
        writer.writerows([str(phantom_dir / row["image"]), "test", row["finding"]] for row in rows)
    spec = {"path": str(tmp_path / "ext"), "split": "test", "label": "finding"}
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=[],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2 and "(--allow-outside-root)" in " ".join(output.split()), output
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q",
                            "--allow-outside-root")
    assert result.exit_code == 0, output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "auc" in {row["metric"] for row in results["rows"]}
    assert results["data_hashes"]["phantom"]["files"] == 1 + len(rows)


@pytest.mark.parametrize("captions, datasets, message", [
    ("classes: [1, 2\n", None, "dataset 'phantom': {captions}: cannot parse caption config at line 2, column 1: "
                               "expected ',' or ']', but got '<stream end>'"),
    ("", None, "dataset 'phantom': {captions}: caption config must be a mapping with 'templates' and 'classes'"),
    (None, {"generate": {"n": 5, "size": 8}, "label": "finding"},
     "dataset 'phantom': generate: size must be 32-2048 pixels, got 8"),
    (None, {"generate": {"n": "abc"}, "label": "finding"},
     "dataset 'phantom': generate: n must be an integer >= 1, got 'abc'"),
])
def test_a_bad_caption_file_or_generate_setting_is_refused_naming_the_suite_before_any_work(
        captions, datasets, message, two_models, phantom_dir, tmp_path):
    """They were found only when the dataset's first cell ran (a caption file, after suite.json was written) or
    without the suite's name (a generate setting)."""
    spec = datasets or {"path": str(phantom_dir), "split": "test", "label": "finding", "captions": "prompts.yaml"}
    if captions is not None:
        (tmp_path / "prompts.yaml").write_text(captions, encoding="utf-8")
    suite = write_suite(tmp_path, phantom_dir, datasets={"phantom": spec}, checks=[],
                        tasks=[{"task": "zero-shot", "dataset": "phantom"}])
    result, output = invoke("bench", "run", suite, "--model", two_models[0], "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2, output
    expected = f"{suite}: " + message.format(captions=tmp_path / "prompts.yaml")
    assert "".join(expected.split()) in "".join(output.split()), output
    assert not (tmp_path / "out").exists()


def test_the_printed_summary_gives_a_few_shot_cell_its_largest_shot_auc(finished_run, capsys):
    """The suite's few-shot task lists shots [1, 2]: the summary printed no few-shot row at all (it looked for a
    '4-shot auc' row only)."""
    from medvl.cli.bench import print_suite_summary

    _, out, results = finished_run
    print_suite_summary(results, out)
    printed = " ".join(capsys.readouterr().out.split())
    for model in ("alpha", "beta"):
        row = next(r for r in results["rows"] if r["model"] == model and r["metric"] == "2-shot auc")
        assert f"{model} few-shot@phantom 2-shot auc │ {row['value']:.3f}" in printed, printed
        assert f"{model} few-shot@phantom 1-shot auc" not in printed


def test_the_calibration_flag_needs_a_rise_of_ece_visible_at_the_printed_precision():
    from medvl.bench.runner import ECE_RISE, _ece_rise

    # the probe's cell: a temperature that moved a 15-bin ECE on 60 records in its 4th decimal was flagged as
    # "raises ECE on test (0.128 -> 0.128)"
    noise = {"ece_before": 0.12836889377986846, "ece_after": 0.12847473089138225}
    assert _ece_rise(noise, "val", "test") is None
    documented = {"ece_before": 0.0321, "ece_after": 0.0379}  # README's shortcut-model flag (0.032 -> 0.038)
    assert _ece_rise(documented, "val", "test") == "temperature fitted on val raises ECE on test (0.032 -> 0.038)"
    assert _ece_rise({"ece_before": 0.1, "ece_after": 0.1 + ECE_RISE}, "val", "test") is not None  # float slack
    assert _ece_rise({"ece_before": 0.2, "ece_after": 0.1}, "val", "test") is None


def test_few_shot_spreads_are_the_sample_sd_of_the_draws(two_models, phantom_dir):
    """A few-shot row's "± 1.96 sd" takes the sample sd (ddof=1) of its draws, as ``bench cv`` does over folds (the
    population sd of 5 draws is 0.89 of it); a single draw has no sd. The draws continue one stream per k, so one
    draw is the first of two, and the second follows from their mean."""
    from medvl import load_model
    from medvl.eval.linear_probe import linear_probe

    dataset = load_dataset(phantom_dir)
    model, train, test = load_model(two_models[0]), dataset.select("train"), dataset.select("test")
    one, two = (linear_probe(model, train, test, "finding", few_shot=(2,), repeats=repeats, show_progress=False)
                ["few_shot"]["2"] for repeats in (1, 2))
    assert one["auc_std"] is None and one["accuracy_std"] is None
    for metric in ("auc", "accuracy"):
        first = one[f"{metric}_mean"]
        second = 2 * two[f"{metric}_mean"] - first
        assert two[f"{metric}_std"] == pytest.approx(abs(first - second) / 2 ** 0.5)
        assert first != second  # two draws that differ: the test tells ddof=1 from ddof=0


def test_a_dataset_with_case_ids_is_bootstrapped_by_case_and_says_so(two_models, phantom_dir, tmp_path):
    """Several images of one case are not independent: a dataset whose loader gives every record a ``case_id``
    (MedPix) draws whole cases for every interval by default, subgroup rows count its cases, and results.json and
    report.html name the unit; ``group_column: image`` keeps the image as unit (the draws of before)."""
    import numpy as np

    from medvl.data import captions_for
    from medvl.eval import zero_shot
    from medvl.eval.bootstrap import bootstrap_ci
    from medvl.eval.subgroups import DRAWS, macro_auc
    from medvl.eval.zero_shot import label_classes
    from medvl.models.registry import load_model

    data = tmp_path / "data"
    _with_case_ids(phantom_dir, data)  # three films a case
    dataset, net = load_dataset(data), load_model(two_models[0])
    test = dataset.select("test")
    scored = zero_shot(net, test, "finding", captions=captions_for(test, None, net), keep_scores=True,
                       show_progress=False, classes=label_classes(dataset, "finding"))
    y, probabilities = np.array(scored["y_true"]), np.array(scored["probabilities"])
    cases = [record.labels.get("case_id", record.meta.get("case_id")) for record in test]
    for unit, groups in ((None, cases), ("image", None)):
        spec = {"path": str(data), "split": "test", "train_split": "train", "label": "finding", "subgroups": ["sex"]}
        out, results, rows = _run_with_unit(tmp_path, data, two_models[0], spec, unit, "zero-shot", ["subgroups"])
        expected = bootstrap_ci(macro_auc, y, probabilities, resamples=200, seed=0, groups=groups, **DRAWS["auc"])
        assert (rows["auc"]["low"], rows["auc"]["high"]) == pytest.approx((expected["low"], expected["high"]))
        skipped = {entry["check"]: entry["reason"] for entry in results["skipped"]}
        if unit is None:  # the 10 male films of the 19 scored are 4 to 10 cases: under min_size 10, not scored
            assert "subgroup sex=M: auc" not in rows
            assert "2 values under 10 distinct case_id values not scored (19 records" in skipped["subgroups: sex"]
            assert "bootstrap unit phantom</td><td>case_id (whole cases drawn" in (out / "report.html").read_text()
        else:
            assert rows["subgroup sex=M: auc"]["n"] == 10 and "units" not in rows["subgroup sex=M: auc"]


def _run_with_unit(tmp_path: Path, data: Path, model, spec: dict, unit: str | None, task: str, checks: list[str]
                   ) -> tuple[Path, dict, dict[str, dict]]:
    """``bench run`` of one ``task`` on the dataset ``spec`` with ``group_column`` ``unit`` (None: the default, the
    records' ``case_id``), checked to finish and to state that unit: its output folder, results and rows by metric."""
    spec = spec | ({"group_column": unit} if unit else {})
    suite = write_suite(tmp_path, data, datasets={"phantom": spec}, checks=checks,
                        tasks=[{"task": task, "dataset": "phantom"}])
    out = tmp_path / f"out-{unit}"
    result, output = invoke("bench", "run", suite, "--model", model, "--out", out, "-q")
    assert result.exit_code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert results["bootstrap_unit"] == {"phantom": unit or "case_id"}
    return out, results, {row["metric"]: row for row in results["rows"]}


def _with_case_ids(phantom_dir: Path, data: Path, per_case: int = 3) -> None:
    """A copy of the phantom whose manifest gives every record a ``case_id``, ``per_case`` films a case."""
    shutil.copytree(phantom_dir, data)
    with (data / "manifest.csv").open(newline="") as file:
        records = list(csv.DictReader(file))
    for i, record in enumerate(records):
        record["case_id"] = f"case{i // per_case}"
    with (data / "manifest.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _written_out_interval(values, units, resamples: int, seed: int) -> tuple[float, float]:
    """The 95 % percentile interval of the mean of ``values`` under a bootstrap written out by hand: per draw, as
    many units as there are drawn with replacement (``default_rng(seed)``, units in order of first appearance), each
    with all its values; ``units`` None: each value its own unit (the plain draw ``integers(0, n, n)``)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    if units is None:
        means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    else:
        order = list(dict.fromkeys(units))
        members = [[i for i, unit in enumerate(units) if unit == name] for name in order]
        means = [values[[i for g in rng.integers(0, len(order), len(order)) for i in members[g]]].mean()
                 for _ in range(resamples)]
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def test_retrieval_recall_intervals_draw_whole_cases_when_the_dataset_has_case_ids(two_models, phantom_dir,
                                                                                  tmp_path):
    """Recall@k intervals resampled the queries one by one even on a dataset drawn by case (MedPix: up to 15 images
    a case): each query (an image, or a text) now takes the case of its first record and whole cases are drawn,
    matching a cluster bootstrap written out here; ``group_column: image`` keeps the draws of before, bit for bit."""
    import numpy as np

    import medvl

    data = tmp_path / "data"
    _with_case_ids(phantom_dir, data)
    test = load_dataset(data).select("test")
    assert all(record.text for record in test)
    cases = [record.labels.get("case_id", record.meta.get("case_id")) for record in test]
    # the queries, in the galleries' order: each film once (one image a record), each distinct text once
    queries = {"i2t": cases, "t2i": [cases[[r.text for r in test].index(text)]
                                     for text in dict.fromkeys(r.text for r in test)]}
    ranks = medvl.retrieval(medvl.load_model(two_models[0]), test, show_progress=False, keep_ranks=True)
    ranks = {"i2t": np.array(ranks["image_to_text"]["ranks"]), "t2i": np.array(ranks["text_to_image"]["ranks"])}
    assert len(ranks["i2t"]) == len(queries["i2t"]) and len(ranks["t2i"]) == len(queries["t2i"])
    widths = {}
    for unit in (None, "image"):
        _, _, rows = _run_with_unit(tmp_path, data, two_models[0], {"path": str(data), "split": "test"}, unit,
                                    "retrieval", [])
        for short in ("i2t", "t2i"):
            for k in (1, 5, 10):
                hits = ranks[short] <= k
                expected = _written_out_interval(hits, queries[short] if unit is None else None, 200, 0)
                row = rows[f"{short}_R@{k}"]
                assert row["value"] == pytest.approx(hits.mean())
                assert (row["low"], row["high"]) == pytest.approx(expected, abs=1e-12), (unit, short, k)
        widths[unit] = rows["i2t_R@5"]["high"] - rows["i2t_R@5"]["low"]
    assert widths[None] != widths["image"]
