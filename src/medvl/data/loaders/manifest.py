"""Manifest loader: a CSV or JSONL table with one row per image.

Columns (names matched case-insensitively):

- image: ``image`` (or ``image_path``, ``path``, ``file``, ``filename``), a path relative to the
  manifest's folder; ``<folder>/<value>`` is tried, then ``<folder>/images/<value>`` (ISIC layout), each as
  written, then in its other Unicode forms (NFC, NFD: a macOS copy stores ``café.png`` decomposed).
  A cell naming a folder (or anything else that is not a regular file) is a ``DataError`` naming
  the line.
  A table without an image column may instead name images by file stem in an ``id`` /
  ``image_id`` / ``patientid`` column (the Figure 1 COVID table): the image is the file with that
  stem and a supported suffix in the folder or ``images/``;
- text (optional): ``text`` (or ``report``, ``caption``, ``notes``);
- split (optional): ``split``; without it every record is in split ``all`` (the name ``--split all`` uses for every
  record: a split column holding ``all`` beside other splits is a DataError);
- id (optional): ``id``; without it the image path as written, minus its suffix (the file stem
  for a flat folder);
- every other column is a candidate label column (``Dataset.label_names``, in file order).

Values are kept as the strings written in the file (a 0/1 column gives classes ``"0"``, ``"1"``;
JSONL numbers and booleans are written back as JSON text, e.g. ``1``, ``true``; a JSONL list of values is a
``DataError`` naming the line and key: ``["nodule", "effusion"]`` would be one class; an object, or a list of lists
or objects, is kept as its JSON text, as a CSV cell of JSON is: the phantom's ``boxes``). An empty cell is a
missing value: absent from ``Record.labels`` and ``Record.meta``; so is a JSONL ``null``, ``NaN`` or
``Infinity`` (Python's ``json.dumps`` writes a missing float as ``NaN``; counted in a warning), and, in a label
or text column of either format, a cell spelled ``NaN``, ``NA``, ``N/A`` or ``null`` in any case (pandas
``na_rep``, R's ``write.csv``; counted in a warning naming the column: a record whose report is spelled so has no
text, as with a JSONL ``null``). ``None`` is never read as missing: it is a class (a grade None / Mild / Severe).
A label column whose values are all ``0.0`` / ``1.0`` (pandas writes a 0/1 column with a missing value as
floats) is read as ``0`` / ``1`` (``clean_label_cells``).
``Record.meta`` holds every non-empty cell except the image and text columns.

Encoding: manifests must be UTF-8 (a BOM is accepted). Only the free-text column may hold legacy
Windows-1252 characters (the Figure 1 notes do); those cells are decoded as Windows-1252 with a
warning. Invalid bytes anywhere else are a ``DataError`` with the byte offset.

Known tables: a published table recognised by its header (``KNOWN_TABLES``) brings its own
defaults. The Figure 1 COVID-19 chest X-ray table (``patientid``, ``finding``, ``view``,
``modality``, ``notes``...): text = ``notes`` (clinical history; 6 of 55 rows are empty and 1 says
``N/A``: their records have no text and the count is logged), default label column ``finding`` (``COVID-19``,
``No finding``, ``Pneumonia``; empty in 15 rows), meta = every other non-empty cell (``view``,
``modality``, ``age``, ``sex``, ``offset``...) and ``patient_id``: the ``patientid`` less its film letter
(``COVID-00039a``, ``b``, ``c`` are three films of patient ``COVID-00039``; ``film_patient``), the key the
grouping rules read (same-case exclusion, ``bench cv --group-column patient_id``). A row whose image file is
missing is skipped and counted in a warning rather than failing the load (unless no row is left).

Paths stay inside the folder: a row whose image resolves (symbolic links followed) outside the
manifest's folder (``../../etc/passwd``, an absolute path elsewhere, a link out of the folder) is
refused, all such rows counted in one ``DataError`` naming the manifest, the count and the first
line number, unless ``allow_outside_root=True`` (see ``medvl.data.loaders.roots``). The sidecar's
``manifest`` key is held to the same rule.

An optional ``dataset.json`` sidecar in the folder, e.g.
``{"manifest": "manifest.csv", "label_columns": ["diagnosis"], "captions": {...}, "name": "x"}``,
names the manifest and the default label columns; the loader sets ``dataset.default_labels``
(``list[str]``, default ``[]``) and ``dataset.captions`` (``dict`` or ``None``) from it. The manifest
it names may sit in a subfolder (``"manifest": "tables/m.csv"``); loading the sidecar's folder then
applies the sidecar, and image paths are read relative to the manifest's own folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ...errors import DataError
from ..images import image_suffix, is_image_file
from ..record import ALL_SPLITS, Dataset, Record
from .roots import check_inside_root, is_file, path_exists

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename")
STEM_COLUMNS = ("id", "image_id", "patientid")  # only when there is no image column
TEXT_COLUMNS = ("text", "report", "caption", "notes")
MAX_CELL_CHARS = 131_072  # characters of any other cell (the csv module's default cap): no class name is longer
ID_COLUMN = "id"
SPLIT_COLUMN = "split"
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "metadata.csv")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
SIDECAR_NAME = "dataset.json"
# "generator" records how a generated data set (the phantom) was made; informational only.
SIDECAR_KEYS = {"manifest": str, "label_columns": list, "captions": dict, "name": str, "generator": dict}


@dataclass(frozen=True)
class KnownTable:
    """A published table recognised by its header, and what it implies beyond the generic rules."""

    name: str
    signature: frozenset[str]  # lower-case column names that must all be present
    default_labels: tuple[str, ...]  # used when no dataset.json names label columns
    skip_missing_images: bool = False  # a row with a missing image file is skipped and counted, not an error
    no_text: frozenset[str] = frozenset()  # text cells that say there is no text (Figure 1's 'N/A' note)
    # the column naming each film by its patient and a film letter (Figure 1's ``patientid``: COVID-00039a, b, c):
    # the value less that letter is the record's ``meta["patient_id"]``, so that one patient's films group together
    patient_column: str | None = None


KNOWN_TABLES = (
    KnownTable("Figure 1 COVID-19 chest X-ray", frozenset({"patientid", "finding", "view", "modality", "notes"}),
               default_labels=("finding",), skip_missing_images=True, no_text=frozenset({"N/A"}),
               patient_column="patientid"),
)
# the meta key naming a record's patient: the one the grouping rules read (medvl.index.cases.CASE_KEYS: same-case
# exclusion, report drafts, bench's clustered bootstrap) and bench cv's --group-column can name
PATIENT_KEY = "patient_id"
FILM_LETTER = re.compile(r"(?<=[0-9])[a-z]\Z")  # COVID-00039b: the second film of patient COVID-00039

# cells that spell a missing value in any case (pandas' na_rep="NaN", numpy's text output, R's write.csv "NA", SQL /
# JSON null): read as missing, as an empty cell and a JSONL null or NaN are, never as a class. Not "None": in
# clinical tables it is a grade (effusion None / Small / Large), and pandas and the csv module write None as empty
MISSING_SPELLINGS = frozenset({"nan", "na", "n/a", "null"})
FLOAT_BINARY = {"0.0": "0", "1.0": "1"}  # pandas writes a 0/1 column holding a missing value as floats
# pandas writes a bool column as True / False (to_csv) or true / false (to_json), a JSONL boolean reads as true / false
BOOLEAN_BINARY = {"false": "0", "true": "1"}  # matched in any case

_INVALID_UTF8 = re.compile("[\udc80-\udcff]")  # bytes kept by the surrogateescape error handler

Row = tuple[int, dict[str, str]]  # (line number in the file, column -> value)


# ---------------------------------------------------------------- reading text files


def decode_utf8(path: Path, raw: bytes) -> str:
    """Decode strict UTF-8 (BOM accepted); DataError with the byte offset of the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            path, f"not valid UTF-8 (byte offset {error.start}, line {line}); save it as UTF-8"
        ) from None


