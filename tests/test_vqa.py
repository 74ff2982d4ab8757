"""The VQA model: training through the one trainer, scoring with the SURE-VQA baselines, answers with
their evidence, and the one-line errors of bad input (all on a real phantom VQA folder)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import invoke, postgres_server
from medvl.data import load_dataset
from medvl.data.loaders.vqa import load_vqa, normalize_answer
from medvl.data.phantom import generate_phantom
from medvl.errors import InputError, ModelError
from medvl.eval.contamination import trained_on_scored, training_data
from medvl.eval.vqa import answer_items, answer_with_rationale, evaluate_vqa, token_f1
from medvl.models.registry import create_model
from medvl.models.vqa import VQAModel, load_vqa_model, question_key, select_questions, word_key
from medvl.train.loop import TrainConfig
from medvl.train.vqa import VQAOptions, train_vqa

TINY = ["--image-model", "phantom-tiny", "--image-size", "32", "--question-encoder", "bert", "--hidden-size", "32",
        "--fusion-layers", "1", "--set", "text.hidden_size=32", "--set", "text.intermediate_size=64",
        "--set", "text.num_layers=1", "--batch-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vqa-model") / "phantom"
    generate_phantom(folder, n=60, seed=5, size=32, vqa=True, vqa_per_case=4)
    return folder


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vqa-run") / "run"
    result, output = invoke("train", "vqa", "--data", phantom / "vqa", "--out", out, "--epochs", "1",
                            "--max-steps", "2", "--holdout", "0.2", *TINY)
    assert result.exit_code == 0, output
    assert "held out" in output
    return out


def test_token_f1_matches_hand_computed_examples():
    assert token_f1("left lower lobe", "left lower lobe") == 1.0
    assert token_f1("Left lower lobe.", "left  lower lobe") == 1.0  # normalised first
    assert token_f1("left lobe", "left lower lobe") == pytest.approx(0.8)  # p 2/2, r 2/3
    assert token_f1("right", "left lower lobe") == 0.0
    assert token_f1("lobe lobe", "lobe") == pytest.approx(2 / 3)  # bags: p 1/2, r 1/1
    assert token_f1("", "") == 1.0
    assert token_f1("x", "") == 0.0


def test_train_writes_a_model_with_vocabulary_prior_and_holdout(trained, phantom):
    model = load_vqa_model(trained)
    train = select_questions(load_vqa(phantom / "vqa"), "train", "data", "train")
    held = {(split, qid) for split, qid, *_ in model.meta["holdout"]["questions"]}
    assert abs(len(held) - round(0.2 * len(train))) <= 3  # whole groups of one question about one image
    kept = [item for item in train if (item.split, item.qid) not in held]
    assert model.meta["training"]["questions"] == len(kept)
    assert set(model.answers) == {item.answer_normalized for item in kept}
    assert model.config.max_images == 2
    assert (trained / "metrics.jsonl").is_file() and (trained / "train_config.json").is_file()
    assert not any(item.question in (trained / "model" / "meta.json").read_text() for item in kept)  # hashed keys


def test_eval_json_keys_baselines_and_per_type(trained, phantom, tmp_path):
    out = tmp_path / "scores.json"
    result, output = invoke("eval", "vqa", "--model", trained, "--data", phantom / "vqa", "--split", "test",
                            "--json", out, "--quiet")
    assert result.exit_code == 0, output
    scores = json.loads(out.read_text())
    test = select_questions(load_vqa(phantom / "vqa"), "test", "data", "test")
    assert scores["n"] == len(test) == scores["n_closed"] + scores["n_open"]
    for key in ("closed_accuracy", "open_accuracy", "overall_accuracy", "open_token_f1",
                "blank_image_overall_accuracy", "question_only_overall_accuracy"):
        assert 0.0 <= scores[key] <= 1.0, key
    assert {"progression", "which_image", "presence"} <= set(scores["per_question_type"])
    # the question-only baseline, recomputed by hand from the training file minus the held-out questions
    model = load_vqa_model(trained)
    held = {(split, qid) for split, qid, *_ in model.meta["holdout"]["questions"]}
    kept = [item for item in select_questions(load_vqa(phantom / "vqa"), "train", "d", "train")
            if (item.split, item.qid) not in held]
    by_question: dict[str, Counter] = {}
    for item in kept:
        by_question.setdefault(question_key(item.question), Counter())[item.answer_normalized] += 1
    overall = min(Counter(i.answer_normalized for i in kept).items(), key=lambda kv: (-kv[1], kv[0]))[0]
    by_type: dict[str, Counter] = {}
    for item in kept:
        by_type.setdefault(f"{item.question_type}|{item.answer_type}", Counter())[item.answer_normalized] += 1

    def prior(item):
        counts = by_question.get(question_key(item.question)) or by_type.get(f"{item.question_type}|{item.answer_type}")
        return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else overall

    expected = sum(prior(item) == item.answer_normalized for item in test) / len(test)
    assert scores["question_only_overall_accuracy"] == pytest.approx(expected)


def test_eval_json_names_the_split_scored(trained, phantom, tmp_path):
    for data, split, expected in ((phantom / "vqa", None, "test"), (phantom / "vqa" / "train.json", None, "all"),
                                  (phantom / "vqa", "heldout", "heldout"), (phantom / "vqa", "val", "val")):
        out = tmp_path / f"{expected}.json"
        result, output = invoke("eval", "vqa", "--model", trained, "--data", data, "--json", out, "--quiet",
                                *(["--split", split] if split else []))
        assert result.exit_code == 0, output
        assert json.loads(out.read_text())["split"] == expected


def test_eval_json_names_the_model_and_data_as_given(trained, phantom, tmp_path):
    """The JSON kept only their last names (``"model": "model", "data": "vqa"``), losing where the figures came
    from; it names them as given, as the other evaluators do, in the CLI and the Python API."""
    out = tmp_path / "v.json"
    result, output = invoke("eval", "vqa", "--model", trained / "model", "--data", phantom / "vqa", "--split", "test",
                            "--json", out, "--quiet")
    assert result.exit_code == 0, output
    written = json.loads(out.read_text())
    assert (written["model"], written["data"]) == (str(trained / "model"), str(phantom / "vqa"))
    from medvl.api import evaluate_vqa_from_path

    direct = evaluate_vqa_from_path(trained, phantom / "vqa", "test", show_progress=False)
    assert (direct["model"], direct["data"], direct["split"]) == (str(trained), str(phantom / "vqa"), "test")
    assert direct["overall_accuracy"] == written["overall_accuracy"]


def test_heldout_split_scores_the_questions_held_out(trained, phantom, tmp_path):
    out = tmp_path / "held.json"
    result, output = invoke("eval", "vqa", "--model", trained, "--data", phantom / "vqa", "--split", "heldout",
                            "--json", out, "--quiet")
    assert result.exit_code == 0, output
    assert json.loads(out.read_text())["n"] == len(load_vqa_model(trained).meta["holdout"]["questions"])
    assert "trained_on_scored" not in json.loads(out.read_text())


def test_heldout_split_refuses_other_questions_under_the_held_out_ids(trained, phantom, tmp_path):
    """The model kept its held-out questions by split and id only, so an edited or regenerated training file, or
    a data split itself named heldout, was scored as the held-out figures without a word; each is refused with one
    line now, and a model saved without the digests is scored with a warning that they could not be checked."""
    held = {(split, qid) for split, qid, *_ in load_vqa_model(trained).meta["holdout"]["questions"]}
    edited = tmp_path / "edited"
    shutil.copytree(phantom / "vqa", edited)
    questions = json.loads((edited / "train.json").read_text())
    target = next(q for q in questions if ("train", str(q["qid"])) in held)
    target["answer"] = next(option for option in target["options"] if option != target["answer"])  # one corrected
    (edited / "train.json").write_text(json.dumps(questions))
    result, output = invoke("eval", "vqa", "--model", trained, "--data", edited, "--split", "heldout", "--quiet")
    assert result.exit_code == 2, output
    assert f"train.json: 1 of the {len(held)} questions under the ids the model held out are not the questions " \
           "it held out" in " ".join(output.split())
    assert "Traceback" not in output
    copy = tmp_path / "copy"  # the same questions elsewhere are still the held-out ones
    shutil.copytree(phantom / "vqa", copy)
    result, output = invoke("eval", "vqa", "--model", trained, "--data", copy, "--split", "heldout", "--quiet")
    assert result.exit_code == 0, output
    shutil.copy(phantom / "vqa" / "test.json", copy / "heldout.json")  # a split of the data named heldout
    result, output = invoke("eval", "vqa", "--model", trained, "--data", copy, "--split", "heldout", "--quiet")
    assert result.exit_code == 2 and "heldout.json: holds a split 'heldout' and the model holds questions out" \
        in " ".join(output.split()), output
    older = tmp_path / "older"  # a model saved before the digests: scored, with a warning
    shutil.copytree(trained / "model", older)
    meta = json.loads((older / "meta.json").read_text())
    meta["holdout"]["questions"] = [entry[:2] for entry in meta["holdout"]["questions"]]
    (older / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "older.json"
    result, output = invoke("eval", "vqa", "--model", older, "--data", edited, "--split", "heldout", "--quiet",
                            "--json", out)
    assert result.exit_code == 0, output
    assert json.loads(out.read_text())["n"] == len(held)
    assert "keeps no digest of its held-out questions" in " ".join(output.split())


def test_scoring_the_questions_trained_on_is_said(trained, phantom, tmp_path):
    """The training file's own questions, less those held out, are training figures; the held-out ones and the
    test split are not."""
    model = load_vqa_model(trained)
    assert model.meta["training"]["splits"] == ["train"] and len(model.meta["training"]["data_sha256"]) == 64
    n_kept = model.meta["training"]["questions"]
    items = load_vqa(phantom / "vqa")
    for split, of in (("train", sum(i.split == "train" for i in items)), ("all", len(items))):
        out = tmp_path / f"{split}.json"
        result, output = invoke("eval", "vqa", "--model", trained, "--data", phantom / "vqa", "--split", split,
                                "--json", out, "--quiet")
        assert result.exit_code == 0, output
        assert json.loads(out.read_text())["trained_on_scored"] == {
            "records": n_kept, "of": of, "splits": ["train"], "records_trained": n_kept}
        assert f"{n_kept} of {of} scored questions come from split(s) train" in " ".join(output.split())
    result, output = invoke("eval", "vqa", "--model", trained, "--data", phantom / "vqa", "--split", "test",
                            "--json", tmp_path / "test.json", "--quiet")
    assert result.exit_code == 0 and "trained_on_scored" not in json.loads((tmp_path / "test.json").read_text())


def test_the_training_questions_named_another_way_are_still_said(trained, phantom, tmp_path):
    """The file trained on, named directly instead of through its folder, through a symbolic link, or copied
    elsewhere under another name, is still the training data: what was read is compared, not how it was named."""
    n_kept = load_vqa_model(trained).meta["training"]["questions"]
    n_train = len(json.loads((phantom / "vqa" / "train.json").read_text()))
    (tmp_path / "link").symlink_to(phantom / "vqa", target_is_directory=True)
    copy = tmp_path / "copy"
    shutil.copytree(phantom / "vqa", copy)
    (copy / "train.json").rename(copy / "asked.json")  # the split is named by the file: now "asked"
    for number, data in enumerate((phantom / "vqa" / "train.json", tmp_path / "link" / "train.json",
                                   copy / "asked.json")):
        out = tmp_path / f"scores-{number}.json"
        result, output = invoke("eval", "vqa", "--model", trained, "--data", data, "--json", out, "--quiet")
        assert result.exit_code == 0, output
        assert json.loads(out.read_text())["trained_on_scored"] == {
            "records": n_kept, "of": n_train, "splits": ["train"], "records_trained": n_kept}, data
        assert "training figures, not a test" in " ".join(output.split())
    result, output = invoke("eval", "vqa", "--model", trained, "--data", copy, "--split", "test",
                            "--json", tmp_path / "test.json", "--quiet")
    assert result.exit_code == 0 and "trained_on_scored" not in json.loads((tmp_path / "test.json").read_text())


def test_a_model_trained_on_the_file_is_said_when_its_folder_is_scored(phantom, tmp_path):
    out = tmp_path / "run"
    result, output = invoke("train", "vqa", "--data", phantom / "vqa" / "train.json", "--out", out, "--epochs", "1",
                            "--max-steps", "1", *TINY)
    assert result.exit_code == 0, output
    n_train = len(json.loads((phantom / "vqa" / "train.json").read_text()))
    for split, expected in (("train", n_train), ("test", None)):
        result, output = invoke("eval", "vqa", "--model", out, "--data", phantom / "vqa", "--split", split,
                                "--json", tmp_path / f"{split}.json", "--quiet")
        assert result.exit_code == 0, output
        seen = json.loads((tmp_path / f"{split}.json").read_text()).get("trained_on_scored")
        assert (seen and seen["records"]) == expected


def test_a_dataset_of_the_training_files_is_the_training_data_however_named(phantom):
    """The check every evaluator of a ``Dataset`` shares (zero-shot, retrieval, linear probe, case retrieval,
    report) compares the files read, as VQA scoring does."""
    model = create_model("phantom-tiny")
    model.meta["training"] = training_data(load_dataset(phantom / "vqa").select("train"))
    n_train = len(json.loads((phantom / "vqa" / "train.json").read_text()))
    seen = trained_on_scored(model, load_dataset(phantom / "vqa" / "train.json"))
    assert seen is not None and seen["records"] == n_train
    assert trained_on_scored(model, load_dataset(phantom / "vqa" / "test.json")) is None


def test_a_run_started_with_the_default_image_model_resumes_with_or_without_init(phantom, tmp_path):
    """Runs have always recorded image_model 'cxr-small' when none was given, with --init too. When the option's
    default became None (to tell it from one given beside --init), such runs could not be resumed: 'changes
    image_model 'cxr-small' -> None', and with --init no command could resume them."""
    from medvl.models.registry import create_model

    create_model("phantom-tiny", **{"image.image_size": 32}).save_pretrained(tmp_path / "dual")
    small = TINY[4:]  # without --image-model phantom-tiny --image-size 32
    assert TINY[:4] == ["--image-model", "phantom-tiny", "--image-size", "32"]
    for name, extra in (("plain", ["--max-steps", "1", "--image-size", "32"]), ("init", ["--init", tmp_path / "dual"])):
        out = tmp_path / name
        train = ("train", "vqa", "--data", phantom / "vqa", "--out", out, "--epochs", "1", *extra, *small)
        result, output = invoke(*train)
        assert result.exit_code == 0, output
        settings = json.loads((out / "train_config.json").read_text())
        assert settings["vqa"]["image_model"] == "cxr-small"  # as every run before recorded it
        result, output = invoke(*train, "--resume")
        assert result.exit_code == 0, output


