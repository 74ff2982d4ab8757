"""Image reading and dataset loaders, on the shared real data and on small files written here."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_helpers import invoke
from hostile_files import npz_bomb
from medvl.data.captions import CaptionConfig, binary_finding
from medvl.data.images import read_image, read_image_bytes
from medvl.data.loaders import load_dataset, load_npz
from medvl.data.record import ALL_SPLITS
from medvl.errors import DataError, InputError

# ---------------------------------------------------------------- shared real data


def test_isic_folder_loads(shared_data):
    dataset = load_dataset(shared_data / "isic-dermoscopy")
    assert len(dataset) == 400
    assert dataset.splits == [ALL_SPLITS]
    assert {"diagnosis", "benign_malignant", "age_approx", "sex"} <= set(dataset.label_names)
    assert dataset.default_labels == [] and dataset.captions is None
    first = dataset[0]
    assert first.id == "ISIC_0000001"
    assert first.labels["diagnosis"] == "nevus" and first.meta["sex"] == "female"
    image = read_image(first.image)
    assert image.shape == (250, 250, 3) and image.dtype == np.uint8


def test_isic_select_diagnosis_skips_empty(shared_data):
    dataset = load_dataset(shared_data / "isic-dermoscopy", label_columns=["diagnosis"])
    assert dataset.label_names == ["diagnosis"]
    assert len(dataset) == 398  # two rows have an empty diagnosis
    assert dataset.classes("diagnosis") == ["melanoma", "nevus"]
    assert dataset.default_labels == ["diagnosis"]


def test_unknown_label_column_names_file_and_columns(shared_data):
    with pytest.raises(InputError, match="metadata.csv.*'nosuch'.*diagnosis"):
        load_dataset(shared_data / "isic-dermoscopy", label_columns=["nosuch"])


def test_figure1_loads_with_notes_as_text(shared_data, caplog):
    with caplog.at_level("INFO", logger="medvl.data.loaders.manifest"):
        dataset = load_dataset(shared_data / "figure1-covid-cxr")
    assert len(dataset) == 55
    # the 'N/A' note is counted with the empty notes, as the log says (it counted the empty ones only)
    assert sum(record.text is None for record in dataset) == 7
    assert ("metadata.csv: 7 of 55 records have no text (6 an empty 'notes' cell, 1 a note saying there is none: "
            "'N/A')") in caplog.text
    assert "finding" in dataset.label_names and "notes" not in dataset.label_names
    by_id = {record.id: record for record in dataset}
    assert by_id["COVID-00015a"].image.name == "COVID-00015a.png"
    assert "38\N{DEGREE SIGN}" in by_id["COVID-00007"].text  # a Windows-1252 byte in the notes
    assert load_dataset(shared_data / "figure1-covid-cxr", ["finding"]).classes("finding") == [
        "COVID-19", "No finding", "Pneumonia"]


def test_figure1_films_of_one_patient_share_its_patient_id(shared_data):
    """The table names a patient's films COVID-00039a, b, c: their records share meta patient_id (the key the grouping
    rules read), so folds, bootstrap draws and the same-case rules can keep them together."""
    dataset = load_dataset(shared_data / "figure1-covid-cxr")
    films: dict[str, list[str]] = {}
    for record in dataset:
        films.setdefault(record.meta["patient_id"], []).append(record.id)
    assert len(films) == 48  # 55 films of 48 patients
    assert {patient: ids for patient, ids in films.items() if len(ids) > 1} == {
        "COVID-00003": ["COVID-00003a", "COVID-00003b"], "COVID-00013": ["COVID-00013a", "COVID-00013b"],
        "COVID-00015": ["COVID-00015a", "COVID-00015b"],
        "COVID-00039": ["COVID-00039a", "COVID-00039b", "COVID-00039c"],
        "COVID-00040": ["COVID-00040a", "COVID-00040b"], "COVID-00043": ["COVID-00043a", "COVID-00043b"]}
    assert films["COVID-00001"] == ["COVID-00001"]
    assert "patient_id" not in dataset.label_names  # a grouping key, not a label candidate


def test_pneumoniamnist_splits_and_labels(shared_data):
    path = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    dataset = load_dataset(path)
    assert len(dataset.select("train")) == 3882 and len(dataset.select("val")) == 524
    assert dataset.label_names == ["label"] and dataset.classes("label") == ["0", "1"]
    first, second = dataset[0], dataset[1]
    assert first.id == "train_0" and first.image.shape == (28, 28)
    assert np.shares_memory(first.image, second.image.base)  # views of one array, no copies
    with pytest.raises(InputError, match=r"pneumoniamnist\.npz.*'test'.*train, val"):
        dataset.select("test")


def test_medpix_splits_labels_and_reports(shared_data):
    dataset = load_dataset(shared_data / "medpix-2.0")
    assert len(dataset.select("train")) == 1653 and len(dataset.select("dev")) == 197
    assert dataset.label_names == ["modality", "plane", "location_category", "location"]
    assert dataset.classes("modality") == ["CT", "MR"]
    assert {"Axial", "Coronal", "Sagittal"} <= set(dataset.classes("plane"))
    assert "NOS - Not specified" not in dataset.classes("plane")
    record = dataset[0]
    assert record.text and record.image.suffix == ".jpg" and record.image.exists()
    assert record.meta["case_id"] == record.id.split("_")[0]
    assert "History:" in record.meta["case_report"] and record.meta["case_diagnosis"]


def test_medpix_location_left_blank_and_an_address_are_missing(shared_data):
    """The form's 'Left Blank' (one dev image) and the NLM's address 'Bethesda, MD' (two train images) are no
    location classes: a train -> dev probe on location found 'Left Blank' unknown to training."""
    dataset = load_dataset(shared_data / "medpix-2.0", ["location"])
    train, dev = dataset.select("train"), dataset.select("dev")
    assert (len(train), len(dev)) == (1651, 196)  # of 1,653 and 197
    assert len(train.classes("location")) == 20 and len(dev.classes("location")) == 12
    assert set(dev.classes("location")) <= set(train.classes("location"))
    assert not {"Left Blank", "Bethesda, MD"} & set(dataset.classes("location"))
    unlabelled = {r.id: r for r in load_dataset(shared_data / "medpix-2.0") if "location" not in r.labels}
    assert sorted(unlabelled) == ["MPX1325_synpic22299", "MPX2075_synpic33087", "MPX2075_synpic33089"]
    assert {r.labels["location_category"] for r in unlabelled.values()} == {"Abdomen"}  # the rest of the row stays


# ---------------------------------------------------------------- npz files written here


def test_npz_multi_label(tmp_path):
    path = tmp_path / "multi.npz"
    labels = np.array([[0, 1, 1], [1, 0, 0]], dtype=np.uint8)
    np.savez(path, train_images=np.zeros((2, 8, 8, 3), np.uint8), train_labels=labels)
    dataset = load_npz(path)
    assert dataset.label_names == ["label_0", "label_1", "label_2"]
    assert dataset[0].labels == {"label_0": "0", "label_1": "1", "label_2": "1"}
    assert dataset[0].image.shape == (8, 8, 3)
    named = load_npz(path, class_names=["effusion", "edema", "mass"])
    assert named.label_names == ["effusion", "edema", "mass"]


def test_npz_multi_class_with_stored_names_and_3d(tmp_path):
    path = tmp_path / "organ.npz"
    np.savez(path, val_images=np.zeros((3, 4, 8, 8), np.float32),
             val_labels=np.array([[2], [0], [1]]), class_names=np.array(["liver", "lung", "bone"]))
    dataset = load_dataset(path, label_columns=["label"])
    assert dataset.splits == ["val"] and dataset.default_labels == ["label"]
    assert [record.labels["label"] for record in dataset] == ["bone", "liver", "lung"]
    assert [record.id for record in dataset] == ["val_0", "val_1", "val_2"]
    assert dataset[0].image.shape == (4, 8, 8)


def test_npz_class_names_that_are_not_utf8_are_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "badnames.npz"
    labels = np.array([[0], [1], [0], [1]])
    np.savez(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=labels,
             val_images=np.zeros((4, 8, 8), np.uint8), val_labels=labels, class_names=np.array([b"\xe9t\xe9", b"pneu"]))
    with pytest.raises(DataError, match=r"badnames.npz: 'class_names' entry 0 is not UTF-8 text \(byte 0xe9 at "
                                         r"offset 0\)"):
        load_npz(path)
    result, output = invoke("bench", "medmnist", "--train-data", path, "--test-data", path, "--test-split", "val",
                            "--epochs", 1, "-q")
    assert result.exit_code == 2, output
    assert "badnames.npz: 'class_names'" in output and "Traceback" not in output


def test_npz_class_names_that_are_digits_but_not_numbers_are_benchmarked(tmp_path):
    """A stored class name "²" (a digit to str.isdigit that int() cannot read) ended ``medvl bench medmnist`` in a
    traceback while its classes were sorted: numbers sort by value, such names as text."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        arrays |= {f"{split}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8),
                   f"{split}_labels": (np.arange(n) % 2).reshape(-1, 1)}
    path = tmp_path / "grades.npz"
    np.savez(path, **arrays, class_names=np.array(["10", "²"]))
    result, output = invoke("bench", "medmnist", "--train-data", path, "--test-data", path, "--test-split", "test",
                            "--epochs", 1, "--json", tmp_path / "b.json", "-q")
    assert result.exit_code == 0, output
    assert "Traceback" not in output
    assert list(json.loads((tmp_path / "b.json").read_text())["metrics"]["per_class"]) == ["10", "²"]


