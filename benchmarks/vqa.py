"""VQA benchmark: VQA-RAD (a seeded share of trainset questions held out, or an official test file)
and phantom VQA (held-out patients), each beside the blank-image and question-only baselines and, for
VQA-RAD, the published references on the standard test split (see docs/benchmarks.md, VQA).

    python benchmarks/vqa.py --out runs/vqa            # both
    python benchmarks/vqa.py --out runs/vqa --only rad # VQA-RAD only
    python benchmarks/vqa.py --out runs/vqa --only rad --test-data testset.json   # train on all of
        # trainset.json, score the test file (its split name is its stem minus "set")

The VQA-RAD recipe pretrains its image tower on MedPix 2.0 captions first (``--medpix``), leaving out
every MedPix image that a scored question file asks about (``--leave-out-images-of``: MedPix and
VQA-RAD share source images), then trains the VQA model on that frozen tower:

    medvl train --data MEDPIX --split train --model medpix-small --epochs 10 \
        --leave-out-images-of trainset.json [--leave-out-images-of testset.json] --out OUT/medpix-dual
    medvl train vqa --data trainset.json --holdout 0.15 --seed 0 --init OUT/medpix-dual/model \
        --image-lr-scale 0 --no-augment --epochs 15 --batch-size 128 --lr 2e-3 --out OUT/vqa-rad

(the medpix-small recipe with 10 epochs instead of its 20, as measured: docs/benchmarks.md, VQA.)
Each run is ``medvl train vqa`` then ``medvl eval vqa --json``; the commands are printed as run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {  # VQA-RAD standard test split (451 questions): open / closed / overall accuracy, %
    "MEVF+BAN": (43.9, 75.1, 62.7),
    "MMQ": (53.7, 75.8, 67.0),
    "PubMedCLIP": (60.1, 80.0, 72.1),
    "BiomedGPT-B": (60.9, 81.3, 73.2),
}
MEDPIX_DUAL = ["--split", "train", "--model", "medpix-small", "--epochs", "10", "--seed", "0", "--quiet"]
RAD = ["--image-lr-scale", "0", "--no-augment", "--batch-size", "128", "--lr", "2e-3", "--epochs", "15", "--seed", "0",
       "--quiet"]
PHANTOM_DATA = ["--n", "1500", "--size", "64", "--seed", "0", "--vqa", "--vqa-per-case", "6"]
# phantom-tiny's ResNet without its stem max-pool: a 4 x 4 token grid per 64 px film
PHANTOM = ["--image-model", "phantom-tiny", "--image-size", "64", "--set", "image.no_max_pool=true",
           "--hidden-size", "128", "--no-augment", "--batch-size", "64", "--lr", "2e-3", "--epochs", "5", "--quiet"]


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    start = time.time()
    done = subprocess.run(command)
    if done.returncode:  # medvl said why on stderr (one line for bad input)
        raise SystemExit(done.returncode)
    return time.time() - start


def vqa_rad(out: Path, data: Path, medpix: Path, test_data: Path | None) -> dict:
    """The MedPix-pretrained image tower (scored questions' images left out), then VQA on it."""
    dual = out / "medpix-dual"
    scored = [data] if test_data is None else [data, test_data]
    if not (dual / "model").exists():
        run(["medvl", "train", "--data", str(medpix), "--out", str(dual), *MEDPIX_DUAL,
             *[arg for path in scored for arg in ("--leave-out-images-of", str(path))]])
    model = out / "vqa-rad"
    split = ["--holdout", "0.15"] if test_data is None else []
    seconds = run(["medvl", "train", "vqa", "--data", str(data), "--out", str(model), *split,
                   "--init", str(dual / "model"), *RAD])
    scores = out / "vqa-rad.json"
    target = ["--data", str(data), "--split", "heldout"] if test_data is None else ["--data", str(test_data)]
    run(["medvl", "eval", "vqa", "--model", str(model), *target, "--json", str(scores), "--overwrite", "--quiet"])
    return {"train_seconds": seconds, **json.loads(scores.read_text())}


def phantom(out: Path) -> dict:
    data = out / "phantom"
    if not data.exists():
        run(["medvl", "phantom", str(data), *PHANTOM_DATA, "--quiet"])
    model = out / "phantom-model"
    seconds = run(["medvl", "train", "vqa", "--data", str(data / "vqa"), "--out", str(model), *PHANTOM])
    scores = out / "phantom.json"
    run(["medvl", "eval", "vqa", "--model", str(model), "--data", str(data / "vqa"), "--split", "test",
         "--json", str(scores), "--overwrite", "--quiet"])
    return {"train_seconds": seconds, **json.loads(scores.read_text())}


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_rad(result: dict) -> None:
    print(f"\nVQA-RAD, {result['n']} scored questions ({result['n_open']} open, {result['n_closed']} "
          f"closed), trained in {result['train_seconds']:.0f} s")
    print(f"{'model':<34}{'open':>7}{'closed':>8}{'overall':>9}")
    print(f"{'medvl VQA (' + result['split'] + ')':<34}{percent(result['open_accuracy']):>7}"
          f"{percent(result['closed_accuracy']):>8}{percent(result['overall_accuracy']):>9}")
    for prefix, name in (("blank_image_", "  same model, blank images"), ("question_only_", "  question-only prior")):
        print(f"{name:<34}{percent(result[prefix + 'open_accuracy']):>7}"
              f"{percent(result[prefix + 'closed_accuracy']):>8}{percent(result[prefix + 'overall_accuracy']):>9}")
    for name, (open_, closed, overall) in PUBLISHED.items():
        print(f"{name + ' (standard test split)':<34}{open_:>7.1f}{closed:>8.1f}{overall:>9.1f}")


def print_types(result: dict, title: str) -> None:
    print(f"\n{title}: accuracy per question type ({result['n']} questions), trained in "
          f"{result['train_seconds']:.0f} s")
    print(f"{'type':<14}{'n':>5}{'model':>8}{'blank':>8}{'q-only':>8}")
    for name, row in result["per_question_type"].items():
        print(f"{name:<14}{row['n']:>5}{percent(row['accuracy']):>8}{percent(row['blank_image_accuracy']):>8}"
              f"{percent(row['question_only_accuracy']):>8}")
    print(f"{'overall':<14}{result['n']:>5}{percent(result['overall_accuracy']):>8}"
          f"{percent(result['blank_image_overall_accuracy']):>8}{percent(result['question_only_overall_accuracy']):>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "vqa")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "vqa-rad" / "trainset.json")
    parser.add_argument("--test-data", type=Path, default=None,
                        help="A VQA-RAD test question file: train on all of --data, score this file.")
    parser.add_argument("--medpix", type=Path, default=ROOT.parent / "shared" / "data" / "medpix-2.0",
                        help="MedPix 2.0 folder for the image tower's pretraining.")
    parser.add_argument("--only", choices=("rad", "phantom"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only != "phantom":
        result = vqa_rad(args.out, args.data, args.medpix, args.test_data)
        print_rad(result)
        print_types(result, "VQA-RAD")
    if args.only != "rad":
        print_types(phantom(args.out), "Phantom VQA (held-out patients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
