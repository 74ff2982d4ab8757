"""Local transformers vision-language models (LLaVA, Gemma 3 layouts) answer questions and write reports.

Each folder is a tiny random-init model saved with ``save_pretrained`` together with its processor,
all built here offline: a WordLevel tokenizer trained with the ``tokenizers`` library (wrapped as a
``PreTrainedTokenizerFast``, the image tokens as special tokens), the PIL image processor (no
torchvision), the model's processor with a chat template. The LLaVA folder is a tiny CLIP vision
tower and a tiny Llama; the Gemma 3 folder a tiny SigLIP tower and a tiny Gemma 3 text model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cli_helpers import invoke
from medvl.data import load_dataset
from medvl.errors import InputError, ModelError
from medvl.eval.vqa import closed_candidates, evaluate_vqa
from medvl.models.decoder import load_report_generator
from medvl.models.vlm import SHORT_ANSWER, VisionLanguageModel
from medvl.models.vqa import load_vqa_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIDE = 32
CORPUS = ["is there a nodule in the left lung ?", "is the heart enlarged ?", "which side is the effusion on ?",
          "yes", "no", "left", "right", "the heart is normal in size .", "small left pleural effusion .",
          "no acute cardiopulmonary abnormality .", "answer the question using a single word or phrase .",
          "write the radiology report for this image : findings , then impression .", "USER ASSISTANT user model"]
# llava-hf's LLaVA-1.5 template: "USER: <image>\n<text> ASSISTANT:"
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
                  "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                  "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
                  "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == "
                  "'assistant' else message['role'] }}\n{% for c in message['content'] %}{% if c['type'] == 'image' %}"
                  "<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _tokenizer(special: list[str], bos: str, eos: str, extra: dict[str, str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=special))
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token=bos, eos_token=eos,
                                   unk_token="<unk>", extra_special_tokens=extra)


def _speak(model, tokenizer) -> None:
    """Random weights that write words: special tokens' output rows zeroed, the others scaled up (so
    that generation does not end at once and greedy decoding has clear winners)."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(40.0)
        head[tokenizer.all_special_ids] = 0.0


