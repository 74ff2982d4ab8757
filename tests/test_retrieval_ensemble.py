"""Retrieval with an ensemble of models (``medvl.retrieval`` given a list; ``medvl eval retrieval --model A
--model B``): each member's scores standardised over the gallery per query, then averaged."""

import copy
import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

import medvl
from cli_helpers import invoke
from medvl.embed import embed_images
from medvl.errors import InputError
from medvl.eval.metrics import retrieval_ranks
from medvl.eval.retrieval import CaptionBridge


@pytest.fixture(scope="module")
def members_and_test(phantom_dir):
    dataset = medvl.load_dataset(phantom_dir)
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = medvl.create_model("phantom-tiny")
        model.text_encoder.fit_tokenizer([r.text for r in dataset if r.text])
        members.append(model)
    return members, dataset.select("test")


def _zscore(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean(1, keepdims=True)) / scores.std(1, keepdims=True)


def test_the_ensemble_ranks_by_the_mean_of_standardised_member_scores(members_and_test):
    members, test = members_and_test
    records = [r for r in test if r.text]
    texts = list(dict.fromkeys(r.text for r in records))
    similarities = []
    for model in members:
        images = embed_images(model, test.subset(records), show_progress=False).numpy()
        similarities.append(images @ model.encode_texts(texts).numpy().T)
    expected = retrieval_ranks(np.mean([_zscore(s) for s in similarities], axis=0),
                               [[texts.index(r.text)] for r in records])
    together = medvl.retrieval(members, test, show_progress=False, keep_ranks=True)
    alone = [medvl.retrieval(m, test, show_progress=False, keep_ranks=True) for m in members]
    assert together["image_to_text"]["ranks"] == expected.tolist()
    assert together["ensemble"]["members"] == 2 and "ensemble" not in alone[0]
    assert together["image_to_text"]["ranks"] not in [a["image_to_text"]["ranks"] for a in alone]
    # one model listed alone is that model's ranking, with no ensemble block
    assert medvl.retrieval([members[0]], test, show_progress=False, keep_ranks=True) == alone[0]


def test_each_member_takes_its_own_bridge(members_and_test):
    """A bank holding the scored images with k = 1 and a heavy weight gives each query its own caption
    first in each member, so in the ensemble too, whatever the members' plain rankings."""
    members, test = members_and_test
    bridges = [CaptionBridge.from_dataset(m, test, k=1, weight=1000.0, show_progress=False) for m in members]
    plain = medvl.retrieval(members, test, show_progress=False)
    bridged = medvl.retrieval(members, test, show_progress=False, bridge=bridges)
    assert plain["image_to_text"]["R@1"] < 0.5 and bridged["image_to_text"]["R@1"] == 1.0
    assert bridged["text_to_image"] == plain["text_to_image"]
    with pytest.raises(InputError, match="one bridge per model"):
        medvl.retrieval(members, test, show_progress=False, bridge=bridges[0])
    with pytest.raises(InputError, match="some ensemble members and not others"):
        medvl.retrieval(members, test, show_progress=False, bridge=[bridges[0], None])
    with pytest.raises(InputError, match="at least one model"):
        medvl.retrieval([], test, show_progress=False)
    with pytest.raises(InputError, match="one image_embeddings per model"):
        medvl.retrieval(members, test, show_progress=False, image_embeddings=[torch.zeros(len(test), 8)])