class _KeyRepeated(dict):
    """A JSON object in which a key was given twice (``repeated``); its value is the last one, as json's."""

    repeated: str


def _object_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of ``parse_json``: the object as a dict, marked when a key occurs twice in it."""
    result: dict[str, Any] = {}
    repeated = None
    for key, value in pairs:
        if key in result and repeated is None:
            repeated = key
        result[key] = value
    if repeated is None:
        return result
    marked = _KeyRepeated(result)
    marked.repeated = repeated
    return marked


def parse_json(text: str) -> Any:
    """``json.loads``, except that an object with a key given twice is marked (json keeps the last value
    silently): ``repeated_key`` finds it, for the caller to refuse naming its line or record."""
    return json.loads(text, object_pairs_hook=_object_once)


# levels of arrays and objects a JSON or YAML side file (manifest row, question, dataset.json, caption config) may
# nest: medvl's own nest 4 at most. json's C parser reads about 1,000 levels, more than a recursive walk in Python has
# stack for, so the walk below keeps its own stack, and refuses deeper documents
MAX_NESTING = 100


def _children(container: dict[Any, Any] | list[Any]) -> Iterator[Any]:
    return iter(container.values() if isinstance(container, dict) else container)


def repeated_key(path: Path, value: Any, where: str = "") -> str | None:
    """The first key given twice in one JSON object within ``value`` (as read by ``parse_json``), or None.

    A DataError naming ``path`` (``where`` before the problem: ``"line 3: "``) when ``value`` nests more than
    ``MAX_NESTING`` arrays and objects, or holds itself (a YAML anchor within its own alias). Walked without
    recursion, each array and object once: an object or array held in several places (YAML aliases) is not
    walked again, so that a small file of nested aliases ("billion laughs") costs its size, not the size of its
    expansion."""
    if not isinstance(value, dict | list):
        return None
    if isinstance(value, _KeyRepeated):
        return value.repeated
    seen = {id(value)}  # every array and object reached (kept alive by ``value``, so their ids stay theirs)
    path_ids = {id(value)}  # those on the way down to the one being walked
    stack = [(value, _children(value))]
    while stack:
        container, children = stack[-1]
        child = next((child for child in children if isinstance(child, dict | list)), None)
        if child is None:
            stack.pop()
            path_ids.discard(id(container))
        elif id(child) in path_ids:
            raise DataError(path, f"{where}an array or object holds itself (a YAML anchor used within its own "
                                  "value)")
        elif id(child) not in seen:
            if len(stack) >= MAX_NESTING:
                raise DataError(path, f"{where}nested too deeply (more than {MAX_NESTING} levels of arrays and "
                                      "objects)")
            if isinstance(child, _KeyRepeated):
                return child.repeated
            seen.add(id(child))
            path_ids.add(id(child))
            stack.append((child, _children(child)))
    return None


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Read one JSON object per line as ``(line number, object)``; blank lines are skipped, and a key given
    twice in one object is refused (json would keep its last value)."""
    text = decode_utf8(path, path.read_bytes())
    rows = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except json.JSONDecodeError as error:
            raise DataError(path, f"line {line_number}: not valid JSON ({error.msg})") from None
        except RecursionError:
            raise DataError(path, f"line {line_number}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(path, f"line {line_number}: expected a JSON object, "
                                  f"got {type(row).__name__}")
        if (key := repeated_key(path, row, where=f"line {line_number}: ")) is not None:
            raise DataError(path, f"line {line_number}: key {key!r} is given twice")
        rows.append((line_number, row))
    return rows


