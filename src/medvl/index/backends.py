"""Which backend holds an index, decided in one place: a ``postgresql://`` (or ``postgres://``)
URL is PostgreSQL + pgvector (``#table`` names the table), anything else a FAISS + SQLite folder.

``open_index`` opens an existing index for search (or, ``writable``, for ``add`` / ``delete``);
``open_builder`` starts or resumes the staged build that ``medvl.index.build`` fills. The backend
modules import ``medvl.index.base``, never this module, so the choice can import them all.
"""

from __future__ import annotations

from pathlib import Path

from .base import Index, is_url
from .faiss_store import FaissBuilder, FaissIndex
from .pgvector_store import PgVectorBuilder, PgVectorIndex


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
