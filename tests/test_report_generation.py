"""The report generator: metrics against plain references, training on phantom files, decoding,
the train / generate / eval commands (with the nearest-report baseline and retrieved context), bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import medvl
from cli_helpers import PLANTED_WORDS, invoke, planted_phantom
from medvl.errors import InputError
from medvl.eval.report import clinical_efficacy, metric_tokens, nlg_metrics
from medvl.models.decoder import ReportGenerator, ReportGeneratorConfig
from medvl.models.registry import get_config
from medvl.train.loop import TrainConfig
from medvl.train.report import train_report_generator

TINY = ["--image-model", "phantom-tiny", "--set", "decoder.hidden_size=32", "--set", "decoder.num_heads=2",
        "--set", "decoder.num_layers=1", "--set", "decoder.intermediate_size=64", "--set", "decoder.max_length=48",
        "--set", "decoder.vocab_size=400"]
TINY_OVERRIDES = {"decoder.hidden_size": 32, "decoder.num_heads": 2, "decoder.num_layers": 1,
                  "decoder.intermediate_size": 64, "decoder.max_length": 48, "decoder.vocab_size": 400}


# ------------------------------------------------------------------ metrics on hand examples


def test_bleu_on_a_hand_example():
    # candidate "the cat is on the mat" vs "the cat sat on the mat": 5 of 6 unigrams, 3 of 5 bigrams,
    # 1 of 4 trigrams match; same length, so no brevity penalty
    scores = nlg_metrics(["The cat sat on the mat."], ["the cat is on the mat"])
    assert scores["bleu_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert scores["bleu_2"] == pytest.approx((5 / 6 * 3 / 5) ** 0.5, abs=1e-6)
    assert scores["bleu_3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3), abs=1e-6)
    # a shorter candidate pays the brevity penalty exp(1 - r / c)
    short = nlg_metrics(["the cat sat on the mat"], ["the cat sat"])
    assert short["bleu_1"] == pytest.approx(np.exp(1 - 6 / 3), abs=1e-6)


def test_rouge_l_is_the_lcs_f_measure_with_beta_1_2():
    from rouge_score import rouge_scorer

    reference, candidate = "the cat sat on the mat", "the cat on the mat"
    lcs = 5  # "the cat on the mat"
    precision, recall, beta = lcs / 5, lcs / 6, 1.2
    by_hand = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    assert nlg_metrics([reference], [candidate])["rouge_l"] == pytest.approx(by_hand, abs=1e-6)
    other = rouge_scorer.RougeScorer(["rougeL"]).score(reference, candidate)["rougeL"]  # an independent LCS
    assert (other.precision, other.recall) == pytest.approx((precision, recall))


def test_cider_is_ten_for_exact_reports_and_zero_for_disjoint_ones():
    # CIDEr-D averages the n = 1..4 cosines: every report needs 4 words for an exact match to score 10
    references = ["there is no pleural effusion", "the heart is enlarged", "a small right apical pneumothorax"]
    assert nlg_metrics(references, references)["cider"] == pytest.approx(10.0, abs=1e-6)
    assert nlg_metrics(references, ["x y z", "q r s", "u v w"])["cider"] == 0.0


def test_metric_tokens_drop_case_and_punctuation_keep_decimals():
    assert metric_tokens("FINDINGS: Heart size 0.61, (normal).") == "findings heart size 0.61 normal"


def test_metric_tokens_of_ascii_text_are_lower_case_ascii_words_as_before():
    import random
    import re
    import string

    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits * 2 + " " * 6 + ".,:;()-_/%'\n" + "..."
    for _ in range(500):  # the plain reference: the ASCII rule English figures were measured with
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert metric_tokens(text) == " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower())), text


MULTILINGUAL = ["Neumotórax derecho, sin derrame pleural.", "Kein Pleuraerguss, Herzgröße normal, Ödem beidseits.",
                "Œdème pulmonaire bilatéral, épanchement pleural gauche.", "Отёк лёгких, правосторонний пневмоторакс.",
                "Μικρή πλευριτική συλλογή αριστερά.", "心脏大小正常。双肺清晰，无胸腔积液。",
                "右肺に小さな結節があります。ごく少量の胸水。", "우측 폐에 작은 결절이 있습니다.",
                "फेफड़ों में तरल पदार्थ नहीं है।"]


def test_a_generator_reproducing_a_report_in_any_script_scores_full_marks():
    from medvl.train.report import build_generator

    # every word and character of these reports in the vocabulary (by default a word needs 5 reports), beside the
    # base alphabet
    model = build_generator(MULTILINGUAL, "phantom-tiny", overrides={**TINY_OVERRIDES, "decoder.vocab_min_texts": 1,
                                                                     "decoder.vocab_size": 1000})
    for reference in MULTILINGUAL:
        written = model.decode(model.tokenize_reports([reference])["input_ids"][0].tolist())
        assert metric_tokens(written) == metric_tokens(reference), (reference, written)
        scores = nlg_metrics([reference], [written])
        assert scores["rouge_l"] == pytest.approx(1.0) and scores["bleu_4"] == pytest.approx(1.0, abs=1e-6), reference
    assert metric_tokens("Neumotórax") == metric_tokens("neumotorax") == "neumotorax"
    assert metric_tokens("心脏正常") == "心 脏 正 常"  # an ideograph per token, as BERT splits them


def test_unrelated_reports_in_other_scripts_and_empty_reports_score_nothing():
    unrelated = [(["Отёк лёгких."], ["Пневмоторакс справа."]), (["右侧气胸。"], ["未见异常。"]),
                 (["Μικρή συλλογή."], ["Καρδιομεγαλία."])]
    for references, candidates in unrelated:  # used to be empty on both sides, and so a perfect match
        scores = nlg_metrics(references, candidates)
        assert scores["bleu_1"] < 1e-6 and scores["rouge_l"] == 0.0 and scores["cider"] == 0.0, references
    references = ["There is no pleural effusion.", "The heart size is normal."]
    for empty in ("", "...", " -- "):
        scores = nlg_metrics(references, [empty, empty])
        assert max(scores.values()) < 1e-6, empty
    # an empty report beside an exact one: ROUGE-L and CIDEr average a 0 in, BLEU's brevity penalty falls
    half = nlg_metrics(references, ["", references[1]])
    assert half["rouge_l"] == pytest.approx(0.5) and half["bleu_1"] < 0.5
    with pytest.raises(InputError, match="1 reference report"):  # nothing to score against
        nlg_metrics(["---", "No pleural effusion."], ["", "no pleural effusion."])


def test_clinical_efficacy_on_a_hand_example():
    references = ["Moderate cardiomegaly. No pleural effusion.", "Large right pleural effusion.", "Clear lungs."]
    candidates = ["The heart is enlarged.", "No pleural effusion.", "Clear lungs."]
    # reference findings: {cardiomegaly}, {pleural_effusion}, {no_finding}
    # generated:          {cardiomegaly}, {no_finding},       {no_finding}
    scores = clinical_efficacy(references, candidates)
    tp, fp, fn = 2, 1, 1
    assert scores["micro_precision"] == pytest.approx(tp / (tp + fp))
    assert scores["micro_recall"] == pytest.approx(tp / (tp + fn))
    # per finding F1: cardiomegaly 1, pleural_effusion 0, no_finding 2/3 (P 1/2, R 1)
    assert scores["macro_f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)


# ------------------------------------------------------------------ the model, trained in-process


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    dataset = medvl.load_dataset(phantom_dir).select("train")
    out = tmp_path_factory.mktemp("report") / "run"
    config = TrainConfig(epochs=1, batch_size=16, lr=1e-2, log_every=1, max_steps=5, seed=0)
    model = train_report_generator(dataset, out, config, image_model="phantom-tiny", overrides=TINY_OVERRIDES,
                                   show_progress=False)
    return model, out, dataset


def test_training_lowers_the_loss_and_the_saved_model_decodes_the_same(trained):
    model, out, dataset = trained
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.5
    assert set(model.tokenizer.get_vocab()) >= {"effusion", "pneumothorax", "cardiomegaly"}  # the corpus vocabulary
    reloaded = ReportGenerator.from_pretrained(out)
    pixels = model.preprocessor.normalize(model.preprocessor.load_many([r.image for r in dataset.records[:3]]))
    for beam_size in (1, 3):
        first = model.generate(pixels, beam_size=beam_size, max_length=20)
        assert reloaded.generate(pixels, beam_size=beam_size, max_length=20) == first
    # batched beam search gives each image what it gets alone
    batched = model.generate(pixels, beam_size=3, max_length=20)
    assert batched == [model.generate(pixels[i:i + 1], beam_size=3, max_length=20)[0] for i in range(3)]


def test_a_generator_config_saved_before_vocab_min_texts_still_loads(trained, tmp_path):
    import shutil

    model, out, dataset = trained
    shutil.copytree(out / "model", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["decoder"]["vocab_min_texts"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    reloaded = ReportGenerator.from_pretrained(tmp_path / "old")
    assert reloaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    pixels = model.preprocessor.normalize(model.preprocessor.load_many([dataset.records[0].image]))
    assert reloaded.generate(pixels, max_length=8) == model.generate(pixels, max_length=8)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_saved_generator_s_files_follow_the_umask(trained, tmp_path, umask):
    """model.safetensors was written 0600 (safetensors' save_file) whatever the umask, unlike every other model
    file: a generator trained by one account could not be served by another."""
    import os

    model, _, _ = trained
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "model")
    finally:
        os.umask(old)
    files = [path for path in (tmp_path / "model").rglob("*") if path.is_file()]
    assert tmp_path / "model" / "model.safetensors" in files
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in files} == \
        {path.name: oct(0o666 & ~umask) for path in files}


def test_a_generator_keeps_no_word_of_a_single_report_and_writes_it_from_characters(phantom_dir, tmp_path):
    data = planted_phantom(phantom_dir, tmp_path / "data")
    result, output = invoke("train", "report", "--data", data, "--out", tmp_path / "run", "--max-steps", "1",
                            "--batch-size", "16", "-q", *TINY)
    assert result.exit_code == 0, output
    vocab = json.loads((tmp_path / "run" / "model" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert [word for word in PLANTED_WORDS if word in vocab] == []
    assert {"effusion", "pneumothorax", "cardiomegaly"} <= set(vocab)
    model = ReportGenerator.from_pretrained(tmp_path / "run")
    planted = "Zebraquartz, MRN 99887766, 1947."  # spelled: 29 tokens, within the tiny decoder's 48
    assert metric_tokens(model.decode(model.tokenize_reports([planted])["input_ids"][0].tolist())) == \
        metric_tokens(planted)  # the vocabulary is what a generator can write: a rare word, spelled


def test_greedy_decoding_takes_the_most_likely_token_at_each_step(trained):
    model, _, dataset = trained
    model.eval()  # as generate decodes (the fixture hands the model over in training mode)
    pixels = model.preprocessor.normalize(model.preprocessor.load_many([dataset.records[0].image]))
    memory, mask = model.memory(pixels)
    ids = [model.token_id("[CLS]")]
    with torch.no_grad():
        for _ in range(11):  # the full forward pass, no cache: the plain reference of the cached decoder
            logits = model.decoder(input_ids=torch.tensor([ids]), encoder_hidden_states=memory,
                                   encoder_attention_mask=mask).logits[0, -1]
            logits[model.token_id("[PAD]")] = float("-inf")
            ids.append(int(logits.argmax()))
            if ids[-1] == model.token_id("[SEP]"):
                ids.pop()
                break
    assert model.generate(pixels, max_length=11) == [model.decode(ids[1:])]
    for bad in (0, -3):  # 0 used to mean the model's maximum
        with pytest.raises(InputError, match="max_length must be >= 1"):
            model.generate(pixels, max_length=bad)


def test_a_report_never_starts_with_a_continuation_piece(trained):
    """A report whose first generated token was a WordPiece continuation piece kept its "##" ("##) nodule thorax:
    ..."): BERT's decoding joins a "##" piece only to a piece before it. The first step of greedy and beam search
    now never picks one. Here the model is made to prefer one "##" piece above all tokens."""
    import copy

    model, _, dataset = trained
    model = copy.deepcopy(model).eval()
    pieces = sorted(i for token, i in model.tokenizer.get_vocab().items() if token.startswith("##"))
    with torch.no_grad():
        model.decoder.get_output_embeddings().bias[pieces[0]] += 100.0
    pixels = model.preprocessor.normalize(model.preprocessor.load_many([dataset.records[0].image]))
    for beam_size in (1, 2):
        [report] = model.generate(pixels, beam_size=beam_size, max_length=6)
        assert report and "#" not in report, (beam_size, report)


def test_max_length_counts_the_tokens_of_report_text_and_refuses_more_than_the_model_writes(trained):
    model, _, dataset = trained
    model.eval()  # as generate decodes (the fixture hands the model over in training mode)
    pixels = model.preprocessor.normalize(model.preprocessor.load_many([dataset.records[0].image]))
    memory, mask = model.memory(pixels)
    ids, eos = [model.token_id("[CLS]")], model.token_id("[SEP]")
    with torch.no_grad():  # the greedy tokens after the start token, the end token included
        for _ in range(8):
            logits = model.decoder(input_ids=torch.tensor([ids]), encoder_hidden_states=memory,
                                   encoder_attention_mask=mask).logits[0, -1]
            logits[model.token_id("[PAD]")] = float("-inf")
            ids.append(int(logits.argmax()))
    written = ids[1:ids.index(eos)] if eos in ids else ids[1:]
    assert len(written) >= 3  # the tiny model writes on: the limit, not the end token, stops it
    for n in range(1, len(written) + 1):  # N tokens of text, as a transformers VLM's max_new_tokens
        assert model.generate(pixels, max_length=n) == [model.decode(written[:n])], n
        beam = model.generate(pixels, beam_size=2, max_length=n)[0]
        assert len(model.tokenizer(beam, add_special_tokens=False)["input_ids"]) <= n
    assert model.max_report_tokens == 47  # decoder.max_length 48 less the start token
    assert model.generate(pixels, max_length=47) == model.generate(pixels)  # the default is the model's most
    with pytest.raises(InputError, match="at most 47 tokens of report text"):  # no longer cut to it in silence
        model.generate(pixels, max_length=48)


def test_evaluation_leaves_out_references_without_words(trained, phantom_dir, caplog):
    import dataclasses

    from medvl.eval.report import evaluate_report_generator

    model, _, train = trained
    test = medvl.load_dataset(phantom_dir).select("test")
    records = [dataclasses.replace(test.records[0], text="--- ..."), *test.records[1:4]]
    with caplog.at_level("WARNING"):
        result = evaluate_report_generator(model, test.subset(records), train[:8], max_length=4, show_progress=False,
                                           keep_texts=True)
    assert result["n"] == 3 and [c["id"] for c in result["cases"]] == [r.id for r in records[1:]]
    assert "left out 1 test records whose report has no words" in caplog.text
    assert "---" not in caplog.text  # report text is patient data


def test_the_result_has_the_headline_numbers_as_top_level_keys(trained, phantom_dir):
    """BLEU, ROUGE-L, CIDEr and finding F1 were only nested under ``generator`` / ``nearest_report``, unlike every
    other evaluator's JSON."""
    from medvl.eval.report import evaluate_report_generator

    model, _, train = trained
    test = medvl.load_dataset(phantom_dir).select("test")[:3]
    result = evaluate_report_generator(model, test, train[:8], max_length=4, show_progress=False)
    for key in ("bleu_1", "bleu_4", "rouge_l", "cider", "micro_f1", "macro_f1"):
        assert result[key] == result["generator"][key]
        assert result[f"nearest_report_{key}"] == result["nearest_report"][key]


# ------------------------------------------------------------------ the commands


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory):
    """A dual encoder at random init, saved (a real model folder: index, --init, --baseline-model)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dual") / "model"
    medvl.create_model("phantom-tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cli_run(phantom_dir, dual_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result, output = invoke("train", "report", "--data", phantom_dir, "--out", out, "--init", dual_dir, "--epochs",
                            "1", "--max-steps", "2", "--batch-size", "16", "--lr", "3e-3", "-q", *TINY[2:])
    assert result.exit_code == 0, output
    assert "model saved to" in output
    return out


def test_generate_command_writes_reports(cli_run, phantom_dir, tmp_path):
    image = sorted((phantom_dir / "images").glob("*.png"))[0]
    result, output = invoke("report", "generate", image, "--model", cli_run, "--beam-size", "2", "--json",
                            tmp_path / "out.json")
    assert result.exit_code == 0, output
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["beam_size"] == 2 and written["reports"][0]["image"] == image.name
    assert isinstance(written["reports"][0]["report"], str) and "cited" not in written["reports"][0]
    assert ReportGenerator.from_pretrained(cli_run).meta["init"]["name"] == "phantom-tiny"
    assert written["reports"][0]["input_flags"] == {}
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((40, 40), 3, np.uint8)).save(blank)
    result, output = invoke("report", "generate", blank, "--model", cli_run, "--json", tmp_path / "blank.json")
    assert result.exit_code == 0 and "blank as the model sees it: the report describes no content" in \
        " ".join(output.split())
    assert list(json.loads((tmp_path / "blank.json").read_text())["reports"][0]["input_flags"]) == ["blank"]


def test_eval_command_scores_the_generator_beside_the_nearest_training_report(cli_run, phantom_dir, dual_dir,
                                                                               tmp_path):
    result, output = invoke("eval", "report", "--model", cli_run, "--data", phantom_dir, "--split", "test",
                            "--beam-size", "1", "--max-length", "24", "--json", tmp_path / "eval.json", "-q")
    assert result.exit_code == 0, output
    assert "nearest report" in output
    scores = json.loads((tmp_path / "eval.json").read_text())
    test = medvl.load_dataset(phantom_dir).select("test")
    train = medvl.load_dataset(phantom_dir).select("train")
    assert scores["n"] == len(test) and scores["n_train"] == len(train)
    assert scores["baseline_encoder"]["source"].startswith("the dual encoder the generator was initialised from")
    for block in (scores["generator"], scores["nearest_report"]):
        assert all(0.0 <= block[k] <= 1.0 for k in ("bleu_1", "bleu_4", "rouge_l", "micro_f1"))
    # the baseline is the report of the training image closest under the init dual encoder
    dual = medvl.load_model(dual_dir)
    similarity = dual.encode_images([r.image for r in test]) @ dual.encode_images([r.image for r in train]).T
    nearest = [train[int(i)].id for i in similarity.argmax(1)]
    assert [case["nearest_train_id"] for case in scores["cases"]] == nearest
    texts = [r.text for r in test]
    assert scores["nearest_report"]["bleu_4"] == pytest.approx(nlg_metrics(
        texts, [train[int(i)].text for i in similarity.argmax(1)])["bleu_4"])


def test_the_baseline_is_not_another_model_now_at_the_init_path(phantom_dir, dual_dir, tmp_path, caplog):
    """The nearest-report baseline loaded whatever model sat at the recorded --init path at evaluation time: a dual
    encoder retrained or replaced in place changed the baseline without a word. The generator records the init
    weights' SHA-256; other weights there are not used (a warning and a note), an older generator's is noted."""
    import shutil

    from medvl.eval.report import evaluate_report_generator
    from medvl.io import file_sha256

    init = tmp_path / "dual"
    shutil.copytree(dual_dir, init)
    out = tmp_path / "run"
    data = medvl.load_dataset(phantom_dir)
    train_report_generator(data.select("train")[:8], out, TrainConfig(epochs=1, batch_size=8, max_steps=1), init=init,
                           overrides=TINY_OVERRIDES, show_progress=False)
    digest = file_sha256(dual_dir / "model.safetensors")
    assert ReportGenerator.from_pretrained(out).meta["init"]["weights_sha256"] == digest

    def baseline() -> dict:
        caplog.clear()
        with caplog.at_level("WARNING"):
            result = evaluate_report_generator(ReportGenerator.from_pretrained(out), data.select("test")[:2],
                                               data.select("train")[:4], max_length=2, show_progress=False)
        return result["baseline_encoder"]

    same = baseline()
    assert same["source"] == "the dual encoder the generator was initialised from" and "note" not in same
    assert same["weights_sha256"] == digest and "initialised from" not in caplog.text
    shutil.rmtree(init)
    torch.manual_seed(1)
    medvl.create_model("phantom-tiny").save_pretrained(init)  # another model at the same path
    other = baseline()
    assert other["kind"].startswith("generator image encoder") and "weights_sha256" not in other
    assert other["source"] == "the generator (its --init dual encoder is not used: see note)"
    assert f"now holds other weights (sha256 {file_sha256(init / 'model.safetensors')[:12]})" in other["note"]
    assert "now holds other weights" in caplog.text and "generator's own image features" in caplog.text
    meta = out / "model" / "meta.json"  # a generator trained before the digest was recorded
    written = json.loads(meta.read_text())
    del written["init"]["weights_sha256"]
    meta.write_text(json.dumps(written))
    unchecked = baseline()
    assert unchecked["source"] == "the dual encoder the generator was initialised from"
    assert "cannot be checked" in unchecked["note"] and "cannot be checked" in caplog.text


def test_eval_refuses_a_baseline_bank_holding_the_scored_images_and_says_when_they_were_trained_on(
        cli_run, phantom_dir, tmp_path):
    data = medvl.load_dataset(phantom_dir)
    result, output = invoke("eval", "report", "--model", cli_run, "--data", phantom_dir, "--split", "all",
                            "--json", tmp_path / "all.json", "-q")  # the baseline would retrieve their own reports
    n_train, n_all = len(data.select("train")), len(data)
    assert result.exit_code == 2 and f"--train-split 'train' holds {n_train} of the {n_all} scored images" in \
        " ".join(output.split())
    assert not (tmp_path / "all.json").exists()
    training = ReportGenerator.from_pretrained(cli_run).meta["training"]
    assert training["splits"] == ["train"] and len(training["data_sha256"]) == 64
    result, output = invoke("eval", "report", "--model", cli_run, "--data", phantom_dir, "--split", "train",
                            "--train-split", "test", "--max-length", "8", "--beam-size", "1", "--json",
                            tmp_path / "train.json", "-q")  # apart from the baseline's bank, not from training
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "train.json").read_text())["trained_on_scored"] == {
        "records": n_train, "of": n_train, "splits": ["train"], "records_trained": n_train}
    assert "training figures, not a test" in " ".join(output.split())


def test_retrieved_context_is_given_and_cited(phantom_dir, dual_dir, tmp_path):
    index = tmp_path / "cases.idx"
    result, output = invoke("index", "build", "--model", dual_dir, "--data", phantom_dir, "--split", "train",
                            "--out", index, "-q")
    assert result.exit_code == 0, output
    out = tmp_path / "rag"
    result, output = invoke("train", "report", "--data", phantom_dir, "--out", out, "--index", index, "--context-k",
                            "2", "--max-steps", "2", "--batch-size", "16", "-q", *TINY)
    assert result.exit_code == 0, output
    train_ids = {r.id for r in medvl.load_dataset(phantom_dir).select("train")}
    query = next(r for r in medvl.load_dataset(phantom_dir).select("train"))
    result, output = invoke("report", "generate", query.image, "--model", out, "--index", index, "--max-length",
                            "16", "--json", tmp_path / "gen.json")
    assert result.exit_code == 0, output
    cited = json.loads((tmp_path / "gen.json").read_text())["reports"][0]["cited"]
    assert len(cited) == 2 and set(cited) <= train_ids and query.id not in cited  # itself left out (same pixels)
    result, output = invoke("report", "generate", query.image, "--model", out)
    assert result.exit_code == 2 and "pass --index" in output
    result, output = invoke("report", "generate", query.image, "--model", out, "--index", tmp_path / "missing.idx")
    assert result.exit_code == 2 and "missing.idx" in output and _one_error_line(result)


def test_train_refuses_options_it_would_ignore(phantom_dir, dual_dir, tmp_path):
    """--index without --context-k trained on the image alone, and --image-model beside --init was dropped for the
    --init model's tower, each without a word."""
    index = tmp_path / "cases.idx"
    result, output = invoke("index", "build", "--model", dual_dir, "--data", phantom_dir, "--split", "train",
                            "--out", index, "-q")
    assert result.exit_code == 0, output
    for args, needle in ((["--index", index, "--image-model", "phantom-tiny"], "--index needs --context-k"),
                         (["--init", dual_dir, "--image-model", "vit-tiny"], "give --init or --image-model, not both")):
        out = tmp_path / "never"
        result, output = invoke("train", "report", "--data", phantom_dir, "--out", out, *args, "--epochs", 1,
                                "--max-steps", 1, "-q", *TINY[2:])
        assert result.exit_code == 2 and needle in output and _one_error_line(result), output
        assert not out.exists()


# ------------------------------------------------------------------ image towers whose last feature map is 1 pixel


@pytest.mark.parametrize(("name", "overrides"), [("ct3d-tiny", {}), ("phantom-tiny", {"image.image_size": 32})])
def test_a_generator_is_built_when_the_image_tower_ends_at_one_pixel(name, overrides):
    # the token count is taken from one blank image: batch norm in training mode refuses a batch of one at 1 px
    model = ReportGenerator(ReportGeneratorConfig(image=get_config(name).image).merged(overrides))
    assert model.image_position.shape[0] == 1 and model.image_encoder.training  # left in the mode it was built in
    norms = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(int(m.num_batches_tracked) == 0 for m in norms)  # the blank image left no statistics


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory):
    """A small CT phantom (20 volumes of 32^3; findings liver lesion, kidney cyst, lung nodule, effusion)."""
    from medvl.data.phantom import generate_phantom

    folder = tmp_path_factory.mktemp("ct3d") / "data"
    generate_phantom(folder, n=20, seed=1, size=32, kind="ct3d", splits={"train": 0.6, "test": 0.4})
    return folder


