"""Report drafts (``medvl.rag.draft_from_hits``) on real radiology reports: IU X-ray (Open-i).

IU X-ray ships its reports without the images, so the neighbours of a query report stand in for an image
search: its nearest reports of the ``--index-split`` by TF-IDF cosine similarity of the report text
(scikit-learn), the similarity as the neighbour's score, until ``--k`` cases (distinct texts: IU has no case id,
``medvl.rag.draft.one_per_case``) are found, as ``medvl report draft`` searches. That is an easier retrieval than
from pixels (the text states the findings), so the figures measure the drafting policy on real report wording, not a
model:

- how often a draft abstains, and why (``disagree``: no consensus; ``no_wording``: a consensus finding has no
  sentence free of another patient's identifiers or of details the vote does not elect; ...);
- micro F1 of the answered drafts' positive findings against the query report's own labels (the same
  labeller), beside the nearest report's labels and the neighbours' majority (references a draft should match
  or beat: it states the majority, worded from the neighbours);
- identifier-like tokens in the drafted text: dates (3/12/2019, 10:45), numbers of 4 or more digits. Open-i
  replaced its identifiers with "XXXX" (``[redacted]`` once loaded), so what this counts is the rule, not
  real names.

    python benchmarks/drafts_iu.py --json runs/drafts_iu.json

No report text is written to the JSON or printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from medvl import load_dataset
from medvl.errors import run_script
from medvl.index.base import Hit
from medvl.index.search import first_cases
from medvl.io import write_json
from medvl.rag.draft import DEFAULT_K, draft_from_hits
from medvl.rag.labels import POSITIVE, ReportLabeller

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "iu-xray-reports"
NORMAL = "no_finding"
IDENTIFIER_LIKE = re.compile(r"(?<![\d.])\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}(?![\d.])|(?<!\d)\d{1,2}:\d{2}(?!\d)|\d{4,}")


def positives(labels: dict[str, str]) -> set[str]:
    return {name for name, status in labels.items() if status == POSITIVE and name != NORMAL}


def micro_f1(pairs: list[tuple[set[str], set[str]]]) -> float:
    tp = sum(len(truth & said) for truth, said in pairs)
    fp = sum(len(said - truth) for truth, said in pairs)
    fn = sum(len(truth - said) for truth, said in pairs)
    return 2 * tp / max(1, 2 * tp + fp + fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IU X-ray reports (folder or .tgz)")
    parser.add_argument("--split", default="test", help="the query reports")
    parser.add_argument("--index-split", default="train", help="the reports drafted from")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    data = load_dataset(args.data)
    queries = [r for r in data.select(args.split) if r.text and r.text.strip()]
    pool = [r for r in data.select(args.index_split) if r.text and r.text.strip()]
    vectorizer = TfidfVectorizer(min_df=2).fit([r.text for r in pool])
    pool_vectors, query_vectors = vectorizer.transform([r.text for r in pool]), vectorizer.transform(
        [r.text for r in queries])
    labeller = ReportLabeller()
    pool_labels = [positives(labeller.label(r.text)) for r in pool]
    abstained: Counter[str] = Counter()
    answered, answered_at, nearest, majority, flagged, sentences = [], [], [], [], 0, []
    similarities = (query_vectors @ pool_vectors.T).toarray()
    for q, record in enumerate(queries):
        # the nearest reports of k cases, as ``medvl report draft`` searches: the same report text counts once
        ranked = np.argsort(-similarities[q], kind="stable")
        hits = first_cases([Hit(id=pool[i].id, score=float(similarities[q, i]), split=pool[i].split,
                                text=pool[i].text) for i in ranked[:args.k * 20]], args.k)
        order = ranked[:len(hits)]
        truth = positives(labeller.label(record.text))
        votes = Counter(name for i in order for name in pool_labels[i])
        nearest.append((truth, pool_labels[order[0]]))
        majority.append((truth, {name for name, n in votes.items() if n > len(order) / 2}))
        draft = draft_from_hits(hits, labeller, min_similarity=0.0)
        if draft.abstained:
            abstained[str(draft.abstention)] += 1
            continue
        answered.append((truth, positives(draft.consensus)))
        answered_at.append(q)
        sentences.append(len(draft.sentences))
        flagged += bool(IDENTIFIER_LIKE.search(draft.text()))
    n = len(queries)
    results = {
        "data": str(args.data), "split": args.split, "index_split": args.index_split, "k": args.k,
        "queries": n, "index_reports": len(pool), "answered": len(answered),
        "abstention_rate": round(1 - len(answered) / n, 4),
        "abstained": dict(sorted(abstained.items())),
        "draft_micro_f1_answered": round(micro_f1(answered), 4),
        "nearest_report_micro_f1_answered": round(micro_f1([nearest[q] for q in answered_at]), 4),
        "neighbour_majority_micro_f1_answered": round(micro_f1([majority[q] for q in answered_at]), 4),
        "nearest_report_micro_f1": round(micro_f1(nearest), 4),
        "neighbour_majority_micro_f1": round(micro_f1(majority), 4),
        "mean_sentences": round(float(np.mean(sentences)), 2) if sentences else None,
        "drafts_with_identifier_like_tokens": flagged,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU",
    }
    print(f"IU X-ray drafts: {n} {args.split} reports, each from its {args.k} TF-IDF-nearest "
          f"{args.index_split} reports ({len(pool)})")
    print(f"  answered {len(answered)} ({1 - results['abstention_rate']:.1%}); abstained: "
          + ", ".join(f"{code} {count}" for code, count in results["abstained"].items()))
    print(f"  micro F1 of positive findings vs the query report's labels, on the answered queries: draft "
          f"{results['draft_micro_f1_answered']:.3f} | nearest report {results['nearest_report_micro_f1_answered']:.3f}"
          f" | neighbours' majority {results['neighbour_majority_micro_f1_answered']:.3f}")
    print(f"  on all queries: nearest report {results['nearest_report_micro_f1']:.3f} | neighbours' majority "
          f"{results['neighbour_majority_micro_f1']:.3f}")
    print(f"  sentences per draft {results['mean_sentences']}; drafts with a date or 4+ digit number: {flagged}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    run_script(main)
