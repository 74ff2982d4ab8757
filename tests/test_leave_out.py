"""Pretraining never sees a VQA benchmark's images: ``leave_out_images`` and ``medvl train
--leave-out-images-of`` (MedPix 2.0 and VQA-RAD share source images, named by MedPix synpic id)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cli_helpers import invoke
from medvl import DataError, load_dataset
from medvl.data.loaders.vqa import leave_out_images, question_image_ids, source_image_id


def test_source_image_ids():
    assert source_image_id("MPX1307_synpic20064.jpg") == source_image_id("images/synpic20064.png") == "synpic20064"
    assert source_image_id("SYNPIC7.jpg") == "synpic7"
    assert source_image_id("/data/phantom_00012.png") == "phantom_00012"
    assert source_image_id("study.nii.gz") == "study"
    assert source_image_id("xmlab3/source.jpg") == source_image_id("imgs/xmlab3/source.jpg") == "xmlab3/source"
    assert source_image_id("images/phantom_00012.png") == "phantom_00012"


def test_slake_images_are_told_apart_by_their_folder(tmp_path):
    """Every SLAKE image is ``imgs/xmlabN/source.jpg``: a question about one of them leaves out that image only."""
    for number in (1, 2, 3):
        (tmp_path / "slake" / "imgs" / f"xmlab{number}").mkdir(parents=True)
        Image.new("L", (8, 8), 40 * number).save(tmp_path / "slake" / "imgs" / f"xmlab{number}" / "source.jpg")
    questions = tmp_path / "slake" / "test.json"
    questions.write_text(json.dumps([{"qid": 1, "img_name": "xmlab3/source.jpg", "question": "Is this a CT?",
                                      "answer": "Yes"}]))
    (tmp_path / "slake" / "pretrain.csv").write_text("image,text,split\n" + "".join(
        f"imgs/xmlab{number}/source.jpg,image {number},train\n" for number in (1, 2, 3)))
    data = load_dataset(tmp_path / "slake" / "pretrain.csv")
    assert question_image_ids(questions) == {"xmlab3/source"}
    kept, left_out = leave_out_images(data, [questions])
    assert left_out == 1 and [r.id for r in kept] == ["imgs/xmlab1/source", "imgs/xmlab2/source"]
    assert load_dataset(questions)[0].meta["image_name"] == "xmlab3/source.jpg"  # the name as the file writes it


def test_dots_inside_a_file_name_are_part_of_its_id(phantom_dir: Path, tmp_path):
    """DICOM exports name images by UID (``1.2.840.113619.2.55.1000.png``): a question about one of them leaves
    out that image only, not every image whose name shares the UID's first component."""
    assert source_image_id("images/1.2.840.113619.2.55.1000.png") == "1.2.840.113619.2.55.1000"
    assert source_image_id("case.1.png") != source_image_id("case.2.png")
    assert source_image_id("1.2.840.5") == "1.2.840.5"  # a DICOM file without a suffix: the whole name
    sources = load_dataset(phantom_dir).select("train").records[:6]
    (tmp_path / "uid" / "images").mkdir(parents=True)
    lines = ["image,text,split"]
    for number, record in enumerate(sources):
        name = f"images/1.2.840.113619.2.55.{1000 + number}.png"
        shutil.copy(record.image, tmp_path / "uid" / name)
        lines.append(f"{name},image {number},train")
    (tmp_path / "uid" / "manifest.csv").write_text("\n".join(lines) + "\n")
    questions = _questions(tmp_path / "uid" / "testset.json", ["1.2.840.113619.2.55.1003.png"])
    kept, left_out = leave_out_images(load_dataset(tmp_path / "uid"), [questions])
    assert left_out == 1
    assert [r.id for r in kept] == [f"images/1.2.840.113619.2.55.{1000 + number}" for number in (0, 1, 2, 4, 5)]


def _questions(path: Path, names: list[str]) -> Path:
    path.write_text(json.dumps([{"qid": i, "image_name": name, "question": "Is there a lesion?", "answer": "yes"}
                                for i, name in enumerate(names)]))
    return path


def test_the_real_overlap_of_medpix_and_vqa_rad(shared_data):
    """VQA-RAD's training questions ask about 18 MedPix 2.0 images (17 train, 1 dev); none may stay."""
    questions = shared_data / "vqa-rad" / "trainset.json"
    asked = question_image_ids(questions)  # from the JSON alone
    assert len(asked) == 314 and all(name.startswith("synpic") for name in asked)
    medpix = load_dataset(shared_data / "medpix-2.0")
    for split, expected in (("train", 17), ("dev", 1)):
        data = medpix.select(split)
        kept, left_out = leave_out_images(data, [questions])
        assert left_out == expected and len(kept) == len(data) - expected
        assert not {source_image_id(r.image) for r in kept} & asked
        assert {r.id for r in data} - {r.id for r in kept} == {r.id for r in data if source_image_id(r.image) in asked}