def test_npz_images_with_a_channel_axis(tmp_path):
    """(N, H, W, 1), as Keras saves grayscale, used to be read as volumes one pixel wide (every image then had
    the same difference hash, and a 2D model refused `<array>`); 2 or 4 channels are refused, naming the array."""
    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "keras.npz", train_images=images, train_labels=np.arange(5) % 2)
    dataset = load_npz(tmp_path / "keras.npz")
    assert dataset[0].image.shape == (28, 28)
    np.testing.assert_array_equal(dataset[3].image, images[3, ..., 0])
    np.savez(tmp_path / "rgba.npz", train_images=np.zeros((5, 28, 28, 4), np.uint8), train_labels=np.zeros(5))
    with pytest.raises(DataError, match=r"rgba\.npz.*'train_images' has shape \(5, 28, 28, 4\): 4 channels"):
        load_npz(tmp_path / "rgba.npz")
    # an array a 2D model cannot take: the error names the archive and the record (it named `<array>`)
    np.savez(tmp_path / "volumes.npz", train_images=np.zeros((4, 6, 28, 28), np.uint8), train_labels=np.arange(4) % 2)
    result, output = invoke("train", "--data", tmp_path / "volumes.npz", "--model", "phantom-tiny", "--out",
                            tmp_path / "run", "--epochs", "1", "--workers", "0")
    assert result.exit_code == 2 and "volumes.npz (record train_0): image shape (6, 28, 28)" in output, output
    assert not (tmp_path / "run").exists()


def test_npz_without_images_keys(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros(3), y=np.zeros(3))
    with pytest.raises(DataError, match=r"bad\.npz.*keys found: x, y"):
        load_dataset(path)


def test_npz_label_problems(tmp_path):
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, train_images=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match=r"unlabelled\.npz.*no matching 'train_labels'"):
        load_npz(unlabelled)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, train_images=np.zeros((2, 4, 4)), train_labels=np.zeros(3))
    with pytest.raises(DataError, match=r"mismatch\.npz.*3 rows"):
        load_npz(mismatch)


def test_npz_bomb_is_refused_before_decompressing(tmp_path):
    # ~1.6 MB on disk, 1.6 GB of declared (and really present) zero pixels: the loader used to
    # decompress it all; now the .npy header is read from the zip member and checked first
    path = npz_bomb(tmp_path / "bomb.npz", count=2_100_000)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(DataError, match=r"bomb\.npz.*'train_images' declares shape \(2100000, 28, 28\) of uint8 "
                                        r"\(1,646,400,000 bytes\), over the 1,610,612,736-byte limit"):
        load_dataset(path)


def test_npz_size_limit_can_be_raised_or_lowered(tmp_path):
    path = tmp_path / "small.npz"
    np.savez_compressed(path, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.arange(4))
    assert len(load_dataset(path)) == 4
    with pytest.raises(DataError, match=r"small\.npz.*arrays declare 288 bytes together, over the 280-byte limit"):
        load_dataset(path, max_npz_bytes=280)
    with pytest.raises(DataError, match=r"'train_images'.*over the 100-byte limit"):
        load_npz(path, max_bytes=100)
    with pytest.raises(InputError, match="max_bytes must be >= 1"):
        load_npz(path, max_bytes=0)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "fake.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match=r"fake\.npz.*not an \.npz"):
        load_dataset(path)


# ---------------------------------------------------------------- manifests written here


def _images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (6, 5), color=128).save(folder / name)


def test_manifest_csv_with_split_column(tmp_path):
    _images(tmp_path, ["a.png", "images/b.png", "c.png"])
    (tmp_path / "manifest.csv").write_text(
        "image,report,finding,split\n"
        "a.png,normal heart,normal,train\n"
        "b.png,,effusion,train\n"
        "c.png,big heart,,test\n", encoding="utf-8")
    dataset = load_dataset(tmp_path)
    assert dataset.splits == ["train", "test"] and dataset.label_names == ["finding"]
    a, b, c = dataset
    assert (a.id, a.text, a.split) == ("a", "normal heart", "train")
    assert a.labels == {"finding": "normal"}
    assert b.image == tmp_path / "images" / "b.png" and b.text is None
    assert c.labels == {} and c.meta == {"split": "test"}
    assert read_image(a.image).shape == (5, 6)
    assert len(load_dataset(tmp_path, ["finding"]).select("train")) == 2


def test_a_split_named_all_beside_other_splits_is_refused(tmp_path):
    """``--split all`` means every record: rows whose split is 'all' beside a test split could not be selected
    alone, and ``--split all`` took the test rows with them without a word."""
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "manifest.csv").write_text(
        "image,finding,split\na.png,normal,test\nb.png,effusion,all\nc.png,normal,all\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"manifest.csv: 2 of 3 rows have the split 'all' \(first: line 3\) beside "
                                        r"other splits; 'all' is the reserved name for every record"):
        load_dataset(tmp_path)
    (tmp_path / "manifest.csv").write_text(  # every row 'all': one split, as without a split column
        "image,finding,split\na.png,normal,all\nb.png,effusion,all\n", encoding="utf-8")
    assert load_dataset(tmp_path).splits == [ALL_SPLITS]


