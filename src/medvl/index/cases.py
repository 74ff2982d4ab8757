"""What an index stores per case, and the typed filter columns built from case metadata.

A case's metadata values are strings (as loaders write them). Each metadata key that is a plain
identifier becomes a filter column for ``--where``: numeric if every non-empty value seen parses
as a finite number (so ``age > 60`` compares numbers), text otherwise. The filter name is the
key in lower case; ``id`` and ``split`` are always filterable. Other keys stay in the case's
metadata JSON only.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.record import Record
from ..errors import DataError

NUMBER, TEXT = "number", "text"
FIXED_COLUMNS = {"id": TEXT, "split": TEXT}  # stored as their own columns, always filterable
MAX_FILTER_COLUMNS = 200  # more metadata keys than this stay in the JSON only
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


@dataclass
class Case:
    """One indexed case: id, labels, metadata, report text and where its image came from."""

    id: str
    split: str = "all"
    labels: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    text: str | None = field(default=None, repr=False)  # report: patient data, never logged
    image_path: str | None = None  # absolute path of the indexed image file (None for arrays)
    image_sha256: str | None = None  # sha256 of the decoded pixels (see ``pixel_sha256``)

    @classmethod
    def from_record(cls, record: Record, image_sha256: str | None = None) -> Case:
        image = record.image
        path = str(Path(image).resolve()) if isinstance(image, str | Path) else None
        return cls(id=record.id, split=record.split, labels=dict(record.labels), meta=dict(record.meta),
                   text=record.text or None, image_path=path, image_sha256=image_sha256)


def pixel_sha256(pixels: np.ndarray) -> str:
    """Hash of the decoded image (dtype, shape, pixels): equal for the same picture saved twice
    under different names or compressions, different after any change of a pixel."""
    digest = hashlib.sha256(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def filter_name(key: str) -> str | None:
    """The ``--where`` column name of a metadata key, or None if it cannot be one."""
    name = str(key).lower()
    if not _IDENTIFIER.match(name) or name in FIXED_COLUMNS:
        return None
    return name


def is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value)) and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


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


def column_values(case: Case, columns: dict[str, str]) -> dict[str, Any]:
    """The typed filter-column values of one case (None where absent); DataError if a numeric
    column gets a value that is not a number."""
    values: dict[str, Any] = dict.fromkeys(columns)
    for key, value in case.meta.items():
        name = filter_name(key)
        if name not in columns or _empty(value) or values[name] is not None:
            continue
        if columns[name] == NUMBER:
            if not is_number(value):
                raise DataError(None, f"case {case.id!r}: metadata {key!r} must be a number for this index "
                                      f"(its filter column is numeric), got {str(value)[:40]!r}")
            values[name] = float(value)
        else:
            values[name] = str(value)
    return values


def check_unique_ids(cases: Sequence[Case], source: str) -> None:
    seen: set[str] = set()
    repeated = [c.id for c in cases if c.id in seen or seen.add(c.id)]
    if repeated:
        raise DataError(source, f"{len(repeated)} repeated case ids, e.g. {repeated[0]!r}; ids must be unique")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
