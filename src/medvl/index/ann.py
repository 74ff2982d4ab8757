"""What both backends share about approximate nearest-neighbour (ANN) search: the kinds of vector
index, the sizes that choose between them, and the recall@k an approximate index is measured by
against exact search when it is built (recorded in the index info as ``recall_at_10``)."""

from __future__ import annotations

FLAT, HNSW, IVFPQ = "flat", "hnsw", "ivfpq"  # exact inner product; graph; inverted lists + product quantizer
KINDS = (FLAT, HNSW, IVFPQ)
# exact search below 50k vectors; HNSW (full vectors + graph, ~2.3 GB per million 512-d vectors) below
# 2M; IVF-PQ above, where memory decides: dim/2 bytes per vector, at most 128 (half that below 9,984 vectors:
# 4-bit codes), at a recall cost recorded at build
FLAT_MAX, HNSW_MAX = 50_000, 2_000_000
RECALL_K = 10
IVFPQ_MIN = 16  # vectors an IVF-PQ index needs to train its quantizers on


def choose_kind(n: int) -> str:
    """The index kind for ``n`` vectors (``kind="auto"``)."""
    return FLAT if n < FLAT_MAX else HNSW if n < HNSW_MAX else IVFPQ
