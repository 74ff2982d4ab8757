"""Shortcut phantom (a corner marker that leaks the label) and the shortcut detector.

A tiny model trained on the shortcut phantom must be flagged by ``shortcut_check`` and the same
model trained on the clean phantom (same seed: the same patients without the marker) must not.
"""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm

import medvl
from cli_helpers import invoke
from medvl.data.phantom import MANIFEST_COLUMNS, generate_phantom
from medvl.data.phantom.cxr2d import MARKER_VALUE, marker_box
from medvl.data.phantom.generate import SHORTCUT_COLUMN, shortcut_spec
from medvl.errors import InputError
from medvl.eval.counterfactual import phantom_counterfactual_pairs
from medvl.eval.shortcut import CORNERS, mask_region, masked_accuracy_drop, shortcut_check
from medvl.train.loop import TrainConfig

SEED, N, SIZE = 11, 720, 64
# Findings a tiny model learns in seconds at 64 px; the marker leaks no_finding = 0 (abnormal).
KEEP = ("no_finding", "cardiomegaly", "pleural_effusion")
LABEL = "no_finding"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run as fast on one thread, and a second one only spins on a busy shared CPU
    (the training below took 9 s on one thread, 60-160 s on two while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shortcut")
    generate_phantom(root / "shortcut", n=N, seed=SEED, size=SIZE, shortcut=0.95)
    generate_phantom(root / "clean", n=N, seed=SEED, size=SIZE)
    return {"shortcut": root / "shortcut", "clean": root / "clean"}


def _data(folder):
    dataset = medvl.load_dataset(folder)
    return dataset.subset([r for r in dataset if r.labels["finding"] in KEEP])


def _train(folder, out):
    torch.manual_seed(0)
    model = medvl.create_model("phantom-tiny", **{"image.augment": False})
    config = TrainConfig(epochs=15, batch_size=32, lr=3e-3, label_columns=[LABEL], supervised_weight=1.0,
                         contrastive_weight=0.0, seed=0)
    return medvl.train(model, _data(folder).select("train"), config, out, show_progress=False)


@pytest.fixture(scope="module")
def models(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {name: _train(folder, root / name) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def pairs():
    """Twins of patients past the training data (indices >= N), unmarked, at the data's size."""
    return phantom_counterfactual_pairs(SEED, 12, SIZE, findings=KEEP[1:], start=N)


def _rows(folder):
    with (folder / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_shortcut_model_is_flagged_and_clean_model_is_not(models, folders, pairs, caplog):
    spec = shortcut_spec(folders["shortcut"])
    with caplog.at_level(logging.INFO):
        shortcut = shortcut_check(models["shortcut"], _data(folders["shortcut"]).select("test"), LABEL,
                                  region=spec["box"], pairs=pairs)
        clean = shortcut_check(models["clean"], _data(folders["clean"]).select("test"), LABEL, pairs=pairs)
        # the same marked test set as the shortcut model: only the model differs
        clean_on_marked = shortcut_check(models["clean"], _data(folders["shortcut"]).select("test"), LABEL,
                                         region=spec["box"], pairs=pairs)
    assert shortcut["flagged"] and len(shortcut["reasons"]) == 2, shortcut["reasons"]  # both checks fail
    assert shortcut["masked_drop"] >= shortcut["thresholds"]["masked_drop"]
    assert shortcut["pair_accuracy"] < shortcut["thresholds"]["pair_accuracy"]
    assert not clean["flagged"], clean["reasons"]
    assert not clean_on_marked["flagged"], clean_on_marked["reasons"]
    # not flagged because it passed both checks, not because it learned nothing
    assert clean["masked"]["unmasked"]["macro_auc"] >= 0.65
    assert clean["thresholds"]["pair_accuracy"] is not None
    assert clean["pair_accuracy"] >= clean["thresholds"]["pair_accuracy"]
    assert set(clean["masked"]["regions"]) == set(CORNERS)  # no marker known: every corner tried
    assert clean["thresholds"]["masked_z"] > shortcut["thresholds"]["masked_z"]  # corrected for 4 regions
    for result in (shortcut, clean):
        json.dumps(result)  # plain, JSON-serialisable
        assert result["method"] == "head" and result["pairs"]["n_pairs"] == len(pairs)
    assert "pixel" not in caplog.text and "FINDINGS" not in caplog.text


def test_masking_a_box_without_a_marker_changes_nothing_for_a_clean_model(models, folders):
    result = masked_accuracy_drop(models["clean"], _data(folders["clean"]).select("test"), LABEL,
                                  region=marker_box(SIZE))
    assert list(result["regions"]) == ["box"] and result["regions"]["box"]["box"] == marker_box(SIZE)
    assert abs(result["drop"]) < 0.05


def test_shortcut_manifest_marks_abnormal_cases_and_only_the_marker_differs(folders):
    marked_rows, clean_rows = _rows(folders["shortcut"]), _rows(folders["clean"])
    assert list(marked_rows[0]) == [*MANIFEST_COLUMNS, SHORTCUT_COLUMN]
    assert list(clean_rows[0]) == list(MANIFEST_COLUMNS)
    marked = np.array([row[SHORTCUT_COLUMN] == "1" for row in marked_rows])
    abnormal = np.array([row["no_finding"] == "0" for row in marked_rows])
    assert 0.9 < marked[abnormal].mean() < 0.99 and 0.0 < marked[~abnormal].mean() < 0.1
    assert {row["split"] for row, m in zip(marked_rows, marked, strict=True) if m} == {"train", "val", "test"}
    x0, y0, x1, y1 = shortcut_spec(folders["shortcut"])["box"]
    for index in range(24):
        with_marker = np.array(Image.open(folders["shortcut"] / marked_rows[index]["image"]))
        without = np.array(Image.open(folders["clean"] / clean_rows[index]["image"]))
        assert (with_marker[y0:y1, x0:x1] == MARKER_VALUE).all() == marked[index]
        with_marker[y0:y1, x0:x1] = without[y0:y1, x0:x1]
        assert np.array_equal(with_marker, without)  # the same patient, pixel for pixel, elsewhere
        other = {key: value for key, value in marked_rows[index].items() if key != SHORTCUT_COLUMN}
        assert other == clean_rows[index]


def test_dataset_description_records_the_marker(folders):
    spec = shortcut_spec(folders["shortcut"])
    assert spec == {"probability": 0.95, "marks": "abnormal (no_finding = 0)", "corner": "top_right",
                    "box": marker_box(SIZE), "value": MARKER_VALUE}
    assert shortcut_spec(folders["clean"]) is None
    assert SHORTCUT_COLUMN not in json.loads((folders["clean"] / "dataset.json").read_text())["generator"]


def test_mask_region_fills_with_the_local_background():
    image = np.full((20, 20), 30, dtype=np.uint8)
    image[4:6, 16:] = 40  # the band around the box [16, 0, 20, 4] (2 px wide): 12 px of 30, 8 px of 40
    image[:4, 16:] = 255  # the marker
    masked = mask_region(image, [16, 0, 20, 4])
    assert (masked[:4, 16:] == 30).all()
    assert np.array_equal(masked[4:], image[4:]) and np.array_equal(masked[:, :16], image[:, :16])
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    assert mask_region(rgb, [0, 0, 2, 2]).shape == (10, 10, 3)
    for box in ([18, 0, 22, 4], [4, 4, 4, 8], [0, 0, 20, 20]):
        with pytest.raises(InputError, match="region"):
            mask_region(image, box)


def test_bad_shortcut_arguments_raise_input_error(tmp_path, models, folders):
    for kwargs, message in (({"shortcut": 1.5}, "shortcut"), ({"shortcut": -0.1}, "shortcut"),
                            ({"shortcut": float("nan")}, "shortcut"), ({"shortcut": 0.9, "kind": "ct3d"}, "cxr2d"),
                            ({"shortcut": 0.9, "vqa": True}, "VQA")):
        with pytest.raises(InputError, match=message):
            generate_phantom(tmp_path / "x", n=6, size=32, **kwargs)
        assert not (tmp_path / "x").exists()
    data = _data(folders["clean"]).select("test")
    for region in ("middle", [1, 2, 3], [0, 0, SIZE + 5, 4]):
        with pytest.raises(InputError, match="region|corner"):
            masked_accuracy_drop(models["clean"], data, LABEL, region=region)


def test_phantom_command_writes_the_shortcut_variant(tmp_path):
    result, output = invoke("phantom", tmp_path / "ph", "--n", 12, "--size", 48, "--shortcut", 0.9, "-q")
    assert result.exit_code == 0, output
    assert "shortcut marker" in output
    assert _rows(tmp_path / "ph")[0][SHORTCUT_COLUMN] in ("0", "1")
    assert shortcut_spec(tmp_path / "ph")["box"] == marker_box(48)
    for bad in ("1.5", "-0.2"):
        result, output = invoke("phantom", tmp_path / "bad", "--n", 12, "--shortcut", bad, "-q")
        assert result.exit_code == 2 and "shortcut must be" in output and "Traceback" not in output
        assert not (tmp_path / "bad").exists()


def test_an_exact_five_point_masked_drop_is_flagged():
    """"At least 0.05" holds for a drop of exactly 1/20, which floats give as 0.04999999999999993."""
    from medvl.eval.shortcut import MASKED_ALPHA, _changes, _masked_reasons, _scores

    truth = np.array([0] * 70 + [1] * 10)
    unmasked = np.full((80, 2), 0.1)
    unmasked[np.arange(80), truth] = 0.9
    unmasked[10:70] = [0.1, 0.9]  # 10 of 70 class-0 images right before
    masked = unmasked.copy()
    masked[:7] = [0.1, 0.9]  # hiding the corner turns 7 of them wrong: balanced accuracy -7/140
    classes = ["a", "b"]
    changes = _changes(truth, unmasked, masked, _scores(truth, unmasked, classes, recall=True), classes)
    assert changes["drop"]["balanced_accuracy"] < 0.05  # the float rounding this test is about
    z_needed = float(norm.isf(MASKED_ALPHA / len(CORNERS)))
    reasons = _masked_reasons({"regions": {"top_left": {"corner": "top_left", **changes}}}, z_needed)
    assert reasons == ["hiding the top left corner lowers the balanced accuracy by 0.05 "
                       f"(McNemar z 2.6 >= {z_needed:.2f})"]