def test_a_split_named_all_beside_other_splits_is_refused_by_the_npz_vqa_and_medpix_loaders(tmp_path):
    """Their split names come from array keys and file names: an 'all' split beside a test split was taken, with
    the test records, by ``--split all`` and could not be selected alone, as in a manifest's split column."""
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 255, (4, 28, 28), dtype=np.uint8), "train_labels": np.array([0, 1, 0, 1])}
    np.savez(tmp_path / "r.npz", **arrays, all_images=arrays["train_images"][:3], all_labels=np.array([0, 1, 1]))
    vqa, medpix = tmp_path / "vqa", tmp_path / "mpx"
    _images(vqa, ["images/i0.png", "images/i1.png"])
    _images(medpix, ["images/x1.png", "images/x2.png"])
    for split, qid in (("all", 1), ("test", 2)):
        (vqa / f"{split}.json").write_text(json.dumps([{"qid": qid, "image_name": f"i{qid - 1}.png", "question": "q?",
                                                        "answer": "yes"}]), encoding="utf-8")
        (medpix / f"descriptions_{split}.jsonl").write_text(json.dumps({"image": f"x{qid}", "Type": "CT", "Description":
                                                                        {"Caption": "c"}}) + "\n", encoding="utf-8")
    for path, source in ((tmp_path / "r.npz", "'all_images'"), (vqa, "all.json"), (medpix, "descriptions_all.jsonl")):
        with pytest.raises(DataError, match=rf"{path.name}: {source} holds the split 'all' beside other splits "
                                            r"\('\w+'\); 'all' is the reserved name for every record"):
            load_dataset(path)
    (vqa / "test.json").unlink()  # 'all' alone: one split
    assert load_dataset(vqa).splits == [ALL_SPLITS]


def test_two_question_files_holding_one_split_are_refused_naming_both(tmp_path):
    """train.json and trainset.json both hold split 'train': they were merged without a word, and a qid in both
    was reported as a duplicate naming neither file."""
    _images(tmp_path, ["v2/images/i0.png", "v2/images/i1.png"])
    folder = tmp_path / "v2"
    for name, qid in (("train.json", 1), ("trainset.json", 2)):
        (folder / name).write_text(json.dumps([{"qid": qid, "image_name": "i0.png", "question": "q?",
                                                "answer": "yes"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"v2: train\.json and trainset\.json both hold split 'train'"):
        load_dataset(folder)
    assert len(load_dataset(folder / "trainset.json")) == 1
    (folder / "train.json").unlink()  # a qid repeated in one file: the file is named, not only its folder
    (folder / "trainset.json").write_text(json.dumps([{"qid": 1, "image_name": "i0.png", "question": "q?",
                                                       "answer": answer} for answer in ("yes", "no")]))
    with pytest.raises(DataError, match=r"v2/trainset\.json: duplicate qid '1' in split 'train'"):
        load_dataset(folder)


def test_manifest_jsonl_without_split_column(tmp_path):
    _images(tmp_path, ["x.png", "y.png"])
    rows = [{"image": "x.png", "caption": "a cxr", "id": "case-1", "positive": 1},
            {"image": "y.png", "caption": "a ct", "id": "case-2", "positive": 0, "age": None}]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    dataset = load_dataset(path)
    assert dataset.splits == [ALL_SPLITS] and dataset.label_names == ["positive", "age"]
    assert [record.id for record in dataset] == ["case-1", "case-2"]
    assert dataset.classes("positive") == ["0", "1"] and dataset[1].text == "a ct"
    assert "age" not in dataset[1].labels


def test_a_jsonl_nan_or_infinity_is_a_missing_value_not_a_class(tmp_path, caplog):
    _images(tmp_path, ["images/a0.png", "images/a1.png", "images/a2.png"])
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a0.png", "finding": NaN, "size": Infinity}\n{"image": "a1.png", "finding": "nodule", '
                    '"size": 4.5}\n{"image": "a2.png", "finding": null, "size": -Infinity}\n', encoding="utf-8")
    with caplog.at_level("WARNING"):
        dataset = load_dataset(path, label_columns=["finding"])
    assert dataset.classes("finding") == ["nodule"] and [r.id for r in dataset] == ["a1"]
    assert "3 NaN / Infinity value(s) read as missing, as null is (first: line 1, key 'finding')" in caplog.text
    a0 = load_dataset(path)[0]
    assert a0.labels == {} and "size" not in a0.meta


@pytest.mark.parametrize(("cells", "problem"), [
    ('"finding": ["nodule", "effusion"]', "'finding' must be text, a number or a boolean, got a JSON array of "
                                          "values; write one column per finding"),
    ('"finding": "nodule", "text": ["a", "b"]', "'text' must be text, a number or a boolean, got a JSON array"),
    ('"finding": "nodule", "text": {"a": "b"}', "'text' must be text, got a JSON object"),
    ('"finding": "nodule", "split": [["train"]]', "'split' must be text, got a JSON array"),
])
def test_a_jsonl_array_of_values_is_refused_not_read_as_its_json_text(tmp_path, cells, problem):
    # it used to become one class '["nodule", "effusion"]' (or a report '["a", "b"]'), silently
    _images(tmp_path, ["a0.png", "a1.png"])
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a0.png", "finding": "effusion"}\n{"image": "a1.png", ' + cells + "}\n",
                    encoding="utf-8")
    with pytest.raises(DataError, match=rf"m\.jsonl: line 2: {problem}"):
        load_dataset(path)


def test_a_jsonl_object_is_kept_as_its_json_text_as_a_csv_cell_of_json_is(tmp_path):
    # the phantom's boxes written as JSON objects (grounding reads them with json.loads): refused for a while
    _images(tmp_path, ["a0.png", "a1.png", "a2.png"])
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a0.png", "finding": "effusion", "boxes": {"effusion": [1, 2, 3, 4]}}\n'
                    '{"image": "a1.png", "finding": "nodule", "boxes": {"nodule": [[1, 2], [3, 4]]}}\n'
                    '{"image": "a2.png", "finding": "nodule", "boxes": []}\n',
                    encoding="utf-8")
    dataset = load_dataset(path, label_columns=["finding"])
    assert [json.loads(record.meta.get("boxes", "null")) for record in dataset] == [
        {"effusion": [1, 2, 3, 4]}, {"nodule": [[1, 2], [3, 4]]}, None]  # an empty list holds nothing: missing


@pytest.mark.parametrize("header", ['"', 'image,"finding\na0.png,x\n'])
def test_a_quote_never_closed_in_the_header_is_refused_naming_line_1(tmp_path, header):
    # an UnboundLocalError traceback: the unclosed-quote message used the first row's line number, not yet set
    path = tmp_path / "m.csv"
    path.write_text(header, encoding="utf-8")
    with pytest.raises(DataError, match=r'm\.csv: line 1: a quoted cell \(\"\) is never closed'):
        load_dataset(path)


