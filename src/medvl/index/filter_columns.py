"""The filter columns of an index as arrays: which cases a ``--where`` filter allows, without SQL.

SQLite answers a filter by reading the table: ~130 ms for 1M cases, however few of them the filter
allows. ``FilterColumns`` keeps the same values column by column in memory (one row per case, in
``vid`` order) and evaluates the parsed filter (``medvl.index.where``) on them with numpy: a few
milliseconds for 1M cases.

- numeric columns: float64 values (what SQLite's REAL holds), NaN for NULL;
- text columns (``id``, ``split`` and the text metadata columns): int32 codes into a vocabulary of
  the distinct values, -1 for NULL. The vocabulary only grows while an index is edited (so adding
  cases never renumbers the codes) and is compacted when it is saved (a deleted case's values do
  not stay in the file). Ordering comparisons rank the vocabulary in code-point order, which is the
  order of SQLite's BINARY collation of UTF-8 text;
- ``has_report``: the case has a report (``report IS NOT NULL``: report-text searches only).

Semantics are SQL's three-valued logic, with the SQLite query as the reference (the two are
compared on random filters in ``tests/test_filter_columns.py``): a comparison or ``in`` on NULL is
unknown, ``not`` unknown is unknown, ``is [not] null`` is never unknown; a case is allowed when the
filter is true.

On disk: ``filters.safetensors`` in the index folder (no pickle), written with the rest of the
folder (a build's staging folder, an edit's copy) and swapped in with it; an opened index holds the file open
from its opening (``open_saved``), so a later swap does not change the columns it reads. Its header records the
number of cases, the largest ``vid`` and the columns; as ``vid``s are never reused, a file whose
numbers differ from the SQLite table (an index written by an older medvl) is stale, and the
arrays are then read from SQLite again.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError
from ..io import give_output_mode
from .cases import NUMBER, Case, column_values, quote_column
from .where import Compare, Expression, IsNull, Junction, Member, Not

log = logging.getLogger(__name__)

FILTERS_FILE = "filters.safetensors"
FILTERS_FORMAT = "1"
NULL_CODE = -1
_NUMBER_OPS = {"=": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
               ">=": np.greater_equal}


class TextColumn:
    """Codes (int32, -1 = NULL) into a vocabulary of distinct values, kept in first-seen order."""

    def __init__(self, codes: np.ndarray, vocabulary: list[str]):
        self.codes, self.vocabulary = codes, vocabulary
        self._lookup: dict[str, int] | None = None
        self._ranks: tuple[list[str], np.ndarray] | None = None  # sorted vocabulary, rank of each code

    @classmethod
    def from_values(cls, values: Sequence[str | None]) -> TextColumn:
        column = cls(np.empty(0, np.int32), [])
        column.codes = column.encode(values)
        return column

    @property
    def lookup(self) -> dict[str, int]:
        if self._lookup is None:
            self._lookup = {value: code for code, value in enumerate(self.vocabulary)}
        return self._lookup

    def encode(self, values: Sequence[str | None]) -> np.ndarray:
        """Codes of ``values``, adding new ones to the vocabulary."""
        lookup = self.lookup
        codes = np.empty(len(values), np.int32)
        for i, value in enumerate(values):
            if value is None:
                codes[i] = NULL_CODE
                continue
            code = lookup.get(value)
            if code is None:
                code = lookup[value] = len(self.vocabulary)
                self.vocabulary.append(value)
                self._ranks = None
            codes[i] = code
        return codes

    def ranks(self) -> tuple[list[str], np.ndarray]:
        """The vocabulary in code-point order and each code's rank in it (for < <= > >=)."""
        if self._ranks is None:
            order = sorted(range(len(self.vocabulary)), key=self.vocabulary.__getitem__)
            rank = np.empty(len(order), np.int64)
            rank[order] = np.arange(len(order))
            self._ranks = ([self.vocabulary[i] for i in order], rank)
        return self._ranks

    def table(self, codes: Sequence[int] | np.ndarray) -> np.ndarray:
        """A lookup table over codes (one slot more, for NULL's -1) that is True for ``codes``."""
        table = np.zeros(len(self.vocabulary) + 1, bool)
        table[np.asarray(codes, dtype=np.int64)] = True
        table[NULL_CODE] = False
        return table

    def compact(self) -> None:
        """Drop vocabulary entries no row uses (after deletions) and renumber the codes."""
        used = np.zeros(len(self.vocabulary) + 1, bool)
        used[self.codes] = True
        used = used[:-1]
        if used.all():
            return
        renumber = np.full(len(self.vocabulary) + 1, NULL_CODE, np.int32)
        renumber[:-1][used] = np.arange(int(used.sum()), dtype=np.int32)
        self.codes = renumber[self.codes]
        self.vocabulary = [value for value, keep in zip(self.vocabulary, used.tolist(), strict=True) if keep]
        self._lookup = self._ranks = None