def test_resume_with_another_init_model_under_the_same_path_is_refused(phantom, tmp_path):
    """A run without a checkpoint (stopped by --max-steps) was "resumed" from whatever dual encoder sat at the --init
    path: the run recorded the path only. The weights' digest is recorded and compared (a copy is the same start)."""
    torch.manual_seed(0)
    create_model("phantom-tiny", **{"image.image_size": 32}).save_pretrained(tmp_path / "dual")
    shutil.copytree(tmp_path / "dual", tmp_path / "dual-copy")
    out = tmp_path / "run"
    train = ("train", "vqa", "--data", phantom / "vqa", "--out", out, "--epochs", "1", "--max-steps", "1",
             *TINY[4:])  # without --image-model phantom-tiny --image-size 32
    result, output = invoke(*train, "--init", tmp_path / "dual")
    assert result.exit_code == 0, output
    assert not (out / "checkpoint").exists()
    digest = json.loads((out / "model" / "meta.json").read_text())["init"]["weights_sha256"]
    assert json.loads((out / "train_config.json").read_text())["start"]["weights_sha256"] == digest
    result, output = invoke(*train, "--init", tmp_path / "dual-copy", "--resume")  # the same weights, moved
    assert result.exit_code == 0, output
    shutil.rmtree(tmp_path / "dual")
    torch.manual_seed(1)
    create_model("phantom-tiny", **{"image.image_size": 32}).save_pretrained(tmp_path / "dual")  # other weights
    before = (out / "model" / "model.safetensors").read_bytes()
    result, output = invoke(*train, "--init", tmp_path / "dual", "--resume")
    assert result.exit_code == 2, output
    assert (f"this command changes the starting model '{tmp_path / 'dual-copy'}' (weights sha256 {digest[:12]}) -> "
            f"'{tmp_path / 'dual'}' (weights sha256") in " ".join(output.split())
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_resume_with_another_setting_or_changed_questions_is_refused(phantom, tmp_path):
    """--resume continues the run with the settings and questions it was started with: another --image-lr-scale
    (another optimizer layout) or edited answers are one-line refusals, not a traceback or a silent mix."""
    data = tmp_path / "vqa"
    shutil.copytree(phantom / "vqa", data)
    out = tmp_path / "run"
    train = ("train", "vqa", "--data", data, "--out", out, "--epochs", "1", *TINY)
    result, output = invoke(*train)
    assert result.exit_code == 0, output
    for scale in ("0.5", "0"):
        result, output = invoke(*train, "--resume", "--image-lr-scale", scale)
        assert result.exit_code == 2, output
        assert f"image_lr_scale 1.0 -> {float(scale)!r}" in " ".join(output.split())
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # 0: augment warned too
        assert len(errors) == 1 and "this command changes" in errors[0]
    result, output = invoke(*train, "--resume")  # the same settings and questions: it goes on
    assert result.exit_code == 0, output
    named_otherwise = list(train)
    named_otherwise[named_otherwise.index(data)] = data / "train.json"  # the folder's train split, as its file
    result, output = invoke(*named_otherwise, "--resume")
    assert result.exit_code == 0, output
    questions = json.loads((data / "train.json").read_text())
    flip = {"yes": "no", "no": "yes", "first": "second", "second": "first"}
    (data / "train.json").write_text(json.dumps([{**q, "answer": flip.get(q["answer"], q["answer"])}
                                                 for q in questions]))
    result, output = invoke(*train, "--resume")
    assert result.exit_code == 2, output
    assert "the questions (a question, answer, split or image file changed since)" in " ".join(output.split())