def _not_a_number(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _cell_text(path: Path, line: int, key: str, value: Any, role: bool) -> str:
    """A JSON value as manifest text: strings as is, null, NaN and Infinity as empty (missing), numbers and booleans
    as JSON; an empty list or object is missing too. A list of plain values (``["nodule", "effusion"]``) is a
    DataError: its JSON text would become one class or one report. Structured data (an object, or a list holding
    lists or objects: the phantom's ``boxes``) is kept as its JSON text, as a CSV cell holding JSON is, except in the
    columns read as the image, text, split and id (``role``; a column merely named like one but not read as it,
    ``file`` beside ``image``, is another column)."""
    if isinstance(value, list | dict) and not value:
        return ""  # an empty list or object holds nothing: missing, as null is
    if isinstance(value, list | dict):
        kind = "array" if isinstance(value, list) else "object"
        structured = isinstance(value, dict) or any(isinstance(item, list | dict) for item in value)
        if not structured:
            raise DataError(path, f"line {line}: {key!r} must be text, a number or a boolean, got a JSON array of "
                                  "values; write one column per finding (0/1)")
        if role:
            raise DataError(path, f"line {line}: {key!r} must be text, got a JSON {kind}")
        return json.dumps(value, ensure_ascii=False)
    if value is None or _not_a_number(value):
        return ""
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, ensure_ascii=False)


def _read_jsonl_table(path: Path) -> tuple[list[str], list[Row]]:
    rows = read_jsonl(path)
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    spellings: dict[str, str] = {}
    for line, row in rows:  # keys are matched without case (as a CSV header's): two spellings are refused
        for key in row:
            first = spellings.setdefault(key.lower(), key)
            if first != key:
                raise DataError(path, f"line {line}: key {key!r} repeats key {first!r} (keys are matched without "
                                      f"case); use one spelling")
    missing = [(line, key) for line, row in rows for key, value in row.items() if _not_a_number(value)]
    if missing:  # Python's json.dumps writes a missing float as NaN: a missing value, not a class named "NaN"
        log.warning("%s: %d NaN / Infinity value(s) read as missing, as null is (first: line %d, key %r)", path,
                    len(missing), *missing[0])
    roles = _role_columns(columns)
    return columns, [(line, {key: _cell_text(path, line, key, v, key in roles) for key, v in row.items()})
                     for line, row in rows]


