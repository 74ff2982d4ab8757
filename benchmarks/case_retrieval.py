"""Case retrieval quality on the phantom, end to end, through the documented CLI commands.

Runs, in-process and in order (the exact commands of docs/benchmarks.md, "Case retrieval quality"):

    medvl phantom OUT/data --n 600 --seed 0
    medvl train --data OUT/data --out OUT/train --model cxr-small --set image.image_size=96 --epochs 20 \\
        --batch-size 64 --lr 1e-3 --seed 0 --text-source text --label-column finding
    medvl index build --model OUT/train/model --data OUT/data --split train --out OUT/cases.idx
    medvl eval case-retrieval --index OUT/cases.idx --data OUT/data --split test --k 5 --json OUT/case-retrieval.json

then prints every figure beside its baseline: image->image precision@5 and mAP of label agreement
(same phantom finding) beside the class prior, and the finding F1 of drafted reports beside the
nearest single report; and the report labeller's agreement with the phantom's ground-truth labels
on every report (plus a phantom with a second finding in half the cases). Writes OUT/summary.json
(the figures, wall times, the machine's load).

    python benchmarks/case_retrieval.py --out runs/case-retrieval
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from medvl.cli.main import app
from medvl.io import write_json


def commands(out: Path, n: int, seed: int, epochs: int, k: int, split: str) -> list[tuple[str, list[str]]]:
    data, train, index = out / "data", out / "train", out / "cases.idx"
    return [
        ("phantom", ["phantom", str(data), "--n", str(n), "--seed", str(seed)]),
        ("train", ["train", "--data", str(data), "--out", str(train), "--model", "cxr-small",
                   "--set", "image.image_size=96", "--epochs", str(epochs), "--batch-size", "64", "--lr", "1e-3",
                   "--seed", str(seed), "--text-source", "text", "--label-column", "finding"]),
        ("index", ["index", "build", "--model", str(train / "model"), "--data", str(data), "--split", "train",
                   "--out", str(index)]),
        ("eval", ["eval", "case-retrieval", "--index", str(index), "--data", str(data), "--split", split,
                  "--k", str(k), "--json", str(out / "case-retrieval.json")]),
    ]


def run(argv: list[str], quiet: bool) -> float:
    """Run one ``medvl`` command in-process; returns its wall time, raises on a non-zero exit."""
    started = time.perf_counter()
    code = app(argv + (["--quiet"] if quiet else []),
               standalone_mode=False)
    if code not in (None, 0):
        raise SystemExit(f"medvl {' '.join(argv)} exited with {code}")
    return time.perf_counter() - started


def labeller_agreement(data: Path) -> dict:
    """The report labeller against the phantom's ground truth (its binary label columns), on every report."""
    from medvl import load_dataset
    from medvl.data.phantom import FINDINGS, LABEL_COLUMNS
    from medvl.rag import ReportLabeller

    labeller = ReportLabeller()
    truth, read = [], []
    for record in load_dataset(data):
        truth.append({labeller.knowledge.resolve(c) for c in LABEL_COLUMNS if record.labels[c] == "1"})
        read.append(labeller.positives(record.text) & set(FINDINGS))
    cells = [(name in t) == (name in r) for t, r in zip(truth, read, strict=True) for name in FINDINGS]
    return {"reports": len(truth), "exact_match": sum(t == r for t, r in zip(truth, read, strict=True)) / len(truth),
            "finding_agreement": sum(cells) / len(cells), "multi_finding_reports": sum(len(t) > 1 for t in truth)}


def table(result: dict) -> str:
    k, draft, nearest = result["k"], result["draft"], result["nearest_report"]
    rows = [
        ("metric", "medvl", "baseline", "baseline is"),
        ("---", "---", "---", "---"),
        (f"image->image precision@{k} (same finding)", result["precision_at_k"], result["precision_at_k_baseline"],
         "class prior"),
        ("image->image mAP (same finding)", result["map"], result["map_baseline"], "random ranking"),
        (f"drafted report finding micro F1 (k={draft['k']})", draft["micro_f1"], nearest["micro_f1"],
         "nearest single report"),
        ("drafted report finding macro F1", draft["macro_f1"], nearest["macro_f1"], "nearest single report"),
        ("micro F1 on the queries the draft answers", draft["answered_micro_f1"], nearest["answered_micro_f1"],
         "nearest single report"),
        ("draft abstention rate", draft["abstention_rate"], None, ""),
    ]
    return "\n".join("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/case-retrieval"))
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--split", default="test")
    parser.add_argument("--overwrite", action="store_true", help="Delete OUT first.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args()
    if args.overwrite:
        shutil.rmtree(args.out, ignore_errors=True)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} exists and is not empty; pass --overwrite or another --out")
    seconds, loads = {}, {}
    for name, argv in commands(args.out, args.n, args.seed, args.epochs, args.k, args.split):
        seconds[name] = round(run(argv, args.quiet), 1)
        loads[name] = round(os.getloadavg()[0], 2)
    result = json.loads((args.out / "case-retrieval.json").read_text())
    multi = args.out / "labeller-check"  # the same generator with a second finding in half the cases
    run(["phantom", str(multi), "--n", str(args.n), "--seed", str(args.seed), "--extra-finding-prob", "0.5"], True)
    labeller = {"single_finding": labeller_agreement(args.out / "data"), "multi_finding": labeller_agreement(multi)}
    summary = {"table": table(result), "result": result, "labeller": labeller, "seconds": seconds,
               "load_average_after": loads,
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "commands": [" ".join(["medvl", *argv]) for _, argv in commands(args.out, args.n, args.seed,
                                                                                args.epochs, args.k, args.split)]}
    write_json(args.out / "summary.json", summary)
    print(f"\nphantom: {args.n} cases, seed {args.seed}; {result['n_queries']} {args.split} queries against "
          f"{result['n_index']} indexed train cases\n")
    print(summary["table"])
    for name, check in labeller.items():
        print(f"report labeller vs phantom labels ({name.replace('_', ' ')}, {check['reports']} reports, "
              f"{check['multi_finding_reports']} with two findings): exact {check['exact_match']:.3f}, "
              f"per finding {check['finding_agreement']:.3f}")
    print(f"\nwall seconds per step: {seconds}; 1-min load average after each: {loads}")


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