def test_two_image_answer_with_evidence(trained, phantom, tmp_path):
    items = json.loads((phantom / "vqa" / "test.json").read_text())
    two = next(item for item in items if len(item.get("image_names", [])) == 2)
    images = [phantom / "vqa" / name for name in two["image_names"]]
    out, png = tmp_path / "answer.json", tmp_path / "heat.png"
    result, output = invoke("vqa", *images, "--model", trained, "--question", two["question"], "--json", out,
                            "--heatmap", png)
    assert result.exit_code == 0, output
    answer = json.loads(out.read_text())
    assert answer["model"] == trained.name  # the run folder's name, as /v1/vqa names it (model_name)
    model = load_vqa_model(trained)
    assert answer["answer"] in model.answers and answer["alternative"] in model.answers
    assert 1.0 >= answer["probability"] >= answer["alternative_probability"] >= 0.0
    assert len(answer["heatmaps"]) == 2
    total = sum(sum(heat["grid"]) for heat in answer["heatmaps"])
    assert total == pytest.approx(1.0, abs=1e-2)  # attention over the tokens of both images
    assert png.stat().st_size > 0
    assert "answer:" in output and "top alternative" in output
    assert answer["input_flags"] == [{}, {}]  # both films hold content
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(blank)
    result, output = invoke("vqa", images[0], blank, "--model", trained, "--question", two["question"], "--json",
                            tmp_path / "blank.json")
    assert result.exit_code == 0, output
    flags = json.loads((tmp_path / "blank.json").read_text())["input_flags"]
    assert [list(flag) for flag in flags] == [[], ["blank"]]
    assert "image 2 is blank as the model sees it: no content to answer on" in " ".join(output.split())
    result, output = invoke("vqa", blank, blank, "--model", trained, "--question", two["question"], "--json",
                            tmp_path / "twice.json")  # one file given twice is read once, flagged for both
    assert result.exit_code == 0, output
    assert [list(flag) for flag in json.loads((tmp_path / "twice.json").read_text())["input_flags"]] == [["blank"]] * 2


def test_answer_json_names_each_image_by_its_file_name_only(trained, phantom, tmp_path):
    """medvl vqa --json wrote each image's full path (heatmaps[].image), with folders above that may name a
    patient; it names them as report generate and search do: by the last path component."""
    folder = tmp_path / "Doe_John_MRN12345"
    folder.mkdir()
    shutil.copy(phantom / "images" / "phantom_00001.png", folder / "cxr.png")
    out = tmp_path / "answer.json"
    result, output = invoke("vqa", folder / "cxr.png", "--model", trained, "--question", "Is there a pleural effusion?",
                            "--json", out)
    assert result.exit_code == 0, output
    assert [heat["image"] for heat in json.loads(out.read_text())["heatmaps"]] == ["cxr.png"]
    assert "Doe_John" not in out.read_text()


def test_answer_json_names_the_model_by_its_folder_name_as_the_service_does(trained, phantom, tmp_path):
    """medvl vqa --json wrote --model as typed (a full path, whose folders may name a patient) while /v1/vqa wrote
    the served folder's last name ("model" for a train vqa output's model/): both now give models.vqa.model_name,
    the run folder's name however the folder is given, as the other answers give their model's name."""
    run = tmp_path / "Doe_John_MRN12345" / "vqa-run"
    shutil.copytree(trained, run)
    image = next((phantom / "vqa" / "images").glob("*.png"))
    for given in (run, run / "model", run / "model" / ".." / "model"):
        out = tmp_path / "answer.json"
        result, output = invoke("vqa", image, "--model", given, "--question", "Is there a nodule?", "--json", out,
                                "--overwrite")
        assert result.exit_code == 0, output
        assert json.loads(out.read_text())["model"] == "vqa-run"
        assert "Doe_John" not in out.read_text()
    model = load_vqa_model(run / "model")
    assert model.name == "vqa-run" and answer_with_rationale(model, [image], "Is there a nodule?")["model"] == "vqa-run"