def test_train_leaves_the_asked_images_out(phantom_dir: Path, tmp_path):
    data = load_dataset(phantom_dir).select("train")
    asked = [Path(str(r.image)).name for r in data.records[:3]]
    questions = _questions(tmp_path / "testset.json", asked)  # the images need not exist next to it
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--max-steps", 1, "--batch-size", 8, "--leave-out-images-of", questions, "-q")
    assert result.exit_code == 0, output
    assert f"on {len(data) - 3} records" in output
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert config["train"]["leave_out_images_of"] == [str(questions)]


def test_a_bad_question_file_is_a_clear_error(phantom_dir: Path, tmp_path):
    data = load_dataset(phantom_dir)
    with pytest.raises(DataError, match="not found"):
        leave_out_images(data, [tmp_path / "missing.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no VQA question file"):
        leave_out_images(data, [tmp_path / "empty"])
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q", "answer": "a"}]')
    result, output = invoke("train", "--data", phantom_dir, "--model", "phantom-tiny", "--out", tmp_path / "run",
                            "--max-steps", 1, "--leave-out-images-of", bad, "-q")
    assert result.exit_code == 2 and "bad.json" in output and "image" in output


def test_copies_of_the_asked_images_under_other_names_are_left_out_by_their_pixels(tmp_path, caplog):
    """``medvl phantom --vqa`` names each film ``vqa/images/phantom_<patient>_<hash>.png``, a copy of the manifest's
    ``images/phantom_<patient>.png``: matched by name only, nothing was left out, with an INFO line at most."""
    import numpy as np

    from medvl.data.loaders.vqa import load_vqa
    from medvl.data.phantom import generate_phantom

    folder = tmp_path / "ph"
    generate_phantom(folder, n=24, seed=3, size=32, vqa=True)
    data = load_dataset(folder)
    questions = folder / "vqa" / "test.json"
    films = {np.asarray(Image.open(image)).tobytes() for item in load_vqa(questions) for image in item.images}
    copies = {r.id for r in data if np.asarray(Image.open(r.image)).tobytes() in films}
    assert copies and not {source_image_id(r.image) for r in data} & question_image_ids(questions)  # names differ
    with caplog.at_level("WARNING"):
        kept, left_out = leave_out_images(data, [questions])
    assert left_out == len(copies) and not {r.id for r in kept} & copies
    assert "none of the" not in caplog.text
    (tmp_path / "other").mkdir()
    elsewhere = _questions(tmp_path / "other" / "testset.json", ["unrelated.png"])
    Image.new("L", (32, 32), 7).save(tmp_path / "other" / "unrelated.png")
    with caplog.at_level("WARNING"):
        kept, left_out = leave_out_images(data, [elsewhere])
    assert left_out == 0 and len(kept) == len(data)
    assert f"none of the 1 images {elsewhere} asks about were found in the training data" in caplog.text


def test_an_rgb_or_rgba_export_of_a_grey_training_image_is_left_out_by_its_pixels(shared_data, tmp_path):
    """A question's film saved as RGB (or RGBA) of three equal channels, as PACS exports and viewers write a grey
    X-ray, was compared as its three channels, so the grey training image it copies stayed in the pretraining set
    (and no warning was given: another film of the file was found). Pixels are compared as a model reads their
    channels (``pixel_sha256``)."""
    (tmp_path / "train").mkdir()
    (tmp_path / "vqa").mkdir()
    sources = sorted((shared_data / "medpix-2.0" / "images").glob("*.jpg"))[:4]
    for number, source in enumerate(sources):
        Image.open(source).convert("L").resize((48, 48)).save(tmp_path / "train" / f"case{number}.png")
    Image.open(tmp_path / "train" / "case0.png").convert("RGB").save(tmp_path / "vqa" / "film_a.png")
    Image.open(tmp_path / "train" / "case1.png").convert("RGBA").save(tmp_path / "vqa" / "film_b.png")
    shutil.copy(tmp_path / "train" / "case2.png", tmp_path / "vqa" / "film_c.png")  # a grey copy, as before
    (tmp_path / "train" / "manifest.csv").write_text(
        "image,text\n" + "".join(f"case{number}.png,a scan\n" for number in range(4)))
    questions = _questions(tmp_path / "vqa" / "testset.json", ["film_a.png", "film_b.png", "film_c.png"])
    kept, left_out = leave_out_images(load_dataset(tmp_path / "train" / "manifest.csv"), [questions])
    assert left_out == 3 and [r.id for r in kept] == ["case3"]
