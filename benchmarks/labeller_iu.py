"""The report labeller (``medvl.rag.labels``) against the IU X-ray (Open-i) MeSH terms, per finding.

Each report's text (FINDINGS + IMPRESSION, as ``medvl.load_dataset`` gives it) is labelled by the
rule-based labeller; the result is compared, report by report, with the manual MeSH ``major`` terms
of the same report. The two sides are mapped explicitly in ``PAIRS`` below: a row is positive for
the labeller when any of its knowledge-base findings is, and positive for MeSH when any of its MeSH
terms is indexed (a term is ``head`` or ``head/qualifier``: "cardiac shadow/enlarged" matches
``Cardiac Shadow/enlarged/mild`` and not ``Cardiac Shadow/borderline``). ``normal`` is MeSH's
``normal`` status (the report's only term) against the labeller's ``no_finding``.

The labeller says positive, uncertain or negative (or nothing: never mentioned). Both ways of
reading "uncertain" are scored: ``uncertain_negative`` (only positive counts, the headline) and
``uncertain_positive`` (positive or uncertain counts). Per row and way: support (MeSH positives),
the confusion counts, precision, recall, F1 and Cohen's kappa. Reports indexed only ``No
Indexing`` / ``Technical Quality of Image Unsatisfactory`` have no MeSH labels and are left out.

    python benchmarks/labeller_iu.py --split train --split val --examples 5   # development
    python benchmarks/labeller_iu.py --split test --json runs/labeller_iu.json  # the figures

``--examples N`` prints, per row, N disagreements drawn at random (seeded): the report id, the
MeSH terms and the sentences that caused the labeller's answer. That is report text: the public,
de-identified Open-i reports, printed to the terminal on request only and never written to the JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

from medvl import load_dataset
from medvl.io import write_json
from medvl.rag.labels import NEGATIVE, POSITIVE, UNCERTAIN, ReportLabeller

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "iu-xray-reports"
WAYS = {"uncertain_negative": (POSITIVE,), "uncertain_positive": (POSITIVE, UNCERTAIN)}
HEADLINE = "uncertain_negative"
NORMAL_STATUS = "status=normal"  # the MeSH side of the normal row: the report's only term is "normal"
# normal within the compared vocabulary: MeSH indexes none of the rows' terms, the labeller finds none of the rows'
# findings positive or uncertain (MeSH's "normal" also excludes granulomas, a tortuous aorta, spine degeneration...)
NONE_COMPARED = "none of the compared findings"


@dataclass(frozen=True)
class Pair:
    """One compared finding: the labeller's knowledge-base findings and the MeSH terms that mean it."""

    name: str
    labeller: tuple[str, ...]  # knowledge-base finding names
    mesh: tuple[str, ...]  # lower-case MeSH heads, "head/qualifier" for a head only with that qualifier


PAIRS = [
    Pair("normal", ("no_finding",), (NORMAL_STATUS,)),
    # MeSH indexes "enlarged cardiac silhouette" as Cardiac Shadow/enlarged as often as Cardiomegaly
    Pair("cardiomegaly", ("cardiomegaly",), ("cardiomegaly", "cardiac shadow/enlarged")),
    # blunted costophrenic angles are an effusion for the labeller (CheXpert's rule) and their own MeSH term
    Pair("effusion", ("pleural_effusion",), ("pleural effusion", "costophrenic angle/blunted")),
    Pair("opacity/consolidation", ("lung_opacity", "consolidation"),
         ("opacity", "consolidation", "infiltrate", "airspace disease")),
    Pair("nodule", ("nodule",), ("nodule",)),
    Pair("pneumothorax", ("pneumothorax",), ("pneumothorax", "hydropneumothorax")),
    Pair("atelectasis", ("atelectasis",), ("pulmonary atelectasis",)),
    Pair("edema", ("edema",), ("pulmonary edema", "pulmonary congestion")),
    Pair("emphysema", ("emphysema",), ("emphysema", "pulmonary emphysema", "pulmonary disease, chronic obstructive",
                                       "lung/hyperdistention")),
    Pair("pneumonia", ("pneumonia",), ("pneumonia",)),
    Pair("mass", ("mass",), ("mass",)),
    Pair("fracture", ("fracture",), ("fractures, bone",)),
    Pair("hernia", ("hernia",), ("hernia, hiatal", "hernia, diaphragmatic")),
]
FINDING_PAIRS = [pair for pair in PAIRS if pair.mesh != (NORMAL_STATUS,)]
PAIRS.append(Pair("no compared finding", (NONE_COMPARED,), (NONE_COMPARED,)))


