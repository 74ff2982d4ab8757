"""The embedded index: a folder of FAISS vector indexes plus an SQLite table of cases.

Folder layout::

    INDEX/index.json     model fingerprint, embedding size, filter columns, ANN kind + recall@10
    INDEX/index.faiss    image embeddings, FAISS ids = ``cases.vid``
    INDEX/text.faiss     report-text embeddings of the cases that have a report (same ids)
    INDEX/cases.sqlite   table ``cases``: vid, id, split, image_path (relative to the dataset root;
                         NULL for DICOM), image_sha256, report, labels (JSON), meta (JSON) and one typed
                         column ``m_<name>`` per filter column
    INDEX/filters.safetensors  the filter columns as arrays, one row per case (``medvl.index.filter_columns``):
                         what ``--where`` filters are evaluated on; opened with the table, read at the first
                         filtered search (a reader opened before a rebuild keeps its own version's columns)

An IVF-PQ index also keeps, in table ``vectors`` of ``cases.sqlite`` (vid, image, text: float32 bytes), the
full vectors its compressed codes approximate: its neighbours are scored again with them (scores are cosine
similarities), and a filter allowing few cases, or k at or above the index size, is ranked exactly with them.

Atomicity: nothing writes into INDEX in place. A build fills ``.INDEX.build`` (resumable: every
batch is committed to its SQLite with the vectors), an edit works on a copy ``.INDEX.edit``; both
are swapped in by renaming, so a crash leaves the previous index as it was. A lock file
``.INDEX.lock`` keeps writers apart. A reader kept open (a service) reads a version swapped in since when it calls
``follow_rebuild`` between searches (the folder's inode or ``index.json`` changed): all of it at once, never its
table of one version and its vectors of another. Opening checks that each FAISS file holds the vectors of exactly
the table's cases (by count, sum and largest vid) and is the file the table and ``index.json`` recorded at the last
save (its SHA-256, in table ``files`` and each vector set's ``file_sha256``: a rebuild with another model has as many
vectors under the same vids): files of two versions of an index are a ``DataError``.

ANN kind by size (``medvl.index.ann.choose_kind``): exact inner product below ``FLAT_MAX`` vectors, HNSW below
``HNSW_MAX``, IVF-PQ (compressed, for memory) above; the recall@10 of an approximate index
against exact search is measured on a sample at build time and recorded in ``index.json``. HNSW cannot remove vectors:
deleted cases vanish from SQLite at once, their ids are excluded from searches and their vectors
dropped when the graph is rebuilt (once they exceed a fifth of the live ones).

Filtered search (``where``): the filter is evaluated on the filter-column arrays (a few ms for 1M
cases; SQLite took ~130 ms to select the allowed ids). A filter allowing at most
``EXACT_FILTERED_MAX`` cases is answered exactly: the allowed cases' vectors are gathered from the
flat storage (IVF-PQ: the ``vectors`` table) and scored with one product. A broader one on an HNSW
index is applied after the graph search (post-filtering), and a query left with fewer than k allowed
neighbours (or an IVF-PQ index) is searched with a FAISS id selector. An HNSW search (filtered or not)
that ends with fewer than k neighbours while the index holds k (the graph search can stop short of a
large k) is answered exactly instead.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np

from ..errors import DataError, InputError
from ..io import file_sha256, read_json, write_errors_named
from .ann import FLAT, HNSW, IVFPQ, IVFPQ_MIN, KINDS, RECALL_K, choose_kind
from .base import (
    DAMAGED,
    IMAGES,
    INFO_FORMAT,
    LEGACY_FORMAT,
    TEXTS,
    Hit,
    IndexBase,
    IndexDamaged,
    check_info_format,
    check_k,
    check_target,
    check_vectors,
    ids_by_hash,
    in_id_order,
    model_changed,
    note_vector_counts,
)
from .cases import (
    FIXED_COLUMNS,
    NUMBER,
    Case,
    check_unique_ids,
    column_values,
    ids_by_case,
    infer_columns,
    public_image_path,
    quote_column,
)
from .filter_columns import FilterColumns, open_saved
from .where import compile_where, given_filter, parse_where

log = logging.getLogger(__name__)

INDEX_FILES = {IMAGES: "index.faiss", TEXTS: "text.faiss"}
CASES_DB, INFO_FILE = "cases.sqlite", "index.json"
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64
IVF_NPROBE = 16
RECALL_SAMPLE = 200  # queries sampled to measure recall
SQL_CHUNK = 500  # ids per IN (...) list
TOMBSTONES = "tombstones"  # deleted ids still in an HNSW graph
REPORT_VECTORED = "report IS NOT NULL AND report != ''"  # the cases with a report vector: a non-empty report
TOMBSTONES_BEFORE_REBUILD = 1000  # at least this many (and a fifth of the live ids) trigger a rebuild
EF_SEARCH_MAX = 4096
# a filter allowing at most this many cases is searched exactly: the crossover measured at 1M cases
# (benchmarks/retrieval.py --crossover; exact 8.0 vs graph 11.4 ms CPU at 12.8k allowed, 11.7 vs 9.1 at 17.2k)
EXACT_FILTERED_MAX = 15_000
# A broader filter on an HNSW index is applied after the search (post-filtering): the graph returns
# about POSTFILTER_MARGIN x k / (allowed share) nearest cases, the filter columns keep those the filter
# allows; a query left with fewer than k allowed neighbours falls back to a FAISS id selector.
POSTFILTER_MARGIN = 3.0
SINGLE_THREAD_QUERIES = 16  # fewer queries than this are searched on one thread (see faiss_threads)


# ------------------------------------------------------------------ ANN indexes


def build_ann(vectors: np.ndarray, vids: np.ndarray, kind: str, seed: int = 0) -> Any:
    """A FAISS inner-product index of ``kind`` holding ``vectors`` under ids ``vids``."""
    import faiss

    dim = vectors.shape[1]
    if kind == FLAT:
        ann = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == HNSW:
        graph = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        ann = faiss.IndexIDMap2(graph)
    elif kind == IVFPQ:
        ann = _train_ivfpq(vectors, seed)
    else:
        raise InputError(f"unknown index kind {kind!r}; choose auto, {', '.join(KINDS)}")
    if len(vectors):
        ann.add_with_ids(vectors, vids.astype(np.int64))
    return ann


@contextmanager
def faiss_threads(count: int) -> Iterator[None]:
    """Run FAISS with ``count`` OpenMP threads (at most the default) inside the block.

    A single query is faster on one thread: OpenMP start-up and waiting for a core busy with other
    work cost more than the search (36 ms vs 0.16 ms for 20k exact vectors on two shared cores)."""
    import faiss

    default = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, min(count, default)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(default)


def _train_ivfpq(vectors: np.ndarray, seed: int) -> Any:
    import faiss

    n, dim = vectors.shape
    if n < IVFPQ_MIN:
        raise InputError(f"an IVF-PQ index needs at least {IVFPQ_MIN} vectors, got {n}; use kind 'flat'")
    nlist = int(max(1, min(4 * math.sqrt(n), n // 39)))
    # two dimensions per sub-quantizer (four cost half the bytes but lost a third of recall@10 on
    # clustered 128-d vectors: 0.45 vs 0.72 at 100k); at most 128 bytes per vector
    subquantizers = max(m for m in range(1, 129) if dim % m == 0 and dim // m >= 2) if dim >= 2 else 1
    nbits = 8 if n >= 256 * 39 else 4
    ann = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, subquantizers, nbits, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = vectors[rng.choice(n, size=200_000, replace=False)] if n > 200_000 else vectors
    ann.cp.seed = ann.pq.cp.seed = seed
    if n < 256 * 39:  # a small collection: fewer points per centroid than k-means likes, knowingly
        ann.cp.min_points_per_centroid = ann.pq.cp.min_points_per_centroid = 1
    with faiss_threads(1 if len(sample) < 50_000 else 64):  # small k-means: OpenMP overhead dominates
        ann.train(np.ascontiguousarray(sample))
    ann.nprobe = min(IVF_NPROBE, nlist)
    return ann


def search_params(ann: Any, kind: str, selector: Any = None, fraction: float = 1.0) -> Any:
    """Per-query parameters; a restrictive filter widens the HNSW beam / IVF probes."""
    import faiss

    widen = 1.0 / max(fraction, 1e-6)
    if kind == HNSW:
        ef = int(min(EF_SEARCH_MAX, HNSW_EF_SEARCH * widen))
        if selector:
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)  # type: ignore[attr-defined]  # SWIG class missing from the faiss stubs
        return faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]  # SWIG class missing from the faiss stubs
    if kind == IVFPQ:
        nprobe = int(min(ann.nlist, ann.nprobe * widen))
        if selector:
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)  # type: ignore[call-arg]  # faiss (SWIG) takes the fields as keywords; its stubs do not say so
        return faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]  # faiss (SWIG) takes the fields as keywords; its stubs do not say so
    return faiss.SearchParameters(sel=selector) if selector else None  # type: ignore[call-arg]  # faiss (SWIG) takes the fields as keywords; its stubs do not say so


def measure_recall(ann: Any, kind: str, vectors: np.ndarray, vids: np.ndarray, seed: int = 0) -> float:
    """Recall@10 of ``ann`` against exact inner-product search, on up to 200 sampled queries."""
    import faiss

    if kind == FLAT or len(vectors) == 0:
        return 1.0
    k = min(RECALL_K, len(vectors))
    rng = np.random.default_rng(seed)
    queries = vectors[rng.choice(len(vectors), size=min(RECALL_SAMPLE, len(vectors)), replace=False)]
    _, exact = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = ann.search(queries, k, params=search_params(ann, kind))
    hits = [len(set(vids[row].tolist()) & set(got.tolist())) for row, got in zip(exact, found, strict=True)]
    return float(np.sum(hits) / (k * len(queries)))


def describe_ann(kind: str, n: int, recall: float, ann: Any = None) -> dict[str, Any]:
    """The index info's block for a vector set: kind, size, recall@10 and the settings searches use (IVF-PQ's are
    read from ``ann``, which they depend on the size of)."""
    described: dict[str, Any] = {"kind": kind, "n": n, "recall_at_10": recall}
    if kind == HNSW:
        described.update(M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH)
    elif kind == IVFPQ:
        described.update(ivfpq_settings(ann))
    return described


def ivfpq_settings(ann: Any) -> dict[str, int]:
    """What an IVF-PQ index searches with: its inverted lists (``nlist``, fewer on a small collection: see
    ``_train_ivfpq``), the lists a query probes (``nprobe``: ``IVF_NPROBE``, every list when there are fewer) and
    its codes' bits per sub-quantizer (``nbits``: 8 from 9,984 vectors, 4 below) and bytes per vector
    (``code_bytes``). Empty for an index that is not IVF."""
    import faiss

    inner = faiss.try_extract_index_ivf(ann)
    if inner is None:
        return {}
    ivf: Any = faiss.downcast_index(inner)  # the IVF-PQ class; lives in ann, which the caller holds
    bits = int(ivf.pq.nbits) if hasattr(ivf, "pq") else 0
    return {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe), "nbits": bits, "code_bytes": int(ivf.code_size)}


def ann_ids(ann: Any) -> np.ndarray:
    """The ids of the vectors an index holds (flat and HNSW: their id map; IVF-PQ: its inverted lists)."""
    import faiss

    if hasattr(ann, "id_map"):
        return faiss.vector_to_array(ann.id_map)
    lists: Any = faiss.extract_index_ivf(ann).invlists  # the stubs allow None: an IVF index always has lists
    chunks = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(lists.nlist)
              if lists.list_size(i)]
    return np.concatenate(chunks) if chunks else np.empty(0, np.int64)


def stored_vectors(ann: Any) -> np.ndarray | None:
    """A read-only view (no copy) of the vectors of a flat or HNSW index in storage order (the order
    of its ``id_map``), or None for an index without flat storage (IVF-PQ). Valid until it changes."""
    import faiss

    if not hasattr(ann, "id_map"):
        return None
    inner = faiss.downcast_index(ann.index)
    storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    if not isinstance(storage, faiss.IndexFlat):
        return None
    if storage.ntotal == 0:
        return np.empty((0, storage.d), np.float32)
    view = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(storage.ntotal, storage.d)
    view.flags.writeable = False
    return view


# ------------------------------------------------------------------ the SQLite table of cases

_SCHEMA = """
CREATE TABLE cases (
    vid INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; never reused
    id TEXT NOT NULL UNIQUE,
    split TEXT,
    image_path TEXT,  -- relative to the dataset root; NULL for DICOM, arrays, files outside the root
    image_sha256 TEXT,  -- sha256 of the decoded pixels, for duplicate detection
    report TEXT,
    labels TEXT NOT NULL,  -- JSON object
    meta TEXT NOT NULL  -- JSON object
);
CREATE INDEX cases_image_sha256 ON cases (image_sha256);
"""
_BUILD_TABLES = """
CREATE TABLE pending (vid INTEGER PRIMARY KEY, image BLOB NOT NULL, text BLOB);  -- vectors of a build
CREATE TABLE build (key TEXT NOT NULL);
"""
# an IVF-PQ index keeps its build's ``pending`` table under this name: the full vectors (float32 bytes) its
# compressed codes approximate, read only to rank a few cases (or every case) exactly
VECTORS = "vectors"
MIXED = "its files are of different versions of the index; rebuild it (medvl index build)"
# what each FAISS file held when the index was saved: its SHA-256, also in index.json (``file_sha256`` of each vector
# set), so that a FAISS file of another build (another model: as many vectors under the same vids) is refused
_FILES_SCHEMA = "CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL)"


def record_file_digests(conn: sqlite3.Connection, folder: Path, info: dict[str, Any], targets: Iterable[str]) -> None:
    """Record the SHA-256 of each of ``targets``' FAISS files in ``folder`` in table ``files`` (in the caller's
    transaction) and in ``info``."""
    conn.execute(_FILES_SCHEMA)
    for target in targets:
        digest = file_sha256(folder / INDEX_FILES[target])
        info[target]["file_sha256"] = digest
        conn.execute("INSERT OR REPLACE INTO files (name, sha256) VALUES (?, ?)", (INDEX_FILES[target], digest))


def add_db_columns(conn: sqlite3.Connection, columns: dict[str, str]) -> None:
    for name, kind in columns.items():
        conn.execute(f"ALTER TABLE cases ADD COLUMN {quote_column(name)} {'REAL' if kind == NUMBER else 'TEXT'}")
        conn.execute(f'CREATE INDEX "cases_m_{name}" ON cases ({quote_column(name)})')


def insert_cases(conn: sqlite3.Connection, cases: Sequence[Case], columns: dict[str, str]) -> np.ndarray:
    """Insert cases (in the caller's transaction); returns their new vids."""
    names = list(columns)
    fields = ["id", "split", "image_path", "image_sha256", "report", "labels", "meta"]
    sql = (f"INSERT INTO cases ({', '.join(fields + [quote_column(n) for n in names])}) "
           f"VALUES ({', '.join('?' * (len(fields) + len(names)))}) RETURNING vid")
    vids = []
    for case in cases:
        typed = column_values(case, columns)
        row = (case.id, case.split, case.image_path, case.image_sha256, case.text,
               json.dumps(case.labels), json.dumps(case.meta), *(typed[n] for n in names))
        try:
            vids.append(conn.execute(sql, row).fetchone()[0])
        except sqlite3.IntegrityError:
            raise InputError(f"case {case.id!r} is already in the index; delete it first") from None
    return np.asarray(vids, dtype=np.int64)


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), SQL_CHUNK):
        yield values[start:start + SQL_CHUNK]


