"""Case-index scale benchmark: every backend side by side in one run.

    python benchmarks/retrieval.py [--n 1000000] [--dim 256] [--backends flat,hnsw,ivfpq,pgvector]
                                   [--vectors real.npy] [--json out.json] [--folder-only] [--crossover]

Per backend: build time, memory (index size, and the growth of this process's resident memory
while it is built; for pgvector the table + index size on disk), recall@10 against exact search,
single-query latency p50 / p99 (one thread, as ``medvl search`` runs one query), and queries per
second when the queries come as one batch (all cores). HNSW and IVF-PQ are also swept over their
search-time knob (efSearch, nprobe) so the recall / latency trade-off is visible; the row marked
``*`` is the setting medvl uses. The goal printed beside the table comes from the issue:
p50 < 2 ms at recall@10 >= 0.95 on 1M vectors on 2 cores.

Vectors are synthetic stand-ins for image embeddings: unit vectors drawn around 2,000 cluster
centres (real embeddings are clustered, which is what makes ANN recall non-trivial). With
``--vectors FILE.npy`` (an (N, D) float array: a model's image embeddings saved with numpy) the
real vectors are used instead, shuffled, the last ``--queries`` rows being the queries.

pgvector runs against a local PostgreSQL from the ``pgserver`` package: rows are loaded with a
binary COPY into the table layout ``medvl index build`` creates for a Postgres URL, the HNSW index
is the store's own statement, and queries go through ``PgVectorIndex.search``. ``--no-folder``
skips the run of the whole embedded index (SQLite rows, filtered searches); ``--folder-only`` runs
only that. The whole-index run reports, per filter, the allowed share, p50, recall@10 against exact
search among the allowed cases and the path medvl took (exact among the allowed cases, post-filtered
graph search, FAISS id selector), and the time to select the allowed cases from the filter-column
arrays and, for reference, with SQLite. ``--crossover`` also times every filter of a range of
shares with each path forced (the exact path and the graph path), which is how the crossover
``EXACT_FILTERED_MAX`` was chosen.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medvl.errors import DataError  # noqa: E402
from medvl.index import faiss_store  # noqa: E402
from medvl.index.ann import choose_kind  # noqa: E402
from medvl.index.base import INFO_FORMAT  # noqa: E402
from medvl.index.cases import Case  # noqa: E402
from medvl.index.faiss_store import (  # noqa: E402
    HNSW_EF_SEARCH,
    HNSW_M,
    IVF_NPROBE,
    FaissBuilder,
    FaissIndex,
    build_ann,
    faiss_threads,
)

GOAL_P50_MS, GOAL_RECALL, GOAL_FILTERED_P50_MS = 2.0, 0.95, 10.0
EF_SWEEP, NPROBE_SWEEP = (32, 64, 128, 256), (8, 16, 32, 64)


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


def rss_mb() -> float:
    """This process's current resident memory (not the peak)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]))


def latencies_ms(run, queries: np.ndarray) -> np.ndarray:
    times = []
    for query in queries:
        started = time.perf_counter()
        run(query[None])
        times.append((time.perf_counter() - started) * 1000)
    return np.array(times)


