"""MedPix 2.0: train a CLIP-style model on one split, score retrieval and zero-shot on another.

Runs the recipe documented in docs/benchmarks.md through the Python API (``medvl.train``,
``medvl.retrieval``, ``medvl.zero_shot``) and prints every figure beside its random-chance figure:

- image->text and text->image Recall@1/5/10 among all captions of the test split (identical
  captions of one case merged into one gallery entry; chance = ``result[direction]["chance"]``), and
  image->text again with the caption bridge over the training images (``medvl eval retrieval
  --bridge-data``, its default setting; ``result["retrieval_bridged"]``);
- zero-shot accuracy, balanced accuracy and macro AUC for ``modality``, ``plane`` and
  ``location_category`` from the prompts of the recipe's caption set (``medpix``, shipped as
  ``medvl/models/configs/captions/medpix.yaml``; chance: the
  majority-class accuracy, 1/K balanced accuracy, AUC 0.5). ``plane`` is scored twice: among
  Axial / Coronal / Sagittal (records with another plane left out) and among every plane of the
  test split.

The training settings are the ``medpix-small`` recipe (``medvl models --recipe medpix-small``), the
ones ``medvl train --model medpix-small`` uses: options left unset here keep the recipe's value.

Writes OUT/model (the trained model), OUT/metrics.jsonl, OUT/train_config.json and OUT/results.json
(every figure, the resolved settings, train time, peak RSS and the machine's load average).

    python benchmarks/medpix.py --out runs/medpix
    python benchmarks/medpix.py --hold-out 0.15 --out runs/medpix-val  # recipe selection
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import time
from pathlib import Path

import torch

import medvl
from medvl.api import parse_overrides, train_options
from medvl.data import Dataset, captions_for
from medvl.embed import embed_images
from medvl.eval.retrieval import CaptionBridge
from medvl.io import write_json
from medvl.train.recipes import RecipeSettings, resolve_recipe, train_recipe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "medpix-2.0"
MODEL = "medpix-small"  # its recipe (docs/benchmarks.md: how it was chosen) is the training setting
PLANES = ["Axial", "Coronal", "Sagittal"]


def hold_out_cases(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random ``fraction`` of the cases (all their images) held out; (kept, held out)."""
    cases = list(dict.fromkeys(r.meta.get("case_id", r.id) for r in dataset))  # first-seen order
    random.Random(seed).shuffle(cases)
    held = set(cases[:max(1, int(len(cases) * fraction))])
    return (dataset.subset([r for r in dataset if r.meta.get("case_id", r.id) not in held]),
            dataset.subset([r for r in dataset if r.meta.get("case_id", r.id) in held]))


def settings_for(args: argparse.Namespace) -> RecipeSettings:
    """The recipe of ``args.model`` with the options given on this script's command line (None: the
    recipe's), resolved exactly as ``medvl train`` resolves them."""
    options = train_options({
        "epochs": args.epochs, "seed": args.seed, "text_source": args.text_source, "loss": args.loss,
        "batch_size": args.batch_size, "lr": args.lr, "meta_text": args.meta_text,
        "meta_text_share": args.meta_text_share, "batch_group": args.batch_group,
        "batch_group_share": args.batch_group_share, "self_supervised_weight": args.self_supervised_weight,
        "supervised_weight": args.supervised_weight}, args.train_set)
    return resolve_recipe(args.model, model_overrides=parse_overrides(args.set), **options)


def train_model(train_set: Dataset, settings: RecipeSettings, out: Path,
                show_progress: bool) -> tuple[medvl.DualEncoder, dict]:
    """Train with ``settings`` on ``train_set`` (``medvl.train.recipes.train_recipe``, what ``medvl train``
    runs); returns the model and its cost: wall-clock and CPU (user + system) seconds, and the
    machine's 1-minute load average sampled at every epoch end."""
    loads: list[float] = []

    def sample_load(_model, _epoch) -> dict[str, float]:
        loads.append(os.getloadavg()[0])
        return {"load_average_1min": loads[-1]}

    started, cpu_started = time.perf_counter(), _cpu_seconds()
    model = train_recipe(settings, train_set, out, show_progress=show_progress, on_epoch_end=sample_load)
    cost = {"train_seconds": round(time.perf_counter() - started, 1),
            "train_cpu_seconds": round(_cpu_seconds() - cpu_started, 1),
            "load_average_1min_per_epoch": loads,
            "load_average_1min_mean": round(sum(loads) / len(loads), 2) if loads else None}
    return model, cost