def _select_in(conn: sqlite3.Connection, fields: str, column: str, values: Sequence[Any],
               extra: str = "", extra_params: Sequence[Any] = ()) -> list[tuple]:
    rows: list[tuple] = []
    for chunk in _chunks(list(values)):
        marks = ", ".join("?" * len(chunk))
        rows += conn.execute(f"SELECT {fields} FROM cases WHERE {column} IN ({marks}){extra}",
                             [*chunk, *extra_params]).fetchall()
    return rows


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute("PRAGMA secure_delete = ON")  # deleted cases' reports and metadata are overwritten with zeros
    return conn


_NOT_UTF8 = re.compile(r"Could not decode to UTF-8 column '([^']*)'")  # sqlite3's message; the cell's text follows


def unreadable_cases(db: Path, error: sqlite3.Error | UnicodeDecodeError | str) -> IndexDamaged:
    """The error for a cases table SQLite cannot read (``error``: its exception, or a reason): names the file and,
    for a cell that is not UTF-8 text, its column only; SQLite's message quotes the cell (a report, labels, an id).
    A ``UnicodeDecodeError``: SQLite's own message, quoting a damaged part of the file, was not UTF-8."""
    reason = error
    if isinstance(error, UnicodeDecodeError):
        reason = "a damaged file: SQLite's message about it is not UTF-8 text"
    elif isinstance(error, sqlite3.Error):
        not_utf8 = _NOT_UTF8.match(str(error))
        reason = (f"a cell of column {not_utf8.group(1)!r} is not UTF-8 text" if not_utf8
                  else " ".join(str(error).split())[:200])
    return IndexDamaged(db, f"cannot read the cases table ({reason}): {DAMAGED}")