def row(backend: str, setting: str, build_s: float | None, memory: str, recall: float, lat: np.ndarray,
        qps: float, default: bool = False) -> dict:
    return {"backend": backend, "setting": setting, "default": default, "build_s": build_s, "memory": memory,
            "recall_at_10": round(recall, 3), "p50_ms": round(float(np.median(lat)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "batch_qps": round(qps)}


def bench_faiss(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, n_latency: int) -> list[dict]:
    import faiss

    before = rss_mb()
    started = time.perf_counter()
    ann = build_ann(vectors, np.arange(len(vectors), dtype=np.int64), kind)
    build = round(time.perf_counter() - started, 1)
    grown = rss_mb() - before
    size = faiss.serialize_index(ann).nbytes / 2**20
    memory = f"{size:,.0f} MB index, +{grown:,.0f} MB RSS"
    if kind == "flat":
        sweep = [("exact", None, True)]
    elif kind == "hnsw":
        sweep = [(f"efSearch {ef}", faiss.SearchParametersHNSW(efSearch=ef), ef == HNSW_EF_SEARCH) for ef in EF_SWEEP]
    else:
        sweep = [(f"nprobe {p}", faiss.SearchParametersIVF(nprobe=p), p == IVF_NPROBE) for p in NPROBE_SWEEP]
    label = {"flat": "faiss flat", "hnsw": f"faiss HNSW M{HNSW_M}", "ivfpq": "faiss IVF-PQ"}[kind]
    rows = []
    for setting, params, default in sweep:
        started = time.perf_counter()
        _, found = ann.search(queries, 10, params=params)  # one batch, all threads
        qps = len(queries) / (time.perf_counter() - started)
        with faiss_threads(1):
            lat = latencies_ms(lambda q, p=params: ann.search(q, 10, params=p), queries[:n_latency])
        rows.append(row(label, setting, build if not rows else None, memory if not rows else "",
                        recall_at_10(found, truth), lat, qps, default))
    return rows


# ------------------------------------------------------------------ pgvector


def _copy_binary_rows(ids: range, vectors: np.ndarray) -> bytes:
    """PostgreSQL binary COPY rows for (id text, split text, labels jsonb, meta jsonb, image_vec vector)."""
    dim = vectors.shape[1]
    head = struct.pack(">hh", dim, 0)  # pgvector binary: int16 dim, int16 unused
    body = vectors.astype(">f4")
    vec_len = struct.pack(">i", 4 + 4 * dim)
    fixed = struct.pack(">i", 3) + b"all" + (struct.pack(">i", 3) + b"\x01{}") * 2
    parts = []
    for offset, i in enumerate(ids):
        key = f"case{i}".encode()
        parts.append(struct.pack(">hi", 5, len(key)) + key + fixed + vec_len + head + body[offset].tobytes())
    return b"".join(parts)


def bench_pgvector(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, n_latency: int) -> list[dict]:
    import pgserver
    from psycopg import sql

    from medvl.index.pgvector_store import (
        PG_EF_SEARCH,
        PG_HNSW_EF_CONSTRUCTION,
        PG_HNSW_M,
        PgVectorIndex,
        _create_table,
        _ensure_schema,
        _write_info,
        hnsw_index_sql,
    )

    n, dim = vectors.shape
    folder = tempfile.mkdtemp(prefix="medvl-pg-bench-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    try:
        url = server.get_uri() + "#bench"
        import psycopg

        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute("SET maintenance_work_mem = '6GB'")
            conn.execute("SET max_parallel_maintenance_workers = 1")  # leader + 1 worker = both cores
            _ensure_schema(conn)
            _create_table(conn, "bench", dim, {})
            started = time.perf_counter()
            with conn.cursor().copy(sql.SQL("COPY bench (id, split, labels, meta, image_vec) FROM STDIN WITH "
                                            "(FORMAT binary)")) as copy:
                copy.write(b"PGCOPY\n\xff\r\n\0" + struct.pack(">ii", 0, 0))
                for start in range(0, n, 20_000):
                    stop = min(n, start + 20_000)
                    copy.write(_copy_binary_rows(range(start, stop), vectors[start:stop]))
                copy.write(struct.pack(">h", -1))
            load = time.perf_counter() - started
            started = time.perf_counter()
            conn.execute(hnsw_index_sql(sql.Identifier("bench"), "image_vec"))  # as the store does
            build = time.perf_counter() - started
            conn.execute("VACUUM ANALYZE bench")
            size = conn.execute("SELECT pg_total_relation_size('bench')").fetchone()[0] / 2**20
            index_size = conn.execute("SELECT pg_indexes_size('bench')").fetchone()[0] / 2**20
            info = {"format": INFO_FORMAT, "backend": "pgvector", "embed_dim": dim, "columns": {},
                    "model": {"name": "synthetic", "embed_dim": dim}, "label_columns": [], "n_cases": n,
                    "images": {"kind": "hnsw", "n": n, "recall_at_10": None}}
            _write_info(conn, "bench", info)
        memory = f"{size:,.0f} MB table+index ({index_size:,.0f} MB HNSW)"
        rows = []
        with PgVectorIndex.open(url) as index:
            for ef in sorted({40, 100, PG_EF_SEARCH, 200, 400}):
                index.conn.execute(f"SET hnsw.ef_search = {int(ef)}")
                started = time.perf_counter()
                hits = index.search(queries, k=10)  # the store runs a batch as one query per row
                qps = len(queries) / (time.perf_counter() - started)
                found = np.array([[int(h.id[4:]) for h in result] + [-1] * (10 - len(result)) for result in hits])
                lat = latencies_ms(lambda q: index.search(q, k=10), queries[:n_latency])
                name = f"pgvector HNSW m{PG_HNSW_M} efc{PG_HNSW_EF_CONSTRUCTION}"
                rows.append(row(name, f"ef_search {ef}", round(load + build, 1) if not rows else None,
                                memory if not rows else "", recall_at_10(found, truth), lat, qps,
                                ef == PG_EF_SEARCH))
        rows[0]["setting"] += f" (COPY {load:.0f} s + HNSW {build:.0f} s)"
        return rows
    finally:
        server.cleanup()


# ------------------------------------------------------------------ the whole embedded index


def bench_folder(vectors: np.ndarray, queries: np.ndarray, rng: np.random.Generator, crossover: bool = False,
                 kind: str = "auto") -> dict:
    """The whole embedded index: build through FaissBuilder (SQLite rows, pending vectors, swap; ``kind``: the
    ANN kind, ``auto`` as medvl picks it by size), then plain and filtered searches through FaissIndex."""
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
        info = builder.finish(info, kind)
        total = time.perf_counter() - started
        files = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(out.iterdir()) if p.is_file()}
        result = {"n": n, "kind": info["images"]["kind"], "recall_at_10_recorded": info["images"]["recall_at_10"],
                  "rows_s": round(rows, 1), "build_total_s": round(total, 1),
                  "folder_mb": round(sum(files.values()), 1), "files_mb": files}
        filters = {"plain": (None, np.ones(n, bool)),  # name: (where, the cases it allows)
                   "where_sex_age": ("sex = 'F' and age > 60", (sexes == "F") & (ages > 60)),
                   "where_1pct": ("view = 'LL' and age < 21", (views == "LL") & (ages < 21)),
                   "where_rare": ("view = 'LL' and age = 40", (views == "LL") & (ages == 40))}
        started = time.perf_counter()
        with FaissIndex.open(out) as index:  # reads both files; checks the FAISS vectors match the table's cases
            result["open_s"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
            index._check_vectors_match_cases()  # that check alone, again
            result["open_check_s"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
            index.filter_columns()
            result["filter_columns_open_s"] = round(time.perf_counter() - started, 2)
            for name, (where, allowed) in filters.items():
                result.update({f"{name}_{key}": value for key, value in
                               filtered_run(index, where, allowed, vectors, queries[:50]).items()})
                if where:
                    (result[f"{name}_select_ms"], result[f"{name}_select_cpu_ms"], result[f"{name}_select_sql_ms"],
                     result[f"{name}_select_sql_cpu_ms"]) = select_times(index, where)
            if crossover:
                result["crossover"] = crossover_sweep(index, vectors, queries[:50], ages, sexes, views)
    return result


def filtered_run(index: FaissIndex, where: str | None, allowed: np.ndarray, vectors: np.ndarray,
                 queries: np.ndarray) -> dict:
    """p50 of single filtered queries, recall@10 against exact search among the allowed cases, the paths taken."""
    index.filtered_paths.clear()
    lat, cpu = wall_and_cpu_ms(lambda q: index.search(q, k=10, where=where), queries)
    hits = index.search(queries, k=10, where=where)
    found = np.array([[int(h.id[4:]) for h in row] + [-1] * (10 - len(row)) for row in hits])
    paths = ", ".join(f"{path} {count}" for path, count in sorted(index.filtered_paths.items())) or "unfiltered"
    return {"allowed_share": round(float(allowed.mean()), 4), "p50_ms": round(float(np.median(lat)), 2),
            "cpu_p50_ms": round(float(np.median(cpu)), 2),
            "recall_at_10": round(recall_at_10(found, exact_among(vectors, queries, allowed)), 3), "paths": paths}


def wall_and_cpu_ms(run, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per single query: wall time, and this process's CPU time (a single query runs on one thread, so
    on a machine shared with other jobs its CPU time is close to what the wall time would be alone)."""
    wall, cpu = [], []
    for query in queries:
        started, started_cpu = time.perf_counter(), time.process_time()
        run(query[None])
        wall.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - started_cpu) * 1000)
    return np.array(wall), np.array(cpu)


def select_times(index: FaissIndex, where: str, repeats: int = 5) -> tuple[float, float, float, float]:
    """Median ms (wall, CPU) to select the allowed cases' ids: filter-column arrays, then SQLite (the reference)."""
    arrays = wall_and_cpu_ms(lambda _: index.allowed_vids(where), np.zeros((repeats * 4, 1)))
    sql = wall_and_cpu_ms(lambda _: index.allowed_vids_sql(where), np.zeros((repeats, 1)))
    return (round(float(np.median(arrays[0])), 2), round(float(np.median(arrays[1])), 2),
            round(float(np.median(sql[0])), 1), round(float(np.median(sql[1])), 1))


CROSSOVER_FILTERS = ("view = 'LL' and age = 40", "view = 'LL' and age < 20", "view = 'LL' and age < 21",
                     "view = 'LL' and age < 22", "view = 'LL' and age < 25", "age < 20", "age < 22", "age < 26",
                     "sex = 'F' and age > 60")


def crossover_sweep(index: FaissIndex, vectors: np.ndarray, queries: np.ndarray, ages: np.ndarray,
                    sexes: np.ndarray, views: np.ndarray) -> list[dict]:
    """Every filter of CROSSOVER_FILTERS with the exact path forced, then the graph path forced."""
    from medvl.index.where import parse_where

    rows = []
    default = faiss_store.EXACT_FILTERED_MAX
    columns = {"age": ages, "sex": sexes, "view": views}
    try:
        for where in CROSSOVER_FILTERS:
            allowed = index.filter_columns().allowed(parse_where(where, index.columns))
            assert allowed.sum() == _allowed_by_numpy(where, columns).sum()  # the arrays agree with the data
            entry = {"where": where, "allowed": int(allowed.sum())}
            for path, limit in (("exact", 10**9), ("graph", 0)):
                faiss_store.EXACT_FILTERED_MAX = limit
                entry[path] = filtered_run(index, where, allowed, vectors, queries)
            rows.append(entry)
    finally:
        faiss_store.EXACT_FILTERED_MAX = default
    return rows


def _allowed_by_numpy(where: str, columns: dict[str, np.ndarray]) -> np.ndarray:
    """The sweep's filters evaluated directly on the generated metadata (a check of the arrays)."""
    allowed = np.ones(len(columns["age"]), bool)
    for part in where.split(" and "):
        name, op, value = part.split(" ", 2)
        value = value.strip("'")
        data = columns[name]
        literal = float(value) if name == "age" else value
        allowed &= {"=": data == literal, "<": data < literal, ">": data > literal}[op]
    return allowed


def exact_among(vectors: np.ndarray, queries: np.ndarray, allowed: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids among the allowed rows (the truth for a filtered search)."""
    ids = np.flatnonzero(allowed)
    scores = queries @ vectors[ids].T
    return ids[np.argsort(-scores, axis=1)[:, :k]]


def print_header() -> None:
    print(f"{'backend':<20}{'setting':<38}{'build s':>9}{'recall@10':>10}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'batch q/s':>11}  memory")


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        mark = "*" if r["default"] else " "
        build = "" if r["build_s"] is None else f"{r['build_s']:.1f}"
        print(f"{r['backend']:<20}{mark}{r['setting']:<37}{build:>9}{r['recall_at_10']:>10.3f}{r['p50_ms']:>9.3f}"
              f"{r['p99_ms']:>9.3f}{r['batch_qps']:>11,}  {r['memory']}", flush=True)


def bench_backends(args: argparse.Namespace, vectors: np.ndarray, queries: np.ndarray, source: str,
                   results: dict) -> None:
    n, dim = vectors.shape
    started = time.perf_counter()
    truth = exact_neighbours(queries, vectors, 10)
    print(f"{n:,} vectors x {dim} from {source}; {len(queries)} queries; exact top-10 in "
          f"{time.perf_counter() - started:.1f} s; medvl's automatic kind at this size: {choose_kind(n)}")
    print(f"goal: p50 < {GOAL_P50_MS} ms at recall@10 >= {GOAL_RECALL} on 2 cores; * = medvl's setting\n")
    print_header()
    for backend in args.backends.split(","):
        rows = (bench_pgvector(vectors, queries, truth, args.latency_queries) if backend == "pgvector"
                else bench_faiss(backend, vectors, queries, truth, args.latency_queries))
        results["rows"].extend(rows)
        print_rows(rows)
    met = [r for r in results["rows"] if r["p50_ms"] < GOAL_P50_MS and r["recall_at_10"] >= GOAL_RECALL]
    results["goal_met_by"] = [f"{r['backend']} {r['setting']}" for r in met]
    print(f"\ngoal met by: {', '.join(results['goal_met_by']) or 'none'}")


def print_folder(folder: dict) -> None:
    print(f"\nwhole embedded index (FaissBuilder + FaissIndex, {folder['n']:,} cases, {folder['kind']}): "
          f"build {folder['build_total_s']} s ({folder['rows_s']} s of it the SQLite rows), {folder['folder_mb']} MB "
          f"({', '.join(f'{name} {mb}' for name, mb in folder.get('files_mb', {}).items())}); "
          f"filter columns opened in {folder['filter_columns_open_s']} s")
    if "open_s" in folder:
        print(f"index opened in {folder['open_s']} s, of it the check that the FAISS files match the table "
              f"{folder['open_check_s']} s")
    print(f"goal for filters allowing >= 1%: p50 < {GOAL_FILTERED_P50_MS} ms at recall@10 >= {GOAL_RECALL}")
    print("p50 over 50 single queries: wall ms / CPU ms of this process; select: the allowed ids alone")
    print(f"{'search':<16} {'allowed':>8} {'p50 ms':>15} {'recall@10':>10} {'select ms':>14} {'SQLite ms':>14}  path")
    for name in ("plain", "where_sex_age", "where_1pct", "where_rare"):
        select = (f"{folder[name + '_select_ms']:>7.2f} /{folder[name + '_select_cpu_ms']:>5.2f} "
                  f"{folder[name + '_select_sql_ms']:>7.1f} /{folder[name + '_select_sql_cpu_ms']:>5.1f}"
                  if name + "_select_ms" in folder else f"{'':>14} {'':>14}")
        print(f"{name:<16} {folder[name + '_allowed_share']:>8.2%} {folder[name + '_p50_ms']:>7.2f} /"
              f"{folder[name + '_cpu_p50_ms']:>6.2f} {folder[name + '_recall_at_10']:>10.3f} {select}  "
              f"{folder[name + '_paths']}")
    if "crossover" in folder:
        print(f"\ncrossover (each path forced; medvl searches exactly up to {faiss_store.EXACT_FILTERED_MAX:,} "
              f"allowed cases); p50 wall / CPU ms")
        print(f"{'filter':<28} {'allowed':>9} {'exact p50':>15} {'recall':>7} {'graph p50':>15} {'recall':>7}  "
              f"graph path")
        for entry in folder["crossover"]:
            exact, graph = entry["exact"], entry["graph"]
            print(f"{entry['where']:<28} {entry['allowed']:>9,} {exact['p50_ms']:>7.2f} /{exact['cpu_p50_ms']:>6.2f} "
                  f"{exact['recall_at_10']:>7.3f} {graph['p50_ms']:>7.2f} /{graph['cpu_p50_ms']:>6.2f} "
                  f"{graph['recall_at_10']:>7.3f}  {graph['paths']}")


def load_vectors(path: Path, queries: int) -> np.ndarray:
    """--vectors as float32: an (N, D) array of more than ``queries`` rows, else a DataError naming the file."""
    try:
        data = np.load(path)
    except (OSError, ValueError) as error:  # missing, unreadable, or not a .npy array (a pickle is refused)
        raise DataError(path, f"--vectors is not a readable .npy file ({type(error).__name__})") from None
    if data.ndim != 2 or len(data) <= queries:
        raise DataError(path, f"--vectors holds an array of shape {data.shape}; an (N, D) array of more than "
                              f"--queries {queries} rows is needed")
    return data.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed synthetic vectors")
    parser.add_argument("--dim", type=int, default=256, help="embedding size of the synthetic vectors")
    parser.add_argument("--vectors", type=Path, default=None, help="real embeddings (.npy, N x D) instead")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and q/s")
    parser.add_argument("--latency-queries", type=int, default=300, help="single queries timed per setting")
    parser.add_argument("--backends", default="flat,hnsw,ivfpq,pgvector")
    parser.add_argument("--no-folder", action="store_true", help="skip the whole-index (SQLite) run")
    parser.add_argument("--folder-only", action="store_true", help="only the whole-index run (no backend table)")
    parser.add_argument("--crossover", action="store_true", help="time filters of many shares on each path")
    parser.add_argument("--folder-kind", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"],
                        help="the whole-index run's ANN kind (auto: as medvl picks it by size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    if args.vectors is not None:
        data = load_vectors(args.vectors, args.queries)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        data = data[rng.permutation(len(data))]
        vectors, queries = np.ascontiguousarray(data[:-args.queries]), np.ascontiguousarray(data[-args.queries:])
        source = str(args.vectors)
    else:
        centres = rng.standard_normal((2000, args.dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        vectors = unit_vectors(args.n, args.dim, rng, centres)
        queries = unit_vectors(args.queries, args.dim, rng, centres)
        source = "synthetic (2,000 clusters)"
    n, dim = vectors.shape
    results = {"n": n, "dim": dim, "source": source, "queries": len(queries), "auto_kind": choose_kind(n),
               "rows": []}
    if not args.folder_only:
        bench_backends(args, vectors, queries, source, results)
    if not args.no_folder:
        results["folder"] = folder = bench_folder(vectors, queries, rng, args.crossover, args.folder_kind)
        print_folder(folder)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"peak RSS of this process: {results['peak_rss_mb']:,} MB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