def test_a_jsonl_object_in_a_column_only_named_like_a_role_column_is_kept(tmp_path):
    # "file" and "notes" beside "image" and "text" are not read as the image or the report: structure in them was
    # refused as if they were ("'file' must be text, got a JSON object"); the columns read as roles still refuse it
    _images(tmp_path, ["a0.png", "a1.png"])
    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a0.png", "text": "clear", "file": {"scanner": "x", "series": 3}, '
                    '"notes": [{"by": "r1"}]}\n{"image": "a1.png", "text": "nodule", "file": {"scanner": "y"}}\n',
                    encoding="utf-8")
    dataset = load_dataset(path)
    assert [json.loads(record.meta["file"]) for record in dataset] == [{"scanner": "x", "series": 3}, {"scanner": "y"}]
    assert json.loads(dataset[0].meta["notes"]) == [{"by": "r1"}] and dataset[0].text == "clear"
    path.write_text('{"file": "a0.png", "text": "clear", "image_id": {"a": 1}}\n'
                    '{"file": {"a": "a1.png"}, "text": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.jsonl: line 2: 'file' must be text, got a JSON object"):
        load_dataset(path)


def test_a_cell_spelled_as_missing_is_missing_and_a_float_binary_column_is_0_1(tmp_path, caplog):
    # pandas to_csv(na_rep="NaN") / R's write.csv ("NA"): these cells were a class 'NaN' / 'NA', and pandas' 1.0 / 0.0
    # (a 0/1 column with a missing value is float) was not a binary column ({"0", "1"}) for any evaluator
    _images(tmp_path, [f"images/a{i}.png" for i in range(5)])
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,split,nodule,finding\na0.png,train,1.0,a\na1.png,train,0.0,NA\na2.png,train,NaN,b\n"
                        "a3.png,train,1.0,None\na4.png,train,,N/A\n", encoding="utf-8")
    jsonl_path = tmp_path / "m.jsonl"
    jsonl_path.write_text('{"image": "a0.png", "split": "train", "nodule": 1.0, "finding": "a"}\n'
                          '{"image": "a1.png", "split": "train", "nodule": 0.0, "finding": null}\n'
                          '{"image": "a2.png", "split": "train", "nodule": NaN, "finding": "b"}\n'
                          '{"image": "a3.png", "split": "train", "nodule": 1.0, "finding": "null"}\n'
                          '{"image": "a4.png", "split": "train", "finding": "nan"}\n', encoding="utf-8")
    with caplog.at_level("WARNING"):
        from_csv = load_dataset(csv_path)
    assert ("m.csv: 1 cell(s) of column 'nodule' spelled as a missing value (NaN) read as missing, as an empty cell "
            "is (first: line 4)") in caplog.text
    assert "m.csv: 2 cell(s) of column 'finding' spelled as a missing value (N/A, NA)" in caplog.text
    from_jsonl = load_dataset(jsonl_path)
    for dataset in (from_csv, from_jsonl):  # one table, one dataset, whichever format holds it
        assert [record.labels for record in dataset][:3] == [{"nodule": "1", "finding": "a"}, {"nodule": "0"},
                                                             {"finding": "b"}]
        assert dataset[4].labels == {}
        assert dataset.classes("nodule") == ["0", "1"]
        assert "nodule" not in dataset[2].meta and "finding" not in dataset[1].meta
    assert len(load_dataset(csv_path, ["nodule"])) == 3
    assert from_csv[3].labels == {"nodule": "1", "finding": "None"} and from_jsonl[3].labels == {"nodule": "1"}
    csv_path.write_text("image,grade\na0.png,1.0\na1.png,2.0\na2.png,0.0\n", encoding="utf-8")
    assert load_dataset(csv_path).classes("grade") == ["0.0", "1.0", "2.0"]  # not a 0/1 column: kept as written


def test_a_boolean_column_is_a_0_1_finding_column_in_csv_and_jsonl(tmp_path, caplog):
    # pandas writes a bool column as True / False (to_csv) and true / false (to_json): such a column was the classes
    # 'False' / 'True', so captions read "False, True." and zero-shot prompts "an image showing True."
    _images(tmp_path, [f"a{i}.png" for i in range(4)])
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,split,nodule,melanocytic,answer\na0.png,train,True,True,True\n"
                        "a1.png,train,False,TRUE,no\na2.png,train,,true,False\na3.png,train,false,True,yes\n",
                        encoding="utf-8")
    jsonl_path = tmp_path / "m.jsonl"
    cells = [(True, "True", True), (False, True, "no"), (None, True, False), ("False", True, "yes")]  # real booleans
    jsonl_path.write_text("".join(json.dumps({"image": f"a{i}.png", "split": "train", "nodule": nodule,
                                              "melanocytic": melanocytic, "answer": answer}) + "\n"
                                  for i, (nodule, melanocytic, answer) in enumerate(cells)), encoding="utf-8")
    for path in (csv_path, jsonl_path):
        with caplog.at_level("INFO"):
            dataset = load_dataset(path)
        assert f"{path.name}: column 'nodule' holds booleans (true / false) only: read as 0 / 1" in caplog.text
        assert [record.labels.get("nodule") for record in dataset] == ["1", "0", None, "0"]
        assert dataset.classes("nodule") == ["0", "1"] and dataset.classes("melanocytic") == ["1"]
        assert binary_finding("nodule", dataset.classes("nodule"))
        assert CaptionConfig().prompts("nodule", "1", True)[1] == "an image showing nodule."
        assert set(dataset.classes("answer")) == {"no", "yes"} | ({"True", "False"} if path == csv_path
                                                                   else {"true", "false"})  # not only booleans


def test_none_is_a_class_and_missing_spellings_are_read_in_any_case(tmp_path, caplog):
    # a grade None / Mild / Severe: 'None' was read as missing, its records dropped by -l severity and the class gone,
    # while 'none' stayed a class; 'Null' / 'na' stayed classes while 'null' / 'NA' were missing
    _images(tmp_path, [f"a{i}.png" for i in range(6)])
    path = tmp_path / "m.csv"
    path.write_text("image,split,severity,nodule\na0.png,train,None,1\na1.png,train,Mild,Null\n"
                    "a2.png,train,Severe,0\na3.png,test,none,na\na4.png,test,NONE,1\na5.png,test,NULL,0\n",
                    encoding="utf-8")
    with caplog.at_level("WARNING"):
        dataset = load_dataset(path, ["severity"])
    assert len(dataset) == 5 and dataset.classes("severity") == ["Mild", "NONE", "None", "Severe", "none"]
    assert "1 cell(s) of column 'severity' spelled as a missing value (NULL)" in caplog.text  # not None / none
    assert ("m.csv: 2 cell(s) of column 'nodule' spelled as a missing value (Null, na) read as missing, as an empty "
            "cell is (first: line 3): a run on the column leaves their records out") in caplog.text
    assert load_dataset(path, ["nodule"]).classes("nodule") == ["0", "1"]


def test_a_report_cell_spelled_as_missing_is_no_text(tmp_path, caplog):
    # pandas to_csv(na_rep="NaN") / R's write.csv: the report cells were the text "NaN" / "NA", trained on as captions,
    # while the same table saved as JSONL (null) had no text; now the same records, with the label columns' warning
    _images(tmp_path, [f"images/a{i}.png" for i in range(4)])
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("image,report,finding\na0.png,Clear lungs.,a\na1.png,NaN,b\na2.png,NA,a\n"
                        "a3.png,Small effusion.,b\n", encoding="utf-8")
    jsonl_path = tmp_path / "m.jsonl"
    jsonl_path.write_text('{"image": "a0.png", "report": "Clear lungs.", "finding": "a"}\n'
                          '{"image": "a1.png", "report": null, "finding": "b"}\n'
                          '{"image": "a2.png", "report": "nan", "finding": "a"}\n'
                          '{"image": "a3.png", "report": "Small effusion.", "finding": "b"}\n', encoding="utf-8")
    with caplog.at_level("WARNING"):
        from_csv = load_dataset(csv_path)
    assert ("m.csv: 2 cell(s) of column 'report' spelled as a missing value (NA, NaN) read as missing, as an empty "
            "cell is (first: line 3)") in caplog.text
    assert "Clear lungs" not in caplog.text  # counts and spellings only, never report text
    for dataset in (from_csv, load_dataset(jsonl_path)):
        assert [record.text for record in dataset] == ["Clear lungs.", None, None, "Small effusion."]


