"""The case index: build, search (image/text, filtered), add, delete, duplicates, bad queries,
a real SIGKILL during a build, and the same API against a real PostgreSQL with pgvector."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cli_helpers import interrupted_build, postgres_server
from cli_helpers import invoke as medvl
from medvl import DataError, InputError, ModelError, create_model, load_dataset, load_model
from medvl.cli.index import index_app, search_command
from medvl.data.record import Dataset, Record
from medvl.index import Case, add_records, build_index, compile_where, open_index, search_index
from medvl.index.ann import choose_kind
from medvl.index.base import IndexDamaged, tokenizer_sha256
from medvl.index.cases import quote_column
from medvl.index.search import embed_query
from medvl.rag import load_knowledge

REPO_ROOT = Path(__file__).resolve().parents[1]
INJECTIONS = ["sex='F'; DROP TABLE cases", "1=1 or sex = 'x' --", "sex = 'F' --", "age > 60 union select 1",
              "sex = 'F' or 1", "lower(sex) = 'f'", "sex = `F`", "\"m_sex\" = 'F'", "sex = 'F' /* */", "sex = 'F"]


@pytest.fixture(scope="module")
def dataset(phantom_dir):
    return load_dataset(phantom_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("retrieval") / "model"
    create_model("phantom-tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def built(model, model_dir, dataset, tmp_path_factory):
    """An index of all 96 phantom cases; tests that change an index work on a copy."""
    out = tmp_path_factory.mktemp("index") / "idx"
    info = build_index(model, dataset, out, model_dir=model_dir, batch_size=32, show_progress=False)
    return out, info


@pytest.fixture()
def index_copy(built, tmp_path):
    copy = tmp_path / "idx"
    shutil.copytree(built[0], copy)
    return copy


def test_build_writes_the_folder_layout_and_records_model_and_recall(built, dataset):
    out, info = built
    assert {p.name for p in out.iterdir()} == {"index.faiss", "text.faiss", "cases.sqlite", "index.json",
                                                 "filters.safetensors"}
    saved = json.loads((out / "index.json").read_text())
    assert saved["embed_dim"] == 64 and saved["model"]["config_sha256"] and saved["model"]["weights_sha256"]
    assert saved["images"]["kind"] == "flat" and saved["images"]["recall_at_10"] == 1.0
    assert saved["columns"]["age"] == "number" and saved["columns"]["sex"] == "text"
    assert info["n_cases"] == len(dataset) == 96 and info["duplicates"] == []
    assert not list(out.parent.glob(".idx.build*")) and not list(out.parent.glob(".idx.old*"))


def test_choose_kind_by_collection_size():
    assert [choose_kind(n) for n in (10, 49_999, 50_000, 1_999_999, 2_000_000)] == \
        ["flat", "flat", "hnsw", "hnsw", "ivfpq"]


def test_image_search_matches_a_plain_reference(built, model, dataset):
    with open_index(built[0]) as index:
        record = dataset[5]
        hits = search_index(index, model, image=record.image, k=10)
        assert hits[0].id == record.id and hits[0].score == pytest.approx(1.0, abs=1e-4)
        # reference: the model's own embeddings, ranked by a full matrix product
        vectors = model.encode_images([r.image for r in dataset]).numpy()
        scores = vectors @ vectors[5]
        expected = [dataset[i].id for i in np.argsort(-scores, kind="stable")[:10]]
        assert [h.id for h in hits][:3] == expected[:3]
        assert [h.score for h in hits] == pytest.approx(np.sort(scores)[::-1][:10].tolist(), abs=1e-4)
        assert hits[0].meta["age"] == record.meta["age"]
        assert hits[0].image_path == Path(record.image).relative_to(Path(dataset.source).parent).as_posix()


def test_text_to_image_and_image_to_text(built, model, dataset):
    with open_index(built[0]) as index:
        report = dataset[7].text  # longer than this model's text tower reads: a query text of it is refused
        to_reports = index.search(model.encode_texts([report]).numpy(), k=3, target="texts")[0]
        assert to_reports[0].text == report and to_reports[0].score == pytest.approx(1.0, abs=1e-4)
        assert len(search_index(index, model, text="large left pleural effusion", k=3, target="texts")) == 3
        to_images = search_index(index, model, text="large left pleural effusion", k=4)
        scores = [h.score for h in to_images]
        assert len(to_images) == 4 and scores == sorted(scores, reverse=True)
        reference = model.encode_images([dataset[0].image]).numpy() @ model.encode_texts(
            [r.text for r in dataset]).numpy().T
        image_to_text = search_index(index, model, image=dataset[0].image, k=1, target="texts")
        assert image_to_text[0].score == pytest.approx(float(reference.max()), abs=1e-4)


def test_a_query_text_longer_than_the_text_tower_reads_is_refused(built, model, dataset):
    """Two query texts of opposite meaning differing only past the text tower's last read token got bit-identical
    hits, without a word. Such a query is now refused, as VQA questions and concept phrases are (library, CLI;
    the service calls the same library), naming the counts and never the text."""
    _, limit = model.text_read_length("")
    filler = "The heart size is normal. " * 14
    assert model.text_read_length(filler)[0] <= limit < model.text_read_length(filler + "Secret effusion.")[0]
    with open_index(built[0]) as index:
        for target in ("images", "texts"):
            with pytest.raises(InputError, match=rf"the query text is \d+ tokens long; the model's text encoder "
                                                 rf"reads {limit} tokens at most"):
                search_index(index, model, text=filler + "Large left pleural effusion.", target=target)
        assert len(search_index(index, model, text=filler, k=2)) == 2  # read whole: searched
    result, output = invoke("search", "--index", built[0], "--text", filler + "Secret effusion.")
    assert result.exit_code == 2 and f"reads {limit} tokens at most" in output, output
    assert "Secret" not in output and "Traceback" not in output
    with pytest.raises(InputError, match=rf"the knowledge query text is \d+ tokens long.* reads {limit} tokens"):
        load_knowledge().retrieve(model, filler + "Secret effusion.")


def test_build_and_add_count_the_reports_embedded_cut(model, model_dir, dataset, tmp_path, caplog):
    """Reports longer than the text tower reads were embedded cut without a word (an impression at the end left
    out of the report vector). Long reports are normal: they are indexed, and build and add warn with a count,
    never a report's text or id."""
    _, limit = model.text_read_length("")
    records = [*dataset.records[:3], dataclasses.replace(dataset.records[3], text="Small left pleural effusion."),
               dataclasses.replace(dataset.records[4], text=None)]
    assert all(model.text_read_length(r.text)[0] > limit for r in records[:3])
    with caplog.at_level("WARNING"):
        build_index(model, Dataset(records, source=dataset.source), tmp_path / "idx", model_dir=model_dir,
                    show_progress=False)
    assert f"3 of 4 reports embedded are longer than the model's text encoder reads ({limit} tokens)" in caplog.text
    caplog.clear()
    with open_index(tmp_path / "idx", writable=True) as index, caplog.at_level("WARNING"):
        add_records(index, model, Dataset(dataset.records[5:7], source=dataset.source), show_progress=False)
    assert "2 of 2 reports embedded are longer" in caplog.text
    assert not any(r.text[:20] in caplog.text or r.id in caplog.text for r in dataset.records[:7] if r.text)


@pytest.mark.parametrize("where, check", [
    ("sex = 'F' and age > 60", lambda m: m["sex"] == "F" and float(m["age"]) > 60),
    ("finding in ('nodule', 'cardiomegaly')", lambda m: m["finding"] in ("nodule", "cardiomegaly")),
    ("not (view = 'PA') or age <= 30", lambda m: m["view"] != "PA" or float(m["age"]) <= 30),
    ("nodule_zone is null and split != 'test'", lambda m: "nodule_zone" not in m and m["split"] != "test"),
    ("SEX='M' AND (Age >= 40.5 OR finding = \"no_finding\")",
     lambda m: m["sex"] == "M" and (float(m["age"]) >= 40.5 or m["finding"] == "no_finding")),
])
def test_where_filters_cases(built, model, dataset, where, check):
    expected = sum(check(r.meta) for r in dataset)
    assert 0 < expected < len(dataset)
    with open_index(built[0]) as index:
        hits = search_index(index, model, image=dataset[0].image, k=96, where=where)
    assert len(hits) == expected and all(check(h.meta) for h in hits)


def test_filtered_search_through_faiss_selectors_matches_the_exact_path(built, model, dataset, monkeypatch):
    from medvl.index import faiss_store

    where = "sex = 'F' and age > 60"
    with open_index(built[0]) as index:
        exact = search_index(index, model, image=dataset[0].image, k=8, where=where)
        monkeypatch.setattr(faiss_store, "EXACT_FILTERED_MAX", 0)  # as for a filter allowing many cases
        selected = search_index(index, model, image=dataset[0].image, k=8, where=where)
    assert [h.id for h in selected] == [h.id for h in exact]
    assert [h.score for h in selected] == pytest.approx([h.score for h in exact], abs=1e-5)