def test_saved_model_answers_as_the_trained_one(phantom, tmp_path):
    items = select_questions(load_vqa(phantom / "vqa"), "train", "data", "train")
    options = VQAOptions(image_model="phantom-tiny", image_size=32, question_encoder="bert", hidden_size=32,
                         fusion_layers=1, overrides={"text.hidden_size": 32, "text.num_layers": 1})
    model = train_vqa(items, tmp_path / "run", TrainConfig(epochs=1, batch_size=32, max_steps=2), options, "phantom",
                      show_progress=False)
    loaded = VQAModel.from_pretrained(tmp_path / "run" / "model")
    sample = items[:12]
    first, second = answer_items(model, sample), answer_items(loaded, sample)
    assert [row["answer"] for row in first] == [row["answer"] for row in second]
    assert torch.allclose(torch.stack([r["attention"] for r in first]), torch.stack([r["attention"] for r in second]))
    # a text/ tokenizer whose ids run past the question tower's embeddings is refused at load, as a dual encoder's is
    # (it loaded, then the first question failed with an IndexError)
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "run" / "model", damaged)
    tokenizer = json.loads((damaged / "text" / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["effusion"] = 1_000_000
    (damaged / "text" / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelError, match=re.escape(f"{damaged}: the tokenizer in text/ does not fit the text tower (a "
                                                   "token of its vocabulary has id 1000000")):
        load_vqa_model(damaged)


def test_a_frozen_question_tower_keeps_a_bounded_cache_without_question_text(phantom, tmp_path):
    """A frozen question tower cached the encoding of every question ever asked, keyed by its text, for the life
    of the process (a service grew without bound and held every question); the cache keeps the most recently
    used questions only, keyed by a hash, and a question dropped from it is answered as before."""
    from medvl.api import answer_pixels

    out = tmp_path / "frozen"
    result, output = invoke("train", "vqa", "--data", phantom / "vqa", "--out", out, "--epochs", "1",
                            "--max-steps", "1", *TINY, "--set", "text.freeze=true")
    assert result.exit_code == 0, output
    net = load_vqa_model(out)
    assert isinstance(net, VQAModel) and net.config.text.freeze
    net.frozen_cache_size = 4
    image = np.asarray(Image.open(sorted((phantom / "vqa" / "images").glob("*.png"))[0]))
    questions = [f"Is there a nodule number {n} in patient John Smith?" for n in range(10)]
    first = [answer_pixels(net, [image], question)["probability"] for question in questions]
    assert len(net._frozen_questions) == 4
    assert not any("John Smith" in key for key in net._frozen_questions)
    again = [answer_pixels(net, [image], question)["probability"] for question in questions]
    assert again == pytest.approx(first)


def test_model_learns_to_read_the_image(phantom, tmp_path):
    """Which of two films shows the finding (balanced first / second): after training, the training
    questions must be answered well above the blank-image answers of the same model, which cannot tell
    the films apart."""
    items = [item for item in select_questions(load_vqa(phantom / "vqa"), "all", "data", None)
             if item.question_type == "which_image"]
    options = VQAOptions(image_model="phantom-tiny", image_size=32, question_encoder="bert", hidden_size=32,
                         fusion_layers=1, augment=False,
                         overrides={"text.hidden_size": 32, "text.num_layers": 1, "dropout": 0.0})
    repeated = items * 80  # one long epoch: one checkpoint instead of one per pass
    model = train_vqa(repeated, tmp_path / "run", TrainConfig(epochs=1, batch_size=64, lr=3e-3, seed=1), options,
                      "phantom", show_progress=False)
    scores = evaluate_vqa(model, items, "phantom")
    assert scores["overall_accuracy"] >= 0.8
    assert scores["overall_accuracy"] >= scores["blank_image_overall_accuracy"] + 0.25


@pytest.mark.parametrize("question, message", [("   ", "question is empty"), ("\udcff\udcfe x", "not valid UTF-8"),
                                               ("why " * 300, "--question: longer than 1000 characters (1,199)")])
def test_bad_question_is_one_line(trained, phantom, question, message):
    image = next((phantom / "vqa" / "images").glob("*.png"))
    result, output = invoke("vqa", image, "--model", trained, "--question", question)
    assert result.exit_code == 2
    assert message in output and len(result.stderr.strip().splitlines()) == 1


def test_a_question_longer_than_the_question_encoder_reads_is_refused_not_cut(trained, phantom):
    """The question tower keeps text.max_length tokens: three ~330-character questions, different only after
    their 48th token, got the same answer (the question itself was cut off) while 1,000 characters were taken."""
    image = next((phantom / "vqa" / "images").glob("*.png"))
    model = load_vqa_model(trained)
    limit = model.config.text.max_length - 2  # [CLS] and [SEP]
    filler = "the patient was seen in clinic today for a follow up of an earlier chest radiograph " * 3
    for question in (filler + "is there a nodule?", filler + "which side is the effusion on?"):
        assert len(question) < 1000
        result, output = invoke("vqa", image, "--model", trained, "--question", question)
        assert result.exit_code == 2, output
        assert f"question encoder reads {limit} tokens at most" in output, output
        assert len(result.stderr.strip().splitlines()) == 1
        with pytest.raises(InputError, match="the rest would be cut unread"):
            answer_with_rationale(model, [image], question)
    words = " ".join(["nodule"] * limit)  # one token each: exactly what the encoder reads
    assert answer_with_rationale(model, [image], words)["answer"]
    with pytest.raises(InputError, match=f"is {limit + 1} tokens long"):
        answer_with_rationale(model, [image], words + " nodule")


@pytest.mark.parametrize("question", ["☃ ☃ 你好", "?", " ... ?! "])
def test_a_question_with_no_word_the_model_knows_is_refused(trained, phantom, question):
    """A question the question encoder reads as nothing but [UNK] and punctuation was answered with a probability
    and no word of warning, as if it had been read: it is refused as an empty one is, without quoting it."""
    image = next((phantom / "vqa" / "images").glob("*.png"))
    model = load_vqa_model(trained)
    assert isinstance(model, VQAModel)
    result, output = invoke("vqa", image, "--model", trained, "--question", question)
    assert result.exit_code == 2, output
    assert "--question: the question has no word this VQA model knows" in " ".join(output.split())
    assert len(result.stderr.strip().splitlines()) == 1 and question.strip() not in output
    with pytest.raises(InputError, match="no word this VQA model knows"):
        answer_with_rationale(model, [image], question)
    assert answer_with_rationale(model, [image], "Is there a 你好 nodule?")["answer"]  # one word it knows: answered


def test_unknown_words_of_a_question_are_counted_and_warned(trained, phantom, tmp_path):
    """A question with some words the question encoder does not know ("Is there a 你好 nodule?") was answered as if
    read whole, without a word: the answer counts them (`unknown_words`, never quoting them) and the CLI warns."""
    image = next((phantom / "vqa" / "images").glob("*.png"))
    model = load_vqa_model(trained)
    assert isinstance(model, VQAModel)
    assert answer_with_rationale(model, [image], "Is there a nodule?")["unknown_words"] == 0
    assert answer_with_rationale(model, [image], "Is there a ☃ 你好 nodule?")["unknown_words"] >= 2
    out = tmp_path / "answer.json"
    result, output = invoke("vqa", image, "--model", trained, "--question", "Is there a 你好 nodule?", "--json", out)
    assert result.exit_code == 0, output
    answer = json.loads(out.read_text())
    assert answer["unknown_words"] >= 1
    # not "left out": an unknown word is read too (an unknown token, or as a pretrained encoder knows it) and may
    # sway the answer (the VQA-RAD model: "zebra" yes 0.60, "bicycle" no 0.80 in one question)
    assert "2 words of the question (or pieces of words) this VQA model does not know: none of its training " \
           "questions held them, yet they may sway the answer: read it with care" in " ".join(output.split()), output
    assert "你好" not in output and "你好" not in out.read_text(encoding="utf-8")
    result, output = invoke("vqa", image, "--model", trained, "--question", "Is there a nodule?")
    assert result.exit_code == 0 and "does not know" not in output, output


def test_a_term_no_training_question_holds_counts_as_unknown_in_the_cli_eval_and_library(trained, phantom, tmp_path,
                                                                                          caplog):
    """unknown_words counted only the question encoder's unknown tokens, but its word-piece tokenizer spells a term it
    never saw from known pieces ("atelectasis" as ate ##le ##cta ##sis): it almost never counted one. medvl train vqa
    now records the training questions' words (question_words.json) and a word not among them counts, alike in
    medvl vqa --json, medvl eval vqa and the library; a folder without the file keeps the old rule and says so once."""
    image = next((phantom / "vqa" / "images").glob("*.png"))
    folder = trained / "model"
    words = json.loads((folder / "question_words.json").read_text())  # by key: no word in clear
    assert {word_key(word) for word in ("is", "there", "nodule")} <= set(words) and "nodule" not in words
    assert word_key("atelectasis") not in words
    model = load_vqa_model(trained)
    assert isinstance(model, VQAModel)
    unseen = "Is there atelectasis?"
    assert model.text_encoder.word_tokens(unseen)[1] == 0  # spelt from pieces: no unknown token
    assert answer_with_rationale(model, [image], unseen)["unknown_words"] == 1
    assert answer_with_rationale(model, [image], "Is there a nodule?")["unknown_words"] == 0
    # a folder saved before the words were recorded: the old rule, said once (read before the CLI runs below: their
    # logging setup takes caplog's handler away)
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    (older / "question_words.json").unlink()
    with caplog.at_level(logging.WARNING, logger="medvl.models.vqa"):
        first, second = load_vqa_model(older), load_vqa_model(older)
    assert first.unknown_words(unseen) == 0 and first.unknown_words("Is there a 你好 nodule?") == 2
    assert second.question_words is None
    assert sum("question_words.json" in record.getMessage() for record in caplog.records) == 1
    out = tmp_path / "answer.json"
    result, output = invoke("vqa", image, "--model", trained, "--question", unseen, "--json", out)
    assert result.exit_code == 0, output
    assert json.loads(out.read_text())["unknown_words"] == 1 and "does not know" in output
    questions, scores, output = _eval_with_questions(trained, phantom, tmp_path, [unseen, unseen])
    expected = sum(model.unknown_words(entry["question"]) > 0 for entry in questions)
    assert scores["questions_with_unknown_words"] == expected >= 2



def test_a_question_of_only_words_no_training_question_holds_is_refused(trained, phantom, tmp_path):
    """A question spelt wholly from known word pieces but of no word the model was trained on ("Atelectasis
    emphysema?") was answered with unknown_words 2 of 2: the answer was the image's and the prior's, as for a
    question of unknown tokens only, which is refused. It is refused alike; a folder without question_words.json
    (no record of the training words) still answers it, as before."""
    image = next((phantom / "vqa" / "images").glob("*.png"))
    model = load_vqa_model(trained)
    assert isinstance(model, VQAModel)
    question = "Atelectasis emphysema?"
    assert model.text_encoder.known_word_tokens(question)  # word pieces it knows: the older rule let it through
    result, output = invoke("vqa", image, "--model", trained, "--question", question)
    assert result.exit_code == 2, output
    assert "--question: the question has no word this VQA model was trained on (none of its 2 words" in " ".join(
        output.split()), output
    assert "telectasis" not in output and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(InputError, match="no word this VQA model was trained on"):
        answer_with_rationale(model, [image], question)
    assert answer_with_rationale(model, [image], "Is there atelectasis?")["unknown_words"] == 1  # one known: answered
    older = tmp_path / "older"
    shutil.copytree(trained / "model", older)
    (older / "question_words.json").unlink()
    assert answer_with_rationale(load_vqa_model(older), [image], question)["answer"]


def _eval_with_questions(trained, phantom, tmp_path, first: list[str]) -> tuple[list[dict], dict, str]:
    """``medvl eval vqa`` of the phantom's test questions with the first ones replaced by ``first``: the questions,
    the JSON scores and the output."""
    copy = tmp_path / "vqa"
    shutil.copytree(phantom / "vqa", copy)
    questions = json.loads((copy / "test.json").read_text())
    for entry, question in zip(questions, first, strict=False):
        entry["question"] = question
    (copy / "test.json").write_text(json.dumps(questions), encoding="utf-8")
    out = tmp_path / "scores.json"
    result, output = invoke("eval", "vqa", "--model", trained, "--data", copy, "--split", "test", "--json", out,
                            "--quiet")
    assert result.exit_code == 0, output
    return questions, json.loads(out.read_text()), output


def test_eval_counts_the_questions_with_no_word_the_model_knows(trained, phantom, tmp_path):
    """medvl eval vqa scores such questions as read (a file is not refused for them), counted with a warning."""
    questions, scores, output = _eval_with_questions(trained, phantom, tmp_path, ["☃ ☃ 你好", "?", "☃ ☃ 你好"])
    assert scores["questions_unread"] == 3
    assert (f"3 of {len(questions)} scored questions have no word the model's question encoder knows"
            in " ".join(output.split())), output
    assert "☃" not in output
    assert evaluate_vqa(load_vqa_model(trained), load_vqa(phantom / "vqa")[:20], "phantom")["questions_unread"] == 0


def test_k_without_an_index_is_refused(trained, phantom):
    image = next((phantom / "vqa" / "images").glob("*.png"))
    for k in ("3", "-7"):
        result, output = invoke("vqa", image, "--model", trained, "--question", "Is there a nodule?", "--k", k)
        assert result.exit_code == 2 and "--k (nearest cases to list) needs --index" in output, output
    # with an index, a k out of range is refused before the model is loaded and answers (it was checked after)
    result, output = invoke("vqa", image, "--model", phantom / "no-model", "--question", "Is there a nodule?",
                            "--index", phantom / "no-index", "--k", "0")
    assert result.exit_code == 2 and "k must be >= 1" in output, output


def test_train_refuses_init_and_image_model_together(phantom, tmp_path):
    from medvl.models.registry import create_model

    create_model("phantom-tiny", **{"image.image_size": 32}).save_pretrained(tmp_path / "dual")
    result, output = invoke("train", "vqa", "--data", phantom / "vqa", "--out", tmp_path / "out", "--init",
                            tmp_path / "dual", "--image-model", "vit-tiny", "--epochs", 1, "--max-steps", 1, "-q")
    assert result.exit_code == 2 and "give --init or --image-model, not both" in output, output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--question-encoder", "bert", "--set", "image.augment_crop=0.35"],
     "--set image.augment_crop: image.* overrides do not apply with --init (the image tower is the dual encoder's)"),
    (["--question-encoder", "dual", "--set", "text.max_length=16"],
     "--set text.max_length: text.* overrides do not apply with --question-encoder dual"),
])
def test_overrides_of_a_tower_copied_from_init_are_refused(phantom, tmp_path, extra, message):
    """``from_dual_encoder`` copies the dual encoder's image section (and its text section for the question tower):
    an override of it was dropped without a word while ``train_config.json`` recorded it as applied."""
    from medvl.models.registry import create_model

    create_model("phantom-tiny", **{"image.image_size": 32}).save_pretrained(tmp_path / "dual")
    result, output = invoke("train", "vqa", "--data", phantom / "vqa", "--out", tmp_path / "out", "--init",
                            tmp_path / "dual", "--epochs", 1, "--max-steps", 1, *extra, "-q")
    assert result.exit_code == 2 and message in " ".join(output.split()), output
    assert "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_image_tokens_are_the_image_towers_not_an_option(trained, phantom, tmp_path):
    """``--set image_tokens=5`` was kept as given: five position rows broadcast over the tower's one token, heatmap
    peaks outside the image and a traceback on --heatmap. It is refused, and a model folder whose config says
    another count than its image tower gives is refused when loaded."""
    result, output = invoke("train", "vqa", "--data", phantom / "vqa", "--out", tmp_path / "out", "--epochs", 1,
                            "--max-steps", 1, *TINY, "--set", "image_tokens=5")
    assert result.exit_code == 2 and "--set image_tokens: the tokens per image are set from the image tower" \
        in " ".join(output.split()), output
    assert not (tmp_path / "out").exists()
    folder = tmp_path / "model"
    shutil.copytree(trained / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["image_tokens"] += 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"config.json: image_tokens {config['image_tokens']} differs from the "
                                         f"{config['image_tokens'] - 4} token"):
        load_vqa_model(folder)


