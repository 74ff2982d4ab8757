"""Case-index scale benchmark: build time, size, recall@10 and query latency of each FAISS kind,
then the whole index (SQLite metadata, filtered search) at the size that picks each kind.

    python benchmarks/retrieval.py [--n 1000000] [--dim 128] [--kinds flat,hnsw,ivfpq] [--json out.json]

Vectors are synthetic stand-ins for image embeddings: unit vectors drawn around 2,000 cluster
centres (real embeddings are clustered, which is what makes ANN recall non-trivial), with random
case metadata (age 18-95, sex, view). Queries are held-out vectors from the same distribution.
Recall@10 is against exact inner-product search over all vectors.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medvl.index.base import INFO_FORMAT  # noqa: E402
from medvl.index.cases import Case  # noqa: E402
from medvl.index.faiss_store import (  # noqa: E402
    FaissBuilder,
    FaissIndex,
    build_ann,
    choose_kind,
    faiss_threads,
    search_params,
)


def unit_vectors(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    chunks = []
    for start in range(0, n, 100_000):
        size = min(100_000, n - start)
        base = centres[rng.integers(0, len(centres), size)]
        chunk = (base + 0.35 * rng.standard_normal((size, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
        chunks.append(chunk / np.linalg.norm(chunk, axis=1, keepdims=True))
    return np.concatenate(chunks)


def exact_neighbours(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    import faiss

    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def bench_kind(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    import faiss

    started = time.perf_counter()
    ann = build_ann(vectors, np.arange(len(vectors), dtype=np.int64), kind)
    build = time.perf_counter() - started
    params = search_params(ann, kind)
    _, found = ann.search(queries, 10, params=params)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
    latencies = []
    with faiss_threads(1):  # as FaissIndex.search runs a single query
        for query in queries[:100]:
            started = time.perf_counter()
            ann.search(query[None], 10, params=params)
            latencies.append((time.perf_counter() - started) * 1000)
    return {"kind": kind, "build_s": round(build, 1), "size_mb": round(faiss.serialize_index(ann).nbytes / 2**20, 1),
            "recall_at_10": round(recall, 3), "p50_ms": round(float(np.median(latencies)), 2),
            "p95_ms": round(float(np.percentile(latencies, 95)), 2)}


def bench_folder(vectors: np.ndarray, queries: np.ndarray, rng: np.random.Generator) -> dict:
    """The whole embedded index: build through FaissBuilder (SQLite rows, pending vectors, swap),
    then plain and filtered searches through FaissIndex."""
    n, dim = vectors.shape
    columns = {"age": "number", "sex": "text", "view": "text"}
    ages, sexes, views = rng.integers(18, 96, n), rng.choice(["F", "M"], n), rng.choice(["PA", "AP", "LL"], n)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "idx"
        started = time.perf_counter()
        builder = FaissBuilder(out, "bench", columns)
        for start in range(0, n, 10_000):
            stop = min(n, start + 10_000)
            cases = [Case(id=f"case{i}", split="all", meta={"age": str(ages[i]), "sex": sexes[i], "view": views[i]})
                     for i in range(start, stop)]
            builder.append(cases, vectors[start:stop], None)
        rows = time.perf_counter() - started
        info = {"format": INFO_FORMAT, "backend": "faiss", "embed_dim": dim,
                "model": {"name": "synthetic", "embed_dim": dim}, "label_columns": []}
        info = builder.finish(info)
        total = time.perf_counter() - started
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        result = {"n": n, "kind": info["images"]["kind"], "recall_at_10_recorded": info["images"]["recall_at_10"],
                  "rows_s": round(rows, 1), "build_total_s": round(total, 1), "folder_mb": round(size, 1)}
        with FaissIndex.open(out) as index:
            for name, where in (("plain", None), ("where_sex_age", "sex = 'F' and age > 60"),
                                ("where_rare", "view = 'LL' and age = 40")):
                latencies = []
                for query in queries[:50]:
                    started = time.perf_counter()
                    index.search(query[None], k=10, where=where)
                    latencies.append((time.perf_counter() - started) * 1000)
                result[f"{name}_p50_ms"] = round(float(np.median(latencies)), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=128, help="embedding size")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--kinds", default="flat,hnsw,ivfpq")
    parser.add_argument("--no-folder", action="store_true", help="skip the whole-index (SQLite) run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((2000, args.dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = unit_vectors(args.n, args.dim, rng, centres)
    queries = unit_vectors(args.queries, args.dim, rng, centres)
    truth = exact_neighbours(queries, vectors, 10)
    results = {"n": args.n, "dim": args.dim, "auto_kind": choose_kind(args.n), "kinds": []}
    print(f"{args.n:,} vectors x {args.dim}; auto picks {results['auto_kind']}")
    print(f"{'kind':<7}{'build s':>9}{'size MB':>9}{'recall@10':>11}{'p50 ms':>9}{'p95 ms':>9}")
    for kind in args.kinds.split(","):
        row = bench_kind(kind, vectors, queries, truth)
        results["kinds"].append(row)
        print(f"{kind:<7}{row['build_s']:>9}{row['size_mb']:>9}{row['recall_at_10']:>11}"
              f"{row['p50_ms']:>9}{row['p95_ms']:>9}", flush=True)
    if not args.no_folder:
        results["folder"] = bench_folder(vectors, queries, rng)
        print("whole index:", json.dumps(results["folder"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
