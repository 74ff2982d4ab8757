"""Case retrieval quality: label agreement of retrieved cases, mAP, and drafted reports' finding F1.

Queries are the records of a dataset (usually a held-out split); the gallery is an index. A query
found in the index (the same decoded pixels, or the same id in an index built from the same dataset
folder) is left out of its own results, with the other images of its case (the same ``case_id`` /
``patient_id``, as the dataset or its indexed copy names it: MedPix's images of a case share its report);
a case of another dataset that happens to share an id stays. ``excluded_self`` counts the queries with
anything left out, ``excluded_same_case`` those whose case's other images were.

Label agreement (over the label columns, by default the index's own):

- A case's **label set**: per column, the column's name if the column is binary (values 0/1 only)
  and the value is 1, else ``column=value``. For one categorical column it is just its class.
- A retrieved case is **relevant** when its label set equals the query's (exact match).
- **precision@k**: the share of relevant cases among the first k. A k above the cases a query's ranking
  holds (the index's size, less the query's own case when it is left out) is capped at that many, with a
  warning: the JSON's ``k`` is then the k scored and ``k_requested`` the k asked for (precision over the
  whole index is the class prior, whatever the model).
- **Jaccard@k**: the mean Jaccard similarity of the query's and retrieved label sets over the first
  k (the partial credit of multi-label sets; equal to precision@k for one categorical column).
- **mAP**: the mean over queries of average precision, relevant = same label set, over the ranking
  of the whole index (its first ``map_depth`` cases when the index is larger, at most 10,000, what
  one search returns; the denominator, the query's relevant cases in the whole index, is then capped
  at ``map_depth``). Queries with no relevant case in the index are left out. A case left out as the
  query itself counts neither as relevant nor in the baselines' index. The index's label-set counts
  come from its case table (``Index.label_counts``), whatever its size.
- **Class-prior baseline** beside each: its expected value for a random ranking. With ``p`` the
  index's label-set distribution, precision@k and mAP ~ ``sum_q p(q) / n_queries``, which is
  ``sum_c p_c^2`` when the queries follow the index's distribution (also reported as
  ``prior_sum_p2``); mAP's uses the exact expectation under a random ranking of AP as the model is
  scored (over the first ``map_depth`` ranks, the denominator capped at ``map_depth``).

Drafted reports (``medvl.rag.draft``, ``draft_k`` neighbours) are scored by the findings the
report labeller reads in their text against a reference per query: the query's label columns
mapped to knowledge-base findings when every value maps to one (``reference = "labels"``), else the
labeller applied to the query's own report (``reference = "reports"``). An abstention predicts no
finding (``answered_micro_f1`` scores the other queries alone). Micro precision / recall / F1 over
(query, finding) pairs, macro F1 over the findings of the vocabulary with at least one reference
positive. Beside it, the nearest single report: the top neighbour's report, labelled the same way
(its ``answered_micro_f1`` over the same queries as the draft's). With report references, ``knowledge``
says how well the knowledge base covers them (``eval.coverage.knowledge_coverage``, with its warnings): a
query whose report names no finding of the base is read as "no finding", which a draft of no finding
matches (CT / MR reports under the built-in chest X-ray base).

With label references, ``knowledge_retrieval`` gives how often the knowledge-base entry of a query's
one finding ranks first (``top1``) or in the first three (``top3``) by image-embedding similarity.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..checks import check_number
from ..data.record import Dataset, Record
from ..errors import InputError
from ..index.base import MAX_K, Hit, Index, check_model, path_sha256
from ..index.cases import case_key, pixel_sha256s
from ..index.search import first_cases
from ..models.preprocess import read_for
from ..progress import progress_bar
from ..rag.draft import MIN_SIMILARITY, MIN_SUPPORT, check_k, check_settings, draft_from_hits
from ..rag.knowledge import KnowledgeBase
from ..rag.labels import ReportLabeller
from .contamination import trained_on_scored
from .coverage import knowledge_coverage

log = logging.getLogger(__name__)

LIST_MAX = MAX_K  # the most cases one search returns (the index's k limit)
BATCH = 32


def case_retrieval(index: Index, model, dataset: Dataset, *, k: int = 5, label_columns: Sequence[str] | None = None,
                   draft_k: int = 10, knowledge: KnowledgeBase | None = None, min_support: float = MIN_SUPPORT,
                   min_similarity: float = MIN_SIMILARITY, map_depth: int = 1000,
                   show_progress: bool = True) -> dict[str, Any]:
    """Score image->image case retrieval of ``dataset``'s records against ``index`` (see the module
    docstring for every definition). Records the model cannot take (a DICOM folder's 3D series for a 2D
    model, its 2D images for a 3D one) are left out first, with a warning (``Dataset.for_spatial_dims``).
    Returns a JSON-serialisable dict; ``trained_on_scored`` when the model learned from queries
    (``eval.contamination.trained_on_scored``)."""
    started = time.perf_counter()
    check_case_retrieval_settings(k, draft_k, min_support, min_similarity, map_depth, label_columns)
    check_model(index.info, model, index.location)
    dataset = dataset.for_spatial_dims(model.config.image.spatial_dims)  # a DICOM folder's other kind left out
    columns = _label_columns(index, dataset, label_columns)
    queries = query_records(dataset, columns)
    if not queries:
        raise InputError(f"{dataset.source}: no record has every label column ({', '.join(columns)})")
    n_index = len(index)
    if n_index < 2:
        raise InputError(f"{index.location}: the index holds {n_index} case(s); need at least 2")
    vectors, hashes = _embed(model, queries, show_progress)
    copies, excluded = _self_matches(index, queries, hashes, same_source=_built_from(index, dataset))
    index_labels = index.label_counts()  # the whole index's label distribution, at any size
    binary = _binary_columns(columns, queries, [labels for labels, _ in index_labels])
    labeller = ReportLabeller(knowledge)
    most_excluded = max(map(len, excluded))
    map_depth = _scored_depth(map_depth, n_index, most_excluded)
    depth = min(max(k, draft_k, map_depth) + most_excluded, n_index, LIST_MAX)
    rankings = _rankings(index, vectors, excluded, depth, show_progress)
    query_sets = [label_set(r.labels, columns, binary) for r in queries]
    own_sets = {case: label_set(labels, columns, binary)
                for case, labels in index.case_labels(sorted(set().union(*excluded))).items()}
    prior: Counter[frozenset] = Counter()
    for labels, count in index_labels:
        prior[label_set(labels, columns, binary)] += count
    scored_k = _scored_k(k, rankings)
    result: dict[str, Any] = {"n_queries": len(queries), "n_skipped": len(dataset) - len(queries), "n_index": n_index,
              "label_columns": columns, "k": scored_k, "excluded_self": sum(bool(e) for e in excluded),
              "excluded_same_case": sum(bool(e - own) for e, own in zip(excluded, copies, strict=True))}
    if scored_k < k:
        result["k_requested"] = k
    k = scored_k
    found_sets = [[label_set(h.labels, columns, binary) for h in ranking] for ranking in rankings]
    result.update(_agreement(found_sets, query_sets, k, prior, own_sets, map_depth, excluded))
    reference = _reference(queries, columns, binary, labeller, [labels for labels, _ in index_labels])
    result["draft"], result["nearest_report"] = _drafts(rankings, reference, labeller, draft_k, min_support,
                                                        min_similarity)
    result["draft"]["reference"] = result["nearest_report"]["reference"] = reference["kind"]
    if reference["kind"] == "labels":
        result["labeller_vs_labels"] = _labeller_agreement(queries, reference, labeller)
        result["knowledge_retrieval"] = _knowledge_retrieval(model, vectors, reference, labeller.knowledge)
    else:  # the labeller reads the references too: does its knowledge base hold their findings?
        result["knowledge"] = knowledge_coverage(queries, labeller)
    # the encoder learned the queries: its neighbours are training figures
    seen = trained_on_scored(model, dataset.subset(queries))
    if seen is not None:
        result["trained_on_scored"] = seen
    result["seconds"] = round(time.perf_counter() - started, 2)
    _headline(result)
    return result


# ------------------------------------------------------------------ inputs


def check_case_retrieval_settings(k: int, draft_k: int, min_support: float, min_similarity: float,
                                  map_depth: int, label_columns: Sequence[str] | None = None) -> None:
    """InputError unless 1 <= k <= 1000, map_depth >= 1 (whole numbers), the draft settings are
    valid (``medvl.rag.draft.check_settings``) and no label column is given twice; callers may check
    before loading anything."""
    columns = list(label_columns or [])
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:  # as medvl train: the column would be compared, and named, twice
        raise InputError(f"label column(s) {', '.join(repeated)} given more than once: {', '.join(columns)}")
    check_number("k", k, minimum=1, maximum=1000, integer=True)
    check_number("map_depth", map_depth, minimum=1, integer=True)
    check_k(draft_k, "draft_k")  # named as the caller knows it, before check_settings names it k
    check_settings(draft_k, min_support, min_similarity)


def query_records(dataset: Dataset, columns: Sequence[str]) -> list[Record]:
    """The records of ``dataset`` scored as queries: those with every label column (the rest are ``n_skipped``)."""
    return [r for r in dataset if all(c in r.labels for c in columns)]


def _label_columns(index: Index, dataset: Dataset, given: Sequence[str] | None) -> list[str]:
    columns = list(given or index.info.get("label_columns") or dataset.default_labels)
    if not columns:
        raise InputError(f"{dataset.source}: no label column to compare; pass --label-column "
                         f"(available: {', '.join(dataset.label_names) or 'none'})")
    for column in columns:
        dataset.require_label(column)
    return columns


def _embed(model, records: Sequence[Record], show_progress: bool) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Image embeddings and pixel hashes of the records (each image read once, as the index does)."""
    chunks, hashes = [], []
    with progress_bar("Embedding queries", total=len(records), enabled=show_progress) as advance:
        for start in range(0, len(records), BATCH):
            batch = records[start:start + BATCH]
            pixels = [read_for(model, r.image) for r in batch]  # as the index read them
            hashes += [pixel_sha256s(p, model.config.image.spatial_dims) for p in pixels]
            chunks.append(model.encode_images(pixels, batch_size=len(pixels)).numpy())
            advance(len(batch))
    return np.concatenate(chunks).astype(np.float32), hashes