@pytest.mark.parametrize("setting, key, option", [
    ("max_images=1", "max_images", "--max-images"), ("image.image_size=48", "image.image_size", "--image-size"),
    ("route_by_type=false", "route_by_type", "--route-by-type"),
    ('image={"augment": true}', "image.augment", "--augment")])
def test_a_setting_a_named_option_sets_is_refused_in_set(phantom, tmp_path, setting, key, option):
    """``--set max_images=3`` beat ``--max-images 4`` (and ``image.image_size``, ``route_by_type`` their options)
    without a word, and ``--set max_images=1`` passed the image-count check made with the option's 2."""
    result, output = invoke("train", "vqa", "--data", phantom / "vqa", "--out", tmp_path / "out", "--epochs", 1,
                            "--max-steps", 1, *TINY, "--set", setting)
    assert result.exit_code == 2 and f"--set {key}: set by {option}" in " ".join(output.split()), output
    assert not (tmp_path / "out").exists()


def test_train_split_heldout_is_named_as_an_eval_split(phantom, tmp_path):
    """``medvl train vqa --split heldout --holdout 0.2`` answered "the model holds out no questions (train it with
    --holdout)", the scoring side's message, to a user who gave --holdout."""
    result, output = invoke("train", "vqa", "--data", phantom / "vqa", "--out", tmp_path / "out", "--epochs", 1,
                            "--max-steps", 1, "--split", "heldout", "--holdout", "0.2", *TINY)
    assert result.exit_code == 2, output
    assert "--split heldout names the questions a trained model held out; it is for medvl eval vqa" \
        in " ".join(output.split()), output
    assert not (tmp_path / "out").exists()