_LINE_BREAK = re.compile(b"\r\n|\r|\n")  # what the csv reader counts as the end of a line


def _bad_byte_offset(raw: bytes, first_line: int, last_line: int) -> int:
    """Byte offset of the first invalid UTF-8 byte within lines first_line..last_line."""
    starts = [0, *(match.end() for match in _LINE_BREAK.finditer(raw))]
    begin = starts[min(first_line, len(starts)) - 1]
    end = starts[last_line] if last_line < len(starts) else len(raw)
    try:
        raw[begin:end].decode("utf-8")
    except UnicodeDecodeError as error:
        return begin + error.start
    return begin


def _repair_text_cells(path: Path, raw: bytes, header: list[str], rows: list[Row],
                       spans: list[tuple[int, int]]) -> None:
    """Decode legacy bytes of the free-text column as cp1252; refuse them anywhere else."""
    text_column = _find_column(header, TEXT_COLUMNS)
    repaired = 0
    for (line, row), (first, last) in zip(rows, spans, strict=True):
        for column, value in row.items():
            if not _INVALID_UTF8.search(value):
                continue
            if column != text_column:
                offset = _bad_byte_offset(raw, first, last)
                raise DataError(path, f"not valid UTF-8 (byte offset {offset}, line {line}, "
                                      f"column {column!r}); save it as UTF-8")
            legacy = value.encode("utf-8", "surrogateescape")
            row[column] = legacy.decode("cp1252", errors="replace")
            repaired += 1
    if repaired:
        log.warning("%s: %d cells of column %r are not UTF-8; read them as Windows-1252",
                    path, repaired, text_column)


def read_csv_table(path: Path) -> tuple[list[str], list[Row]]:
    """A CSV table as (column names, rows as ``(line number, column -> stripped cell)``), read strictly: UTF-8 (a
    BOM accepted; legacy bytes only in the free-text column, decoded as Windows-1252 with a warning), a header
    without a repeated name, every row as many cells as the header and every quote closed; each problem a
    ``DataError`` naming the file and the line. Blank rows are skipped; columns with an empty header are ignored
    with a warning."""
    raw = path.read_bytes()
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    # the csv module's own cap on a cell (128 KiB) guards nothing here, the file being in memory already; a long
    # report is a valid cell (raised only, never lowered: other readers keep theirs). Other cells keep the cap below
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # strict: an unclosed quote is an error
    first_line = 1  # the header's, until it is read
    try:
        header = [name.strip() for name in next(reader, [])]
        if any(_INVALID_UTF8.search(name) for name in header):
            offset = _bad_byte_offset(raw, 1, reader.line_num)
            raise DataError(path, f"not valid UTF-8 (byte offset {offset}, header); "
                                  "save it as UTF-8")
        _check_header(path, header)
        rows: list[Row] = []
        spans: list[tuple[int, int]] = []
        first_line = reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                rows.append((first_line, _row_dict(path, first_line, header, cells)))
                spans.append((first_line, reader.line_num))
            first_line = reader.line_num + 1
    except csv.Error as error:
        if "unexpected end of data" in str(error):  # it would have read every later row into one cell
            lines = reader.line_num - first_line + 1
            raise DataError(path, f"line {first_line}: a quoted cell (\") is never closed; the rest of the file "
                                  f"({lines} line{'s' if lines != 1 else ''}) would be read into it") from None
        raise DataError(path, f"not a readable CSV file (line {reader.line_num}: {error})") \
            from None
    _check_cell_lengths(path, header, rows)
    if any(_INVALID_UTF8.search(value) for _, row in rows for value in row.values()):
        _repair_text_cells(path, raw, header, rows, spans)
    named = [name for name in header if name]
    if len(named) < len(header):
        log.warning("%s: ignoring %d column(s) with an empty header", path,
                    len(header) - len(named))
    return named, rows


def _check_cell_lengths(path: Path, header: list[str], rows: list[Row]) -> None:
    """A label, id, split or path cell over ``MAX_CELL_CHARS`` is a DataError: no class name or path is that long
    (the free-text column may be: a long report)."""
    text_column = _find_column(header, TEXT_COLUMNS)
    for line, row in rows:
        for column, value in row.items():
            if len(value) > MAX_CELL_CHARS and column != text_column:
                raise DataError(path, f"line {line}: column {column!r} holds a cell of {len(value):,} characters; "
                                      f"only the text column may hold more than {MAX_CELL_CHARS:,}")


def _check_header(path: Path, header: list[str]) -> None:
    seen = set()
    for name in header:
        if name and name.lower() in seen:
            raise DataError(path, f"duplicate column {name!r} in the header")
        seen.add(name.lower())


