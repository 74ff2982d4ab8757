"""What an index stores per case, and the typed filter columns built from case metadata.

Image paths are patient data too (a folder may be named after a patient or an MRN), so a case
stores its image's path relative to the root of the dataset it came from (the folder of the
manifest, or the dataset folder), never an absolute path. It stores no path at all for an image
outside that root, for images given as arrays, and for DICOM files and series (their records are
identified by hashed UIDs: see ``medvl.data.loaders.dicom``). See docs/index-contents.md.

A case's metadata values are strings (as loaders write them). Each metadata key that is a plain
identifier of at most ``MAX_FILTER_NAME`` characters becomes a filter column for ``--where``: numeric if
every non-empty value seen is a finite number written as ``--where`` writes one (``-?digits[.digits][e±digits]``,
ASCII, no spaces) and none is beyond 2**53 - 1 = 9007199254740991 in magnitude (where 64-bit floats cannot
tell neighbouring whole numbers apart; see ``is_number``), text otherwise. So ``age > 60`` compares
numbers and ``accession = '20231105000000002'`` compares text exactly.
The filter name is the key in lower case; ``id`` and ``split`` are always filterable. Other keys stay in
the case's metadata JSON only (a longer name would not fit PostgreSQL's 63-byte identifiers as
``m_<name>``: two keys sharing their first 61 characters would be one column there).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from ..clinical.formats import DICOM_SUFFIXES, has_dicom_preamble
from ..data.images import array_sha256 as array_sha256  # moved to the data layer (the audit hashes so too)
from ..data.images import model_channels as model_channels
from ..data.images import pixel_sha256 as pixel_sha256
from ..data.record import Dataset, Record
from ..errors import DataError

NUMBER, TEXT = "number", "text"
FIXED_COLUMNS = {"id": TEXT, "split": TEXT}  # stored as their own columns, always filterable
CASE_KEYS = ("case_id", "patient_id")  # record metadata naming the case / patient an image belongs to
MAX_FILTER_COLUMNS = 200  # more metadata keys than this stay in the JSON only
# PostgreSQL cuts identifiers to 63 bytes (NAMEDATALEN - 1): "m_" + 61 ASCII characters is the longest column
# name that stays whole, so that the same data makes the same filter columns on every backend
MAX_FILTER_NAME = 61
_IDENTIFIER = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_FILTER_NAME - 1}}}\Z")
# a number as metadata holds it and ``--where`` writes it (ASCII only: Python's float() also takes "1_000",
# " 5 " and Arabic-Indic digits, which the filter language cannot write)
NUMBER_SYNTAX = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
# the largest number up to which every whole number is its own 64-bit float (2**53 - 1); beyond it, neighbouring
# whole numbers (accession numbers ...001 and ...002) are one float
MAX_EXACT_INTEGER = 2**53 - 1
INEXACT_INTEGER = (f"beyond {MAX_EXACT_INTEGER} (2**53 - 1) in magnitude, where a numeric filter column (64-bit "
                   "floats) cannot tell neighbouring whole numbers apart")


@dataclass
class Case:
    """One indexed case: id, labels, metadata, report text and where its image came from."""

    id: str
    split: str = "all"
    labels: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = field(default=None, repr=False)  # report: patient data, never logged
    # the image file's path relative to its dataset's root, in POSIX form ("images/x.png"); None for
    # arrays, DICOM and images outside the root (see ``stored_image_path``)
    image_path: str | None = None
    image_sha256: str | None = None  # sha256 of the decoded pixels as the model reads them (``pixel_sha256``)

    @classmethod
    def from_record(cls, record: Record, image_sha256: str | None = None, root: Path | None = None) -> Case:
        """The case of a record; ``root`` is its dataset's root (``dataset_root``), None stores no path."""
        return cls(id=record.id, split=record.split, labels=dict(record.labels), meta=dict(record.meta),
                   text=record.text or None, image_path=stored_image_path(record.image, root),
                   image_sha256=image_sha256)


def case_key(meta: dict[str, Any]) -> str | None:
    """The case / patient an image belongs to, when its metadata says (``CASE_KEYS``: MedPix's ``case_id``); several
    images of one case share it, and often its report."""
    return next((str(meta[key]) for key in CASE_KEYS if meta.get(key) not in (None, "")), None)


