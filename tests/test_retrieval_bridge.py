"""The caption bridge of image->text retrieval (``CaptionBridge``): the captions of the nearest bank images
vote for the gallery texts they resemble."""

import json

import numpy as np
import pytest
import torch

import medvl
from cli_helpers import invoke
from medvl.errors import InputError
from medvl.eval.retrieval import CaptionBridge


@pytest.fixture(scope="module")
def model_and_test(phantom_dir):
    torch.manual_seed(0)
    model = medvl.create_model("phantom-tiny")  # random init: its own image-text ranking is near chance
    model.text_encoder.fit_tokenizer([r.text for r in medvl.load_dataset(phantom_dir) if r.text])
    return model, medvl.load_dataset(phantom_dir).select("test")


def test_a_bank_holding_each_query_gives_it_its_own_caption(model_and_test):
    """With the scored images themselves as the bank and k = 1, each query's nearest bank image is itself and
    its caption is the query's own text: the vote alone ranks the right text first, where the untrained model
    does not."""
    model, test = model_and_test
    plain = medvl.retrieval(model, test, show_progress=False)
    bridge = CaptionBridge.from_dataset(model, test, k=1, weight=1000.0, show_progress=False)
    bridged = medvl.retrieval(model, test, show_progress=False, bridge=bridge)
    assert plain["image_to_text"]["R@1"] < 0.5
    assert bridged["image_to_text"]["R@1"] == 1.0
    assert bridged["text_to_image"] == plain["text_to_image"]  # text->image is never re-ranked
    assert bridged["bridge"] == {"k": 1, "weight": 1000.0, "bank": plain["n_images"]}


def test_weight_zero_is_the_plain_ranking_and_the_vote_is_a_mean_of_cosines(model_and_test, phantom_dir):
    model, test = model_and_test
    bank = medvl.load_dataset(phantom_dir).select("train")
    zero = CaptionBridge.from_dataset(model, bank, k=5, weight=0.0, show_progress=False)
    plain = medvl.retrieval(model, test, show_progress=False, keep_ranks=True)
    same = medvl.retrieval(model, test, show_progress=False, keep_ranks=True, bridge=zero)
    assert same["image_to_text"]["ranks"] == plain["image_to_text"]["ranks"]
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(4, 8)), rng.normal(size=(6, 8))
    bridge = CaptionBridge(torch.tensor(rng.normal(size=(9, 8))), torch.tensor(rng.normal(size=(9, 8))), k=3,
                           weight=1.0)
    nearest = np.argsort(-(queries @ bridge.image_embeddings.numpy().T), axis=1)[:, :3]
    votes = np.stack([[np.mean([bridge.text_embeddings.numpy()[j] @ g for j in row]) for g in gallery]
                      for row in nearest])  # explicitly: the mean over the k neighbours of each cosine
    similarity = queries @ gallery.T
    expected = (similarity - similarity.mean(1, keepdims=True)) / similarity.std(1, keepdims=True) + (
        votes - votes.mean(1, keepdims=True)) / votes.std(1, keepdims=True)
    assert np.allclose(bridge.scores(queries, gallery, similarity), expected)


def test_bad_bridge_settings_are_refused(model_and_test):
    model, test = model_and_test
    with pytest.raises(InputError, match="bridge k"):
        CaptionBridge.from_dataset(model, test, k=0, show_progress=False)
    with pytest.raises(InputError, match="at least k=1000"):
        CaptionBridge.from_dataset(model, test, k=1000, show_progress=False)
    with pytest.raises(InputError, match="bridge weight"):
        CaptionBridge.from_dataset(model, test, weight=float("nan"), show_progress=False)


def test_cli_bridge_from_the_training_split_and_never_from_the_scored_one(phantom_dir, tmp_path):
    trained = tmp_path / "run"
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", trained,
                            "--epochs", 1, "--batch-size", 32, "-q")
    assert result.exit_code == 0, output
    result, output = invoke("eval", "retrieval", "--model", trained, "--data", phantom_dir, "--split", "test",
                            "--bridge-data", phantom_dir, "--bridge-k", 5, "--json", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["bridge"]["k"] == 5 and saved["bridge_split"] == "train" and 0 <= saved["i2t_R@5"] <= 1
    result, output = invoke("eval", "retrieval", "--model", trained, "--data", phantom_dir, "--split", "test",
                            "--bridge-data", phantom_dir, "--bridge-split", "test", "--json", tmp_path / "x.json")
    assert result.exit_code == 2 and "is the scored split" in output and not (tmp_path / "x.json").exists()
    result, output = invoke("eval", "retrieval", "--model", trained, "--data", phantom_dir, "--split", "test",
                            "--bridge-data", phantom_dir, "--bridge-split", "all", "--json", tmp_path / "x.json")
    test_size = len(medvl.load_dataset(phantom_dir).select("test"))  # every split, the scored one too: its own captions
    assert result.exit_code == 2 and f"{test_size} of its records are images of the scored split 'test'" in \
        " ".join(output.split()) and not (tmp_path / "x.json").exists()
    result, output = invoke("eval", "retrieval", "--model", trained, "--data", phantom_dir, "--split", "test",
                            "--bridge-data", phantom_dir, "--bridge-k", 0)
    assert result.exit_code == 2 and "bridge k" in output and "Traceback" not in output


@pytest.mark.parametrize("args", [["--bridge-k", -7, "--bridge-weight", "nan"], ["--bridge-split", "val"],
                                  ["--bridge-weight", 2]])
def test_a_bridge_setting_without_bridge_data_is_refused(model_and_test, phantom_dir, tmp_path, args):
    """--bridge-split / -k / -weight act only on the bank of --bridge-data: alone they were ignored (exit 0, the plain
    ranking), even out of range."""
    model, _ = model_and_test
    model.save_pretrained(tmp_path / "model")
    result, output = invoke("eval", "retrieval", "--model", tmp_path / "model", "--data", phantom_dir, "-q",
                            *args, "--json", tmp_path / "r.json")
    assert result.exit_code == 2 and f"{args[0]} needs --bridge-data" in output, output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()