def _row_dict(path: Path, line: int, header: list[str], cells: list[str]) -> dict[str, str]:
    """One row's cells by column. A row of more cells than the header (beyond empty trailing ones) or fewer is
    refused: with a cell left out, every later value would be read under the wrong column (a finding as the
    split, the split as the report)."""
    if len(cells) > len(header) and any(cell.strip() for cell in cells[len(header):]):
        raise DataError(path, f"line {line}: {len(cells)} cells but the header has "
                              f"{len(header)} columns")
    if len(cells) < len(header):
        raise DataError(path, f"line {line}: {len(cells)} cells but the header has {len(header)} columns (a cell "
                              "is missing; an empty value is an empty cell between two commas)")
    return {name: cell.strip() for name, cell in zip(header, cells, strict=False) if name}


# ---------------------------------------------------------------- the sidecar


def read_sidecar(folder: Path) -> dict[str, Any] | None:
    """The folder's ``dataset.json`` as a checked dict, or None if there is none."""
    path = folder / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        sidecar = parse_json(decode_utf8(path, path.read_bytes()))
    except json.JSONDecodeError as error:
        raise DataError(path, f"not valid JSON (line {error.lineno}: {error.msg})") from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply") from None
    if not isinstance(sidecar, dict):
        raise DataError(path, "expected a JSON object")
    if (key := repeated_key(path, sidecar)) is not None:
        raise DataError(path, f"key {key!r} is given twice in one object")
    for key, value in sidecar.items():
        expected = SIDECAR_KEYS.get(key)
        if expected is None:
            log.warning("%s: ignoring unknown key %r (known: %s)", path, key,
                        ", ".join(SIDECAR_KEYS))
        elif value is not None and not isinstance(value, expected):
            raise DataError(path, f"{key!r} must be a {expected.__name__}, "
                                  f"got {type(value).__name__}")
    labels = sidecar.get("label_columns") or []
    if not all(isinstance(label, str) for label in labels):
        raise DataError(path, "'label_columns' must be a list of column names")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise DataError(path, f"'label_columns' names {', '.join(repeated)} more than once")
    return sidecar


def find_manifest(folder: Path, allow_outside_root: bool = False) -> Path | None:
    """The manifest of a dataset folder: named by ``dataset.json``, else a standard name.

    A sidecar naming a manifest outside the folder is a ``DataError`` unless ``allow_outside_root``.
    """
    sidecar = read_sidecar(folder)
    if sidecar and sidecar.get("manifest"):
        manifest = folder / sidecar["manifest"]
        check_inside_root(folder / SIDECAR_NAME, folder, [("'manifest' key", manifest)], allow_outside_root,
                          what="manifest entries")
        if not manifest.is_file():
            raise DataError(folder / SIDECAR_NAME, f"manifest {sidecar['manifest']!r} not found")
        return manifest
    for name in MANIFEST_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def _sidecar_for(manifest: Path, folder: Path) -> dict[str, Any]:
    """The sidecar in ``folder`` if it describes this manifest, else an empty dict."""
    sidecar = read_sidecar(folder) or {}
    named = sidecar.get("manifest")
    if named and (folder / named).resolve() != manifest.resolve():
        return {}
    return sidecar


# ---------------------------------------------------------------- building records


def _find_column(columns: Iterable[str], candidates: tuple[str, ...]) -> str | None:
    by_lower = {column.lower(): column for column in columns}
    return next((by_lower[name] for name in candidates if name in by_lower), None)


class _ImageResolver:
    """Turns a manifest value into an image path under the folder or ``<folder>/images``."""

    def __init__(self, folder: Path, by_stem: bool):
        self.roots = [folder, folder / "images"]
        self.by_stem = by_stem
        self.stems: dict[str, list[Path]] = {}
        if by_stem:
            for root in self.roots:
                for file in sorted(root.iterdir()) if root.is_dir() else []:
                    if file.is_file() and is_image_file(file):
                        stem = file.name[: len(file.name) - len(image_suffix(file))]
                        self.stems.setdefault(stem, []).append(file)

    def resolve(self, value: str) -> tuple[Path, bool]:
        """(path, exists); the first candidate that is a file, else the first that exists (a folder: refused by
        the caller), else the first candidate path. A name not found as written is looked up in its other Unicode
        forms (NFC, NFD: ``café.png`` written by one tool, stored decomposed by a macOS copy; they print the same)."""
        if self.by_stem:
            found = next((self.stems[form] for form in _unicode_forms(value) if form in self.stems), [])
            if len(found) > 1:
                raise DataError(self.roots[0], f"several images named {value!r}: "
                                               f"{', '.join(p.name for p in found)}")
            return (found[0], True) if found else (self.roots[0] / value, False)
        for form in _unicode_forms(value):
            path = Path(form)
            candidates = [path] if path.is_absolute() else [root / path for root in self.roots]
            existing = next((c for c in candidates if is_file(c)), None) or \
                next((c for c in candidates if path_exists(c)), None)
            if existing:
                return existing, True
        path = Path(value)
        return (path if path.is_absolute() else self.roots[0] / path), False