@pytest.mark.parametrize("where", INJECTIONS)
def test_where_rejects_injection_and_the_table_survives(built, model, dataset, where):
    with open_index(built[0]) as index:
        with pytest.raises(InputError, match="where: "):
            search_index(index, model, image=dataset[0].image, where=where)
        assert len(index) == 96
    with closing(sqlite3.connect(built[0] / "cases.sqlite")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 96


def test_where_errors_name_the_problem(built, model, dataset):
    with open_index(built[0]) as index:
        for where, message in (("modality = 'CR'", "unknown column 'modality'.*age"),
                               ("age > 'sixty'", "holds a number"), ("sex = 1", "quoted text"),
                               ("sex = 'F' and", "expected a column name.*the end"),
                               ("(sex = 'F'", r"expected '\)'"), ("sex = 'F'; x", "position 10")):
            with pytest.raises(InputError, match=message):
                index.search(np.zeros((1, 64), np.float32), where=where)


def test_where_compiles_to_parameters_never_to_literals():
    columns = {"sex": "text", "age": "number", "id": "text"}
    compiled = compile_where("sex = 'x'' OR ''1''=''1' and age in (1, 2.5)", columns, quote_column)
    assert compiled.sql == '(("m_sex" = ?) AND ("m_age" IN (?, ?)))'
    assert compiled.params == ("x' OR '1'='1", 1.0, 2.5)
    conn = sqlite3.connect(":memory:")
    conn.execute('CREATE TABLE cases (id TEXT, "m_sex" TEXT, "m_age" REAL)')
    conn.execute("INSERT INTO cases VALUES ('a', 'F', 1)")
    assert conn.execute(f"SELECT id FROM cases WHERE {compiled.sql}", compiled.params).fetchall() == []
    assert compile_where("id = 'a'", columns, quote_column, "%s").sql == "(id = %s)"


def test_delete_and_add_back(index_copy, model, dataset):
    gone = [dataset[i].id for i in (1, 2, 3)]
    with open_index(index_copy, writable=True) as index:
        assert index.delete(gone + ["no-such-case"]) == 3
        index.save()
        assert len(index) == 93
        hits = search_index(index, model, image=dataset[2].image, k=96)
        assert len(hits) == 93 and not {h.id for h in hits} & set(gone)
    with open_index(index_copy, writable=True) as index:
        result = add_records(index, model, dataset, show_progress=False)
        assert result["added"] == 3 and result["already_present"] == 93 and len(index) == 96
    with open_index(index_copy) as index:
        assert search_index(index, model, image=dataset[2].image, k=1)[0].id == gone[1]


def test_vectors_of_another_version_of_the_index_are_refused(built, index_copy, model, model_dir, dataset, tmp_path):
    """index.faiss / text.faiss copied from another index (or from before a delete + add) are refused on opening,
    one line naming the file; they used to put other vectors under this index's cases and drop the rest."""
    other = tmp_path / "other"
    build_index(model, dataset.select("test"), other, model_dir=model_dir, show_progress=False)
    for name in ("index.faiss", "text.faiss"):
        mixed = tmp_path / f"mixed-{name}"
        shutil.copytree(built[0], mixed)
        shutil.copy(other / name, mixed / name)
        with pytest.raises(DataError, match=f"{name} holds 19 vectors but cases.sqlite 96 cases"):
            open_index(mixed)
        result, output = invoke("search", "--index", mixed, "--text", "effusion", "-k", 3)
        assert result.exit_code == 2 and "different versions of the index" in output
    gone = [dataset[i].id for i in (4, 5)]
    with open_index(index_copy, writable=True) as index:  # the same ids again, under new vids
        index.delete(gone)
        add_records(index, model, dataset, show_progress=False)
    shutil.copy(built[0] / "index.faiss", index_copy / "index.faiss")  # as many vectors, other vids
    with pytest.raises(DataError, match="index.faiss holds the vectors of other cases than the 96 cases"):
        open_index(index_copy, writable=True)


DAMAGED_TABLE = "cannot read the cases table ({}): a damaged index: rebuild it with `medvl index build`"


def _damage(index: Path, statement: str) -> None:
    with closing(sqlite3.connect(index / "cases.sqlite")) as conn, conn:
        conn.execute(statement)


def test_a_faiss_file_of_another_build_with_as_many_vectors_under_the_same_vids_is_refused(built, model, dataset,
                                                                                          tmp_path):
    """A rebuild numbers its cases 1..N again, so the index.faiss of a rebuild with another model (or text.faiss
    put in its place) passed the count, sum and largest-vid check: searched, it ranked query vectors of one model
    against stored vectors of another. Each FAISS file's SHA-256 is recorded in cases.sqlite and index.json at save
    and compared at open; an index saved before they were recorded still opens."""
    import faiss

    from medvl.index.faiss_store import ann_ids, build_ann

    with open_index(built[0]) as index:
        vids, dim = np.sort(ann_ids(index.anns["images"])), index.dim
    other = np.random.default_rng(0).standard_normal((len(vids), dim)).astype(np.float32)
    other /= np.linalg.norm(other, axis=1, keepdims=True)  # the vectors of another model, under the same vids
    mixed = tmp_path / "mixed"
    shutil.copytree(built[0], mixed)
    faiss.write_index(build_ann(other, vids, "flat"), str(mixed / "index.faiss"))
    with pytest.raises(DataError, match="index.faiss is not the file cases.sqlite and index.json were saved with"):
        open_index(mixed)
    result, output = medvl("search", "--index", mixed, "--image", dataset[0].image, "-k", 3)
    assert result.exit_code == 2 and "different versions of the index" in output and "Traceback" not in output
    shutil.copy(built[0] / "text.faiss", mixed / "index.faiss")  # every case has a report: as many vectors
    with pytest.raises(DataError, match="index.faiss is not the file"):
        open_index(mixed)
    info = json.loads((built[0] / "index.json").read_text())
    del info["images"]["file_sha256"]
    (mixed / "index.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="cases.sqlite and index.json record different versions of index.faiss"):
        open_index(mixed)
    del info["texts"]["file_sha256"]  # an index saved before the digests were recorded: not checked
    (mixed / "index.json").write_text(json.dumps(info))
    shutil.copy(built[0] / "index.faiss", mixed / "index.faiss")
    _damage(mixed, "DROP TABLE files")
    with open_index(mixed, writable=True) as index:
        assert search_index(index, model, image=dataset[0].image, k=1)[0].id == dataset[0].id
        index.delete([dataset[1].id])
        index.save()  # records them
        kept = np.sort(ann_ids(index.anns["images"]))
    assert json.loads((mixed / "index.json").read_text())["images"]["file_sha256"]
    faiss.write_index(build_ann(other[:len(kept)], kept, "flat"), str(mixed / "index.faiss"))
    with pytest.raises(DataError, match="index.faiss is not the file"):
        open_index(mixed)


def test_a_damaged_cases_table_is_one_line_naming_the_index_and_the_column_never_the_cell(built, model, dataset,
                                                                                          phantom_dir, tmp_path):
    """A damaged cases.sqlite made medvl search, report draft and index add end in sqlite3's or json's traceback
    (exit 1), and SQLite's message quoted the cell: a report that is not UTF-8 was printed (or labels, metadata, an
    id). Each is one line now, exit 2, naming the file and the column only."""
    with closing(sqlite3.connect(built[0] / "cases.sqlite")) as conn:
        report, labels = conn.execute("SELECT report, labels FROM cases WHERE report != '' ORDER BY vid").fetchone()
    damages = {"report": ("report || X'FF'", "is not UTF-8 text"), "id": ("id || X'FF'", "is not UTF-8 text"),
               "labels": ("substr(labels, 2)", "is not a JSON object"), "meta": ("'[1, 2]'", "is not a JSON object"),
               "split": ("X'00FF'", "is not text")}  # column -> its new value, what the message says of it
    image = dataset[0].image
    for name, (value, what) in damages.items():
        statement, reason = f"UPDATE cases SET {name} = {value}", f"a cell of column {name!r} {what}"
        damaged = tmp_path / name
        shutil.copytree(built[0], damaged)
        _damage(damaged, statement)
        expected = f"error: {damaged / 'cases.sqlite'}: {DAMAGED_TABLE.format(reason)}"
        commands = [("search", "--index", damaged, "--text", "effusion", "-k", 5),
                    ("report", "draft", image, "--index", damaged),
                    ("index", "add", "--index", damaged, "--data", phantom_dir, "--split", "test", "-q")]
        for command in commands if name in ("report", "labels") else []:  # the library's error is the CLI's line
            result, output = medvl(*command)
            assert result.exit_code == 2 and "Traceback" not in output, (name, command, output)
            assert {line for line in output.splitlines() if line.startswith("error:")} == {expected}, output
            assert report[:40] not in output and labels[2:30] not in output and "with text" not in output
        with open_index(damaged) as index, pytest.raises(IndexDamaged) as raised:
            search_index(index, model, image=image, k=5)
        assert raised.value.problem == DAMAGED_TABLE.format(reason) and index.damaged == raised.value.problem
    zeroed = tmp_path / "zeroed"  # a page of the table's file (not the schema's, the first) zeroed
    shutil.copytree(built[0], zeroed)
    data = bytearray((zeroed / "cases.sqlite").read_bytes())
    data[4096:8192] = bytes(4096)
    (zeroed / "cases.sqlite").write_bytes(bytes(data))
    result, output = medvl("search", "--index", zeroed, "--text", "effusion", "-k", 5)
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert f"error: {zeroed / 'cases.sqlite'}: cannot read the cases table (database disk image is malformed)" in output


def test_a_damaged_ivfpq_vectors_table_is_one_line_naming_the_table_and_a_missing_row_is_not_a_missing_case(
        model, model_dir, dataset, tmp_path):
    """An IVF-PQ index scores its hits with the vectors kept in table ``vectors`` of cases.sqlite; a cell of the wrong
    length or type there ended search and report draft in numpy's traceback (exit 1), and a missing row dropped its
    case from every search without a word. Each is IndexDamaged now (exit 2, 503 in the service), naming the file
    and the table, never a cell."""
    built = tmp_path / "ivfpq"
    build_index(model, dataset.subset(dataset[:40]), built, model_dir=model_dir, kind="ivfpq", show_progress=False)
    with closing(sqlite3.connect(built / "cases.sqlite")) as conn:
        vid = conn.execute("SELECT vid FROM cases WHERE id = ?", (dataset[3].id,)).fetchone()[0]
    not_a_vector = "a cell of column 'image' of table vectors is not a vector of 64 float32"
    not_finite = "a vector of column 'image' of table vectors is not finite or is zero"
    damages = {"short": (f"UPDATE vectors SET image = substr(image, 1, 100) WHERE vid = {vid}", not_a_vector),
               "text": (f"UPDATE vectors SET image = 'abc' WHERE vid = {vid}", not_a_vector),
               "report": (f"UPDATE vectors SET text = substr(text, 1, 9) WHERE vid = {vid}",
                          "a cell of column 'text' of table vectors is not a vector of 64 float32"),
               "missing": (f"DELETE FROM vectors WHERE vid = {vid}", "table vectors lacks the row of 1 case"),
               # docs probe: a NaN or all-zero vector dropped its case from every search, or came back twice
               "nan": (f"UPDATE vectors SET image = X'{'0000c07f' * 64}' WHERE vid = {vid}", not_finite),
               "zeros": (f"UPDATE vectors SET image = zeroblob(256) WHERE vid = {vid}", not_finite)}
    for name, (statement, reason) in damages.items():
        damaged = tmp_path / name
        shutil.copytree(built, damaged)
        _damage(damaged, statement)
        target = "texts" if name == "report" else "images"
        with open_index(damaged) as index:
            # rescored neighbours (the query's own case among them), every case, a filter; reports: the last two
            for k, where in ((5, None), (40, None), (5, "sex = 'F' or sex = 'M'"))[target == "texts":]:
                with pytest.raises(IndexDamaged) as raised:
                    search_index(index, model, image=dataset[3].image, k=k, where=where, target=target)
                assert raised.value.problem == DAMAGED_TABLE.format(reason), (name, k, where)
                assert index.damaged == raised.value.problem
    expected = f"error: {tmp_path / 'short' / 'cases.sqlite'}: {DAMAGED_TABLE.format(not_a_vector)}"
    for command in (("search", "--index", tmp_path / "short", "--image", dataset[3].image, "-k", 5),
                    ("report", "draft", dataset[3].image, "--index", tmp_path / "short")):
        result, output = medvl(*command)
        assert result.exit_code == 2 and "Traceback" not in output, (command, output)
        assert {line for line in output.splitlines() if line.startswith("error:")} == {expected}, output


def test_add_refuses_other_cases_under_indexed_ids_unless_replacing(index_copy, model, dataset, phantom_dir, tmp_path):
    """A second export with the same layout (other patients, the same relative ids) and a corrected report are
    refused before anything changes, naming how many and one id; --replace replaces them. They used to be
    counted as already present and left out."""
    from cli_helpers import planted_phantom
    from medvl.data.phantom import generate_phantom

    second = tmp_path / "second"
    generate_phantom(second, n=10, seed=9, size=64)
    with open_index(index_copy, writable=True) as index:
        with pytest.raises(InputError, match=r"10 cases have an id already in the index .* another image, "
                                             r"report, labels, metadata or split \(e\.g\. 'images/phantom_00000'\); "
                                             r"pass --replace"):
            add_records(index, model, load_dataset(second), show_progress=False)
    corrected = load_dataset(planted_phantom(phantom_dir, tmp_path / "corrected"))  # one report changed
    with open_index(index_copy, writable=True) as index:
        with pytest.raises(InputError, match="1 cases have an id"):
            add_records(index, model, corrected, show_progress=False)
        result = add_records(index, model, corrected, show_progress=False, replace=True)
        assert (result["added"], result["already_present"], result["replaced"]) == (0, 95, 1)
    with open_index(index_copy) as index:
        assert sum("Krumplehorn" in (h.text or "") for h in search_index(index, model, text="effusion", k=96)) == 1
    result, output = invoke("index", "add", "--index", index_copy, "--data", second, "-q")
    assert result.exit_code == 2 and "10 cases have an id already in the index" in " ".join(output.split())
    result, output = invoke("index", "add", "--index", index_copy, "--data", second, "--replace", "-q",
                            "--json", tmp_path / "add.json")
    assert result.exit_code == 0, output
    saved = json.loads((tmp_path / "add.json").read_text())
    assert (saved["added"], saved["already_present"], saved["replaced"], saved["n_cases"]) == (0, 0, 10, 96)
    query = load_dataset(second)[3]
    with open_index(index_copy) as index:
        hit = search_index(index, model, image=query.image, k=1)[0]
        assert hit.id == query.id and hit.score == pytest.approx(1.0, abs=1e-5) and hit.text == query.text


def test_replacing_with_an_image_indexed_under_another_id_is_refused(index_copy, model, dataset):
    """A replacement whose new image is another indexed case's (or a case's earlier in the data) is refused,
    naming how many and one pair, and the index is left as it was; --allow-duplicates replaces it. The case used
    to be deleted and nothing added, reported only as a skipped duplicate."""
    from dataclasses import replace

    first, second, image = dataset[0], dataset[1], np.full((64, 64), 7, np.uint8)
    swapped = dataset.subset([replace(first, images=second.images, text="corrected report")])
    within = dataset.subset([Record(id="new", images=[image], split="train"), replace(first, images=[image])])
    with open_index(index_copy, writable=True) as index:
        with pytest.raises(InputError, match=rf"1 cases to replace have an image already in the index .* \(e\.g\. "
                                             rf"'{first.id}': the image of '{second.id}'\); pass --allow-duplicates"):
            add_records(index, model, swapped, show_progress=False, replace=True)
        with pytest.raises(InputError, match=rf"\(e\.g\. '{first.id}': the image of 'new'\)"):
            add_records(index, model, within, show_progress=False, replace=True)
    with open_index(index_copy, writable=True) as index:
        assert len(index) == 96 and index.stored_contents([first.id])[first.id][1] == first.text
        result = add_records(index, model, swapped, show_progress=False, replace=True, allow_duplicates=True)
        assert (result["replaced"], result["duplicates"], result["n_cases"]) == (1, [], 96)
        assert index.stored_contents([first.id])[first.id][1] == "corrected report"


def _manifest_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _edited_copy(source: Path, folder: Path, rows: list[dict[str, str]]) -> Path:
    """A copy of the dataset folder ``source`` whose manifest holds ``rows``."""
    shutil.copytree(source, folder)
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_a_corrected_label_is_a_changed_case(index_copy, model, phantom_dir, tmp_path):
    """A case added again with the same image and report but another label is refused like a corrected report,
    and --replace stores the new label (filter column included). It used to count as already present, and
    --replace left the old label."""
    rows = _manifest_rows(phantom_dir)
    case_id, old_label = Path(rows[0]["image"]).with_suffix("").as_posix(), rows[0]["finding"]
    new_label = rows[0]["finding"] = "cardiomegaly" if old_label != "cardiomegaly" else "nodule"
    relabelled = load_dataset(_edited_copy(phantom_dir, tmp_path / "relabelled", rows))
    with open_index(index_copy, writable=True) as index:
        with pytest.raises(InputError, match=rf"1 cases have an id .* another image, report, labels, metadata or split "
                                             rf"\(e\.g\. '{case_id}'\)"):
            add_records(index, model, relabelled, show_progress=False)
        result = add_records(index, model, relabelled, show_progress=False, replace=True)
        assert (result["added"], result["already_present"], result["replaced"]) == (0, 95, 1)
    with open_index(index_copy) as index:
        hit = index.search(np.ones(64) / 8, k=1, where=f"id = '{case_id}'")[0][0]
        assert hit.labels["finding"] == new_label
        assert index.search(np.ones(64) / 8, k=1, where=f"id = '{case_id}' and finding = '{old_label}'")[0] == []


def test_a_corrected_metadata_value_or_a_moved_split_is_a_changed_case(index_copy, model, phantom_dir, tmp_path):
    """A case added again with the same image, report and labels but a corrected metadata value (here its age) or in
    another split counted as already present: the index kept the old age, so filtered searches (``age > 60``) and
    the split shown in every hit stayed wrong without a word. Both are now refused like a corrected report, and
    --replace stores the new values."""
    rows = _manifest_rows(phantom_dir)
    first, second = (Path(row["image"]).with_suffix("").as_posix() for row in rows[:2])
    old_age, old_split = rows[0]["age"], rows[1]["split"]
    rows[0]["age"] = str(int(old_age) + 7)
    rows[1]["split"] = "val" if old_split != "val" else "train"
    corrected = load_dataset(_edited_copy(phantom_dir, tmp_path / "corrected", rows))
    with open_index(index_copy, writable=True) as index:
        with pytest.raises(InputError, match=rf"2 cases have an id .* \(e\.g\. '{first}'\)"):
            add_records(index, model, corrected, show_progress=False)
        result = add_records(index, model, corrected, show_progress=False, replace=True)
        assert (result["added"], result["already_present"], result["replaced"]) == (0, 94, 2)
        assert add_records(index, model, corrected, show_progress=False)["already_present"] == 96  # now the same
    with open_index(index_copy) as index:
        [hit] = index.search(np.ones(64) / 8, k=1, where=f"id = '{first}'")[0]
        assert str(hit.meta["age"]) == str(int(old_age) + 7)
        [moved] = index.search(np.ones(64) / 8, k=1, where=f"id = '{second}'")[0]
        assert moved.split == rows[1]["split"] != old_split


def test_add_checks_every_case_before_changing_anything(index_copy, dataset):
    cases = [Case(id="new1", meta={"age": "44", "ward": "A"}), Case(id="new2", meta={"age": "unknown"})]
    with open_index(index_copy, writable=True) as index:
        with pytest.raises(DataError, match="'age' must be a number"):
            index.add(cases, np.ones((2, 64), np.float32) / 8)
        with pytest.raises(InputError, match="already in the index"):
            index.add([Case(id=dataset[0].id)], np.ones((1, 64), np.float32) / 8)
        index.add(cases[:1], np.ones((1, 64), np.float32) / 8)
        index.save()
        assert len(index) == 97 and index.columns["ward"] == "text"
        assert [h.id for h in index.search(np.ones(64) / 8, k=1, where="ward = 'A'")[0]] == ["new1"]


def test_add_names_the_data_and_the_index_of_a_value_a_numeric_column_cannot_take(index_copy, model, dataset,
                                                                                   tmp_path):
    """``index add`` of a case whose ``age`` is not a number (the index's age column is numeric) said only "case 'm1':
    ...", naming neither the manifest nor the index, once its batch was embedded; now it names both, before any image
    is read, and nothing changes."""
    folder = tmp_path / "more"
    folder.mkdir()
    for name, record in (("a.png", dataset[0]), ("b.png", dataset[1])):  # new images: not skipped as duplicates
        Image.open(record.image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / name)
    manifest = folder / "manifest.csv"
    manifest.write_text("id,image,age,finding\nm0,b.png,50,x\nm1,a.png,sixty,x\n")
    message = (f"{manifest}: case 'm1': metadata 'age' must be a number for the index {index_copy} (its filter column "
               "is numeric), got 'sixty'")
    with open_index(index_copy, writable=True) as index:
        with pytest.raises(DataError) as caught:
            add_records(index, model, load_dataset(manifest), show_progress=False)
        assert str(caught.value) == message
    result, output = invoke("index", "add", "--index", index_copy, "--data", manifest, "-q")
    assert result.exit_code == 2 and message in " ".join(output.split()), output
    with open_index(index_copy) as index:
        assert len(index) == 96


LONG_NUMBERS = ["20231105000000001", "20231105000000002", "20231105000000003", "9007199254740992",
                "9007199254740993", "5"]


def _with_meta(dataset, meta: dict[str, list[str]]) -> Dataset:
    """The first cases of ``dataset`` with the metadata ``meta`` (key -> one value per case) instead of theirs."""
    n = len(next(iter(meta.values())))
    return dataset.subset([dataclasses.replace(r, meta={k: v[i] for k, v in meta.items()})
                           for i, r in enumerate(dataset[:n])])


def _filtered_ids(index, model, where: str) -> list[str]:
    return sorted(h.id for h in search_index(index, model, text="effusion", k=20, where=where))


def test_long_whole_numbers_make_a_text_column_that_selects_exactly(model, model_dir, dataset, tmp_path):
    """An accession number such as 20231105000000002 was stored as a 64-bit float (20231105000000000, like ...001),
    so ``accession = 20231105000000002`` also returned the case numbered ...001. A column holding a number beyond
    2**53 - 1 in magnitude is now text and compares exactly; a number literal that large is refused (however
    written), also on an index whose column is numeric, and so is adding such a value to a numeric column."""
    data = _with_meta(dataset, {"accession": LONG_NUMBERS, "small": ["1", "2", "3", "4", "-9007199254740991", "6"]})
    info = build_index(model, data, tmp_path / "long", model_dir=model_dir, show_progress=False)
    assert info["columns"] == {"accession": "text", "small": "number"}
    with open_index(tmp_path / "long") as index:
        for i, value in enumerate(LONG_NUMBERS):
            assert _filtered_ids(index, model, f"accession = '{value}'") == [data[i].id]
        assert _filtered_ids(index, model, "small < -9007199254740990") == [data[4].id]
        # the advice fits a numeric column: it used to say to quote the value, which such a column refuses; and
        # 1e400 (infinity as a float) was taken, though the README says such literals are refused
        for where in ("small = 9007199254740993", "small in (1, -20231105000000002)", "small = 20231105000000002.0",
                      "small < 1e300", "small < 1e400", "small in (1, -1e400)", "small > -1E400"):
            with pytest.raises(InputError, match=r"beyond 9007199254740991 .*a numeric column holds no such number .*"
                                                 r"within that or use 'is not null'") as refused:
                search_index(index, model, text="effusion", where=where)
            assert "quote the value" not in str(refused.value)
    with open_index(tmp_path / "long", writable=True) as index:  # an older index's numeric column, in effect
        more = _with_meta(dataset[6:8], {"small": ["7", "20231105000000001"]})
        with pytest.raises(DataError, match=r"got '20231105000000001'; it is beyond 9007199254740991 \(2\*\*53 - 1\) "
                                            "in magnitude.*rebuild the index so that the column is text"):
            add_records(index, model, more, show_progress=False)


def test_a_number_is_written_the_way_the_filter_language_writes_it(model, model_dir, dataset, tmp_path):
    """Python's float() took "1_000", " 5 " and Arabic-Indic digits, so such a column was numeric: ``code = 1000``
    matched the case showing '1_000' and ``code = 20`` the one showing '٢٠', values the filter language cannot
    write. A value that is not an ASCII number as --where writes it now makes its column text."""
    values = {"underscore": ["1_000", "1000"], "arabic": ["\u0662\u0660", "20"], "spaced": [" 5 ", "5"],
              "huge": ["1e300", "5"], "plain": ["-1.5e3", ".5"]}
    info = build_index(model, _with_meta(dataset, values), tmp_path / "num", model_dir=model_dir, show_progress=False)
    assert info["columns"] == {"underscore": "text", "arabic": "text", "spaced": "text", "huge": "text",
                               "plain": "number"}
    with open_index(tmp_path / "num") as index:
        assert _filtered_ids(index, model, "underscore = '1000'") == [dataset[1].id]
        assert _filtered_ids(index, model, "plain < -1000") == [dataset[0].id]
        with pytest.raises(InputError, match="unexpected character"):
            search_index(index, model, text="effusion", where="plain = \u0662\u0660")


def test_unsaved_changes_are_not_visible(index_copy, dataset):
    with open_index(index_copy, writable=True) as index:
        index.delete([dataset[0].id])
    with open_index(index_copy) as index:
        assert len(index) == 96
    assert not list(index_copy.parent.glob(".idx.edit*"))


def test_one_writer_at_a_time(index_copy):
    with open_index(index_copy, writable=True):
        with pytest.raises(InputError, match="another process"):
            open_index(index_copy, writable=True)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_kinds_record_recall_and_support_delete(kind, model, model_dir, dataset, tmp_path, monkeypatch):
    from medvl.index import faiss_store

    out = tmp_path / "idx"
    info = build_index(model, dataset, out, model_dir=model_dir, kind=kind, batch_size=48, show_progress=False)
    assert info["images"]["kind"] == kind and 0.0 <= info["images"]["recall_at_10"] <= 1.0
    assert json.loads((out / "index.json").read_text())["texts"]["recall_at_10"] == info["texts"]["recall_at_10"]
    with open_index(out, writable=True) as index:
        index.delete([dataset[4].id])
        index.save()
        hits = search_index(index, model, image=dataset[4].image, k=10)
        assert len(hits) == 10 and dataset[4].id not in {h.id for h in hits}
        for limit in (0, 20_000):  # through the FAISS selector, then exactly among the allowed
            monkeypatch.setattr(faiss_store, "EXACT_FILTERED_MAX", limit)
            filtered = search_index(index, model, image=dataset[4].image, k=5, where="sex = 'F'")
            assert len(filtered) == 5 and all(h.meta["sex"] == "F" for h in filtered)


def test_info_says_the_builds_recall_was_measured_on_fewer_vectors_after_add_and_delete(model, model_dir, dataset,
                                                                                      tmp_path):
    """``index info`` kept the build's ``n`` and recall@10 after ``index add``: an IVF-PQ index trained on 60 vectors
    and given 627 more showed recall 0.72 and ``images.n`` 60 beside 687 cases, while it found 0.32. ``n`` now
    follows the index, and the recall is given as measured at build on so many vectors, ``recall_stale`` in --json."""
    out = tmp_path / "idx"
    build_index(model, dataset.subset(dataset[:40]), out, model_dir=model_dir, kind="ivfpq", show_progress=False)
    result, output = invoke("index", "info", "--index", out)
    assert result.exit_code == 0 and "measured at build" not in output, output
    with open_index(out, writable=True) as index:
        add_records(index, model, dataset.subset(dataset[40:]), show_progress=False)
        index.delete([dataset[0].id])
        index.save()
    result, output = invoke("index", "info", "--index", out, "--json", tmp_path / "info.json")
    shown = " ".join(output.replace("│", " ").split())  # the table wraps the cell
    assert result.exit_code == 0 and "measured at build on 40 vectors; the index now holds 95" in shown, output
    described = json.loads((tmp_path / "info.json").read_text())
    assert described["n_cases"] == 95 and described["images"]["n"] == 95
    assert described["images"]["recall_measured_on"] == 40 and described["images"]["recall_stale"] is True


def test_an_ivfpq_index_reports_the_lists_it_probes_and_its_code_size(model_dir, phantom_dir, tmp_path):
    """96 vectors train 2 inverted lists (min(4 sqrt(n), n // 39)) of 4-bit codes (8-bit from 9,984 vectors): 64-d
    in 32 sub-quantizers, 16 bytes per vector. Build and info said ``nprobe`` 16, the configured constant, while the
    index probes its 2 lists, and named neither the lists nor the code size. They now give what the FAISS file
    searches with, also for an index whose index.json an earlier medvl wrote."""
    import faiss

    out = tmp_path / "idx"
    result, output = invoke("index", "build", "--model", model_dir, "--data", phantom_dir, "--out", out, "--kind",
                            "ivfpq", "--json", tmp_path / "build.json", "-q")
    assert result.exit_code == 0, output
    ann = faiss.read_index(str(out / "index.faiss"))
    assert (ann.nlist, ann.nprobe, ann.pq.nbits, ann.code_size) == (2, 2, 4, 16)
    expected = {"nlist": 2, "nprobe": 2, "nbits": 4, "code_bytes": 16}
    shown = " ".join(output.replace("│", " ").split())
    assert "images lists probed 2 of 2 images codes 4-bit, 16 bytes per vector" in shown, output
    built = json.loads((tmp_path / "build.json").read_text())
    assert {key: built["images"].get(key) for key in expected} == expected
    assert {key: built["texts"].get(key) for key in expected} == expected
    saved = json.loads((out / "index.json").read_text())
    for target in ("images", "texts"):  # as an earlier medvl wrote it
        saved[target] = {**{k: v for k, v in saved[target].items() if k not in expected}, "nprobe": 16}
    (out / "index.json").write_text(json.dumps(saved))
    result, output = invoke("index", "info", "--index", out, "--json", tmp_path / "info.json")
    shown = " ".join(output.replace("│", " ").split())
    assert result.exit_code == 0 and "texts lists probed 2 of 2 texts codes 4-bit, 16 bytes per vector" in shown, output
    described = json.loads((tmp_path / "info.json").read_text())
    assert {key: described["images"].get(key) for key in expected} == expected


def test_hnsw_tombstones_then_rebuild(model, model_dir, dataset, tmp_path, monkeypatch):
    from medvl.index import faiss_store

    out = tmp_path / "idx"
    build_index(model, dataset, out, model_dir=model_dir, kind="hnsw", batch_size=48, show_progress=False)
    gone = [r.id for r in dataset.records[:25]]
    with open_index(out, writable=True) as index:
        index.delete(gone[:5])
        index.save()
        assert index.anns["images"].ntotal == 96 and len(index._tombstones("images")) == 5
        monkeypatch.setattr(faiss_store, "TOMBSTONES_BEFORE_REBUILD", 0)
        index.delete(gone[5:])  # 25 dead > 71 // 5: rebuilt without them
        index.save()
        assert index.anns["images"].ntotal == 71 and len(index._tombstones("images")) == 0
    with open_index(out) as index:
        hits = search_index(index, model, image=dataset[0].image, k=96)
        assert len(hits) == 71 and not {h.id for h in hits} & set(gone)


def test_asking_an_approximate_index_for_every_case_returns_every_case_in_exact_order(model, model_dir, dataset,
                                                                                       tmp_path):
    """k at or above the live cases: an HNSW beam (or IVF probes) would miss some; the ranking is the flat one."""
    for kind in ("flat", "hnsw"):
        build_index(model, dataset, tmp_path / kind, model_dir=model_dir, kind=kind, show_progress=False)
    gone = [r.id for r in dataset.records[:5]]
    query = dataset[7].image
    with open_index(tmp_path / "flat") as flat, open_index(tmp_path / "hnsw", writable=True) as hnsw:
        expected = [h.id for h in search_index(flat, model, image=query, k=len(dataset))]
        assert [h.id for h in search_index(hnsw, model, image=query, k=len(dataset))] == expected
        hnsw.delete(gone)
        hnsw.save()
        live = [case for case in expected if case not in gone]
        assert [h.id for h in search_index(hnsw, model, image=query, k=len(live))] == live
        assert [h.id for h in search_index(hnsw, model, image=query, k=1000)] == live


def test_an_ivfpq_index_ranks_every_case_and_a_narrow_filter_exactly_with_cosine_scores(model, model_dir, dataset,
                                                                                        tmp_path):
    """IVF-PQ's compressed codes only approximate the vectors (scores off by ~0.03): the index keeps the vectors,
    so k >= its cases and a filter allowing few cases rank exactly, and every hit's score is its cosine
    similarity; also after cases are deleted and added again."""
    for kind in ("flat", "ivfpq"):
        build_index(model, dataset, tmp_path / kind, model_dir=model_dir, kind=kind, show_progress=False)
    query, gone = dataset[7].image, dataset.records[:3]
    with open_index(tmp_path / "flat", writable=True) as flat, open_index(tmp_path / "ivfpq", writable=True) as pq:
        assert pq.info["images"]["kind"] == "ivfpq"
        for index in (flat, pq):
            index.delete([r.id for r in gone])
            add_records(index, model, dataset.subset(gone), show_progress=False)
            index.save()
        for asked, where in (({"image": query}, None), ({"image": query}, "sex = 'F' and age > 40"),
                             ({"text": "pleural effusion"}, None)):
            for target in ("images", "texts"):
                found = search_index(pq, model, **asked, k=len(dataset), where=where, target=target)
                expected = search_index(flat, model, **asked, k=len(dataset), where=where, target=target)
                assert [h.id for h in found] == [h.id for h in expected], (asked, where, target)
                assert [h.score for h in found] == pytest.approx([h.score for h in expected], abs=1e-5)
        cosine = {h.id: h.score for h in search_index(flat, model, image=query, k=len(dataset))}
        nearest = search_index(pq, model, image=query, k=10)  # approximate neighbours, exact scores
        assert len(nearest) == 10 and [h.score for h in nearest] == sorted((h.score for h in nearest), reverse=True)
        assert [h.score for h in nearest] == pytest.approx([cosine[h.id] for h in nearest], abs=1e-5)


def test_an_hnsw_index_returns_k_cases_when_its_graph_search_ends_short(model, model_dir, dataset, tmp_path):
    """k below the live cases but large for the graph: its search can end with fewer than k neighbours (FAISS pads
    the row with -1); every one of the k comes back, as from the flat index, also after deletes."""
    for kind in ("flat", "hnsw"):
        build_index(model, dataset, tmp_path / kind, model_dir=model_dir, kind=kind, show_progress=False)
    query, gone = dataset[7].image, [r.id for r in dataset.records[:5]]
    with open_index(tmp_path / "flat", writable=True) as flat, open_index(tmp_path / "hnsw", writable=True) as hnsw:
        for k in (80, 95):
            for target, text in (("images", None), ("texts", "pleural effusion")):
                asked = {"text": text} if text else {"image": query}
                found = search_index(hnsw, model, **asked, k=k, target=target)
                expected = search_index(flat, model, **asked, k=k, target=target)
                assert len(found) == len(expected) == min(k, len(expected)), (k, target)
                assert len({h.id for h in found} & {h.id for h in expected}) >= 0.95 * len(expected)
        for index in (flat, hnsw):
            index.delete(gone)
            index.save()
        found = search_index(hnsw, model, image=query, k=90)  # 91 live cases, 96 vectors in the graph
        assert len(found) == 90 and not {h.id for h in found} & set(gone)


def _duplicate_dataset(dataset, folder: Path) -> Dataset:
    """Four phantom cases plus the first image again, re-encoded under another name."""
    folder.mkdir()
    records = list(dataset.records[:4])
    copy = folder / "same_pixels.png"
    Image.open(records[0].image).save(copy, compress_level=1)  # other bytes, same pixels
    records.append(Record(id="again", images=[copy], text="A copy.", meta={"sex": "F"}))
    return Dataset(records, source=str(folder))


def test_duplicate_images_are_detected(model, model_dir, dataset, tmp_path, caplog):
    data = _duplicate_dataset(dataset, tmp_path / "dup")
    assert Path(data[0].image).read_bytes() != Path(data[4].image).read_bytes()
    with caplog.at_level("WARNING"):
        info = build_index(model, data, tmp_path / "idx", model_dir=model_dir, show_progress=False)
    assert info["n_cases"] == 4 and info["duplicates"] == [{"id": "again", "duplicate_of": data[0].id}]
    # the log counts them; the ids (accession numbers, say) are in the result only
    assert "skipped 1 cases whose image is already indexed" in caplog.text
    assert "again" not in caplog.text and data[0].id not in caplog.text
    with open_index(tmp_path / "idx", writable=True) as index:
        index.delete([data[0].id])
        index.save()
        result = add_records(index, model, data.subset([data[4]]), show_progress=False)
        assert result["added"] == 1  # the original is gone, so the copy is new
        result = add_records(index, model, data.subset([data[0]]), show_progress=False)
        assert result["duplicates"] == [{"id": data[0].id, "duplicate_of": "again"}] and len(index) == 4
    kept = build_index(model, data, tmp_path / "all", model_dir=model_dir, allow_duplicates=True,
                       show_progress=False)
    assert kept["n_cases"] == 5


def _tripled(dataset) -> Dataset:
    """Eight phantom cases, each indexed three times, the later copies under lower ids (z-, y-, x-): the backends'
    own order of equal scores (storage order) is then the reverse of the case ids'."""
    return Dataset([dataclasses.replace(record, id=f"{prefix}-{record.id}") for record in dataset.records[:8]
                    for prefix in "zyx"], source=dataset.source)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_equal_scores_come_back_in_case_id_order_whatever_k(kind, model, model_dir, dataset, tmp_path):
    """The same image indexed three times gives three hits of equal score: they came back in the order the backend
    stored them, and which of them made a cut at k depended on k (FAISS's top 3 was not the start of its top 6).
    Ties are now in case-id order, and a tie at the cut keeps the lowest ids, so every top k is the start of the
    top 24. IVF-PQ rescored its neighbours with a matrix product whose last bit depended on how many there were:
    a case scored 1.0 at k=24 and 0.99999994 at k=3, and copies stopped tying."""
    data = _tripled(dataset)
    build_index(model, data, tmp_path / kind, model_dir=model_dir, kind=kind, allow_duplicates=True,
                show_progress=False)
    with open_index(tmp_path / kind) as index:
        for query in (data[0].image, data[9].image):
            every = [(hit.id, hit.score) for hit in search_index(index, model, image=query, k=24)]
            assert len(every) == 24 and every == sorted(every, key=lambda hit: (-hit[1], hit[0]))
            assert [hit_id[0] for hit_id in every[:3]] == sorted(hit_id[0] for hit_id in every[:3])
            assert len({score for _, score in every[:3]}) == 1  # the query's own image, three times
            for k in range(1, 24):
                assert [(hit.id, hit.score) for hit in search_index(index, model, image=query, k=k)] == every[:k]
            # several queries at once: each row as the query alone
            rows = index.search(np.repeat(embed_query(model, image=query), 2, axis=0), k=5)
            assert [[hit.id for hit in row] for row in rows] == [[hit_id for hit_id, _ in every[:5]]] * 2


def test_a_model_whose_tokenizer_was_edited_is_refused_and_an_index_from_before_tokenizers_were_hashed_is_not(
        built, model, model_dir, tmp_path):
    """The fingerprint an index checks covered the config and the weights only: a model folder whose tokenizer was
    edited (lower-casing turned off: other token ids, so other vectors, for the same query texts) was accepted. The
    tokenizer is hashed too; an index built before that (no tokenizer_sha256) is compared as before."""
    assert built[1]["model"]["tokenizer_sha256"] is not None
    edited = tmp_path / "edited"
    shutil.copytree(model_dir, edited)
    tokenizer = json.loads((edited / "text" / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (edited / "text" / "tokenizer.json").write_text(json.dumps(tokenizer))
    other = load_model(edited)
    assert other.text_tokens(["Effusion"]) != model.text_tokens(["Effusion"])
    with open_index(built[0]) as index:
        with pytest.raises(ModelError, match="the model's tokenizer differs from the tokenizer the index was built"):
            search_index(index, other, text="effusion")
        assert search_index(index, model, text="effusion", k=2)  # its own model
    older = tmp_path / "older"
    shutil.copytree(built[0], older)
    info = json.loads((older / "index.json").read_text())
    del info["model"]["tokenizer_sha256"]
    (older / "index.json").write_text(json.dumps(info))
    with open_index(older) as index:
        assert [hit.id for hit in search_index(index, other, text="effusion", k=3)] == \
            [hit.id for hit in index.search(embed_query(other, text="effusion"), k=3)[0]]


def test_a_padding_or_truncation_side_saved_in_the_tokenizer_files_changes_no_vector(model, model_dir, tmp_path):
    """The tokenizer digest leaves out padding and truncation (each call sets them), but a call did not set their
    side: a model folder whose tokenizer_config.json said padding_side / truncation_side "left" (or tokenizer.json a
    Left padding direction) passed the fingerprint check and wrote other vectors (a case's own report no longer found
    it). The text tower now pads and cuts on the right on every call, as it is trained: the same vectors."""
    texts = ["effusion", "large left pleural effusion with a small right pneumothorax"]
    long_report = ["The heart size is normal. " * 20 + "Large left pleural effusion."]
    assert model.text_read_length(long_report[0])[0] > model.text_read_length("")[1]  # read cut

    def config_sides(text_dir: Path) -> None:
        config = json.loads((text_dir / "tokenizer_config.json").read_text())
        config.update(padding_side="left", truncation_side="left")
        (text_dir / "tokenizer_config.json").write_text(json.dumps(config))

    def json_direction(text_dir: Path) -> None:
        tokenizer = json.loads((text_dir / "tokenizer.json").read_text())
        tokenizer["padding"] = {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None,
                                "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
        (text_dir / "tokenizer.json").write_text(json.dumps(tokenizer))

    for edit in (config_sides, json_direction):
        edited = tmp_path / edit.__name__
        shutil.copytree(model_dir, edited)
        edit(edited / "text")
        other = load_model(edited)
        assert tokenizer_sha256(other) == tokenizer_sha256(model)
        for batch in (texts, long_report):
            assert torch.equal(other.encode_texts(batch), model.encode_texts(batch)), edit.__name__


def test_model_index_mismatch_and_bad_queries(built, model, dataset, tmp_path):
    with open_index(built[0]) as index:
        with pytest.raises(ModelError, match="64-d.*32-d"):
            search_index(index, create_model("phantom-tiny", embed_dim=32), image=dataset[0].image)
        torch.manual_seed(1)
        other = create_model("phantom-tiny")
        with pytest.raises(ModelError, match="weights differ"):
            search_index(index, other, text="effusion")
        # a caller that checked once (a service, at start) may skip the check: it is then not made
        assert len(search_index(index, other, text="effusion", k=2, verify_model=False)) == 2
        with pytest.raises(InputError, match=r"\(N, 64\)"):
            index.search(np.zeros((1, 32), np.float32))
        with pytest.raises(DataError, match="file not found"):
            search_index(index, model, image=tmp_path / "missing.png")
        with pytest.raises(InputError, match="exactly one"):
            search_index(index, model, image=dataset[0].image, text="effusion")
        with pytest.raises(InputError, match="target"):
            search_index(index, model, text="effusion", target="reports")
    with pytest.raises(DataError, match="not a medvl index"):
        open_index(tmp_path)
    (tmp_path / "data.txt").write_text("not an index")
    with pytest.raises(InputError, match="refusing to replace"):
        build_index(model, dataset, tmp_path, show_progress=False)


def _staged_rows(staging: Path, mode: str = "ro") -> int:
    try:
        with closing(sqlite3.connect(f"file:{staging / 'cases.sqlite'}?mode={mode}", uri=True, timeout=0.1)) as conn:
            return conn.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked by a commit: ask again
        return 0


def test_killed_build_leaves_the_old_index_and_a_rerun_resumes(index_copy, model, model_dir, phantom_dir, dataset):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "medvl.cli.index", "build", "--model", str(model_dir), "--data",
               str(phantom_dir), "--out", str(index_copy), "--split", "train", "--batch-size", "1", "-q"]
    staging = index_copy.parent / ".idx.build"
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while _staged_rows(staging) < 5 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert 5 <= _staged_rows(staging, mode="rw") < 67  # rw: rolls back a commit the kill cut short
    with open_index(index_copy) as index:  # the old index: all 96 cases, searchable
        assert len(index) == 96
        assert search_index(index, model, image=dataset[9].image, k=1)[0].id == dataset[9].id
    info = build_index(model, dataset.select("train"), index_copy, model_dir=model_dir, show_progress=False)
    assert info["resumed"] >= 5 and info["n_cases"] == 67 and not staging.exists()
    with open_index(index_copy) as index:
        assert len(index) == 67 and search_index(index, model, text="nodule", k=80)[-1].split == "train"


def test_failed_build_resumes_in_process(model, model_dir, dataset, tmp_path, monkeypatch):
    data = dataset.select("test")
    interrupted_build(model, model_dir, data, tmp_path / "idx", monkeypatch)
    assert not (tmp_path / "idx").exists()
    info = build_index(model, data, tmp_path / "idx", model_dir=model_dir, batch_size=4, show_progress=False)
    assert info["resumed"] == 8 and info["n_cases"] == 19


def test_a_failed_build_resumes_with_its_data_named_another_way(model, model_dir, phantom_dir, tmp_path, monkeypatch):
    """A rerun that named the same data by a relative path (from another folder) started the build afresh: the
    build's key held the data's path and image paths as typed. They are now resolved."""
    interrupted_build(model, model_dir, load_dataset(phantom_dir).select("test"), tmp_path / "idx", monkeypatch)
    monkeypatch.chdir(phantom_dir.parent)
    again = load_dataset(Path(phantom_dir.name)).select("test")
    info = build_index(model, again, tmp_path / "idx", model_dir=model_dir, batch_size=4, show_progress=False)
    assert info["resumed"] == 8 and info["n_cases"] == 19


def test_a_nan_image_embedding_is_refused_naming_the_file_and_never_stored(dataset, tmp_path):
    """build_index stored a NaN vector without a word (a case counted that no search can find), where index add
    refuses one; it is now a DataError naming the image, and no index is written."""
    broken = create_model("phantom-tiny")
    with torch.no_grad():
        broken.image_projection.weight[0, 0] = float("nan")  # a real model whose weights went bad
    data = dataset.select("test")
    with pytest.raises(DataError, match=rf"{data[0].image.name}: its image embedding contains NaN or infinite"):
        build_index(broken, data, tmp_path / "idx", batch_size=4, workers=0, show_progress=False)
    assert not (tmp_path / "idx").exists()


def test_a_rerun_after_the_data_changed_starts_afresh(model, model_dir, dataset, tmp_path, monkeypatch):
    """A build fails; the user corrects a report and a label (or replaces an image) and reruns: the cases stored
    before the failure are not kept with their old report, labels or vector."""
    from dataclasses import replace

    data = dataset.select("test")
    interrupted_build(model, model_dir, data, tmp_path / "idx", monkeypatch)
    first = data[0]
    corrected = replace(first, text="FINDINGS: Large right pneumothorax.", labels={**first.labels, "finding": "x"})
    changed = Dataset([corrected, *data.records[1:]], source=data.source)
    info = build_index(model, changed, tmp_path / "idx", model_dir=model_dir, batch_size=4, show_progress=False)
    assert info["resumed"] == 0 and info["n_cases"] == 19
    with open_index(tmp_path / "idx") as index:
        hit = search_index(index, model, image=first.image, k=1)[0]
    assert hit.id == first.id and hit.text == corrected.text and hit.labels["finding"] == "x"
    # an image file replaced in place (same path, new content and modification time) is a change too
    copies = tmp_path / "images"
    copies.mkdir()
    copied = Dataset([replace(record, images=[Path(shutil.copy(record.image, copies))]) for record in data.records],
                     source=data.source)
    interrupted_build(model, model_dir, copied, tmp_path / "again", monkeypatch)
    Image.open(data[1].image).rotate(90).save(copied[0].image)
    assert build_index(model, copied, tmp_path / "again", model_dir=model_dir, batch_size=4,
                       show_progress=False)["resumed"] == 0


# ------------------------------------------------------------------ command line


def cli_app() -> typer.Typer:
    """The commands as cli/main.py registers them."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.add_typer(index_app, name="index")
    app.command("search")(search_command)
    return app


def invoke(*args):
    result = CliRunner().invoke(cli_app(), [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_cli_build_info_search_add_delete(model_dir, phantom_dir, dataset, tmp_path):
    out = tmp_path / "idx"
    result, output = invoke("index", "build", "--model", model_dir, "--data", phantom_dir, "--out", out,
                            "--split", "test", "--json", tmp_path / "build.json", "-q")
    assert result.exit_code == 0, output
    assert json.loads((tmp_path / "build.json").read_text())["n_cases"] == 19
    result, output = invoke("index", "info", "--index", out)
    assert result.exit_code == 0 and "flat" in output and "age (number)" in output
    query = next(r for r in dataset if r.split == "test")
    result, output = invoke("search", "--index", out, "--image", query.image, "--k", 3,
                            "--where", "age >= 0", "--json", tmp_path / "hits.json")
    assert result.exit_code == 0, output
    hits = json.loads((tmp_path / "hits.json").read_text())["hits"]
    assert len(hits) == 3 and hits[0]["id"] == query.id and query.id in output and "finding" in output
    assert "3 cases closest to the query image, by their images" in output
    result, output = invoke("search", "--index", out, "--image", query.image, "--where", "age < 0",
                            "--json", tmp_path / "none.json")
    assert result.exit_code == 0 and json.loads((tmp_path / "none.json").read_text())["hits"] == []
    assert "no indexed case matches --where 'age < 0'" in output  # said, not an empty table alone
    result, output = invoke("search", "--index", out, "--text", "pleural effusion", "--target", "texts",
                            "-k", 2, "--show", "age")
    assert result.exit_code == 0 and "report" in output
    assert "2 cases closest to the query text, by their reports" in output
    result, output = invoke("search", "--index", out, "--text", "pleural effusion", "-k", 2)
    assert result.exit_code == 0 and "2 cases closest to the query text, by their images" in output
    before = _index_files(out), (out / "index.json").stat().st_ino
    result, output = invoke("index", "delete", "no-such-case", "--index", out)  # nothing to remove: no new version
    assert result.exit_code == 0 and "removed 0 cases (1 ids not found)" in output and "index unchanged" in output
    assert (_index_files(out), (out / "index.json").stat().st_ino) == before
    result, output = invoke("index", "delete", query.id, "--index", out)
    assert result.exit_code == 0 and "removed 1" in output
    result, output = invoke("index", "add", "--index", out, "--data", phantom_dir, "--split", "val", "-q")
    assert result.exit_code == 0 and "28" in output


def _index_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _write_error(output: str, target: Path) -> str:
    lines = {line for line in output.splitlines() if line.startswith("error:")}  # output may hold stderr twice
    assert len(lines) == 1 and "Traceback" not in output, output
    line = lines.pop()
    assert line.startswith(f"error: {target}: cannot write: "), line
    assert "No space left on device" in line or "disk is full" in line, line
    return line


def test_a_full_disk_gives_one_line_naming_the_index_and_keeps_it(model_dir, phantom_dir, dataset, tmp_path):
    """index build / add / delete on a full disk (a real small tmpfs): SQLite's "database or disk is full", FAISS's
    write error and copytree's list of failures are one line naming the index, exit 2; the index is unchanged."""
    from disk_helpers import free_bytes, leave_free, small_disk

    train_id = next(record.id for record in dataset if record.split == "train")
    with small_disk(tmp_path / "disk", size="2m") as disk:
        out = disk / "new.idx"
        filler = leave_free(disk, 8 * 1024)
        result, output = invoke("index", "build", "--model", model_dir, "--data", phantom_dir, "--out", out, "-q")
        assert result.exit_code == 2
        _write_error(output, out)
        assert not out.exists()
        filler.unlink()

        index = disk / "idx"
        result, output = invoke("index", "build", "--model", model_dir, "--data", phantom_dir, "--out", index,
                                "--split", "train", "-q")
        assert result.exit_code == 0, output
        before = free_bytes(disk)
        shutil.copytree(index, disk / "probe")
        copy_size = before - free_bytes(disk)  # what the edit's copy of the index takes on this file system
        shutil.rmtree(disk / "probe")
        original = _index_files(index)
        filler = leave_free(disk, 0)  # no room for the edit's copy: copytree's shutil.Error
        result, output = invoke("index", "delete", train_id, "--index", index)
        assert result.exit_code == 2
        _write_error(output, index)
        filler.unlink()
        filler = leave_free(disk, copy_size)  # the copy fits, the added val cases do not
        result, output = invoke("index", "add", "--index", index, "--data", phantom_dir, "--split", "val", "-q")
        assert result.exit_code == 2
        _write_error(output, index)
        filler.unlink()
        import faiss

        from medvl.errors import WriteError
        from medvl.io import write_errors_named

        vectors = faiss.IndexFlatIP(64)
        vectors.add(np.ones((1024, 64), np.float32))
        filler = leave_free(disk, 0)
        with pytest.raises(WriteError, match="cannot write: No space left on device"), write_errors_named(index):
            faiss.write_index(vectors, str(disk / "vectors.faiss"))  # FAISS's own RuntimeError, mapped
        (disk / "vectors.faiss").unlink(missing_ok=True)
        filler.unlink()
        assert _index_files(index) == original
        left = sorted(path.name for path in disk.iterdir() if not path.name.startswith(".new.idx."))
        assert left == [".idx.lock", "idx"]  # no copy of the index left behind (the build's staging is kept)
        result, output = invoke("index", "delete", train_id, "--index", index)
        assert result.exit_code == 0 and "removed 1" in output


@pytest.mark.parametrize("args, message", [
    (["--where", "sex='F'; DROP TABLE cases"], "unexpected character ';'"),
    (["--where", "modality='CR'"], "unknown column 'modality'"),
    (["--image", "missing.png"], "file not found"),
    (["--image", "x.png", "--text", "y"], "exactly one"),
    ([], "exactly one"),
])
def test_cli_search_rejects_bad_queries(built, args, message):
    extra = [] if "--image" in args or "--text" in args else ["--text", "effusion"] if args else []
    result, output = invoke("search", "--index", built[0], *args, *extra)
    assert result.exit_code == 2 and message in output and "Traceback" not in output


def _unread(tmp_path: Path, n: int, reports: int) -> Dataset:
    """``n`` records whose image files do not exist (``reports`` of them with a report): a build that reads an image
    fails naming the file."""
    return Dataset([Record(id=f"c{i}", images=[str(tmp_path / f"missing{i}.png")], text="x y" if i < reports else None)
                    for i in range(n)], source=str(tmp_path))


def test_a_kind_that_cannot_be_built_is_refused_before_any_image_is_read(model, model_dir, tmp_path):
    """An unknown --kind, or IVF-PQ on fewer than 16 cases (or reports), failed only once every case was embedded,
    and left the whole staged build behind, which the corrected rerun threw away."""
    out = tmp_path / "idx"
    for kind, data, message in (("bogus", _unread(tmp_path, 20, 20), "kind 'bogus' is not an index kind; choose auto, "
                                                                      "flat, hnsw, ivfpq"),
                                ("ivfpq", _unread(tmp_path, 15, 15), "kind 'ivfpq' needs at least 16 vectors to train "
                                                                      "on, and the data has 15 cases and 15 reports"),
                                ("ivfpq", _unread(tmp_path, 20, 3), "the data has 3 reports; use kind 'flat' or "
                                                                     "'hnsw'")):
        with pytest.raises(InputError, match=message) as caught:
            build_index(model, data, out, model_dir=model_dir, kind=kind, show_progress=False)
        assert caught.value.parameter == "kind"
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder, no lock, no index
    # the CLI refuses it before loading the data (here: none there)
    result, output = invoke("index", "build", "--model", model_dir, "--data", tmp_path / "none", "--out", out,
                            "--kind", "bogus", "-q")
    assert result.exit_code == 2 and "--kind 'bogus' is not an index kind" in output, output
    assert not out.exists() and not (tmp_path / ".idx.build").exists()


def test_a_moved_model_folder_is_named_as_the_one_the_index_was_built_with(model, model_dir, dataset, tmp_path):
    """After the model folder an index recorded moved, ``medvl search`` said only "<folder>: not a medvl model
    directory (missing config.json)"; it now says that is the index's model, gone, and that --model gives it."""
    moved, index = tmp_path / "run" / "model", tmp_path / "idx"
    shutil.copytree(model_dir, moved)
    build_index(model, dataset.select("val"), index, model_dir=moved, show_progress=False)
    moved.parent.rename(tmp_path / "run-moved")
    result, output = invoke("search", "--index", index, "--text", "effusion")
    assert result.exit_code == 2, output
    assert (f"{index} was built with the model at {moved}, which is gone (moved or deleted); pass its new place with "
            "--model") in " ".join(output.split()), output
    result, output = invoke("search", "--index", index, "--text", "effusion", "--model",
                            tmp_path / "run-moved" / "model")
    assert result.exit_code == 0, output


def test_cli_search_on_a_missing_index(tmp_path):
    result, output = invoke("search", "--index", tmp_path / "none", "--text", "x")
    assert result.exit_code == 2 and "index not found" in output


def _with_nul(phantom_dir: Path, folder: Path, split: str, column: str) -> Path:
    """A copy of the phantom data whose second ``split`` case holds a NUL character in ``column`` (a damaged
    export); returns the folder."""
    shutil.copytree(phantom_dir, folder)
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    row = [r for r in rows if r["split"] == split][1]
    row[column] += " \x00 tail"
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def _refused_nul(args: tuple, data: Path, split: str, field: str) -> None:
    result, output = invoke(*args)
    case_id = [r.id for r in load_dataset(data) if r.split == split][1]
    assert result.exit_code == 2, output
    assert f"error: {data / 'manifest.csv'}: case {case_id!r}: {field} holds a NUL character" in output
    assert "tail" not in output and "Traceback" not in output


def test_a_nul_character_in_a_report_or_metadata_is_refused_before_anything_is_written(model_dir, phantom_dir,
                                                                                        tmp_path):
    """PostgreSQL stores no NUL in text or jsonb; a FAISS index refuses it too, so the same data builds the
    same index on both."""
    damaged = _with_nul(phantom_dir, tmp_path / "report-nul", "test", "text")
    _refused_nul(("index", "build", "--model", model_dir, "--data", damaged, "--out", tmp_path / "idx", "-q"),
                 damaged, "test", "the report")
    assert not (tmp_path / "idx").exists() and not list(tmp_path.glob("idx*"))
    result, output = invoke("index", "build", "--model", model_dir, "--data", damaged, "--split", "val",
                            "--out", tmp_path / "idx", "-q")
    assert result.exit_code == 0, output
    before = _index_files(tmp_path / "idx")
    damaged = _with_nul(phantom_dir, tmp_path / "view-nul", "train", "view")
    _refused_nul(("index", "add", "--index", tmp_path / "idx", "--data", damaged, "--split", "train", "-q"),
                 damaged, "train", "label 'view'")
    assert _index_files(tmp_path / "idx") == before


# ------------------------------------------------------------------ PostgreSQL + pgvector
# ------------------------------------------------------------------ PostgreSQL + pgvector


@pytest.fixture(scope="module")
def pg_url():
    with postgres_server("medvl-pg-") as (server, _):
        yield server.get_uri() + "#phantom_cases"


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_index_matches_faiss(pg_url, built, model, model_dir, dataset):
    info = build_index(model, dataset, pg_url, model_dir=model_dir, batch_size=48, show_progress=False)
    assert info["backend"] == "pgvector" and info["n_cases"] == 96
    with open_index(pg_url) as pg, open_index(built[0]) as local:
        assert pg.location.endswith("#phantom_cases") and len(pg) == 96
        for query in ({"image": dataset[3].image}, {"text": "small right pleural effusion"}):
            for target in ("images", "texts"):
                ours = search_index(pg, model, **query, k=5, target=target)
                reference = search_index(local, model, **query, k=5, target=target)
                assert [h.score for h in ours] == pytest.approx([h.score for h in reference], abs=1e-4)
        where = "sex = 'F' and age > 60 and finding in ('nodule', 'no_finding')"
        hits = search_index(pg, model, image=dataset[0].image, k=96, where=where)
        assert {h.id for h in hits} == {h.id for h in search_index(local, model, image=dataset[0].image, k=96,
                                                                    where=where)}
        for injection in INJECTIONS:
            with pytest.raises(InputError, match="where: "):
                search_index(pg, model, image=dataset[0].image, where=injection)
        assert len(pg) == 96

        def counted(index):  # the label distribution read from the case table (case retrieval's prior)
            return Counter({json.dumps(labels, sort_keys=True): n for labels, n in index.label_counts()})

        assert counted(pg) == counted(local) and sum(counted(pg).values()) == 96
        ids = [dataset[0].id, dataset[5].id, "not-indexed"]
        assert pg.case_labels(ids) == local.case_labels(ids) == {r.id: r.labels for r in (dataset[0], dataset[5])}
        with pytest.raises(ModelError, match="32-d"):
            search_index(pg, create_model("phantom-tiny", embed_dim=32), text="effusion")


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_hnsw_returns_every_case_asked_for(pg_url, built, model, model_dir, dataset, monkeypatch):
    """k above hnsw.ef_search (lowered to 20 here): the beam returns at most ef_search rows; every case comes
    back, ranked as the exact index ranks them."""
    from medvl.index import pgvector_store

    monkeypatch.setattr(pgvector_store, "PG_EF_SEARCH", 20)
    url = pg_url.replace("#phantom_cases", "#phantom_hnsw")
    build_index(model, dataset, url, model_dir=model_dir, kind="hnsw", show_progress=False)
    with open_index(url) as pg, open_index(built[0]) as local:
        assert pg.info["images"]["kind"] == "hnsw"
        pg.conn.execute("SET enable_seqscan = off")  # the planner's choice on a large table: the graph
        ours = search_index(pg, model, image=dataset[3].image, k=96)
        reference = search_index(local, model, image=dataset[3].image, k=96)
    assert len(ours) == 96 and {h.id for h in ours} == {h.id for h in reference}
    assert [h.score for h in ours] == pytest.approx([h.score for h in reference], abs=1e-4)


@pytest.fixture(scope="module")
def reused_plans_url(pg_url):
    """A database of the test server whose sessions keep a statement's generic plan (``plan_cache_mode``
    force_generic_plan: what PostgreSQL chooses by itself after five runs of a statement on an analysed table of 500
    cases) and prefer index scans (``enable_seqscan`` off: the planner's choice on a large table)."""
    _pg_rows(pg_url, "CREATE DATABASE reused_plans")
    _pg_rows(pg_url, "ALTER DATABASE reused_plans SET plan_cache_mode = force_generic_plan")
    _pg_rows(pg_url, "ALTER DATABASE reused_plans SET enable_seqscan = off")
    return urlunsplit(urlsplit(pg_url.partition("#")[0])._replace(path="/reused_plans")) + "#reused"


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_filtered_searches_keep_returning_k_on_one_connection(reused_plans_url, built, model, model_dir,
                                                                        dataset, monkeypatch):
    """A filter that starves the HNSW beam (ef_search 10, half the cases allowed) is ranked again exactly, index scans
    off. psycopg prepared the search's SQL from its sixth run, and the server then reused that statement's cached
    HNSW plan for the exact ranking too (a SET LOCAL does not replan it): after a few searches on one connection (a
    service's) k=10 came back with 5 to 9 cases."""
    from medvl.index import pgvector_store

    monkeypatch.setattr(pgvector_store, "PG_EF_SEARCH", 10)
    url = reused_plans_url.replace("#reused", "#filtered")
    build_index(model, dataset, url, model_dir=model_dir, kind="hnsw", show_progress=False)
    where = "sex = 'F'"
    with open_index(url) as pg, open_index(built[0]) as local:
        for i, k in enumerate([3, 3, 10] * 5):  # k 3: the beam answers alone; k 10: it is short, ranked exactly
            hits = search_index(pg, model, image=dataset[i].image, k=k, where=where)
            assert len(hits) == k and all(h.meta["sex"] == "F" for h in hits), (i, k, len(hits))
            if k == 10:
                reference = search_index(local, model, image=dataset[i].image, k=k, where=where)
                assert {h.id for h in hits} == {h.id for h in reference}, i
                assert [h.score for h in hits] == pytest.approx([h.score for h in reference], abs=1e-4)


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_recall_is_measured_against_exact_search(reused_plans_url, model, model_dir, dataset, monkeypatch):
    """ef_search 5: the graph finds about half of a query's 10 nearest. The build ran one SQL text for both sides on
    one connection: once the server reused its plan both sides were the same scan, and the build recorded 0.97 where
    0.5 was true; it also divided by the exact side's row count, not by 10. Checked against recall@10 computed here
    by hand on the same 50 sampled vectors, with no statement prepared."""
    import psycopg

    from medvl.index import pgvector_store

    monkeypatch.setattr(pgvector_store, "PG_EF_SEARCH", 5)
    url = reused_plans_url.replace("#reused", "#narrow_beam")
    info = build_index(model, dataset, url, model_dir=model_dir, kind="hnsw", show_progress=False)
    with psycopg.connect(url.partition("#")[0], autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SET hnsw.ef_search = 5")
        for target, column in (("images", "image_vec"), ("texts", "text_vec")):
            sampled = conn.execute(f"SELECT {column}::text FROM narrow_beam WHERE {column} IS NOT NULL "
                                   "ORDER BY md5(id) LIMIT 50").fetchall()
            nearest = f"SELECT id FROM narrow_beam WHERE {column} IS NOT NULL ORDER BY {column} <#> %s::vector LIMIT 10"
            shares = []
            for (query,) in sampled:
                graph = {row[0] for row in conn.execute(nearest, (query,))}
                conn.execute("SET enable_indexscan = off")
                conn.execute("SET enable_seqscan = on")
                exact = {row[0] for row in conn.execute(nearest, (query,))}
                conn.execute("RESET enable_indexscan")
                conn.execute("RESET enable_seqscan")
                assert len(exact) == 10
                shares.append(len(graph & exact) / 10)
            assert len(sampled) == 50 and info[target]["recall_at_10"] == pytest.approx(np.mean(shares), abs=1e-12)
            assert 0 < info[target]["recall_at_10"] < 0.8, (target, info[target]["recall_at_10"])


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_add_delete_duplicates_and_resume(pg_url, model, model_dir, dataset, monkeypatch):
    url = pg_url.replace("#phantom_cases", "#edited")
    build_index(model, dataset.select("val"), url, model_dir=model_dir, show_progress=False)
    with open_index(url, writable=True) as index:
        with pytest.raises(InputError, match="another process"):
            open_index(url, writable=True)
        assert index.delete([dataset.select("val")[0].id]) == 1
    with open_index(url) as index:
        assert len(index) == 10  # not saved: rolled back
    with open_index(url, writable=True) as index:
        result = add_records(index, model, dataset.select("test"), show_progress=False)
        assert result["added"] == 19 and len(index) == 29
        again = Record(id="copy", images=[dataset.select("test")[0].image], meta={"sex": "M"})
        result = add_records(index, model, dataset.subset([again]), show_progress=False)
        assert result["duplicates"] == [{"id": "copy", "duplicate_of": dataset.select("test")[0].id}]
        result = add_records(index, model, dataset.select("test"), show_progress=False)  # labels read back from jsonb
        assert (result["already_present"], result["replaced"], len(index)) == (19, 0, 29)
        first = dataset.select("test")[0]  # metadata and split read back from jsonb are compared too
        for changed in (dataclasses.replace(first, meta={**first.meta, "age": 101}),
                        dataclasses.replace(first, split="train")):
            with pytest.raises(InputError, match=rf"1 cases have an id .* \(e\.g\. '{first.id}'\)"):
                add_records(index, model, dataset.subset([changed]), show_progress=False)
    with open_index(url) as index:  # the vector counts follow the table; the build's recall says what it measured
        assert (index.info["images"]["n"], index.info["images"]["recall_measured_on"]) == (29, 10)
    # a build interrupted after two batches leaves the old table; the rerun resumes
    interrupted_build(model, model_dir, dataset, url, monkeypatch, batch_size=16, kind="hnsw")
    with open_index(url) as index:
        assert len(index) == 29
        assert search_index(index, model, text="nodule", k=1)
    info = build_index(model, dataset, url, model_dir=model_dir, batch_size=16, kind="hnsw", show_progress=False)
    assert info["resumed"] == 32 and info["images"]["kind"] == "hnsw" and 0 <= info["images"]["recall_at_10"] <= 1
    with open_index(url) as index:
        assert len(index) == 96
        hits = search_index(index, model, image=dataset[0].image, k=3, where="view = 'PA'")
        assert len(hits) == 3 and all(h.meta["view"] == "PA" for h in hits)


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_a_report_search_of_an_index_whose_reports_were_all_deleted_is_the_same_on_both_backends(
        pg_url, model, model_dir, dataset, tmp_path):
    """Once every case was deleted, a ``target="texts"`` search raised on FAISS ("holds no report texts") and answered
    no hits on PostgreSQL. Both now answer no hits, as an image search of an emptied index does; an index that never
    held a report refuses a report search on both."""
    data = Dataset(dataset.records[:6], source=dataset.source)
    unreported = Dataset([dataclasses.replace(r, text=None) for r in dataset.records[:6]], source=dataset.source)
    for backend, out in (("faiss", tmp_path / "idx"), ("pgvector", pg_url.replace("#phantom_cases", "#emptied"))):
        build_index(model, data, out, model_dir=model_dir, show_progress=False)
        with open_index(out, writable=True) as index:
            assert index.delete([r.id for r in data]) == 6
            index.save()
        with open_index(out) as index:
            for target in ("texts", "images"):
                assert search_index(index, model, text="effusion", k=3, target=target) == [], (backend, target)
        never = tmp_path / "never" if backend == "faiss" else pg_url.replace("#phantom_cases", "#unreported")
        build_index(model, unreported, never, model_dir=model_dir, show_progress=False)
        with open_index(never) as index, pytest.raises(InputError, match="holds no report texts to search"):
            search_index(index, model, text="effusion", target="texts")


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_password_in_the_url_query_is_never_shown(pg_url, model_dir, phantom_dir, tmp_path):
    """libpq takes the password as ``?password=`` too: the CLI's tables, messages and --json show it as ***, and
    the one in ``user:password@`` too."""
    url = pg_url.replace("#phantom_cases", "&password=hunter2SECRET#pw_query")  # trust auth: any password works
    url = url.replace("postgres:@", "postgres:userinfoSECRET@")
    outputs = []
    for args in (("index", "build", "--model", model_dir, "--data", phantom_dir, "--split", "val", "--out", url,
                  "--json", tmp_path / "build.json", "-q"),
                 ("index", "info", "--index", url),
                 ("search", "--index", url, "--text", "effusion", "-k", 2, "--json", tmp_path / "hits.json")):
        result, output = invoke(*args)
        assert result.exit_code == 0, output
        outputs.append(output)
    outputs += [(tmp_path / name).read_text() for name in ("build.json", "hits.json")]
    assert "postgresql://postgres:***@" in outputs[1]  # the table's title names the index
    assert not [text for text in outputs if "SECRET" in "".join(text.split())]  # also where a line wrapped
    assert json.loads(outputs[-1])["index"].endswith("&password=***#***")  # the table may be the password's end
    with open_index(url) as index:
        assert "SECRET" not in index.location


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
@pytest.mark.parametrize("char", ["#", "@", "/", "?", "%"])
def test_pgvector_password_holding_a_url_character_is_never_shown(pg_url, model_dir, phantom_dir, char, caplog):
    """A password holding # @ / ? or %: percent-encoded it connects and shows as ***; written as it is (in
    ``user:password@`` or in ``?password=``) the URL is refused in one line quoting none of it, and a table name
    right after a ``password=`` value (it may be the password's end) is shown as ***."""
    from urllib.parse import quote

    password = f"SECRETa{char}SECRETb"
    search = ("search", "--text", "effusion", "-k", 2)
    encoded = pg_url.replace("postgres:@", f"postgres:{quote(password, safe='')}@").replace("#phantom_cases", "#pw_enc")
    result, output = invoke("index", "build", "--model", model_dir, "--data", phantom_dir, "--split", "val",
                            "--out", encoded, "-q")
    assert result.exit_code == 0 and "postgres:***@" in output, output
    unencoded = [pg_url.replace("postgres:@", f"postgres:{password}@"),
                 pg_url.replace("#phantom_cases", f"&password={password}#phantom_cases"),
                 pg_url.replace("#phantom_cases", f"&password={password}")]
    for url in unencoded:  # @ / ? may stand in a query value (RFC 3986): that URL is read as it is
        result, output = invoke(*search, "--index", url)
        assert "SECRET" not in "".join(output.split()), output  # also where a line wrapped
        if url is unencoded[0] or char in "#%":
            assert result.exit_code == 2 and output.startswith("error: the index URL "), output
            assert len(set(output.strip().splitlines())) == 1, output  # one line (stdout and stderr hold it)
    tail = pg_url.replace("#phantom_cases", "&password=SECRETa#secretb")  # '#' read as the table's start
    result, output = invoke(*search, "--index", tail)
    assert result.exit_code == 2 and "no medvl index named '***'" in output, output
    with pytest.raises(DataError) as caught:
        open_index(tail.replace("postgres:@", "postgres:@127.0.0.1:1"))  # libpq's own message
    assert "SECRET" not in str(caught.value)
    assert not [t for t in (output, caplog.text) if "SECRET" in t.upper()]


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_orders_text_filters_by_code_point_on_a_locale_database(pg_url, model, model_dir, dataset,
                                                                         tmp_path):
    """A database made with an en_US collation (as a Debian cluster's usually is) orders 'Banana' after 'apple':
    < <= > >= on text still pick the cases the FAISS index picks, in code-point order."""
    import dataclasses

    try:
        _pg_rows(pg_url, "CREATE DATABASE en_us TEMPLATE template0 LC_COLLATE 'en_US.utf8' LC_CTYPE 'en_US.utf8'")
    except Exception as err:  # noqa: BLE001 - whatever the reason, there is no such database to test against
        pytest.skip(f"PostgreSQL cannot make an en_US.utf8 database here: {str(err).strip()}")
    en_url = pg_url.replace("@/postgres?", "@/en_us?")
    assert _pg_rows(en_url, "SELECT 'Banana' > 'apple'") == [(True,)]  # the database orders by locale
    sites = ["apple", "Banana", "cherry", "Zulu", "éclair", "b-2", "b1"]
    records = [dataclasses.replace(r, meta={"site": sites[i % len(sites)]}) for i, r in enumerate(dataset[:21])]
    data = dataset.subset(records)
    build_index(model, data, en_url.replace("#phantom_cases", "#sites"), model_dir=model_dir, show_progress=False)
    build_index(model, data, tmp_path / "sites", model_dir=model_dir, show_progress=False)
    filters = {"site < 'b'": lambda r: r.meta["site"] < "b",
               "site >= 'b1' and site <= 'cherry'": lambda r: "b1" <= r.meta["site"] <= "cherry",
               "not site > 'Zulu'": lambda r: not r.meta["site"] > "Zulu",
               "site > 'z'": lambda r: r.meta["site"] > "z",
               f"id < '{records[5].id}'": lambda r: r.id < records[5].id}
    with open_index(en_url.replace("#phantom_cases", "#sites")) as pg, open_index(tmp_path / "sites") as local:
        for where, keep in filters.items():
            expected = {r.id for r in records if keep(r)}
            assert 0 < len(expected) < len(records), where
            for index in (pg, local):
                hits = search_index(index, model, text="effusion", k=21, where=where)
                assert {h.id for h in hits} == expected, (index.location, where)


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_refuses_a_nul_character_in_one_line_before_anything_is_written(pg_url, model_dir, phantom_dir,
                                                                                 tmp_path):
    url = pg_url.replace("#phantom_cases", "#nul")
    damaged = _with_nul(phantom_dir, tmp_path / "report-nul", "test", "text")
    _refused_nul(("index", "build", "--model", model_dir, "--data", damaged, "--out", url, "-q"),
                 damaged, "test", "the report")
    tables = "SELECT tablename FROM pg_tables WHERE tablename LIKE 'nul%%'"
    assert _pg_rows(url, tables) == []  # no staging table left behind
    result, output = invoke("index", "build", "--model", model_dir, "--data", phantom_dir, "--split", "val",
                            "--out", url, "-q")
    assert result.exit_code == 0, output
    damaged = _with_nul(phantom_dir, tmp_path / "view-nul", "train", "view")  # a jsonb value
    _refused_nul(("index", "add", "--index", url, "--data", damaged, "--split", "train", "-q"),
                 damaged, "train", "label 'view'")
    assert _pg_rows(url, "SELECT count(*) FROM nul") == [(len(load_dataset(phantom_dir).select("val")),)]


def test_a_postgres_server_that_cannot_be_reached_is_one_line_without_the_password():
    pytest.importorskip("psycopg")
    with pytest.raises(DataError) as caught:  # port 1: nothing listens; libpq answers in two lines
        open_index("postgresql://u:secret@127.0.0.1:1/db#t")
    message = str(caught.value)
    assert "cannot connect to PostgreSQL" in message and "Connection refused" in message, message
    assert "\n" not in message and "secret" not in message, message


def _pg_rows(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(url.partition("#")[0], autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_a_pgvector_index_whose_table_was_dropped_is_one_line_everywhere(pg_url, model, model_dir, phantom_dir,
                                                                         dataset):
    """With its ``medvl_indexes`` row left but its table dropped, every command died with psycopg's UndefinedTable
    traceback (exit 1), and a reader opened before the drop raised it too (the service: 500). Opening it, and
    searching or describing it from a reader opened before, is now one ``IndexGone`` line (CLI exit 2, service 503)
    naming the index and the table."""
    url = pg_url.replace("#phantom_cases", "#gone")
    build_index(model, dataset.subset(dataset[:6]), url, model_dir=model_dir, show_progress=False)
    with open_index(url) as reader:
        _pg_rows(url, "DROP TABLE gone")
        with pytest.raises(DataError, match="names table 'gone', which does not exist .*rebuild the index") as gone:
            search_index(reader, model, text="effusion")
        assert gone.value.status == 503  # the service's answer: the server's condition, not the request's
        with pytest.raises(DataError, match="which does not exist"):
            reader.follow_rebuild()  # what the service's /v1/models reads before it counts the cases
    for writable in (False, True):
        with pytest.raises(DataError, match=r"#gone: the medvl_indexes row names table 'gone', which does not exist"):
            open_index(url, writable=writable)
    for args in (("index", "info", "--index", url), ("search", "--index", url, "--text", "x"),
                 ("index", "delete", "--index", url, "a"), ("index", "add", "--index", url, "--data", phantom_dir,
                                                            "-q")):
        result, output = invoke(*args)
        assert result.exit_code == 2 and "which does not exist" in output and "Traceback" not in output, output
        # one error line (said on stdout and stderr; a log line of the data read may stand beside it when an
        # earlier test left the log level at INFO)
        assert {line for line in output.splitlines() if line.startswith("error:")} == \
            {line for line in output.splitlines() if "which does not exist" in line}, output
        assert len({line for line in output.splitlines() if line.startswith("error:")}) == 1, output


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_staging_names_are_reserved_and_other_tables_kept(pg_url, model, model_dir, dataset):
    """Building index X stages it in X__build: an index of that name is refused up front, and a table found there
    that is not a build of X (an index made before the name was reserved, another program's table) is never
    dropped: the build is refused, naming it."""
    val = dataset.select("val")
    ward = pg_url.replace("#phantom_cases", "#ward")
    with pytest.raises(InputError, match="reserved"):
        build_index(model, val, ward + "__build", model_dir=model_dir, show_progress=False)
    with pytest.raises(InputError, match="reserved"):
        open_index(ward + "__build")
    # an index named ward__build by an earlier medvl (renamed into place here), then a build of ward
    build_index(model, val, pg_url.replace("#phantom_cases", "#ward_old"), model_dir=model_dir, show_progress=False)
    _pg_rows(pg_url, "ALTER TABLE ward_old RENAME TO ward__build")
    _pg_rows(pg_url, "UPDATE medvl_indexes SET name = 'ward__build' WHERE name = 'ward_old'")
    with pytest.raises(InputError, match="'ward__build'.* is a medvl index; rename it"):
        build_index(model, dataset.select("test"), ward, model_dir=model_dir, show_progress=False)
    assert _pg_rows(pg_url, "SELECT COUNT(*) FROM ward__build") == [(len(val),)]
    assert _pg_rows(pg_url, "SELECT info->>'n_cases' FROM medvl_indexes WHERE name = 'ward__build'") == [("10",)]
    assert _pg_rows(pg_url, "SELECT to_regclass('ward')") == [(None,)]
    # another program's table in the staging place
    _pg_rows(pg_url, "CREATE TABLE notes__build (note text)")
    _pg_rows(pg_url, "INSERT INTO notes__build VALUES ('keep me')")
    with pytest.raises(InputError, match="is a table medvl did not create"):
        build_index(model, val, pg_url.replace("#phantom_cases", "#notes"), model_dir=model_dir, show_progress=False)
    assert _pg_rows(pg_url, "SELECT note FROM notes__build") == [("keep me",)]
    _pg_rows(pg_url, "DROP TABLE ward__build, notes__build")
    _pg_rows(pg_url, "DELETE FROM medvl_indexes WHERE name = 'ward__build'")


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_build_never_replaces_a_table_that_is_not_an_index(pg_url, model, model_dir, dataset):
    """The swap drops the table it replaces: a ``#table`` naming another program's table (a typo, a shared
    database) is refused before any work, as a FAISS --out folder that is not an index is; an index is rebuilt."""
    val = dataset.select("val")
    _pg_rows(pg_url, "CREATE TABLE patients (mrn text PRIMARY KEY, name text)")
    _pg_rows(pg_url, "INSERT INTO patients VALUES ('778899', 'Smith John')")
    for table in ("patients", "medvl_indexes"):  # the second: medvl's own table of index infos
        with pytest.raises(InputError, match=rf"table '{table}' exists and is not a medvl index; refusing"):
            build_index(model, val, pg_url.replace("#phantom_cases", f"#{table}"), model_dir=model_dir,
                        show_progress=False)
        assert _pg_rows(pg_url, "SELECT to_regclass(%s)", (f"{table}__build",)) == [(None,)]  # nothing staged
    assert _pg_rows(pg_url, "SELECT * FROM patients") == [("778899", "Smith John")]
    _pg_rows(pg_url, "DROP TABLE patients")
    rebuilt = pg_url.replace("#phantom_cases", "#rebuilt")
    for _ in range(2):  # an index there is replaced
        assert build_index(model, val, rebuilt, model_dir=model_dir, show_progress=False)["n_cases"] == len(val)


def _hnsw_indexes(url: str, table: str) -> list[tuple[int, str]]:
    """(oid, column) of each HNSW index on ``table``."""
    return _pg_rows(url, "SELECT c.oid::int, a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                         "JOIN pg_am am ON am.oid = c.relam JOIN pg_attribute a ON a.attrelid = i.indrelid "
                         "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(%s) AND am.amname = 'hnsw' "
                         "ORDER BY c.oid", (table,))


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_interrupted_hnsw_build_keeps_one_graph_per_column(pg_url, model, model_dir, dataset, monkeypatch):
    """A build interrupted after its image graph was committed (here: during the recall measurement, which at 1M
    cases takes minutes) is rerun: the rerun keeps that graph instead of adding another, on every rerun."""
    from medvl.index import pgvector_store

    url, measure = pg_url.replace("#phantom_cases", "#hnsw_rerun"), pgvector_store._measure_recall

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pgvector_store, "_measure_recall", interrupted)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            build_index(model, dataset, url, model_dir=model_dir, kind="hnsw", show_progress=False)
    staged = _hnsw_indexes(url, "hnsw_rerun__build")
    assert [column for _, column in staged] == ["image_vec"]
    monkeypatch.setattr(pgvector_store, "_measure_recall", measure)
    info = build_index(model, dataset, url, model_dir=model_dir, kind="hnsw", show_progress=False)
    assert info["resumed"] == 96 and info["images"]["kind"] == info["texts"]["kind"] == "hnsw"
    final = _hnsw_indexes(url, "hnsw_rerun")
    assert sorted(column for _, column in final) == ["image_vec", "text_vec"]
    assert final[0] == staged[0]  # the graph built before the interruption, not a new one
    assert _hnsw_indexes(url, "hnsw_rerun__build") == []
    build_index(model, dataset, url, model_dir=model_dir, kind="hnsw", show_progress=False)  # a build over it
    assert sorted(column for _, column in _hnsw_indexes(url, "hnsw_rerun")) == ["image_vec", "text_vec"]
    with open_index(url) as index:
        assert len(search_index(index, model, image=dataset[0].image, k=5)) == 5


def test_fingerprint_ignores_config_fields_left_at_their_default():
    """A config field added later with a default must not orphan indexes built before it."""
    from medvl.index.base import model_fingerprint
    from medvl.models import create_model
    from medvl.models.config import non_default

    values = {"name": "m", "embed_dim": 64, "image": {"arch": "vit", "new_knob": 0.0}}
    defaults = {"name": "", "embed_dim": 64, "image": {"arch": "resnet"}}
    assert non_default(values, {**defaults, "image": {**defaults["image"], "new_knob": 0.0}}) == \
        {"name": "m", "image": {"arch": "vit"}}
    a, b = create_model("phantom-tiny"), create_model("phantom-tiny", **{"image.image_size": 48})
    assert model_fingerprint(a)["config_sha256"] != model_fingerprint(b)["config_sha256"]


def test_a_query_model_other_than_the_indexs_says_which_part_differs():
    """The refusal names the config or the weights, in a sentence that agrees with its subject."""
    from medvl.index.base import check_model, model_fingerprint

    torch.manual_seed(0)
    built = create_model("phantom-tiny", **{"image.image_size": 32})
    info = {"model": {**model_fingerprint(built), "name": "built"}, "embed_dim": built.config.embed_dim}
    other_config = create_model("phantom-tiny", **{"image.image_size": 48})
    with pytest.raises(ModelError, match=r"idx: the model's config differs from the config the index was built "
                                         r"with \(built\); rebuild the index or use that model"):
        check_model(info, other_config, "idx")
    torch.manual_seed(1)
    other_weights = create_model("phantom-tiny", **{"image.image_size": 32})
    with pytest.raises(ModelError, match=r"idx: the model's weights differ from the weights the index was built "
                                         r"with \(built\)"):
        check_model(info, other_weights, "idx")
    check_model(info, built, "idx")


def test_an_image_a_2d_model_cannot_take_is_named_by_its_file(model_dir, phantom_dir, tmp_path):
    """A 2-frame RGB DICOM among PNGs: ``index build`` and ``search --image`` name the file (they said ``<array>``)."""
    from pydicom.data import get_testdata_file

    folder = tmp_path / "mixed"
    folder.mkdir()
    for number in range(3):
        shutil.copy(phantom_dir / "images" / f"phantom_{number:05d}.png", folder / f"p{number}.png")
    shutil.copy(get_testdata_file("SC_rgb_rle_2frame.dcm"), folder / "scan.dcm")
    (folder / "manifest.csv").write_text("image,text\np0.png,a b\np1.png,c d\nscan.dcm,e f\np2.png,g h\n")
    result, output = invoke("index", "build", "--model", model_dir, "--data", folder, "--out", tmp_path / "idx", "-q")
    assert result.exit_code == 2 and "<array>" not in output
    assert "scan.dcm: a multi-frame DICOM of 2 frames (shape (2, 100, 100, 3)): a 2D model reads one image" \
        in " ".join(output.split())
    (folder / "manifest.csv").write_text("image,text\np0.png,a b\np1.png,c d\n")
    result, output = invoke("index", "build", "--model", model_dir, "--data", folder, "--out", tmp_path / "idx", "-q")
    assert result.exit_code == 0, output
    result, output = invoke("search", "--index", tmp_path / "idx", "--image", folder / "scan.dcm", "-k", 1)
    assert result.exit_code == 2 and "<array>" not in output
    assert "scan.dcm: a multi-frame DICOM of 2 frames" in " ".join(output.split())


def test_search_show_names_a_column_of_the_index_or_is_refused(built, tmp_path):
    """--show takes the index's columns in any case, as --where does; any other name is one line, exit 2 (it showed
    a column of '-' and exited 0, as if no case had a value)."""
    result, output = invoke("search", "--index", built[0], "--text", "effusion", "-k", 2, "--show", "nosuchcol")
    assert result.exit_code == 2 and "unknown column 'nosuchcol' to show" in output and "finding" in output
    result, output = invoke("search", "--index", built[0], "--text", "effusion", "-k", 2, "--show", "Finding",
                            "--show", "AGE", "--json", tmp_path / "hits.json")
    assert result.exit_code == 0, output
    hits = json.loads((tmp_path / "hits.json").read_text())["hits"]
    table = [line.split("│") for line in output.splitlines() if line.startswith("│")]
    assert [row[6].strip() for row in table] == [str(hit["meta"]["age"]) for hit in hits]
    assert all(row[5].strip() not in ("", "-") for row in table)  # the finding


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_metadata_keys_too_long_for_a_postgres_column_stay_in_the_metadata_on_both_backends(pg_url, model, model_dir,
                                                                                          dataset, tmp_path):
    """PostgreSQL cuts a column name to 63 bytes: two keys agreeing in their first 61 characters made one
    column ``m_<name>`` there and the build died with psycopg's DuplicateColumn (a FAISS build took them). A
    filter column's name is now at most 61 characters on both backends; longer keys stay in the metadata."""
    fits, first, second = "k" * 61, "a" * 61 + "x1", "a" * 61 + "x2"
    records = [dataclasses.replace(r, meta={fits: str(i), first: str(i), second: f"t{i}"})
               for i, r in enumerate(dataset[:5])]
    data = dataset.subset(records)
    url = pg_url.replace("#phantom_cases", "#long_keys")
    for out in (tmp_path / "long", url):
        info = build_index(model, data, out, model_dir=model_dir, show_progress=False)
        assert info["columns"] == {fits: "number"}, out
        with open_index(out) as index:
            hits = search_index(index, model, text="effusion", k=5, where=f"{fits} >= 3")
            assert sorted(h.id for h in hits) == sorted(r.id for r in records[3:])
            assert {h.meta[second] for h in hits} == {"t3", "t4"}  # kept in the metadata
            with pytest.raises(InputError, match="where: "):
                search_index(index, model, text="effusion", where=f"{first} = 1")


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_long_whole_numbers_and_unencodable_filters_are_the_same_on_both_backends(pg_url, model, model_dir, dataset,
                                                                                 tmp_path):
    """PostgreSQL stored accession numbers as double precision too (``accession = 20231105000000002`` matched ...001);
    they are text there as well now. A filter holding a lone surrogate gave no hits on FAISS and psycopg's
    UnicodeEncodeError on PostgreSQL; both refuse it now with the same InputError."""
    data = _with_meta(dataset, {"accession": LONG_NUMBERS})
    url = pg_url.replace("#phantom_cases", "#long_numbers")
    for out in (tmp_path / "long", url):
        assert build_index(model, data, out, model_dir=model_dir, show_progress=False)["columns"] == \
            {"accession": "text"}, out
        with open_index(out) as index:
            for i, value in enumerate(LONG_NUMBERS):
                assert _filtered_ids(index, model, f"accession = '{value}'") == [data[i].id], out
            with pytest.raises(InputError, match=r"where: not valid Unicode text \(a lone surrogate\) at position 14"):
                search_index(index, model, text="effusion", where="accession = '\ud800'")


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_refuses_a_kind_it_cannot_build_before_any_image_is_read(pg_url, model, model_dir, tmp_path):
    """--kind ivfpq (FAISS only) on PostgreSQL failed after every case was embedded into ``<table>__build``, and the
    staging table with every report, metadata and vector stayed."""
    url = pg_url.replace("#phantom_cases", "#kinds")
    for kind, message in (("ivfpq", "kind 'ivfpq' is not available with pgvector; choose auto, flat, hnsw"),
                          ("bogus", "kind 'bogus' is not an index kind")):
        with pytest.raises(InputError, match=message):
            build_index(model, _unread(tmp_path, 20, 20), url, model_dir=model_dir, kind=kind, show_progress=False)
    assert _pg_rows(url, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'kinds%%'") == []
    result, output = invoke("index", "build", "--model", model_dir, "--data", tmp_path / "none", "--out", url,
                            "--kind", "ivfpq", "-q")
    assert result.exit_code == 2 and "--kind 'ivfpq' is not available with pgvector" in output, output


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_keeps_the_key_order_of_labels_metadata_and_filter_columns(pg_url, built, model, model_dir, dataset):
    """jsonb sorts an object's keys (by length, then bytes): hits' labels and meta, and the filter columns of ``index
    info``, came back from PostgreSQL in another order than from FAISS (age, sex, view, boxes, ... instead of the
    manifest's finding, no_finding, ...). Both backends now give the data's order; the label counts stay whole."""
    url = pg_url.replace("#phantom_cases", "#ordered")
    build_index(model, dataset, url, model_dir=model_dir, show_progress=False)
    with open_index(url) as pg, open_index(built[0]) as local:
        assert list(pg.info["columns"]) == list(local.info["columns"])
        assert list(local.info["columns"])[:2] == ["finding", "no_finding"]  # the manifest's order
        for ours, reference in zip(search_index(pg, model, text="effusion", k=10),
                                   search_index(local, model, text="effusion", k=10), strict=True):
            assert ours.id == reference.id
            record = next(r for r in dataset if r.id == ours.id)
            assert list(ours.labels) == list(reference.labels) == list(record.labels)
            assert list(ours.meta) == list(reference.meta) == list(record.meta)
        assert sum(n for _, n in pg.label_counts()) == 96
    rows = []
    for index in (url, built[0]):
        result, output = invoke("index", "info", "--index", index)
        assert result.exit_code == 0, output
        rows.append(" ".join(output.split()).split("filter columns")[1])
    assert rows[0] == rows[1] and rows[0].index("finding (text)") < rows[0].index("age (number)")
    with open_index(url, writable=True) as pg:  # an add keeps the order, new columns after
        extra = dataclasses.replace(dataset[0], id="extra", meta={**dataset[0].meta, "zz_new": "1", "a": "x"})
        add_records(pg, model, dataset.subset([extra]), allow_duplicates=True, show_progress=False)
    with open_index(url) as pg:
        assert list(pg.info["columns"]) == [*local.info["columns"], "zz_new", "a"]


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_pgvector_gives_equal_scores_in_case_id_order_whatever_k(pg_url, model, model_dir, dataset, tmp_path):
    """As ``test_equal_scores_come_back_in_case_id_order_whatever_k``, on PostgreSQL: the same hits as FAISS."""
    data = _tripled(dataset)
    url = pg_url.replace("#phantom_cases", "#tripled")
    for out in (url, tmp_path / "local"):
        build_index(model, data, out, model_dir=model_dir, allow_duplicates=True, show_progress=False)
    with open_index(url) as pg, open_index(tmp_path / "local") as local:
        every = [hit.id for hit in search_index(pg, model, image=data[0].image, k=24)]
        assert every == [hit.id for hit in search_index(local, model, image=data[0].image, k=24)]
        assert every[:3] == sorted(every[:3])
        for k in (1, 2, 4, 7):
            assert [hit.id for hit in search_index(pg, model, image=data[0].image, k=k)] == every[:k]


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_a_pgvector_swap_landing_during_a_search_is_followed_or_refused(pg_url, model, model_dir, dataset, tmp_path):
    """A reader read the index's info, then its query waited for a rebuild's swap (which holds the table's lock)
    and ran on the new table: with the old info's columns (a PostgreSQL UndefinedColumn error, a 500 in the
    service) or with vectors of another model (hits scored by a foreign model, silently). The info is read
    again in the search's transaction now: the search follows the new table, or is refused."""
    import threading

    import psycopg

    from medvl.index.base import IndexRebuilt
    from medvl.index.pgvector_store import INFO_TABLE

    base = pg_url.rsplit("#", 1)[0]
    other_dir = tmp_path / "other"
    torch.manual_seed(11)
    create_model("phantom-tiny").save_pretrained(other_dir)
    without_age = Dataset([dataclasses.replace(r, meta={k: v for k, v in r.meta.items() if k != "age"})
                           for r in dataset], source=dataset.source)

    def swap_during(search, new_model, new_model_dir, data):
        """Build ``#swapped_next``, then swap it in by hand as a build does, committing only once ``search``
        (run on a reader of ``#swapped`` opened before) waits for the swap's lock."""
        build_index(model, dataset, base + "#swapped", model_dir=model_dir, show_progress=False)
        build_index(new_model, data, base + "#swapped_next", model_dir=new_model_dir, show_progress=False)
        outcome: dict = {}
        with open_index(base + "#swapped") as reader, psycopg.connect(base) as writer:
            reader.follow_rebuild()
            writer.execute('DROP TABLE "swapped"')
            writer.execute('ALTER TABLE "swapped_next" RENAME TO "swapped"')
            writer.execute(f"UPDATE {INFO_TABLE} SET info = (SELECT info FROM {INFO_TABLE} WHERE name = "
                           "'swapped_next') WHERE name = 'swapped'")
            writer.execute(f"DELETE FROM {INFO_TABLE} WHERE name = 'swapped_next'")

            def run():
                try:
                    outcome["hits"] = search(reader)
                except Exception as error:  # noqa: BLE001 - the outcome is checked below
                    outcome["error"] = error

            thread = threading.Thread(target=run)
            thread.start()
            with psycopg.connect(base, autocommit=True) as watcher:
                deadline = time.monotonic() + 30
                while not watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                          "AND query LIKE '%%swapped%%'").fetchone()[0]:
                    assert time.monotonic() < deadline and thread.is_alive(), outcome
                    time.sleep(0.02)
            writer.commit()
            thread.join(30)
        return outcome

    image = dataset[3].image
    foreign = swap_during(lambda index: search_index(index, model, image=image, k=5), load_model(other_dir),
                          other_dir, dataset)
    assert isinstance(foreign.get("error"), IndexRebuilt), foreign
    filtered = swap_during(lambda index: search_index(index, model, image=image, k=5, where="age > 50"), model,
                           model_dir, without_age)
    assert isinstance(filtered.get("error"), InputError) and "age" in str(filtered["error"]), filtered
    plain = swap_during(lambda index: search_index(index, model, image=image, k=5), model, model_dir, without_age)
    assert len(plain.get("hits", [])) == 5, plain


def _cases_past_the_filter_columns(dataset: Dataset) -> Dataset:
    """Six phantom records, two to a case, whose case_id comes after 205 other metadata keys: past the index's
    MAX_FILTER_COLUMNS (200), so it is kept in the metadata JSON only, never a filter column."""
    extra = {f"x{i:03d}": "v" for i in range(205)}
    records = [dataclasses.replace(record, meta={**extra, "case_id": f"C{i // 2}"})
               for i, record in enumerate(list(dataset)[:6])]
    return dataset.subset(records)


def _check_case_ids(index) -> None:
    assert "case_id" not in index.columns and "m_case_id" not in index.columns
    assert len(index) == 6
    found = index.case_ids(["C0", "C2", "missing"])
    assert set(found) == {"C0", "C2"} and all(len(images) == 2 for images in found.values())
    assert index.case_ids(set()) == {}


def test_a_case_key_past_the_filter_columns_still_finds_the_case_s_images(model, model_dir, dataset, tmp_path):
    """eval case-retrieval found a query's other images of its case through a filter on the case column: an index
    whose case_id is no filter column (more than 200 metadata keys) left every sibling in, silently, while report
    draft (reading each hit's metadata) left them out. The case's images are read from every image's metadata."""
    out = tmp_path / "idx"
    build_index(model, _cases_past_the_filter_columns(dataset), out, model_dir=model_dir, batch_size=6,
                show_progress=False)
    with open_index(out) as index:
        _check_case_ids(index)


@pytest.mark.pgvector
@pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR")
def test_a_case_key_past_the_filter_columns_is_found_on_pgvector(pg_url, model, model_dir, dataset):
    url = pg_url.partition("#")[0] + "#case_key_past_the_columns"
    build_index(model, _cases_past_the_filter_columns(dataset), url, model_dir=model_dir, batch_size=6,
                show_progress=False)
    with open_index(url) as index:
        _check_case_ids(index)