@pytest.fixture(scope="module")
def ct_generator(ct_dir, tmp_path_factory):
    """A report generator with the registered ``ct3d-tiny`` tower (its last feature map is 1 voxel)."""
    out = tmp_path_factory.mktemp("ct3d-report") / "run"
    result, output = invoke("train", "report", "--data", ct_dir, "--out", out, "--image-model", "ct3d-tiny",
                            "--epochs", "1", "--max-steps", "1", "--batch-size", "4", "-q", *TINY[2:])
    assert result.exit_code == 0, output
    return out


def test_a_3d_generator_with_a_one_voxel_feature_map_trains_and_writes_reports(ct_generator, ct_dir, tmp_path):
    volume = sorted((ct_dir / "images").glob("*.nii.gz"))[0]
    result, output = invoke("report", "generate", volume, "--model", ct_generator, "--beam-size", "1",
                            "--max-length", "6", "--json", tmp_path / "out.json")  # loading builds it again
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "out.json").read_text())["reports"][0]["image"] == volume.name


CT_KNOWLEDGE = {
    "kidney_cyst.md": "---\nname: kidney_cyst\ntitle: Kidney cyst\nsynonyms: [cyst]\nlabels: [renal cyst]\n"
                      "definition: A fluid-filled renal cyst.\n---\n",
    "liver_lesion.md": "---\nname: liver_lesion\ntitle: Liver lesion\nsynonyms: [lesion, hypoattenuating]\n"
                       "definition: A focal hepatic lesion.\n---\n",
}


