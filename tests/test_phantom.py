"""Chest radiograph phantom: determinism, ground truth, reports, files and learnability."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medvl.data.phantom import (
    FINDINGS,
    MANIFEST_COLUMNS,
    PHANTOM_CAPTIONS,
    PhantomCase,
    generate_phantom,
    render_case,
)
from medvl.data.phantom import generate as generate_module
from medvl.errors import InputError

EXPECTED_COLUMNS = [
    "image", "text", "split", "finding",
    "no_finding", "cardiomegaly", "effusion_left", "effusion_right", "nodule", "consolidation",
    "pneumothorax",
    "age", "sex", "view", "nodule_zone", "consolidation_zone", "pneumothorax_side", "boxes",
]
# words that, in a report sentence, speak about a finding
KEYWORDS = {
    "cardiomegaly": ("cardiomegaly", "enlarge", "cardiothoracic"),
    "pleural_effusion": ("effusion", "costophrenic", "pleural fluid", "meniscus"),
    "nodule": ("nodul", "rounded opacity"),
    "consolidation": ("consolidation", "airspace"),
    "pneumothorax": ("pneumothorax", "pleural line", "absent lung markings"),
}
NEGATION = re.compile(r"\b(no|not|without)\b", re.IGNORECASE)


def _cases(n: int, size: int = 64, seed: int = 0, extra: float = 0.0) -> list[PhantomCase]:
    return [render_case(seed, i, size, extra_finding_prob=extra) for i in range(n)]


@pytest.fixture(scope="module")
def cases96() -> list[PhantomCase]:
    return _cases(72, size=96)


@pytest.fixture(scope="module")
def multi_cases() -> list[PhantomCase]:
    return _cases(60, size=64, seed=3, extra=1.0)


def _sentences(report: str) -> list[str]:
    body = report.replace("FINDINGS:", " ").replace("IMPRESSION:", " ")
    return [s.strip() for s in re.split(r"(?<=\.)\s+", body) if s.strip()]


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(cols.mean()), float(rows.mean())


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_gives_identical_case_and_other_seed_differs():
    first, again = render_case(7, 11), render_case(7, 11)
    assert first.image.dtype == np.uint8 and first.image.shape == (128, 128)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.report == again.report
    assert first.findings == again.findings and first.meta == again.meta
    assert all(np.array_equal(first.masks[k], again.masks[k]) for k in first.masks)
    other = render_case(8, 11)
    assert other.image.tobytes() != first.image.tobytes()
    assert render_case(7, 12).image.tobytes() != first.image.tobytes()


def test_case_does_not_depend_on_n_and_files_are_byte_identical(tmp_path):
    small = generate_phantom(tmp_path / "a", n=4, seed=5, size=48)
    large = generate_phantom(tmp_path / "b", n=9, seed=5, size=48)
    again = generate_phantom(tmp_path / "c", n=9, seed=5, size=48)
    for i in range(4):
        name = f"images/phantom_{i:05d}.png"
        assert (small.parent / name).read_bytes() == (large.parent / name).read_bytes()
    small_rows, large_rows = _read_manifest(small), _read_manifest(large)
    for row_small, row_large in zip(small_rows, large_rows[:4], strict=True):
        assert {k: v for k, v in row_small.items() if k != "split"} == \
               {k: v for k, v in row_large.items() if k != "split"}
    assert large.read_bytes() == again.read_bytes()
    description = "dataset.json"
    assert (large.parent / description).read_bytes() == (again.parent / description).read_bytes()
    rendered = render_case(5, 3, 48)
    stored = np.asarray(Image.open(large.parent / "images/phantom_00003.png"))
    assert np.array_equal(stored, rendered.image)


def test_a_cases_split_depends_on_n_and_the_help_says_so():
    """The pixels of case i do not depend on --n, its split does (all n cases are shuffled): two phantoms of one
    seed and different --n share patients across train and test. Kept (every documented phantom figure rests on
    these splits), and said in `medvl phantom --help`, the README and the generator's docstring."""
    from cli_helpers import invoke

    splits = generate_module.DEFAULT_SPLITS
    small, large = generate_module.assign_splits(100, 3, splits), generate_module.assign_splits(200, 3, splits)
    assert any(a == "train" and b == "test" for a, b in zip(small, large[:100], strict=True))
    result, output = invoke("phantom", "--help")
    help_text = " ".join(re.sub("[│╭╮╰╯─]", " ", output).split())  # the words, without rich's box
    assert result.exit_code == 0 and "its split does" in help_text and "train and score on one --n" in help_text
    assert "its split does" in " ".join((generate_phantom.__doc__ or "").split())


