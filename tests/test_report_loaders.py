"""Report and VQA loaders: IU X-ray report XML, the Figure 1 table, VQA-RAD / SLAKE JSON.

Real shared data where it exists (skipped without it), small files written here for edge cases.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medvl
from cli_helpers import invoke
from medvl.data.loaders import iu_xray, load_dataset, load_iu_xray, load_vqa
from medvl.data.loaders.iu_xray import clean_report_text, iter_iu_reports, report_labels
from medvl.data.record import hash_split
from medvl.errors import DataError, InputError

# ---------------------------------------------------------------- helpers


def report_xml(uid: str = "CXR9", findings: str = "Heart size is normal. No XXXX effusion.",
               impression: str = "Normal chest x-XXXX.", major: tuple[str, ...] = ("normal",),
               images: tuple[str, ...] = ("CXR9_IM-0001-1001",)) -> bytes:
    terms = "".join(f"<major>{term}</major>" for term in major)
    parents = "".join(f'<parentImage id="{image}"><figureId>F1</figureId></parentImage>' for image in images)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="{uid}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">XXXX-year-old male, cough.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation><MeSH>{terms}<automatic>effusion</automatic></MeSH>{parents}</eCitation>
""".encode()


def write_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<eCitation><uId id="CXR1"/><AbstractText Label="FINDINGS">&lol3;</AbstractText></eCitation>
"""

# ---------------------------------------------------------------- IU X-ray reports, real archive


@pytest.fixture(scope="module")
def iu_dataset(shared_data):
    return load_dataset(shared_data / "iu-xray-reports")


def test_iu_archive_streams_every_report(shared_data):
    reports = list(iter_iu_reports(shared_data / "iu-xray-reports" / "NLMCXR_reports.tgz"))
    assert len(reports) == 3955 and len({r.uid for r in reports}) == 3955
    first = next(r for r in reports if r.uid == "CXR1")
    assert first.member == "ecgen-radiology/1.xml"
    assert first.sections["INDICATION"] == "Positive TB test"
    assert first.sections["FINDINGS"].startswith("The cardiac silhouette and mediastinum size are within normal")
    assert "There are no [redacted] of a pleural effusion." in first.sections["FINDINGS"]
    assert first.sections["IMPRESSION"] == "Normal chest x-ray."  # "x-XXXX" restored
    assert first.mesh_major == ["normal"]
    assert [image.id for image in first.images] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert Counter(len(r.images) for r in reports)[0] == 104  # reports whose images are not listed
    assert sum("FINDINGS" not in r.sections for r in reports) == 530


def test_iu_records_text_labels_and_splits(iu_dataset):
    assert len(iu_dataset) == 3927  # 28 reports have neither FINDINGS nor IMPRESSION
    assert iu_dataset.source.endswith("NLMCXR_reports.tgz")
    assert iu_dataset.default_labels == ["status"]
    assert {"cardiomegaly", "pleural_effusion", "atelectasis", "opacity", "nodule"} <= set(iu_dataset.label_names)
    assert all("XXXX" not in r.text and not any("XXXX" in v for v in r.meta.values()) for r in iu_dataset)
    by_id = {r.id: r for r in iu_dataset}
    normal, abnormal = by_id["CXR1"], by_id["CXR1000"]
    assert normal.labels["status"] == "normal" and normal.labels["cardiomegaly"] == "0"
    assert normal.text.endswith("There is no evidence of pneumothorax. Normal chest x-ray.")
    assert abnormal.labels["status"] == "abnormal"
    assert [abnormal.labels[c] for c in ("opacity", "atelectasis", "cardiomegaly")] == ["1", "1", "0"]
    assert abnormal.meta["mesh_major"].startswith("Opacity/lung/upper lobe/right; Pulmonary Atelectasis")
    assert abnormal.meta["views"] == "PA"  # from nlmcxr_dicom_metadata.csv.gz
    assert normal.images == [] and normal.meta["image_ids"] == "CXR1_1_IM-0001-3001; CXR1_1_IM-0001-4001"
    assert normal.meta["views"] == "PA"  # the table writes its images CXR1_IM-0001-3001 / -4001
    with pytest.raises(InputError, match="'CXR1' has no image"):
        _ = normal.image
    assert Counter(r.labels.get("status") for r in iu_dataset) == {"abnormal": 2463, "normal": 1363, None: 101}
    assert sum(r.labels.get("cardiomegaly") == "1" for r in iu_dataset) == 375
    splits = Counter(r.split for r in iu_dataset)
    assert splits == {"train": 3121, "val": 395, "test": 411}
    assert all(r.split == hash_split(r.id) for r in iu_dataset)
    assert len(iu_dataset.select("val")) == 395


def test_iu_image_ids_with_open_is_inner_number_find_their_view(tmp_path):
    """Report CXR1 names its images ``CXR1_1_IM-0001-3001`` where the metadata table writes ``CXR1_IM-0001-3001``
    (2 of the 7,470 image ids of the shared archive): they got no view position. An id found as written still wins."""
    write_tgz(tmp_path / "NLMCXR_reports.tgz", {
        "ecgen-radiology/1.xml": report_xml("CXR1", images=("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")),
        "ecgen-radiology/2.xml": report_xml("CXR2", images=("CXR2_IM-0002-1001", "CXR2_3_IM-0002-2001")),
    })
    table = "imageid,View Position\nCXR1_IM-0001-3001,PA\nCXR1_IM-0001-4001,LATERAL\nCXR2_IM-0002-1001,AP\n" \
            "CXR2_3_IM-0002-2001,LL\nCXR2_IM-0002-2001,PA\n"
    with gzip.open(tmp_path / iu_xray.METADATA_NAME, "wt", encoding="utf-8") as handle:
        handle.write(table)
    views = {r.id: r.meta.get("views") for r in load_iu_xray(tmp_path)}
    assert views == {"CXR1": "PA; LATERAL", "CXR2": "AP; LL"}


def test_iu_sections_choice_and_no_views(shared_data):
    archive = shared_data / "iu-xray-reports" / "NLMCXR_reports.tgz"
    findings_only = load_iu_xray(archive, sections=["findings"], views=False)
    assert len(findings_only) == 3955 - 530
    assert "views" not in {key for r in findings_only for key in r.meta}
    with pytest.raises(InputError, match="sections must be some of"):
        load_iu_xray(archive, sections=["HISTORY"])


# ---------------------------------------------------------------- IU X-ray reports, written here


def test_report_archive_written_here(tmp_path, caplog):
    write_tgz(tmp_path / "reports.tgz", {
        "ecgen-radiology/9.xml": report_xml(major=("Cardiomegaly/mild", "Pleural Effusion/bilateral/small")),
        "ecgen-radiology/README.txt": b"not a report",
        "ecgen-radiology/._9.xml": b"\x00\x05\x16\x07 AppleDouble",
        "ecgen-radiology/10.xml": report_xml(uid="CXR10", findings="", impression=""),
    })
    with caplog.at_level(logging.INFO):
        dataset = load_dataset(tmp_path)  # the folder holding the archive
    assert "skipped 2 non-XML members" in caplog.text and "skipped 1 of 2 reports" in caplog.text
    assert "Heart size" not in caplog.text  # report text never logged
    [record] = dataset.records
    assert record.id == "CXR9" and record.text == "Heart size is normal. No [redacted] effusion. Normal chest x-ray."
    assert record.meta["indication"] == "[redacted]-year-old male, cough."
    assert record.labels["status"] == "abnormal"
    assert record.labels["cardiomegaly"] == record.labels["pleural_effusion"] == "1"
    assert record.labels["atelectasis"] == "0" and record.meta["mesh_automatic"] == "effusion"


def test_an_open_i_folder_with_the_reports_and_the_image_archive_loads_the_reports(tmp_path):
    write_tgz(tmp_path / "NLMCXR_reports.tgz", {"ecgen-radiology/9.xml": report_xml()})
    write_tgz(tmp_path / "NLMCXR_png.tgz", {"CXR9_IM-0001-1001.png": b"not really a png"})
    dataset = load_dataset(tmp_path)
    assert dataset.source == str(tmp_path / "NLMCXR_reports.tgz") and [r.id for r in dataset] == ["CXR9"]
    (tmp_path / "NLMCXR_reports.tgz").rename(tmp_path / "NLMCXR_xml.tgz")  # no "report": the nlmcxr one not of images
    assert [r.id for r in load_dataset(tmp_path)] == ["CXR9"]
    write_tgz(tmp_path / "old_reports.tgz", {"ecgen-radiology/9.xml": report_xml()})
    write_tgz(tmp_path / "new_reports.tgz", {"ecgen-radiology/9.xml": report_xml()})
    with pytest.raises(DataError, match=r"2 report archives \(new_reports\.tgz, old_reports\.tgz\): pass one"):
        load_dataset(tmp_path)


def test_image_commands_refuse_a_text_only_dataset_naming_its_file(tmp_path):
    """A report archive has no image: each image command says so once, naming the archive (not a record id) and
    what text-only data serves, before anything is trained or written; it never suggests the command refused."""
    archive = write_tgz(tmp_path / "NLMCXR_reports.tgz", {
        f"ecgen-radiology/{i}.xml": report_xml(uid=f"CXR{i}", major=("normal",) if i % 2 else ("Cardiomegaly",))
        for i in range(1, 9)})
    medvl.create_model("phantom-tiny").save_pretrained(tmp_path / "model")
    commands = (("eval", "retrieval", "--model", tmp_path / "model", "--data", archive, "--split", "all"),
                ("eval", "zero-shot", "--model", tmp_path / "model", "--data", archive, "--split", "all"),
                ("eval", "linear-probe", "--model", tmp_path / "model", "--train-data", archive, "--train-split",
                 "all", "--test-data", archive, "--test-split", "all", "-l", "status"),
                ("train", "--data", archive, "--split", "all", "--model", "phantom-tiny", "--out", tmp_path / "run",
                 "--max-steps", 1, "-l", "status"))
    for command in commands:
        result, output = invoke(*command, "-q")
        assert result.exit_code == 2, output
        line = " ".join(output.split())
        assert f"error: {archive}: a text-only dataset (8 records, none with an image)" in line, line
        assert "medvl.load_dataset" in line and "medvl.rag.labels" in line
        # no record id (CXR1...; the archive's name, NLMCXR_reports, may be wrapped by the log's line breaks)
        assert not re.search(r"(?<![A-Za-z])CXR\d", line) and "retrieval" not in line and "Traceback" not in output
    assert not (tmp_path / "run").exists()
    dataset = load_dataset(archive)
    with pytest.raises(InputError, match="'CXR1' has no image"):
        _ = dataset.records[0].image  # a record alone knows no file: its id, and what such data is for
    mixed = dataset.subset([dataset.records[0], dataclasses.replace(dataset.records[1], images=[np.zeros((4, 4))])])
    with pytest.raises(InputError, match=r"NLMCXR_reports\.tgz: 1 of its 2 records have no image"):
        mixed.for_spatial_dims(2)


def test_entity_expansion_bomb_is_refused(tmp_path):
    archive = write_tgz(tmp_path / "NLMCXR_reports.tgz", {"ecgen-radiology/1.xml": BOMB})
    with pytest.raises(DataError, match=r"NLMCXR_reports\.tgz: member ecgen-radiology/1\.xml: refused unsafe XML"):
        load_dataset(archive)


def test_external_entity_is_refused(tmp_path):
    xxe = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><eCitation>&x;</eCitation>'
    archive = write_tgz(tmp_path / "reports.tar.gz", {"a/1.xml": xxe})
    with pytest.raises(DataError, match="refused unsafe XML"):
        load_iu_xray(archive)


def test_malformed_xml_names_member_and_position(tmp_path):
    archive = write_tgz(tmp_path / "reports.tgz", {"a/1.xml": report_xml(), "a/2.xml": b"<eCitation><uId id='2'>"})
    with pytest.raises(DataError, match=r"member a/2\.xml: not well-formed XML \(line 1, column"):
        load_iu_xray(archive)


def test_broken_and_odd_archives(tmp_path, monkeypatch):
    fake = tmp_path / "fake.tgz"
    fake.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"fake\.tgz: not a readable tar archive"):
        load_iu_xray(fake)
    only_text = write_tgz(tmp_path / "notes_reports.tgz", {"readme.txt": b"hello"})
    with pytest.raises(DataError, match="no report with FINDINGS / IMPRESSION text"):
        load_iu_xray(only_text)
    twice = write_tgz(tmp_path / "twice.tgz", {"a/1.xml": report_xml(), "b/1.xml": report_xml()})
    with pytest.raises(DataError, match="duplicate report id 'CXR9'"):
        load_iu_xray(twice)
    whole = write_tgz(tmp_path / "whole.tgz", {f"a/{i}.xml": report_xml(uid=f"CXR{i}") for i in range(40)})
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.tgz: not a readable tar archive"):
        load_iu_xray(cut)
    latin1_xml = report_xml(findings="Caf\xe9").replace("\xe9".encode(), b"\xe9")  # a Latin-1 byte in UTF-8 XML
    latin1 = write_tgz(tmp_path / "latin1.tgz", {"a/1.xml": latin1_xml})
    with pytest.raises(DataError, match=r"member a/1\.xml: not well-formed XML"):
        load_iu_xray(latin1)
    monkeypatch.setattr(iu_xray, "MAX_MEMBER_BYTES", 100)
    with pytest.raises(DataError, match="over the 100-byte limit"):
        load_iu_xray(write_tgz(tmp_path / "big.tgz", {"a/1.xml": report_xml()}))


def test_placeholder_handling():
    text = "Normal chest x-XXXX. XXXX, XXXX. Stable XXXX/XXXX, and XXXX-year-old male. No XXXX   effusion."
    assert clean_report_text(text) == ("Normal chest x-ray. [redacted]. Stable [redacted], and [redacted]-year-old "
                                       "male. No [redacted] effusion.")
    assert clean_report_text(text, redaction="") == "Normal chest x-ray. Stable, and year-old male. No effusion."
    assert clean_report_text("XXXX XXXX.", redaction="") == ""


def test_report_labels_rules():
    assert report_labels(["normal"])["status"] == "normal"
    assert report_labels(["No Indexing"]) == {}
    assert report_labels(["Technical Quality of Image Unsatisfactory ", "No Indexing"]) == {}
    labels = report_labels(["Technical Quality of Image Unsatisfactory ", "Hernia, Hiatal/small", "Granuloma"])
    assert labels["status"] == "abnormal" and labels["hernia"] == labels["granuloma"] == "1"
    assert set(labels.values()) == {"abnormal", "0", "1"}


def test_hash_split_is_stable_and_balanced():
    assert hash_split("CXR1") == hash_split("CXR1") == "train"
    counts = Counter(hash_split(f"case-{i}") for i in range(5000))
    assert abs(counts["train"] / 5000 - 0.8) < 0.03 and abs(counts["test"] / 5000 - 0.1) < 0.02


# ---------------------------------------------------------------- Figure 1 table


def test_figure1_notes_finding_and_meta(shared_data):
    dataset = load_dataset(shared_data / "figure1-covid-cxr")
    assert len(dataset) == 55 and dataset.default_labels == ["finding"]
    by_id = {record.id: record for record in dataset}
    record = by_id["COVID-00001"]
    assert record.text.startswith("O2 saturation was initially 58% on room air")
    assert record.labels["finding"] == "COVID-19"
    assert {key: record.meta[key] for key in ("view", "modality", "age", "sex")} == {
        "view": "AP erect", "modality": "X-ray", "age": "33", "sex": "M"}
    assert "notes" not in record.meta and record.image.is_file()
    assert by_id["COVID-00022"].text is None  # an empty notes cell: kept, no text (6 rows)
    assert by_id["COVID-00005"].text is None  # the note 'N/A' is no text either (it was read as a report)
    assert sum(r.text is None for r in dataset) == 7
    assert all(r.image.is_file() for r in dataset)
    labelled = load_dataset(shared_data / "figure1-covid-cxr", label_columns=dataset.default_labels)
    assert len(labelled) == 40


def _figure1_copy(folder: Path, missing: set[str]) -> Path:
    folder.mkdir()
    (folder / "images").mkdir()
    rows = ["patientid,sex,age,finding,view,modality,notes"]
    for index in range(3):
        pid = f"COVID-{index:05d}"
        rows.append(f'{pid},F,40,COVID-19,PA,X-ray,"Fever, {index} days."')
        if pid not in missing:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "images" / f"{pid}.jpg")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_figure1_missing_images_are_skipped_and_counted(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(_figure1_copy(tmp_path / "fig1", missing={"COVID-00001"}))
    assert [r.id for r in dataset] == ["COVID-00000", "COVID-00002"]
    assert "skipped 1 of 3 rows whose image file is missing (first: line 3)" in caplog.text
    assert "Fever" not in caplog.text
    everything_missing = _figure1_copy(tmp_path / "none", missing={f"COVID-{i:05d}" for i in range(3)})
    with pytest.raises(DataError, match="3 of 3 image files not found"):
        load_dataset(everything_missing)


def test_other_manifests_still_fail_on_missing_images(tmp_path):
    (tmp_path / "manifest.csv").write_text("image,label\na.png,x\n")
    with pytest.raises(DataError, match="1 of 1 image files not found"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------- VQA-RAD / SLAKE


def test_vqa_rad_real(shared_data):
    folder = shared_data / "vqa-rad"
    items = load_vqa(folder / "trainset.json")
    assert len(items) == 3064 and {item.split for item in items} == {"train"}
    assert Counter(item.answer_type for item in items) == {"CLOSED": 1823, "OPEN": 1241}  # 2 were "CLOSED "
    first = items[0]
    assert (first.qid, first.question, first.answer, first.answer_normalized) == (
        "1", "Are regions of the brain infarcted?", "Yes", "yes")
    assert (first.question_type, first.organ, first.modality) == ("PRES", "HEAD", None)
    assert first.image == folder / "images" / "synpic54610.jpg" and first.image.is_file()
    count = next(item for item in items if item.qid == "2392")
    assert count.answer == count.answer_normalized == "4"  # a JSON number in the file
    dataset = load_dataset(folder)  # the folder: answer_all_list.json is not a question file
    assert len(dataset) == 3064 and dataset.splits == ["train"] and dataset.default_labels == ["answer_type"]
    record = dataset[0]
    assert record.id == "1" and record.text == first.question and record.image == first.image
    assert record.labels == {"answer_type": "CLOSED"}
    assert record.meta["answer"] == "Yes" and record.meta["organ"] == "HEAD" and record.meta["qid"] == "1"
    assert len({r.image for r in dataset}) == 314


def _slake_folder(folder: Path) -> Path:
    (folder / "imgs" / "xmlab1").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "imgs" / "xmlab1" / "source.jpg")
    item = {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?",
            "answer": " Lung. ", "q_lang": "en", "location": "Lung", "modality": "CT",
            "answer_type": "OPEN", "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"],
            "qid": 7}
    (folder / "train.json").write_text(json.dumps([item]))
    (folder / "validate.json").write_text(json.dumps([{**item, "answer_type": "CLOSED", "answer": "Yes"}]))
    (folder / "answers.json").write_text(json.dumps(["yes", "no"]))
    return folder


def test_slake_keys_and_folder_splits(tmp_path):
    items = load_vqa(_slake_folder(tmp_path / "slake"))
    assert [item.split for item in items] == ["train", "validate"]
    item = items[0]
    assert (item.answer, item.answer_normalized, item.answer_type) == ("Lung.", "lung", "OPEN")
    assert (item.organ, item.modality, item.language, item.question_type) == ("Lung", "CT", "en", "Organ")
    assert item.image == tmp_path / "slake" / "imgs" / "xmlab1" / "source.jpg"
    dataset = load_dataset(tmp_path / "slake")
    assert [r.id for r in dataset] == ["train/7", "validate/7"]  # qids repeat across files
    assert dataset.select("validate")[0].labels == {"answer_type": "CLOSED"}


def test_vqa_missing_key_names_file_item_and_key(tmp_path):
    path = tmp_path / "trainset.json"
    path.write_text(json.dumps([{"qid": 5, "image_name": "a.jpg", "question": "Is it?"}]))
    with pytest.raises(DataError, match=r"trainset\.json: item 0 \(qid 5\): missing or empty 'answer'"):
        load_dataset(path)
    path.write_text(json.dumps([{"qid": 5, "answer": "no", "question": "Is it?"}]))
    with pytest.raises(DataError, match="missing or empty 'image_name' / 'img_name'"):
        load_vqa(path)


def test_vqa_unknown_answer_type_and_answer_empty_once_normalised_are_refused(tmp_path):
    """An answer type other than CLOSED / OPEN was kept (counted in neither n_closed nor n_open, ignored by the
    type head), and an answer "." passed the empty check but became the empty answer, a class a model could give
    and that scored 1.0 against itself; each is one DataError naming the file, the item and the value."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "train.json"
    good = {"qid": 1, "image_name": "a.png", "question": "Is there a nodule?", "answer": "Yes", "answer_type": "closed"}
    path.write_text(json.dumps([good, {**good, "qid": 4, "answer": "no", "answer_type": "yes/no"}]))
    with pytest.raises(DataError, match=r"train\.json: item 1 \(qid 4\): 'answer_type' is 'yes/no'; expected CLOSED "
                                        "or OPEN"):
        load_vqa(path)
    path.write_text(json.dumps([good, {**good, "qid": 3, "answer": " . ", "answer_type": "OPEN"}]))
    with pytest.raises(DataError, match=r"train\.json: item 1 \(qid 3\): 'answer' '\.' is empty once normalised"):
        load_vqa(path)
    path.write_text(json.dumps([good, {**good, "qid": 2, "answer": "left.", "answer_type": " Open "}]))
    assert [(item.answer_normalized, item.answer_type) for item in load_vqa(path)] == [("yes", "CLOSED"),
                                                                                        ("left", "OPEN")]