def _unicode_forms(value: str) -> list[str]:
    """``value`` as written, then its NFC and NFD forms where they differ (file names are compared byte for byte)."""
    return list(dict.fromkeys([value, unicodedata.normalize("NFC", value), unicodedata.normalize("NFD", value)]))


def known_table(columns: Iterable[str]) -> KnownTable | None:
    """The known table whose signature columns all appear in ``columns``, or None."""
    names = {column.lower() for column in columns}
    return next((table for table in KNOWN_TABLES if table.signature <= names), None)


def _roles(columns: list[str]) -> dict[str, str | None]:
    """The column read as each role (image, text, split, id; ``by_stem`` when images are named by stem)."""
    image = _find_column(columns, IMAGE_COLUMNS)
    stem = None if image else _find_column(columns, STEM_COLUMNS)
    return {
        "image": image or stem,
        "text": _find_column(columns, TEXT_COLUMNS),
        "split": _find_column(columns, (SPLIT_COLUMN,)),
        "id": stem or _find_column(columns, (ID_COLUMN,)),
        "by_stem": stem,
    }


def _role_columns(columns: list[str]) -> set[str]:
    """The columns read as the image, text, split and id: text only, never structured data."""
    return {column for column in _roles(columns).values() if column is not None}


def _columns_for(path: Path, columns: list[str]) -> dict[str, str | None]:
    roles = _roles(columns)
    if not roles["image"]:
        raise DataError(path, f"no image column (expected one of {', '.join(IMAGE_COLUMNS)}, "
                              f"or {', '.join(STEM_COLUMNS)} naming image files by stem); "
                              f"columns found: {', '.join(columns) or 'none'}")
    return roles


def _record(path: Path, line: int, row: dict[str, str], roles: dict[str, str | None],
            labels: list[str], resolver: _ImageResolver) -> tuple[Record, Path, bool]:
    """The row's record, its image's resolved path, and whether that file exists."""
    image_value = row.get(roles["image"] or "", "")
    if not image_value:
        raise DataError(path, f"line {line}: empty {roles['image']!r} cell")
    image, exists = resolver.resolve(image_value)
    record_id = row.get(roles["id"] or "") or _default_id(image_value, image, resolver.roots[0])
    split = row.get(roles["split"], "") if roles["split"] else ALL_SPLITS
    if not split:
        raise DataError(path, f"line {line}: empty {roles['split']!r} cell")
    record = Record(
        id=record_id,
        images=[image],
        text=row.get(roles["text"] or "") or None,
        labels={name: row[name] for name in labels if row.get(name)},
        meta={k: v for k, v in row.items() if v and k not in (roles["image"], roles["text"])},
        split=split,
    )
    return record, image, exists


def _default_id(image_value: str, image: Path, root: Path) -> str:
    """A record id from its image path when the manifest has no id column: the path as written
    minus its suffix, or, for an absolute or ``..`` path, the path relative to the manifest's folder
    (a hash of the path as written outside that folder), so that no id carries the folders above
    the dataset."""
    written = PurePosixPath(image_value)
    if not written.is_absolute() and ".." not in written.parts:
        return written.with_suffix("").as_posix()
    resolved = image.resolve()
    try:
        return resolved.relative_to(root.resolve()).with_suffix("").as_posix()
    except ValueError:
        return "file-" + hashlib.sha256(image_value.encode()).hexdigest()[:16]


def check_reserved_split(path: Path, rows: list[Row], column: str | None) -> None:
    """A DataError when some rows, not all, have the split ``all``: ``--split all`` (``Dataset.select``) means
    every record, so those rows could never be selected alone, and ``--split all`` would silently take the other
    splits (a test split) too. Every row ``all`` is one split, as a manifest without a split column is."""
    if column is None:
        return
    reserved = [line for line, row in rows if row.get(column) == ALL_SPLITS]
    if reserved and len(reserved) < len(rows):
        raise DataError(path, f"{len(reserved)} of {len(rows)} rows have the split {ALL_SPLITS!r} (first: line "
                              f"{reserved[0]}) beside other splits; {ALL_SPLITS!r} is the reserved name for every "
                              "record (--split all), so they could not be selected alone: rename their split")