def _built_from(index: Index, dataset: Dataset) -> bool:
    """Whether ``index`` was built from ``dataset``'s folder (its ids then name the same cases)."""
    data = index.info.get("data")
    return isinstance(data, dict) and data.get("source_sha256") == path_sha256(dataset.source)


def _self_matches(index: Index, records: Sequence[Record], hashes: list[tuple[str, ...]],
                  same_source: bool) -> tuple[list[set[str]], list[set[str]]]:
    """Per query, the index ids that are the query itself: same pixels (``pixel_sha256s``), or the same id when the
    index was built from the query's dataset (ids of two datasets, such as phantom_00001, can coincide); and those
    with the other images of its case (``_with_own_cases``)."""
    present = index.existing_ids([r.id for r in records]) if same_source else set()
    by_hash = index.find_images([digest for digests in hashes for digest in digests])
    own = [({r.id} & present) | {case_id for digest in digests for case_id in by_hash.get(digest, ())}
           for r, digests in zip(records, hashes, strict=True)]
    return own, _with_own_cases(index, records, own, same_source)


def _with_own_cases(index: Index, records: Sequence[Record], own: list[set[str]], same_source: bool) -> list[set[str]]:
    """Each query's self-matches ``own`` with every other indexed image of its case (``Index.case_ids``):
    the case its metadata names (``case_key``, MedPix's ``case_id``) when the index was built from its dataset, and
    those of its indexed copies. Its case's other images share its report: they would be its nearest cases."""
    stored = index.stored_contents(sorted(set().union(*own))) if any(own) else {}
    copy_case = {image_id: case_key(json.loads(contents[3])) for image_id, contents in stored.items()}
    named = [[copy_case.get(image_id) for image_id in ids] + ([case_key(r.meta)] if same_source else [])
             for r, ids in zip(records, own, strict=True)]
    cases = [{key for key in keys if key is not None} for keys in named]
    images = index.case_ids(set().union(*cases))
    return [ids | {image_id for key in keys for image_id in images.get(key, ())}
            for ids, keys in zip(own, cases, strict=True)]