def test_cli_scores_several_model_folders_as_one_ensemble(phantom_dir, tmp_path):
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"run{seed}")
        result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", runs[-1],
                                "--epochs", 1, "--batch-size", 32, "--seed", seed, "-q")
        assert result.exit_code == 0, output
    result, output = invoke("eval", "retrieval", "--model", runs[0], "--model", runs[1], "--data", phantom_dir,
                            "--split", "test", "--bridge-data", phantom_dir, "--json", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, output
    title = " ".join(output.split())  # the table title wraps at the terminal width
    assert "2 models" in title and "image->text bridged by 10 of" in title
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["model"] == [str(r) for r in runs] and saved["ensemble"]["members"] == 2
    assert saved["bridge"]["k"] == 10 and 0 <= saved["i2t_R@5"] <= 1
    single = tmp_path / "one.json"
    result, output = invoke("eval", "retrieval", "--model", runs[0], "--data", phantom_dir, "--split", "test",
                            "--json", single, "-q")
    assert result.exit_code == 0, output
    assert json.loads(single.read_text())["model"] == str(runs[0]) and "ensemble" not in json.loads(
        single.read_text())
    result, output = invoke("eval", "retrieval", "--model", runs[0], "--model", runs[0], "--data", phantom_dir,
                            "--split", "test", "--json", tmp_path / "x.json")
    assert result.exit_code == 2 and "given twice" in output and not (tmp_path / "x.json").exists()


class _Oracle:
    """A text tower that embeds each text as its image's embedding (plus a little noise), ignoring letter case
    as an uncased tower does: a perfect retrieval model."""

    def __init__(self, text_vectors: dict[str, np.ndarray]):
        self.text_vectors = text_vectors

    def encode_texts(self, texts, batch_size: int = 128):
        return torch.tensor(np.stack([self.text_vectors[text.lower()] for text in texts]), dtype=torch.float32)

    def text_tokens(self, texts):
        return [tuple(text.lower().encode()) for text in texts]  # letter case is not read


def test_a_perfect_model_scores_1_with_several_captions_per_image_and_case_variants(phantom_dir):
    """Records of one image with several captions used to be several gallery images (each tying with its copy:
    a perfect model got t2i R@1 0.5), and captions differing in letter case two gallery texts (neither image
    could reach rank 1). Galleries now hold each image and each text-as-the-model-sees-it once."""
    from dataclasses import replace

    test = medvl.load_dataset(phantom_dir).select("test")
    records = [r for r in test if r.text][:15]
    records[1] = replace(records[1], text=records[0].text.upper())  # another image, its caption in capitals
    records[2] = replace(records[2], text=records[0].text)  # a third image with the first one's caption
    second = [replace(r, id=r.id + "-second", text=f"Second reading {n}: " + (r.text or ""))
              for n, r in enumerate(records[3:8])]
    dataset = test.subset(records + second)
    rng = np.random.default_rng(0)
    unit = {}
    for record in dataset:
        vector = rng.normal(size=32)
        unit.setdefault(str(record.image), vector / np.linalg.norm(vector))
    captions: dict[str, list[str]] = {}  # a text as the model sees it -> its images
    for record in dataset:
        captions.setdefault(record.text.lower(), []).append(str(record.image))  # type: ignore[union-attr]
    text_vectors = {}
    for text, images in captions.items():  # a text shared by several images: the mean of theirs
        mean = np.mean([unit[image] for image in images], axis=0) + 1e-3 * rng.normal(size=32)
        text_vectors[text] = mean / np.linalg.norm(mean)
    embeddings = torch.tensor(np.stack([unit[str(r.image)] for r in dataset]), dtype=torch.float32)
    result = medvl.retrieval(_Oracle(text_vectors), dataset, image_embeddings=embeddings, keep_ranks=True,
                             show_progress=False)
    assert (result["n_records"], result["n_images"], result["n_texts"]) == (20, 15, len(captions))
    assert result["image_to_text"]["R@1"] == 1.0 and result["text_to_image"]["R@1"] == 1.0
    assert len(result["image_to_text"]["ranks"]) == 15 and len(result["text_to_image"]["ranks"]) == len(captions)
    # chance with several relevant items: 1 - P(none of them in the first k) = share of relevant at k = 1
    per_text = [len(set(images)) / 15 for images in captions.values()]
    assert result["text_to_image"]["chance"]["R@1"] == pytest.approx(np.mean(per_text))
    texts_per_image = [sum(str(r.image) in images for images in captions.values()) for r in records]
    assert result["image_to_text"]["chance"]["R@1"] == pytest.approx(np.mean(texts_per_image) / len(captions))


def test_a_collapsed_text_tower_scores_no_better_than_chance(members_and_test, caplog):
    """A text tower whose output hardly depends on its input embeds every report alike. Texts embedded alike
    used to be merged into one gallery text, which every image then ranked first (R@1 = 1 both ways, 1 distinct
    text); they are now distinct texts tied with each other, and ties count against the model."""
    members, test = members_and_test
    collapsed = copy.deepcopy(members[0])
    norm = collapsed.text_encoder.model.encoder.layer[-1].output.LayerNorm  # the tower's output: ~ its bias
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1e-4 * torch.randn(norm.weight.shape, generator=generator))
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))
    with caplog.at_level(logging.WARNING, logger="medvl.eval.retrieval"):
        result = medvl.retrieval(collapsed, test, show_progress=False)
    n_texts = len({r.text for r in test if r.text})
    assert result["i2t_R@1"] == result["i2t_R@10"] == 0.0 and result["t2i_R@1"] <= 2 * result["text_to_image"][
        "chance"]["R@1"]
    assert result["n_texts"] == result["texts_embedded_alike"] == n_texts > 10
    assert result["image_to_text"]["median_rank"] == n_texts
    assert f"{n_texts} of the {n_texts} distinct texts are embedded alike" in caplog.text
    assert medvl.retrieval(members[0], test, show_progress=False)["texts_embedded_alike"] == 0


