"""ISIC melanoma vs nevus, (repeated) 5-fold cross-validation, with references computed on the same folds.

Runs the ``derm-small`` recipe documented in docs/benchmarks.md (``medvl bench cv``; the training
settings are the config's recipe, ``medvl models --recipe derm-small``, which ``medvl train`` uses too) and,
on exactly the same folds, two non-deep baselines (logistic regression, C picked by 3-fold CV
inside each training fold, on colour histograms / on 16x16 downsampled pixels) and chance (a
constant score, AUC 0.5), and the patients' age and sex alone (``medvl.eval.covariates``: logistic
regression fitted on the training folds; no image). With covariates (the recipe's, or ``--covariates
age_approx,sex``) the head and the probe are also scored fused with that age-and-sex model. Prints a
Markdown table of per-fold and mean ± std AUC; with ``--repeats N`` the whole CV is repeated with fold
seeds seed .. seed + N - 1 and the table gives each repeat's mean, the mean ± std over all N x 5 folds
and each repeat's pooled out-of-fold AUC.

    OMP_NUM_THREADS=1 python benchmarks/isic.py --json isic-cv.json   # 1 thread: shared CPU
    OMP_NUM_THREADS=1 python benchmarks/isic.py --repeats 3 --json isic-cv3.json   # seeds 0, 1, 2
    python benchmarks/isic.py --baselines-only   # seconds, no training
    OMP_NUM_THREADS=1 python benchmarks/isic.py --covariates age_approx,sex   # + head and probe fused with age, sex
    OMP_NUM_THREADS=1 python benchmarks/isic.py --seed 100 --set image.test_time_orientations=1   # a candidate

After the table, the head's pooled out-of-fold AUC is split by the image audit (``medvl audit``): on the
images it does not flag, and on the streaked ones (in the shared copy, a quarter of the files have every
row identical: the lesion is gone), so a figure can be read against what the images still hold.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from medvl.api import parse_key_values, parse_overrides
from medvl.bench.cv import make_folds, repeated_cross_validate
from medvl.data import load_dataset
from medvl.data.audit import CONTENT_FLAGS, audit_dataset, flagged_ids
from medvl.data.images import read_image
from medvl.eval.covariates import CovariateModel, parse_columns
from medvl.eval.head import class_order, class_targets
from medvl.eval.linear_probe import fit_and_score
from medvl.eval.metrics import classification_metrics
from medvl.io import write_json
from medvl.train.recipes import resolve_recipe

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "isic-dermoscopy"
LABEL = "diagnosis"
MODEL = "derm-small"  # its recipe (docs/benchmarks.md: how it was chosen) is the training setting


def colour_histogram(image: np.ndarray, bins: int = 8) -> np.ndarray:
    """Joint RGB histogram (bins^3, normalised) plus per-channel mean and standard deviation."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    joint, _ = np.histogramdd(pixels, bins=(bins,) * 3, range=[(0, 256)] * 3)
    return np.concatenate([joint.ravel() / len(pixels), pixels.mean(0) / 255, pixels.std(0) / 255])


