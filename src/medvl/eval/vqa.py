"""VQA scoring and answers with their evidence.

``evaluate_vqa`` returns a plain dict (the keys ``medvl eval vqa --json`` writes):

- ``closed_accuracy``, ``open_accuracy``, ``overall_accuracy``: exact match of the normalised answer
  (``normalize_answer``: lower case, whitespace collapsed, trailing '.' dropped); ``n_closed``,
  ``n_open``, ``n`` (questions without an answer type count in ``overall`` only);
- ``open_token_f1``: mean token F1 of open answers (``token_f1``, SQuAD style: bags of words, lower case,
  punctuation and the articles a / an / the dropped, so 'ring-enhancing lesion' matches 'ring enhancing lesion';
  exact match keeps ``normalize_answer``'s form);
- SURE-VQA sanity baselines in the same run: ``blank_image_*`` (the same model, every image blank:
  zeros in [0, 1]) and ``question_only_*`` (the training answer prior per question, kept in the
  model: the most frequent training answer of the same question, else of its question and answer
  type, else overall);
- ``per_question_type``: ``{type: {n, accuracy, blank_image_accuracy, question_only_accuracy}}``;
- ``answers_in_vocabulary``: share of questions whose answer the model can give;
- ``questions_cut``: how many scored questions are longer than the model's question encoder reads
  (``text.max_length`` tokens): scored as read, cut, with a warning (``medvl vqa`` refuses such a question; a
  transformers VLM reads the whole prompt: 0);
- ``questions_unread``: how many scored questions have no word the model's question encoder knows (only unknown
  tokens and punctuation, ``TextEncoder.known_word_tokens``): scored as read, with a warning counting them (``medvl
  vqa`` refuses such a question; a transformers VLM: 0);
- ``questions_with_unknown_words``: how many scored questions hold a word the model was not trained on
  (``unknown_words``: not among its training questions' words, as ``medvl vqa`` and ``/v1/vqa`` count them; a
  transformers VLM: None, it does not count);
- ``no_answers``: how many scored questions were answered without a word (a transformers VLM's generation that
  ended at once, its answer marked ``no_answer``): scored as wrong, with a warning counting them.

An answer vocabulary mismatch between the model and the data (under half of the answers in the
model's vocabulary, or no question type in common) is a ``DataError`` naming the file.

A transformers vision-language model (``models.vlm``) has no answer vocabulary: a closed question
is answered by scoring candidates (``closed_candidates``: the ``options`` its question file lists, else the
distinct answers of the closed questions of the same question type in every question file read, all splits,
so that an answer does not depend on which other questions are scored; never another type's answers; by
generation when that gives fewer than two), an open one by greedy generation; the blank-image baseline runs
the same way. It has no training prior: ``question_only_*`` and ``answers_in_vocabulary`` are None.

``answer_with_rationale`` answers one question (MedThink style) with the answer's probability, the
top alternative, and a heatmap per image: the last fusion block's attention over the image tokens
on the image encoder's ``token_grid``; ``heatmap_picture`` draws those over the images, each on its own grid.
``supporting_cases`` lists the nearest cases of a case index to an image, its own indexed copies left out.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.audit import content_summary, input_flags
from ..data.loaders.vqa import VQAItem, answer_tokens, normalize_answer
from ..errors import DataError, InputError
from ..models.vlm import VisionLanguageModel
from ..models.vqa import (
    VQAModel,
    batch_pixels,
    check_image_counts,
    image_table,
    prior_answer,
    questions_cut,
    questions_unread,
)
from ..progress import progress_bar
from .contamination import questions_trained_on

log = logging.getLogger(__name__)

MIN_VOCABULARY_COVERAGE = 0.5  # below this share of answers the model can give, the data is not the model's


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the words of two answers (as bags, ``answer_tokens``: lower case, punctuation and the
    articles a / an / the dropped); 1.0 when both are empty."""
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def check_vocabulary(model: VQAModel, items: Sequence[VQAItem], source: str) -> float:
    """The share of ``items`` whose answer the model can give; a mismatched model is a ``DataError``."""
    known = set(model.answers)
    coverage = sum(item.answer_normalized in known for item in items) / max(1, len(items))
    model_types = set(model.meta.get("question_types", []))
    data_types = {item.question_type for item in items if item.question_type}
    if coverage < MIN_VOCABULARY_COVERAGE or (model_types and data_types and not model_types & data_types):
        raise DataError(source, f"answer vocabulary mismatch: {coverage:.0%} of its {len(items)} answers are among "
                                f"the model's {len(known)}, question types {sorted(data_types)[:4]} vs the model's "
                                f"{sorted(model_types)[:4]}; this model was trained on other questions")
    return coverage


