"""Counterfactual twins of phantom cases, pair accuracy against a plain reference, nearest-neighbour pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import medvl
from medvl.data.captions import CaptionConfig
from medvl.data.phantom import PHANTOM_CAPTIONS, Visit, render_case
from medvl.data.phantom.cxr2d import primary_finding
from medvl.data.record import Dataset, Record
from medvl.errors import InputError
from medvl.eval.counterfactual import (
    VARIATIONS,
    nearest_neighbour_pairs,
    pair_accuracy,
    phantom_counterfactual_pairs,
    predict_probabilities,
)

SEED, SIZE = 4, 64


@pytest.fixture(scope="module")
def pairs():
    return phantom_counterfactual_pairs(SEED, 2, SIZE)


def _by(pairs, finding, variation):
    return [p for p in pairs if p.finding == finding and p.variation == variation]


def test_pairs_are_deterministic_and_cover_the_variations_that_apply(pairs):
    again = phantom_counterfactual_pairs(SEED, 2, SIZE)
    assert [(p.id_a, p.id_b) for p in again] == [(p.id_a, p.id_b) for p in pairs]
    for first, second in zip(pairs, again, strict=True):
        assert np.array_equal(first.image_a, second.image_a) and np.array_equal(first.image_b, second.image_b)
    counts = {(f, v): len(_by(pairs, f, v)) for f in {p.finding for p in pairs} for v in VARIATIONS}
    assert counts[("nodule", "moved")] == counts[("consolidation", "moved")] == 2
    assert counts[("cardiomegaly", "moved")] == counts[("cardiomegaly", "other_side")] == 0
    assert counts[("pleural_effusion", "moved")] == 0 and counts[("pleural_effusion", "other_side")] == 2
    assert len(pairs) == 2 * (5 + 5 + 2 + 4)  # absent, resized for all; moved for 2; other side for 4
    for pair in pairs:
        assert pair.image_a.shape == pair.image_b.shape == (SIZE, SIZE) and pair.image_a.dtype == np.uint8
        assert pair.labels_a["finding"] == pair.finding and pair.labels_a["no_finding"] == "0"
        assert not np.array_equal(pair.image_a, pair.image_b)


def test_absent_twin_is_the_same_film_without_the_finding(pairs):
    for pair in _by(pairs, "nodule", "absent") + _by(pairs, "consolidation", "absent"):
        assert pair.labels_b["finding"] == "no_finding" and pair.labels_b["no_finding"] == "1"
        case = render_case(SEED, pair.meta["index"], SIZE)
        assert np.array_equal(case.image, pair.image_a)
        changed = pair.image_a != pair.image_b
        # the film blur (sigma <= 0.6 px at 64 px, truncated at 4 sigma) spreads a change by 2 px at most
        near_finding = ndimage.binary_dilation(case.masks[pair.finding], iterations=3)
        assert changed.any() and not (changed & ~near_finding).any()  # same pose, exposure and noise elsewhere


def test_other_side_twin_has_the_finding_mirrored(pairs):
    for finding in ("pleural_effusion", "pneumothorax", "nodule", "consolidation"):
        for pair in _by(pairs, finding, "other_side"):
            a, b = pair.meta["finding_a"], pair.meta["finding_b"]
            assert {a["side"], b["side"]} == {"left", "right"}
            centre_a, centre_b = (a["box"][0] + a["box"][2]) / 2, (b["box"][0] + b["box"][2]) / 2
            assert (centre_a - SIZE / 2) * (centre_b - SIZE / 2) < 0, (finding, a["box"], b["box"])
            assert pair.labels_b["finding"] == finding
            if finding == "pleural_effusion":  # the side-specific label columns swap
                assert pair.labels_a[f"effusion_{a['side']}"] == pair.labels_b[f"effusion_{b['side']}"] == "1"
                assert pair.labels_b[f"effusion_{a['side']}"] == "0"


def test_moved_and_resized_twins(pairs):
    for pair in _by(pairs, "nodule", "moved") + _by(pairs, "consolidation", "moved"):
        a, b = pair.meta["finding_a"], pair.meta["finding_b"]
        assert a["side"] == b["side"] and a["zone"] != b["zone"] and a["box"] != b["box"]
    for pair in [p for p in pairs if p.variation == "resized"]:
        a, b = pair.meta["finding_a"], pair.meta["finding_b"]
        assert b["pixels"] > a["pixels"], pair.finding
        assert pair.labels_a == pair.labels_b


def test_visit_options_are_checked():
    nodule = next(i for i in range(12) if primary_finding(SEED, i) == "nodule")
    for visit in (Visit(number=0, moved=("pleural_effusion",)), Visit(number=0, other_side=("cardiomegaly",)),
                  Visit(number=0, absent=("nodule",), moved=("nodule",)), Visit(number=0, moved="nodule")):
        with pytest.raises(InputError, match="visit"):
            render_case(SEED, nodule, SIZE, visit=visit)
    both = next(i for i in range(200) if {f["name"] for f in render_case(SEED, i, 32, 1.0).findings}
                == {"pleural_effusion", "pneumothorax"})
    with pytest.raises(InputError, match="both or neither"):
        render_case(SEED, both, 32, 1.0, visit=Visit(number=0, other_side=("pneumothorax",)))
    flipped = render_case(SEED, both, 32, 1.0, visit=Visit(number=0, other_side=("pneumothorax", "pleural_effusion")))
    original = render_case(SEED, both, 32, 1.0)
    assert [f["side"] for f in flipped.findings] == [{"left": "right", "right": "left"}[f["side"]]
                                                     for f in original.findings]


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"findings": ["no_finding"]}, {"findings": []},
                                    {"variations": ["rotated"]}, {"resize": 3.0}])
def test_bad_pair_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        phantom_counterfactual_pairs(SEED, **{"n": 1, "size": 32, **kwargs})


@pytest.fixture(scope="module")
def head_model():
    torch.manual_seed(0)
    model = medvl.create_model("phantom-tiny")
    model.add_head("no_finding", ["0", "1"])
    return model


def test_pair_accuracy_matches_a_plain_reference(head_model, pairs):
    result = pair_accuracy(head_model, pairs, "no_finding", keep_pairs=True)
    assert result["method"] == "head" and result["classes"] == ["0", "1"] and result["n_pairs"] == len(pairs)
    answers_a = predict_probabilities(head_model, [p.image_a for p in pairs], "no_finding")[0].argmax(1)
    answers_b = predict_probabilities(head_model, [p.image_b for p in pairs], "no_finding")[0].argmax(1)
    right_a = np.array([["0", "1"][k] == p.labels_a["no_finding"] for k, p in zip(answers_a, pairs, strict=True)])
    right_b = np.array([["0", "1"][k] == p.labels_b["no_finding"] for k, p in zip(answers_b, pairs, strict=True)])
    assert result["pair_accuracy"] == pytest.approx(np.mean(right_a & right_b))
    assert result["single_accuracy"] == pytest.approx((right_a.sum() + right_b.sum()) / (2 * len(pairs)))
    absent = np.array([p.variation == "absent" for p in pairs])
    assert result["per_variation"]["absent"]["pair_accuracy"] == pytest.approx(np.mean((right_a & right_b)[absent]))
    assert set(result["per_finding"]) == {p.finding for p in pairs}
    assert sum(v["n_pairs"] for v in result["per_variation"].values()) == len(pairs)
    assert [(row["answer_a"], row["answer_b"]) for row in result["pairs"]] == [
        (["0", "1"][a], ["0", "1"][b]) for a, b in zip(answers_a, answers_b, strict=True)]


def test_zero_shot_answers_use_the_captions(pairs):
    torch.manual_seed(0)
    model = medvl.create_model("phantom-tiny")
    captions = CaptionConfig.from_dict(PHANTOM_CAPTIONS)
    model.text_encoder.fit_tokenizer([t for c in captions.classes["finding"] for t in captions.prompts("finding", c)])
    result = pair_accuracy(model, pairs, "finding", captions=captions)
    assert result["method"] == "zero_shot" and set(result["classes"]) == set(captions.classes["finding"])
    assert 0.0 <= result["pair_accuracy"] <= result["single_accuracy"] <= 1.0
    with pytest.raises(InputError, match="not among"):
        pair_accuracy(model, pairs, "finding", captions=captions, classes=["cardiomegaly", "nodule"])
    with pytest.raises(InputError, match="at least one pair"):
        pair_accuracy(model, [], "finding", captions=captions)


def test_nearest_neighbour_pairs_match_a_brute_force_search(head_model):
    rng = np.random.default_rng(0)
    records = [Record(id=f"r{i}", images=[rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)],
                      labels={"y": "ab"[i % 3 == 0]}) for i in range(20)]
    dataset = Dataset(records, "memory", label_names=["y"])
    pairs = nearest_neighbour_pairs(head_model, dataset, "y")
    embeddings = head_model.encode_images([r.image for r in records]).numpy()
    expected = set()
    for i, record in enumerate(records):
        others = [j for j, other in enumerate(records) if other.labels["y"] != record.labels["y"]]
        j = max(others, key=lambda j: embeddings[i] @ embeddings[j])
        expected.add((min(i, j), max(i, j)))
    found = {tuple(sorted((int(p.id_a[1:]), int(p.id_b[1:])))) for p in pairs}
    assert found == expected and len(pairs) == len(expected)
    given = nearest_neighbour_pairs(head_model, dataset, "y", embeddings=torch.from_numpy(embeddings))
    assert [(p.id_a, p.id_b) for p in given] == [(p.id_a, p.id_b) for p in pairs]
    with pytest.raises(InputError, match="embeddings"):
        nearest_neighbour_pairs(head_model, dataset, "y", embeddings=torch.from_numpy(embeddings[:5]))
    assert all(p.labels_a["y"] != p.labels_b["y"] and p.variation == "nearest_neighbour" for p in pairs)
    result = pair_accuracy(head_model, pairs, "y", classes=["a", "b"])  # no head for "y": zero-shot needs classes
    assert result["n_pairs"] == len(pairs)
    with pytest.raises(InputError, match="at least 2 classes"):
        nearest_neighbour_pairs(head_model, dataset.subset(records[1:3]), "y")


def test_pixel_vectors_compare_appearance_whatever_the_size_and_channels():
    import numpy as np
    import torch

    from medvl.data.record import Dataset, Record
    from medvl.eval.counterfactual import pixel_vectors

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    rgb = np.repeat(base[..., None], 3, axis=-1)
    other = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    records = [Record(id=str(i), images=[image]) for i, image in enumerate((base, rgb, base // 2 + 60, other))]
    vectors = pixel_vectors(Dataset(records, source="arrays"), side=16)
    assert vectors.shape == (4, 256)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(4), atol=1e-5)
    similarity = vectors @ vectors.t()
    assert similarity[0, 1] > 0.999 and similarity[0, 2] > 0.999  # grey = RGB copy; contrast and offset removed
    assert similarity[0, 3] < 0.5  # another image