def mesh_terms(record) -> list[list[str]]:
    """The report's major MeSH terms as lists of lower-case parts (head first)."""
    terms = [term for term in record.meta.get("mesh_major", "").split("; ") if term.strip()]
    return [[part.strip().lower() for part in term.split("/")] for term in terms]


def mesh_positive(pair: Pair, record, terms: list[list[str]]) -> bool:
    if pair.mesh == (NORMAL_STATUS,):
        return record.labels.get("status") == "normal"
    if pair.mesh == (NONE_COMPARED,):
        return not any(mesh_positive(other, record, terms) for other in FINDING_PAIRS)
    for wanted in pair.mesh:
        head, _, qualifier = wanted.partition("/")
        if any(parts[0] == head and (not qualifier or qualifier in parts[1:]) for parts in terms):
            return True
    return False


def labeller_status(pair: Pair, labels: dict[str, str]) -> str | None:
    """The strongest status among the pair's findings (None: none mentioned)."""
    ranked = [POSITIVE, UNCERTAIN, NEGATIVE]
    if pair.labeller == (NONE_COMPARED,):
        found_any = any(labeller_status(other, labels) in (POSITIVE, UNCERTAIN) for other in FINDING_PAIRS)
        return NEGATIVE if found_any else POSITIVE
    found = [labels[name] for name in pair.labeller if name in labels]
    return min(found, key=ranked.index) if found else None


def agreement(truth: list[bool], predicted: list[bool]) -> dict:
    """Confusion counts, precision, recall, F1 and Cohen's kappa of two binary lists."""
    tp = sum(t and p for t, p in zip(truth, predicted, strict=True))
    fp = sum(p and not t for t, p in zip(truth, predicted, strict=True))
    fn = sum(t and not p for t, p in zip(truth, predicted, strict=True))
    n = len(truth)
    tn = n - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    observed = (tp + tn) / n if n else None
    expected = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2 if n else None
    kappa = (observed - expected) / (1 - expected) if n and expected is not None and expected < 1 else None
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall, "f1": f1,
            "kappa": kappa}


def compare(records, labeller: ReportLabeller) -> tuple[dict, list[dict]]:
    """Per pair: support, the labeller's statuses on MeSH positives / negatives, and both ways'
    agreement; plus one row per report (id, MeSH truth and labeller status per pair) for examples."""
    rows = []
    for record in records:
        labels, terms = labeller.label(record.text), mesh_terms(record)
        rows.append({"record": record, "truth": {p.name: mesh_positive(p, record, terms) for p in PAIRS},
                     "status": {p.name: labeller_status(p, labels) for p in PAIRS}})
    result = {}
    for pair in PAIRS:
        truth = [row["truth"][pair.name] for row in rows]
        statuses = [row["status"][pair.name] for row in rows]
        seen = {side: {str(s): sum(1 for t, st in zip(truth, statuses, strict=True) if t == want and st == s)
                       for s in (POSITIVE, UNCERTAIN, NEGATIVE, None)}
                for side, want in (("mesh_positive", True), ("mesh_negative", False))}
        result[pair.name] = {
            "labeller": list(pair.labeller), "mesh": list(pair.mesh), "support": sum(truth),
            "labeller_status": seen,
            **{way: agreement(truth, [s in counted for s in statuses]) for way, counted in WAYS.items()},
        }
    return result, rows