def test_ct_reports_are_scored_with_the_knowledge_base_given_and_the_chest_one_is_warned_about(
        ct_generator, ct_dir, tmp_path):
    test = medvl.load_dataset(ct_dir).select("test")
    counts = {name: sum(r.labels["finding"] == name for r in test) for name in ("no_finding", "kidney_cyst",
                                                                                 "liver_lesion")}
    assert counts["kidney_cyst"] + counts["liver_lesion"] > 0  # the seed gives the test split such cases
    args = ("eval", "report", "--model", ct_generator, "--data", ct_dir, "--beam-size", "1", "--max-length", "4", "-q")
    result, output = invoke(*args, "--json", tmp_path / "chest.json")  # the shipped base: chest X-ray findings
    assert result.exit_code == 0, output
    chest = json.loads((tmp_path / "chest.json").read_text())["knowledge"]
    unknown = {name: n for name, n in counts.items() if name != "no_finding" and n}
    assert chest["sources"] == ["built-in"] and chest["unknown_labels"] == unknown
    assert chest["records_with_unknown_labels"] == sum(unknown.values())
    assert f"have finding labels the knowledge base (built-in) does not hold ({', '.join(unknown)})" in \
        " ".join(output.split())
    folder = tmp_path / "ct-findings"
    folder.mkdir()
    for name, text in CT_KNOWLEDGE.items():
        (folder / name).write_text(text)
    result, output = invoke(*args, "--knowledge", folder, "--json", tmp_path / "ct.json")
    assert result.exit_code == 0, output
    assert "does not hold" not in output and "findings read with the knowledge base built-in + ct-findings" in output
    scores = json.loads((tmp_path / "ct.json").read_text())
    assert scores["knowledge"]["sources"] == ["built-in", "ct-findings"] and scores["knowledge"]["unknown_labels"] == {}
    references = scores["per_finding"]["nearest_report"]  # the references' findings, as the labeller now reads them
    for name, n in counts.items():  # a kidney cyst or liver lesion is no longer read as "no finding"
        assert references[name]["support"] == n, name


