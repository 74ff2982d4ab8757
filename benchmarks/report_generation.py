"""Report generation, end to end through the documented CLI commands, beside the nearest-report baseline.

Phantom (``--dataset phantom``; docs/benchmarks.md, "Report generation"), in-process and in order:

    medvl phantom OUT/data --n 600 --seed 0 --size 64
    medvl train --data OUT/data --out OUT/dual --model phantom-tiny --epochs 10 --batch-size 32 --lr 2e-3 \\
        --seed 0 --text-source text
    medvl train report --data OUT/data --out OUT/report --init OUT/dual/model --epochs 20 --batch-size 32 \\
        --lr 1e-3 --seed 0
    medvl eval report --model OUT/report --data OUT/data --split test --beam-size 3 --json OUT/report-eval.json

MedPix 2.0 captions (``--dataset medpix --data ../shared/data/medpix-2.0``): the same with the medpix-small
dual encoder (its recipe) instead of the phantom steps, train -> dev. ``--image-model NAME`` skips the
dual encoder: the generator's image tower starts from scratch with NAME's architecture and the
baseline retrieves with the generator's own (mean-pooled) image features.

``--retrieval K`` also builds an index of the training split with the dual encoder and trains and
evaluates a second generator given the reports of the K nearest training cases as context
(``--index OUT/cases.idx --context-k K``). Prints every figure beside the nearest-report baseline
and writes OUT/summary.json (figures, wall times, the machine's load).

    python benchmarks/report_generation.py --out runs/report-phantom
    python benchmarks/report_generation.py --dataset medpix --data ../shared/data/medpix-2.0 --out runs/report-medpix
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from medvl.cli.main import app
from medvl.io import write_json

METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "micro_precision", "micro_recall", "micro_f1",
           "macro_f1")


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    out, seed = args.out, str(args.seed)
    if args.dataset == "phantom":
        data = out / "data"
        steps = [("phantom", ["phantom", str(data), "--n", str(args.n), "--seed", seed, "--size", "64"]),
                 ("train dual encoder", ["train", "--data", str(data), "--out", str(out / "dual"), "--model",
                                         "phantom-tiny", "--epochs", "10", "--batch-size", "32", "--lr", "2e-3",
                                         "--seed", seed, "--text-source", "text"])]
        test_split = "test"
    else:
        data = args.data
        steps = [("train dual encoder", ["train", "--data", str(data), "--out", str(out / "dual"), "--model",
                                         "medpix-small", "--split", "train", "--seed", seed])]
        test_split = "dev"
    start = ["--init", str(out / "dual" / "model")]
    if args.image_model:  # no dual encoder: the image tower from scratch, the baseline on its own features
        steps = [step for step in steps if step[0] != "train dual encoder"]
        start = ["--image-model", args.image_model]
    report = ["train", "report", "--data", str(data), *start, "--epochs", str(args.epochs), "--batch-size", "32",
              "--lr", str(args.lr), "--seed", seed, "--split", "train"]
    steps += [("train report generator", [*report, "--out", str(out / "report")]),
              ("eval report generator", ["eval", "report", "--model", str(out / "report"), "--data", str(data),
                                         "--split", test_split, "--beam-size", "3", "--json",
                                         str(out / "report-eval.json")])]
    if args.retrieval:
        index = out / "cases.idx"
        steps += [("index", ["index", "build", "--model", str(out / "dual" / "model"), "--data", str(data),
                             "--split", "train", "--out", str(index)]),
                  ("train report generator with context", [*report, "--out", str(out / "report-rag"), "--index",
                                                           str(index), "--context-k", str(args.retrieval)]),
                  ("eval report generator with context", [
                      "eval", "report", "--model", str(out / "report-rag"), "--data", str(data), "--split",
                      test_split, "--beam-size", "3", "--index", str(index), "--json",
                      str(out / "report-rag-eval.json")])]
    return steps


def run(argv: list[str]) -> float:
    """Run one ``medvl`` command in-process; returns its wall time, raises on a non-zero exit."""
    started = time.perf_counter()
    code = app([*argv, "--quiet"], standalone_mode=False)
    if code not in (None, 0):
        raise SystemExit(f"medvl {' '.join(argv)} exited with {code}")
    return time.perf_counter() - started


def print_figures(title: str, result: dict) -> None:
    ours, nearest = result["generator"], result["nearest_report"]
    print(f"\n{title}: {result['n']} test reports, beam {result['beam_size']}; baseline = report of the most "
          f"similar of {result['n_train']} training images ({result['baseline_encoder']['kind']}, "
          f"{result['baseline_encoder']['name']})")
    print(f"{'metric':<18}{'generator':>11}{'nearest report':>16}")
    for key in METRICS:
        value, base = ours[key], nearest[key]
        print(f"{key:<18}{_fmt(value):>11}{_fmt(base):>16}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", choices=("phantom", "medpix"), default="phantom")
    parser.add_argument("--data", type=Path, help="MedPix 2.0 folder (--dataset medpix)")
    parser.add_argument("--n", type=int, default=600, help="phantom cases")
    parser.add_argument("--epochs", type=int, default=20, help="report generator epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="report generator peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-model", help="train the generator's image tower from scratch with this registered "
                        "config's architecture (no dual encoder step; the baseline retrieves with the generator's "
                        "own image features)")
    parser.add_argument("--retrieval", type=int, default=0, help="also train with the reports of K retrieved cases")
    parser.add_argument("--skip-done", action="store_true", help="skip steps whose output exists (rerun the rest)")
    args = parser.parse_args()
    if args.dataset == "medpix" and args.data is None:
        parser.error("--dataset medpix needs --data")
    args.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    for name, argv in commands(args):
        target = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
        if argv[0] == "phantom":
            target = Path(argv[1])
        if args.skip_done and target is not None and target.exists():
            continue
        if args.skip_done and "--json" in argv and Path(argv[argv.index("--json") + 1]).exists():
            continue
        print(f"$ medvl {' '.join(argv)}", flush=True)
        times[name] = round(run(argv), 1)
        print(f"  {times[name]:.0f} s", flush=True)
    summary = {"dataset": args.dataset, "times_s": times, "load_average": os.getloadavg(),
               "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}
    for name, file in (("generator", "report-eval.json"), ("generator with retrieved context", "report-rag-eval.json")):
        path = args.out / file
        if path.exists():
            result = json.loads(path.read_text())
            print_figures(name, result)
            summary[name] = {"generator": {k: result["generator"][k] for k in METRICS},
                             "nearest_report": {k: result["nearest_report"][k] for k in METRICS},
                             "seconds": result["seconds"], "empty_reports": result["empty_reports"]}
    write_json(args.out / "summary.json", summary)


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)  # a medvl error (a missing data path or model) is one line, not a traceback
