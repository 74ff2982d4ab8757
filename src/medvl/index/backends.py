"""Which backend holds an index, decided in one place: a ``postgresql://`` (or ``postgres://``)
URL is PostgreSQL + pgvector (``#table`` names the table), anything else a FAISS + SQLite folder.

``open_index`` opens an existing index for search (or, ``writable``, for ``add`` / ``delete``);
``open_builder`` starts or resumes the staged build that ``medvl.index.build`` fills. The backend
modules import ``medvl.index.base``, never this module, so the choice can import them all.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .ann import IVFPQ, IVFPQ_MIN, KINDS
from .base import Index, is_url
from .faiss_store import FaissBuilder, FaissIndex
from .pgvector_store import PG_KINDS, PgVectorBuilder, PgVectorIndex


def open_index(target: str | Path, writable: bool = False) -> Index:
    """Open an index: a FAISS folder path, or ``postgresql://...[#table]`` for pgvector."""
    if is_url(target):
        return PgVectorIndex.open(str(target), writable=writable)
    return FaissIndex.open(Path(target), writable=writable)


def open_builder(out: str | Path, key: str, columns: dict[str, str], dim: int) -> FaissBuilder | PgVectorBuilder:
    """The staged build of a new index at ``out``; ``key`` identifies the build, so a rerun of the same
    build resumes where it stopped (see ``medvl.index.build``)."""
    if is_url(out):
        return PgVectorBuilder(str(out), key, columns, dim)
    return FaissBuilder(Path(out), key, columns)


def check_kind(out: str | Path, kind: str, n_images: int | None = None, n_reports: int | None = None) -> None:
    """InputError unless ``kind`` (``auto`` or an ANN kind) can be built at ``out``: a kind its backend offers and,
    once the sizes are known, for IVF-PQ at least ``IVFPQ_MIN`` images, and reports when any case has one, to
    train on. A build checks it before reading any image (the CLI before loading the data)."""
    kinds = PG_KINDS if is_url(out) else KINDS
    if kind != "auto" and kind not in kinds:
        known = "is not available with pgvector" if kind in KINDS else "is not an index kind"
        raise InputError(f"kind {kind!r} {known}; choose auto, {', '.join(kinds)}", parameter="kind")
    if kind != IVFPQ or n_images is None:
        return
    short = [f"{n} {what}" for n, what in ((n_images, "cases"), (n_reports or 0, "reports"))
             if n < IVFPQ_MIN and (n or what == "cases")]
    if short:
        raise InputError(f"kind 'ivfpq' needs at least {IVFPQ_MIN} vectors to train on, and the data has "
                         f"{' and '.join(short)}; use kind 'flat' or 'hnsw'", parameter="kind")
