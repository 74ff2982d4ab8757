"""The scale path: the same index in PostgreSQL with pgvector (needs the ``[scale]`` extra).

Address: ``postgresql://user:password@host:port/db#table`` (``#table`` defaults to ``medvl_cases``).
One table per index: ``id`` (primary key), split, image_path (relative to the dataset root, NULL
for DICOM: as in the FAISS folder, see ``medvl.index.cases``), image_sha256, report, labels and
meta (json: their keys in the data's order, as FAISS keeps them; jsonb would sort them, and tables made by
an earlier medvl have jsonb), ``image_vec vector(D)``, ``text_vec vector(D)`` (NULL without a report) and one
typed column ``m_<name>`` per filter column; the index info lives in ``medvl_indexes`` (name,
info jsonb, with the filter columns' order kept in ``column_order``). Scores are inner products of normalised
vectors (``<#>``).

Atomicity comes from transactions: a build fills ``<table>__build`` (each batch committed, so a
rerun resumes), then drops the old table and renames the new one in one transaction (a table there that
is not a medvl index is never dropped: the build is refused before it starts; index names
ending in ``__build`` are refused: that name space is the builder's, and it drops only a staging
table that carries its own build marker); ``add`` and ``delete`` stay in one open transaction until
``save()`` commits it. A reader opened before a build's swap follows it: each search reads the info row again
(``follow_rebuild``: the new table's columns; a table rebuilt with another model is ``IndexRebuilt``, since the
model was checked against the info at opening). A session advisory lock keeps
writers of one table apart (released when a writer dies). Below ``FLAT_MAX`` rows search is exact
(no ANN index); above, an HNSW index is built and its recall@10 against exact search measured.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from ..errors import DataError, InputError
from .ann import FLAT, FLAT_MAX, HNSW, RECALL_K
from .base import (
    IMAGES,
    TEXTS,
    Hit,
    IndexBase,
    IndexGone,
    check_info_format,
    check_k,
    check_target,
    check_vectors,
    ids_by_hash,
    in_id_order,
    model_changed,
    note_vector_counts,
    redact,
)
from .cases import (
    NUMBER,
    Case,
    check_unique_ids,
    column_values,
    ids_by_case,
    infer_columns,
    public_image_path,
    quote_column,
)
from .urls import PgUrl, parse_pg_url
from .where import compile_where, given_filter

log = logging.getLogger(__name__)

INFO_TABLE = "medvl_indexes"
PG_KINDS = (FLAT, HNSW)
PG_EF_SEARCH = 100
# HNSW build settings: pgvector's defaults (m 16, ef_construction 64) cap recall@10 near 0.85 on 1M
# clustered 256-d vectors (docs/benchmarks.md); m 32 / ef_construction 128 is FAISS's M32 graph.
PG_HNSW_M, PG_HNSW_EF_CONSTRUCTION = 32, 128
PG_BUILD_MEMORY = "2GB"  # maintenance_work_mem of the build session: the graph is built in memory up to this
RECALL_SAMPLE = 50
STAGING_SUFFIX = "__build"  # <table>__build holds a build of <table> until it is swapped in
_VECTOR_COLUMN = {IMAGES: "image_vec", TEXTS: "text_vec"}
_CASE_FIELDS = "id, split, labels, meta, report, image_path, image_sha256"
# info key listing the filter columns in order (jsonb keeps an object's keys sorted by length, then bytes)
COLUMN_ORDER = "column_order"


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise InputError("a PostgreSQL index needs psycopg: pip install 'medvl[scale]'") from None
    return psycopg


def parse_url(url: str) -> PgUrl:
    """The parts of ``postgresql://...#table`` (``medvl.index.urls``); InputError for a malformed URL or a
    reserved table name, quoting nothing a password could be part of."""
    address = parse_pg_url(url)
    if address.table.endswith(STAGING_SUFFIX):
        raise InputError(f"table name {address.shown_table!r} in the index URL ends in {STAGING_SUFFIX!r}, which is "
                         "reserved: the build of an index is staged under that name")
    return address


def _connect(url: str, autocommit: bool):
    psycopg = _psycopg()
    address = parse_url(url)
    try:
        # prepare_threshold None: no statement is prepared server-side. A prepared statement's cached plan ignores
        # later SET LOCALs, so the exact ranking (``_rows``) ran the HNSW plan of the same SQL, as PostgreSQL's
        # generic plan does after five runs on an analysed table: filtered searches came back short
        conn = psycopg.connect(address.conninfo, autocommit=autocommit, connect_timeout=10, prepare_threshold=None)
    except psycopg.Error as err:
        reason = address.scrub(" ".join(str(err).split()))[:200]  # libpq's message has several lines: one line
        raise DataError(redact(url), f"cannot connect to PostgreSQL ({reason})") from None
    conn.execute(f"SET hnsw.ef_search = {int(PG_EF_SEARCH)}")  # a constant, not input
    return conn


def _lock(conn, table: str, url: str) -> None:
    """A session advisory lock per table: one writer at a time; freed when the session ends."""
    got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"medvl:{table}",)).fetchone()[0]
    conn.commit()
    if not got:
        raise InputError(f"{redact(url)}: another process is writing this index")


def vector_text(vector: np.ndarray) -> str:
    """pgvector's text form, passed as a bound parameter and cast with ``::vector``."""
    return "[" + ",".join(f"{x:.8g}" for x in vector.tolist()) + "]"