def check_reserved_split_name(path: Path, sources: dict[str, str]) -> None:
    """The rule of ``check_reserved_split`` for loaders whose splits come from names (``.npz`` keys, question
    files, MedPix description files): ``sources`` maps each split to what names it. A split ``all`` beside
    other splits is a DataError; ``all`` alone is one split."""
    if ALL_SPLITS in sources and len(sources) > 1:
        others = ", ".join(repr(split) for split in sources if split != ALL_SPLITS)
        raise DataError(path, f"{sources[ALL_SPLITS]} holds the split {ALL_SPLITS!r} beside other splits ({others}); "
                              f"{ALL_SPLITS!r} is the reserved name for every record (--split all), so it could not "
                              "be selected alone: rename it")


def spells_missing(cell: str) -> bool:
    """Whether a cell spells a missing value: ``NaN``, ``NA``, ``N/A`` or ``null`` in any case (``MISSING_SPELLINGS``;
    never ``None``, a class)."""
    return cell.lower() in MISSING_SPELLINGS


def clear_missing_cells(path: Path, rows: list[Row], columns: list[str], keep: frozenset[str] = frozenset()) -> None:
    """Cells spelled as a missing value (``spells_missing``) made empty (missing) in place, counted in one warning per
    column (the count, the spellings and the first line: never other cell text), which says that a run on the
    column leaves those records out. ``keep``: cells left as they are (a known table's own no-text notes, counted
    apart)."""
    for column in columns:
        missing = [line for line, row in rows if _spelled_missing(row.get(column), keep)]
        if missing:
            spelled = sorted({row[column] for _, row in rows if _spelled_missing(row.get(column), keep)})
            log.warning("%s: %d cell(s) of column %r spelled as a missing value (%s) read as missing, as an empty "
                        "cell is (first: line %d): a run on the column leaves their records out", path, len(missing),
                        column, ", ".join(spelled), missing[0])
            for _, row in rows:
                if _spelled_missing(row.get(column), keep):
                    row[column] = ""


def _spelled_missing(cell: str | None, keep: frozenset[str]) -> bool:
    return cell is not None and cell not in keep and spells_missing(cell)


def clean_label_cells(path: Path, rows: list[Row], columns: list[str]) -> None:
    """Label cells made uniform in place, for every manifest format alike: a cell spelled as a missing value
    becomes empty (``clear_missing_cells``); a column whose values are all ``0.0`` / ``1.0`` (pandas' output of a
    0/1 column with a missing value) becomes ``0`` / ``1``, a binary finding column as every evaluator reads one, and
    so does a column whose values are all booleans (``True`` / ``False`` in any case: pandas' output of a bool column,
    a JSONL ``true`` / ``false``)."""
    clear_missing_cells(path, rows, columns)
    for column in columns:
        values = {row[column] for _, row in rows if row.get(column)}
        if values and values <= FLOAT_BINARY.keys():
            _read_as_binary(path, rows, column, "0.0 / 1.0", FLOAT_BINARY)
        elif values and {value.lower() for value in values} <= BOOLEAN_BINARY.keys():
            _read_as_binary(path, rows, column, "booleans (true / false)", BOOLEAN_BINARY)


def _read_as_binary(path: Path, rows: list[Row], column: str, kind: str, binary: dict[str, str]) -> None:
    log.info("%s: column %r holds %s only: read as 0 / 1", path, column, kind)
    for _, row in rows:
        if row.get(column):
            row[column] = binary[row[column].lower()]  # the keys are lower case


def film_patient(film: str) -> str:
    """The patient of a film named by patient and film letter (``COVID-00039b`` -> ``COVID-00039``); a name without
    a film letter (``COVID-00001``, the patient's only film) is the patient's."""
    return FILM_LETTER.sub("", film)


