"""Retrieved context for the report generator (MMed-RAG style): the reports of the k nearest indexed
cases of an image, with the ids of the cases they came from (the citations kept with a report).

The image is embedded by the index's own model (``medvl.index.index_model``: the dual encoder the
index was built with) and searched among the indexed images, deeper until k reports are found (or every case
was searched: an index where most cases hold no report). Left out of a query's neighbours:
cases without a report, the query itself (same id, or the same decoded pixels) and, for records,
other images of the same case or patient (same ``meta["case_id"]`` / ``meta["patient_id"]``), so a
generator trained with context learns to use similar cases, not to copy its own case's report.

Report text is patient data: nothing here logs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_number
from ..data.record import Record
from ..index.base import MAX_K, Hit, Index, check_model
from ..index.cases import case_key, pixel_sha256s
from ..index.search import SEARCH_MARGIN
from ..progress import progress_bar

BATCH = 32


@dataclass
class Retrieved:
    """The reports given to the generator for one image, nearest first, and whose they are."""

    ids: list[str]  # cited case ids
    scores: list[float]  # cosine similarities of the cases' images to the query image
    texts: list[str] = field(repr=False)  # the cases' reports: patient data, kept out of repr

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "scores": [round(s, 4) for s in self.scores]}


def retrieve_for_images(index: Index, model, images: Sequence[str | Path | np.ndarray], k: int,
                        show_progress: bool = False) -> list[Retrieved]:
    """The k nearest reports of each image (files or arrays); the image itself (same pixels) left out."""
    pixels = [image if isinstance(image, np.ndarray) else model.preprocessor.read(image) for image in images]
    dims = model.config.image.spatial_dims
    excluded = [{"sha256": pixel_sha256s(p, dims)} for p in pixels]
    return _retrieve(index, model, pixels, excluded, k, show_progress)


def retrieve_for_records(index: Index, model, records: Sequence[Record], k: int,
                         show_progress: bool = False) -> list[Retrieved]:
    """The k nearest reports of each record's image, leaving out the record itself and its own case."""
    pixels = [r.image if isinstance(r.image, np.ndarray) else model.preprocessor.read(r.image) for r in records]
    dims = model.config.image.spatial_dims
    excluded = [{"id": r.id, "case": case_key(r.meta), "sha256": pixel_sha256s(p, dims)}
                for r, p in zip(records, pixels, strict=True)]
    return _retrieve(index, model, pixels, excluded, k, show_progress)


def _retrieve(index: Index, model, pixels: list[np.ndarray], excluded: list[dict[str, Any]], k: int,
              show_progress: bool) -> list[Retrieved]:
    check_number("context k", k, minimum=1, maximum=100, integer=True)
    check_model(index.info, model, index.location)
    self_ids = _self_ids(index, excluded)
    found: list[Retrieved] = []
    with progress_bar("Retrieving similar cases", total=len(pixels), enabled=show_progress) as advance:
        for start in range(0, len(pixels), BATCH):
            vectors = model.encode_images(pixels[start:start + BATCH]).numpy()
            rows = slice(start, start + len(vectors))
            for kept in _nearest_usable(index, vectors, excluded[rows], self_ids[rows], k):
                found.append(Retrieved([h.id for h in kept], [float(h.score) for h in kept],
                                       [h.text or "" for h in kept]))
            advance(len(vectors))
    return found


def _nearest_usable(index: Index, vectors: np.ndarray, excluded: list[dict[str, Any]], self_ids: list[set[str]],
                    k: int) -> list[list[Hit]]:
    """Each vector's ``k`` nearest usable hits (``_usable``): ``k + SEARCH_MARGIN`` neighbours searched, and for
    the vectors left with fewer than ``k`` twice as many again, until they have ``k`` or the whole index was
    searched. One search of a fixed depth gave fewer than ``k`` reports, without a word, where most cases hold
    none (an archive indexed for image search, reports attached to some) while more were indexed."""
    total = min(len(index), MAX_K)
    depth = min(total, k + SEARCH_MARGIN)
    kept: list[list[Hit]] = [[] for _ in vectors]
    short = list(range(len(vectors)))
    while short:
        for row, hits in zip(short, index.search(vectors[short], k=max(depth, 1)), strict=True):
            kept[row] = [hit for hit in hits if _usable(hit, excluded[row], self_ids[row])][:k]
        if depth >= total:
            break
        short = [row for row in short if len(kept[row]) < k]
        depth = min(total, 2 * depth)
    return kept


def _self_ids(index: Index, excluded: list[dict[str, Any]]) -> list[set[str]]:
    return indexed_ids(index, [e["sha256"] for e in excluded])


def indexed_ids(index: Index, digests: Sequence[Sequence[str]]) -> list[set[str]]:
    """Per image, given by its pixel hashes (``pixel_sha256s``), the ids of the indexed cases with that image (empty
    when none; several when the index holds the image more than once)."""
    by_hash = index.find_images([digest for hashes in digests for digest in hashes])
    return [{case_id for digest in hashes for case_id in by_hash.get(digest, ())} for hashes in digests]


def _usable(hit: Hit, excluded: dict[str, Any], self_ids: set[str]) -> bool:
    if not (hit.text and hit.text.strip()) or hit.id in self_ids or hit.id == excluded.get("id"):
        return False
    return excluded.get("case") is None or case_key(hit.meta) != excluded["case"]