def downsampled_pixels(image: np.ndarray, side: int = 16) -> np.ndarray:
    """The image area-averaged to side x side RGB, flattened, in [0, 1]."""
    h, w = (image.shape[0] // side) * side, (image.shape[1] // side) * side
    blocks = image[:h, :w].reshape(side, h // side, side, w // side, 3).astype(np.float64)
    return blocks.mean(axis=(1, 3)).ravel() / 255


def baseline(features: np.ndarray, y: np.ndarray, classes: list[str], splits: list) -> dict:
    """Per-fold AUC of the linear probe's logistic regression (C by 3-fold CV inside the training fold)."""
    return _row([[fit_and_score(features[train], y[train], features[test], y[test], classes, cv=True)["macro_auc"]
                  for train, test in folds] for folds in splits], None)


def covariates_only(dataset, columns: list[str], y: np.ndarray, classes: list[str], splits: list) -> dict:
    """Per-fold AUC of a logistic regression on the records' metadata ``columns`` (no image)."""
    records = dataset.records
    return _row([[classification_metrics(y[test], CovariateModel.fit(
        [records[i] for i in train], y[train], len(classes), columns).probabilities([records[i] for i in test]),
        classes)["macro_auc"] for train, test in folds] for folds in splits], None)


def chance(y: np.ndarray, classes: list[str], splits: list) -> dict:
    """A constant score: AUC 0.5 on every fold."""
    return _row([[classification_metrics(y[test], np.full((len(test), len(classes)), 1 / len(classes)),
                                         classes)["macro_auc"] for _, test in folds] for folds in splits],
                [0.5] * len(splits))


def _row(repeats: list[list[float]], pooled: list[float] | None) -> dict:
    """AUCs per repeat and fold -> every fold, the mean and sample std over all folds, pooled per repeat."""
    aucs = [auc for repeat in repeats for auc in repeat]
    return {"folds": aucs, "repeats": repeats, "mean": float(np.mean(aucs)), "std": float(np.std(aucs, ddof=1)),
            "pooled": pooled}


def audit_breakdown(cv: dict, flagged: set[str], classes: list[str], labels: dict[str, str]) -> dict:
    """Pooled out-of-fold head AUC per repeat on all images, on those the audit does not flag, on the
    flagged ones; with the count of each."""
    out: dict[str, dict] = {}
    for name, keep in (("all images", lambda i: True), ("not flagged", lambda i: i not in flagged),
                       ("flagged (streaked)", lambda i: i in flagged)):
        aucs, count = [], 0
        for repeat in cv["repeats"]:
            ids = [i for fold in repeat["folds"] for i in fold["test_ids"]]
            scores = np.concatenate([np.array(fold["probabilities"]) for fold in repeat["folds"]])
            chosen = [k for k, i in enumerate(ids) if keep(i)]
            y = np.array([classes.index(labels[ids[k]]) for k in chosen])
            count = len(chosen)
            aucs.append(classification_metrics(y, scores[chosen], classes)["macro_auc"] if len(set(y)) > 1 else None)
        out[name] = {"images": count, "auc_pooled": aucs,
                     "melanoma": int(sum(labels[i] == "melanoma" for i in labels if keep(i)))}
    return out


def markdown_table(rows: dict[str, dict]) -> str:
    """One column per fold for a single CV; one per repeat (its mean over folds) when repeated."""
    first = next(iter(rows.values()))["repeats"]
    repeated = len(first) > 1
    columns = [f"repeat {r + 1} mean" for r in range(len(first))] if repeated else \
        [f"fold {i + 1}" for i in range(len(first[0]))]
    header = ["method", *columns, "mean ± std" + (f" ({len(first) * len(first[0])} folds)" if repeated else ""),
              "pooled" + (" per repeat" if repeated else "")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        values = [float(np.mean(r)) for r in row["repeats"]] if repeated else row["folds"]
        pooled = "-" if row["pooled"] is None else ", ".join(f"{a:.3f}" for a in row["pooled"])
        cells = [f"{a:.3f}" for a in values] + [f"{row['mean']:.3f} ± {row['std']:.3f}", pooled]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="ISIC folder (metadata.csv + images/).")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the folds and of training.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Repeat the CV with fold seeds seed .. seed + repeats - 1.")
    parser.add_argument("--epochs", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--json", type=Path, default=None, help="Write every figure here.")
    parser.add_argument("--baselines-only", action="store_true", help="Skip the deep recipe.")
    parser.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                        help="Model config override over the recipe's (repeatable), e.g. image.image_size=96.")
    parser.add_argument("--skip-flagged", action="store_true", default=None,
                        help="Train without the images the audit flags (default: the recipe's).")
    parser.add_argument("--ensemble", type=int, default=None,
                        help="Models per fold (other seeds) with averaged probabilities (default: the recipe's).")
    parser.add_argument("--self-supervised-weight", type=float, default=None,
                        help="Weight of the two-view self-supervised image loss (default: the recipe's).")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="Any other training setting over the recipe's (repeatable), as medvl bench cv's.")
    parser.add_argument("--covariates", default=None,
                        help="Metadata columns fused with the head and the probe, e.g. age_approx,sex; none = "
                             "image only (default: the recipe's).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    dataset = load_dataset(args.data, label_columns=[LABEL])
    classes = sorted(dataset.classes(LABEL), key=class_order)
    y = class_targets(dataset, LABEL, classes)
    seeds = [args.seed + r for r in range(args.repeats)]
    splits = [make_folds(y, args.folds, seed) for seed in seeds]  # the folds cross_validate makes
    images = [read_image(r.image) for r in dataset]
    started = time.perf_counter()
    rows = {"chance (constant score)": chance(y, classes, splits),
            "logistic regression, colour histogram": baseline(
                np.stack([colour_histogram(i) for i in images]), y, classes, splits),
            "logistic regression, 16x16 pixels": baseline(
                np.stack([downsampled_pixels(i) for i in images]), y, classes, splits)}
    result = {"baselines_seconds": round(time.perf_counter() - started, 1)}
    recipe_columns = resolve_recipe(MODEL).train.covariates or ["age_approx", "sex"]
    columns = recipe_columns if args.covariates is None else parse_columns(args.covariates)
    if columns:
        rows[f"logistic regression, {' + '.join(columns)} (no image)"] = covariates_only(dataset, columns, y, classes,
                                                                                         splits)
    if not args.baselines_only:
        cv = repeated_cross_validate(args.data, LABEL, MODEL, folds=args.folds, repeats=args.repeats,
                                     seed=args.seed, epochs=args.epochs, show_progress=not args.quiet,
                                     overrides=parse_overrides(args.set_), skip_flagged=args.skip_flagged,
                                     ensemble=args.ensemble, self_supervised_weight=args.self_supervised_weight,
                                     covariates=None if args.covariates is None else parse_columns(args.covariates),
                                     train_options=parse_key_values(args.train_set, "--train-set"))
        scored = [[f["test_ids"] for f in repeat["folds"]] for repeat in cv["repeats"]]
        if scored != [[[dataset[int(i)].id for i in t] for _, t in folds] for folds in splits]:
            raise RuntimeError("cross_validate scored other folds than the baselines")
        rows[f"medvl {MODEL} head"] = _row([[f["auc"] for f in r["folds"]] for r in cv["repeats"]],
                                           cv["auc_pooled"])
        rows[f"medvl {MODEL} zero-shot"] = _row([[f["zero_shot_auc"] for f in r["folds"]] for r in cv["repeats"]],
                                                None)
        rows[f"medvl {MODEL} linear probe"] = _row([[f["probe_auc"] for f in r["folds"]] for r in cv["repeats"]],
                                                   cv["probe_auc_pooled"])
        if "fused_auc_pooled" in cv:
            fused = " + ".join(cv["covariates"])
            rows[f"medvl {MODEL} head + {fused}"] = _row([[f["fused_auc"] for f in r["folds"]] for r in cv["repeats"]],
                                                         cv["fused_auc_pooled"])
            rows[f"medvl {MODEL} linear probe + {fused}"] = _row(
                [[f["probe_fused_auc"] for f in r["folds"]] for r in cv["repeats"]], cv["probe_fused_auc_pooled"])
        result.update(cv=cv, recipe={"model": MODEL, "overrides": cv["overrides"], "train": cv["train"]})
    print(f"\n{LABEL}: {', '.join(f'{c} {int((y == i).sum())}' for i, c in enumerate(classes))}; "
          f"{args.folds}-fold stratified CV, seeds {seeds}; AUC (positive class: melanoma)\n")
    print(markdown_table(rows))
    if "cv" in result:
        cv = result["cv"]
        print(f"\nhead accuracy {cv['acc']:.3f} ± {cv['acc_std']:.3f}, balanced accuracy "
              f"{cv['balanced_accuracy']:.3f} ± {cv['balanced_accuracy_std']:.3f}; "
              f"{cv['seconds']:.0f} s for {args.repeats} x {args.folds} folds")
        flagged = flagged_ids(audit_dataset(dataset, show_progress=False), CONTENT_FLAGS)
        labels = {r.id: str(r.labels[LABEL]) for r in dataset}
        result["audit"] = audit_breakdown(cv, flagged, classes, labels)
        print("\nhead AUC by image audit (pooled out-of-fold, per repeat):")
        for name, entry in result["audit"].items():
            aucs = ", ".join("-" if a is None else f"{a:.3f}" for a in entry["auc_pooled"])
            print(f"  {name}: {entry['images']} images ({entry['melanoma']} melanoma): {aucs}")
    result.update(label=LABEL, classes=classes, folds=args.folds, seed=args.seed, seeds=seeds, auc=rows)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    from medvl.errors import run_script

    run_script(main)