def _sql():
    from psycopg import sql

    return sql


def _ensure_schema(conn) -> None:
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.execute(f"CREATE TABLE IF NOT EXISTS {INFO_TABLE} (name text PRIMARY KEY, info jsonb NOT NULL)")


def _create_table(conn, table: str, dim: int, columns: dict[str, str]) -> None:
    sql = _sql()
    conn.execute(sql.SQL(
        "CREATE TABLE {t} (id text PRIMARY KEY, split text, image_path text, image_sha256 text, report text, "
        "labels json NOT NULL, meta json NOT NULL, image_vec vector({d}) NOT NULL, text_vec vector({d}))"
    ).format(t=sql.Identifier(table), d=sql.Literal(int(dim))))
    conn.execute(sql.SQL("CREATE INDEX ON {t} (image_sha256)").format(t=sql.Identifier(table)))
    _add_columns(conn, table, columns)


def _add_columns(conn, table: str, columns: dict[str, str]) -> None:
    sql = _sql()
    for name, kind in columns.items():
        conn.execute(sql.SQL("ALTER TABLE {t} ADD COLUMN {c} {type}").format(
            t=sql.Identifier(table), c=sql.Identifier(f"m_{name}"),
            type=sql.SQL("double precision" if kind == NUMBER else "text")))


def _insert(conn, table: str, cases: Sequence[Case], vectors: np.ndarray, text_vectors: np.ndarray | None,
            columns: dict[str, str]) -> None:
    sql = _sql()
    names = list(columns)
    fields = [sql.Identifier(f) for f in ("id", "split", "image_path", "image_sha256", "report", "labels", "meta",
                                            "image_vec", "text_vec")] + [sql.Identifier(f"m_{n}") for n in names]
    marks = [sql.Placeholder()] * 7 + [sql.SQL("%s::vector")] * 2 + [sql.Placeholder()] * len(names)
    statement = sql.SQL("INSERT INTO {t} ({f}) VALUES ({v})").format(
        t=sql.Identifier(table), f=sql.SQL(", ").join(fields), v=sql.SQL(", ").join(marks))
    rows = []
    for i, case in enumerate(cases):
        typed = column_values(case, columns)
        text = vector_text(text_vectors[i]) if case.text and text_vectors is not None else None
        rows.append((case.id, case.split, case.image_path, case.image_sha256, case.text, json.dumps(case.labels),
                     json.dumps(case.meta), vector_text(vectors[i]), text, *(typed[n] for n in names)))
    with conn.cursor() as cursor:
        cursor.executemany(statement, rows)