def test_more_images_than_the_model_takes(trained, phantom):
    image = next((phantom / "vqa" / "images").glob("*.png"))
    result, output = invoke("vqa", image, image, image, "--model", trained, "--question", "Which image?")
    assert result.exit_code == 2
    assert "3 images given; the model takes at most 2" in output


def test_too_many_images_names_the_question_file_and_the_option(trained, phantom, tmp_path):
    result, output = invoke("train", "vqa", "--data", phantom / "vqa", "--out", tmp_path / "run", "--epochs", "1",
                            "--max-images", "1", *TINY)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, output
    flat = " ".join(output.split())
    assert f"{phantom / 'vqa' / 'train.json'}: question" in flat and "has 2 images" in flat
    assert "raise --max-images" in flat and "tokenizer" not in flat  # refused before any work
    image = next((phantom / "vqa" / "images").glob("*.png"))
    three = tmp_path / "three.json"
    three.write_text(json.dumps([{"qid": 1, "image_names": [str(image)] * 3, "question": "Is it?", "answer": "yes"}]))
    result, output = invoke("eval", "vqa", "--model", trained, "--data", three, "--allow-outside-root", "--quiet")
    assert result.exit_code == 2, output
    assert f"{three}: question 1 has 3 images; the model takes at most 2" in " ".join(output.split())


def test_heatmap_is_written_as_png_and_another_suffix_refused(trained, phantom, tmp_path):
    """--heatmap writes PNG, as medvl explain's heatmap files are: a name promising another format is refused."""
    image = next((phantom / "vqa" / "images").glob("*.png"))
    for name in ("h.jpg", "h", "h.png.tif"):
        result, output = invoke("vqa", image, "--model", trained, "--question", "Is it?", "--heatmap", tmp_path / name)
        assert result.exit_code == 2, output
        assert "--heatmap: writes PNG; name the file .png" in " ".join(output.split())
        assert not (tmp_path / name).exists()
    for given in (".", ""):  # quoted as given: Path's name of '.' was '' (and '' became '.')
        result, output = invoke("vqa", image, "--model", trained, "--question", "Is it?", "--heatmap", given)
        assert result.exit_code == 2, output
        assert f"--heatmap: writes PNG; name the file .png, not {given!r}" in " ".join(output.split()), output
    result, output = invoke("vqa", image, "--model", trained, "--question", "Is it?", "--heatmap", tmp_path / "h.PNG")
    assert result.exit_code == 0, output
    assert (tmp_path / "h.PNG").read_bytes().startswith(b"\x89PNG")


def test_heatmap_is_drawn_over_each_image_on_its_own_grid(trained, phantom, tmp_path):
    """--heatmap draws each image as given, at its own size and aspect ratio, as medvl explain's overlays are, with
    the attention in red peaking where the answer says. It used to draw the model's square input (32x32 here) for
    every image, so a wide film came out squashed."""
    films = sorted((phantom / "vqa" / "images").glob("*.png"))[:2]
    wide, small = tmp_path / "wide.png", tmp_path / "small.png"
    Image.open(films[0]).convert("L").resize((80, 48)).save(wide)
    Image.open(films[1]).convert("L").resize((40, 40)).save(small)
    png, out = tmp_path / "heat.png", tmp_path / "answer.json"
    result, output = invoke("vqa", wide, small, "--model", trained, "--question", "Is there a nodule?",
                            "--heatmap", png, "--json", out)
    assert result.exit_code == 0, output
    picture = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    assert picture.shape == (48, 80 + 40, 3)
    answer = json.loads(out.read_text())
    for image, heat, (left, width, height) in zip((wide, small), answer["heatmaps"], ((0, 80, 48), (80, 40, 40)),
                                                  strict=True):
        panel = picture[:height, left:left + width]
        grey = np.asarray(Image.open(image)).astype(np.float64)
        assert np.abs(panel[..., 1] - grey * 0.6).max() <= 1  # the image itself, in grey, on its own grid
        red = panel[..., 0] - panel[..., 1]  # the attention
        row, column = np.unravel_index(int(red.argmax()), red.shape)
        rows, columns = heat["shape"]
        assert abs((row + 0.5) / height - heat["peak"]["row"]) <= 1 / rows
        assert abs((column + 0.5) / width - heat["peak"]["column"]) <= 1 / columns
    assert not picture[40:, 80:].any()  # the shorter panel padded with black


def test_vocabulary_mismatch_names_the_file(trained, phantom):
    items = json.loads((phantom / "vqa" / "test.json").read_text())
    other = [{"qid": i, "image_name": item["image_name"], "question": "What organ system is shown?",
              "answer": f"answer {i}", "answer_type": "OPEN", "question_type": "ORGAN"}
             for i, item in enumerate(items[:10])]
    path = phantom / "vqa" / "other_questions.json"
    path.write_text(json.dumps(other))
    try:
        result, output = invoke("eval", "vqa", "--model", trained, "--data", path, "--quiet")
    finally:
        path.unlink()
    assert result.exit_code == 2
    assert str(path) in output and "answer vocabulary mismatch" in output


def test_non_utf8_question_file_is_one_line(phantom, tmp_path):
    path = phantom / "vqa" / "latin1.json"
    text = '[{"qid": 1, "image_name": "images/phantom_00000.png", "question": "gr\u00f6\u00dfer?", "answer": "ja"}]'
    path.write_bytes(text.encode("latin-1"))
    try:
        result, output = invoke("train", "vqa", "--data", path, "--out", tmp_path / "run", *TINY)
    finally:
        path.unlink()
    assert result.exit_code == 2
    assert "latin1.json" in output and len(result.stderr.strip().splitlines()) == 1


