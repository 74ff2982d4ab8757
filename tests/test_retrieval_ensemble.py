"""Retrieval with an ensemble of models (``medvl.retrieval`` given a list; ``medvl eval retrieval --model A
--model B``): each member's scores standardised over the gallery per query, then averaged."""

import json

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
