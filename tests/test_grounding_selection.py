"""Choosing heatmap settings on a validation split: the rule by hand, and choose_settings on a tiny model."""

import pytest
import torch

import medvl
from medvl.data import captions_for
from medvl.errors import InputError
from medvl.explain import grounding
from medvl.train.loop import TrainConfig


def _row(method_score: float, random: float, centre: float) -> dict:
    return {"n": 4, "m": {"pointing_box": method_score}, "random": {"pointing_box": random},
            "centre": {"pointing_box": centre}}


def test_selection_key_counts_findings_beaten_then_the_pooled_score():
    per_finding = {"a": _row(0.5, 0.1, 0.4), "b": _row(0.3, 0.3, 0.0), "c": _row(0.2, 0.0, 0.6),
                   "all": _row(0.33, 0.13, 0.33)}
    assert grounding.selection_key(per_finding, "m") == (1, 0.33)  # a tie with a baseline (b) does not count
    better_pooled = {**per_finding, "all": _row(0.4, 0.1, 0.3)}
    assert grounding.selection_key(better_pooled, "m") > grounding.selection_key(per_finding, "m")
    more_beaten = {**per_finding, "b": _row(0.31, 0.3, 0.0), "all": _row(0.1, 0.1, 0.3)}
    assert grounding.selection_key(more_beaten, "m") > grounding.selection_key(better_pooled, "m")


@pytest.fixture(scope="module")
def tiny_model(phantom_dir, tmp_path_factory):
    """phantom-tiny without the stem max-pool, trained two steps (the selection needs a model, not a good one)."""
    dataset = medvl.load_dataset(phantom_dir)
    out = tmp_path_factory.mktemp("selection") / "run"
    torch.manual_seed(0)
    model = medvl.create_model("phantom-tiny", **{"image.no_max_pool": True})
    medvl.train(model, dataset.select("train"), TrainConfig(epochs=1, batch_size=32, seed=0, max_steps=2), out,
                captions=captions_for(dataset), show_progress=False)
    return medvl.load_model(out)


def test_choose_settings_keeps_the_best_candidate_per_method(tiny_model, phantom_dir):
    val = medvl.load_dataset(phantom_dir).select("val")
    candidates = {"patch_text": [{"contrast": False}, {"contrast": True}], "gradcam": [{}]}
    result = grounding.choose_settings(tiny_model, val, candidates)
    assert set(result["chosen"]) == {"patch_text", "gradcam"}
    assert result["chosen"]["gradcam"] == {}
    tried = result["tried"]["patch_text"]
    assert [t["settings"] for t in tried] == candidates["patch_text"]
    for entry in tried:  # each candidate's scores are those of evaluate_grounding with its settings
        direct = grounding.evaluate_grounding(tiny_model, val, methods=["patch_text"],
                                              settings={"patch_text": entry["settings"]})
        assert entry["per_finding"] == direct["per_finding"]
        assert tuple(entry["key"]) == grounding.selection_key(direct["per_finding"], "patch_text")
    first_best = max(range(len(tried)), key=lambda i: (tuple(tried[i]["key"]), -i))
    assert result["chosen"]["patch_text"] == tried[first_best]["settings"]


def test_choose_settings_takes_the_first_of_equal_candidates_and_refuses_bad_input(tiny_model, phantom_dir):
    val = medvl.load_dataset(phantom_dir).select("val")
    result = grounding.choose_settings(tiny_model, val, {"patch_text": [{}, {"contrast": True}]})
    assert result["tried"]["patch_text"][0]["key"] == result["tried"]["patch_text"][1]["key"]  # same maps
    assert result["chosen"]["patch_text"] == {}
    with pytest.raises(InputError, match="no candidate"):
        grounding.choose_settings(tiny_model, val, {"patch_text": []})
    with pytest.raises(InputError, match="methods"):
        grounding.choose_settings(tiny_model, val, {"lime": [{}]})
    with pytest.raises(InputError, match="keyword|window|settings"):
        grounding.choose_settings(tiny_model, val, {"patch_text": [{"window": 0.2}]})