@torch.no_grad()
def answer_items(model: VQAModel, items: Sequence[VQAItem], blank: bool = False, batch_size: int = 32,
                 show_progress: bool = False, description: str = "Answering",
                 content: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """The model's answer to each item: answer, probability, alternative (+ probability), predicted
    answer type and the attention over its image tokens (a tensor, (K*T,)). ``content``, a list, gets the
    ``input_flags`` of each distinct image the items ask about, as the model sees it."""
    model.eval()
    images, image_index = image_table(items, model.config.max_images)
    pixels = load_images(model, images, blank)
    if content is not None:
        content.extend(input_flags(image.numpy()) for image in pixels)
    answers: list[dict[str, Any]] = []
    with progress_bar(description, total=len(items), enabled=show_progress) as advance:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            answers += _answer_batch(model, pixels, image_index[start:start + len(chunk)],
                                     [item.question for item in chunk])
            advance(len(chunk))
    return answers


def load_images(model: VQAModel, images: Sequence[Path], blank: bool = False) -> torch.Tensor:
    """Images as [0, 1] tensors (``blank``: zeros of the same shape, nothing read)."""
    if blank:
        return torch.zeros(len(images), model.config.image.in_channels, *model.config.image.volume_shape)
    return model.preprocessor.load_many(images)


def _answer_batch(model: VQAModel, pixels: torch.Tensor, image_index: torch.Tensor,
                  questions: list[str]) -> list[dict[str, Any]]:
    batch, local = batch_pixels(pixels, image_index)
    out = model(model.preprocessor.normalize(batch), local, questions)
    probabilities = model.route(out["answer_logits"], out["type_logits"]).softmax(-1)
    top = probabilities.topk(min(2, probabilities.shape[1]), dim=-1)
    kinds = out["type_logits"].argmax(-1)
    rows = []
    for row in range(len(questions)):
        values, indices = top.values[row].tolist(), top.indices[row].tolist()
        second = len(values) > 1 and values[1] > 0
        rows.append({"answer": model.answers[indices[0]], "probability": values[0],
                     "alternative": model.answers[indices[1]] if second else None,
                     "alternative_probability": values[1] if second else None,
                     "answer_type": ("CLOSED", "OPEN")[int(kinds[row])], "attention": out["attention"][row]})
    return rows


def _accuracy(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def evaluate_vqa(model: VQAModel | VisionLanguageModel, items: Sequence[VQAItem], source: str = "",
                 show_progress: bool = False, keep_answers: bool = False,
                 pool: Sequence[VQAItem] | None = None) -> dict[str, Any]:
    """Exact-match accuracy (closed, open, overall), open token F1, per question type, and the blank-image
    and question-only baselines (see the module docstring). ``keep_answers`` adds, per run, each
    question's exact-match flag (``correct``, ``blank_image_correct``, ``question_only_correct``; None
    for a baseline the model has not), in the order of ``items``. ``pool``: every question read, all splits
    (default ``items``), which a transformers VLM's closed-question choices come from when a question lists
    none (``closed_candidates``)."""
    if not items:
        raise InputError(f"{source}: no questions to score")
    seen = questions_trained_on(model, items, source) if source else None
    runs: dict[str, list[str] | None]
    content: list[dict[str, str]] = []  # per distinct image
    cut = 0 if isinstance(model, VisionLanguageModel) else _count_cut_questions(model, items, source)
    unread = 0 if isinstance(model, VisionLanguageModel) else _count_unread_questions(model, items, source)
    if isinstance(model, VisionLanguageModel):
        coverage = None
        candidates = closed_candidates(items, pool)
        runs = {"": vlm_answers(model, items, candidates, show_progress=show_progress, content=content),
                "blank_image_": vlm_answers(model, items, candidates, blank=True, show_progress=show_progress,
                                            description="Answering (blank images)"),
                "question_only_": None}
    else:
        coverage = check_vocabulary(model, items, source)
        runs = {"": [row["answer"] for row in answer_items(model, items, show_progress=show_progress,
                                                           content=content)],
                "blank_image_": [row["answer"] for row in answer_items(
                    model, items, blank=True, show_progress=show_progress, description="Answering (blank images)")],
                "question_only_": [normalize_answer(prior_answer(model.meta["prior"], item)) for item in items]}
    predicted = runs[""] or []
    result: dict[str, Any] = {"n": len(items), "n_closed": sum(item.answer_type == "CLOSED" for item in items),
                              "n_open": sum(item.answer_type == "OPEN" for item in items)}
    for prefix, answers in runs.items():
        if answers is None:  # a baseline this model has not (a transformers VLM: no training prior)
            result.update({f"{prefix}{kind}_accuracy": None for kind in ("closed", "open", "overall")})
            if keep_answers:
                result[f"{prefix}correct"] = None
            continue
        correct = [answer == item.answer_normalized for answer, item in zip(answers, items, strict=True)]
        if keep_answers:
            result[f"{prefix}correct"] = correct
        for kind in ("closed", "open"):
            result[f"{prefix}{kind}_accuracy"] = _accuracy([flag for flag, item in zip(correct, items, strict=True)
                                                             if item.answer_type == kind.upper()])
        result[f"{prefix}overall_accuracy"] = _accuracy(correct)
    open_f1 = [token_f1(answer, item.answer_normalized) for answer, item in zip(predicted, items, strict=True)
               if item.answer_type == "OPEN"]
    result["open_token_f1"] = sum(open_f1) / len(open_f1) if open_f1 else None
    result["per_question_type"] = _per_type(items, runs)
    result["answers_in_vocabulary"] = coverage
    result["questions_cut"] = cut
    result["questions_unread"] = unread
    result["questions_with_unknown_words"] = None if isinstance(model, VisionLanguageModel) \
        else _count_unknown_word_questions(model, items)
    result["no_answers"] = _count_no_answers(predicted, source)
    if seen is not None:
        result["trained_on_scored"] = seen
    empty = content_summary(content, "scored images")
    if empty is not None:
        result["input_content"] = empty
    return result


def _count_cut_questions(model: VQAModel, items: Sequence[VQAItem], source: str) -> int:
    cut = questions_cut(model, [item.question for item in items])
    if cut:
        log.warning("%s: %d of %d scored questions are longer than the model's question encoder reads (%d tokens, "
                    "special ones included): they are scored as read, cut (medvl vqa refuses them)", source or "data",
                    cut, len(items), model.config.text.max_length)
    return cut


def _count_unknown_word_questions(model: VQAModel, items: Sequence[VQAItem]) -> int:
    """How many scored questions hold a word the model was not trained on (``unknown_words``, as ``medvl vqa`` and
    ``/v1/vqa`` count them; each distinct question read once)."""
    unknown = {question: unknown_words(model, question) for question in {item.question for item in items}}
    return sum(unknown[item.question] > 0 for item in items)


def _count_unread_questions(model: VQAModel, items: Sequence[VQAItem], source: str) -> int:
    unread = questions_unread(model, [item.question for item in items])
    if unread:
        log.warning("%s: %d of %d scored questions have no word the model's question encoder knows (only unknown "
                    "tokens and punctuation): they are scored as read (medvl vqa refuses them)", source or "data",
                    unread, len(items))
    return unread


def _count_no_answers(answers: Sequence[str], source: str) -> int:
    silent = sum(not answer_tokens(answer) for answer in answers)
    if silent:
        log.warning("%s: %d of %d scored questions were answered without a word (the model ended at once): scored "
                    "as wrong", source or "data", silent, len(answers))
    return silent


def _per_type(items: Sequence[VQAItem], runs: dict[str, list[str] | None]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[item.question_type or "none"].append(index)
    table = {}
    for qtype, indices in sorted(groups.items()):
        row: dict[str, Any] = {"n": len(indices)}
        for prefix, answers in runs.items():
            name = f"{prefix}accuracy" if prefix else "accuracy"
            row[name] = None if answers is None else _accuracy([answers[i] == items[i].answer_normalized
                                                                for i in indices])
        table[qtype] = row
    return table


# ---------------------------------------------------------------- transformers vision-language models


def closed_candidates(items: Sequence[VQAItem], pool: Sequence[VQAItem] | None = None) -> list[list[str] | None]:
    """Per question, the answers a candidate-scoring model chooses among: for a closed question the
    ``options`` its question file lists, else the distinct answers of the closed questions of its question
    type (questions without one: one type) in ``pool`` (default ``items``; give every question read, all
    splits, so that a question's choices, and so its answer, do not depend on which others are scored);
    None for other questions and when fewer than two choices are found (answered by generation)."""
    by_type: dict[str, set[str]] = defaultdict(set)
    for item in items if pool is None else pool:
        if item.answer_type == "CLOSED" and item.answer_normalized:
            by_type[item.question_type or ""].add(item.answer_normalized)
    chosen = [(list(item.options) or sorted(by_type[item.question_type or ""]))
              if item.answer_type == "CLOSED" else None for item in items]
    return [options if options and len(options) >= 2 else None for options in chosen]


def vlm_answers(model: VisionLanguageModel, items: Sequence[VQAItem], candidates: Sequence[list[str] | None],
                blank: bool = False, show_progress: bool = False, description: str = "Answering",
                content: list[dict[str, str]] | None = None) -> list[str]:
    """A transformers VLM's normalised answer to each item (``blank``: every image black, same size).
    ``content``, a list, gets the ``input_flags`` of each distinct image, as the model is given it."""
    check_image_counts(items, model.max_images, " per question",  # before any work
                       model=f"{model.config.name} ({model.config.model_type})")
    arrays: dict[Path, Any] = {}  # the last images read: questions about one image are usually together
    flags: dict[Path, dict[str, str]] = {}  # input_flags per distinct image
    answers = []
    with progress_bar(description, total=len(items), enabled=show_progress) as advance:
        for item, options in zip(items, candidates, strict=True):
            paths = item.images or (item.image,)
            if len(arrays) > 16:
                arrays.clear()
            images = [arrays[path] if path in arrays else arrays.setdefault(path, model.read_images([path])[0])
                      for path in paths]
            if blank:
                images = [np.zeros_like(image) for image in images]
            answer = model.answer(images, item.question, options)
            if not blank:
                flags.update(zip(paths, answer["input_flags"], strict=True))
            answers.append(answer["answer"])
            advance(1)
    if content is not None:
        content.extend(flags.values())
    return answers


# ---------------------------------------------------------------- one question, with its evidence


MAX_QUESTION_CHARS = 1000  # a longer question is refused: no question about an image is that long


def check_question(question: str, field: str = "--question",
                   model: VQAModel | VisionLanguageModel | None = None) -> str:
    """The question, stripped; empty, non-UTF-8 or longer than ``MAX_QUESTION_CHARS`` is an ``InputError``
    naming ``field`` (the option or form field it came from), and so is, given a medvl ``model``, a question of
    more tokens than its question encoder reads (``text.max_length``, special tokens included): the rest would
    be cut unread, and questions differing only there answered alike; and one with no word its question encoder
    knows (only unknown tokens and punctuation, ``TextEncoder.known_word_tokens``) or, for a model that recorded its
    training questions' words, none of them (``VQAModel.unknown_words``): the answer would be the image's and the
    training prior's, not an answer to the question. A transformers VLM reads the whole prompt. Messages never
    quote the question."""
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{field}: not valid UTF-8 text") from None
    if not question.strip():
        raise InputError(f"{field}: the question is empty; ask a question about the image(s)")
    if len(question.strip()) > MAX_QUESTION_CHARS:
        raise InputError(f"{field}: longer than {MAX_QUESTION_CHARS} characters ({len(question.strip()):,}); "
                         "no question about an image is that long")
    if isinstance(model, VQAModel):
        _check_question_tokens(question.strip(), field, model)
    return question.strip()


def _check_question_tokens(question: str, field: str, model: VQAModel) -> None:
    length, limit = model.text_encoder.read_length(question)
    if length > limit:
        raise InputError(f"{field}: the question is {length} tokens long; this VQA model's question encoder reads "
                         f"{limit} tokens at most (a word is one token or more): the rest would be cut unread; "
                         "ask a shorter question")
    if not model.text_encoder.known_word_tokens(question):
        raise InputError(f"{field}: the question has no word this VQA model knows (its question encoder reads only "
                         "unknown tokens and punctuation): an answer would not be to the question; ask it in the "
                         "words of the questions the model was trained on")
    words = model.text_encoder.words(question)
    if model.question_words is not None and words and model.unknown_words(question) == len(words):
        raise InputError(f"{field}: the question has no word this VQA model was trained on (none of its "
                         f"{len(words)} word{'s' if len(words) > 1 else ''} is among its training questions' words): "
                         "an answer would not be to the question; ask it in the words of the questions the model "
                         "was trained on")


def unknown_words(model: VQAModel, question: str) -> int:
    """How many words of ``question`` the model was not trained on (``VQAModel.unknown_words``: not among its
    training questions' words; a model saved without them: the words its question encoder reads as its unknown
    token). They are not left out: the question encoder reads them (a pretrained one as it knows them, else as its
    unknown token), so they may sway the answer, which training never checked on them. A question of nothing but
    unknown words is refused (``check_question``); one with some unknown words is answered, and the CLI warns."""
    return model.unknown_words(question)


def answer_with_rationale(model: VQAModel | VisionLanguageModel, images: Sequence[str | Path],
                          question: str) -> dict[str, Any]:
    """The answer to ``question`` about ``images`` (earlier film first) with its evidence: ``model``, the model's
    name (``models.vqa.model_name``: never a path), probability, the top alternative, the predicted answer type and
    one attention heatmap per image (rows of the image encoder's token grid, summing to 1 over all images, each
    naming its image by file name), ``input_flags`` (per image: blank or streaked as the model sees it,
    ``medvl.data.audit.input_flags``) and ``unknown_words`` (``unknown_words``: the question's words the model does
    not know, counted, never quoted); a transformers VLM gives no heatmaps, flags or count."""
    question = check_question(question, model=model)
    if isinstance(model, VisionLanguageModel):  # no attention over image tokens to show
        return {"model": model.name, **model.answer(list(images), question), "heatmaps": []}
    if not images:
        raise InputError("give at least one image")
    if len(images) > model.config.max_images:
        raise InputError(f"{len(images)} images given; the model takes at most {model.config.max_images}")
    item = VQAItem(qid="0", image=Path(images[0]), question=question, answer="", answer_normalized="",
                   answer_type=None, split="", images=tuple(Path(image) for image in images))
    content: list[dict[str, str]] = []  # per distinct image, in the order image_table gives them
    row = answer_items(model, [item], content=content)[0]
    attention = row.pop("attention")
    grid = model.image_encoder.token_grid(torch.zeros(1, model.config.image.in_channels,
                                                      *model.config.image.volume_shape))
    per_image = attention.view(model.config.max_images, -1)[:len(images)]
    # each image by its file name only, as describe_target names files (the folders above may name a patient)
    row["heatmaps"] = [{"image": Path(image).name, "grid": [round(v, 4) for v in weights.tolist()], "shape": list(grid),
                        "peak": _peak(weights, grid)} for image, weights in zip(images, per_image, strict=True)]
    distinct = image_table([item], model.config.max_images)[0]
    row["input_flags"] = [content[distinct.index(Path(image))] for image in images]
    row["unknown_words"] = unknown_words(model, question)
    return {"model": model.name, **row}


def supporting_cases(index, image: str | Path, k: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``k`` cases of an open case ``index`` nearest to ``image`` (id, score, split, labels: no report text),
    embedded by the index's own model (``medvl.index.index_model``), less the indexed copies of the image itself,
    and those copies' ids (``index.search.search_without_copies``: the query is no evidence for its own answer)."""
    from ..index import index_model
    from ..index.base import check_k, check_model
    from ..index.build import hashed_image
    from ..index.search import embed_query, search_without_copies

    check_k(k)
    model = index_model(index)
    check_model(index.info, model, index.location)
    digests, read = hashed_image(model.preprocessor, image)  # read once: hashed as the index hashed it, embedded
    pixels = model.preprocessor.load(read, source=image)
    hits, copies = search_without_copies(index, embed_query(model, image=pixels), k, digests)
    return [{"id": hit.id, "score": round(hit.score, 4), "split": hit.split, "labels": hit.labels}
            for hit in hits], copies


def _peak(weights: torch.Tensor, grid: tuple[int, ...]) -> dict[str, float]:
    """The most attended cell as fractions of the image (row, column of its centre; 0 = top / left)."""
    cell = int(weights.argmax())
    row, column = divmod(cell, grid[-1])
    return {"row": round((row + 0.5) / grid[0], 3), "column": round((column + 0.5) / grid[-1], 3),
            "weight": round(float(weights[cell]), 4)}


def heatmap_picture(images: Sequence[str | Path], heatmaps: Sequence[dict[str, Any]], model: VQAModel,
                    max_side: int = 512) -> np.ndarray:
    """``answer_with_rationale``'s heatmaps drawn over the images they are of, side by side, as an (H, W, 3) uint8
    picture: each image as the model reads it, on its own grid and aspect ratio (``render_preview``: the longest
    side brought down to ``max_side``, never enlarged), in grey, with the attention (scaled to its maximum) in red.
    The model saw the whole image resized to its square input, so each grid cell covers the same fraction of the
    image's height and width that it covers of the input. Panels of different heights are padded with black below.
    """
    from PIL import Image

    from ..clinical.windowing import render_preview

    panels = []
    for image, heat in zip(images, heatmaps, strict=True):
        shown = render_preview(model.preprocessor.read(image), None, max_side).astype(np.float32) / 255.0
        grey = shown[..., :3].mean(-1) if shown.ndim == 3 else shown
        height, width = grey.shape
        weights = np.asarray(Image.fromarray(heatmap_array(heat["grid"], heat["shape"])).resize(
            (width, height), Image.Resampling.BILINEAR))
        panel = np.stack([grey * 0.6 + weights * 0.4, grey * 0.6, grey * 0.6], -1)
        panels.append((np.clip(panel, 0, 1) * 255).round().astype(np.uint8))
    tallest = max(panel.shape[0] for panel in panels)
    return np.concatenate([np.pad(panel, ((0, tallest - panel.shape[0]), (0, 0), (0, 0))) for panel in panels], axis=1)


def heatmap_array(weights: Sequence[float], shape: Sequence[int]):
    """A heatmap as a float array laid out on its grid (rows x columns), scaled to [0, 1]."""
    import numpy as np

    array = np.asarray(weights, dtype=np.float32).reshape(tuple(shape))
    high = float(array.max())
    return array / high if high > 0 else array