def test_an_image_named_in_another_unicode_form_resolves_to_the_file(tmp_path):
    # a manifest naming café.png composed (NFC) while a macOS copy stored it decomposed (NFD): "image file not found"
    # named a file that a listing shows, both printing the same
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    _images(tmp_path, [f"images/{nfd}.png", f"{nfc}2.png", "b.png"])
    path = tmp_path / "m.csv"
    path.write_text(f"image,split\n{nfc}.png,train\n{nfd}2.png,train\nb.png,test\n", encoding="utf-8")
    dataset = load_dataset(path)
    assert [record.image.name for record in dataset] == [f"{nfd}.png", f"{nfc}2.png", "b.png"]
    assert dataset[0].id == nfc and dataset[0].image.is_file()
    path.write_text(f"image_id,split\n{nfc},train\nb,test\n", encoding="utf-8")  # images named by stem
    assert load_dataset(path)[0].image == tmp_path / "images" / f"{nfd}.png"


def test_sidecar_sets_manifest_default_labels_and_captions(tmp_path):
    _images(tmp_path, ["a.png"])
    (tmp_path / "table.csv").write_text("file,finding,view\na.png,normal,PA\n", encoding="utf-8")
    captions = {"classes": {"finding": {"normal": ["no finding"]}}}
    sidecar = {"manifest": "table.csv", "label_columns": ["finding"], "captions": captions}
    (tmp_path / "dataset.json").write_text(json.dumps(sidecar), encoding="utf-8")
    dataset = load_dataset(tmp_path)
    assert dataset.label_names == ["finding", "view"]
    assert dataset.default_labels == ["finding"] and dataset.captions == captions
    sidecar["label_columns"] = ["nosuch"]
    (tmp_path / "dataset.json").write_text(json.dumps(sidecar), encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset\.json.*nosuch"):
        load_dataset(tmp_path)


def test_a_sidecar_naming_a_manifest_in_a_subfolder_still_applies(tmp_path):
    _images(tmp_path / "sub", ["images/a0.png", "images/a1.png"])
    (tmp_path / "sub" / "m.csv").write_text("image,finding,grade\na0.png,x,1\na1.png,y,2\n", encoding="utf-8")
    captions = {"templates": ["{}."], "classes": {"grade": {"1": ["grade one"], "2": ["grade two"]}}}
    sidecar = {"manifest": "sub/m.csv", "label_columns": ["grade"], "captions": captions}
    (tmp_path / "dataset.json").write_text(json.dumps(sidecar), encoding="utf-8")
    dataset = load_dataset(tmp_path)
    assert dataset.source == str(tmp_path / "sub" / "m.csv") and len(dataset) == 2
    assert dataset.default_labels == ["grade"] and dataset.captions == captions
    sidecar["label_columns"] = ["nosuch"]
    (tmp_path / "dataset.json").write_text(json.dumps(sidecar), encoding="utf-8")
    with pytest.raises(DataError, match=rf"{tmp_path.name}/dataset\.json.*nosuch"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "empty manifest"),
    (b"image,finding\n", "empty manifest"),
    (b"image,finding\na.png,norm\xe9al\n", r"not valid UTF-8 \(byte offset 24, line 2"),
    (b"picture,finding\na.png,normal\n", "no image column.*columns found: picture, finding"),
    (b"image,finding\na.png,normal\na.png,edema\n", "duplicate id 'a' on lines 2 and 3"),
])
def test_bad_manifest(tmp_path, content, problem):
    _images(tmp_path, ["a.png"])
    path = tmp_path / "manifest.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"manifest\.csv.*{problem}"):
        load_dataset(path)


@pytest.mark.parametrize("newline", [b"\r", b"\r\n"])
def test_non_utf8_byte_offset_with_carriage_returns(tmp_path, newline):
    # the csv reader counts a lone CR as a line end; the byte offset used to be looked up by LF only
    path = tmp_path / "manifest.csv"
    path.write_bytes(newline.join([b"image,finding", b"a.png,norm\xe9al", b""]))
    with pytest.raises(DataError, match=rf"not valid UTF-8 \(byte offset {13 + len(newline) + 10}, line 2"):
        load_dataset(path)
    path.write_bytes(b"\x00\r\x80")
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_dataset(path)


def test_bad_jsonl_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"image": "a.png"}\n{"image": "b.png",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"manifest\.jsonl.*line 2: not valid JSON"):
        load_dataset(tmp_path)


def test_missing_image_file(tmp_path):
    _images(tmp_path, ["a.png"])
    path = tmp_path / "manifest.csv"
    path.write_text("image\na.png\ngone.png\nalso-gone.png\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"manifest\.csv.*2 of 3 image files not found; "
                                        r"first: line 3: .*gone\.png"):
        load_dataset(path)


def test_an_image_cell_naming_a_folder_is_refused_at_load(tmp_path):
    _images(tmp_path, ["images/a.png", "images/b/c.png"])
    path = tmp_path / "manifest.csv"
    path.write_text("image,finding\na.png,x\nimages,y\nb,z\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"manifest\.csv: 2 of 3 image cells name something that is not an image "
                                        r"file; first: line 3: .*images is a folder"):
        load_dataset(path)
    (tmp_path / "a.png").mkdir()  # a folder and a file of one name: the file is the image
    path.write_text("image,finding\na.png,x\n", encoding="utf-8")
    assert load_dataset(path)[0].image == tmp_path / "images" / "a.png"


def _outside_manifest(tmp_path: Path) -> Path:
    """A dataset folder whose manifest names one image inside and three outside it (a ``..`` path,
    an absolute path, and a symbolic link in the folder pointing out of it)."""
    folder = tmp_path / "data"
    _images(folder, ["a.png"])
    _images(tmp_path, ["secret.png"])
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    (folder / "manifest.csv").write_text(
        f"image\na.png\n../secret.png\n{tmp_path / 'secret.png'}\nlink.png\n", encoding="utf-8")
    return folder


def test_manifest_paths_outside_the_folder_are_refused(tmp_path):
    folder = _outside_manifest(tmp_path)
    with pytest.raises(DataError, match=r"manifest\.csv.*3 of 4 rows name a file outside the dataset folder.*"
                                        r"first: line 3.*allow-outside-root") as caught:
        load_dataset(folder)
    assert "secret" not in str(caught.value)  # the path text itself is never shown
    assert len(load_dataset(folder, allow_outside_root=True)) == 4


def test_manifest_absolute_path_inside_the_folder_is_fine(tmp_path):
    _images(tmp_path, ["a.png", "images/b.png"])
    (tmp_path / "manifest.csv").write_text(f"image\n{tmp_path / 'a.png'}\nb.png\n", encoding="utf-8")
    assert [record.image for record in load_dataset(tmp_path)] == [tmp_path / "a.png", tmp_path / "images/b.png"]