def _scored_depth(map_depth: int, n_index: int, most_excluded: int) -> int:
    """The ranks mAP scores: ``map_depth``, at most the index's size and what one search returns once the
    queries' own cases are left out (warned: the JSON's ``map_depth`` is then the depth scored)."""
    searchable = max(1, LIST_MAX - most_excluded)
    if min(map_depth, n_index) > searchable:
        log.warning("mAP is scored over the first %d ranks, not %d: one search returns at most %d cases",
                    searchable, min(map_depth, n_index), LIST_MAX)
        return searchable
    return min(map_depth, n_index)


def _scored_k(k: int, rankings: list[list[Hit]]) -> int:
    """The cutoff precision@k and Jaccard@k are scored at: ``k``, at most the cases every query's ranking holds
    (warned: past them, precision@k would be the class prior, not a cutoff)."""
    shortest = min(map(len, rankings))
    if k > shortest:
        log.warning("precision@k and Jaccard@k are scored at k = %d, not %d: the rankings hold %d cases (the "
                    "index's, less a query's own case)", shortest, k, shortest)
        return shortest
    return k


def _binary_columns(columns: Sequence[str], records: Sequence[Record],
                    index_labels: Sequence[dict[str, Any]]) -> set[str]:
    cases = [r.labels for r in records] + list(index_labels)
    return {c for c in columns if {str(lab[c]) for lab in cases if c in lab} <= {"0", "1"}}