def test_bench_report_and_case_retrieval_tasks_read_findings_with_the_task_s_knowledge(ct_generator, ct_dir,
                                                                                       tmp_path):
    import yaml

    folder = tmp_path / "suite" / "ct-findings"
    folder.mkdir(parents=True)
    for name, text in CT_KNOWLEDGE.items():
        (folder / name).write_text(text)
    suite = {"name": "ct", "bootstrap": 100,
             "datasets": {"ct": {"path": str(ct_dir), "split": "test", "train_split": "train",
                                 "calibration_split": None, "label": "finding"}},
             "tasks": [{"task": "report", "dataset": "ct", "knowledge": "ct-findings"}]}
    path = tmp_path / "suite" / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    result, output = invoke("bench", "run", path, "--model", ct_generator, "--out", tmp_path / "with", "-q")
    assert result.exit_code == 0, output
    assert "does not hold" not in output
    ours = json.loads((tmp_path / "with" / "results.json").read_text())
    result, output = invoke("eval", "report", "--model", ct_generator, "--data", ct_dir, "--beam-size", "1", "-q",
                            "--knowledge", folder, "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, output
    scored = json.loads((tmp_path / "eval.json").read_text())["generator"]
    rows = {row["metric"]: row["value"] for row in ours["rows"]}
    assert rows["micro_f1"] == pytest.approx(scored["micro_f1"])
    assert rows["macro_f1"] == pytest.approx(scored["macro_f1"])
    (cell,) = (tmp_path / "with" / "cells").glob("*.json")
    knowledge = json.loads(cell.read_text())["plots"]["knowledge"]
    assert knowledge["sources"] == ["built-in", "ct-findings"] and knowledge["unknown_labels"] == {}

    del suite["tasks"][0]["knowledge"]  # the built-in chest X-ray base: the CT findings are unknown, and said so
    path.write_text(yaml.safe_dump(suite))
    result, output = invoke("bench", "run", path, "--model", ct_generator, "--out", tmp_path / "without", "-q")
    assert result.exit_code == 0, output
    assert "does not hold" in " ".join(output.split())

    for bad, message in (({"knowledge": "missing"}, "knowledge folder not found"),
                         ({"builtin_knowledge": False}, "builtin_knowledge: false needs a knowledge folder"),
                         ({"builtin_knowledge": "no"}, "builtin_knowledge must be true or false")):
        suite["tasks"][0] = {"task": "report", "dataset": "ct", **bad}
        path.write_text(yaml.safe_dump(suite))
        result, output = invoke("bench", "run", path, "--model", ct_generator, "--out", tmp_path / "bad", "-q")
        assert result.exit_code == 2 and message in " ".join(output.split()), output
    suite["tasks"][0] = {"task": "retrieval", "dataset": "ct", "knowledge": "ct-findings"}
    path.write_text(yaml.safe_dump(suite))
    result, output = invoke("bench", "run", path, "--model", ct_generator, "--out", tmp_path / "bad", "-q")
    assert result.exit_code == 2 and "apply to report and case-retrieval tasks" in " ".join(output.split()), output
    assert not (tmp_path / "bad" / "cells").exists()


def test_knowledge_coverage_counts_references_that_mention_no_finding_of_the_base(caplog):
    from medvl.data.record import Record
    from medvl.eval.report import knowledge_coverage
    from medvl.rag import ReportLabeller

    captions = ["Axial T2 weighted MR of the brain: a glioma in the left temporal lobe.",
                "Coronal CT of the abdomen shows a dilated appendix.", "Sagittal MR of the knee: torn ACL.",
                "There is a small left pleural effusion."]
    records = [Record(id=str(i), images=[], text=text, labels={"sex": "F"}) for i, text in enumerate(captions)]
    with caplog.at_level("WARNING"):
        coverage = knowledge_coverage(records, ReportLabeller())
    assert coverage["reports_without_mention"] == 3 and coverage["unknown_labels"] == {}  # sex names no finding
    assert "3 of 4 reference reports mention no finding of the knowledge base (built-in)" in caplog.text
    caplog.clear()
    chest = [Record(id="a", images=[], text="No pleural effusion. Clear lungs.", labels={"finding": "no_finding"}),
             Record(id="b", images=[], text="Cardiomegaly.", labels={"finding": "cardiomegaly"})]
    assert knowledge_coverage(chest, ReportLabeller())["reports_without_mention"] == 0 and not caplog.text


# ------------------------------------------------------------------ bad input


def test_a_max_length_above_the_model_s_is_refused_before_any_work(cli_run, phantom_dir, tmp_path):
    image = sorted((phantom_dir / "images").glob("*.png"))[0]
    for args in (("report", "generate", image, "--model", cli_run, "--max-length", "200"),
                 ("eval", "report", "--model", cli_run, "--data", phantom_dir, "--max-length", "48")):
        result, output = invoke(*args, "--json", tmp_path / "out.json")
        assert result.exit_code == 2 and _one_error_line(result), (args, output)
        assert "at most 47 tokens of report text" in " ".join(output.split())
        assert not (tmp_path / "out.json").exists()


def test_bad_input_is_one_line_naming_it(cli_run, dual_dir, phantom_dir, tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cases = [
        (("report", "generate", empty, "--model", cli_run), "empty.png"),
        (("report", "generate", corrupt, "--model", cli_run), "corrupt.png"),
        (("report", "generate", corrupt, "--model", dual_dir), "not a report generator"),
        (("eval", "report", "--model", dual_dir, "--data", phantom_dir), "not a report generator"),
        (("report", "generate", empty, "--model", tmp_path / "nowhere"), "nowhere"),
    ]
    bad_text = tmp_path / "bad"
    bad_text.mkdir()
    image = sorted((phantom_dir / "images").glob("*.png"))[0]
    cases.append((("report", "generate", image, "--model", cli_run, "--index", tmp_path / "some.idx"),
                  "trained without retrieved context"))
    (bad_text / "a.png").write_bytes(image.read_bytes())
    (bad_text / "b.png").write_bytes(image.read_bytes())
    # legacy bytes are read as Windows-1252 in the report column only (the manifest's rule); elsewhere they are refused
    (bad_text / "manifest.csv").write_bytes(b"image,text,finding\na.png,clear lungs,none\nb.png,effusion,caf\xff\n")
    cases.append((("train", "report", "--data", bad_text / "manifest.csv", "--out", tmp_path / "never", "--max-steps",
                   "1"), "manifest.csv"))
    for args, named in cases:
        result, output = invoke(*args)
        assert result.exit_code == 2, (args, output)
        assert named in output and _one_error_line(result), (args, output)


def test_a_tokenizer_file_of_valid_json_with_a_wrong_type_is_one_line_naming_it(cli_run, phantom_dir, tmp_path):
    """tokenizers raises a bare Exception for a mistyped tokenizer.json (a token id as a string), transformers a
    KeyError (an added token without its id) or a TypeError (a special token as a number): each was a traceback from
    report generate and eval report; now one line naming the folder and tokenizer/, exit 2."""
    import shutil

    image = sorted((phantom_dir / "images").glob("*.png"))[0]

    def vocab_id_as_text(tokenizer, config):
        first = next(iter(tokenizer["model"]["vocab"]))
        tokenizer["model"]["vocab"][first] = str(tokenizer["model"]["vocab"][first])

    def added_token_without_id(tokenizer, config):
        del tokenizer["added_tokens"][0]["id"]

    def pad_token_as_number(tokenizer, config):
        config["pad_token"] = 1

    for change in (vocab_id_as_text, added_token_without_id, pad_token_as_number):
        model = tmp_path / change.__name__
        shutil.copytree(cli_run / "model", model)
        files = [model / "tokenizer" / name for name in ("tokenizer.json", "tokenizer_config.json")]
        tokenizer, config = (json.loads(path.read_text()) for path in files)
        change(tokenizer, config)
        for path, data in zip(files, (tokenizer, config), strict=True):
            path.write_text(json.dumps(data))
        for args in (("report", "generate", image, "--model", model),
                     ("eval", "report", "--model", model, "--data", phantom_dir, "--split", "test")):
            result, output = invoke(*args)
            assert result.exit_code == 2 and _one_error_line(result), (change.__name__, args, output)
            assert f"{model}: cannot read the report generator's tokenizer in tokenizer/" in \
                " ".join(output.split()), output


def _one_error_line(result) -> bool:
    """The error is one line on stderr, no traceback."""
    return len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")


def test_resume_compares_the_init_model_by_its_weights_not_its_folder(phantom_dir, dual_dir, tmp_path):
    """--resume refused the same --init model given as a copy (a moved folder): the run recorded its path beside
    its weights' digest and compared both. Other weights under the same name are refused."""
    import shutil

    data = medvl.load_dataset(phantom_dir).select("train")[:8]
    config = TrainConfig(epochs=2, batch_size=8, max_steps=1)
    out = tmp_path / "run"
    shutil.copytree(dual_dir, tmp_path / "dual")
    train_report_generator(data, out, config, init=tmp_path / "dual", overrides=TINY_OVERRIDES, show_progress=False)
    shutil.copytree(dual_dir, tmp_path / "dual-copy")
    train_report_generator(data, out, config, init=tmp_path / "dual-copy", overrides=TINY_OVERRIDES, resume=True,
                           show_progress=False)
    torch.manual_seed(1)
    medvl.create_model("phantom-tiny").save_pretrained(tmp_path / "other")
    refused = r"changes the starting model \(--init\) '[^']*/dual' \(weights sha256 \w+\) -> '[^']*/other' \(weights"
    with pytest.raises(InputError, match=refused):
        train_report_generator(data, out, config, init=tmp_path / "other", overrides=TINY_OVERRIDES, resume=True,
                               show_progress=False)


def test_resume_with_another_context_index_is_refused(phantom_dir, dual_dir, tmp_path):
    """A run without a checkpoint (stopped by --max-steps) resumed after its --index was rebuilt from another model
    and other cases was accepted, and its model replaced by one trained on other contexts: the run recorded the
    index model's name only. It records the index model's weights digest and a digest of the contexts."""
    from medvl.index import open_index

    index = tmp_path / "cases.idx"
    build = ("index", "build", "--data", phantom_dir, "--out", index, "-q")
    result, output = invoke(*build, "--model", dual_dir, "--split", "train")
    assert result.exit_code == 0, output
    data = medvl.load_dataset(phantom_dir).select("train")[:8]
    config = TrainConfig(epochs=1, batch_size=4, max_steps=1)
    out = tmp_path / "run"

    def train(resume: bool = False):
        with open_index(index) as opened:
            return train_report_generator(data, out, config, image_model="phantom-tiny", overrides=TINY_OVERRIDES,
                                          index=opened, context_k=1, resume=resume, show_progress=False)

    retrieval = train().meta["retrieval"]
    assert not (out / "checkpoint").exists()
    assert len(retrieval["index_weights_sha256"]) == len(retrieval["contexts_sha256"]) == 64
    train(resume=True)  # the same index: it goes on
    before = (out / "model" / "model.safetensors").read_bytes()
    torch.manual_seed(1)
    medvl.create_model("phantom-tiny").save_pretrained(tmp_path / "other")
    shutil.rmtree(index)
    result, output = invoke(*build, "--model", tmp_path / "other", "--split", "test")
    assert result.exit_code == 0, output
    with pytest.raises(InputError, match=r"changes the retrieved contexts \(--index, --context-k\) \(context_k 1, "
                                         r"index model 'phantom-tiny', index weights sha256 \w{12}, contexts sha256"):
        train(resume=True)
    assert (out / "model" / "model.safetensors").read_bytes() == before