def _build_records(path: Path, columns: list[str], rows: list[Row], skip_missing_images: bool = False,
                   allow_outside_root: bool = False, keep_missing_images: bool = False,
                   no_text: frozenset[str] = frozenset(),
                   patient_column: str | None = None) -> tuple[list[Record], list[str]]:
    roles = _columns_for(path, columns)
    patient_column = _find_column(columns, (patient_column,)) if patient_column else None
    check_reserved_split(path, rows, roles["split"])
    special = {roles["image"], roles["text"], roles["split"], roles["id"]}
    labels = [column for column in columns if column not in special]
    clean_label_cells(path, rows, labels)
    if roles["text"]:  # a report spelled 'NaN' is no report: the same table saved as JSONL has null there
        clear_missing_cells(path, rows, [roles["text"]], keep=no_text)
    resolver = _ImageResolver(path.parent, by_stem=bool(roles["by_stem"]))
    records: list[Record] = []
    missing: list[tuple[int, Path]] = []
    not_files: list[tuple[int, Path]] = []
    first_line: dict[str, int] = {}
    images: list[tuple[str, Path]] = []
    for line, row in rows:
        record, image, exists = _record(path, line, row, roles, labels, resolver)
        if patient_column and row.get(patient_column):  # a table's own patient_id column, if any, comes first
            record.meta.setdefault(PATIENT_KEY, film_patient(row[patient_column]))
        images.append((f"line {line}", image))
        if not exists:
            missing.append((line, image))
        elif not is_file(image):
            not_files.append((line, image))
        if record.id in first_line:
            raise DataError(path, f"duplicate id {record.id!r} on lines {first_line[record.id]} "
                                  f"and {line}")
        first_line[record.id] = line
        if exists or keep_missing_images:
            records.append(record)
    check_inside_root(path, path.parent, images, allow_outside_root)
    if not_files:  # a folder would load as a record and fail only when its image is read (audit, training)
        line, image = not_files[0]
        kind = "a folder" if image.is_dir() else "not a regular file"
        raise DataError(path, f"{len(not_files)} of {len(rows)} image cells name something that is not an image "
                              f"file; first: line {line}: {image} is {kind}")
    if missing and keep_missing_images:
        log.warning("%s: %d of %d image files not found (first: line %d); their records are kept", path,
                    len(missing), len(rows), missing[0][0])
    elif missing and (not skip_missing_images or not records):
        line, image = missing[0]
        raise DataError(path, f"{len(missing)} of {len(rows)} image files not found; "
                              f"first: line {line}: {image}")
    elif missing:
        log.warning("%s: skipped %d of %d rows whose image file is missing (first: line %d)",
                    path, len(missing), len(rows), missing[0][0])
    if roles["text"]:
        _clear_and_count_no_text(path, records, roles["text"], no_text)
    return records, labels


def _clear_and_count_no_text(path: Path, records: list[Record], column: str, no_text: frozenset[str]) -> None:
    """Clear the text of the records whose cell says there is none (``no_text``, Figure 1's 'N/A': training on
    'N/A' as a report teaches nothing), and log how many records have no text, those and the empty cells."""
    empty = sum(record.text is None for record in records)
    said = 0
    for record in records:
        if record.text is not None and record.text.strip() in no_text:
            record.text, said = None, said + 1
    if said:
        log.info("%s: %d of %d records have no text (%d an empty %r cell, %d a note saying there is none: %s)",
                 path, empty + said, len(records), empty, column, said, ", ".join(map(repr, sorted(no_text))))
    elif empty:
        log.info("%s: %d of %d records have an empty %r cell (no text)", path, empty, len(records), column)


def load_manifest(path: str | Path, allow_outside_root: bool = False, sidecar_folder: str | Path | None = None,
                  keep_missing_images: bool = False) -> Dataset:
    """Load a ``.csv`` or ``.jsonl`` manifest (see the module docstring for the columns).

    Image paths resolving outside the manifest's folder are refused unless ``allow_outside_root``.
    ``sidecar_folder``: the folder whose ``dataset.json`` named this manifest (``find_manifest``), which may be
    above the manifest's own folder; default the manifest's folder. ``keep_missing_images``: rows whose image file
    is missing are kept as records (counted in a warning; reading their image fails) instead of being an error.
    """
    path = Path(path)
    folder = path.parent if sidecar_folder is None else Path(sidecar_folder)
    if not path.is_file():
        raise DataError(path, "manifest file not found")
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise DataError(path, f"unsupported manifest type {suffix!r}; expected .csv or .jsonl")
    if path.stat().st_size == 0:
        raise DataError(path, "empty manifest (0 bytes)")
    columns, rows = _read_jsonl_table(path) if suffix == ".jsonl" else read_csv_table(path)
    if not rows:
        raise DataError(path, "empty manifest (no rows)")
    known = known_table(columns)
    records, labels = _build_records(path, columns, rows, bool(known and known.skip_missing_images),
                                     allow_outside_root, keep_missing_images, known.no_text if known else frozenset(),
                                     known.patient_column if known else None)
    sidecar = _sidecar_for(path, folder)
    defaults = sidecar.get("label_columns") or [c for c in (known.default_labels if known else ()) if c in labels]
    unknown = [label for label in defaults if label not in labels]
    if unknown:
        raise DataError(folder / SIDECAR_NAME,
                        f"label_columns {unknown} are not columns of {path.name}; "
                        f"label columns: {', '.join(labels)}")
    return Dataset(records, source=str(path), label_names=labels, default_labels=list(defaults),
                   captions=sidecar.get("captions"))