def label_set(labels: dict[str, Any], columns: Sequence[str], binary: set[str]) -> frozenset:
    """The label set of a case: binary columns by name when 1, others as ``column=value``."""
    items = set()
    for column in columns:
        value = labels.get(column)
        if value is None:
            continue
        if column in binary:
            if str(value) == "1":
                items.add(column)
        else:
            items.add(f"{column}={value}")
    return frozenset(items)


def _rankings(index: Index, vectors: np.ndarray, excluded: list[set[str]], depth: int,
              show_progress: bool) -> list[list[Hit]]:
    rankings = []
    with progress_bar("Searching the index", total=len(vectors), enabled=show_progress) as advance:
        for start in range(0, len(vectors), BATCH):
            found = index.search(vectors[start:start + BATCH], k=depth)
            for offset, hits in enumerate(found):
                rankings.append([h for h in hits if h.id not in excluded[start + offset]])
            advance(len(found))
    return rankings


# ------------------------------------------------------------------ label agreement


def jaccard(first: frozenset, second: frozenset) -> float:
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)


def average_precision(relevant: Sequence[bool], n_relevant: int) -> float:
    """AP of one ranking: mean precision at the ranks of the relevant items, over ``n_relevant``."""
    hits, total = 0, 0.0
    for rank, is_relevant in enumerate(relevant, start=1):
        if is_relevant:
            hits += 1
            total += hits / rank
    return total / n_relevant if n_relevant else 0.0


def random_average_precision(n_relevant: int, n: int, depth: int | None = None) -> float:
    """The expected AP of a uniformly random ranking of ``n`` items, ``n_relevant`` (R) of them relevant,
    scored as the model is: over the first ``depth`` (D) ranks, divided by ``min(R, D)`` (AP@D; the
    whole ranking when ``depth`` is None). Exact: ``E[rel_k P@k] = (R/n) (1/k + (k-1)(R-1)/(k(n-1)))``,
    summed over ``k <= min(D, n)``."""
    if n_relevant == 0 or n == 0:
        return 0.0
    ranks = n if depth is None else min(depth, n)
    harmonic = sum(1.0 / i for i in range(1, ranks + 1))
    spread = (n_relevant - 1) / (n - 1) if n > 1 else 0.0
    denominator = n_relevant if depth is None else min(n_relevant, depth)
    return n_relevant * (harmonic + spread * (ranks - harmonic)) / (n * denominator)