def test_texts_the_tower_reads_alike_are_one_gallery_text(members_and_test):
    """Letter case and spacing (an uncased WordPiece tower) are not read: such texts are one gallery text. Texts
    differing only past the tower's max_length are distinct texts the tower cannot tell apart: ties, against the
    model. A text differing in a word the tower reads is another text."""
    members, test = members_and_test
    records = [r for r in test if r.text][:6]
    base = records[0].text or ""
    long = base + " lung" * members[0].config.text.max_length
    variants = ["  " + base.upper().replace(" ", "   "), long, long + " heart", base + " heart"]
    dataset = test.subset(records[:2] + [replace(r, text=t) for r, t in zip(records[2:], variants, strict=True)])
    result = medvl.retrieval(members[0], dataset, show_progress=False)
    # base = its upper-case, spaced-out copy; long and long + " heart" tied; base + " heart" and records[1] apart
    assert (result["n_images"], result["n_texts"], result["texts_embedded_alike"]) == (6, 5, 2)


def test_distinct_reports_read_as_unknown_tokens_are_ties_not_one_text(members_and_test, caplog):
    """Reports in a script the tokenizer's vocabulary lacks all read as the same unknown-token ids. They used to
    be merged into one gallery text, which every image ranked first: R@1 = 1 both ways for a model that cannot
    read them. They are now distinct gallery texts, tied, and ties count against the model."""
    import random

    members, test = members_and_test
    records = [r for r in test if r.text]
    draw = random.Random(0)
    greek = [" ".join("".join(draw.choice("αβγδεζηθικλμνξοπρστυφχψω") for _ in range(8)) for _ in range(3))
             for _ in records]
    assert len(set(greek)) == len(records) and len(set(members[0].text_tokens(greek))) == 1
    dataset = test.subset([replace(r, text=t) for r, t in zip(records, greek, strict=True)])
    with caplog.at_level(logging.WARNING, logger="medvl.eval.retrieval"):
        result = medvl.retrieval(members[0], dataset, show_progress=False)
    n = len(records)
    assert result["n_texts"] == result["texts_embedded_alike"] == n > 10
    assert result["i2t_R@1"] == 0.0 and result["image_to_text"]["median_rank"] == n
    assert result["t2i_R@1"] <= 2 * result["text_to_image"]["chance"]["R@1"] < 1
    assert f"{n} of the {n} distinct texts are embedded alike" in caplog.text
    assert not any(text in caplog.text for text in greek)  # no report text in the log


def test_one_model_under_two_spellings_or_copied_is_not_an_ensemble(members_and_test, phantom_dir, tmp_path):
    """A training run folder is read as its model/ folder, so --model run --model run/model is one model twice
    (it was scored as a 2-model ensemble with the single model's figures); so is a byte-identical copy."""
    import shutil

    members, _ = members_and_test
    members[0].save_pretrained(tmp_path / "run" / "model")
    shutil.copytree(tmp_path / "run" / "model", tmp_path / "copy")
    for first, second, message in (("run", "run/model", "the same model folder is given twice"),
                                   ("run/model", "copy", "hold the same model")):
        out = tmp_path / f"{first.replace('/', '-')}.json"
        result, output = invoke("eval", "retrieval", "--model", tmp_path / first, "--model", tmp_path / second,
                                "--data", phantom_dir, "--split", "test", "--json", out, "-q")
        assert result.exit_code == 2 and message in output and not out.exists(), output
