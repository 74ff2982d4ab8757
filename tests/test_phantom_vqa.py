"""Phantom VQA: exact answers, balance, a question-only baseline at chance, patient splits, loading."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cli_helpers import invoke
from medvl.data.loaders import load_dataset, load_vqa
from medvl.data.phantom import Visit, generate_phantom, render_case
from medvl.data.phantom.vqa import QUESTION_TYPES
from medvl.errors import DataError, InputError

SEED, SIZE, N = 4, 40, 180
EXTENT_SIZE = 64  # films compared for progression are re-rendered larger: areas of a few pixels are too coarse
SIDE_FINDINGS = {"pleural_effusion", "pneumothorax", "nodule", "consolidation"}
NOUN_TO_FINDING = {"cardiomegaly": "cardiomegaly", "pleural effusion": "pleural_effusion", "nodule": "nodule",
                   "consolidation": "consolidation", "pneumothorax": "pneumothorax"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vqa") / "phantom"
    generate_phantom(folder, n=N, seed=SEED, size=SIZE, vqa=True, vqa_per_case=6)
    return folder


@pytest.fixture(scope="module")
def multi_phantom(tmp_path_factory) -> Path:
    """Two findings per abnormal case: two lateral findings, growth and removal of one of two."""
    folder = tmp_path_factory.mktemp("vqa") / "multi"
    generate_phantom(folder, n=90, seed=6, size=32, extra_finding_prob=1.0, vqa=True, vqa_per_case=5)
    return folder


def _items(folder: Path) -> dict[str, list[dict]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((folder / "vqa").glob("*.json"))}


def _manifest(folder: Path) -> dict[int, dict]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return {int(row["image"][-9:-4]): row for row in csv.DictReader(handle)}


def _films(folder: Path) -> dict[str, dict]:
    with (folder / "vqa" / "images.csv").open(newline="") as handle:
        return {row["image"]: row for row in csv.DictReader(handle)}


def _images(item: dict) -> list[str]:
    return item.get("image_names", [item["image_name"]])


def _visit(row: dict) -> Visit | None:
    if row["visit"] == "":
        return None
    return Visit(number=int(row["visit"]), grow=float(row["grow"]), absent=tuple(row["absent"].split()),
                 nodules=int(row["nodules"]), growing=tuple(row["growing"].split()))


@cache
def _truth(folder: Path, index: int, visit: Visit | None, size: int | None = None):
    """A film's ground truth, re-rendered with the phantom's own generator settings (``size`` to override)."""
    generator = json.loads((folder / "dataset.json").read_text())["generator"]
    return render_case(generator["seed"], index, size or generator["size"], generator["extra_finding_prob"], visit)


def _subject(item: dict) -> str:
    """The finding a question is about, read back from its text."""
    text = item["question"].lower()
    if item["question_type"] in ("count", "size"):
        return "nodule"
    if item["question_type"] == "ratio":
        return "cardiomegaly"
    return next(finding for noun, finding in NOUN_TO_FINDING.items() if noun in text)


# ---------------------------------------------------------------- answers from the ground truth


def _side_from_manifest(row: dict, finding: str) -> str:
    if finding == "pleural_effusion":
        return "left" if row["effusion_left"] == "1" else "right"
    if finding == "pneumothorax":
        return row["pneumothorax_side"]
    return row[f"{finding}_zone"].split()[0]


def _present(row: dict, finding: str) -> bool:
    if finding == "pleural_effusion":
        return "1" in (row["effusion_left"], row["effusion_right"])
    return row[finding] == "1"


def _nodule_count(folder: Path, index: int, row: dict) -> int:
    """Connected nodule blobs in the written mask (0 without a nodule)."""
    if row["nodule"] != "1":
        return 0
    mask = np.asarray(Image.open(folder / "masks" / f"phantom_{index:05d}_nodule.png")) > 0
    return ndimage.label(mask)[1]


def _single_answer(folder: Path, item: dict, row: dict, index: int) -> str:
    finding, qtype = _subject(item), item["question_type"]
    if qtype == "presence":
        return "yes" if _present(row, finding) else "no"
    if qtype == "location" and "zone" in item["template"]:
        return row[f"{finding}_zone"].split()[1]
    if qtype == "location":
        return _side_from_manifest(row, finding)
    if qtype == "count":
        return str(_nodule_count(folder, index, row))
    if qtype == "size":
        return _diameter(_truth(folder, index, None))
    ctr = _truth(folder, index, None).meta["ctr"]
    return "<0.45" if ctr < 0.45 else ("0.45-0.50" if ctr <= 0.5 else ">0.50")


def _diameter(case) -> str:
    size_mm = next(f["size_mm"] for f in case.findings if f["name"] == "nodule")
    return "<6 mm" if size_mm < 6 else ("6-8 mm" if size_mm <= 8 else ">8 mm")


def _extent(case, finding: str) -> float:
    """How much of a finding a film shows: CTR, nodule diameter (mm), else its share of the lung fields."""
    if finding == "cardiomegaly":
        return case.meta["ctr"]
    if finding == "nodule":
        return max(f["size_mm"] for f in case.findings if f["name"] == "nodule")
    return case.masks[finding].sum() / case.anatomy["lungs"].sum()


def _change(earlier, later, finding: str) -> str:
    ratio = _extent(later, finding) / _extent(earlier, finding)
    return "progressed" if ratio > 1.1 else "improved" if ratio < 1 / 1.1 else "stable"


def _on_first_grid(visit: Visit | None) -> Visit | None:
    """The film's findings drawn with the case's own pose (one pixel grid, so areas compare exactly)."""
    return None if visit is None else replace(visit, number=0)


def _answer_from_truth(folder: Path, item: dict, manifest: dict, films: dict) -> str:
    rows = [films[name] for name in _images(item)]
    index = int(rows[0]["case_index"])
    if item["question_type"] == "count" and rows[0]["visit"] != "":
        mask = _truth(folder, index, _visit(rows[0])).masks["nodule"]
        return str(ndimage.label(mask)[1])
    if item["question_type"] == "size" and rows[0]["visit"] != "":
        return _diameter(_truth(folder, index, _visit(rows[0])))
    if len(rows) == 1:
        return _single_answer(folder, item, manifest[index], index)
    finding = _subject(item)
    if item["question_type"] == "progression":
        cases = [_truth(folder, index, _on_first_grid(_visit(row)), EXTENT_SIZE) for row in rows]
    else:
        cases = [_truth(folder, index, _visit(row)) for row in rows]
    if item["question_type"] == "which_image":
        shows = [finding in {f["name"] for f in case.findings} for case in cases]
        assert sum(shows) == 1
        return ("first", "second")[shows.index(True)]
    return _change(cases[0], cases[1], finding)


@pytest.mark.parametrize("which", ["phantom", "multi_phantom"])
def test_answers_are_exact_against_the_ground_truth(which, request):
    phantom = request.getfixturevalue(which)
    manifest, films = _manifest(phantom), _films(phantom)
    checked = Counter()
    for items in _items(phantom).values():
        for item in items:
            assert item["answer"] == _answer_from_truth(phantom, item, manifest, films), item
            assert item["answer"] in item["options"]
            checked[item["question_type"]] += 1
    assert set(checked) == set(QUESTION_TYPES)


def test_stable_pairs_show_the_same_finding_and_films_are_the_patients(phantom):
    films = _films(phantom)
    for items in _items(phantom).values():
        for item in (i for i in items if i["answer"] == "stable"):
            first, second = (_truth(phantom, int(films[n]["case_index"]), _visit(films[n])) for n in _images(item))
            assert [f["size_mm"] for f in first.findings] == [f["size_mm"] for f in second.findings]
            assert first.meta["ctr"] == second.meta["ctr"]
    for name, row in list(films.items())[:: max(1, len(films) // 25)]:
        written = np.asarray(Image.open(phantom / "vqa" / name))
        assert np.array_equal(written, _truth(phantom, int(row["case_index"]), _visit(row)).image)


# ---------------------------------------------------------------- balance and the question-only baseline


def test_answers_are_balanced_per_type_subject_and_template(phantom):
    items = _items(phantom)
    assert sum(len(split) for split in items.values()) >= 300
    for split_items in items.values():
        by_type, by_template = defaultdict(Counter), defaultdict(Counter)
        for item in split_items:
            by_type[item["question_type"]][item["answer"]] += 1
            by_template[(item["template"], _subject(item))][item["answer"]] += 1
        for counts in (*by_type.values(), *by_template.values()):
            assert max(counts.values()) == min(counts.values()), counts
        for (template, _), counts in by_template.items():
            options = next(i["options"] for i in split_items if i["template"] == template)
            assert set(counts) == set(options)
    assert set(Counter(item["question_type"] for item in items["train"])) == set(QUESTION_TYPES)


def _baseline(train: list[dict], test: list[dict], key) -> dict[str, tuple[float, float]]:
    """Majority answer per key learned on train; (accuracy, chance) per question type on test."""
    votes = defaultdict(Counter)
    for item in train:
        votes[key(item)][item["answer"]] += 1
    results = defaultdict(list)
    for item in test:
        counts = votes.get(key(item), Counter())
        guess = max(sorted(counts), key=counts.get) if counts else item["options"][0]
        results[item["question_type"]].append((guess == item["answer"], 1 / len(item["options"])))
    return {qtype: (float(np.mean([hit for hit, _ in pairs])), float(np.mean([c for _, c in pairs])))
            for qtype, pairs in results.items()}


@pytest.mark.parametrize("key", [lambda item: item["template"], lambda item: item["question"]],
                         ids=["template", "question-text"])
def test_question_only_baseline_is_at_chance(phantom, key):
    items = _items(phantom)
    scores = _baseline(items["train"], items["test"], key)
    for qtype, (accuracy, chance) in scores.items():
        assert abs(accuracy - chance) <= 0.05, (qtype, accuracy, chance)


# ---------------------------------------------------------------- splits, images and loading


def test_patients_never_cross_splits(phantom):
    manifest, films = _manifest(phantom), _films(phantom)
    patients = {split: {item["patient"] for item in items} for split, items in _items(phantom).items()}
    splits = list(patients)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not patients[a] & patients[b]
    for split, items in _items(phantom).items():
        for item in items:
            for name in _images(item):
                index = int(films[name]["case_index"])
                assert manifest[index]["split"] == films[name]["split"] == split
                assert f"phantom_{index:05d}" == item["patient"]


def test_two_image_questions_name_two_films_of_one_patient(phantom):
    two = [item for items in _items(phantom).values() for item in items if "image_names" in item]
    assert two and all(item["question_type"] in ("progression", "which_image") for item in two)
    for item in two:
        names = item["image_names"]
        assert len(names) == 2 and names[0] != names[1] and item["image_name"] == names[0]
        assert all((phantom / "vqa" / name).is_file() for name in names)
        assert {name.split("/")[-1][:13] for name in names} == {item["patient"]}


def test_film_names_say_whose_film_but_not_which(phantom):
    """A name must not give an answer away: the case's own film (the only one asked a count of 0-1 nodules) was
    ``phantom_00012.png`` and films with nodules added (counts 2-3) ``phantom_00012_1.png``."""
    films = _films(phantom)
    named = re.compile(r"images/phantom_(\d{5})_[0-9a-f]{8,}\.png")
    for name, row in films.items():
        match = named.fullmatch(name)
        assert match and int(match.group(1)) == int(row["case_index"]), name
    assert {row["visit"] == "" for row in films.values()} == {True, False}  # case films and other films alike
    counted = [item for items in _items(phantom).values() for item in items if item["question_type"] == "count"]
    assert {item["answer"] for item in counted} == {"0", "1", "2", "3"}
    assert all(named.fullmatch(item["image_name"]) for item in counted)


def test_loaders_read_the_question_files(phantom):
    items = _items(phantom)
    loaded = load_vqa(phantom / "vqa")
    assert len(loaded) == sum(len(split) for split in items.values())
    assert {item.split for item in loaded} == set(items)
    two = [item for item in loaded if len(item.images) == 2]
    assert two and all(item.image == item.images[0] and item.images[1].is_file() for item in two)
    test = load_dataset(phantom / "vqa" / "test.json")
    assert len(test) == len(items["test"]) and set(test.splits) == {"test"}
    record = next(r for r in test if "image_names" in r.meta)
    assert len(record.images) == 2 and record.labels["answer_type"] in ("CLOSED", "OPEN")
    assert {r.labels["answer_type"] for r in test} == {"CLOSED", "OPEN"}
    assert len(load_dataset(phantom)) == N  # the phantom folder itself is still the image data set


def test_bad_image_names_are_refused(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    base = {"qid": 1, "question": "Which?", "answer": "first"}
    (tmp_path / "bad.json").write_text(json.dumps([{**base, "image_names": "a.png"}]))
    with pytest.raises(DataError, match="image_names"):
        load_vqa(tmp_path / "bad.json")
    (tmp_path / "out.json").write_text(json.dumps([{**base, "image_names": ["a.png", "../../x.png"]}]))
    with pytest.raises(DataError, match="1 of 1 questions name a file outside"):
        load_vqa(tmp_path / "out.json")
    (tmp_path / "gone.json").write_text(json.dumps([{**base, "image_names": ["a.png", "b.png"]}]))
    with pytest.raises(DataError, match="b.png"):
        load_vqa(tmp_path / "gone.json")


# ---------------------------------------------------------------- determinism, visits and arguments


def test_same_seed_same_files_other_seed_differs(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        generate_phantom(tmp_path / name, n=48, seed=seed, size=32, vqa=True, vqa_per_case=3)

    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted((folder / "vqa").rglob("*")) if p.is_file()}

    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_visits_keep_the_patient_and_change_only_what_they_say():
    nodule_case = next(i for i in range(12) if render_case(0, i, 48).finding == "nodule")
    case = render_case(0, nodule_case, 48)
    assert np.array_equal(render_case(0, nodule_case, 48, visit=Visit(number=0)).image, case.image)
    later = render_case(0, nodule_case, 48, visit=Visit(number=1))
    assert later.findings[0]["zone"] == case.findings[0]["zone"] and not np.array_equal(later.image, case.image)
    for count in (2, 3, 4):
        more = render_case(0, nodule_case, 48, visit=Visit(number=0, nodules=count))
        assert ndimage.label(more.masks["nodule"])[1] == count
        assert len({f["zone"] for f in more.findings}) == count
    gone = render_case(0, nodule_case, 48, visit=Visit(absent=("nodule",)))
    assert gone.finding == "no_finding" and not gone.masks


@pytest.mark.parametrize("visit", [Visit(grow=3.0), Visit(nodules=5), Visit(number=-1), Visit(absent=("edema",)),
                                   Visit(nodules=2, absent=("nodule",))])
def test_bad_visits_raise_input_error(visit):
    with pytest.raises(InputError):
        render_case(0, 0, 48, visit=visit)


def test_cli_writes_questions_and_bad_arguments_exit_2(tmp_path):
    result, output = invoke("phantom", tmp_path / "ok", "--n", 30, "--size", 32, "--vqa", "--vqa-per-case", 2, "-q")
    assert result.exit_code == 0, output
    assert (tmp_path / "ok" / "vqa" / "train.json").is_file()
    for args in (("--vqa-per-case", 0), ("--vqa-per-case", 1000), ("--kind", "ct3d"), ("--n", 0)):
        result, output = invoke("phantom", tmp_path / "bad", "--size", 32, "--vqa", *args, "-q")
        assert result.exit_code == 2, (args, output)
        assert not (tmp_path / "bad").exists()
    assert "--vqa-per-case" in invoke("phantom", "--help")[1]


def test_questions_per_case_without_vqa_is_refused(tmp_path):
    """--vqa-per-case sets the questions --vqa writes: given alone it would be dropped without a word."""
    result, output = invoke("phantom", tmp_path / "a", "--n", 20, "--size", 32, "--vqa-per-case", 3, "-q")
    assert result.exit_code == 2, output
    assert "--vqa-per-case applies to the questions --vqa writes; add --vqa" in " ".join(output.split())
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