class FilterColumns:
    """Every filter column of an index's cases as arrays, rows in ``vid`` order."""

    def __init__(self, kinds: dict[str, str], vids: np.ndarray, has_report: np.ndarray,
                 numbers: dict[str, np.ndarray], texts: dict[str, TextColumn]):
        self.kinds = dict(kinds)  # name -> number | text, as the index's columns
        self.vids, self.has_report = vids, has_report
        self.numbers, self.texts = numbers, texts

    def __len__(self) -> int:
        return len(self.vids)

    @classmethod
    def empty(cls, kinds: dict[str, str]) -> FilterColumns:
        return cls(kinds, np.empty(0, np.int64), np.empty(0, bool),
                   {n: np.empty(0, np.float64) for n, k in kinds.items() if k == NUMBER},
                   {n: TextColumn(np.empty(0, np.int32), []) for n, k in kinds.items() if k != NUMBER})

    # -- building and keeping in step with the SQLite table -------------------------------------
    @classmethod
    def from_table(cls, conn: sqlite3.Connection, kinds: dict[str, str]) -> FilterColumns:
        """Read the arrays from the ``cases`` table (one pass over it)."""
        names = list(kinds)
        fields = ", ".join(["vid", "report IS NOT NULL", *(quote_column(n) for n in names)])
        rows = conn.execute(f"SELECT {fields} FROM cases ORDER BY vid").fetchall()
        values = list(zip(*rows, strict=True)) if rows else [()] * (len(names) + 2)
        numbers, texts = {}, {}
        for name, column in zip(names, values[2:], strict=True):
            if kinds[name] == NUMBER:
                numbers[name] = np.array(column, dtype=np.float64)  # None -> NaN
            else:
                texts[name] = TextColumn.from_values([None if v is None else str(v) for v in column])
        return cls(kinds, np.array(values[0], dtype=np.int64), np.array(values[1], dtype=bool), numbers, texts)

    def append(self, vids: np.ndarray, cases: Sequence[Case], kinds: dict[str, str]) -> None:
        """Add the rows of newly inserted cases (``vids`` larger than every row's); new columns
        (``kinds`` beyond ours) start as NULL for the rows already here."""
        if len(vids) and len(self.vids) and vids.min() <= self.vids[-1]:
            raise ValueError("appended vids must follow the existing ones")
        for name, kind in kinds.items():
            if name not in self.kinds:
                self.kinds[name] = kind
                if kind == NUMBER:
                    self.numbers[name] = np.full(len(self.vids), np.nan)
                else:
                    self.texts[name] = TextColumn(np.full(len(self.vids), NULL_CODE, np.int32), [])
        metadata = [column_values(case, self.kinds) for case in cases]
        for name in self.kinds:
            values = [_fixed(case, name) if name in ("id", "split") else row[name]
                      for case, row in zip(cases, metadata, strict=True)]
            if name in self.numbers:
                self.numbers[name] = np.concatenate([self.numbers[name], np.array(values, dtype=np.float64)])
            else:
                column = self.texts[name]
                column.codes = np.concatenate([column.codes, column.encode(values)])
        self.vids = np.concatenate([self.vids, vids.astype(np.int64)])
        self.has_report = np.concatenate([self.has_report, np.array([c.text is not None for c in cases], bool)])

    def rows_of(self, vids: np.ndarray) -> np.ndarray:
        """The row of each vid (any shape), -1 for a vid that is not a case here (deleted, or FAISS's -1)."""
        if len(self.vids) == 0:
            return np.full(np.shape(vids), -1, np.int64)
        rows = np.minimum(np.searchsorted(self.vids, vids), len(self.vids) - 1)
        return np.where(self.vids[rows] == vids, rows, -1)

    def remove(self, vids: np.ndarray) -> None:
        """Drop the rows of deleted cases."""
        keep = ~np.isin(self.vids, vids)
        self.vids, self.has_report = self.vids[keep], self.has_report[keep]
        self.numbers = {name: values[keep] for name, values in self.numbers.items()}
        for column in self.texts.values():
            column.codes = column.codes[keep]

    # -- evaluating a filter ---------------------------------------------------------------------
    def allowed(self, expression: Expression) -> np.ndarray:
        """A boolean row mask: True where the filter is true (unknown and false are not allowed)."""
        return self._truth(expression, want=True)

    def _truth(self, expression: Expression, want: bool) -> np.ndarray:
        """Rows where ``expression`` is ``want`` (True or False; unknown is neither)."""
        if isinstance(expression, Not):
            return self._truth(expression.operand, not want)
        if isinstance(expression, Junction):
            parts = [self._truth(operand, want) for operand in expression.operands]
            combine = np.logical_and if (expression.op == "and") == want else np.logical_or
            return functools.reduce(combine, parts)
        if isinstance(expression, IsNull):
            null = self._null(expression.column)
            return null if expression.negated != want else ~null
        holds = self._member(expression) if isinstance(expression, Member) else self._compare(expression)
        if want and not _true_on_null(expression):  # = < <= > >= in: never true on NULL, no mask needed
            return holds
        return (holds if want else ~holds) & ~self._null(expression.column)

    def _null(self, name: str) -> np.ndarray:
        if name in self.numbers:
            return np.isnan(self.numbers[name])
        return self.texts[name].codes == NULL_CODE

    def _member(self, member: Member) -> np.ndarray:
        """``column in (values)`` on the rows that are not NULL (flipped for ``not in``)."""
        if member.column in self.numbers:
            inside = np.isin(self.numbers[member.column], np.asarray(member.values, dtype=np.float64))
        else:
            column = self.texts[member.column]
            codes = [column.lookup[v] for v in member.values if v in column.lookup]
            inside = column.table(codes)[column.codes]
        return ~inside if member.negated else inside

    def _compare(self, compare: Compare) -> np.ndarray:
        """``column op value`` on the rows that are not NULL (NULL rows: anything; masked by the caller)."""
        if compare.column in self.numbers:
            return _NUMBER_OPS[compare.op](self.numbers[compare.column], float(compare.value))
        column, value = self.texts[compare.column], str(compare.value)
        if compare.op in ("=", "!="):
            code = column.lookup.get(value)
            equal = column.codes == code if code is not None else np.zeros(len(column.codes), bool)
            return equal if compare.op == "=" else ~equal
        ordered, rank = column.ranks()
        below = bisect.bisect_left(ordered, value)  # ranks < below hold values < value
        through = bisect.bisect_right(ordered, value)  # ranks < through hold values <= value
        selected = {"<": rank < below, "<=": rank < through, ">": rank >= through, ">=": rank >= below}[compare.op]
        return column.table(np.flatnonzero(selected))[column.codes]

    # -- the file --------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write ``filters.safetensors`` into ``folder`` (a staging folder swapped in afterwards)."""
        from safetensors.numpy import save_file

        tensors: dict[str, np.ndarray] = {"vids": self.vids, "has_report": self.has_report}
        for name, values in self.numbers.items():
            tensors[f"number.{name}"] = values
        for name, column in self.texts.items():
            column.compact()
            encoded = [value.encode("utf-8") for value in column.vocabulary]
            tensors[f"text.{name}.codes"] = column.codes
            tensors[f"text.{name}.bytes"] = np.frombuffer(b"".join(encoded), np.uint8)
            tensors[f"text.{name}.ends"] = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        metadata = {"format": FILTERS_FORMAT, "rows": str(len(self.vids)), "max_vid": str(self.max_vid),
                    "columns": json.dumps(self.kinds, sort_keys=True)}
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / FILTERS_FILE),
                  metadata=metadata)
        give_output_mode(folder / FILTERS_FILE)  # safetensors writes 0600

    @property
    def max_vid(self) -> int:
        return int(self.vids[-1]) if len(self.vids) else 0

    @classmethod
    def load(cls, folder: Path, kinds: dict[str, str], rows: int, max_vid: int) -> FilterColumns | None:
        """The arrays in ``folder``'s file, or None when it is missing or does not match the table
        (``rows`` cases, largest vid ``max_vid``, columns ``kinds``)."""
        file = open_saved(folder)
        if file is None:
            return None
        with file:
            return cls.read(file, folder / FILTERS_FILE, kinds, rows, max_vid)

    @classmethod
    def read(cls, file: BinaryIO, path: Path, kinds: dict[str, str], rows: int, max_vid: int) -> FilterColumns | None:
        """The arrays in ``file`` (``open_saved``'s, read from its start; ``path`` names it), or None when it does
        not match the table."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            file.seek(0)
            data = file.read()
            tensors = load(data)  # the file checked: its header below is what safetensors read
            metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        except (OSError, SafetensorError, ValueError) as err:
            raise DataError(path, f"unreadable filter columns ({str(err)[:200]})") from None
        expected = {"format": FILTERS_FORMAT, "rows": str(rows), "max_vid": str(max_vid),
                    "columns": json.dumps(kinds, sort_keys=True)}
        if metadata != expected:
            log.warning("%s: filter columns do not match the cases table; reading them from it", path)
            return None
        numbers = {n: tensors[f"number.{n}"] for n, k in kinds.items() if k == NUMBER}
        texts = {n: TextColumn(tensors[f"text.{n}.codes"], _decode(tensors[f"text.{n}.bytes"],
                                                                 tensors[f"text.{n}.ends"]))
                 for n, k in kinds.items() if k != NUMBER}
        return cls(kinds, tensors["vids"], tensors["has_report"], numbers, texts)

    @classmethod
    def open(cls, folder: Path, conn: sqlite3.Connection, kinds: dict[str, str],
             file: BinaryIO | None) -> FilterColumns:
        """The arrays of the index in ``folder`` whose table ``conn`` reads: from its file (``file``, opened with
        the table: ``open_saved``) when that matches the table, else read from the table (no file: an index written
        before the file existed)."""
        rows, max_vid = conn.execute("SELECT COUNT(*), COALESCE(MAX(vid), 0) FROM cases").fetchone()
        loaded = None if file is None else cls.read(file, folder / FILTERS_FILE, kinds, rows, max_vid)
        if loaded is not None:
            return loaded
        started = time.perf_counter()
        columns = cls.from_table(conn, kinds)
        log.info("%s: filter columns of %d cases read from the table in %.1f s (saved with the next change)",
                 folder, len(columns), time.perf_counter() - started)
        return columns


def open_saved(folder: Path) -> BinaryIO | None:
    """``folder``'s filter-columns file opened for reading, None when there is none. An index opens it with its
    table and reads it at its first filtered search: by path then, a reader opened before a rebuild swapped
    another folder in read the new build's columns (a rebuild of as many cases matches the old table's count and
    largest vid) and filtered its own cases with another version's metadata; the open file is the version opened."""
    path = folder / FILTERS_FILE
    try:
        return path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as err:
        raise DataError(path, f"unreadable filter columns ({str(err)[:200]})") from None


def _true_on_null(expression: Compare | Member) -> bool:
    """Whether the raw comparison may be true on a NULL row (NaN != x, code -1 != c, not in)."""
    return expression.negated if isinstance(expression, Member) else expression.op == "!="


def _fixed(case: Case, name: str) -> str | None:
    value = case.id if name == "id" else case.split
    return None if value is None else str(value)


def _decode(blob: np.ndarray, ends: np.ndarray) -> list[str]:
    data, stops = blob.tobytes(), ends.tolist()
    return [data[start:stop].decode("utf-8") for start, stop in zip([0, *stops], stops, strict=False)]