def _missing_table(table: str) -> str:
    return (f"the {INFO_TABLE} row names table {table!r}, which does not exist (dropped, or not restored); rebuild "
            f"the index, or delete its row")


def _read_info(conn, name: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT info FROM {INFO_TABLE} WHERE name = %s", (name,)).fetchone()
    if not row:
        return None
    info, order = row[0], None
    if isinstance(info, dict):
        order = info.pop(COLUMN_ORDER, None)
    if isinstance(order, list) and isinstance(info.get("columns"), dict):  # jsonb sorted them: the data's order
        columns = info["columns"]
        info["columns"] = {**{n: columns[n] for n in order if n in columns}, **columns}  # then any not listed
    return info


def _write_info(conn, name: str, info: dict[str, Any]) -> None:
    if isinstance(info.get("columns"), dict):
        info = {**info, COLUMN_ORDER: list(info["columns"])}
    conn.execute(f"INSERT INTO {INFO_TABLE} (name, info) VALUES (%s, %s::jsonb) "
                 "ON CONFLICT (name) DO UPDATE SET info = EXCLUDED.info", (name, json.dumps(info)))


def _table_exists(conn, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{table}"',)).fetchone()[0]


# ------------------------------------------------------------------ build (resumable)


class PgVectorBuilder:
    """Fills ``<table>__build`` batch by batch (one commit each), then swaps it in."""

    def __init__(self, url: str, key: str, columns: dict[str, str], dim: int):
        self.url, self.columns, self.dim = url, columns, dim
        address = parse_url(url)
        self.table, self.shown_table = address.table, address.shown_table
        self.staging = f"{self.table}{STAGING_SUFFIX}"
        self.conn = _connect(url, autocommit=False)
        try:
            _lock(self.conn, self.table, url)
            with self.conn.transaction():
                _ensure_schema(self.conn)
                self._check_replaceable()
                self._stage(key)
            self.conn.commit()
        except BaseException:
            self.conn.close()
            raise

    def _check_replaceable(self) -> None:
        """Refuse to build over a table that is not a medvl index (a typo in ``#table``, another program's
        table): the swap drops the table it replaces. Checked before the build starts, and again at the swap."""
        if not _table_exists(self.conn, self.table):
            return
        info = _read_info(self.conn, self.table)
        if not isinstance(info, dict) or "build_key" in info:
            raise InputError(f"{redact(self.url)}: table {self.shown_table!r} exists and is not a medvl index; "
                             "refusing to replace it")

    def _stage(self, key: str) -> None:
        """Keep the staged build of ``key`` (a rerun resumes it), or start one afresh. A table in the staging
        place is dropped only when it is a build of this index (its info row is a build marker)."""
        state = _read_info(self.conn, self.staging)
        exists = _table_exists(self.conn, self.staging)
        if state is not None and state.get("build_key") == key and exists:
            return
        if exists and (state is None or "build_key" not in state):
            what = "a medvl index" if state is not None else "a table medvl did not create"
            shown = self.shown_table
            raise InputError(f"{redact(self.url)}: table {shown + STAGING_SUFFIX!r}, where a build of {shown!r} is "
                             f"staged, is {what}; rename it (or drop it) before building {shown!r}")
        self.conn.execute(_sql().SQL("DROP TABLE IF EXISTS {t}").format(t=_sql().Identifier(self.staging)))
        _create_table(self.conn, self.staging, self.dim, self.columns)
        _write_info(self.conn, self.staging, {"build_key": key})

    def done_ids(self) -> set[str]:
        sql = _sql()
        return {r[0] for r in self.conn.execute(sql.SQL("SELECT id FROM {t}").format(t=sql.Identifier(self.staging)))}

    def known_images(self) -> dict[str, str]:
        sql = _sql()
        return dict(self.conn.execute(sql.SQL("SELECT image_sha256, id FROM {t} WHERE image_sha256 IS NOT NULL")
                                      .format(t=sql.Identifier(self.staging))).fetchall())

    def append(self, cases: Sequence[Case], vectors: np.ndarray, text_vectors: np.ndarray | None) -> None:
        with self.conn.transaction():
            _insert(self.conn, self.staging, cases, vectors, text_vectors, self.columns)
        self.conn.commit()

    def finish(self, info: dict[str, Any], kind: str = "auto") -> dict[str, Any]:
        sql = _sql()
        staging = sql.Identifier(self.staging)
        n = self.conn.execute(sql.SQL("SELECT COUNT(*) FROM {t}").format(t=staging)).fetchone()[0]
        if n == 0:
            raise DataError(None, "no cases to index")
        n_text = self.conn.execute(sql.SQL("SELECT COUNT(*) FROM {t} WHERE text_vec IS NOT NULL")
                                   .format(t=staging)).fetchone()[0]
        chosen = (FLAT if n < FLAT_MAX else HNSW) if kind == "auto" else kind
        if chosen not in PG_KINDS:
            raise InputError(f"index kind {kind!r} is not available with pgvector; choose auto, {', '.join(PG_KINDS)}")
        for target, count in ((IMAGES, n), (TEXTS, n_text)):
            if count == 0:
                continue
            started = time.perf_counter()
            if chosen == HNSW:
                _ensure_hnsw(self.conn, self.staging, _VECTOR_COLUMN[target])
            recall = _measure_recall(self.conn, self.staging, target, count) if chosen == HNSW else 1.0
            info[target] = {"kind": chosen, "n": count, "recall_at_10": recall,
                            "build_seconds": round(time.perf_counter() - started, 3)}
        info.update(columns=self.columns, n_cases=n)
        with self.conn.transaction():  # the swap: readers see the old table or the new, never neither
            self._check_replaceable()
            self.conn.execute(sql.SQL("DROP TABLE IF EXISTS {t}").format(t=sql.Identifier(self.table)))
            self.conn.execute(sql.SQL("ALTER TABLE {s} RENAME TO {t}").format(s=staging, t=sql.Identifier(self.table)))
            _write_info(self.conn, self.table, info)
            self.conn.execute(f"DELETE FROM {INFO_TABLE} WHERE name = %s", (self.staging,))
        self.conn.commit()
        return info

    def close(self) -> None:
        self.conn.close()


def hnsw_index_sql(table: Any, column: str) -> Any:
    """The statement (psycopg ``sql.Composed``) that builds a store's HNSW index on ``table`` (a
    ``sql.Identifier``): inner product on unit vectors, with medvl's graph settings."""
    sql = _sql()
    statement = "CREATE INDEX ON {t} USING hnsw ({c} vector_ip_ops) WITH (m = {m}, ef_construction = {ef})"
    return sql.SQL(statement).format(t=table, c=sql.Identifier(column), m=sql.Literal(PG_HNSW_M),
                                     ef=sql.Literal(PG_HNSW_EF_CONSTRUCTION))


def _ensure_hnsw(conn, table: str, column: str) -> None:
    """One HNSW index with medvl's settings on ``table``'s ``column``, committed. A build interrupted after
    it was built (during the recall measurement, or the other column's index) left it on the staging table:
    the rerun keeps it instead of building a second one; any other HNSW index on the column is dropped."""
    sql = _sql()
    wanted = f"USING hnsw ({column} vector_ip_ops) WITH (m='{PG_HNSW_M}', ef_construction='{PG_HNSW_EF_CONSTRUCTION}')"
    existing = conn.execute(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), i.indisvalid, pg_get_indexdef(c.oid) "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_am a ON a.oid = c.relam "
        "JOIN pg_attribute col ON col.attrelid = i.indrelid AND col.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = to_regclass(%s) AND a.amname = 'hnsw' AND col.attname = %s ORDER BY c.oid",
        (f'"{table}"', column)).fetchall()
    kept = next((name for name, valid, definition in existing if valid and definition.endswith(wanted)), None)
    for name, _, _ in existing:
        if name != kept:  # schema.name, quoted by quote_ident
            conn.execute(sql.SQL("DROP INDEX {i}").format(i=sql.SQL(name)))
    if kept is None:
        conn.execute(f"SET maintenance_work_mem = '{PG_BUILD_MEMORY}'")  # constants, not input
        conn.execute(hnsw_index_sql(sql.Identifier(table), column))
    conn.commit()


def _measure_recall(conn, table: str, target: str, count: int) -> float:
    """Recall@10 of the HNSW index against exact search (index scans off) on sampled rows of the ``count``
    vectors: the share of each query's ``min(10, count)`` exact nearest the HNSW search finds."""
    sql = _sql()
    k = min(RECALL_K, count)
    column = sql.Identifier(_VECTOR_COLUMN[target])
    queries = conn.execute(sql.SQL("SELECT {c}::text FROM {t} WHERE {c} IS NOT NULL ORDER BY md5(id) LIMIT %s")
                           .format(c=column, t=sql.Identifier(table)), (RECALL_SAMPLE,)).fetchall()
    nearest = sql.SQL("SELECT id FROM {t} WHERE {c} IS NOT NULL ORDER BY {c} <#> %s::vector LIMIT %s").format(
        t=sql.Identifier(table), c=column)
    found = 0.0
    for (query,) in queries:
        ann = {r[0] for r in _rows(conn, nearest, (query, k), exact=False)}
        exact = {r[0] for r in _rows(conn, nearest, (query, k), exact=True)}
        found += len(ann & exact) / max(1, k)
    conn.commit()
    return found / max(1, len(queries))


def _rows(conn, statement, params: tuple, exact: bool) -> list[tuple]:
    """Run a query; ``exact`` turns index scans off for it alone (exact nearest neighbours)."""
    with conn.transaction():
        if not exact:
            return conn.execute(statement, params).fetchall()
        before = conn.execute("SHOW enable_seqscan").fetchone()[0]
        conn.execute("SET LOCAL enable_indexscan = off")
        conn.execute("SET LOCAL enable_seqscan = on")  # whatever the session says: the scan that is exact
        try:
            return conn.execute(statement, params, prepare=False).fetchall()  # planned now, with index scans off
        finally:  # SET LOCAL outlives a savepoint: switch both back within the same transaction
            conn.execute("SET LOCAL enable_indexscan = on")
            conn.execute(f"SET LOCAL enable_seqscan = {'on' if before == 'on' else 'off'}")  # a constant


# ------------------------------------------------------------------ the index


class PgVectorIndex(IndexBase):
    """An index table in PostgreSQL. Writable indexes keep changes in one transaction until
    ``save()``."""

    def __init__(self, url: str, conn, info: dict[str, Any], writable: bool):
        self.url, self.conn, self.info, self.writable = url, conn, info, writable
        self.opened_info = info  # the info the model was checked against (check_model) when it was opened
        address = parse_url(url)
        self.table, self.shown_table = address.table, address.shown_table
        self.location = address.shown if "#" in url else f"{address.shown}#{self.table}"

    @classmethod
    def open(cls, url: str, writable: bool = False) -> PgVectorIndex:
        conn = _connect(url, autocommit=not writable)
        try:
            address = parse_url(url)
            table, shown = address.table, address.shown_table
            if writable:
                _lock(conn, table, url)
            exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (INFO_TABLE,)).fetchone()[0]
            info = _read_info(conn, table) if exists else None
            if info is None:
                raise DataError(address.shown, f"no medvl index named {shown!r} in this database")
            if not _table_exists(conn, table):
                raise IndexGone(address.shown, _missing_table(shown))
            info = check_info_format(info, address.shown, writable, f"{address.shown} ({INFO_TABLE} row {shown!r})")
        except BaseException:
            conn.close()
            raise
        return cls(url, conn, info, writable)


    def follow_rebuild(self) -> None:
        """Read the index's info again (one row by its key): a build by another process swaps the table under a
        reader opened before it. Its filter columns and vector sets are then the new table's; a table rebuilt
        with another model is an ``IndexRebuilt`` error, a dropped one (row or table) ``IndexGone``. A writable
        index holds the table's lock, which every build takes: nothing swaps it."""
        if self.writable:
            return
        info = _read_info(self.conn, self.table)
        if info is None:
            raise IndexGone(self.location, f"no medvl index named {self.shown_table!r} in this database any more "
                                           "(dropped since it was opened)")
        if not _table_exists(self.conn, self.table):
            raise IndexGone(self.location, _missing_table(self.shown_table))
        if info == self.info:
            return
        info = check_info_format(info, self.location, writable=False)
        model_changed(self.opened_info, info, self.location)
        self.info = info

    def _q(self, template: str, **parts: Any):
        sql = _sql()
        return sql.SQL(template).format(t=sql.Identifier(self.table), **parts)

    def __len__(self) -> int:
        return self.conn.execute(self._q("SELECT COUNT(*) FROM {t}")).fetchone()[0]

    def _count(self, target: str) -> int:
        """The vectors of ``target`` in the table (every case's image; the reports that have one)."""
        column = _sql().Identifier(_VECTOR_COLUMN[target])
        return self.conn.execute(self._q("SELECT COUNT(*) FROM {t} WHERE {c} IS NOT NULL", c=column)).fetchone()[0]

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        return {r[0] for r in self.conn.execute(self._q("SELECT id FROM {t} WHERE id = ANY(%s)"), (list(ids),))}

    def stored_contents(self, ids: Sequence[str]) -> dict[str, tuple[str | None, str | None, str, str, str | None]]:
        rows = self.conn.execute(self._q("SELECT id, image_sha256, report, labels, meta, split FROM {t} "
                                         "WHERE id = ANY(%s)"), (list(ids),))
        return {row[0]: (row[1], row[2], json.dumps(row[3], sort_keys=True), json.dumps(row[4], sort_keys=True),
                         row[5]) for row in rows}

    def find_images(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        rows = self.conn.execute(self._q("SELECT image_sha256, id FROM {t} WHERE image_sha256 = ANY(%s)"),
                                 ([h for h in hashes if h],)).fetchall()
        return ids_by_hash(rows)

    def label_counts(self) -> list[tuple[dict[str, Any], int]]:
        # as text: json has no equality (a table made by an earlier medvl has jsonb, whose text is canonical)
        rows = self.conn.execute(self._q("SELECT labels::text, COUNT(*) FROM {t} GROUP BY labels::text")).fetchall()
        return [(json.loads(labels), int(count)) for labels, count in rows]

    def case_labels(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        rows = self.conn.execute(self._q("SELECT id, labels FROM {t} WHERE id = ANY(%s)"), (list(ids),))
        return {row[0]: row[1] for row in rows}

    def case_ids(self, keys: Collection[str]) -> dict[str, list[str]]:
        if not keys:
            return {}
        rows = self.conn.execute(self._q("SELECT id, meta FROM {t}"))
        return ids_by_case(((image_id, meta or {}) for image_id, meta in rows), keys)

    def _writable(self) -> None:
        if not self.writable:
            raise InputError(f"{self.location}: index opened read-only")

    def add(self, cases: Sequence[Case], vectors: np.ndarray, text_vectors: np.ndarray | None = None) -> None:
        self._writable()
        vectors = check_vectors(vectors, self.dim, "case")
        if len(vectors) != len(cases):
            raise InputError(f"{len(cases)} cases but {len(vectors)} vectors")
        if text_vectors is not None:
            text_vectors = check_vectors(text_vectors, self.dim, "report")
        check_unique_ids(cases, self.location)
        present = self.existing_ids([c.id for c in cases])
        if present:
            raise InputError(f"case {sorted(present)[0]!r} is already in the index; delete it first")
        columns = {**self.info["columns"], **infer_columns(cases, self.info["columns"])}
        with self.conn.transaction():  # a savepoint: a failed add leaves earlier unsaved changes
            _add_columns(self.conn, self.table, {n: t for n, t in columns.items() if n not in self.info["columns"]})
            _insert(self.conn, self.table, cases, vectors, text_vectors, columns)
        self.info["columns"] = columns
        if text_vectors is not None and any(c.text for c in cases):
            self.info.setdefault(TEXTS, {"kind": FLAT, "n": 0, "recall_at_10": 1.0})

    def delete(self, ids: Sequence[str]) -> int:
        self._writable()
        return len(self.conn.execute(self._q("DELETE FROM {t} WHERE id = ANY(%s) RETURNING id"),
                                     (list(dict.fromkeys(ids)),)).fetchall())

    def save(self) -> None:
        if not self.writable:
            return
        self.info["n_cases"] = len(self)
        note_vector_counts(self.info, {target: self._count(target) for target in (IMAGES, TEXTS)
                                       if target in self.info})
        self.info["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        _write_info(self.conn, self.table, self.info)
        self.conn.commit()

    def close(self) -> None:
        if not self.conn.closed:
            if self.writable:
                self.conn.rollback()  # unsaved changes are dropped
            self.conn.close()

    def search(self, vectors: np.ndarray, k: int = 10, where: str | None = None,
               target: str = IMAGES) -> list[list[Hit]]:
        """The nearest cases of each vector. A read-only index follows a rebuild by another process
        (``follow_rebuild``), and a swap that lands between reading the info and the search (the query waits
        for the swap's lock, then reads the new table) is seen at the end, in the same transaction: the
        search is run again on the new table, or refused (``IndexRebuilt``) if another model built it."""
        check_target(target)
        check_k(k)
        errors = _psycopg().errors
        for attempt in range(3):
            self.follow_rebuild()
            used = self.info
            try:
                with self.conn.transaction():  # the table read locked until the info is read again
                    results = self._search(vectors, k, where, target)
                    current = self.writable or _read_info(self.conn, self.table) == used
            except (errors.UndefinedColumn, errors.UndefinedTable, errors.DataException):
                if not _table_exists(self.conn, self.table):
                    raise IndexGone(self.location, _missing_table(self.shown_table)) from None
                if self.writable or attempt == 2 or _read_info(self.conn, self.table) == used:
                    raise  # not a swap: the table is the one the info describes
                continue
            if current:
                return results
        raise DataError(self.location, "the index was rebuilt three times while it was searched; search again")

    def _search(self, vectors: np.ndarray, k: int, where: str | None, target: str) -> list[list[Hit]]:
        vectors = check_vectors(vectors, self.dim)
        if target == TEXTS and TEXTS not in self.info:
            raise InputError(f"{self.location}: index holds no report texts to search")
        column = _sql().Identifier(_VECTOR_COLUMN[target])
        condition, params = _sql().SQL("{c} IS NOT NULL").format(c=column), ()
        where = given_filter(where)  # blank: no filter
        if where:
            # "C": code-point order, as the FAISS index; the database's own collation may follow a locale
            compiled = compile_where(where, self.columns, quote_column, placeholder="%s", text_collation='"C"')
            condition = _sql().SQL("{c} AND ({w})").format(c=condition, w=_sql().SQL(compiled.sql))
            params = compiled.params
        statement = self._q("SELECT " + _CASE_FIELDS + ", -({c} <#> %s::vector) FROM {t} WHERE {w} "
                            "ORDER BY {c} <#> %s::vector LIMIT %s", c=column, w=condition)

        def nearest(query: str, n: int) -> list[list[Hit]]:
            rows = _rows(self.conn, statement, (query, *params, query, n), exact=False)
            if len(rows) < n and self.info.get(target, {}).get("kind") == HNSW:
                # a filter starved the beam, or n is above hnsw.ef_search: rank exactly (the same rows when the
                # table holds fewer than n)
                rows = _rows(self.conn, statement, (query, *params, query, n), exact=True)
            return [[Hit(id=r[0], score=float(r[7]), split=r[1], labels=r[2], meta=r[3], text=r[4],
                         image_path=public_image_path(r[5]), image_sha256=r[6]) for r in rows]]

        return [in_id_order(functools.partial(nearest, vector_text(vector)), k)[0] for vector in vectors]