@pytest.mark.parametrize("index, size, positioning", [(32, 32, 0.0), (967, 32, 1.0), (753, 40, 1.0)])
def test_a_nodule_smaller_than_a_pixel_is_still_in_the_pixels(index, size, positioning):
    """These 3-4 mm nodules fall between pixel centres; the labels, mask and report keep them, so
    the film must differ from its twin without the nodule, at the mask's pixel."""
    from medvl.data.phantom.cxr2d import Visit

    case = render_case(11, index, size, positioning=positioning)
    twin = render_case(11, index, size, positioning=positioning, visit=Visit(number=0, absent=("nodule",)))
    assert case.finding == "nodule" and case.findings[0]["size_mm"] <= 4
    assert case.masks["nodule"].sum() == 1
    difference = np.abs(case.image.astype(int) - twin.image.astype(int))
    assert difference[case.masks["nodule"]].max() > 8
    assert np.array_equal(np.argwhere(difference == difference.max()), np.argwhere(case.masks["nodule"]))
    assert twin.finding == "no_finding"


def test_same_case_at_two_sizes_is_the_same_patient():
    for index in range(12):
        small, big = render_case(2, index, 64), render_case(2, index, 128)
        assert small.report == big.report and small.meta == big.meta
        assert [f["name"] for f in small.findings] == [f["name"] for f in big.findings]
        for f_small, f_big in zip(small.findings, big.findings, strict=True):
            if f_small["box"] is not None:
                assert np.allclose(np.array(f_big["box"]), 2 * np.array(f_small["box"]), atol=6)


# --- labels and ground truth ------------------------------------------------------------------


def test_every_class_appears_and_classes_are_balanced(cases96):
    counts = {name: sum(c.finding == name for c in cases96) for name in FINDINGS}
    assert counts == dict.fromkeys(FINDINGS, 12)  # one of each per block of six indices
    for case in cases96:
        assert len(case.findings) == 1
        assert (case.finding == "no_finding") == (not case.masks)
    subtle = sum(c.findings[0]["subtle"] for c in cases96 if c.finding != "no_finding")
    assert 0.05 <= subtle / 60 <= 0.4