def _cell_object(db: Path, cell: Any, column: str) -> dict[str, Any]:
    """The JSON object a ``labels`` or ``meta`` cell holds; ``IndexDamaged`` naming the column for anything else."""
    try:
        value = json.loads(cell)
    except (TypeError, ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise unreadable_cases(db, f"a cell of column {column!r} is not a JSON object")
    return value


def _check_text_cells(db: Path, **cells: Any) -> None:
    """``IndexDamaged`` naming the first of ``cells`` (column -> cell) that is neither text nor NULL (SQLite keeps a
    blob or a number in a TEXT column: a hit goes out as JSON)."""
    column = next((name for name, cell in cells.items() if cell is not None and not isinstance(cell, str)), None)
    if column is not None:
        raise unreadable_cases(db, f"a cell of column {column!r} is not text")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reads_cases(method: Callable[Concatenate[FaissIndex, _P], _R]) -> Callable[Concatenate[FaissIndex, _P], _R]:
    """``method`` with SQLite's failure to read the cases table (``sqlite3.DatabaseError``: a damaged file, a cell
    that is not UTF-8, a missing column) turned into ``IndexDamaged`` (``unreadable_cases``), which the index keeps
    in ``damaged`` (``/v1/health``). Write failures are ``write_errors_named``'s: a ``WriteError`` passes through."""
    @functools.wraps(method)
    def reading(index: FaissIndex, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(index, *args, **kwargs)
        except IndexDamaged as error:
            index.damaged = error.problem
            raise
        except (sqlite3.DatabaseError, UnicodeDecodeError) as error:
            damaged = unreadable_cases(index.path / CASES_DB, error)
            index.damaged = damaged.problem
            raise damaged from None

    return reading


# ------------------------------------------------------------------ folders: lock, swap, recover


class _Lock:
    """An exclusive advisory lock on ``.NAME.lock`` beside the index (released if the process dies)."""

    def __init__(self, target: Path, wait: bool = False):
        self.path = target.parent / f".{target.name}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")  # noqa: SIM115 - held for the lock's lifetime
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self.handle.close()
            raise InputError(f"{target}: another process is writing this index ({self.path})") from None

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def _sibling(target: Path, role: str) -> Path:
    return target.parent / f".{target.name}.{role}"


def swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` by the fully written ``staging`` folder (two renames, under the lock)."""
    for path in [*staging.iterdir(), staging]:  # on disk before the rename makes them current
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    old = _sibling(target, "old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def recover(target: Path) -> None:
    """Put back the previous index if a writer died between the two renames of ``swap_in``."""
    old = _sibling(target, "old")
    if target.exists() or not old.exists():
        return
    lock = _Lock(target, wait=True)
    try:
        if not target.exists() and (old / INFO_FILE).exists():
            log.warning("%s: restoring the previous index left by an interrupted write", target)
            old.rename(target)
    finally:
        lock.release()


def check_replaceable(target: Path) -> None:
    """Refuse to replace a folder that is not an index (a typo must not delete a dataset)."""
    if target.exists() and not (target / INFO_FILE).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"{target}: exists and is not a medvl index; refusing to replace it")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def folder_version(path: Path) -> tuple[int, ...] | None:
    """What tells one version of an index folder from the next (every writer swaps a new folder in: ``swap_in``):
    the folder's inode and change time, and its ``index.json``'s inode, time and size (the inode of a version removed
    by the swap may be given to the next one); None when the folder or its ``index.json`` is missing."""
    try:
        folder, info = path.stat(), (path / INFO_FILE).stat()
    except OSError:
        return None
    return folder.st_ino, folder.st_ctime_ns, info.st_ino, info.st_mtime_ns, info.st_size


def read_info(path: Path) -> dict[str, Any]:
    if not (path / INFO_FILE).is_file():
        raise DataError(path, f"not a medvl index (no {INFO_FILE})")
    try:
        info = read_json(path / INFO_FILE)
    except (OSError, ValueError) as err:
        raise DataError(path / INFO_FILE, f"unreadable ({err})") from None
    if not isinstance(info, dict):
        raise DataError(path / INFO_FILE, f"not a JSON object (got a {type(info).__name__})")
    if info.get("format") not in (LEGACY_FORMAT, INFO_FORMAT) or info.get("backend") != "faiss":
        raise DataError(path / INFO_FILE, f"not a FAISS index of format {INFO_FORMAT}")
    return info


# ------------------------------------------------------------------ build (resumable)


class FaissBuilder:
    """Fills ``.OUT.build`` batch by batch (each batch one SQLite commit: the checkpoint), then
    builds the ANN indexes and swaps the folder in. A rerun with the same key resumes."""

    def __init__(self, out: Path, key: str, columns: dict[str, str]):
        check_replaceable(out)
        self.out, self.columns = out, columns
        self.lock = _Lock(out)
        try:
            with write_errors_named(out):
                self._open(key, columns)
        except BaseException:
            if hasattr(self, "conn"):  # a full disk while creating the tables: the database is open
                self.conn.close()
            self.lock.release()
            raise

    def _open(self, key: str, columns: dict[str, str]) -> None:
        self.staging = _sibling(self.out, "build")
        db = self.staging / CASES_DB
        if self.staging.exists() and self._key(db) != key:
            log.info("%s: discarding an unfinished build of other data or settings", self.staging)
            shutil.rmtree(self.staging)
        fresh = not self.staging.exists()
        self.staging.mkdir(parents=True, exist_ok=True)
        self.conn = _connect(db, readonly=False)
        if fresh:
            with self.conn:
                self.conn.executescript(_SCHEMA + _BUILD_TABLES)
                add_db_columns(self.conn, columns)
                self.conn.execute("INSERT INTO build (key) VALUES (?)", (key,))

    @staticmethod
    def _key(db: Path) -> str | None:
        try:
            conn = _connect(db, readonly=True)
            try:
                return conn.execute("SELECT key FROM build").fetchone()[0]
            finally:
                conn.close()
        except (sqlite3.Error, TypeError):
            return None

    def done_ids(self) -> set[str]:
        return {row[0] for row in self.conn.execute("SELECT id FROM cases")}

    def known_images(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT image_sha256, id FROM cases WHERE image_sha256 IS NOT NULL"))

    def append(self, cases: Sequence[Case], vectors: np.ndarray, text_vectors: np.ndarray | None) -> None:
        # one transaction: rows and vectors land together or not at all (a full disk: a WriteError naming the index)
        with write_errors_named(self.out), self.conn:
            vids = insert_cases(self.conn, cases, self.columns)
            for i, (vid, case) in enumerate(zip(vids.tolist(), cases, strict=True)):
                text = text_vectors[i].astype(np.float32).tobytes() if case.text and text_vectors is not None else None
                self.conn.execute("INSERT INTO pending (vid, image, text) VALUES (?, ?, ?)",
                                  (vid, vectors[i].astype(np.float32).tobytes(), text))

    def finish(self, info: dict[str, Any], kind: str = "auto") -> dict[str, Any]:
        """Build the ANN indexes, write index.json and swap the folder in; returns the info. A failed write
        (full disk) is a ``WriteError`` naming the index; the staging folder is kept for a rerun."""
        with write_errors_named(self.out):
            return self._finish(info, kind)

    def _finish(self, info: dict[str, Any], kind: str) -> dict[str, Any]:
        import faiss

        dim = info["embed_dim"]
        rows = self.conn.execute("SELECT vid, image, text FROM pending ORDER BY vid").fetchall()
        if not rows:
            raise DataError(None, "no cases to index")
        vids = np.asarray([r[0] for r in rows], dtype=np.int64)
        sets = {IMAGES: (vids, np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(-1, dim))}
        with_text = [r for r in rows if r[2] is not None]
        if with_text:
            sets[TEXTS] = (np.asarray([r[0] for r in with_text], dtype=np.int64),
                           np.frombuffer(b"".join(r[2] for r in with_text), np.float32).reshape(-1, dim))
        for target, (ids, vectors) in sets.items():
            chosen = choose_kind(len(ids)) if kind == "auto" else kind
            started = time.perf_counter()
            ann = build_ann(np.ascontiguousarray(vectors), ids, chosen)
            recall = measure_recall(ann, chosen, vectors, ids)
            faiss.write_index(ann, str(self.staging / INDEX_FILES[target]))
            info[target] = {**describe_ann(chosen, len(ids), recall, ann),
                            "build_seconds": round(time.perf_counter() - started, 3)}
            log.info("%s: %s index of %d vectors, recall@10 %.3f", target, chosen, len(ids), recall)
        FilterColumns.from_table(self.conn, {**FIXED_COLUMNS, **self.columns}).save(self.staging)
        kept = any(info[target]["kind"] == IVFPQ for target in sets)  # its codes are approximations: keep vectors
        with self.conn:
            record_file_digests(self.conn, self.staging, info, sets)
            self.conn.execute(f"ALTER TABLE pending RENAME TO {VECTORS}" if kept else "DROP TABLE pending")
            self.conn.execute("DROP TABLE build")
        self.conn.execute("VACUUM")
        self.conn.close()
        info.update(columns=self.columns, n_cases=len(rows))
        (self.staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        swap_in(self.staging, self.out)
        self.lock.release()
        return info

    def close(self) -> None:
        self.conn.close()
        self.lock.release()


# ------------------------------------------------------------------ the index


class FaissIndex(IndexBase):
    """An opened FAISS index folder (see the module doc). Writable indexes stage changes in a
    copy until ``save()``."""

    def __init__(self, path: Path, writable: bool, lock: _Lock | None = None):
        import faiss

        self.path, self.writable, self.lock = path, writable, lock
        self.location = str(path)
        # before anything is read: a version swapped in meanwhile is then seen as new by ``follow_rebuild``
        self.version = folder_version(path)
        self.damaged: str | None = None  # why the cases table cannot be read, once a read found it damaged
        self.info = check_info_format(read_info(path), self.location, writable, str(path / INFO_FILE))
        self.opened_info = self.info  # the info the model was checked against (check_model) when it was opened
        try:
            self.conn = _connect(path / CASES_DB, readonly=True)
            self.conn.execute("SELECT COUNT(*) FROM cases").fetchone()
        except (sqlite3.Error, UnicodeDecodeError) as err:
            raise unreadable_cases(path / CASES_DB, err) from None
        try:  # opened now, read at the first filtered search: the version of the table above, after any rebuild
            self._filters_file = open_saved(path)
        except BaseException:
            self.conn.close()
            raise
        unnamed = next((f for t, f in INDEX_FILES.items() if t not in self.info and (path / f).exists()), None)
        if unnamed is not None:  # its vectors would never be searched
            self._close_files()
            raise DataError(path / INFO_FILE, f"does not describe {unnamed}, which the folder holds ({DAMAGED})")
        try:
            self.anns = {t: faiss.read_index(str(path / f)) for t, f in INDEX_FILES.items()
                         if t in self.info}
        except RuntimeError as err:
            self._close_files()
            raise DataError(path, f"cannot read the FAISS index ({str(err).splitlines()[0][:200]})") from None
        try:
            self._check_vectors_match_cases()
            self._check_file_digests()
        except BaseException:
            self._close_files()
            raise
        for target, ann in self.anns.items():  # from the file: an earlier medvl recorded nprobe 16 whatever it used
            if self.info[target]["kind"] == IVFPQ:
                self.info[target].update(ivfpq_settings(ann))
        self.workdir: Path | None = None  # the copy being edited, once there is a change
        self._filters: FilterColumns | None = None  # read at the first filtered search or change
        self._filters_lock = threading.Lock()
        self._positions: dict[str, np.ndarray] = {}  # target -> storage position of each filter row, -1: none
        self.filtered_paths: Counter[str] = Counter()  # how filtered searches were answered (for benchmarks)

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> FaissIndex:
        path = Path(path)
        recover(path)
        if not path.exists():
            raise DataError(path, "index not found")
        if writable:  # the lock first: nothing can change underneath
            lock = _Lock(path)
            try:
                return cls(path, writable=True, lock=lock)
            except BaseException:
                lock.release()
                raise
        for _ in range(3):  # a writer may swap the folder while we read it: read again if so
            before = _inode(path)
            try:
                index = cls(path, writable=False)
            except (DataError, sqlite3.Error):
                if _inode(path) == before:
                    raise
                continue
            if _inode(path) == before:
                return index
            index.close()
        raise DataError(path, "index keeps changing while being opened; try again")

    def follow_rebuild(self) -> None:
        """Read the folder again when a writer swapped in a new version since it was read (``medvl index add``,
        ``delete``, ``build`` over it), as ``PgVectorIndex.follow_rebuild`` follows a rebuilt table: a long-lived
        reader (a running service) then searches, counts and filters the new version's vectors, cases and filter
        columns, never those of cases deleted since. The new version is opened and checked whole before it replaces
        the one held, which is closed: call this between searches, on the thread that searches, so that one answer
        reads one version. A version built with another model than the one this index was opened with is an
        ``IndexRebuilt`` error, one that cannot be read (removed, damaged, files of two versions) a ``DataError``;
        the index then keeps the version it held, and the next call tries again. A writable index holds the lock
        every writer takes: nothing swaps it."""
        if self.writable or folder_version(self.path) == self.version:
            return
        current = type(self).open(self.path)
        try:
            model_changed(self.opened_info, current.info, self.path.name)  # the folder's name: a service shows it
        except BaseException:
            current.close()
            raise
        held = (self.conn, self._filters_file)
        self.version, self.info, self.conn, self.anns = current.version, current.info, current.conn, current.anns
        self._filters_file, self._filters, self._positions, self.damaged = current._filters_file, None, {}, None
        held[0].close()
        if held[1] is not None:
            held[1].close()


    @_reads_cases
    def __len__(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]

    @_reads_cases
    def _check_vectors_match_cases(self) -> None:
        """DataError unless each FAISS file holds the vectors of exactly the table's cases (those with a report for
        ``text.faiss``; plus the deleted ones an HNSW graph still holds), compared by count, sum and largest vid.
        Files of two versions of an index (a partial restore, a copy of a folder being swapped) would put other
        vectors under this index's cases and drop the rest from every search without a word."""
        for target, ann in self.anns.items():
            query = f"SELECT COUNT(*), TOTAL(vid), MAX(vid) FROM cases{self._vectored(target)}"
            live = self.conn.execute(query).fetchone()
            dead = self._tombstones(target)
            ids = ann_ids(ann)
            largest = max(-1 if live[2] is None else live[2], int(dead.max()) if len(dead) else -1)
            expected = (live[0] + len(dead), float(live[1]) + float(dead.sum()), largest)
            held = (len(ids), float(ids.sum()), int(ids.max()) if len(ids) else -1)
            if held == expected:
                continue
            cases = f"{expected[0]} cases" + ("" if target == IMAGES else " with a report")
            mismatch = (f"holds {held[0]} vectors but {CASES_DB} {cases}" if held[0] != expected[0]
                        else f"holds the vectors of other cases than the {cases} of {CASES_DB}")
            raise DataError(self.path, f"{INDEX_FILES[target]} {mismatch}: {MIXED}")

    @_reads_cases
    def _check_file_digests(self) -> None:
        """DataError unless each FAISS file is the one ``cases.sqlite`` and ``index.json`` recorded at the last save
        (its SHA-256): the vectors of another build (another model, other images) under the same vids pass the
        count, sum and largest-vid check. An index saved before digests were recorded (neither holds one) is not
        checked."""
        has_table = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'files'").fetchone()
        in_table = dict(self.conn.execute("SELECT name, sha256 FROM files").fetchall()) if has_table else {}
        for target in self.anns:
            name = INDEX_FILES[target]
            recorded = {in_table.get(name), self.info[target].get("file_sha256")}
            if recorded == {None}:
                continue
            if len(recorded) > 1:
                raise DataError(self.path, f"{CASES_DB} and {INFO_FILE} record different versions of {name}: {MIXED}")
            if file_sha256(self.path / name) not in recorded:
                raise DataError(self.path, f"{name} is not the file {CASES_DB} and {INFO_FILE} were saved with (its "
                                           f"SHA-256 differs): {MIXED}")

    @_reads_cases
    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return {row[0] for row in _select_in(self.conn, "id", "id", ids)}

    @_reads_cases
    def stored_contents(self, ids: Sequence[str]) -> dict[str, tuple[str | None, str | None, str, str, str | None]]:
        db = self.path / CASES_DB
        rows = _select_in(self.conn, "id, image_sha256, report, labels, meta, split", "id", ids)
        return {row[0]: (row[1], row[2],
                         json.dumps(_cell_object(db, row[3], "labels"), sort_keys=True),
                         json.dumps(_cell_object(db, row[4], "meta"), sort_keys=True), row[5]) for row in rows}

    @_reads_cases
    def find_images(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        return ids_by_hash(_select_in(self.conn, "image_sha256, id", "image_sha256", [h for h in hashes if h]))

    @_reads_cases
    def label_counts(self) -> list[tuple[dict[str, Any], int]]:
        rows = self.conn.execute("SELECT labels, COUNT(*) FROM cases GROUP BY labels").fetchall()
        return [(_cell_object(self.path / CASES_DB, labels, "labels"), count) for labels, count in rows]

    @_reads_cases
    def case_labels(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {row[0]: _cell_object(self.path / CASES_DB, row[1], "labels")
                for row in _select_in(self.conn, "id, labels", "id", ids)}

    @_reads_cases
    def case_ids(self, keys: Collection[str]) -> dict[str, list[str]]:
        if not keys:
            return {}
        rows = self.conn.execute("SELECT id, meta FROM cases")
        return ids_by_case(((image_id, _cell_object(self.path / CASES_DB, meta, "meta")) for image_id, meta in rows),
                           keys)

    # -- changes ---------------------------------------------------------------------------------
    def _edit(self) -> sqlite3.Connection:
        """Start (once) working on a private copy of the folder."""
        if not self.writable:
            raise InputError(f"{self.path}: index opened read-only")
        if self.workdir is None:
            workdir = _sibling(self.path, "edit")
            shutil.rmtree(workdir, ignore_errors=True)
            with write_errors_named(self.path):
                try:
                    shutil.copytree(self.path, workdir)
                except BaseException:  # a full disk: no partial copy left beside the index
                    shutil.rmtree(workdir, ignore_errors=True)
                    raise
            self.workdir = workdir
            self.conn.close()
            self.conn = _connect(self.workdir / CASES_DB, readonly=False)
        return self.conn

    @_reads_cases
    def add(self, cases: Sequence[Case], vectors: np.ndarray, text_vectors: np.ndarray | None = None) -> None:
        vectors = check_vectors(vectors, self.dim, "case")
        if len(vectors) != len(cases):
            raise InputError(f"{len(cases)} cases but {len(vectors)} vectors")
        check_unique_ids(cases, self.location)
        present = self.existing_ids([c.id for c in cases])
        if present:
            raise InputError(f"case {sorted(present)[0]!r} is already in the index; delete it first")
        filters = self.filter_columns()  # before the table changes: the saved arrays match it
        conn = self._edit()
        new_columns = infer_columns(cases, self.info["columns"])
        columns = {**self.info["columns"], **new_columns}
        for case in cases:  # check every value before changing anything
            column_values(case, columns)
        has_text = np.asarray([bool(c.text) for c in cases])
        with write_errors_named(self.path), conn:
            add_db_columns(conn, new_columns)
            self.info["columns"] = columns
            vids = insert_cases(conn, cases, columns)
            if self._keeps_vectors():
                conn.executemany(f"INSERT INTO {VECTORS} (vid, image, text) VALUES (?, ?, ?)", [
                    (int(vid), vectors[i].tobytes(),
                     np.asarray(text_vectors[i], np.float32).tobytes() if has_text[i] and text_vectors is not None
                     else None) for i, vid in enumerate(vids.tolist())])
        filters.append(vids, cases, self.columns)
        self._positions.clear()
        self._ann(IMAGES).add_with_ids(vectors, vids)
        if text_vectors is not None and has_text.any():
            text_vectors = check_vectors(text_vectors, self.dim, "report")
            self._ann(TEXTS).add_with_ids(np.ascontiguousarray(text_vectors[has_text]), vids[has_text])

    def _ann(self, target: str) -> Any:
        if target not in self.anns:  # e.g. the first reports added to an index built without any
            self.anns[target] = build_ann(np.empty((0, self.dim), np.float32), np.empty(0, np.int64), FLAT)
            self.info[target] = describe_ann(FLAT, 0, 1.0)
        return self.anns[target]

    @_reads_cases
    def delete(self, ids: Sequence[str]) -> int:
        filters = self.filter_columns()  # before the table changes: the saved arrays match it
        conn = self._edit()
        rows = _select_in(conn, f"vid, {REPORT_VECTORED}", "id", list(dict.fromkeys(ids)))  # a report vector?
        if not rows:
            return 0
        with write_errors_named(self.path), conn:
            for chunk in _chunks([r[0] for r in rows]):
                conn.execute(f"DELETE FROM cases WHERE vid IN ({', '.join('?' * len(chunk))})", chunk)
                if self._keeps_vectors():
                    conn.execute(f"DELETE FROM {VECTORS} WHERE vid IN ({', '.join('?' * len(chunk))})", chunk)
        filters.remove(np.asarray([r[0] for r in rows], dtype=np.int64))
        self._positions.clear()
        for target, vids in ((IMAGES, [r[0] for r in rows]), (TEXTS, [r[0] for r in rows if r[1]])):
            if target in self.anns and vids:
                with write_errors_named(self.path):
                    self._remove(target, np.asarray(vids, dtype=np.int64))
        return len(rows)

    def _remove(self, target: str, vids: np.ndarray) -> None:
        """Flat and IVF-PQ remove vectors; HNSW cannot, so their ids are listed as tombstones
        (excluded from every search) until they outnumber a fifth of the live vectors and the
        graph is rebuilt without them."""
        import faiss

        if self.info[target]["kind"] != HNSW:
            self.anns[target].remove_ids(faiss.IDSelectorBatch(vids))
            return
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {TOMBSTONES} (vid INTEGER, target TEXT)")
        self.conn.executemany(f"INSERT INTO {TOMBSTONES} VALUES (?, ?)", [(int(v), target) for v in vids])
        if self._dead(target) > max(TOMBSTONES_BEFORE_REBUILD, self._live(target) // 5):
            self._rebuild_hnsw(target)
            self.conn.execute(f"DELETE FROM {TOMBSTONES} WHERE target = ?", (target,))

    def _tombstones(self, target: str) -> np.ndarray:
        exists = self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (TOMBSTONES,)).fetchone()
        rows = self.conn.execute(f"SELECT vid FROM {TOMBSTONES} WHERE target = ?", (target,)) if exists else []
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    def _rebuild_hnsw(self, target: str) -> None:
        live = np.asarray([r[0] for r in self.conn.execute(f"SELECT vid FROM cases{self._vectored(target)}")],
                          dtype=np.int64)
        vectors = self.anns[target].reconstruct_batch(live) if len(live) else np.empty((0, self.dim), np.float32)
        self.anns[target] = build_ann(vectors, live, HNSW)
        self._positions.pop(target, None)

    @_reads_cases
    def save(self) -> None:
        """Make every change since the last save visible at once (folder swap). A failed write (full disk) is a
        ``WriteError`` naming the index, which stays as it was."""
        if self.workdir is not None:
            with write_errors_named(self.path):
                self._save(self.workdir)

    def _save(self, workdir: Path) -> None:
        import faiss

        for target, ann in self.anns.items():
            faiss.write_index(ann, str(workdir / INDEX_FILES[target]))
        self.filter_columns().save(workdir)
        record_file_digests(self.conn, workdir, self.info, self.anns)
        self.conn.commit()
        self.info["n_cases"] = len(self)
        note_vector_counts(self.info, {target: self._live(target) for target in self.anns})
        self.info["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.conn.close()
        (workdir / INFO_FILE).write_text(json.dumps(self.info, indent=2))
        swap_in(workdir, self.path)
        self.workdir = None
        self.conn = _connect(self.path / CASES_DB, readonly=True)
        if self._filters_file is not None:
            self._filters_file.close()
        self._filters_file = open_saved(self.path)

    def _close_files(self) -> None:
        self.conn.close()
        if self._filters_file is not None:
            self._filters_file.close()

    def close(self) -> None:
        self._close_files()
        if self.workdir is not None:  # unsaved changes are dropped
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if self.lock is not None:
            self.lock.release()

    # -- search ----------------------------------------------------------------------------------
    @staticmethod
    def _vectored(target: str) -> str:
        """The cases that have a vector in ``target``'s file: every case, or for reports those with a non-empty
        one (a report vector is added only then; an empty report is stored as '', not NULL)."""
        return f" WHERE {REPORT_VECTORED}" if target == TEXTS else ""

    def _has(self, target: str, joiner: str = " WHERE ") -> str:
        return f"{joiner}report IS NOT NULL" if target == TEXTS else ""

    def _live(self, target: str) -> int:
        return self.conn.execute(f"SELECT COUNT(*) FROM cases{self._vectored(target)}").fetchone()[0]

    def _dead(self, target: str) -> int:
        return self.anns[target].ntotal - self._live(target)

    @_reads_cases
    def filter_columns(self) -> FilterColumns:
        """The filter columns as arrays (read once: from the folder's file as it was opened, or from the table when
        the file is missing or stale), kept in step with every add and delete."""
        with self._filters_lock:
            if self._filters is None:
                self._filters = FilterColumns.open(self.workdir or self.path, self.conn, self.columns,
                                                   self._filters_file)
            return self._filters

    def _allowed(self, where: str, target: str) -> tuple[FilterColumns, np.ndarray]:
        """The filter columns and the mask of their rows (cases) the filter allows among ``target``'s."""
        expression = parse_where(where, self.columns)
        filters = self.filter_columns()
        allowed = filters.allowed(expression)
        return filters, allowed & filters.has_report if target == TEXTS else allowed

    @_reads_cases
    def allowed_vids(self, where: str, target: str = IMAGES) -> np.ndarray:
        """The vids of the cases the filter allows (sorted), from the filter columns."""
        filters, allowed = self._allowed(where, target)
        return filters.vids[allowed]

    @_reads_cases
    def allowed_vids_sql(self, where: str, target: str = IMAGES) -> np.ndarray:
        """The same vids selected by SQLite from the cases table: the reference the filter columns
        are tested against (a scan of the table: slow for large indexes)."""
        compiled = compile_where(where, self.columns, quote_column)
        sql = f"SELECT vid FROM cases WHERE {compiled.sql}{self._has(target, ' AND ')} ORDER BY vid"
        return np.asarray([row[0] for row in self.conn.execute(sql, compiled.params)], dtype=np.int64)

    @_reads_cases
    def search(self, vectors: np.ndarray, k: int = 10, where: str | None = None,
               target: str = IMAGES) -> list[list[Hit]]:
        check_target(target)
        check_k(k)
        vectors = check_vectors(vectors, self.dim)
        if target == TEXTS and TEXTS not in self.info:  # never held a report (built and added without any)
            raise InputError(f"{self.path}: index holds no report texts to search")
        return in_id_order(lambda n: self._nearest(vectors, n, where, target), k)

    def _nearest(self, vectors: np.ndarray, k: int, where: str | None, target: str) -> list[list[Hit]]:
        """The ``k`` nearest cases of each (checked) query vector, in the order the ANN ranks them."""
        import faiss

        if target not in self.anns or self.anns[target].ntotal == 0:  # every case deleted: no hits, as on pgvector
            return [[] for _ in vectors]
        ann, kind = self.anns[target], self.info[target]["kind"]
        selectors: list[Any] = []  # kept alive here while FAISS holds pointers to them
        fraction = 1.0
        where = given_filter(where)  # blank: no filter
        if where:
            filters, allowed = self._allowed(where, target)
            count = int(np.count_nonzero(allowed))
            if count == 0:
                return [[] for _ in vectors]
            if kind == HNSW and count > EXACT_FILTERED_MAX:
                found_hits = self._postfiltered(ann, filters, allowed, vectors, k, count / ann.ntotal)
                if found_hits is not None:
                    self.filtered_paths["post-filtered"] += 1
                    return found_hits
            rows = np.flatnonzero(allowed)
            if count <= EXACT_FILTERED_MAX and (kind != IVFPQ or self._keeps_vectors()):
                self.filtered_paths["exact"] += 1
                return self._exact_among(ann, target, filters, rows, vectors, k)
            self.filtered_paths["selector"] += 1
            selectors.append(faiss.IDSelectorBatch(filters.vids[rows]))
            fraction = count / ann.ntotal
        else:
            dead = self._tombstones(target)
            count = ann.ntotal - len(dead)
            every_case = k >= count  # asked for all: an approximate search would miss some
            if every_case and (kind == HNSW or kind == IVFPQ and self._keeps_vectors()):  # rank them all exactly
                filters = self.filter_columns()
                return self._exact_among(ann, target, filters, self._live_rows(filters, target), vectors, k)
            if len(dead):
                selectors += [faiss.IDSelectorBatch(dead)]
                selectors.append(faiss.IDSelectorNot(selectors[0]))
                fraction = 1 - len(dead) / ann.ntotal
            if every_case and kind == IVFPQ:
                fraction = 0.0  # probe every list (an IVF-PQ index built before it kept its vectors)
        params = search_params(ann, kind, selectors[-1] if selectors else None, fraction)
        with faiss_threads(1 if len(vectors) < SINGLE_THREAD_QUERIES else 64):
            scores, found = ann.search(vectors, min(k, ann.ntotal), params=params)
        if kind == HNSW and (np.count_nonzero(found >= 0, axis=1) < min(k, count)).any():
            # the graph search ended before k cases (FAISS pads a short row with -1, whatever ef_search): rank
            # exactly, so k cases come back whenever the index (or the filter) holds k
            filters = self.filter_columns()
            rows = np.flatnonzero(allowed) if where else self._live_rows(filters, target)
            return self._exact_among(ann, target, filters, rows, vectors, k)
        if kind == IVFPQ and self._keeps_vectors():
            scores, found = self._rescored(target, vectors, found)
        cases = self._hits(found)  # ids missing here were deleted: skipped
        return [[_scored(cases[v], s) for v, s in zip(row, row_scores, strict=True) if v in cases]
                for row, row_scores in zip(found.tolist(), scores.tolist(), strict=True)]

    def _rescored(self, target: str, vectors: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ's neighbours scored again with their kept vectors and put in that order: the scores are then
        cosine similarities, not the compressed codes' approximations of them (rows padded with -1, as FAISS's).
        Scored by FAISS's per-vector kernel, as the exact path scores (``_exact_among``): a matrix product's last
        bit depended on how many neighbours were scored, so one case's score moved with k and equal scores
        stopped being equal."""
        import faiss

        scores, ranked = np.full(found.shape, -np.inf, np.float32), np.full(found.shape, -1, np.int64)
        for query, (vector, row) in enumerate(zip(vectors, found, strict=True)):
            vids, matrix = self._kept_vectors(target, row[row >= 0])
            if not len(vids):
                continue
            with faiss_threads(1):
                exact, order = faiss.knn(vector[None], matrix, len(vids), metric=faiss.METRIC_INNER_PRODUCT)
            scores[query, :len(vids)], ranked[query, :len(vids)] = exact[0], vids[order[0]]
        return scores, ranked

    @staticmethod
    def _live_rows(filters: FilterColumns, target: str) -> np.ndarray:
        """The filter rows (live cases) that have a vector in ``target``: every case, or those with a report."""
        return np.flatnonzero(filters.has_report) if target == TEXTS else np.arange(len(filters))

    def _postfiltered(self, ann: Any, filters: FilterColumns, allowed: np.ndarray, vectors: np.ndarray, k: int,
                      share: float) -> list[list[Hit]] | None:
        """Search the graph for ~margin x k / share neighbours, keep those the filter allows; None when
        a query is left with fewer than k (the caller then searches with an id selector)."""
        import faiss

        wanted = min(ann.ntotal, int(np.ceil(POSTFILTER_MARGIN * k / share)) + k)
        if wanted > EF_SEARCH_MAX:
            return None
        params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, wanted))  # type: ignore[attr-defined]  # SWIG class missing from the faiss stubs
        with faiss_threads(1 if len(vectors) < SINGLE_THREAD_QUERIES else 64):
            scores, found = ann.search(vectors, wanted, params=params)
        rows = filters.rows_of(found)  # -1: FAISS's padding, or a deleted case still in the graph
        keep = rows >= 0
        keep[keep] = allowed[rows[keep]]
        kept = []
        for query_keep, query_found, query_scores in zip(keep, found, scores, strict=True):
            chosen = np.flatnonzero(query_keep)[:k]
            if len(chosen) < k:
                return None
            kept.append(list(zip(query_found[chosen].tolist(), query_scores[chosen].tolist(), strict=True)))
        cases = self._hits(np.asarray([v for row in kept for v, _ in row], dtype=np.int64))
        return [[_scored(cases[v], s) for v, s in row if v in cases] for row in kept]

    def _positions_of(self, target: str, ann: Any, filters: FilterColumns) -> np.ndarray:
        """Where each filter row's vector sits in ``ann``'s storage (-1: the case has none in it)."""
        import faiss

        positions = self._positions.get(target)  # reset by add, delete and a graph rebuild
        if positions is None or len(positions) != len(filters):
            id_map = faiss.vector_to_array(ann.id_map)  # storage position -> vid (ascending, as added)
            positions = np.full(len(filters), -1, np.int64)
            if len(id_map):
                order = np.argsort(id_map, kind="stable")
                slot = order[np.minimum(np.searchsorted(id_map, filters.vids, sorter=order), len(id_map) - 1)]
                positions = np.where(id_map[slot] == filters.vids, slot, -1)
            self._positions[target] = positions
        return positions

    def _exact_among(self, ann: Any, target: str, filters: FilterColumns, rows: np.ndarray, vectors: np.ndarray,
                     k: int) -> list[list[Hit]]:
        """Exact search among the few cases a filter allows (or every case): their vectors gathered
        (``_exact_vectors``), one product (faster than steering a graph around the excluded majority, and exact)."""
        import faiss

        vids, candidates = self._exact_vectors(ann, target, filters, rows)
        if len(vids) == 0:
            return [[] for _ in vectors]
        # FAISS's own kernels on one thread for a few queries: numpy's BLAS starts threads for a
        # product this size, and waiting for a busy core cost ~20 ms (0.3 ms on one thread, 12.8k x 256)
        with faiss_threads(1 if len(vectors) < SINGLE_THREAD_QUERIES else 64):
            scores, top = faiss.knn(vectors, candidates, min(k, len(vids)), metric=faiss.METRIC_INNER_PRODUCT)
        found = vids[top]
        cases = self._hits(found)
        return [[_scored(cases[v], s) for v, s in zip(row, row_scores, strict=True) if v in cases]
                for row, row_scores in zip(found.tolist(), scores.tolist(), strict=True)]

    def _exact_vectors(self, ann: Any, target: str, filters: FilterColumns,
                       rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The vids of the filter rows' cases that have a vector in ``target``, and those vectors as they were
        embedded: from the flat storage (flat, HNSW), or for IVF-PQ, whose codes only approximate them, from
        the ``vectors`` table."""
        if not hasattr(ann, "id_map"):  # a case with an empty report has no report vector
            return self._kept_vectors(target, filters.vids[rows], every=target == IMAGES)
        positions = self._positions_of(target, ann, filters)[rows]
        vids, positions = filters.vids[rows[positions >= 0]], positions[positions >= 0]
        stored = stored_vectors(ann)
        return vids, stored[positions] if stored is not None else ann.reconstruct_batch(vids)

    def _keeps_vectors(self) -> bool:
        """Whether the table keeps the full vectors (an IVF-PQ index, built by this medvl or a later one)."""
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 (VECTORS,)).fetchone() is not None

    def _kept_vectors(self, target: str, vids: np.ndarray, every: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``vids`` that have a ``target`` vector in the ``vectors`` table, and those vectors (in that order).
        ``IndexDamaged`` for a vid without a row there (every case has one), a cell that is not ``dim`` float32
        bytes, or, with ``every`` (vids the ANN holds, or every case for images), a vid without a vector: the case
        would drop out of every search without a word, or the search end in numpy's traceback."""
        column = "image" if target == IMAGES else "text"
        found: dict[int, Any] = {}
        for chunk in _chunks(vids.tolist()):
            found.update(self.conn.execute(f"SELECT vid, {column} FROM {VECTORS} WHERE "
                                           f"vid IN ({', '.join('?' * len(chunk))})", chunk).fetchall())
        db, size = self.path / CASES_DB, self.dim * np.dtype(np.float32).itemsize
        if len(found) < len(set(vids.tolist())):
            missing = len(set(vids.tolist())) - len(found)
            raise unreadable_cases(db, f"table {VECTORS} lacks the row of {missing} case{'s' * (missing > 1)}")
        if any(cell is None for cell in found.values()) and every:
            raise unreadable_cases(db, f"a cell of column {column!r} of table {VECTORS} is empty")
        if any(cell is not None and (not isinstance(cell, bytes) or len(cell) != size) for cell in found.values()):
            raise unreadable_cases(db, f"a cell of column {column!r} of table {VECTORS} is not a vector of "
                                       f"{self.dim} float32")
        kept = [vid for vid in vids.tolist() if found[vid] is not None]
        matrix = np.frombuffer(b"".join(found[vid] for vid in kept), np.float32).reshape(len(kept), self.dim)
        # vectors are stored unit-length: NaN, infinity or (for images, which every case has) all zeros is damage,
        # which would drop the case from every search or rank it with FAISS's placeholder score
        if not np.isfinite(matrix).all() or (target == IMAGES and not np.abs(matrix).sum(axis=1).all()):
            raise unreadable_cases(db, f"a vector of column {column!r} of table {VECTORS} is not finite or is zero")
        return np.asarray(kept, dtype=np.int64), np.ascontiguousarray(matrix)

    def _hits(self, found: np.ndarray) -> dict[int, Hit]:
        """The cases of the vids ``found``, each cell checked (``IndexDamaged`` naming the column of one that is not
        what the table holds)."""
        vids = sorted({int(v) for v in found.ravel() if v >= 0})
        rows = _select_in(self.conn, "vid, id, split, labels, meta, report, image_path, image_sha256", "vid", vids)
        db, hits = self.path / CASES_DB, {}
        for vid, case_id, split, labels, meta, report, image_path, image_sha256 in rows:
            _check_text_cells(db, id=case_id, split=split, report=report, image_path=image_path,
                              image_sha256=image_sha256)
            hits[vid] = Hit(id=case_id, score=0.0, split=split, labels=_cell_object(db, labels, "labels"),
                            meta=_cell_object(db, meta, "meta"), text=report, image_path=public_image_path(image_path),
                            image_sha256=image_sha256)
        return hits


def _scored(hit: Hit, score: float) -> Hit:
    return Hit(id=hit.id, score=float(score), split=hit.split, labels=hit.labels, meta=hit.meta,
               text=hit.text, image_path=hit.image_path, image_sha256=hit.image_sha256)