def save_llava(folder: Path) -> Path:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>"], "<s>", "</s>", {"image_token": "<image>"})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=SIDE, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        "<image>"), vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    _speak(model, tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_gemma3(folder: Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               "<end_of_image>", "<image_soft_token>"]
    tokenizer = _tokenizer(special, "<bos>", "<eos>", {"image_token": "<image_soft_token>",
                                                       "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    image_processor = Gemma3ImageProcessorPil(size={"height": SIDE, "width": SIDE}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA_TEMPLATE,
                                image_seq_length=4)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in special}
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256,
            "sliding_window": 64, "pad_token_id": ids["<pad>"], "eos_token_id": ids["<eos>"],
            "bos_token_id": ids["<bos>"]}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": SIDE, "patch_size": 8}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(1)
    model = Gemma3ForConditionalGeneration(config)
    _speak(model, tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return save_gemma3(tmp_path_factory.mktemp("vlm") / "tiny-gemma3")


@pytest.fixture(scope="module", params=["llava", "gemma3"])
def vlm_dir(request, llava_dir, gemma_dir) -> Path:
    return llava_dir if request.param == "llava" else gemma_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("vlm-images")
    rng = np.random.default_rng(0)
    paths = []
    for number, shape in enumerate([(48, 40), (40, 40, 3), (56, 64)]):
        path = folder / f"image{number}.png"
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def vqa_file(images) -> Path:
    """A VQA-RAD style test file: closed yes/no and left/right questions, open ones, about the images."""
    rows = [("is there a nodule in the left lung?", "yes", "CLOSED", "PRES", 0),
            ("is there a nodule in the left lung?", "no", "CLOSED", "PRES", 1),
            ("is the heart enlarged?", "No", "CLOSED", "SIZE", 2),
            ("which side is the effusion on?", "left", "CLOSED", "POS", 0),
            ("which side is the effusion on?", "right", "CLOSED", "POS", 2),
            ("what is abnormal?", "small left pleural effusion", "OPEN", "ABN", 1)]
    questions = [{"qid": number, "image_name": images[image].name, "question": question, "answer": answer,
                  "answer_type": kind, "question_type": qtype}
                 for number, (question, answer, kind, qtype, image) in enumerate(rows)]
    path = images[0].parent / "testset.json"
    path.write_text(json.dumps(questions))
    return path


# ------------------------------------------------------------------ the adapter


def test_loads_with_the_folders_processor_and_chat_template(vlm_dir):
    model = VisionLanguageModel.from_pretrained(vlm_dir)
    expected = {"tiny-llava": ("llava", "LlavaForConditionalGeneration", 1),
                "tiny-gemma3": ("gemma3", "Gemma3ForConditionalGeneration", 2)}[vlm_dir.name]
    assert (model.config.model_type, model.config.architecture, model.max_images) == expected
    assert model.config.chat_template
    prompt = model.prompt("is the heart enlarged?", 1)
    if model.config.model_type == "llava":
        assert prompt == "USER: <image>\nis the heart enlarged? ASSISTANT:"
        assert model.answer_separator(prompt) == " "
    else:
        assert prompt.startswith("<start_of_turn>user\n<start_of_image>is the heart")  # <bos>: the tokenizer's
        assert prompt.endswith("<start_of_turn>model\n") and model.answer_separator(prompt) == ""
    model.config.chat_template = False  # a folder without a template: LLaVA-1.5's conversation format
    if model.config.model_type == "llava":
        assert model.prompt("why?", 1) == "USER: <image>\nwhy? ASSISTANT:"


def test_fingerprint_tells_weights_and_chat_template_not_the_folders_path(llava_dir, tmp_path):
    """``vqa_fingerprint`` of a VLM (what /v1/models' ``vqa.fingerprint`` tells a redeployed one by): the same folder
    copied elsewhere has the same digests; other weights, or another chat template, do not."""
    from medvl.index.base import vqa_fingerprint

    copy = shutil.copytree(llava_dir, tmp_path / "elsewhere" / llava_dir.name)
    first, moved = (vqa_fingerprint(VisionLanguageModel.from_pretrained(folder)) for folder in (llava_dir, copy))
    assert first == moved and all(len(digest) == 64 for digest in first.values())
    changed = VisionLanguageModel.from_pretrained(copy)
    with torch.no_grad():
        next(changed.model.parameters()).add_(0.01)
    assert vqa_fingerprint(changed)["weights_sha256"] != first["weights_sha256"]
    changed.processor.chat_template = LLAVA_TEMPLATE.replace("ASSISTANT:", "ANSWER:")
    assert vqa_fingerprint(changed)["config_sha256"] != first["config_sha256"]
    assert vqa_fingerprint(changed)["tokenizer_sha256"] == first["tokenizer_sha256"]


def test_generation_is_greedy_and_deterministic(vlm_dir, images):
    model = VisionLanguageModel.from_pretrained(vlm_dir)
    arrays = model.read_images([images[0]])
    text, log_likelihood = model.generate(arrays, "is the heart enlarged?", max_new_tokens=6)
    assert text and len(text.split()) <= 6 and log_likelihood < 0
    again = VisionLanguageModel.from_pretrained(vlm_dir).generate(arrays, "is the heart enlarged?", max_new_tokens=6)
    assert again == (text, pytest.approx(log_likelihood))
    # the first generated token is the argmax of the model's logits after the prompt
    inputs = model._inputs(arrays, model.prompt("is the heart enlarged?", 1))
    with torch.no_grad():
        first = int(model.model(**inputs).logits[0, -1].argmax())
    assert model.tokenizer.decode([first]).strip() == text.split()[0]
    report = model.write_report(images[1], max_new_tokens=5)
    assert report == model.write_report(images[1], max_new_tokens=5) and len(report.split()) <= 5


def with_generation_config(folder: Path, copy: Path, **settings) -> Path:
    """A copy of a model folder whose generation_config.json adds ``settings``."""
    shutil.copytree(folder, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return copy


FOLDER_DECODING = {  # decoding strategies and settings a folder's generation_config.json may ask for
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
    "group_beams": {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.5},
    "sampling_and_penalties": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
                               "repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "length_penalty": -2.0,
                               "min_new_tokens": 4, "suppress_tokens": [5, 6, 7], "sequence_bias": [[[8], 20.0]]},
}


@pytest.mark.parametrize("decoding", sorted(FOLDER_DECODING))
def test_decoding_ignores_the_folders_generation_config(vlm_dir, images, tmp_path, decoding):
    """Greedy answers and greedy / beam-search reports, whatever decoding the folder's generation config asks for
    (contrastive or group beam search were a transformers traceback; sampling settings and penalties changed the
    text): the same as from the folder without those settings."""
    model = VisionLanguageModel.from_pretrained(vlm_dir)
    other = VisionLanguageModel.from_pretrained(with_generation_config(vlm_dir, tmp_path / vlm_dir.name,
                                                                       **FOLDER_DECODING[decoding]))
    arrays = model.read_images([images[0]])
    for beam_size in (1, 2):
        expected = model.generate(arrays, "is the heart enlarged?", max_new_tokens=6, beam_size=beam_size)
        text, log_likelihood = other.generate(arrays, "is the heart enlarged?", max_new_tokens=6, beam_size=beam_size)
        assert text == expected[0] and log_likelihood == pytest.approx(expected[1], nan_ok=True)
    answer, expected_answer = (vlm.answer([images[1]], "what is abnormal?") for vlm in (other, model))
    assert answer == {**expected_answer, "probability": pytest.approx(expected_answer["probability"])}
    assert other.write_report(images[1], max_new_tokens=5, beam_size=2) == model.write_report(images[1], 5, 2)


def test_an_open_answers_probability_counts_its_end_token_and_an_empty_answer_is_flagged(vlm_dir, images, vqa_file,
                                                                                        tmp_path):
    """An open answer's log-likelihood includes its end token's (it was left out: an answer ending at once had
    p = 1.000); an end token that is an ordinary word (a folder's eos_token_id list) is not in the text; an answer
    without a word is marked no_answer, counted by eval vqa and said by medvl vqa."""
    model = VisionLanguageModel.from_pretrained(vlm_dir)
    question = f"is the heart enlarged?\n{SHORT_ANSWER}"
    arrays = model.read_images([images[0]])
    words = model.generate(arrays, question, max_new_tokens=6)[0].split()
    eos = model.model.generation_config.eos_token_id
    for end in list(dict.fromkeys(words))[:2]:  # the first word (the answer ends at once), the next other one if any
        ids = [eos, model.tokenizer.convert_tokens_to_ids(end)]
        ending = VisionLanguageModel.from_pretrained(with_generation_config(vlm_dir, tmp_path / end, eos_token_id=ids))
        text, log_likelihood = ending.generate(arrays, question, max_new_tokens=6)
        before = words[:words.index(end)]
        assert text == " ".join(before)  # the end word left out
        # the model's own log-likelihood of the words before the end, then the end word
        assert log_likelihood == pytest.approx(model.candidate_log_likelihoods(arrays, question,
                                                                               [" ".join([*before, end])])[0], abs=1e-4)
        answer = ending.answer([images[0]], "is the heart enlarged?")
        assert answer["no_answer"] is (not before) and answer["answer_type"] == "OPEN"
        assert answer["probability"] == pytest.approx(float(np.exp(log_likelihood)), rel=1e-4)
        assert answer["probability"] < 1.0
    assert model.answer([images[0]], "is the heart enlarged?")["no_answer"] is False
    from medvl.data.loaders.vqa import load_vqa

    items, silent = load_vqa(vqa_file), VisionLanguageModel.from_pretrained(tmp_path / words[0])
    generated = [item for item, options in zip(items, closed_candidates(items), strict=True) if options is None]
    expected = sum(silent.answer([item.image], item.question)["no_answer"] for item in generated)
    assert evaluate_vqa(silent, items, str(vqa_file))["no_answers"] == expected > 0
    assert evaluate_vqa(model, items, str(vqa_file))["no_answers"] == 0
    out = tmp_path / "answer.json"
    result, output = invoke("vqa", "--model", tmp_path / words[0], images[0], "--question", "is the heart enlarged?",
                            "--json", out)
    assert result.exit_code == 0, output
    assert "no answer" in output and json.loads(out.read_text())["no_answer"] is True


def test_candidate_scores_are_summed_log_likelihoods_from_the_models_logits(vlm_dir, images):
    model = VisionLanguageModel.from_pretrained(vlm_dir)
    arrays = model.read_images([images[2]])
    question, candidates = "which side is the effusion on?", ["left", "right", "small left pleural effusion"]
    scores = model.candidate_log_likelihoods(arrays, question, candidates)
    prompt = model.prompt(question, 1)
    picture = [Image.fromarray(arrays[0])]
    prompt_length = model.processor(images=picture, text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    for candidate, score in zip(candidates, scores, strict=True):
        inputs = model.processor(images=picture, text=[prompt + model.answer_separator(prompt) + candidate],
                                 return_tensors="pt")
        with torch.no_grad():
            logits = model.model(**inputs).logits[0]
        ids = inputs["input_ids"][0].tolist()
        assert len(ids) - prompt_length == len(candidate.split())  # one word-level token per word
        by_hand = sum(float(F.log_softmax(logits[position - 1], dim=-1)[ids[position]])
                      for position in range(prompt_length, len(ids)))
        assert score == pytest.approx(by_hand, abs=1e-4)
    answer = model.answer([images[2]], question, candidates)  # the question + SHORT_ANSWER, scored the same way
    probabilities = torch.tensor(model.candidate_log_likelihoods(arrays, f"{question}\n{SHORT_ANSWER}",
                                                                 candidates)).softmax(0)
    best = int(probabilities.argmax())
    assert answer["answer"] == candidates[best] and answer["answer_type"] == "CLOSED"
    assert answer["probability"] == pytest.approx(float(probabilities[best]), abs=1e-6)
    assert answer["alternative"] in candidates and answer["alternative"] != answer["answer"]


def test_closed_candidates_per_question_type(vqa_file):
    from medvl.data.loaders.vqa import load_vqa

    items = load_vqa(vqa_file)  # SIZE has one answer, "no": answered by generation, not among other types' answers
    assert closed_candidates(items) == [["no", "yes"], ["no", "yes"], None, ["left", "right"], ["left", "right"],
                                        None]


def test_closed_candidates_do_not_depend_on_which_questions_are_scored(images, tmp_path):
    """A question's choices were its type's answers among the questions scored (every type's when under two), so
    a three-way ratio question scored in a small split was asked among itself, "yes" and "no": they are now the
    options its file lists, else its type's closed answers over every question read (all splits)."""
    from medvl.data.loaders.vqa import load_vqa

    for image in images:
        shutil.copy(image, tmp_path / image.name)
    ratio = {"question": "is the ratio below 0.45, 0.45 to 0.50, or above 0.50?", "answer_type": "CLOSED",
             "question_type": "ratio", "options": ["<0.45", "0.45-0.50", ">0.50"]}
    presence = {"question": "is there a nodule in the left lung?", "answer_type": "CLOSED", "question_type": "PRES"}
    rows = {"test": [{**ratio, "answer": ">0.50"}, {**presence, "answer": "yes"}, {**ratio, "answer": "<0.45"},
                     {**presence, "answer": "no"}, {**presence, "answer": "no", "question_type": "SIZE"}],
            "small": [{**ratio, "answer": ">0.50"}, {**presence, "answer": "yes"}]}
    for split, questions in rows.items():
        (tmp_path / f"{split}.json").write_text(json.dumps([{"qid": number, "image_name": images[0].name, **question}
                                                            for number, question in enumerate(questions)]))
    every = load_vqa(tmp_path)
    small, test = ([item for item in every if item.split == split] for split in ("small", "test"))
    expected = [["<0.45", "0.45-0.50", ">0.50"], ["no", "yes"]]  # the file's own options, in its order
    assert closed_candidates(small, every) == expected == closed_candidates(test, every)[:2]
    assert closed_candidates(test, every)[4] is None  # SIZE's one answer: never PRES's or ratio's


def test_evaluate_vqa_gives_the_result_shape_of_medvls_own_model(llava_dir, vqa_file):
    from medvl.data.loaders.vqa import load_vqa

    model = load_vqa_model(llava_dir)
    assert isinstance(model, VisionLanguageModel)
    items = load_vqa(vqa_file)
    result = evaluate_vqa(model, items, str(vqa_file))
    assert (result["n"], result["n_closed"], result["n_open"]) == (6, 5, 1)
    for key in ("closed_accuracy", "overall_accuracy", "blank_image_overall_accuracy", "open_token_f1"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["question_only_overall_accuracy"] is None and result["answers_in_vocabulary"] is None
    assert result["questions_with_unknown_words"] is None  # a VLM reads the whole prompt: it does not count
    assert set(result["per_question_type"]) == {"PRES", "SIZE", "POS", "ABN"}
    # every closed answer is one of its candidates: chance for yes/no is 1/2, not 1/vocabulary
    answers = [model.answer([item.image], item.question, options)["answer"]
               for item, options in zip(items, closed_candidates(items), strict=True) if options]
    assert all(answer in {"yes", "no", "left", "right"} for answer in answers)


# ------------------------------------------------------------------ the commands


def test_vqa_command_answers_with_a_local_vlm(vlm_dir, images, tmp_path):
    out = tmp_path / "answer.json"
    result, output = invoke("vqa", "--model", vlm_dir, images[0], "--question", "is there a nodule in the left lung?",
                            "--json", out)
    assert result.exit_code == 0, output
    answer = json.loads(out.read_text())
    assert "answer:" in output and answer["model"] == vlm_dir.resolve().name  # its name, as /v1/vqa gives it
    assert answer["answer_type"] in ("OPEN", "CLOSED") and 0.0 <= answer["probability"] <= 1.0
    assert answer["heatmaps"] == [] and "unknown_words" not in answer  # a VLM's answer does not count them
    again, _ = invoke("vqa", "--model", vlm_dir, images[0], "--question", "is there a nodule in the left lung?",
                      "--json", out, "--overwrite")
    assert json.loads(out.read_text()) == answer


def test_report_generate_command_with_a_local_vlm(vlm_dir, images, tmp_path):
    out = tmp_path / "reports.json"
    result, output = invoke("report", "generate", "--model", vlm_dir, images[0], images[1], "--beam-size", "1",
                            "--max-length", "8", "--json", out)
    assert result.exit_code == 0, output
    reports = json.loads(out.read_text())["reports"]
    assert [row["image"] for row in reports] == [images[0].name, images[1].name]
    assert all(row["report"] and len(row["report"].split()) <= 8 for row in reports)
    assert isinstance(load_report_generator(vlm_dir), VisionLanguageModel)


def test_eval_vqa_command_on_a_question_file(llava_dir, vqa_file, tmp_path):
    out = tmp_path / "scores.json"
    result, output = invoke("eval", "vqa", "--model", llava_dir, "--data", vqa_file, "--json", out, "--quiet")
    assert result.exit_code == 0, output
    scores = json.loads(out.read_text())
    assert scores["n"] == 6 and scores["model"] == str(llava_dir)  # as given
    assert scores["question_only_overall_accuracy"] is None and 0.0 <= scores["blank_image_overall_accuracy"] <= 1.0
    assert "input_content" not in scores
    # one question about a uniform film: its image is counted once
    blank = vqa_file.parent / "uniform.png"
    Image.fromarray(np.full((40, 40), 30, np.uint8)).save(blank)
    rows = json.loads(vqa_file.read_text())
    rows.append({**rows[0], "qid": 99, "image_name": blank.name})
    extended = tmp_path / "with-blank.json"
    extended.write_text(json.dumps(rows))
    shutil.copyfile(blank, tmp_path / blank.name)
    for image in {row["image_name"] for row in rows} - {blank.name}:
        shutil.copyfile(vqa_file.parent / image, tmp_path / image)
    result, output = invoke("eval", "vqa", "--model", llava_dir, "--data", extended, "--json", out, "--quiet",
                            "--overwrite")
    assert result.exit_code == 0, output
    assert json.loads(out.read_text())["input_content"] == {"records": 1, "of": 4, "flags": {"blank": 1, "streaked": 0}}


def test_eval_report_command_scores_a_local_vlm_beside_the_nearest_report(llava_dir, tmp_path):
    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "phantom", n=16, seed=0, size=32)
    out = tmp_path / "report-scores.json"
    result, output = invoke("eval", "report", "--model", llava_dir, "--data", tmp_path / "phantom", "--split", "test",
                            "--beam-size", "1", "--max-length", "6", "--json", out, "--quiet")
    assert result.exit_code == 0, output
    scores = json.loads(out.read_text())
    for source in ("generator", "nearest_report"):
        assert {"bleu_4", "rouge_l", "cider", "micro_f1", "macro_f1"} <= set(scores[source])
    assert scores["context_k"] == 0 and scores["baseline_encoder"]["source"].startswith("the transformers VLM")
    assert scores["empty_reports"] == 0 and "input_content" not in scores
    # a uniform test film is counted
    test_image = next(record.image for record in load_dataset(tmp_path / "phantom") if record.split == "test")
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(test_image)
    result, output = invoke("eval", "report", "--model", llava_dir, "--data", tmp_path / "phantom", "--split", "test",
                            "--beam-size", "1", "--max-length", "6", "--json", out, "--quiet", "--overwrite")
    assert result.exit_code == 0, output
    assert json.loads(out.read_text())["input_content"] == {"records": 1, "of": scores["n"],
                                                            "flags": {"blank": 1, "streaked": 0}}


def test_two_image_questions_and_too_many_images(llava_dir, gemma_dir, images, tmp_path):
    question = "is the heart enlarged?"
    result, output = invoke("vqa", "--model", gemma_dir, images[0], images[1], "--question", question)
    assert result.exit_code == 0, output  # Gemma 3 takes two images per question
    result, output = invoke("vqa", "--model", llava_dir, images[0], images[1], "--question", question)
    assert result.exit_code == 2
    assert "2 images given; tiny-llava (llava) takes at most 1 per question" in output
    assert len(result.stderr.strip().splitlines()) == 1
    result, output = invoke("vqa", "--model", gemma_dir, *images, "--question", question)
    assert result.exit_code == 2 and "takes at most 2" in output
    two = tmp_path / "two" / "testset.json"
    two.parent.mkdir()
    for image in images[:2]:
        shutil.copy(image, two.parent / image.name)
    two.write_text(json.dumps([{"qid": "p1", "image_names": [images[0].name, images[1].name], "question": question,
                                "answer": "stable", "answer_type": "CLOSED"}]))
    result, output = invoke("eval", "vqa", "--model", llava_dir, "--data", two, "--quiet")
    # the question file is named, as medvl's own VQA model's check names it
    assert result.exit_code == 2 and f"{two}: question p1 has 2 images; tiny-llava (llava) takes at most 1 per " \
        "question" in " ".join(output.split()), output
    result, output = invoke("vqa", "--model", llava_dir, images[0], "--question", question, "--heatmap",
                            tmp_path / "heat.png")
    assert result.exit_code == 2 and "gives no attention heatmap" in output
    with pytest.raises(InputError, match="at most 1"):
        VisionLanguageModel.from_pretrained(llava_dir).answer(images[:2], question)


@pytest.mark.parametrize(("damage", "expected"), [
    ("processor_config.json", "no processor config (expected one of processor_config.json, preprocessor_config"),
    ("tokenizer.json", "no tokenizer (expected one of"),
    ("model.safetensors", "no weights (expected one of model.safetensors"),
    ("model_type", "config.json model_type 'bert' is not a supported vision-language model (medvl runs "
                   "transformers llava, gemma3 folders)"),
])
def test_incomplete_or_unsupported_folders_are_one_line_errors(llava_dir, images, tmp_path, damage, expected):
    broken = tmp_path / "broken"
    shutil.copytree(llava_dir, broken)
    if damage == "model_type":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    else:
        (broken / damage).unlink()
        if damage == "tokenizer.json":
            (broken / "tokenizer_config.json").unlink()
    with pytest.raises(ModelError, match="broken"):
        VisionLanguageModel.from_pretrained(broken)
    for command in (["vqa", "--model", broken, images[0], "--question", "why?"],
                    ["report", "generate", "--model", broken, images[0]]):
        result, output = invoke(*command)
        assert result.exit_code == 2, output
        assert expected in output and str(broken) in output
        assert len(result.stderr.strip().splitlines()) == 1, output


def test_answers_and_reports_flag_an_image_without_content(llava_dir, images, tmp_path):
    """A blank or streaked image is flagged for a transformers VLM as for medvl's own models, on the 8-bit image
    its processor is given; an image with content is not."""
    blank, strip = tmp_path / "black.png", tmp_path / "strip.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(blank)
    Image.fromarray(np.repeat((np.random.default_rng(1).random((1, 48)) * 255).astype(np.uint8), 48, 0)).save(strip)
    model = VisionLanguageModel.from_pretrained(llava_dir)
    assert model.answer([images[0]], "is the heart enlarged?")["input_flags"] == [{}]
    assert list(model.answer([blank], "is the heart enlarged?", ["yes", "no"])["input_flags"][0]) == ["blank"]
    assert list(model.answer([strip], "is the heart enlarged?")["input_flags"][0]) == ["streaked"]
    out = tmp_path / "answer.json"
    result, output = invoke("vqa", "--model", llava_dir, blank, "--question", "is the heart enlarged?", "--json", out)
    assert result.exit_code == 0, output
    assert "blank as the model sees it" in output and list(json.loads(out.read_text())["input_flags"][0]) == ["blank"]
    reports = tmp_path / "reports.json"
    result, output = invoke("report", "generate", "--model", llava_dir, images[0], strip, "--beam-size", "1",
                            "--max-length", "4", "--json", reports)
    assert result.exit_code == 0, output
    rows = json.loads(reports.read_text())["reports"]
    assert rows[0]["input_flags"] == {} and list(rows[1]["input_flags"]) == ["streaked"]
    assert "streaked as the model sees it" in output