def test_masks_lie_inside_boxes_and_boxes_inside_image(cases96):
    for case in cases96:
        for finding in case.findings:
            if finding["name"] == "no_finding":
                assert finding["box"] is None
                continue
            mask = case.masks[finding["name"]]
            x0, y0, x1, y1 = finding["box"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert mask.sum() > 0 and mask[y0:y1, x0:x1].sum() == mask.sum()
            # the box is tight: every edge row/column touches the mask
            assert mask[y0].any() and mask[y1 - 1].any()
            assert mask[:, x0].any() and mask[:, x1 - 1].any()


def test_findings_are_in_anatomically_right_places(cases96):
    size = 96
    for case in cases96:
        finding = case.findings[0]
        name, side = finding["name"], finding["side"]
        if name == "no_finding":
            continue
        mask = case.masks[name]
        cx, cy = _centroid(mask)
        lungs = case.anatomy["lungs"]
        if name in ("pleural_effusion", "pneumothorax", "nodule", "consolidation"):
            # radiological convention: the patient's left is on the image right
            assert (cx > size / 2) == (side == "left"), (name, side, cx)
        if name == "pleural_effusion":
            assert cy > 0.55 * size  # lower part of the chest
        if name == "pneumothorax":
            assert mask.nonzero()[0].min() < 0.35 * size  # reaches the apex
            assert (mask & ~lungs).sum() <= 0.02 * mask.sum()
        if name == "nodule":
            assert (mask & ~lungs).sum() == 0, "nodule must lie inside the lung field"
            assert finding["zone"].startswith(side) and 3 <= finding["size_mm"] <= 15
        if name == "consolidation":
            assert (mask & ~lungs).sum() == 0
        if name == "cardiomegaly":
            assert abs(cx - size / 2) < 0.2 * size and 0.4 * size < cy < 0.85 * size


def test_zones_follow_height_in_the_lung():
    heights = {"upper": [], "middle": [], "lower": []}
    for case in _cases(240, size=64, seed=11):
        for finding in case.findings:
            if finding["name"] in ("nodule", "consolidation"):
                lung_rows = np.nonzero(case.anatomy["lungs"].any(axis=1))[0]
                _, cy = _centroid(case.masks[finding["name"]])
                level = finding["zone"].split()[1]
                heights[level].append((cy - lung_rows[0]) / (lung_rows[-1] - lung_rows[0]))
    assert all(len(v) >= 5 for v in heights.values())
    assert max(heights["upper"]) < min(heights["lower"])
    assert np.mean(heights["upper"]) < np.mean(heights["middle"]) < np.mean(heights["lower"])


def test_cardiothoracic_ratio_separates_cardiomegaly():
    for case in _cases(120, size=64, seed=4):
        ratio, view = case.meta["ctr"], case.meta["view"]
        if case.finding == "cardiomegaly":
            assert ratio > 0.5
        elif view == "PA":
            assert 0.4 <= ratio <= 0.49
        else:  # AP magnifies the heart; documented, not labelled cardiomegaly
            assert ratio <= 0.53


def test_image_looks_like_a_chest_radiograph(cases96):
    for case in cases96:
        image = case.image.astype(float)
        lungs = case.anatomy["lungs"].copy()
        for mask in case.masks.values():
            lungs &= ~mask
        assert image[lungs].mean() + 50 < image[case.anatomy["heart"]].mean()  # dark lungs
        assert image[:4, :4].mean() < image[lungs].mean()  # air outside the patient is darkest
        assert case.image.std() > 30


def test_metadata_ranges(cases96):
    for case in cases96:
        assert 18 <= case.meta["age"] <= 90
        assert case.meta["sex"] in ("M", "F") and case.meta["view"] in ("PA", "AP")
    assert {c.meta["view"] for c in cases96} == {"PA", "AP"}


def test_extra_finding_adds_a_second_different_finding(multi_cases):
    doubles = [c for c in multi_cases if len(c.findings) == 2]
    assert len(doubles) == sum(c.finding != "no_finding" for c in multi_cases)
    for case in multi_cases:
        names = [f["name"] for f in case.findings]
        assert len(set(names)) == len(names)
        if case.finding == "no_finding":
            assert names == ["no_finding"]
        assert set(case.masks) == set(names) - {"no_finding"}
        sides = {f["name"]: f["side"] for f in case.findings}
        if "pleural_effusion" in sides and "pneumothorax" in sides:
            assert sides["pleural_effusion"] != sides["pneumothorax"]


# --- reports ------------------------------------------------------------------------------------


def _check_report(case: PhantomCase) -> None:
    report = case.report
    assert report.startswith("FINDINGS: ") and report.count(" IMPRESSION: ") == 1
    present = {f["name"]: f for f in case.findings if f["name"] != "no_finding"}
    sentences = _sentences(report)
    for name, words in KEYWORDS.items():
        about = [s for s in sentences if any(w in s.lower() for w in words)]
        affirmed = [s for s in about if not NEGATION.search(s)]
        if name in present:
            assert affirmed, (name, report)
            finding = present[name]
            if finding["side"]:
                assert any(finding["side"] in s.lower() for s in affirmed), report
            if finding["zone"]:
                assert any(finding["zone"] in s.lower() for s in affirmed), report
            if finding["size_mm"]:
                assert f"{finding['size_mm']:.0f} mm" in report
        else:
            assert not affirmed, (name, affirmed, report)


def test_reports_affirm_present_and_never_affirm_absent_findings(cases96, multi_cases):
    for case in cases96 + multi_cases:
        _check_report(case)


def test_reports_negate_absent_findings_explicitly(cases96):
    negations = ("no pleural effusion", "no pneumothorax", "no focal consolidation",
                 "no consolidation", "no pulmonary nodule", "no suspicious pulmonary nodules",
                 "no nodules", "no cardiomegaly", "not enlarged", "no pneumothorax or pleural",
                 "there is no pleural effusion", "there is no pneumothorax",
                 "no focal airspace consolidation")
    for case in cases96:
        assert any(phrase in case.report.lower() for phrase in negations), case.report
        if case.finding == "no_finding":
            impression = case.report.split("IMPRESSION:")[1].lower()
            assert any(w in impression for w in ("no acute", "normal", "no radiographic"))


def test_reports_vary_in_wording_and_order(cases96):
    normal = [c.report for c in cases96 if c.finding == "no_finding"]
    assert len(set(normal)) == len(normal)
    first_sentences = {_sentences(c.report)[0] for c in cases96}
    assert len(first_sentences) >= 8
    nodule_sentences = {s for c in cases96 if c.finding == "nodule"
                        for s in _sentences(c.report) if "nodul" in s.lower() and "mm" in s}
    assert len({re.sub(r"\d+|right|left|upper|middle|lower", "", s) for s in nodule_sentences}) >= 3


def test_caption_descriptions_use_report_vocabulary(cases96):
    assert all(t.count("{}") == 1 for t in PHANTOM_CAPTIONS["templates"])
    classes = PHANTOM_CAPTIONS["classes"]["finding"]
    assert set(classes) == set(FINDINGS)
    for name, descriptions in classes.items():
        assert len(descriptions) >= 3
        reports = " ".join(c.report.lower() for c in cases96 if c.finding == name)
        stripped = [re.sub(r"^(a|an) ", "", d) for d in descriptions]
        assert any(d in reports for d in stripped), name


# --- files --------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_generate_writes_manifest_images_masks_and_description(tmp_path):
    out = tmp_path / "phantom"
    manifest = generate_phantom(out, n=40, seed=1, size=48, extra_finding_prob=0.3)
    assert manifest == out / "manifest.csv"
    with manifest.open(newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == EXPECTED_COLUMNS
    assert list(MANIFEST_COLUMNS) == EXPECTED_COLUMNS
    rows = _read_manifest(manifest)
    assert len(rows) == 40
    assert [r["split"] for r in rows].count("train") == 28
    assert [r["split"] for r in rows].count("val") == 4
    assert [r["split"] for r in rows].count("test") == 8
    for i, row in enumerate(rows):
        case = render_case(1, i, 48, extra_finding_prob=0.3)
        assert row["image"] == f"images/phantom_{i:05d}.png"
        assert row["text"] == case.report and "," in row["text"] or "," not in case.report
        assert row["finding"] == case.finding
        image = np.asarray(Image.open(out / row["image"]))
        assert image.dtype == np.uint8 and image.shape == (48, 48)
        names = {f["name"] for f in case.findings}
        assert int(row["no_finding"]) == ("no_finding" in names)
        assert int(row["nodule"]) == ("nodule" in names)
        effusion_sides = {f["side"] for f in case.findings if f["name"] == "pleural_effusion"}
        assert int(row["effusion_left"]) == ("left" in effusion_sides)
        assert int(row["effusion_right"]) == ("right" in effusion_sides)
        assert (row["nodule_zone"] != "") == ("nodule" in names)
        assert row["pneumothorax_side"] in ("", "left", "right")
        boxes = json.loads(row["boxes"]) if row["boxes"] else {}
        assert set(boxes) == names - {"no_finding"}
        for name in boxes:
            mask = np.asarray(Image.open(out / "masks" / f"phantom_{i:05d}_{name}.png")) > 0
            assert np.array_equal(mask, case.masks[name])
    description = json.loads((out / "dataset.json").read_text())
    assert description["name"] == "phantom-cxr" and description["manifest"] == "manifest.csv"
    assert description["label_columns"] == ["finding"]
    assert description["captions"] == PHANTOM_CAPTIONS
    assert description["generator"] == {"seed": 1, "n": 40, "size": 48, "extra_finding_prob": 0.3}


def test_custom_splits_are_cut_by_fraction(tmp_path):
    manifest = generate_phantom(tmp_path / "p", n=10, seed=2, size=32,
                                splits={"fit": 0.5, "holdout": 0.5})
    splits = [r["split"] for r in _read_manifest(manifest)]
    assert sorted(splits) == ["fit"] * 5 + ["holdout"] * 5
    again = generate_phantom(tmp_path / "q", n=10, seed=2, size=32,
                             splits={"fit": 0.5, "holdout": 0.5})
    assert [r["split"] for r in _read_manifest(again)] == splits


def test_existing_non_empty_directory_is_refused_then_overwritten(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match=re.escape(str(out))):
        generate_phantom(out, n=2, size=32)
    assert (out / "keep.txt").exists()
    generate_phantom(out, n=2, size=32, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folders left


def test_overwriting_through_a_symbolic_link_replaces_its_folder_and_keeps_the_link(tmp_path):
    """``io.replace_dir`` on a link (``current -> v1``) replaces the folder it points to; the link stays a link and
    no renamed-away copy of it is left beside it."""
    version = tmp_path / "v1"
    generate_phantom(version, n=2, size=32, seed=1)
    (version / "keep.txt").write_text("x")
    link = tmp_path / "current"
    link.symlink_to("v1", target_is_directory=True)
    generate_phantom(link, n=3, size=32, seed=2, overwrite=True)
    assert link.is_symlink() and link.readlink().name == "v1"
    assert not (version / "keep.txt").exists()
    assert len((version / "manifest.csv").read_text().splitlines()) == 4  # the header and the 3 new cases
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1"]


def test_the_current_folder_is_filled_when_empty_and_never_replaced(tmp_path, monkeypatch):
    from cli_helpers import invoke

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result, output = invoke("phantom", ".", "--n", 2, "--size", 32)
    assert result.exit_code == 0, output
    assert sorted(p.name for p in here.iterdir()) == ["dataset.json", "images", "manifest.csv", "masks"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no temporary folders left beside it
    for target in (".", ".."):  # replacing it would delete the folder the command runs in
        result, output = invoke("phantom", target, "--n", 2, "--size", 32, "--overwrite")
        assert result.exit_code == 2 and "is or holds the current folder" in output, output
        assert "Traceback" not in output
    assert (here / "manifest.csv").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    real_render = generate_module.render_case

    def render_then_fail(seed, index, size, extra_finding_prob):
        if index == 2:
            raise RuntimeError("disk on fire")
        return real_render(seed, index, size, extra_finding_prob)

    monkeypatch.setattr(generate_module, "render_case", render_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate_phantom(tmp_path / "data", n=5, size=32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": -3},
        {"size": 16},
        {"size": 31},
        {"splits": {"train": 0.7, "test": 0.2}},
        {"splits": {"train": 1.2, "test": -0.2}},
        {"extra_finding_prob": 1.5},
        {"seed": -1},
    ],
)
def test_bad_parameters_raise_input_error(tmp_path, kwargs):
    with pytest.raises(InputError):
        generate_phantom(tmp_path / "out", **{"n": 3, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_render_case_rejects_bad_arguments():
    with pytest.raises(InputError, match="size"):
        render_case(0, 0, size=20)
    with pytest.raises(InputError):
        render_case(0, -1)
    with pytest.raises(InputError):
        render_case(0, 0, extra_finding_prob=-0.1)


# --- learnability -------------------------------------------------------------------------------


def test_localised_findings_stand_out_from_nearby_lung():
    """Even subtle findings differ from the lung around them by several grey levels at 64 px."""
    from scipy import ndimage

    for case in _cases(120, size=64, seed=9):
        finding = case.findings[0]
        if finding["name"] in ("no_finding", "cardiomegaly"):
            continue
        image, mask = case.image.astype(float), case.masks[finding["name"]]
        if finding["name"] == "pneumothorax":  # darker than the same place in the other lung
            mirror = mask[:, ::-1] & case.anatomy["lungs"]
            contrast = image[mirror].mean() - image[mask].mean()
        else:  # denser than the lung just around it
            ring = ndimage.binary_dilation(mask, iterations=3) & ~mask & case.anatomy["lungs"]
            contrast = image[mask].mean() - image[ring].mean()
        assert contrast > 8, (finding, contrast)


def test_classes_are_learnable_from_pixels_but_not_from_mean_intensity():
    """A linear model on 32x32 pixels beats chance (1/6) clearly; mean intensity alone does not.

    Nodules are too small for a linear model at 32 px; a small CNN at 64 px separates all six
    classes (about 0.9 balanced accuracy with 2,400 training images).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    cases = _cases(600, size=64, seed=0)
    pixels = np.stack([c.image.reshape(32, 2, 32, 2).mean(axis=(1, 3)).ravel() for c in cases])
    pixels /= 255.0
    labels = np.array([FINDINGS.index(c.finding) for c in cases])
    folds = StratifiedKFold(4, shuffle=True, random_state=0)
    with threadpool_limits(1):  # threaded BLAS is slower than one thread on these small fits
        linear = make_pipeline(StandardScaler(), LogisticRegression(C=0.03, max_iter=300, tol=1e-3))
        predicted = cross_val_predict(linear, pixels, labels, cv=folds)
        mean = pixels.mean(axis=1, keepdims=True)
        from_mean = cross_val_predict(LogisticRegression(max_iter=500), mean, labels, cv=folds)
    pixel_score = balanced_accuracy_score(labels, predicted)
    mean_score = balanced_accuracy_score(labels, from_mean)
    assert pixel_score > 0.5, pixel_score
    assert mean_score < 0.3 and mean_score < pixel_score - 0.2, (mean_score, pixel_score)
    recall = {name: np.mean(predicted[labels == i] == i) for i, name in enumerate(FINDINGS)}
    assert recall["cardiomegaly"] > 0.8, recall
    for name in ("pleural_effusion", "consolidation", "pneumothorax"):
        assert recall[name] > 0.4, recall


@pytest.mark.parametrize(("splits", "message"), [
    ({"train": float("nan")}, "split fractions must be finite numbers >= 0"),
    ({"train": float("inf"), "test": 0.0}, "split fractions must be finite numbers >= 0"),
    ({"train": 0.9, "all": 0.1}, "split name 'all' is reserved for every record"),
    ({"train": 0.5, "": 0.5}, "split name '' must be a non-empty string"),
    ({" train ": 0.5, "train": 0.5}, "split name ' train ' must be a non-empty string without surrounding spaces"),
])
def test_split_fractions_and_names_the_loader_would_refuse_are_refused_before_writing(tmp_path, splits, message):
    """A NaN fraction passed both checks (a numpy traceback followed), and split names the manifest loader refuses
    ('all' beside others, empty) or merges (' train ' and 'train') were written into an unloadable manifest."""
    from medvl.data import load_dataset

    with pytest.raises(InputError, match=re.escape(message)):
        generate_phantom(tmp_path / "out", n=20, size=32, splits=splits)
    assert not (tmp_path / "out").exists()
    generate_phantom(tmp_path / "every", n=4, size=32, splits={"all": 1.0})  # 'all' alone: one split, as loaded
    assert load_dataset(tmp_path / "every").splits == ["all"]