def _report_generator(folder):
    from medvl.models.decoder import DecoderConfig, ReportGenerator, ReportGeneratorConfig
    from medvl.models.registry import get_config

    decoder = DecoderConfig(hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64, vocab_size=200)
    config = ReportGeneratorConfig(image=get_config("phantom-tiny").image, decoder=decoder)
    ReportGenerator(config).save_pretrained(folder)


@pytest.mark.parametrize("kind, message", [
    ("dual", "is a dual encoder (medvl train), not a VQA model; train a VQA model from it with medvl train vqa "
             "--init"),
    ("report", "is a report generator (medvl train report), not a VQA model; use it with medvl report generate or "
               "medvl eval report"),
])
def test_another_kind_of_model_folder_is_named_as_such_not_as_a_vqa_model_missing_files(kind, message, phantom,
                                                                                       tmp_path):
    """A report generator was "not a medvl VQA model directory (missing text)", which sends one looking for a damaged
    folder; a dual encoder "not a VQA model (config kind None; ...)"."""
    folder = tmp_path / kind
    if kind == "dual":
        create_model("phantom-tiny").save_pretrained(folder)
    else:
        _report_generator(folder)
    image = next((phantom / "images").glob("*.png"))
    for command in (("eval", "vqa", "--model", folder, "--data", phantom / "vqa", "--quiet"),
                    ("vqa", image, "--model", folder, "--question", "is there a nodule?")):
        result, output = invoke(*command)
        assert result.exit_code == 2, output
        assert f"error: {folder}: {message}" in output, output


@pytest.mark.parametrize("answer_types, found", [
    (None, "none"), (1, "int"), ({"yes": [["CLOSED"]]}, "a mapping of other values"), ({"yes": "CLOSED"},
                                                                                       "a mapping of other values"),
    # docs probe: a misspelt type, an empty list and an answer the model does not have loaded and changed answers
    ({"yes": ["open"]}, "a mapping of other values"), ({"yes": []}, "a mapping of other values"),
    ({"no such answer": ["CLOSED"]}, "a mapping of other values")])
def test_a_meta_json_without_answer_types_is_refused_at_load(trained, phantom, tmp_path, answer_types, found):
    """meta.json's answer_types, read on every question: missing or of another shape, the folder loaded and the
    first question crashed (KeyError / AttributeError / TypeError tracebacks, exit 1); a ModelError at load."""
    folder = tmp_path / "model"
    shutil.copytree(trained / "model", folder)
    meta = json.loads((folder / "meta.json").read_text())
    if answer_types is None:
        del meta["answer_types"]
    else:
        meta["answer_types"] = answer_types
    (folder / "meta.json").write_text(json.dumps(meta))
    message = (f"error: {folder}: meta.json: answer_types must map each answer to its types (CLOSED / OPEN), "
               f"got {found}")
    image = next((phantom / "images").glob("*.png"))
    for command in (("eval", "vqa", "--model", folder, "--data", phantom / "vqa", "--quiet"),
                    ("vqa", image, "--model", folder, "--question", "is there a nodule?")):
        result, output = invoke(*command)
        assert result.exit_code == 2, output
        assert message in " ".join(output.split()), output


def test_init_from_a_dual_encoder_copies_its_image_tower(phantom, tmp_path):
    from medvl.models.registry import create_model
    from medvl.train.vqa import build_vqa_model

    dual = create_model("phantom-tiny", **{"image.image_size": 32})
    dual.save_pretrained(tmp_path / "dual")
    items = select_questions(load_vqa(phantom / "vqa"), "train", "data", "train")
    model = build_vqa_model(items, VQAOptions(init=tmp_path / "dual", question_encoder="dual", hidden_size=32,
                                              fusion_layers=1))
    for name, tensor in dual.image_encoder.state_dict().items():
        assert torch.equal(tensor, model.image_encoder.state_dict()[name]), name
    assert model.text_encoder is dual.text_encoder or model.config.text == dual.config.text
    assert normalize_answer("Yes.") in model.answers


def test_answer_lists_the_nearest_indexed_cases_less_the_image_itself(trained, phantom, tmp_path):
    """The query image, indexed, was its own first supporting case (similarity 1.000: circular evidence, and one of
    the k places taken); its indexed copies are left out, and named, as medvl report draft does."""
    from medvl.models.registry import create_model

    create_model("phantom-tiny", **{"image.image_size": 32}).save_pretrained(tmp_path / "dual")
    result, output = invoke("index", "build", "--model", tmp_path / "dual", "--data", phantom, "--split", "all",
                            "--out", tmp_path / "cases.idx", "--quiet")
    assert result.exit_code == 0, output
    image = phantom / "images" / "phantom_00001.png"
    out = tmp_path / "answer.json"
    result, output = invoke("vqa", image, "--model", trained, "--question", "Is there a pleural effusion?",
                            "--index", tmp_path / "cases.idx", "-k", "2", "--json", out)
    assert result.exit_code == 0, output
    answer = json.loads(out.read_text())
    cases = answer["supporting_cases"]
    assert len(cases) == 2 and "images/phantom_00001" not in [case["id"] for case in cases]  # k others
    assert answer["left_out_copies"] == ["images/phantom_00001"]  # the image itself is indexed
    assert cases[0]["score"] >= cases[1]["score"]
    assert "supporting case: images/phantom_00001" not in output
    assert "the query image is indexed as images/phantom_00001: left out of the supporting cases" in \
        " ".join(output.split())
    assert f"supporting case: {cases[0]['id']}" in output
    rgb = tmp_path / "rgb.png"  # the same picture with three equal channels: its copy too
    Image.open(image).convert("RGB").save(rgb)
    result, output = invoke("vqa", rgb, "--model", trained, "--question", "Is there a pleural effusion?",
                            "--index", tmp_path / "cases.idx", "-k", "2", "--json", tmp_path / "rgb.json")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "rgb.json").read_text())["left_out_copies"] == ["images/phantom_00001"]


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_answer_lists_the_nearest_cases_of_a_pgvector_index(trained, phantom, tmp_path):
    """``--index`` takes a postgresql:// URL as every other command's does (a Path would mangle its '//')."""
    from medvl.models.registry import create_model

    with postgres_server("medvl-pg-vqa-") as (server, _):
        create_model("phantom-tiny", **{"image.image_size": 32}).save_pretrained(tmp_path / "dual")
        url = server.get_uri() + "#vqa_cases"
        result, output = invoke("index", "build", "--model", tmp_path / "dual", "--data", phantom, "--split", "all",
                                "--out", url, "--quiet")
        assert result.exit_code == 0, output
        out = tmp_path / "answer.json"
        result, output = invoke("vqa", phantom / "images" / "phantom_00001.png", "--model", trained, "--question",
                                "Is there a pleural effusion?", "--index", url, "-k", "2", "--json", out)
        assert result.exit_code == 0, output
        answer = json.loads(out.read_text())
        assert len(answer["supporting_cases"]) == 2 and answer["left_out_copies"] == ["images/phantom_00001"]
        assert "images/phantom_00001" not in [case["id"] for case in answer["supporting_cases"]]