def ids_by_case(rows: Iterable[tuple[str, dict[str, Any]]], keys: Collection[str]) -> dict[str, list[str]]:
    """Case (``case_key``) -> the sorted ids of its images among ``rows`` (id, metadata), for the ``keys`` wanted:
    ``Index.case_ids`` of every backend over its rows."""
    wanted, found = set(keys), dict[str, list[str]]()
    for image_id, meta in rows:
        key = case_key(meta)
        if key is not None and key in wanted:
            found.setdefault(key, []).append(image_id)
    return {key: sorted(ids) for key, ids in found.items()}


def dataset_root(dataset: Dataset) -> Path:
    """The folder image paths are stored relative to: the dataset folder, or the folder of the
    dataset file (manifest, .npz, question file) that was loaded."""
    source = Path(dataset.source)
    return source if source.is_dir() else source.parent


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM file, by suffix or by the ``DICM`` marker (the loader also reads suffix-less files)."""
    return str(path).lower().endswith(DICOM_SUFFIXES) or has_dicom_preamble(path)


def stored_image_path(image, root: Path | None) -> str | None:
    """What a case stores of where its image is: the path relative to ``root`` (POSIX form), or None.

    None for arrays and DICOM (ids are hashed UIDs; a DICOM file's path may name the patient), when
    ``root`` is None, and for a file outside ``root`` (``..`` would name folders above the dataset).
    """
    if root is None or not isinstance(image, str | Path) or is_dicom_file(image):
        return None
    for path, base in ((Path(os.path.abspath(image)), Path(os.path.abspath(root))),
                       (Path(image).resolve(), Path(root).resolve())):
        if path.is_relative_to(base) and path != base:
            return path.relative_to(base).as_posix()
    return None


def public_image_path(stored: str | None) -> str | None:
    """A stored image path as search hits show it: relative paths only. Indexes built before paths
    were stored relative (index format 1) hold absolute paths; those are never shown."""
    if not stored or PurePosixPath(stored).is_absolute() or PureWindowsPath(stored).anchor \
            or ".." in PurePosixPath(stored).parts:
        return None
    return stored


def pixel_sha256s(pixels: np.ndarray, spatial_dims: int = 2) -> tuple[str, ...]:
    """The hashes an index may hold ``pixels`` under, to look its copies up by: ``pixel_sha256`` first, then those
    that indexes built before hashes were taken of the model's channels recorded for the same picture: the array as
    it is, and for a grey picture its copies saved as RGB or as opaque RGBA (three equal channels)."""
    grey = model_channels(pixels, spatial_dims)
    hashes = [array_sha256(grey)]  # pixel_sha256
    if grey is not pixels:  # a colour file of equal channels: as it is (an RGB one is its own RGB copy, below)
        hashes.append(array_sha256(pixels))
    if spatial_dims == 2 and grey.ndim == 2:
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        opaque = np.full(grey.shape + (1,), np.iinfo(grey.dtype).max if grey.dtype.kind in "ui" else 1, grey.dtype)
        if pixels.shape != rgb.shape:
            hashes.append(array_sha256(rgb))
        hashes.append(array_sha256(np.concatenate([rgb, opaque], axis=-1)))
    return tuple(dict.fromkeys(hashes))


def filter_name(key: str) -> str | None:
    """The ``--where`` column name of a metadata key, or None if it cannot be one."""
    name = str(key).lower()
    if not _IDENTIFIER.match(name) or name in FIXED_COLUMNS:
        return None
    return name


def is_number(value: Any) -> bool:
    """Whether a metadata value is a number a numeric filter column holds exactly enough: written as the
    ``--where`` language writes numbers (ASCII ``-?digits[.digits][e±digits]``, no spaces, no ``_``), finite,
    and at most 2**53 - 1 in magnitude (``MAX_EXACT_INTEGER``): a numeric column
    holds 64-bit floats, which cannot tell larger whole numbers apart (``20231105000000001`` and
    ``...002`` are one float), so a column holding such identifiers is text."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= MAX_EXACT_INTEGER
    if isinstance(value, float):
        return math.isfinite(value) and abs(value) <= MAX_EXACT_INTEGER
    return isinstance(value, str) and number_problem(value) is None


def number_problem(text: str) -> str | None:
    """Why ``text`` is not a number a numeric filter column compares exactly, or None when it is one."""
    if not NUMBER_SYNTAX.fullmatch(text):
        return "not a number"
    if not math.isfinite(float(text)):
        return "not a finite number"
    return None if abs(Decimal(text)) <= MAX_EXACT_INTEGER else INEXACT_INTEGER  # exact, unlike the float


def infer_columns(cases: Iterable[Case], known: dict[str, str] | None = None) -> dict[str, str]:
    """Filter columns of metadata keys not in ``known``: name -> ``number`` | ``text``."""
    known = known or {}
    seen: dict[str, bool] = {}  # name -> every non-empty value so far is a number
    for case in cases:
        for key, value in case.meta.items():
            name = filter_name(key)
            if name is None or name in known or _empty(value):
                continue
            if name not in seen and len(known) + len(seen) >= MAX_FILTER_COLUMNS:
                continue
            seen[name] = seen.get(name, True) and is_number(value)
    return {name: NUMBER if numeric else TEXT for name, numeric in seen.items()}


def column_values(case: Case, columns: dict[str, str], source: str | Path | None = None,
                  index: str | None = None) -> dict[str, Any]:
    """The typed filter-column values of one case (None where absent); DataError if a numeric
    column gets a value that is not a number, naming ``source`` (the data the case came from) and ``index``."""
    values: dict[str, Any] = dict.fromkeys(columns)
    for key, value in case.meta.items():
        name = str(key).lower()  # not filter_name: an index made before MAX_FILTER_NAME may have longer columns
        if name not in columns or name in FIXED_COLUMNS or _empty(value) or values[name] is not None:
            continue
        if columns[name] == NUMBER:
            if not is_number(value):
                target = f"the index {index}" if index else "this index"
                inexact = isinstance(value, str | int | float) and number_problem(str(value)) == INEXACT_INTEGER
                why = (f"; it is {INEXACT_INTEGER}: rebuild the index so that the column is text"
                       if inexact else "")
                raise DataError(source, f"case {case.id!r}: metadata {key!r} must be a number for {target} "
                                        f"(its filter column is numeric), got {str(value)[:40]!r}{why}")
            values[name] = float(value)
        else:
            values[name] = str(value)
    return values


def check_ids_are_not_paths(ids: Sequence[str], source: str) -> None:
    """DataError if a case id is an absolute path or climbs above its folder (``..``): a manifest
    without an ``id`` column takes ids from its image paths, and an index must not store the folders
    above the data. The message counts the ids and never shows one."""
    bad = [i for i, case_id in enumerate(ids) if PurePosixPath(case_id).is_absolute()
           or PureWindowsPath(case_id).anchor or ".." in PurePosixPath(case_id.replace("\\", "/")).parts]
    if bad:
        raise DataError(source, f"{len(bad)} case ids are absolute paths or climb above the dataset folder "
                                f"(e.g. record {bad[0] + 1}), which an index must not store; add an id column "
                                f"or name images relative to the manifest")


def check_no_nul(records: Sequence[Record], source: str) -> None:
    """DataError if the id, split, report, labels or metadata of a record hold a NUL character (U+0000,
    usually a damaged export): PostgreSQL stores none in text or jsonb, and the same data builds the same
    index on every backend, so a FAISS build refuses it too, before anything is written. The message
    counts the cases and names the first one and the field, never the text."""
    bad = [(record, where) for record in records if (where := _nul_field(record))]
    if bad:
        record, where = bad[0]
        more = f" (and {len(bad) - 1} more case{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        raise DataError(source, f"case {record.id!r}: {where} holds a NUL character (\\x00){more}, which an index "
                                "cannot store (PostgreSQL refuses it); remove it from the data")


def _nul_field(record: Record) -> str | None:
    """Which field of ``record`` holds a NUL character, or None."""
    fields: list[tuple[str, Any]] = [("the id", record.id), ("the split", record.split), ("the report", record.text)]
    fields += [(f"label {name!r}", (name, value)) for name, value in record.labels.items()]
    fields += [(f"metadata {name!r}", (name, value)) for name, value in record.meta.items()]
    return next((where for where, value in fields if _holds_nul(value)), None)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_holds_nul(v) for v in value)
    return False


def quote_column(name: str) -> str:
    """The SQL identifier of a filter column (names are checked identifiers, see ``filter_name``)."""
    return name if name in FIXED_COLUMNS else f'"m_{name}"'


def check_unique_ids(cases: Sequence[Case], source: str) -> None:
    seen: set[str] = set()
    repeated = []
    for case in cases:
        if case.id in seen:
            repeated.append(case.id)
        seen.add(case.id)
    if repeated:
        raise DataError(source, f"{len(repeated)} repeated case ids, e.g. {repeated[0]!r}; ids must be unique")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
