"""The VQA model reads where a token is and which film it comes from: a tiny model trained on synthetic
films (PNG files, a bright square on a dark noisy background) must answer held-out films, and its
answers must follow the films when they are swapped or mirrored, which a model blind to film order
or to token position cannot do (swapped films are the same set of tokens; a mirrored film differs
only in where its square is).

The which-film rule is the one the model with a single answer pooled over both films' tokens did
not learn (it answered "first" to every question, 50%): with each film read apart (``film_summaries``)
it is learnt in a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvl.data.loaders.vqa import VQAItem, load_vqa
from medvl.eval.vqa import answer_items
from medvl.models.vqa import select_questions
from medvl.train.loop import TrainConfig
from medvl.train.vqa import VQAOptions, train_vqa

SIZE = 32
WHICH = "Which image shows the square, the first or the second?"
SIDE = "Is the square on the left or the right?"


def _film(rng: np.random.Generator, side: str | None) -> np.ndarray:
    """A dark noisy film, with a bright 8 px square in its left or right half (``side``; None: none)."""
    film = rng.normal(40, 8, (SIZE, SIZE))
    if side is not None:
        top = int(rng.integers(2, SIZE - 10))
        left = int(rng.integers(2, SIZE // 2 - 9)) + (SIZE // 2 if side == "right" else 0)
        film[top:top + 8, left:left + 8] = 210
    return np.clip(film, 0, 255).astype(np.uint8)


def _write_split(folder: Path, split: str, count: int, seed: int) -> None:
    """``count`` which-film questions (answers balanced) and ``count`` which-side questions, as a VQA file."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(exist_ok=True)
    items = []

    def save(film: np.ndarray) -> str:
        name = f"images/{split}_{len(list((folder / 'images').glob(f'{split}_*')))}.png"
        Image.fromarray(film).save(folder / name)
        return name

    for k in range(count):
        shown = save(_film(rng, ("left", "right")[k % 4 // 2]))
        empty = save(_film(rng, None))
        answer = ("first", "second")[k % 2]
        names = [shown, empty] if answer == "first" else [empty, shown]
        items.append({"qid": f"w{k}", "image_name": names[0], "image_names": names, "question": WHICH,
                      "answer": answer, "answer_type": "CLOSED", "question_type": "which_image"})
        side = ("left", "right")[k % 2]
        items.append({"qid": f"s{k}", "image_name": save(_film(rng, side)), "question": SIDE, "answer": side,
                      "answer_type": "CLOSED", "question_type": "location"})
    (folder / f"{split}.json").write_text(json.dumps(items))


@pytest.fixture(scope="module")
def films(tmp_path_factory) -> tuple[Path, list[VQAItem]]:
    folder = tmp_path_factory.mktemp("vqa-films")
    _write_split(folder, "train", 96, seed=0)
    _write_split(folder, "test", 24, seed=1)
    items = load_vqa(folder)
    train = select_questions(items, "train", "films", None)
    options = VQAOptions(image_model="phantom-tiny", image_size=SIZE, question_encoder="bert", hidden_size=32,
                         fusion_layers=1, augment=False,
                         overrides={"image.no_max_pool": True, "text.hidden_size": 32, "text.num_layers": 1,
                                    "dropout": 0.0})
    train_vqa(train * 5, folder / "run", TrainConfig(epochs=1, batch_size=64, lr=3e-3, seed=0), options,
              "films", show_progress=False)  # one long epoch: one checkpoint instead of one per pass
    return folder, select_questions(items, "test", "films", None)


def _answers(folder: Path, items: list[VQAItem]) -> list[str]:
    from medvl.models.vqa import load_vqa_model

    return [row["answer"] for row in answer_items(load_vqa_model(folder / "run"), items)]


def _accuracy(answers: list[str], items: list[VQAItem]) -> float:
    return sum(answer == item.answer_normalized for answer, item in zip(answers, items, strict=True)) / len(items)


def test_which_film_follows_the_film_order(films):
    folder, test = films
    which = [item for item in test if item.question_type == "which_image"]
    swapped = [VQAItem(qid=item.qid, image=item.images[1], question=item.question, answer="", answer_normalized="",
                       answer_type=item.answer_type, split=item.split, images=item.images[::-1]) for item in which]
    answers, answers_swapped = _answers(folder, which), _answers(folder, swapped)
    assert _accuracy(answers, which) >= 0.9  # held-out films
    flipped = sum(a != b for a, b in zip(answers, answers_swapped, strict=True)) / len(which)
    assert flipped >= 0.9  # the same two films in the other order: the other answer


def test_side_follows_the_square_when_mirrored(films, tmp_path):
    folder, test = films
    side = [item for item in test if item.question_type == "location"]
    mirrored = []
    for item in side:
        path = tmp_path / item.image.name
        Image.fromarray(np.asarray(Image.open(item.image))[:, ::-1].copy()).save(path)
        mirrored.append(VQAItem(qid=item.qid, image=path, question=item.question, answer="", answer_normalized="",
                                answer_type=item.answer_type, split=item.split, images=(path,)))
    answers, answers_mirrored = _answers(folder, side), _answers(folder, mirrored)
    assert _accuracy(answers, side) >= 0.9
    assert sum(a != b for a, b in zip(answers, answers_mirrored, strict=True)) / len(side) >= 0.9