def test_eval_counts_the_scored_images_that_hold_no_content(trained, phantom, tmp_path):
    """A copy of the question folder in which one test image is a uniform film: counted once, however many
    questions ask about it."""
    import shutil

    copy = tmp_path / "vqa"
    shutil.copytree(phantom / "vqa", copy)
    test = select_questions(load_vqa(copy), "test", "data", "test")
    distinct = {path for item in test for path in item.images}
    blank = test[0].image
    Image.fromarray(np.full((32, 32), 120, np.uint8)).save(blank)
    out = tmp_path / "scores.json"
    result, output = invoke("eval", "vqa", "--model", trained, "--data", copy, "--split", "test", "--json", out,
                            "--quiet")
    assert result.exit_code == 0, output
    assert json.loads(out.read_text())["input_content"] == {"records": 1, "of": len(distinct),
                                                            "flags": {"blank": 1, "streaked": 0}}
    assert f"1 of {len(distinct)} scored images are blank or streaked" in " ".join(output.split())
    result, output = invoke("eval", "vqa", "--model", trained, "--data", phantom / "vqa", "--split", "test",
                            "--json", out, "--quiet", "--overwrite")
    assert result.exit_code == 0 and "input_content" not in json.loads(out.read_text())


def test_holdout_keeps_repeated_questions_together_and_names_questions_by_split():
    """The same question about the same image twice is held out or kept as one; a holdout over two splits
    records each question's split (it recorded the first one's alone, and scored the wrong questions)."""
    from medvl.data.loaders.vqa import VQAItem
    from medvl.models.vqa import held_out_ids, holdout_meta, holdout_split

    def item(qid, split, image, question):
        return VQAItem(qid=qid, image=Path(image), question=question, answer="yes", answer_normalized="yes",
                       answer_type="CLOSED", split=split, images=(Path(image),))

    items = [item(str(i), split, f"img{i % 7}.png", f"is there a finding number {i % 5}?")
             for split in ("train", "test") for i in range(40)]
    kept, held = holdout_split(items, 0.3, seed=0)
    assert 20 <= len(held) <= 30 and len(kept) + len(held) == len(items)
    key = {(str(i.image), i.question) for i in held}
    assert not key & {(str(i.image), i.question) for i in kept}  # no held-out question copies a training one
    assert {i.split for i in held} == {"train", "test"}
    assert held_out_ids(holdout_meta(held, 0.3, 0)) == {(i.split, i.qid) for i in held}
    assert select_questions(items, "heldout", "data", None, holdout_meta(held, 0.3, 0)) == held
    with pytest.raises(InputError, match="question id '1' of split 'train' is given to 2 questions"):
        holdout_split(items + [item("1", "train", "x.png", "another?")], 0.2, seed=0)


def test_a_bert_question_tower_reads_every_training_question_and_cut_ones_are_counted(trained, phantom, tmp_path,
                                                                                      caplog):
    """The random-init question tower kept a fixed 48 tokens: the phantom's own cardiothoracic-ratio question (the
    README's medvl vqa example) was trained on and scored cut without a word, while medvl vqa refused it. The tower
    is now sized to its longest training question; questions still longer are counted in train and eval vqa."""
    items = load_vqa(phantom / "vqa")
    model = load_vqa_model(trained)
    assert isinstance(model, VQAModel)
    longest = max(model.text_encoder.untruncated_length(item.question) for item in items)
    assert longest > 48  # the fixed length cut these
    assert model.config.text.max_length >= longest
    ratio = next(item for item in items if item.question_type == "ratio")
    image = ratio.images[0] if ratio.images else ratio.image
    assert answer_with_rationale(model, [image], ratio.question)["answer"]
    assert evaluate_vqa(model, items[:40], "phantom")["questions_cut"] == 0
    options = VQAOptions(image_model="phantom-tiny", image_size=32, question_encoder="bert", hidden_size=32,
                         fusion_layers=1, overrides={"text.hidden_size": 32, "text.num_layers": 1,
                                                     "text.max_length": 12})
    train_items = select_questions(items, "train", "data", "train")
    with caplog.at_level("WARNING"):
        short = train_vqa(train_items, tmp_path / "run", TrainConfig(epochs=1, batch_size=32, max_steps=1), options,
                          "phantom", show_progress=False)
    cut = sum(short.text_encoder.untruncated_length(item.question) > 12 for item in train_items)
    assert cut and f"{cut} of {len(train_items)} training questions are longer" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        scores = evaluate_vqa(short, train_items, "phantom")
    assert scores["questions_cut"] == cut and f"{cut} of {len(train_items)} scored questions" in caplog.text


def test_augment_with_a_frozen_image_tower_is_recorded_as_off_with_a_warning(phantom, tmp_path):
    """With --image-lr-scale 0 the image tokens are computed once, unaugmented: --augment (the default) did nothing,
    while the saved config said the model was trained with augmentation."""
    out = tmp_path / "frozen"
    train = ("train", "vqa", "--data", phantom / "vqa", "--out", out, "--epochs", "1", "--max-steps", "1",
             "--image-lr-scale", "0", *TINY)
    result, output = invoke(*train)
    assert result.exit_code == 0, output
    assert "--augment has no effect with --image-lr-scale 0" in " ".join(output.split())
    assert json.loads((out / "model" / "config.json").read_text())["image"]["augment"] is False
    assert json.loads((out / "train_config.json").read_text())["vqa"]["augment"] is False
    result, output = invoke(*train, "--resume")  # the same command resumes the run it started
    assert result.exit_code == 0, output


def test_a_run_started_before_towers_were_sized_and_augment_recorded_off_resumes_as_it_started(phantom, tmp_path):
    """A run folder written before the question tower was sized to its questions (48 tokens) and before a frozen
    tower's augment was recorded off was refused by --resume ("changes model config"), with no option to get past
    it: it now goes on with the settings it started with."""
    out = tmp_path / "old"
    train = ("train", "vqa", "--data", phantom / "vqa", "--out", out, "--epochs", "2", "--max-steps", "1",
             "--image-lr-scale", "0", *TINY)
    result, output = invoke(*train)
    assert result.exit_code == 0, output
    settings = json.loads((out / "train_config.json").read_text())
    assert settings["model"]["text"]["max_length"] > 48  # the phantom's longest question
    settings["model"]["text"]["max_length"] = 48  # as the run folder of an earlier medvl records it
    settings["model"]["image"]["augment"] = settings["vqa"]["augment"] = True
    (out / "train_config.json").write_text(json.dumps(settings))
    result, output = invoke(*train, "--resume")  # no checkpoint yet (max_steps): it starts again, as it started
    assert result.exit_code == 0, output
    assert "keeps it recorded as on" in " ".join(output.split())
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["text"]["max_length"] == 48 and saved["image"]["augment"] is True


def test_token_f1_is_squad_normalised_and_a_punctuated_yes_is_yes():
    """token_f1, documented as SQuAD style, split on white space only: 'ring-enhancing lesion' scored 0.4 against
    'ring enhancing lesion', and a VLM's "Yes!" was neither yes nor scored as the yes / no question."""
    from medvl.models.vlm import yes_or_no

    assert token_f1("ring-enhancing lesion", "ring enhancing lesion") == 1.0
    assert token_f1("left, right", "left right") == 1.0
    assert token_f1("the left lung", "left lung") == 1.0
    assert token_f1("Yes!", "yes") == 1.0
    assert token_f1("6-8 mm", "6 8 mm") == 1.0  # a range's hyphen is a space
    assert token_f1("<0.45", ">0.45") == 0.0 and token_f1("<6 mm", ">6 mm") == 0.5  # a sign is kept: other bins
    assert token_f1("-10 hu", "10 hu") == 0.5 and token_f1("5%", "5") == 0.0
    assert token_f1("0.45", "0.50") == 0.0  # a decimal point stays in its number
    assert [yes_or_no(text) for text in ("Yes!", "no.", "NO", "yes, there is", "noon")] == ["yes", "no", "no", None,
                                                                                             None]
    assert normalize_answer("Yes!") == "yes!"  # exact match (and the answer vocabulary) keep their form
