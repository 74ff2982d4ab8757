"""Property-based tests (hypothesis) for the parsers that read untrusted text and bytes.

- the manifest parser: any bytes give a Dataset or medvl's own error, never another exception;
  generated valid CSV / JSONL manifests round-trip (ids, images, text, labels, meta, splits);
- the ``.npz`` loader: any bytes, and valid archives with bytes changed or cut, give a Dataset or
  medvl's own error; generated valid archives round-trip; non-finite float images are refused;
- the ``--where`` filter: any text compiles to SQL made only of known pieces (quoted known columns,
  keywords, placeholders) or is an ``InputError``; generated filters, with injection-shaped text
  literals, select in SQLite exactly the rows a plain Python evaluation of the filter selects.

Examples are few (``max_examples`` <= 50) and there is no deadline, so the file runs in seconds.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medvl.data.loaders import load_manifest, load_npz
from medvl.data.loaders.manifest import BOOLEAN_BINARY, FLOAT_BINARY, MISSING_SPELLINGS
from medvl.errors import DataError, InputError, MedvlError
from medvl.index.where import compile_where

# no example database: nothing is written into the working tree
FEW = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# text a file may hold: any character but lone surrogates (not encodable) and NUL
CELL_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
RESERVED = {"image", "image_path", "path", "file", "filename", "id", "image_id", "patientid", "text", "report",
            "caption", "notes", "split"}
LABEL_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda name: name not in RESERVED)


# ---------------------------------------------------------------- manifests


def _load_bytes(name: str, data: bytes):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / name
        path.write_bytes(data)
        return load_manifest(path)


@FEW
@given(data=st.binary(max_size=600), name=st.sampled_from(["m.csv", "m.jsonl"]))
def test_manifest_any_bytes_give_a_dataset_or_a_medvl_error(data: bytes, name: str):
    try:
        _load_bytes(name, data)
    except MedvlError:
        pass


@FEW
@given(text=st.text(CELL_CHARS, max_size=300), name=st.sampled_from(["m.csv", "m.jsonl"]))
def test_manifest_any_text_gives_a_dataset_or_a_medvl_error(text: str, name: str):
    try:
        _load_bytes(name, ("image,finding\n" if name.endswith(".csv") else "").encode() + text.encode("utf-8"))
    except MedvlError:
        pass


# a label cell spelled as a missing value ('NA', 'null', any case) is read as missing, and 0.0 / 1.0 and true / false
# (any case) as 0 / 1 (documented)
LABEL_CELLS = st.text(CELL_CHARS, max_size=12).filter(
    lambda cell: cell.strip().lower() not in MISSING_SPELLINGS and cell.strip() not in FLOAT_BINARY
    and cell.strip().lower() not in BOOLEAN_BINARY)


@st.composite
def manifests(draw):
    """(label column names, rows) of a valid manifest: image, report, split and label cells."""
    labels = draw(st.lists(LABEL_NAMES, min_size=0, max_size=3, unique=True))
    count = draw(st.integers(min_value=1, max_value=6))
    rows = []
    for index in range(count):
        row = {"image": f"img{index}.npy", "report": draw(st.text(CELL_CHARS, max_size=40)),
               "split": draw(st.sampled_from(["train", "val", "test"]))}
        row.update({name: draw(LABEL_CELLS) for name in labels})
        rows.append(row)
    return labels, rows


def _write_manifest(folder: Path, kind: str, labels: list[str], rows: list[dict[str, str]]) -> Path:
    for row in rows:
        np.save(folder / row["image"], np.zeros((2, 2), np.uint8))
    columns = ["image", "report", "split", *labels]
    if kind == "csv":
        stream = io.StringIO(newline="")
        writer = csv.writer(stream)
        writer.writerow(columns)
        writer.writerows([[row[column] for column in columns] for row in rows])
        path = folder / "manifest.csv"
        path.write_text(stream.getvalue(), encoding="utf-8", newline="")
    else:
        path = folder / "manifest.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@FEW
@given(manifest=manifests(), kind=st.sampled_from(["csv", "jsonl"]))
def test_valid_manifests_round_trip(manifest, kind: str):
    labels, rows = manifest
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        dataset = load_manifest(_write_manifest(folder, kind, labels, rows))
        assert dataset.label_names == labels
        assert len(dataset) == len(rows)
        for record, row in zip(dataset, rows, strict=True):
            assert record.id == row["image"][: -len(".npy")]
            assert record.image == folder / row["image"]
            assert record.split == row["split"]
            report = row["report"].strip()  # a report spelled as a missing value ('NaN', 'NA') is no text
            assert record.text == (None if report.lower() in MISSING_SPELLINGS else report or None)
            assert record.labels == {name: row[name].strip() for name in labels if row[name].strip()}
            assert record.meta == {key: value.strip() for key, value in row.items()
                                   if key not in ("image", "report") and value.strip()}


# ---------------------------------------------------------------- .npz archives


def _load_npz_bytes(data: bytes):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "data.npz"
        path.write_bytes(data)
        return load_npz(path)


def _valid_npz() -> bytes:
    stream = io.BytesIO()
    np.savez_compressed(stream, train_images=np.arange(4 * 6 * 6, dtype=np.uint8).reshape(4, 6, 6),
                        train_labels=np.array([[0], [1], [1], [0]]), class_names=np.array(["normal", "pneumonia"]))
    return stream.getvalue()


VALID_NPZ = _valid_npz()


@FEW
@given(data=st.binary(max_size=600))
def test_npz_any_bytes_give_a_dataset_or_a_medvl_error(data: bytes):
    try:
        _load_npz_bytes(data)
    except MedvlError:
        pass


@FEW
@given(changes=st.lists(st.tuples(st.integers(0, len(VALID_NPZ) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.integers(1, len(VALID_NPZ)))
def test_npz_damaged_archives_give_a_dataset_or_a_medvl_error(changes, cut: int):
    data = bytearray(VALID_NPZ)
    for offset, value in changes:
        data[offset] = value
    try:
        dataset = _load_npz_bytes(bytes(data[:cut]))
    except MedvlError:
        return
    assert len(dataset) == 4  # a change the zip CRC cannot see (e.g. in a header's padding) loads as before


IMAGE_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.float32, np.float64])


@st.composite
def npz_contents(draw):
    dtype = draw(IMAGE_DTYPES)
    count = draw(st.integers(1, 5))
    shape = (count, *draw(st.sampled_from([(3, 4), (2, 3, 3), (2, 2, 2)])))
    elements = hnp.from_dtype(np.dtype(dtype), allow_nan=False, allow_infinity=False)
    images = draw(hnp.arrays(dtype, shape, elements=elements))
    labels = draw(hnp.arrays(np.int64, (count,), elements=st.integers(0, 3)))
    return images, labels


@FEW
@given(contents=npz_contents(), compressed=st.booleans())
def test_valid_npz_round_trips(contents, compressed: bool):
    images, labels = contents
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "data.npz"
        (np.savez_compressed if compressed else np.savez)(path, val_images=images, val_labels=labels)
        dataset = load_npz(path)
    assert [record.id for record in dataset] == [f"val_{index}" for index in range(len(labels))]
    assert [record.labels["label"] for record in dataset] == [str(label) for label in labels]
    for record, image in zip(dataset, images, strict=True):
        np.testing.assert_array_equal(record.image, image)
        assert record.image.dtype == image.dtype


@FEW
@given(images=hnp.arrays(np.float32, (2, 3, 3), elements=st.floats(width=32)))
def test_npz_non_finite_images_are_refused(images):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "data.npz"
        np.savez(path, train_images=images, train_labels=np.array([0, 1]))
        if np.isfinite(images).all():
            assert len(load_npz(path)) == 2
        else:
            with pytest.raises(DataError, match="NaN or infinite"):
                load_npz(path)


# ---------------------------------------------------------------- the --where filter

COLUMNS = {"age": "number", "sex": "text", "finding": "text", "id": "text"}
_SQL_PIECE = re.compile(r'\s+|\(|\)|,|\?|AND|OR|NOT|IN|IS|NULL|<=|>=|!=|=|<|>|"m_[a-z_]+"|id')


def _quote(name: str) -> str:
    return name if name == "id" else f'"m_{name}"'


@FEW
@given(text=st.text(max_size=120))
def test_where_any_text_compiles_to_known_sql_pieces_or_an_input_error(text: str):
    try:
        where = compile_where(text, COLUMNS, _quote)
    except InputError:
        return
    assert _SQL_PIECE.sub("", where.sql) == ""  # nothing from the input but known pieces
    assert where.sql.count("?") == len(where.params)


TEXT_VALUES = st.one_of(st.sampled_from(["F", "M", "O'Brien", "x'; DROP TABLE cases; --", '" OR 1=1 --', "", " "]),
                        st.text(CELL_CHARS, max_size=8))
# a small shared pool makes equal values (the edge of every comparison) common; any finite float besides
NUMBERS = st.one_of(st.sampled_from([0.0, -1.0, 18.0, 60.0, 60.5]),
                    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32))


def _literal(column: str, value) -> str:
    if COLUMNS[column] == "number":
        return repr(float(value))
    return "'" + value.replace("'", "''") + "'"


@st.composite
def comparisons(draw):
    """(filter text, python predicate) of one comparison."""
    column = draw(st.sampled_from(sorted(COLUMNS)))
    values = NUMBERS if COLUMNS[column] == "number" else TEXT_VALUES
    shown = draw(st.sampled_from([column, column.upper()]))
    kind = draw(st.sampled_from(["op", "in", "not in", "is null", "is not null"]))
    if kind == "op":
        op = draw(st.sampled_from(["=", "!=", "<>", "<", "<=", ">", ">="]))
        value = draw(values)
        return f"{shown} {op} {_literal(column, value)}", ("op", column, op, float(value) if
                                                             COLUMNS[column] == "number" else value)
    if kind in ("in", "not in"):
        items = draw(st.lists(values, min_size=1, max_size=3))
        items = [float(item) if COLUMNS[column] == "number" else item for item in items]
        listed = ", ".join(_literal(column, item) for item in items)
        return f"{shown} {kind} ({listed})", (kind, column, items)
    return f"{shown} {kind}", (kind, column)


def filters():
    return st.recursive(
        comparisons(),
        lambda inner: st.one_of(
            st.tuples(inner, inner, st.sampled_from(["and", "or", "AND", "Or"])).map(
                lambda t: (f"({t[0][0]}) {t[2]} ({t[1][0]})", (t[2].lower(), t[0][1], t[1][1]))),
            inner.map(lambda t: (f"not ({t[0]})", ("not", t[1])))),
        max_leaves=6)


def _evaluate(tree, row: dict):
    """SQL three-valued logic in plain Python: True, False or None (unknown)."""
    kind = tree[0]
    if kind == "and":
        left, right = _evaluate(tree[1], row), _evaluate(tree[2], row)
        return False if False in (left, right) else (None if None in (left, right) else True)
    if kind == "or":
        left, right = _evaluate(tree[1], row), _evaluate(tree[2], row)
        return True if True in (left, right) else (None if None in (left, right) else False)
    if kind == "not":
        inner = _evaluate(tree[1], row)
        return None if inner is None else not inner
    value = row[tree[1]]
    if kind in ("is null", "is not null"):
        return (value is None) == (kind == "is null")
    if value is None:
        return None
    if kind in ("in", "not in"):
        return (value in tree[2]) == (kind == "in")
    op, literal = tree[2], tree[3]
    return {"=": value == literal, "!=": value != literal, "<>": value != literal, "<": value < literal,
            "<=": value <= literal, ">": value > literal, ">=": value >= literal}[op]


ROWS = st.lists(st.fixed_dictionaries({
    "age": st.one_of(st.none(), st.sampled_from([0.0, 18.0, 60.0]), NUMBERS.map(float)),
    "sex": st.one_of(st.none(), TEXT_VALUES),
    "finding": st.one_of(st.none(), TEXT_VALUES),
}), min_size=1, max_size=8)


EDGE_ROWS = [{"age": 60.0, "sex": "F", "finding": None}, {"age": None, "sex": "x'; DROP TABLE cases; --",
                                                         "finding": "O'Brien"}]


@FEW
@given(where=filters(), rows=ROWS)
@example(where=("age < 60.0", ("op", "age", "<", 60.0)), rows=EDGE_ROWS)
@example(where=("age >= 60.0", ("op", "age", ">=", 60.0)), rows=EDGE_ROWS)
@example(where=("not (sex in ('M'))", ("not", ("in", "sex", ["M"]))), rows=EDGE_ROWS)
@example(where=("finding not in ('O''Brien')", ("not in", "finding", ["O'Brien"])), rows=EDGE_ROWS)
@example(where=("(sex = 'x''; DROP TABLE cases; --') or (age is null)",
                ("or", ("op", "sex", "=", "x'; DROP TABLE cases; --"), ("is null", "age"))), rows=EDGE_ROWS)
def test_where_selects_what_python_selects_and_never_injects(where, rows):
    text, tree = where
    assume(len(text) <= 2000)
    compiled = compile_where(text, COLUMNS, _quote)
    conn = sqlite3.connect(":memory:")
    conn.execute('CREATE TABLE cases (id TEXT PRIMARY KEY, "m_age" REAL, "m_sex" TEXT, "m_finding" TEXT)')
    table = [{"id": f"case-{index}", **row} for index, row in enumerate(rows)]
    conn.executemany("INSERT INTO cases VALUES (?, ?, ?, ?)",
                     [(row["id"], row["age"], row["sex"], row["finding"]) for row in table])
    selected = {row[0] for row in conn.execute(f"SELECT id FROM cases WHERE {compiled.sql}", compiled.params)}
    expected = {row["id"] for row in table if _evaluate(tree, row) is True}
    assert selected == expected, (text, compiled.sql)
    assert conn.execute("SELECT count(*) FROM cases").fetchone()[0] == len(rows)  # the table is untouched
