"""Paths are data too: an index, its info and every ``--json`` output of the index, search, report
and case-retrieval commands hold image paths relative to the dataset root only (none for DICOM),
never a folder above the data; output files are refused unless ``--overwrite``; numeric options
are range-checked before any work."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import invoke, postgres_server
from medvl import DataError, InputError, create_model, load_dataset, load_model
from medvl.data.record import Dataset, Record
from medvl.index import Hit, build_index, open_index, resolve_image, search_index
from medvl.index.cases import public_image_path, stored_image_path

PATIENT_FOLDER = "Smith_John_MRN778899"  # a folder named after a patient, above the data
SECRETS = (PATIENT_FOLDER.encode(), b"MRN778899", b"Smith_John")


def leaks(*places: Path) -> list[str]:
    """Files under ``places`` (or the files themselves) holding any byte of the patient folder name."""
    found = []
    for place in places:
        files = [place] if place.is_file() else sorted(p for p in place.rglob("*") if p.is_file())
        assert files, f"nothing to search in {place}"
        found += [str(path) for path in files if any(secret in path.read_bytes() for secret in SECRETS)]
    return found


def image_paths(index: Path) -> list[str | None]:
    with closing(sqlite3.connect(index / "cases.sqlite")) as conn:
        return [row[0] for row in conn.execute("SELECT image_path FROM cases")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("paths-model") / "model"
    create_model("phantom-tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def patient_data(phantom_dir, tmp_path_factory) -> Path:
    """The phantom dataset placed under a folder named after a patient."""
    data = tmp_path_factory.mktemp("paths-data") / PATIENT_FOLDER / "phantom"
    shutil.copytree(phantom_dir, data)
    return data


@pytest.fixture(scope="module")
def dicom_data(tmp_path_factory) -> Path:
    """Real DICOM files (pydicom's and pydicom-data's) under a folder named after a patient; one has
    no suffix (recognised by its DICM marker)."""
    import data_store
    from pydicom.data import get_testdata_file

    folder = tmp_path_factory.mktemp("paths-dicom") / PATIENT_FOLDER / "dicom"
    (folder / "subfolder").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "subfolder" / "ct_file.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "subfolder" / "mr_file_no_suffix")
    shutil.copy(Path(data_store.__file__).parent / "data" / "SC_rgb.dcm", folder / "sc_file.dcm")
    return folder


def test_index_and_json_outputs_hold_no_folder_above_the_data(patient_data, model_dir, tmp_path):
    out = tmp_path / "out"
    index = out / "idx"
    query = load_dataset(patient_data).select("test")[0]
    commands = [
        ("index", "build", "--model", model_dir, "--data", patient_data, "--split", "train", "--out", index,
         "--json", out / "build.json", "-q"),
        ("index", "add", "--index", index, "--data", patient_data, "--split", "val", "--json", out / "add.json", "-q"),
        ("index", "info", "--index", index, "--json", out / "info.json"),
        ("search", "--index", index, "--image", query.image, "-k", 5, "--json", out / "search.json"),
        ("search", "--index", index, "--text", "pleural effusion", "--target", "texts", "-k", 3,
         "--json", out / "search_texts.json"),
        ("report", "draft", query.image, "--index", index, "-k", 5, "--min-similarity", 0, "--related", 1,
         "--json", out / "draft.json"),
        ("eval", "case-retrieval", "--index", index, "--data", patient_data, "--split", "test", "-k", 3,
         "--json", out / "case_retrieval.json", "-q"),
    ]
    for command in commands:
        result, output = invoke(*command)
        assert result.exit_code == 0, (command[:2], output)
    written = {p.name for p in out.iterdir()}
    assert {"build.json", "add.json", "info.json", "search.json", "search_texts.json", "draft.json",
            "case_retrieval.json"} <= written
    assert {p.name for p in index.iterdir()} == {"index.json", "index.faiss", "text.faiss", "cases.sqlite",
                                                   "filters.safetensors"}
    assert leaks(out) == []
    # what is stored instead: paths relative to the dataset folder, and a hash of the data's path
    stored = image_paths(index)
    assert len(stored) == 67 + 10 and all(p.startswith("images/phantom_") for p in stored)
    info = json.loads((index / "index.json").read_text())
    assert info["format"] == 2 and set(info["data"]) == {"source_sha256", "n_records"}
    hits = json.loads((out / "search.json").read_text())
    assert hits["query"] == {"image": Path(query.image).name, "input_flags": {}} and hits["index"] == "idx"
    relative = {r.id: Path(r.image).relative_to(patient_data).as_posix() for r in load_dataset(patient_data)}
    assert len(hits["hits"]) == 5 and all(h["image_path"] == relative[h["id"]] for h in hits["hits"])
    # a user who has the data resolves a hit's image against its folder
    with open_index(index) as opened:
        [hit] = search_index(opened, load_model(model_dir), image=query.image, k=1)
    assert resolve_image(hit, patient_data) == patient_data / relative[hit.id]
    result, output = invoke("search", "--index", index, "--image", query.image, "-k", 1, "--data-root", patient_data)
    assert result.exit_code == 0 and f"1. {patient_data / relative[hit.id]}" in output, output


def test_a_data_folder_whose_name_is_not_utf8_is_indexed_and_known_as_the_index_data(phantom_dir, model_dir,
                                                                                     tmp_path):
    """A file name may hold any bytes: the index keeps the hash of the data path's bytes, and case retrieval on
    the same folder still knows the index was built from it (each query is not its own hit)."""
    data = Path(os.fsdecode(bytes(tmp_path) + b"/ph_\xe9"))
    shutil.copytree(phantom_dir, data)
    index = tmp_path / "idx"
    result, output = invoke("index", "build", "--model", model_dir, "--data", data, "--out", index, "-q")
    assert result.exit_code == 0, output
    info = json.loads((index / "index.json").read_text())
    source = os.path.abspath(load_dataset(data).source)  # the folder's manifest
    assert info["data"]["source_sha256"] == hashlib.sha256(os.fsencode(source)).hexdigest()
    result, output = invoke("eval", "case-retrieval", "--index", index, "--data", data, "--split", "test", "-k", 3,
                            "--json", tmp_path / "case_retrieval.json", "-q")
    assert result.exit_code == 0, output


def test_an_index_built_from_dicom_stores_no_path(dicom_data, model_dir, tmp_path):
    dataset = load_dataset(dicom_data)
    assert len(dataset) == 3 and all(r.id.startswith("img-") for r in dataset)
    out = tmp_path / "out"
    index = out / "idx"
    result, output = invoke("index", "build", "--model", model_dir, "--data", dicom_data, "--out", index,
                            "--json", out / "build.json", "-q")
    assert result.exit_code == 0, output
    result, output = invoke("search", "--index", index, "--image", dicom_data / "sc_file.dcm", "-k", 3,
                            "--json", out / "search.json")
    assert result.exit_code == 0, output
    assert image_paths(index) == [None, None, None]
    hits = json.loads((out / "search.json").read_text())["hits"]
    assert len(hits) == 3 and all(h["image_path"] is None for h in hits)
    assert leaks(out) == []
    for name in ("subfolder", "ct_file", "mr_file", "sc_file"):  # not even the paths inside the folder
        assert not [p for p in index.iterdir() if name.encode() in p.read_bytes()]


DESCRIPTOR_SECRETS = (b"OBRIENSKY", b"KRUMPLEHORN", b"ACC123987", b"ZEBRAQUARTZ")


def test_an_index_built_from_dicom_keeps_only_plain_descriptors(model_dir, tmp_path, caplog):
    """The probe's file: a Series Description naming the patient (without the apostrophe), a doctor and an
    accession number, and a name in Body Part Examined, went into cases.sqlite, the filter columns and
    search results. Such descriptors are left out (a warning counts them); plain ones are kept."""
    import logging

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder = tmp_path / "dicom"
    folder.mkdir()
    for shift, (name, description, body_part) in enumerate((
            ("a", "Chest for OBRIENSKY ref Dr KRUMPLEHORN ACC123987", "ZEBRAQUARTZ"), ("b", "AX 2.5 MM", "CHEST"))):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PixelData = (ds.pixel_array + shift * 50).tobytes()  # two images, not one duplicate
        ds.PatientName, ds.PatientID = "O'BRIENSKY^ZYGMUNT", "MRN99887766"
        ds.SeriesDescription, ds.BodyPartExamined = description, body_part
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.save_as(folder / f"{name}.dcm")
    with caplog.at_level(logging.WARNING, logger="medvl.data.loaders.dicom"):
        dataset = load_dataset(folder)
    metas = sorted((r.meta.get("series_description", ""), r.meta.get("body_part", "")) for r in dataset)
    assert metas == [("", ""), ("AX 2.5 MM", "CHEST")]
    assert "left out the body_part of 1 record(s)" in caplog.text
    assert "left out the series_description of 1 record(s)" in caplog.text
    assert not [s for s in DESCRIPTOR_SECRETS if s.decode() in caplog.text]
    out = tmp_path / "out"
    index = out / "idx"
    result, output = invoke("index", "build", "--model", model_dir, "--data", folder, "--split", "all", "--out",
                            index, "--json", out / "build.json", "-q")
    assert result.exit_code == 0, output
    result, output = invoke("search", "--index", index, "--image", folder / "a.dcm", "-k", 2,
                            "--json", out / "search.json")
    assert result.exit_code == 0, output
    hits = json.loads((out / "search.json").read_text())["hits"]
    assert sorted(h["meta"].get("series_description", "") for h in hits) == ["", "AX 2.5 MM"]
    files = [*index.iterdir(), *out.glob("*.json")]
    assert {p.name for p in files} >= {"cases.sqlite", "filters.safetensors", "search.json"}
    assert [p.name for p in files if any(s in p.read_bytes().upper() for s in DESCRIPTOR_SECRETS)] == []
    assert not [s for s in DESCRIPTOR_SECRETS if s.decode() in output.upper()]


def test_an_index_of_dicom_series_volumes_stores_no_path(tmp_path):
    """A CT series (four slices of pydicom's CT_small at 5 mm steps) is one volume record; a 3D model
    indexes it (this used to fail on the series object) and no path is stored."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder = tmp_path / PATIENT_FOLDER / "ct"
    folder.mkdir(parents=True)
    slice_ = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for number in range(4):
        slice_.SOPInstanceUID = slice_.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        slice_.ImagePositionPatient, slice_.InstanceNumber = [0, 0, 5.0 * number], number + 1
        slice_.save_as(folder / f"slice_file_{number}.dcm")
    [record] = load_dataset(folder)
    assert record.meta["kind"] == "volume" and record.id.startswith("vol-")
    torch.manual_seed(0)
    create_model("ct3d-tiny").save_pretrained(tmp_path / "model")
    out = tmp_path / "out" / "idx"
    info = build_index(load_model(tmp_path / "model"), load_dataset(folder), out, model_dir=tmp_path / "model",
                       show_progress=False)
    assert info["n_cases"] == 1 and image_paths(out) == [None]
    assert leaks(out) == [] and not [p for p in out.iterdir() if b"slice_file" in p.read_bytes()]


def test_stored_paths_are_relative_to_the_root_and_never_leave_it(dicom_data, tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    inside, outside = root / "images" / "a.png", tmp_path / "b.png"
    assert stored_image_path(inside, root) == "images/a.png"
    assert stored_image_path(root / "images" / ".." / "images" / "a.png", root) == "images/a.png"
    assert stored_image_path(outside, root) is None  # "../b.png" would name the folder above
    assert stored_image_path(inside, None) is None and stored_image_path(np.zeros((4, 4)), root) is None
    assert stored_image_path(dicom_data / "subfolder" / "mr_file_no_suffix", dicom_data) is None  # DICM marker
    assert stored_image_path(dicom_data / "subfolder" / "ct_file.dcm", dicom_data) is None
    assert public_image_path("/data/Smith/a.png") is None and public_image_path("../a.png") is None
    assert public_image_path("C:\\data\\a.png") is None and public_image_path("images/a.png") == "images/a.png"


def test_outputs_name_files_by_their_last_component_and_urls_without_password():
    from medvl.index import describe_target

    assert describe_target(Path(f"/data/{PATIENT_FOLDER}/scan.png")) == "scan.png"
    assert describe_target(f"/data/{PATIENT_FOLDER}/idx") == "idx"
    assert describe_target("postgresql://medvl:s3cret@db.example:5432/cases#chest") == \
        "postgresql://medvl:***@db.example:5432/cases#chest"
    # libpq also takes the password (and other secrets) as query parameters
    assert describe_target("postgresql://medvl@/cases?host=/run/pg&password=s3cret&port=5433#chest") == \
        "postgresql://medvl@/cases?host=/run/pg&password=***&port=5433#chest"
    assert describe_target("postgres://medvl@db/cases?sslpassword=s3cret&pass%77ord=s3cret&sslmode=require") \
        == "postgres://medvl@db/cases?sslpassword=***&pass%77ord=***&sslmode=require"
    # a URL the parser cannot read (a query entry that is not name=value, an unencoded '#' in a password) is
    # refused when used; shown, nothing of it but the scheme
    assert describe_target("postgres://medvl@db/cases?sslmode=require&s3cret") == "postgres://***"
    assert describe_target("postgresql://medvl:s3c#r?et@db/cases") == "postgresql://***"


def test_resolve_image_refuses_paths_leaving_the_data_root(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "data" / "link.png").symlink_to(tmp_path / "secret.png")
    hit = Hit(id="a", score=1.0, split="all", image_path="images/a.png")
    assert resolve_image(hit, tmp_path / "data") == tmp_path / "data" / "images" / "a.png"
    assert resolve_image(Hit(id="d", score=1.0, split="all"), tmp_path / "data") is None
    for escaping in ("../secret.png", str(tmp_path / "secret.png"), "link.png"):
        with pytest.raises(InputError, match="leaves the data root"):
            resolve_image(Hit(id="x", score=1.0, split="all", image_path=escaping), tmp_path / "data")
    with pytest.raises(DataError, match="not found under the data root"):
        resolve_image(Hit(id="m", score=1.0, split="all", image_path="images/missing.png"), tmp_path / "data")


def test_a_file_under_the_data_root_that_is_not_the_indexed_image_is_never_shown_as_the_case(
        phantom_dir, model_dir, tmp_path):
    """``index add --replace`` from another folder gives a case another image under the same relative path: the old
    file under the first data root is another patient's film, not the case's. It used to be listed (and shown as
    the service's thumbnail) because a file was there; the file's pixels are now checked against the case's hash.
    A file overwritten after a first check is caught too (the hash is cached per file version only)."""
    from medvl.data.phantom import generate_phantom

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    other = tmp_path / "other"
    generate_phantom(other, n=4, seed=9, size=64)  # other patients under the same ids as data's first 4
    index = tmp_path / "idx"
    build_index(load_model(model_dir), load_dataset(data), index, model_dir=model_dir, show_progress=False)
    result, output = invoke("index", "add", "--index", index, "--data", other, "--replace", "-q")
    assert result.exit_code == 0, output
    query = load_dataset(other)[3]
    relative = Path(query.image).relative_to(other).as_posix()
    assert (data / relative).read_bytes() != (other / relative).read_bytes()
    with open_index(index) as opened:
        [hit] = search_index(opened, load_model(model_dir), image=query.image, k=1)
    assert (hit.id, hit.image_path) == (query.id, relative) and "image_sha256" not in hit.to_dict()
    with pytest.raises(DataError, match=f"not the indexed image of case '{query.id}'"):  # medvl.index.ImageChanged
        resolve_image(hit, data)
    assert resolve_image(hit, other) == other / relative
    result, output = invoke("search", "--index", index, "--image", query.image, "-k", 1, "--data-root", data)
    assert result.exit_code == 0, output
    assert "1. - (the file under --data-root is not the indexed image)" in output, output
    assert str(data / relative) not in output.replace("\n", "")
    assert f"case '{query.id}'" in output  # the warning names the case
    result, output = invoke("search", "--index", index, "--image", query.image, "-k", 1, "--data-root", other)
    assert result.exit_code == 0 and f"1. {other / relative}" in output, output
    # a file overwritten with another image after it was checked (and its hash cached)
    shutil.copy(other / relative, tmp_path / "kept.png")
    shutil.copy(data / relative, other / relative)
    with pytest.raises(DataError, match="not the indexed image"):
        resolve_image(hit, other)
    (other / relative).write_bytes(b"not an image any more")
    with pytest.raises(DataError, match="not the indexed image"):
        resolve_image(hit, other)
    shutil.copy(tmp_path / "kept.png", other / relative)
    assert resolve_image(hit, other) == other / relative


def test_images_outside_the_dataset_root_store_no_path(patient_data, model_dir, tmp_path):
    """A manifest may reach outside its folder (when allowed): such a case keeps no path at all."""
    records = list(load_dataset(patient_data).select("test"))[:3]
    elsewhere = tmp_path / "data"
    elsewhere.mkdir()
    dataset = Dataset(records, source=str(elsewhere / "manifest.csv"))
    build_index(load_model(model_dir), dataset, tmp_path / "idx", model_dir=model_dir, show_progress=False)
    assert image_paths(tmp_path / "idx") == [None, None, None]
    assert leaks(tmp_path / "idx") == []


def test_absolute_image_paths_give_relative_ids_and_absolute_ids_are_refused(patient_data, model_dir, tmp_path):
    """A manifest without an id column names its records by their image paths: absolute ones become
    ids relative to the manifest's folder; an id column holding absolute paths is refused."""
    data = tmp_path / PATIENT_FOLDER
    (data / "images").mkdir(parents=True)
    rows = []
    for record in list(load_dataset(patient_data).select("test"))[:3]:
        shutil.copy(record.image, data / "images")
        rows.append(f"{data / 'images' / Path(record.image).name},{record.labels['finding']}")
    (data / "manifest.csv").write_text("image,finding\n" + "\n".join(rows) + "\n")
    dataset = load_dataset(data)
    assert all(r.id.startswith("images/") and PATIENT_FOLDER not in r.id for r in dataset)
    model = load_model(model_dir)
    build_index(model, dataset, tmp_path / "idx", model_dir=model_dir, show_progress=False)
    for stored in (tmp_path / "idx").rglob("*"):
        if stored.is_file():
            assert PATIENT_FOLDER.encode() not in stored.read_bytes(), stored.name
    with_ids = tmp_path / "with-ids"
    (with_ids / "images").mkdir(parents=True)
    shutil.copy(dataset[0].image, with_ids / "images" / "a.png")
    (with_ids / "manifest.csv").write_text(f"id,image,finding\n{with_ids / 'a'},images/a.png,x\n")
    with pytest.raises(DataError, match="1 case ids are absolute paths.*add an id column"):
        build_index(model, load_dataset(with_ids), tmp_path / "idx2", model_dir=model_dir, show_progress=False)
    assert not (tmp_path / "idx2").exists()
    with pytest.raises(DataError, match="climb above"):
        build_index(model, Dataset([Record(id="../x", images=[np.zeros((8, 8))])], source=str(data)),
                    tmp_path / "idx3", show_progress=False)


def _make_legacy(index: Path, data: Path) -> None:
    """Rewrite an index as medvl wrote it before paths were stored relative (format 1)."""
    info = json.loads((index / "index.json").read_text())
    info.update(format=1, data=str(data / "manifest.csv"))
    (index / "index.json").write_text(json.dumps(info))
    with closing(sqlite3.connect(index / "cases.sqlite")) as conn, conn:
        conn.execute("UPDATE cases SET image_path = ? || '/' || image_path", (str(data),))


def test_an_old_index_with_full_paths_is_readable_but_never_shows_them(patient_data, model_dir, tmp_path):
    index = tmp_path / "idx"
    data = load_dataset(patient_data).select("test")
    model = load_model(model_dir)
    build_index(model, data, index, model_dir=model_dir, show_progress=False)
    _make_legacy(index, patient_data)
    assert leaks(index)  # the old format holds the folder name: the check below can fail
    with open_index(index) as opened:
        hits = search_index(opened, model, image=data[0].image, k=3)
        assert hits[0].id == data[0].id and all(h.image_path is None for h in hits)
        assert set(opened.info["data"]) == {"source_sha256"}
    result, output = invoke("index", "info", "--index", index, "--json", tmp_path / "info.json")
    assert result.exit_code == 0, output
    result, output = invoke("search", "--index", index, "--image", data[0].image, "--json", tmp_path / "hits.json")
    assert result.exit_code == 0, output
    assert leaks(tmp_path / "info.json", tmp_path / "hits.json") == []
    with pytest.raises(DataError, match="rebuild it"):
        open_index(index, writable=True)
    result, output = invoke("index", "delete", data[0].id, "--index", index)  # not "another process": unlocked
    assert result.exit_code == 2 and "rebuild it" in output


# ------------------------------------------------------------------ output files and numeric options


@pytest.fixture(scope="module")
def small_index(patient_data, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("paths-index") / "idx"
    build_index(load_model(model_dir), load_dataset(patient_data).select("train"), out, model_dir=model_dir,
                show_progress=False)
    return out


def _json_commands(index: Path, data: Path, model: Path, out: Path) -> list[tuple]:
    image = load_dataset(data).select("test")[0].image
    return [
        ("index", "build", "--model", model, "--data", data, "--split", "val", "--out", out / "new", "-q"),
        ("index", "add", "--index", index, "--data", data, "--split", "val", "-q"),
        ("index", "info", "--index", index),
        ("search", "--index", index, "--text", "nodule", "-k", 2),
        ("report", "draft", image, "--index", index, "-k", 3),
        ("eval", "case-retrieval", "--index", index, "--data", data, "-k", 3, "-q"),
    ]


def test_every_json_output_refuses_an_existing_file_unless_overwrite(small_index, patient_data, model_dir,
                                                                      tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(small_index, index)
    target = tmp_path / "existing.json"
    for command in _json_commands(index, patient_data, model_dir, tmp_path):
        target.write_text("keep me")
        result, output = invoke(*command, "--json", target)
        assert result.exit_code == 2 and "file exists (use --overwrite" in output, (command[:2], output)
        assert target.read_text() == "keep me"
        assert command[1] != "build" or not (tmp_path / "new").exists()  # refused before building
        result, output = invoke(*command, "--json", target, "--overwrite")
        assert result.exit_code == 0, (command[:2], output)
        assert json.loads(target.read_text())
    assert json.loads(target.read_text())["n_queries"] == 19
    (tmp_path / "folder.json").mkdir()
    result, output = invoke("index", "info", "--index", index, "--json", tmp_path / "folder.json", "--overwrite")
    assert result.exit_code == 2 and "is a folder" in output


@pytest.mark.parametrize("args, message", [
    (["search", "--text", "nodule", "-k", 0], "--k must be >= 1"),
    (["search", "--text", "nodule", "-k", 10_001], "--k must be <= 10000"),
    (["index", "build", "--model", "MODEL", "--data", "MISSING", "--out", "OUT", "--batch-size", 0],
     "--batch-size must be >= 1"),
    (["index", "add", "--data", "MISSING", "--batch-size", -3], "--batch-size must be >= 1"),
    (["report", "draft", "IMAGE", "-k", 0], "--k must be >= 1"),
    (["report", "draft", "IMAGE", "--related", -1], "--related must be >= 0"),
    (["report", "draft", "IMAGE", "--min-support", 1.0], "--min-support must be < 1"),
    (["report", "draft", "IMAGE", "--min-similarity", "nan"], "--min-similarity must be a finite number"),
    (["report", "draft", "IMAGE", "--min-similarity", 2], "--min-similarity must be <= 1"),
    (["eval", "case-retrieval", "--data", "MISSING", "--map-depth", 0], "--map-depth must be >= 1"),
    (["eval", "case-retrieval", "--data", "MISSING", "-k", 1001], "--k must be <= 1000"),
    (["eval", "case-retrieval", "--data", "MISSING", "--draft-k", 0], "--draft-k must be >= 1"),
])
def test_numeric_options_are_checked_before_any_work(small_index, model_dir, tmp_path, args, message):
    """Each command fails on the number alone, naming its own option: the data path is missing and no output is
    created."""
    swap = {"MODEL": model_dir, "MISSING": tmp_path / "missing", "OUT": tmp_path / "new", "IMAGE": tmp_path / "no.png"}
    args = [swap.get(a, a) if isinstance(a, str) else a for a in args]
    index = [] if args[:2] == ["index", "build"] else ["--index", small_index]
    result, output = invoke(*args, *index)
    assert result.exit_code == 2 and message in output and "Traceback" not in output, output
    assert not (tmp_path / "new").exists()


def test_library_entry_points_check_numbers_first(small_index, patient_data, model_dir, tmp_path):
    from medvl.eval.case_retrieval import case_retrieval
    from medvl.index import add_records
    from medvl.rag import draft_report, load_knowledge

    model, data = load_model(model_dir), load_dataset(patient_data).select("test")
    with pytest.raises(InputError, match="batch_size must be a whole number"):
        build_index(model, data, tmp_path / "new", batch_size=2.5, show_progress=False)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))
    with open_index(small_index) as index:
        with pytest.raises(InputError, match="k must be >= 1"):
            search_index(index, model, image=tmp_path / "missing.png", k=0)  # before reading the image
        with pytest.raises(InputError, match="related must be >= 0"):
            draft_report(index, model, tmp_path / "missing.png", related=-2)
        with pytest.raises(InputError, match="map_depth must be >= 1"):
            case_retrieval(index, model, data, map_depth=0, show_progress=False)
        with pytest.raises(InputError, match="k must be a whole number"):
            index.search(np.zeros((1, 64), np.float32), k=float("nan"))
    with open_index(small_index) as index, pytest.raises(InputError, match="batch_size must be >= 1"):
        add_records(index, model, data, batch_size=0, show_progress=False)
    with pytest.raises(InputError, match="k must be >= 1"):
        load_knowledge().retrieve(model, "effusion", k=0)


# ------------------------------------------------------------------ PostgreSQL + pgvector


@pytest.fixture(scope="module")
def pg_server():
    with postgres_server("medvl-pg-paths-") as running:
        yield running


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_stores_relative_paths_and_none_for_dicom(pg_server, patient_data, dicom_data, model_dir, tmp_path):
    import psycopg

    server, folder = pg_server
    model = load_model(model_dir)
    data = load_dataset(patient_data).select("test")
    url = server.get_uri() + "#patient_paths"
    build_index(model, data, url, model_dir=model_dir, show_progress=False)
    build_index(model, load_dataset(dicom_data), server.get_uri() + "#dicom_paths", model_dir=model_dir,
                show_progress=False)
    with open_index(url) as index:
        hits = search_index(index, model, image=data[0].image, k=2)
        assert hits[0].image_path == Path(data[0].image).relative_to(patient_data).as_posix()
        assert hits[0].image_sha256 is not None  # what resolve_image checks the file against, as on FAISS
        assert resolve_image(hits[0], patient_data) == patient_data / hits[0].image_path
        assert set(index.info["data"]) == {"source_sha256", "n_records"}
    result, output = invoke("search", "--index", url, "--image", data[0].image, "--json", tmp_path / "hits.json")
    assert result.exit_code == 0, output
    with psycopg.connect(server.get_uri()) as conn:
        assert conn.execute("SELECT count(*) FROM dicom_paths WHERE image_path IS NOT NULL").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM patient_paths WHERE image_path LIKE 'images/%'").fetchone()[0] == 19
    server.psql("CHECKPOINT;")  # table pages and WAL on disk
    assert leaks(folder, tmp_path / "hits.json") == []


def test_hits_added_from_another_folder_are_said_under_data_root_not_a_failure(patient_data, model_dir, tmp_path):
    """A case added from a second folder has a path relative to that folder: under the first folder's
    --data-root its line says it is not there, the other hits resolve, the JSON is written and the exit is 0;
    a --data-root that is no folder is refused before anything is printed."""
    import csv

    index = tmp_path / "idx"
    build_index(load_model(model_dir), load_dataset(patient_data).select("train"), index, model_dir=model_dir,
                show_progress=False)
    extra = tmp_path / "extra"
    (extra / "images").mkdir(parents=True)
    rows = list(csv.DictReader((patient_data / "manifest.csv").open(newline="")))
    row = next(r for r in rows if r["split"] == "test")
    shutil.copyfile(patient_data / row["image"], extra / "images" / "added.png")
    with (extra / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow({**row, "image": "images/added.png"})
    result, output = invoke("index", "add", "--index", index, "--data", extra, "-q")
    assert result.exit_code == 0, output
    result, output = invoke("search", "--index", index, "--image", extra / "images" / "added.png", "-k", 3,
                            "--data-root", patient_data, "--json", tmp_path / "hits.json")
    assert result.exit_code == 0, output
    text = " ".join(output.split())
    assert f"1. - (not found under {patient_data}" in text
    assert "1 of 3 hits have no image file under --data-root" in text
    assert f"2. {patient_data}" in text and len(json.loads((tmp_path / "hits.json").read_text())["hits"]) == 3
    result, output = invoke("search", "--index", index, "--text", "nodule", "--data-root", tmp_path / "none")
    assert result.exit_code == 2 and "--data-root" in output and "closest" not in output


DAMAGES = {  # what is changed in index.json -> what the one-line error names
    "a list": (lambda info: [1, 2], "not a JSON object"),
    "embed_dim text": (lambda info: {**info, "embed_dim": "32"}, "embed_dim must be a number"),
    "embed_dim zero": (lambda info: {**info, "embed_dim": 0}, "embed_dim must be >= 1"),
    "columns list": (lambda info: {**info, "columns": ["finding"]}, "columns must map"),
    # these made a KeyError or AttributeError traceback, or (images left out) "the index holds no case to return"
    "model missing": (lambda info: {k: v for k, v in info.items() if k != "model"}, "model is missing"),
    "model text": (lambda info: {**info, "model": "x"}, "model is a str, not an object"),
    "model dir number": (lambda info: {**info, "model": {**info["model"], "dir": 5}}, "model.dir must be a string"),
    "images empty": (lambda info: {**info, "images": {}}, "images.kind must be one of flat, hnsw, ivfpq"),
    "images missing": (lambda info: {k: v for k, v in info.items() if k != "images"}, "images is missing"),
    "texts missing": (lambda info: {k: v for k, v in info.items() if k != "texts"}, "does not describe text.faiss"),
    "texts recall text": (lambda info: {**info, "texts": {**info["texts"], "recall_at_10": "1"}},
                          "texts.recall_at_10 must be a number"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_index_json_is_one_line_naming_it(damage, patient_data, model_dir, tmp_path):
    """index.json holding a JSON list made `medvl search` (and `serve --index`) crash with an AttributeError; so did
    a missing or odd model, and an empty images block (KeyError); without its images block, an index of cases
    answered that it held none. Each is one line naming index.json and the field, exit 2."""
    index = tmp_path / "idx"
    build_index(load_model(model_dir), load_dataset(patient_data).select("test"), index, model_dir=model_dir,
                show_progress=False)
    change, problem = DAMAGES[damage]
    (index / "index.json").write_text(json.dumps(change(json.loads((index / "index.json").read_text()))))
    with pytest.raises(DataError, match=f"^{index / 'index.json'}: {problem}"):
        open_index(index)
    for command in (["search", "--index", index, "--text", "effusion"], ["index", "info", "--index", index]):
        result, output = invoke(*command)
        assert result.exit_code == 2, output
        assert "Traceback" not in output and problem in " ".join(output.split()), output