def _cpu_seconds() -> float:
    """CPU time of this process: with other jobs on the machine, a steadier cost than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def zero_shot_tasks(test_set: Dataset) -> dict[str, tuple[str, list[int], list[str] | None]]:
    """Task name -> (label column, rows of ``test_set`` scored, class names; None = those present)."""
    every = list(range(len(test_set)))
    with_plane = [i for i, r in enumerate(test_set) if "plane" in r.labels]
    main_planes = [i for i in with_plane if test_set[i].labels["plane"] in PLANES]
    return {"modality": ("modality", every, None),
            "plane": ("plane", main_planes, PLANES),
            "plane (every plane present)": ("plane", with_plane, None),
            "location_category": ("location_category", every, None)}


def evaluate(model: medvl.DualEncoder, test_set: Dataset, bank: Dataset, show_progress: bool) -> dict:
    """Retrieval among all test captions and zero-shot per label, images embedded once; the prompts
    are the captions the model was trained with (as ``medvl eval zero-shot`` picks them). Image->text is
    scored plainly and again with the caption bridge over ``bank`` (the training images; its defaults, as
    ``medvl eval retrieval --bridge-data``)."""
    captions = captions_for(test_set, model=model)
    image_embeddings = embed_images(model, test_set, show_progress=show_progress)
    bridge = CaptionBridge.from_dataset(model, bank, show_progress=show_progress)
    result = {"retrieval": medvl.retrieval(model, test_set, image_embeddings=image_embeddings, show_progress=False),
              "retrieval_bridged": medvl.retrieval(model, test_set, image_embeddings=image_embeddings,
                                                   show_progress=False, bridge=bridge),
              "zero_shot": {}}
    for task, (label, rows, classes) in zero_shot_tasks(test_set).items():
        subset = test_set.subset([test_set[i] for i in rows])
        result["zero_shot"][task] = medvl.zero_shot(model, subset, label, captions=captions, classes=classes,
                                                    image_embeddings=image_embeddings[rows], show_progress=False)
    return result


def markdown_table(result: dict) -> str:
    """Every figure beside its random-chance figure."""
    lines = ["| task | metric | medvl | chance |", "|---|---|---|---|"]
    retrieval = result["retrieval"]
    for direction, name in (("image_to_text", "image->text"), ("text_to_image", "text->image")):
        for key, chance in retrieval[direction]["chance"].items():
            lines.append(f"| {name} ({retrieval['n_images']} images, {retrieval['n_texts']} captions) | {key} "
                         f"| {retrieval[direction][key]:.3f} | {chance:.3f} |")
    bridged = result["retrieval_bridged"]
    for key, chance in bridged["image_to_text"]["chance"].items():
        lines.append(f"| image->text, caption bridge (k {bridged['bridge']['k']}, {bridged['bridge']['bank']} "
                     f"training images) | {key} | {bridged['image_to_text'][key]:.3f} | {chance:.3f} |")
    for task, scores in result["zero_shot"].items():
        where = f"{task} zero-shot ({scores['n']} images, {len(scores['classes'])} classes)"
        lines.append(f"| {where} | accuracy | {scores['accuracy']:.3f} | {scores['chance_accuracy']:.3f} (majority) |")
        lines.append(f"| {where} | balanced accuracy | {scores['balanced_accuracy']:.3f} "
                     f"| {scores['chance_balanced_accuracy']:.3f} (1/K) |")
        lines.append(f"| {where} | macro AUC | {scores['macro_auc']:.3f} | 0.500 |")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="MedPix 2.0 folder.")
    parser.add_argument("--train-split", default="train", help="Split to train on.")
    parser.add_argument("--test-split", default="dev", help="Split to score.")
    parser.add_argument("--hold-out", type=float, default=0.0,
                        help="Score a seeded random fraction of the train split's cases instead of the "
                             "test split (trained on the rest): for choosing the recipe.")
    parser.add_argument("--hold-out-seed", type=int, default=None,
                        help="Seed that draws the --hold-out cases (default: the training seed); fixing it "
                             "trains several seeds on one split.")
    parser.add_argument("--out", type=Path, default=Path("medpix-benchmark"),
                        help="Output folder: model/, metrics.jsonl, results.json.")
    parser.add_argument("--epochs", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--model", default=MODEL, help="Registered model name (trained with its recipe).")
    parser.add_argument("--seed", type=int, default=None, help="Default: the recipe's (0).")
    parser.add_argument("--text-source", default=None, choices=["text", "both"],
                        help="Training texts: captions only, or captions and label captions half and half "
                             "(default: the recipe's).")
    parser.add_argument("--loss", default=None, choices=["clip", "siglip"], help="Default: the recipe's.")
    parser.add_argument("--batch-size", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--lr", type=float, default=None, help="Default: the recipe's.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Model config override merged over the recipe's, as `medvl train --set` "
                             "(e.g. image.image_size=192); repeatable.")
    parser.add_argument("--meta-text", default=None,
                        help="A record meta field mixed in as training text, e.g. case_diagnosis (default: recipe).")
    parser.add_argument("--meta-text-share", type=float, default=None,
                        help="Probability of drawing --meta-text when a record has it (default: the recipe's).")
    parser.add_argument("--batch-group", default=None,
                        help="Label column or meta field whose values some batches are drawn from alone (hard "
                             "negatives, e.g. location_category; default: the recipe's, none).")
    parser.add_argument("--batch-group-share", type=float, default=None,
                        help="Share of each group's full batches drawn from that group alone (default: the recipe's).")
    parser.add_argument("--supervised-weight", type=float, default=None,
                        help="Weight of supervised heads on the recipe's label columns (modality, plane, "
                             "location_category; records missing one are left out). Default: the recipe's, 0.")
    parser.add_argument("--self-supervised-weight", type=float, default=None,
                        help="Weight of the two-view self-supervised image loss (default: the recipe's, 0).")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="Any other training setting over the recipe's (repeatable), as medvl train's.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty; pass a new --out")
    if args.hold_out_seed is not None and args.hold_out <= 0:
        parser.error("--hold-out-seed needs --hold-out")
    if not 0 <= args.hold_out < 1:
        parser.error(f"--hold-out is a share of the training split's cases in [0, 1), got {args.hold_out}")
    if args.hold_out <= 0 and (args.test_split == args.train_split or "all" in (args.train_split, args.test_split)):
        # the model would be scored on its training images, and the caption bridge's bank be the scored captions
        parser.error(f"--test-split {args.test_split} overlaps --train-split {args.train_split}: score another "
                     "split, or pass --hold-out FRACTION to hold cases of the training split out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.WARNING)

    dataset = medvl.load_dataset(args.data)
    train_set = dataset.select(args.train_split)
    settings = settings_for(args)
    seed = settings.train.seed if args.hold_out_seed is None else args.hold_out_seed
    if args.hold_out > 0:
        train_set, test_set = hold_out_cases(train_set, args.hold_out, seed)
        scored = f"{args.train_split} (held-out {args.hold_out:.0%} of cases, seed {seed})"
    else:
        test_set, scored = dataset.select(args.test_split), args.test_split
    model, cost = train_model(train_set, settings, args.out, show_progress=not args.quiet)
    result = evaluate(model, test_set, train_set, show_progress=not args.quiet)
    result.update(
        data=str(args.data), train=f"{args.train_split} ({len(train_set)} images)",
        test=f"{scored} ({len(test_set)} images)", recipe=settings.to_dict(), **cost,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        machine={"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    print(f"\nMedPix 2.0: trained on {result['train']}, scored on {result['test']}\n")
    print(markdown_table(result))
    load = cost["load_average_1min_mean"]
    print(f"\ntrain time {cost['train_seconds'] / 60:.1f} min wall, {cost['train_cpu_seconds'] / 60:.1f} min CPU "
          f"({settings.train.epochs} epochs), peak RSS {result['peak_rss_mb']} MB; mean 1-min load average during "
          f"training {'not sampled (no epoch ended)' if load is None else f'{load:.1f}'} on {os.cpu_count()} CPUs")
    write_json(args.out / "results.json", result)
    return result


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)