def _agreement(found_sets: list[list[frozenset]], query_sets: list[frozenset], k: int, prior: Counter[frozenset],
               own_sets: dict[str, frozenset], map_depth: int, excluded: list[set[str]]) -> dict[str, Any]:
    """Label agreement of the rankings (the label sets of the cases found, in order). ``prior`` counts the
    label sets of every indexed case, ``own_sets`` gives those of the cases left out as queries themselves,
    ``map_depth`` the ranks mAP scores."""
    total = sum(prior.values())
    precision: list[float] = []
    jaccards: list[float] = []
    aps: list[float] = []
    base_precision: list[float] = []
    base_jaccard: list[float] = []
    base_ap: list[float] = []
    for ranking, query, own in zip(found_sets, query_sets, excluded, strict=True):
        # the cases left out as the query itself are neither relevant to it nor part of its random ranking
        others = prior - Counter(own_sets[case] for case in own if case in own_sets)
        n_others = total - sum(case in own_sets for case in own)
        top = ranking[:k]
        precision.append(float(np.mean([s == query for s in top])) if top else 0.0)
        jaccards.append(float(np.mean([jaccard(s, query) for s in top])) if top else 0.0)
        base_precision.append(others[query] / n_others if n_others else 0.0)
        base_jaccard.append(sum(n * jaccard(s, query) for s, n in others.items()) / n_others if n_others else 0.0)
        ranked = [found == query for found in ranking[:map_depth]]
        n_relevant = others[query]  # every relevant case of the index, found in the ranks scored or not
        if n_relevant:
            aps.append(average_precision(ranked, min(n_relevant, map_depth)))
            base_ap.append(random_average_precision(n_relevant, n_others, map_depth))
    return {"precision_at_k": float(np.mean(precision)), "precision_at_k_baseline": float(np.mean(base_precision)),
            "prior_sum_p2": float(sum((n / total) ** 2 for n in prior.values())),
            "jaccard_at_k": float(np.mean(jaccards)), "jaccard_at_k_baseline": float(np.mean(base_jaccard)),
            "map": float(np.mean(aps)) if aps else None, "map_baseline": float(np.mean(base_ap)) if base_ap else None,
            "map_queries": len(aps), "map_depth": map_depth,
            "label_sets": {" + ".join(sorted(s)) or "(none)": n for s, n in prior.most_common()}}


# ------------------------------------------------------------------ drafted reports