def test_vqa_options_are_kept_normalised_and_must_hold_the_answer(tmp_path):
    """A question's answer choices (the phantom's ``options``) were dropped, so a VLM's closed question was scored
    among answers other questions happened to have; they are kept, and a list without the answer is refused."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    path = tmp_path / "test.json"
    good = {"qid": 1, "image_name": "a.png", "question": "Is the ratio below 0.45, 0.45 to 0.50, or above 0.50?",
            "answer": ">0.50", "answer_type": "CLOSED", "options": ["<0.45", "0.45-0.50", ">0.50.", " >0.50"]}
    plain = {**good, "qid": 2, "answer": "yes"}
    del plain["options"]
    path.write_text(json.dumps([good, plain]))
    assert [item.options for item in load_vqa(path)] == [("<0.45", "0.45-0.50", ">0.50"), ()]
    for index, (options, message) in enumerate([(["<0.45", "0.45-0.50"], r"the answer is not one of its 2 'options'"),
                                                 ("yes or no", "'options' must be a non-empty array"),
                                                 ([], "'options' must be a non-empty array"),
                                                 ([">0.50", {"a": 1}], "'options' must be a non-empty array")]):
        path.write_text(json.dumps([plain, {**good, "qid": 9 + index, "options": options}]))
        with pytest.raises(DataError, match=rf"test\.json: item 1 \(qid {9 + index}\): {message}"):
            load_vqa(path)


def test_vqa_bad_bytes_and_bad_json(tmp_path):
    path = tmp_path / "testset.json"
    path.write_bytes(b'[{"question": "Is it \xe9?", "answer": "no", "image_name": "a.jpg"}]')
    with pytest.raises(DataError, match=r"testset\.json: not valid UTF-8 \(byte offset 21"):
        load_vqa(path)
    path.write_text('[{"question": "Is it?", "answer": "no", "image_name": "a.jpg"},]')
    with pytest.raises(DataError, match=r"testset\.json: not valid JSON \(line 1"):
        load_dataset(path)
    path.write_text('{"question": "Is it?", "answer": "no", "image_name": "a.jpg"}')
    with pytest.raises(DataError, match="expected a non-empty JSON array of question objects, got dict"):
        load_vqa(path)


def test_vqa_missing_image_error_or_counted_skip(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "a.jpg")
    path = tmp_path / "trainset.json"
    path.write_text(json.dumps([
        {"qid": 1001, "image_name": "a.jpg", "question": "Is it?", "answer": "no", "answer_type": "CLOSED"},
        {"qid": 1002, "image_name": "gone.jpg", "question": "Is it?", "answer": "no", "answer_type": "CLOSED"},
    ]))
    with pytest.raises(DataError, match=r"question 1002: image file 'gone\.jpg' not found \(looked in .*images"):
        load_vqa(path)
    with caplog.at_level(logging.WARNING):
        items = load_vqa(path, skip_missing_images=True)
    assert [item.qid for item in items] == ["1001"]
    # the log counts and gives the position in the file, not the id from the data
    assert "skipped 1 of 2 questions whose image file is missing (first: question 2 of the file)" in caplog.text
    assert "1002" not in caplog.text
