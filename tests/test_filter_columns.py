"""Filter columns as arrays (``medvl.index.filter_columns``) select exactly what SQLite selects.

The SQLite query compiled from a ``--where`` filter is the reference: on random tables (NULLs,
equal values, quotes, non-ASCII text, empty metadata) and random filters (comparisons, ``in``,
``not in``, ``is [not] null``, ``and`` / ``or`` / ``not``), the arrays built from the table, built
case by case as an index is edited, and saved and read back, allow the same cases. Then the same on
real index folders: a build writes the file, add / delete / save keep it in step, a stale or missing
file is read from the table again, and a deleted case leaves nothing in it.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medvl.index import faiss_store
from medvl.index.base import INFO_FORMAT, TEXTS
from medvl.index.cases import FIXED_COLUMNS, Case, infer_columns, quote_column
from medvl.index.faiss_store import _SCHEMA, FaissBuilder, FaissIndex, add_db_columns, insert_cases
from medvl.index.filter_columns import FILTERS_FILE, FilterColumns
from medvl.index.where import compile_where

DIM = 8
# a small shared pool makes equal values and prefixes (the edges of every comparison) common
WORDS = ["F", "M", "", " ", "a", "ab", "b", "B", "é", "e\u0301", "Z", "\U0001f600", "O'Brien",
         "x'; DROP TABLE cases; --"]
NUMBERS = ["0", "-1", "18", "60", "60.5", "1e3", "-0.0", "95"]
META_KEYS = ("age", "sex", "finding")


def _info() -> dict:
    return {"format": INFO_FORMAT, "backend": "faiss", "embed_dim": DIM,
            "model": {"name": "synthetic", "embed_dim": DIM}, "label_columns": []}


@st.composite
def tables(draw):
    """Cases whose metadata gives a numeric ``age`` and text ``sex`` / ``finding`` columns (any of them
    missing or blank: NULL), some with a report, some with a NULL split."""
    n = draw(st.integers(1, 12))
    cases = []
    for i in range(n):
        meta = {}
        if draw(st.booleans()):
            meta["age"] = draw(st.sampled_from(NUMBERS + ["", " "]))
        for key in ("sex", "finding"):
            if draw(st.booleans()):
                meta[key] = draw(st.one_of(st.sampled_from(WORDS), st.text(max_size=3)))
        cases.append(Case(id=draw(st.sampled_from(WORDS[:6] + [f"c{j}" for j in range(3)])) + f"-{i}",
                          split=draw(st.sampled_from(["train", "test", "Train", None])), meta=meta,
                          text=draw(st.sampled_from([None, "a report", ""]))))
    return cases


def _literal(kind: str, value: str) -> str:
    return repr(float(value)) if kind == "number" else "'" + value.replace("'", "''") + "'"


@st.composite
def comparisons(draw, columns: dict[str, str]):
    column = draw(st.sampled_from(sorted(columns)))
    kind = columns[column]
    values = st.sampled_from(NUMBERS) if kind == "number" else st.one_of(
        st.sampled_from(WORDS + ["train", "test", "c1-1", "a-0"]), st.text(max_size=3))
    form = draw(st.sampled_from(["op", "in", "not in", "is null", "is not null"]))
    if form == "op":
        op = draw(st.sampled_from(["=", "!=", "<>", "<", "<=", ">", ">="]))
        return f"{column} {op} {_literal(kind, draw(values))}"
    if form in ("in", "not in"):
        items = draw(st.lists(values, min_size=1, max_size=10))
        return f"{column} {form} ({', '.join(_literal(kind, item) for item in items)})"
    return f"{column} {form}"


def filters(columns: dict[str, str]):
    return st.recursive(comparisons(columns), lambda inner: st.one_of(
        st.tuples(inner, inner, st.sampled_from(["and", "or"])).map(lambda t: f"({t[0]}) {t[2]} ({t[1]})"),
        inner.map(lambda text: f"not ({text})")), max_leaves=6)


def _sql_vids(conn: sqlite3.Connection, where: str, columns: dict[str, str], reports_only: bool = False) -> list[int]:
    compiled = compile_where(where, columns, quote_column)
    extra = " AND report IS NOT NULL" if reports_only else ""
    return [r[0] for r in conn.execute(f"SELECT vid FROM cases WHERE {compiled.sql}{extra} ORDER BY vid",
                                       compiled.params)]


def _array_vids(filters_: FilterColumns, where: str, columns: dict[str, str], reports_only: bool = False) -> list[int]:
    allowed = filters_.allowed(compile_where(where, columns, quote_column).expression)
    return filters_.vids[allowed & filters_.has_report if reports_only else allowed].tolist()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases=tables(), data=st.data())
@example(cases=[Case(id="a", meta={"age": "60", "sex": "F"}), Case(id="b", meta={"sex": "ab"}),
                Case(id="c", split=None, meta={"age": "18", "sex": ""})],
         data=None)
def test_arrays_select_what_sqlite_selects(cases, data):
    kinds = infer_columns(cases)
    for key in META_KEYS:  # a numeric column only when every value is a number (blank ones are NULL)
        kinds.setdefault(key, "number" if key == "age" else "text")
    kinds = {key: kinds[key] for key in META_KEYS}
    columns = {**FIXED_COLUMNS, **kinds}
    wheres = ["age = 60 or sex <= 'ab'", "not (sex in ('F', 'é') or split is null)", "id > 'a' and finding != ''"]
    wheres = [w for w in wheres if all(columns.get(name) for name in ("age", "sex"))]
    if data is not None:
        wheres = [data.draw(filters(columns)) for _ in range(5)]
    conn = sqlite3.connect(":memory:")  # the store's own table and insert, in memory (fast)
    conn.executescript(_SCHEMA)
    add_db_columns(conn, kinds)
    vids = insert_cases(conn, cases, kinds)
    half = len(cases) // 2  # in two adds: the second brings columns the first did not have
    first = {k: v for k, v in columns.items() if k in FIXED_COLUMNS or k in infer_columns(cases[:half])}
    incremental = FilterColumns.empty(dict(FIXED_COLUMNS))
    incremental.append(vids[:half], cases[:half], first)
    incremental.append(vids[half:], cases[half:], columns)
    assert incremental.kinds == columns
    gone = vids[::3]  # deleted cases: gone from the table and from the arrays
    conn.execute(f"DELETE FROM cases WHERE vid IN ({', '.join('?' * len(gone))})", gone.tolist())
    incremental.remove(gone)
    with tempfile.TemporaryDirectory() as scratch:
        incremental.save(Path(scratch))
        loaded = FilterColumns.load(Path(scratch), columns, len(incremental), incremental.max_vid)
    assert loaded is not None
    from_table = FilterColumns.from_table(conn, columns)
    for where in wheres:
        expected = _sql_vids(conn, where, columns)
        assert _array_vids(from_table, where, columns) == expected, where
        assert _array_vids(incremental, where, columns) == expected, where
        assert _array_vids(loaded, where, columns) == expected, where
        assert _array_vids(from_table, where, columns, True) == _sql_vids(conn, where, columns, True)


# ---------------------------------------------------------------- index folders

N = 300


def _cases(rng: np.random.Generator, n: int, start: int = 0) -> list[Case]:
    views = rng.choice(["PA", "AP", "LL"], n)
    ages = rng.integers(18, 96, n)
    return [Case(id=f"case{start + i}", split=("train", "test")[i % 2],
                 meta={"age": str(ages[i]) if i % 7 else "", "view": views[i]},
                 text=None if i % 5 == 0 else ("" if i % 11 == 0 else f"report {i}")) for i in range(n)]


def _vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    rng = np.random.default_rng(3)
    cases, vectors = _cases(rng, N), _vectors(rng, N)
    out = tmp_path_factory.mktemp("filters") / "idx"
    builder = FaissBuilder(out, "t", infer_columns(cases))
    builder.append(cases, vectors, _vectors(rng, N))
    builder.finish(_info(), kind="hnsw")
    return out, cases, vectors


WHERES = ["view = 'LL' and age < 40", "age is null or view in ('AP')", "not (age >= 60)", "split = 'test'",
          "id in ('case3', 'case4', 'nobody')", "id >= 'case29' and id < 'case3'", "view != 'PA' or age = 20"]


def _check_equal(index: FaissIndex) -> None:
    for where in WHERES:
        for target in ("images", TEXTS):
            np.testing.assert_array_equal(index.allowed_vids(where, target), index.allowed_vids_sql(where, target))


def test_a_build_writes_the_columns_and_they_match_the_table(built):
    out, _, _ = built
    assert (out / FILTERS_FILE).is_file()
    with FaissIndex.open(out) as index:
        _check_equal(index)
        assert FilterColumns.load(out, index.columns, len(index), N) is not None  # not stale


def test_add_delete_and_save_keep_the_columns_in_step(built, tmp_path):
    out, _, _ = built
    copy = tmp_path / "idx"
    shutil.copytree(out, copy)
    rng = np.random.default_rng(4)
    extra = _cases(rng, 20, start=N)
    for case in extra[:5]:
        case.meta["ward"] = "B"  # a new text column: NULL for the cases already indexed
    with FaissIndex.open(copy, writable=True) as index:
        index.add(extra, _vectors(rng, 20), _vectors(rng, 20))
        assert index.delete(["case1", "case2", f"case{N + 3}"]) == 3
        _check_equal(index)  # before saving: the edit's table
        assert index.allowed_vids("ward = 'B'").tolist() == index.allowed_vids_sql("ward = 'B'").tolist()
        index.save()
    with FaissIndex.open(copy) as index:
        assert FilterColumns.load(copy, index.columns, len(index), N + 20) is not None  # saved with the index
        _check_equal(index)
        assert len(index.allowed_vids("ward is not null")) == 4


def test_a_deleted_case_leaves_nothing_in_the_file(built, tmp_path):
    out, _, _ = built
    copy = tmp_path / "idx"
    shutil.copytree(out, copy)
    assert b"case299" in (copy / FILTERS_FILE).read_bytes()
    with FaissIndex.open(copy, writable=True) as index:
        index.delete(["case299"])
        index.save()
    assert b"case299" not in (copy / FILTERS_FILE).read_bytes()


@pytest.mark.parametrize("change", ["missing", "stale"])
def test_a_missing_or_stale_file_is_read_from_the_table_and_saved_with_the_next_change(built, tmp_path, change,
                                                                                       caplog):
    out, _, _ = built
    copy = tmp_path / "idx"
    shutil.copytree(out, copy)
    if change == "missing":  # an index built before the file existed
        (copy / FILTERS_FILE).unlink()
    else:  # an index changed by an older medvl, which edits the table and the vectors but does not know the file
        before = (copy / FILTERS_FILE).read_bytes()
        with FaissIndex.open(copy, writable=True) as index:
            index.delete(["case10", "case11"])
            index.save()
        (copy / FILTERS_FILE).write_bytes(before)
    with caplog.at_level(logging.INFO, logger="medvl.index.filter_columns"), FaissIndex.open(copy) as index:
        _check_equal(index)
        assert "read from the table" in caplog.text
        found = {h.id for h in index.search(np.ones(DIM, np.float32), k=N, where="age > 0")[0]}
        assert ("case10" in found) == (change == "missing")
    with FaissIndex.open(copy, writable=True) as index:
        index.delete(["case12"])
        index.save()
    with FaissIndex.open(copy) as index:
        assert FilterColumns.load(copy, index.columns, len(index), N) is not None


def test_filtered_search_paths_agree_with_exact_search_and_keep_the_form(built, monkeypatch):
    out, cases, vectors = built
    query = vectors[7] + 0.1
    allowed = np.array([c.meta["view"] == "LL" for c in cases])
    expected_ids = [f"case{i}" for i in np.flatnonzero(allowed)[np.argsort(-(vectors[allowed] @ query),
                                                                              kind="stable")[:10]]]
    with FaissIndex.open(out) as index:
        exact = index.search(query, k=10, where="view = 'LL'")[0]
        monkeypatch.setattr(faiss_store, "EXACT_FILTERED_MAX", 0)
        selector = index.search(query, k=10, where="view = 'LL'")[0]
        assert index.filtered_paths["exact"] == 1 and index.filtered_paths["exact"] + sum(
            index.filtered_paths[p] for p in ("post-filtered", "selector")) == 2
    assert [h.id for h in exact] == expected_ids
    assert [h.id for h in selector][:8] == expected_ids[:8]  # approximate: the graph may miss the tail
    hit = exact[0]
    case = cases[int(hit.id[4:])]
    assert (hit.split, hit.meta, hit.text) == (case.split, case.meta, case.text)
    assert hit.score == pytest.approx(float(vectors[int(hit.id[4:])] @ query), abs=1e-5)


def test_report_search_skips_cases_whose_report_is_empty(built):
    """A case with an empty report has a report row but no report vector: it is never returned, and
    the exact path does not ask FAISS for a vector it does not hold."""
    out, cases, _ = built
    empty = [c.id for c in cases if c.text == ""]
    assert empty
    with FaissIndex.open(out) as index:
        hits = index.search(np.ones(DIM, np.float32), k=N, where="split = 'train' or split = 'test'", target=TEXTS)[0]
        assert index.filtered_paths == Counter({"exact": 1})
    assert len(hits) == sum(bool(c.text) for c in cases) and not {h.id for h in hits} & set(empty)


def test_a_reader_opened_before_a_rebuild_filters_with_the_columns_of_the_version_it_opened(tmp_path):
    """The filter-columns file was read by path at the first filtered search: a reader (a running service) opened
    before ``index build`` swapped a new folder in filtered its own table's cases with the new build's columns (a
    rebuild of as many cases passes the row-count and largest-vid check), so ``sex = 'M'`` gave women, shown with
    their old metadata. The file is opened with the table now: the reader keeps its version's columns throughout."""
    rng = np.random.default_rng(5)
    vectors = _vectors(rng, 40)
    out = tmp_path / "idx"

    def build(key: str, first: str, second: str) -> None:
        cases = [Case(id=f"m{i:02d}", meta={"sex": (first, second)[i % 2]}) for i in range(40)]
        builder = FaissBuilder(out, key, infer_columns(cases))
        builder.append(cases, vectors, None)
        builder.finish(_info(), kind="flat")

    build("before", "F", "M")
    with FaissIndex.open(out) as reader:
        assert len(reader.search(vectors[:1], k=3)[0]) == 3  # unfiltered: the filter columns are not read yet
        build("after", "M", "F")  # the metadata corrected: every case's sex flipped
        for hits in reader.search(vectors[:2], k=5, where="sex = 'M'"):
            assert len(hits) == 5 and {hit.meta["sex"] for hit in hits} == {"M"}
            assert all(int(hit.id[1:]) % 2 == 1 for hit in hits)  # the version it opened: odd cases are men
        np.testing.assert_array_equal(reader.allowed_vids("sex = 'M'"), reader.allowed_vids_sql("sex = 'M'"))
    with FaissIndex.open(out) as fresh:
        hits = fresh.search(vectors[:1], k=5, where="sex = 'M'")[0]
        assert {hit.meta["sex"] for hit in hits} == {"M"} and all(int(hit.id[1:]) % 2 == 0 for hit in hits)