def _reference(queries: Sequence[Record], columns: Sequence[str], binary: set[str], labeller: ReportLabeller,
               index_labels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Reference findings per query: from the labels if they all name findings, else the labeller
    on the query's own report. The vocabulary is every finding the labels of queries and index name."""
    knowledge = labeller.knowledge
    from_labels = [_findings_of(r.labels, columns, binary, knowledge) for r in queries]
    names = [n for n in from_labels if n is not None]
    if len(names) == len(from_labels):
        vocabulary = {knowledge.resolve(c) for c in columns if c in binary}
        for labels in index_labels:
            if all(c in labels for c in columns):
                vocabulary |= _findings_of(labels, columns, binary, knowledge) or set()
        vocabulary |= {f for n in names for f in n}
        return {"kind": "labels", "findings": names, "vocabulary": sorted(vocabulary)}
    missing = sum(not r.text for r in queries)
    if missing:
        raise InputError(f"the label columns ({', '.join(columns)}) do not name knowledge-base findings and "
                         f"{missing} queries have no report to label; pass --label-column with finding labels")
    names = [labeller.positives(r.text) for r in queries]
    return {"kind": "reports", "findings": names, "vocabulary": None}


def _findings_of(labels: dict[str, Any], columns: Sequence[str], binary: set[str],
                 knowledge: KnowledgeBase) -> set[str] | None:
    found = set()
    for column in columns:
        if column in binary:
            name = knowledge.resolve(column)
            if name is None:
                return None
            if str(labels[column]) == "1":
                found.add(name)
        else:
            name = knowledge.resolve(labels[column])
            if name is None:
                return None
            found.add(name)
    return found


def _drafts(rankings: list[list[Hit]], reference: dict[str, Any], labeller: ReportLabeller, draft_k: int,
            min_support: float, min_similarity: float) -> tuple[dict[str, Any], dict[str, Any]]:
    drafted, nearest, answered = [], [], []
    abstentions: Counter[str | None] = Counter()
    requested, draft_k = draft_k, min(draft_k, min(map(len, rankings)))
    if draft_k < requested:
        log.warning("reports are drafted from %d cases, not %d: the rankings hold %d cases (the index's, less a "
                    "query's own case)", draft_k, requested, draft_k)
    for row, ranking in enumerate(rankings):
        draft = draft_from_hits(first_cases(ranking, draft_k), labeller, min_support=min_support,
                                min_similarity=min_similarity)
        if draft.abstained:
            abstentions[draft.abstention] += 1
        else:
            answered.append(row)
        drafted.append(set() if draft.abstained else labeller.positives(draft.text()))
        top = next((h for h in ranking if h.text), None)
        nearest.append(labeller.positives(top.text) if top else set())
    truth = reference["findings"]
    vocabulary = reference["vocabulary"] or sorted({f for group in (truth, drafted, nearest) for s in group for f in s})
    scores = finding_f1(truth, drafted, vocabulary)
    on_answered = finding_f1([truth[i] for i in answered], [drafted[i] for i in answered], vocabulary)
    if draft_k < requested:
        scores["k_requested"] = requested
    scores.update(k=draft_k, min_support=min_support, min_similarity=min_similarity,
                  abstained=len(rankings) - len(answered), abstention_rate=1 - len(answered) / len(rankings),
                  abstentions=dict(abstentions), answered_micro_f1=on_answered["micro_f1"] if answered else None,
                  answered_macro_f1=on_answered["macro_f1"] if answered else None)
    baseline = finding_f1(truth, nearest, vocabulary)
    baseline["answered_micro_f1"] = finding_f1([truth[i] for i in answered], [nearest[i] for i in answered],
                                               vocabulary)["micro_f1"] if answered else None
    return scores, baseline


def finding_f1(truth: Sequence[set[str]], predicted: Sequence[set[str]], vocabulary: Sequence[str]) -> dict[str, Any]:
    """Micro / macro precision, recall and F1 of predicted finding sets over ``vocabulary``."""
    per_finding, tp_all, fp_all, fn_all = {}, 0, 0, 0
    for name in vocabulary:
        tp = sum(name in t and name in p for t, p in zip(truth, predicted, strict=True))
        fp = sum(name not in t and name in p for t, p in zip(truth, predicted, strict=True))
        fn = sum(name in t and name not in p for t, p in zip(truth, predicted, strict=True))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
        per_finding[name] = {"support": tp + fn, **_prf(tp, fp, fn)}
    scored = [row["f1"] for row in per_finding.values() if row["support"] > 0]
    micro = _prf(tp_all, fp_all, fn_all)
    return {"micro_precision": micro["precision"], "micro_recall": micro["recall"], "micro_f1": micro["f1"],
            "macro_f1": float(np.mean(scored)) if scored else None, "vocabulary": list(vocabulary),
            "per_finding": per_finding}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _labeller_agreement(queries: Sequence[Record], reference: dict[str, Any],
                        labeller: ReportLabeller) -> dict[str, Any]:
    """How well the labeller reads the queries' own reports, against their labels (its ceiling)."""
    vocabulary = reference["vocabulary"]
    with_text = [i for i, r in enumerate(queries) if r.text]
    if not with_text:
        return {"n": 0}
    truth = [reference["findings"][i] for i in with_text]
    read = [labeller.positives(queries[i].text) & set(vocabulary) for i in with_text]
    scores = finding_f1(truth, read, vocabulary)
    return {"n": len(with_text), "exact_match": float(np.mean([t == r for t, r in zip(truth, read, strict=True)])),
            "micro_f1": scores["micro_f1"], "macro_f1": scores["macro_f1"]}


def _knowledge_retrieval(model, vectors: np.ndarray, reference: dict[str, Any],
                         knowledge: KnowledgeBase) -> dict[str, Any]:
    """How often the knowledge entry of a query's one reference finding is among the entries closest
    to its image embedding (``KnowledgeBase.retrieve``, all entries ranked)."""
    single = [i for i, names in enumerate(reference["findings"]) if len(names) == 1]
    ranks = []
    for i in single:
        ranked = [f.name for f, _ in knowledge.retrieve(model, vectors[i], len(knowledge))]
        ranks.append(ranked.index(next(iter(reference["findings"][i]))) + 1)
    ranks_array = np.array(ranks)
    return {"n": len(ranks), "entries": len(knowledge),
            "top1": float((ranks_array <= 1).mean()) if ranks else None,
            "top3": float((ranks_array <= 3).mean()) if ranks else None}


def _headline(result: dict[str, Any]) -> None:
    """Top-level keys for the headline numbers (as every evaluator's JSON has)."""
    k = result["k"]
    result[f"P@{k}"] = result["precision_at_k"]
    result["mAP"] = result["map"]
    result["draft_micro_f1"] = result["draft"]["micro_f1"]
    result["nearest_report_micro_f1"] = result["nearest_report"]["micro_f1"]