def culprit_sentences(pair: Pair, record, labeller: ReportLabeller, abnormal: set[str]) -> list[str]:
    """The sentences behind the labeller's answer for a pair: those mentioning its findings (for
    normal: those with an abnormal finding positive or uncertain)."""
    shown = []
    for sentence in labeller.sentences(record.text):
        if pair.name == "normal":
            hits = {f: s for f, s in sentence.findings.items() if f in abnormal and s != NEGATIVE}
        elif pair.labeller == (NONE_COMPARED,):
            compared = {name for other in FINDING_PAIRS for name in other.labeller}
            hits = {f: s for f, s in sentence.findings.items() if f in compared and s != NEGATIVE}
        else:
            hits = {f: s for f, s in sentence.findings.items() if f in pair.labeller}
        if hits:
            text = sentence.text if len(sentence.text) <= 160 else sentence.text[:157] + "..."
            shown.append(f"{text}  -> {', '.join(f'{f}={s}' for f, s in hits.items())}")
    return shown


def print_examples(rows: list[dict], labeller: ReportLabeller, n: int, seed: int) -> None:
    abnormal = set(labeller.knowledge.abnormal)
    counted = WAYS[HEADLINE]
    for pair in PAIRS:
        wrong = [row for row in rows if row["truth"][pair.name] != (row["status"][pair.name] in counted)]
        print(f"\n## {pair.name}: {len(wrong)} disagreements ({HEADLINE}), {min(n, len(wrong))} shown")
        for row in random.Random(seed).sample(wrong, min(n, len(wrong))):
            record = row["record"]
            kind = "missed (MeSH yes)" if row["truth"][pair.name] else "extra (MeSH no)"
            print(f"- {record.id} [{kind}, labeller {row['status'][pair.name]}] MeSH: {record.meta.get('mesh_major')}")
            for line in culprit_sentences(pair, record, labeller, abnormal) or ["(no mention)"]:
                print(f"    {line}")


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def table(result: dict) -> str:
    """Markdown table: headline way (uncertain as negative) and F1 / kappa with uncertain as positive."""
    lines = ["| finding | support | TP | FP | FN | TN | precision | recall | F1 | kappa | F1 (u=pos) | kappa (u=pos) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result.items():
        head, alt = row[HEADLINE], row["uncertain_positive"]
        cells = [name, row["support"], head["tp"], head["fp"], head["fn"], head["tn"], head["precision"],
                 head["recall"], head["f1"], head["kappa"], alt["f1"], alt["kappa"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="NLMCXR_reports.tgz or its folder.")
    parser.add_argument("--split", action="append", help="Split(s) to score (repeatable); default test.")
    parser.add_argument("--json", type=Path, help="Write every figure to this JSON file.")
    parser.add_argument("--examples", type=int, default=0, help="Print N disagreement examples per finding.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the example draw.")
    args = parser.parse_args()
    splits = args.split or ["test"]
    started = time.perf_counter()
    dataset = load_dataset(args.data)
    unknown = [split for split in splits if split not in dataset.splits]
    if unknown:  # an empty table would read as a result
        parser.error(f"{args.data}: no split {', '.join(map(repr, unknown))}; splits present: "
                     f"{', '.join(dataset.splits)}")
    chosen = [r for r in dataset if r.split in splits]
    records = [r for r in chosen if "status" in r.labels]
    labeller = ReportLabeller()
    result, rows = compare(records, labeller)
    seconds = time.perf_counter() - started
    print(f"IU X-ray reports, split {'+'.join(splits)}: {len(records)} with MeSH labels "
          f"({len(chosen) - len(records)} unlabelled left out); {seconds:.1f} s\n")
    print(table(result))
    print("\nheadline: uncertain counted as negative; u=pos: uncertain counted as positive")
    if args.examples:
        print_examples(rows, labeller, args.examples, args.seed)
    if args.json:
        write_json(args.json, {
            "data": args.data.name, "splits": splits, "reports": len(records),
            "unlabelled_left_out": len(chosen) - len(records), "headline": HEADLINE,
            "ways": {way: list(statuses) for way, statuses in WAYS.items()}, "findings": result,
            "table": table(result), "seconds": round(seconds, 1),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        })


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