def test_ids_never_carry_the_folders_above_the_dataset(tmp_path):
    """Without an id column the id comes from the image path: relative to the manifest's folder for
    absolute paths inside it, a hash for paths outside it (allowed), never the absolute path."""
    folder = tmp_path / "Smith_John_MRN778899" / "data"
    _images(folder, ["sub/a.png"])
    _images(tmp_path, ["elsewhere.png"])
    (folder / "manifest.csv").write_text(
        f"image\n{folder / 'sub' / 'a.png'}\n{tmp_path / 'elsewhere.png'}\n", encoding="utf-8")
    ids = [record.id for record in load_dataset(folder, allow_outside_root=True)]
    assert ids[0] == "sub/a"
    assert ids[1].startswith("file-") and "Smith" not in ids[1] and "elsewhere" not in ids[1]


def test_sidecar_manifest_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "data"
    _images(folder, ["a.png"])
    (tmp_path / "elsewhere.csv").write_text("image\ndata/a.png\n", encoding="utf-8")
    (folder / "dataset.json").write_text(json.dumps({"manifest": "../elsewhere.csv"}), encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset\.json.*1 of 1 manifest entries name a file outside"):
        load_dataset(folder)


def test_a_key_given_twice_in_one_json_object_is_refused_naming_the_file_record_and_key(tmp_path):
    """json keeps the last of two equal keys: the first label (or split, or image) was dropped without a word,
    where a CSV header naming a column twice is refused. Manifests, question files and dataset.json refuse it."""
    _images(tmp_path, ["images/a.png", "images/b.png"])
    manifest = tmp_path / "dup.jsonl"
    manifest.write_text('{"image": "a.png", "split": "test", "label": "nodule"}\n'
                        '{"image": "b.png", "split": "train", "label": "nodule", "label": "normal"}\n',
                        encoding="utf-8")
    with pytest.raises(DataError, match=r"dup\.jsonl: line 2: key 'label' is given twice$"):
        load_dataset(manifest)
    manifest.write_text('{"image": "a.png", "meta": {"view": "PA", "view": "AP"}}\n', encoding="utf-8")  # nested
    with pytest.raises(DataError, match=r"dup\.jsonl: line 1: key 'view' is given twice$"):
        load_dataset(manifest)
    folder = tmp_path / "vqa"
    (folder / "images").mkdir(parents=True)
    (tmp_path / "images" / "a.png").rename(folder / "images" / "a.png")
    (folder / "trainset.json").write_text('[{"qid": 1, "image_name": "a.png", "question": "q?", "answer": "yes"},\n'
                                          ' {"qid": 2, "image_name": "a.png", "question": "q?", "answer": "yes",\n'
                                          '  "answer": "no"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"trainset\.json: item 1 \(qid 2\): key 'answer' is given twice$"):
        load_dataset(folder)
    (tmp_path / "manifest.csv").write_text("image,label\nimages/b.png,nodule\n", encoding="utf-8")
    (tmp_path / "dataset.json").write_text('{"label_columns": ["label"], "label_columns": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset\.json: key 'label_columns' is given twice in one object$"):
        load_dataset(tmp_path)


def test_vqa_image_names_outside_the_folder_are_refused(tmp_path):
    _images(tmp_path, ["images/a.png", "secret.png"])
    folder = tmp_path / "vqa"
    (folder / "images").mkdir(parents=True)
    (tmp_path / "images" / "a.png").rename(folder / "images" / "a.png")
    items = [{"qid": 1, "image_name": "a.png", "question": "q?", "answer": "yes"},
             {"qid": 2, "image_name": "../../secret.png", "question": "q?", "answer": "no"}]
    (folder / "trainset.json").write_text(json.dumps(items), encoding="utf-8")
    with pytest.raises(DataError, match=r"trainset\.json.*1 of 2 questions name a file outside.*first: item 1"):
        load_dataset(folder)
    assert len(load_dataset(folder, allow_outside_root=True)) == 2


def test_unrecognised_paths(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*not found"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"unrecognised dataset folder.*supported: .*npz"):
        load_dataset(tmp_path)
    (tmp_path / "data.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match=r"data\.parquet.*unrecognised dataset file"):
        load_dataset(tmp_path / "data.parquet")


# ---------------------------------------------------------------- read_image


def test_read_image_modes(tmp_path):
    Image.fromarray(np.full((4, 5), 4000, np.uint16)).save(tmp_path / "xray16.png")
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    palette = Image.new("P", (5, 4))
    palette.putpalette([255, 0, 0, 0, 0, 255] * 128)
    palette.save(tmp_path / "palette.bmp")
    np.save(tmp_path / "array.npy", np.ones((4, 5, 1), np.float32))
    gray16 = read_image(tmp_path / "xray16.png")
    assert gray16.dtype == np.uint16 and gray16.max() == 4000
    assert read_image(tmp_path / "rgba.png").shape == (4, 5, 3)
    assert read_image(tmp_path / "palette.bmp").shape == (4, 5, 3)
    assert read_image(tmp_path / "array.npy").shape == (4, 5)


@pytest.mark.parametrize("orientation, upright", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                                  (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                                  (2, lambda a: a[:, ::-1])])
def test_an_exif_orientation_is_turned_upright_as_a_viewer_shows_it(tmp_path, orientation, upright):
    """A phone's JPEG stores its pixels sideways with an EXIF Orientation tag; browsers (the reading page) show
    it upright, so the model must see it upright too, from a file and from an upload's bytes alike."""
    pixels = np.zeros((12, 8), np.uint16)
    pixels[1:4, 1:3] = 4000  # a mark near the top left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "scan.png", exif=exif.tobytes())
    assert Image.open(tmp_path / "scan.png").getexif()[0x0112] == orientation
    expected = upright(pixels)
    for decoded in (read_image(tmp_path / "scan.png"), read_image_bytes((tmp_path / "scan.png").read_bytes(), "u")):
        assert decoded.dtype == np.uint16
        np.testing.assert_array_equal(decoded, expected)
    rgb = np.zeros((12, 8, 3), np.uint8)
    rgb[1:4, 1:3] = 255
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=100)
    photo = read_image(tmp_path / "photo.jpg")
    assert photo.shape == upright(rgb).shape
    assert np.abs(photo.astype(int) - upright(rgb)).max() < 40  # JPEG's loss only


def test_a_16_bit_gray_alpha_png_is_gray_with_a_warning(tmp_path, caplog):
    """Pillow decodes 16-bit grey + alpha to 8-bit RGBA: read as 8-bit grayscale (HxW, as the other grey
    images), not RGB, and said, since 8 bits of depth are lost."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    grey_alpha = (np.random.default_rng(1).random((4, 6, 2)) * 65535).astype(">u2")
    raw = b"".join(b"\x00" + grey_alpha[row].tobytes() for row in range(4))
    path = tmp_path / "la16.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 6, 4, 16, 4, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with caplog.at_level("WARNING"):
        pixels = read_image(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 6)
    np.testing.assert_array_equal(pixels, (grey_alpha[..., 0].astype(np.uint16) >> 8).astype(np.uint8))
    assert "16-bit grayscale PNG with an alpha channel" in caplog.text and "la16" not in caplog.text


def _png_16(path: Path, samples: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG of ``samples`` (H x W x channels) written by hand: Pillow writes no 16-bit colour PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    big_endian = samples.astype(">u2")
    raw = b"".join(b"\x00" + big_endian[row].tobytes() for row in range(samples.shape[0]))
    header = struct.pack(">IIBBBBB", samples.shape[1], samples.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize(("colour_type", "channels"), [(2, 3), (6, 4)])  # RGB, RGBA
def test_a_16_bit_colour_png_is_read_at_8_bits_with_a_warning_and_never_as_a_black_image(tmp_path, caplog,
                                                                                         colour_type, channels):
    # Pillow keeps the high byte of each sample, silently: values below 256 came back as a black image (audit: blank)
    rng = np.random.default_rng(0)
    full = rng.integers(0, 65536, (4, 6, channels))
    _png_16(tmp_path / "full.png", full, colour_type)
    with caplog.at_level("WARNING"):
        pixels = read_image(tmp_path / "full.png")
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 6, 3)
    np.testing.assert_array_equal(pixels, (full[..., :3] >> 8).astype(np.uint8))
    assert "a 16-bit colour PNG: read at 8 bits" in caplog.text
    _png_16(tmp_path / "low.png", rng.integers(0, 256, (4, 6, channels)), colour_type)
    black = r"low\.png: a 16-bit colour PNG whose values all lie below 256 \(of 65,535\): read at 8 bits per channel"
    with pytest.raises(DataError, match=black):
        read_image(tmp_path / "low.png")
    with pytest.raises(DataError, match=black.replace("low\\.png", "upload")):  # an upload (the service) alike
        read_image_bytes((tmp_path / "low.png").read_bytes(), "upload")
    _png_16(tmp_path / "zero.png", np.zeros((4, 6, channels), int), colour_type)
    assert not read_image(tmp_path / "zero.png").any()  # black in the file too: an image (the audit calls it blank)


def test_corrupt_image(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match=r"noise\.png.*not a recognised image"):
        read_image(path)


def test_truncated_jpeg(tmp_path, shared_data):
    data = (shared_data / "isic-dermoscopy" / "images" / "ISIC_0000001.jpg").read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"half\.jpg.*truncated"):
        read_image(path)


def test_empty_missing_and_unsupported_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "scan.xyz").write_bytes(b"x")
    np.save(tmp_path / "objects.npy", np.array([{}, None]), allow_pickle=True)
    with pytest.raises(DataError, match=r"empty\.png.*empty file \(0 bytes\)"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(DataError, match=r"absent\.png.*file not found"):
        read_image(tmp_path / "absent.png")
    with pytest.raises(DataError, match=r"scan\.xyz.*unsupported file type '\.xyz'"):
        read_image(tmp_path / "scan.xyz")
    with pytest.raises(DataError, match=r"objects\.npy"):
        read_image(tmp_path / "objects.npy")


def _png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (the pixel data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("size", "problem"), [
    ((11_000, 10_000), "image too large: 11000 x 10000 pixels"),  # over our limit
    ((30_000, 30_000), "image too large: over .* pixels"),  # over Pillow's own hard limit
])
def test_decompression_bomb(tmp_path, size, problem):
    path = tmp_path / "bomb.png"
    _png_header(path, *size)
    with pytest.raises(DataError, match=rf"bomb\.png.*{problem}"):
        read_image(path)


def test_a_label_written_two_ways_is_warned(tmp_path):
    """'Nodule' and 'nodule ', or '1' and '1.0', are two classes to every command: said once, at load."""
    from cli_helpers import invoke
    from medvl.data.loaders import label_variants

    (tmp_path / "images").mkdir()
    rows = ["image,finding,abnormal"]
    for i, (finding, abnormal) in enumerate([("nodule", "1"), ("Nodule", "1.0"), ("effusion", "1"), ("normal", "0"),
                                            ("normal", "0.0"), ("Effusion ", "1")] * 2):  # classes: values repeat
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{finding},{abnormal}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    dataset = load_dataset(tmp_path)
    assert label_variants(dataset) == {"abnormal": [["0", "0.0"], ["1", "1.0"]],
                                       "finding": [["Effusion", "effusion"], ["Nodule", "nodule"]]}
    result, output = invoke("audit", "--data", tmp_path, "-q")
    text = " ".join(output.split())
    assert "label column 'finding' writes 2 value(s) in more than one way ('Effusion' / 'effusion'; 'Nodule' / " \
        "'nodule')" in text
    assert "label column 'abnormal' writes 2 value(s) in more than one way ('0' / '0.0'; '1' / '1.0')" in text


def test_two_long_numbers_a_float_rounds_alike_are_not_one_value_written_two_ways(tmp_path, caplog):
    """Label values were compared as floats: two 17-digit accession numbers (beyond 2**53) read as one value
    'written in more than one way'. Numbers are compared exactly; '1' / '1.0' / '1e0' are still one."""
    from medvl.data.loaders import label_variants

    _images(tmp_path, ["a.png"])
    values = ["20231105000000001", "20231105000000002", "1", "1.0", "1e0"] * 2
    (tmp_path / "m.csv").write_text("image,id,label\n" + "".join(f"a.png,r{i},{value}\n" for i, value in
                                                                  enumerate(values)))
    with caplog.at_level("WARNING"):
        dataset = load_dataset(tmp_path / "m.csv")
    assert label_variants(dataset) == {"label": [["1", "1.0", "1e0"]]}
    assert "20231105000000001" not in caplog.text and "writes 1 value(s) in more than one way" in caplog.text


def test_label_values_that_differ_by_invisible_characters_or_unicode_form_are_warned(tmp_path, caplog):
    """A zero-width space left by copy and paste, or a macOS NFD accent, made a second class that prints the same,
    without the warning 'Nodule' / 'nodule' gets."""
    import unicodedata

    from medvl.data.loaders import label_variants

    decomposed = unicodedata.normalize("NFD", "épanchement")
    _images(tmp_path, ["a.png"])
    values = ["nodule", "nodule\u200b", "épanchement", decomposed, "nodule", "épanchement"] * 2
    (tmp_path / "m.csv").write_text("image,id,label\n" + "".join(f"a.png,r{i},{value}\n" for i, value in
                                                                  enumerate(values)), encoding="utf-8")
    with caplog.at_level("WARNING"):
        dataset = load_dataset(tmp_path / "m.csv")
    assert len(dataset.classes("label")) == 4  # kept as written: the data is the user's to correct
    assert label_variants(dataset) == {"label": [[decomposed, "épanchement"], ["nodule", "nodule\u200b"]]}
    assert ("writes 2 value(s) in more than one way ('e\\u0301panchement' / '\\xe9panchement'; 'nodule' / "
            "'nodule\\u200b')") in caplog.text


def test_label_variants_of_a_column_of_many_values_are_counted_not_shown(tmp_path):
    """A column of many distinct values may hold names or notes: its variants are counted, never logged."""
    from cli_helpers import invoke

    (tmp_path / "images").mkdir()
    rows = ["image,finding,referrer"]
    for i in range(60):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{'a' if i % 2 else 'b'},{'Dr Smith' if i == 0 else 'dr smith' if i == 1 else i}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    result, output = invoke("audit", "--data", tmp_path, "-q")
    text = " ".join(output.split())
    assert "label column 'referrer' writes 1 value(s) in more than one way (values not shown: the column has 60" in text
    assert "Smith" not in output and "smith" not in output


def test_label_variants_of_a_column_of_mostly_distinct_values_are_counted_not_shown(tmp_path, caplog):
    """A small table's free-text column (a history note on every row) is no set of classes, however few its values:
    two notes differing in case were quoted in the warning."""
    notes = ["Smoker with cough for 3 weeks", "smoker with cough for 3 weeks", "Jane Doe 45F chest pain"]
    rows = ["image,text,history"]
    for i, note in enumerate(notes):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,report {i},{note}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        load_dataset(tmp_path / "m.csv")
    assert "label column 'history' writes 1 value(s) in more than one way (values not shown: the column has 3 " \
        "distinct values in 3 rows)" in caplog.text
    assert "cough" not in caplog.text and "Jane" not in caplog.text


def test_an_npz_split_is_the_same_records_as_itself_for_the_leak_refusals(tiny_npz, tmp_path):
    """npz records hold arrays, so the file-path test behind "a probe fitted on its scored split is refused" found
    no shared image: the same file and split gave AUC 1.000 with only a copy flag. The same file and record id
    are the same record."""
    import medvl

    one, again = load_npz(tiny_npz).select("train"), load_npz(tiny_npz).select("train")
    assert one.shared_images(again) == len(again)
    assert one.shared_images(load_npz(tiny_npz).select("val")) == 0
    copy = tmp_path / "copy.npz"
    copy.write_bytes(tiny_npz.read_bytes())
    assert one.shared_images(load_npz(copy).select("train")) == 0  # another file: the byte-copy check's case
    model = tmp_path / "model"
    medvl.create_model("medmnist-small").save_pretrained(model)
    result, output = invoke("eval", "linear-probe", "--model", model, "--train-data", tiny_npz, "--train-split",
                            "train", "--test-data", tiny_npz, "--test-split", "train", "-q")
    assert result.exit_code == 2 and "holds" in output and "scored images" in output, output


@pytest.fixture()
def small_phantom_folder(tmp_path) -> Path:
    from medvl.data.phantom import generate_phantom

    generate_phantom(tmp_path / "ph", n=8, seed=0, size=32)
    return tmp_path / "ph"


def test_a_dataset_json_path_loads_its_folder(small_phantom_folder):
    """Every .json went to the VQA loader, so the sidecar itself failed as 'a non-empty JSON array of questions'."""
    folder = small_phantom_folder
    assert [r.id for r in load_dataset(folder / "dataset.json")] == [r.id for r in load_dataset(folder)]
    result, output = invoke("audit", "--data", folder / "dataset.json", "--show", 0, "-q")
    assert result.exit_code == 0, output


def test_label_columns_named_twice_are_refused_where_they_are_given(small_phantom_folder):
    """Repeated label columns passed the API and the sidecar; training then blamed 'label column(s) given more
    than once' without saying they came from dataset.json."""
    with pytest.raises(InputError, match="label column\\(s\\) finding given more than once"):
        load_dataset(small_phantom_folder, label_columns=["finding", "finding"])
    sidecar = small_phantom_folder / "dataset.json"
    settings = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**settings, "label_columns": ["finding", "finding"]}))
    with pytest.raises(DataError, match="dataset.json: 'label_columns' names finding more than once"):
        load_dataset(small_phantom_folder)


def test_label_columns_given_as_a_string_is_refused_not_split_into_letters(small_phantom_folder):
    """list('finding') made the columns f, i, n, ... : 'unknown label column 'f'', a column the user never named."""
    from medvl.api import load_split

    for load in (load_dataset, load_split):
        with pytest.raises(InputError, match="label_columns must be a list of column names, got a str"):
            load(small_phantom_folder, label_columns="finding")


def test_load_split_chooses_the_split_before_leaving_out_unlabelled_records(shared_data, tmp_path, caplog):
    """Records without a label were dropped over every split before the split was chosen: a test split not yet
    annotated was 'no split 'test'; splits present: train', and MedPix dev with plane said 12 skipped (train's 9
    too) where dev has 3."""
    from medvl.api import load_split

    with caplog.at_level("INFO", logger="medvl.data.record"):
        dev = load_split(shared_data / "medpix-2.0", "dev", ["plane"])
    assert len(dev) == 194 and dev.splits == ["dev"]
    assert "skipped 3 records with an empty label in plane (of 197 records of split 'dev')" in caplog.text

    images = sorted((shared_data / "isic-dermoscopy" / "images").glob("*.jpg"))[:12]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,grade,split\n" + "".join(
        f"{image},{('mild', 'severe')[i % 2] if i < 8 else ''},{'train' if i < 8 else 'test'}\n"
        for i, image in enumerate(images)))
    assert len(load_split(manifest, None, ["grade"], allow_outside_root=True)) == 8
    with pytest.raises(InputError, match=r"manifest\.csv: split 'test' has 4 records, none with a value in label "
                                         r"column 'grade'$"):
        load_split(manifest, "test", ["grade"], allow_outside_root=True)
    with pytest.raises(InputError, match="unknown label column 'stage'; available: grade"):
        load_split(manifest, "test", ["stage"], allow_outside_root=True)  # a bad column still comes first
    result, output = invoke("train", "--data", manifest, "--allow-outside-root", "--split", "test", "-l", "grade",
                            "--model", "phantom-tiny", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2 and "split 'test' has 4 records, none with a value" in " ".join(output.split())


def test_a_report_over_128_kib_is_a_readable_csv_cell(tmp_path):
    """The csv module's default cap on a cell made a valid CSV with a long report 'not a readable CSV file (field
    larger than field limit (131072))'."""
    Image.fromarray(np.zeros((8, 8), np.uint8) + 100).save(tmp_path / "a.png")
    report = "no acute findings. " * 8000  # 152,000 characters
    (tmp_path / "long.csv").write_text(f'image,text\na.png,"{report}"\n')
    [record] = load_dataset(tmp_path / "long.csv")
    assert record.text == report.strip()


def test_medpix_image_suffixes_are_matched_in_any_case(tmp_path):
    """A MedPix folder copied from Windows or a camera export holds ``.JPG`` files: the loader globbed ``*.jpg``
    (case-sensitive on Linux) and refused the folder, naming a ``.jpg`` path, while ``image_suffix`` and the manifest
    loader take any case. A stem in two spellings keeps the lower-case one, as it keeps .jpg over .png."""
    _images(tmp_path, ["images/MPX1_synpic1.JPG", "images/MPX1_synpic2.Png", "images/MPX2_synpic3.jpg",
                       "images/MPX2_synpic3.JPG", "images/MPX2_synpic4.PNG", "images/MPX2_synpic4.jpeg"])
    (tmp_path / "descriptions_train.jsonl").write_text("".join(
        json.dumps({"image": f"MPX{case}_synpic{number}", "Type": "CT", "Description": {"Caption": "c"}}) + "\n"
        for case, number in ((1, 1), (1, 2), (2, 3), (2, 4))), encoding="utf-8")
    dataset = load_dataset(tmp_path)
    assert [Path(r.image).name for r in dataset] == ["MPX1_synpic1.JPG", "MPX1_synpic2.Png", "MPX2_synpic3.jpg",
                                                     "MPX2_synpic4.PNG"]
