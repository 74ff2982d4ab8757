"""Filtered search on an HNSW index: broad filters are applied after the graph search (post-filtering),
narrow ones are searched exactly among the allowed cases; both agree with exact filtered search.

A real FAISS HNSW index over 6,000 clustered unit vectors with SQLite metadata. The thresholds that
pick the path are lowered (``EXACT_FILTERED_MAX``) so that a small index takes the same paths a
million-case index takes; results are compared with brute-force search among the allowed cases.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from medvl.index import faiss_store
from medvl.index.base import INFO_FORMAT
from medvl.index.cases import Case
from medvl.index.faiss_store import FaissBuilder, FaissIndex

N, DIM = 6000, 16


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, DIM))
    vectors = (centres[rng.integers(0, 40, N)] + 0.4 * rng.standard_normal((N, DIM))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ages, sexes = rng.integers(18, 96, N), rng.choice(["F", "M"], N)
    queries = vectors[rng.choice(N, 40, replace=False)] + 0.05 * rng.standard_normal((40, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, ages, sexes, queries.astype(np.float32)


@pytest.fixture(scope="module")
def index_dir(data, tmp_path_factory):
    vectors, ages, sexes, _ = data
    out = tmp_path_factory.mktemp("filtered") / "idx"
    builder = FaissBuilder(out, "test", {"age": "number", "sex": "text"})
    cases = [Case(id=f"case{i}", split="all", meta={"age": str(ages[i]), "sex": sexes[i]}) for i in range(N)]
    builder.append(cases, vectors, None)
    builder.finish({"format": INFO_FORMAT, "backend": "faiss", "embed_dim": DIM,
                    "model": {"name": "synthetic", "embed_dim": DIM}, "label_columns": []}, kind="hnsw")
    return out


def _exact(data, allowed: np.ndarray, k: int = 10) -> list[set[str]]:
    vectors, _, _, queries = data
    ids = np.flatnonzero(allowed)
    scores = queries @ vectors[ids].T
    return [{f"case{ids[j]}" for j in np.argsort(-row)[:k]} for row in scores]


@pytest.mark.parametrize(("where", "rule"), [
    ("sex = 'F' and age > 60", lambda ages, sexes: (sexes == "F") & (ages > 60)),  # ~23%: post-filtered
    ("age < 30", lambda ages, sexes: ages < 30),  # ~15%
    ("sex = 'M' and age < 22", lambda ages, sexes: (sexes == "M") & (ages < 22)),  # ~2.6%: wide beam
])
def test_broad_filters_are_post_filtered_and_agree_with_exact_search(data, index_dir, monkeypatch, where, rule):
    monkeypatch.setattr(faiss_store, "EXACT_FILTERED_MAX", 50)
    _, ages, sexes, queries = data
    allowed = rule(ages, sexes)
    with FaissIndex.open(index_dir) as index:
        results = index.search(queries, k=10, where=where)
        assert index.filtered_paths == Counter({"post-filtered": 1})  # answered from the graph
    truth = _exact(data, allowed)
    found = [{hit.id for hit in row} for row in results]
    assert all(len(row) == 10 for row in results)
    assert all(allowed[int(hit.id[4:])] for row in results for hit in row)  # nothing the filter excludes
    recall = np.mean([len(f & t) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.95
    assert all(row[i].score >= row[i + 1].score for row in results for i in range(9))


def test_narrow_filters_are_exact_and_deleted_cases_never_return(data, index_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(faiss_store, "EXACT_FILTERED_MAX", 50)
    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    _, ages, sexes, queries = data
    with FaissIndex.open(copy, writable=True) as index:
        before = index.search(queries[:1], k=10, where="sex = 'F' and age > 60")[0]
        assert index.delete([hit.id for hit in before[:5]]) == 5
        after = index.search(queries[:1], k=10, where="sex = 'F' and age > 60")[0]
        assert not {hit.id for hit in before[:5]} & {hit.id for hit in after} and len(after) == 10
        rare = index.search(queries, k=10, where="age = 40 and sex = 'F'")  # ~0.6%: 39 cases, exact
        assert index.filtered_paths["exact"] == 1
    allowed = (ages == 40) & (sexes == "F")
    assert [{hit.id for hit in row} for row in rare] == _exact(data, allowed)
