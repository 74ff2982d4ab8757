"""k-fold cross-validation of the supervised + contrastive recipe on a labelled image dataset.

For small labelled sets without an official test split (the ISIC dermoscopy subset has 398
labelled images): stratified k-fold (``StratifiedGroupKFold`` when a group column such as a
patient id is given, so a group never sits on both sides), and for each fold a fresh model is
trained on the other folds with a supervised linear head on the label (cross-entropy) plus the
image-text contrastive loss on caption templates made from the labels (the model's recipe gives
the epochs, learning rate, batch, loss weights, model overrides and captions unless told otherwise:
``medvl.train.recipes``), then scored on the held-out fold two ways:

- the head: class probabilities, accuracy and balanced accuracy at the argmax (no threshold is
  tuned), macro one-vs-rest AUC (for two classes, the AUC of either class); on a fold that scores fewer than all
  classes (groups can do that) AUC and balanced accuracy are None and left out of their means (``KEY_folds``
  counts the folds a mean is over): undefined for one class, and over 2 of 3 classes another figure;
- zero-shot: the caption prompt ensembles of each class (``medvl.zero_shot``);
- a linear probe, as ``medvl eval linear-probe`` scores a trained model: logistic regression (C by 3-fold CV)
  fitted on the fold model's frozen image features of every training-fold record, scored on the held-out
  fold's features. It is the estimate for a model trained on all the data and probed on new images.

With covariates (the recipe's ``covariates``, e.g. ISIC's ``age_approx`` and ``sex``), a logistic regression on
them is fitted on the training folds and fused with the head's and the probe's probabilities
(``medvl.eval.covariates``): the ``fused_`` and ``probe_fused_`` keys; ``covariates_auc`` is the covariates
alone. The unprefixed keys stay image-only.

The folds are drawn over every record of the dataset, whatever its split (its train, val and test splits pooled,
said with a warning when a test split is among them), unless ``splits`` names the splits to pool; the result
counts the records of each split pooled (``splits``).

Folds are drawn on records: a held-out image that is a byte-for-byte copy of a training-fold image (one image
filed twice under two names) is counted per fold and warned about (``copies_in_fit``, as ``bench run`` and
``bench medmnist`` count them), not moved.

Reported: every fold (with its held-out ids and head probabilities, unrounded, so its figures recompute from the
JSON), the mean and the sample standard deviation (ddof=1) over folds, and the AUC of all out-of-fold head scores
pooled. ``repeated_cross_validate`` repeats the whole CV with
other fold seeds, so a small set is judged by the spread over many splits, never by one split.
Folds depend only on the labels, groups and ``seed`` (``make_folds``), so other methods can be
scored on exactly the same folds.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import check_number
from ..data import captions_for
from ..data.captions import CaptionConfig
from ..data.loaders import load_dataset
from ..data.record import ALL_SPLITS, Dataset
from ..embed import embed_images
from ..errors import InputError
from ..eval.contamination import copies_in_fit
from ..eval.covariates import CovariateModel, check_covariates
from ..eval.head import class_order, class_targets, head_scores
from ..eval.linear_probe import fit_and_score
from ..eval.metrics import classification_metrics
from ..eval.zero_shot import zero_shot
from ..models.dual import DualEncoder
from ..models.registry import get_config
from ..train.recipes import (
    BENCHMARK_FIXED,
    RecipeSettings,
    covariates_for,
    merge_train_options,
    resolve_recipe,
    train_recipe,
)

log = logging.getLogger(__name__)

MEMBER_SEED_STRIDE = 10_000  # ensemble member m of a fold trains with the fold's seed + m * this

SUMMARY_METRICS = ("auc", "acc", "balanced_accuracy", "zero_shot_auc", "zero_shot_acc",
                   "zero_shot_balanced_accuracy", "probe_auc", "probe_acc", "probe_balanced_accuracy")
COVARIATE_METRICS = ("fused_auc", "fused_acc", "fused_balanced_accuracy", "probe_fused_auc", "probe_fused_acc",
                     "probe_fused_balanced_accuracy", "covariates_auc")  # folds scored with covariates


def cross_validate(data_path: str | Path, label: str, model_name: str = "derm-small", folds: int = 5,
                   epochs: int | None = None, seed: int = 0, captions: str | Path | CaptionConfig | None = None,
                   group_column: str | None = None, show_progress: bool = True, *, lr: float | None = None,
                   batch_size: int | None = None, contrastive_weight: float | None = None,
                   skip_flagged: bool | None = None, overrides: dict[str, Any] | None = None,
                   ensemble: int | None = None, label_smoothing: float | None = None,
                   self_supervised_weight: float | None = None, train_options: dict[str, Any] | None = None,
                   allow_outside_root: bool = False, covariates: list[str] | None = None,
                   splits: list[str] | None = None) -> dict:
    """Train and score one fresh model per fold; returns per-fold and mean/std metrics.

    ``splits``: the dataset's splits whose records form the folds (``pool_splits``); None = every record, whatever
    its split (train, val and test pooled; said with a warning when a test split is among them). ``splits`` in the
    result counts the records of each split pooled.

    ``epochs``, ``lr``, ``batch_size``, ``contrastive_weight``, ``label_smoothing``, ``self_supervised_weight``,
    ``skip_flagged`` (train without the images the audit flags; every held-out image is still scored),
    ``ensemble`` (models per fold whose head and zero-shot probabilities are averaged): None = the recipe
    of ``model_name`` (``medvl models --recipe NAME``), else ``TrainConfig``'s defaults; ``train_options``
    sets any other ``TrainConfig`` field (``--train-set``) but the seed, label and texts; the head's
    weight is 1 and the texts are label captions. ``captions``: a caption config (or a YAML/JSON file) with
    templates and class descriptions; default: the recipe's caption set, else the dataset's own, else generic
    templates. ``overrides`` merge into the model config over the recipe's (``{"image.image_size":
    96}``). ``covariates``: metadata columns fused with the head and the probe (None = the recipe's, [] = none).
    Records the model cannot take (a DICOM folder's 3D series for a 2D model, its 2D images for a 3D one) are
    left out before the folds are drawn, with a warning (``Dataset.for_spatial_dims``).
    ``train`` in the result holds the resolved settings. Top-level numeric keys: ``auc``, ``auc_std``, ``acc``,
    ``acc_std``, ``balanced_accuracy``, ``balanced_accuracy_std``, ``auc_pooled``, ``majority_acc``
    (always answering the commonest class), the fold means with a ``zero_shot_`` prefix and with a
    ``probe_`` prefix (the linear probe), ``probe_auc_pooled``; with covariates also the ``COVARIATE_METRICS``
    fold means and stds, ``fused_auc_pooled`` and ``probe_fused_auc_pooled``;
    ``folds`` holds one dict per fold (metrics, confusion matrix, ``n_train`` records in the training
    folds and ``n_trained`` of them trained on, test record ids and the head's
    ``probabilities`` for them, one list per record in ``classes`` order, and ``copies_in_fit`` when some of its
    held-out images are byte-for-byte copies of its training folds' images: ``fold_copies``); ``copies_in_fit``
    (only when a fold has such copies) sums them over the folds, with ``per_fold`` counts. ``seconds`` is
    wall time, ``cpu_seconds`` the process CPU time (all threads).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    check_number("folds", folds, minimum=2, maximum=100, integer=True)
    settings = cv_settings(model_name, label, seed, epochs=epochs, lr=lr, batch_size=batch_size,
                           contrastive_weight=contrastive_weight, skip_flagged=skip_flagged, overrides=overrides,
                           captions=captions, ensemble=ensemble, label_smoothing=label_smoothing,
                           self_supervised_weight=self_supervised_weight, covariates=covariates,
                           train_options=train_options)  # checks the ensemble size
    settings.train.validate()  # bad numbers fail before any data is read
    if group_column is not None and not group_column.strip():  # not "no grouping": folds that leak patients
        raise InputError("--group-column: empty column name (leave the option out to split without groups)")
    everything = load_dataset(data_path, allow_outside_root=allow_outside_root)
    everything.require_label(label)  # an unknown column fails before the splits are looked at
    chosen = pool_splits(everything, splits)
    # the chosen splits' records with a label (counted in the log, of those splits only): a chosen split whose
    # records all lack one is said so, not reported as missing
    dataset = chosen.with_labels([label])
    if not len(dataset):
        raise InputError(f"{chosen.source}: the {len(chosen)} records of "
                         f"{'every split' if splits in (None, [ALL_SPLITS]) else 'split ' + ', '.join(splits)} have "
                         f"no value in label column {label!r}")
    # a bad name or override fails here, before any training; a DICOM folder's records of the other kind are left out
    # (a registered name: cross-validation trains each fold from it; a saved model folder is refused)
    dataset = dataset.for_spatial_dims(get_config(model_name, **settings.model_overrides).image.spatial_dims)
    pooled_splits = dict(Counter(record.split for record in dataset.records))
    if splits is None and len(pooled_splits) > 1 and "test" in pooled_splits:
        log.warning("%s: the folds pool every split (%s), its test split too: a later figure on that test split is "
                    "not independent of this CV (--split chooses the splits)", dataset.source,
                    ", ".join(f"{name} {count}" for name, count in pooled_splits.items()))
    classes = sorted(dataset.classes(label), key=class_order)
    if len(classes) < 2:
        raise InputError(f"{dataset.source}: label {label!r} needs at least 2 classes, got {classes}")
    y = class_targets(dataset, label, classes)
    settings.train.covariates = covariates_for(dataset, settings, [label])  # a bad column fails here
    groups = _groups(dataset, group_column) if group_column is not None else None
    caption_config = captions_for(dataset, settings.captions)
    settings.captions = caption_config  # read once for every fold
    fold_indices = make_folds(y, folds, seed, groups)
    copies = fold_copies(dataset, fold_indices)  # held-out copies of training-fold images: said before training
    for fold, (train_index, _) in enumerate(fold_indices if settings.train.covariates else []):
        # every fold's training records must carry the covariates too: a bad fold fails before any fold trains
        check_covariates([dataset.records[i] for i in train_index], settings.train.covariates, [label],
                         f"{dataset.source} (fold {fold + 1} training records)")
    results = []
    pooled: dict[str, np.ndarray] = {}  # out-of-fold scores: head, probe (and fused, probe_fused with covariates)
    for fold, (train_index, test_index) in enumerate(fold_indices):
        log.info("fold %d/%d: training on %d records, scoring %d", fold + 1, folds, len(train_index),
                 len(test_index))
        fold_result, fold_scores = _run_fold(dataset, label, classes, train_index, test_index, settings, fold,
                                             show_progress)
        if copies[fold] is not None:
            fold_result["copies_in_fit"] = copies[fold]
        for key, scores in fold_scores.items():
            pooled.setdefault(key, np.zeros((len(dataset), len(classes))))[test_index] = scores
        results.append(fold_result)
    pooled_auc = {key: classification_metrics(y, scores, classes)["macro_auc"] for key, scores in pooled.items()}
    fused = ({"fused_auc_pooled": pooled_auc["fused"], "probe_fused_auc_pooled": pooled_auc["probe_fused"],
              "covariates": settings.train.covariates} if settings.train.covariates else {})
    return {**_summarise(results), "auc_pooled": pooled_auc["head"], "probe_auc_pooled": pooled_auc["probe"],
            **fused, **_copies_summary(copies, len(dataset)),
            "majority_acc": float(np.bincount(y).max() / len(y)),
            "label": label, "classes": classes, "class_counts": dict(Counter(classes[i] for i in y)),
            "n": len(dataset), "splits": pooled_splits, "data": str(data_path), "model": model_name,
            "ensemble": settings.ensemble,
            "overrides": settings.model_overrides, "folds_k": folds, "seed": seed, "group_column": group_column,
            "train": dataclasses.asdict(settings.train), "captions": caption_config.to_dict(), "folds": results,
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1)}


def pool_splits(dataset: Dataset, splits: list[str] | None) -> Dataset:
    """The records of ``splits`` of ``dataset``, in the dataset's order; None or ``["all"]``: every record. A split
    the dataset does not hold is an InputError naming the file and the splits it holds (``Dataset.select``)."""
    if splits is None or splits == [ALL_SPLITS]:
        return dataset
    if not splits or ALL_SPLITS in splits:
        raise InputError(f"{dataset.source}: splits {splits}: give split names, or 'all' alone for every record")
    for split in splits:
        dataset.select(split)  # an unknown split fails naming the splits present
    wanted = set(splits)
    return dataset.subset([record for record in dataset.records if record.split in wanted])


def repeated_cross_validate(data_path: str | Path, label: str, model_name: str = "derm-small", folds: int = 5,
                            repeats: int = 3, seed: int = 0, **options: Any) -> dict:
    """Repeated stratified k-fold CV: ``cross_validate`` once per seed ``seed .. seed + repeats - 1``
    (other folds, other initial weights each time); ``options`` go to ``cross_validate``.

    The spread is over every held-out fold of every repeat (``auc``, ``auc_std`` and the other
    ``SUMMARY_METRICS`` over ``repeats x folds`` folds, sample std) and over the repeats' pooled
    out-of-fold AUCs (``auc_pooled`` per repeat, ``auc_pooled_mean`` and ``auc_pooled_std``).
    With covariates, ``fused_auc_pooled`` and ``probe_fused_auc_pooled`` per repeat too.
    ``repeats`` holds each repeat's full ``cross_validate`` result; ``copies_in_fit`` (only when a repeat has
    held-out copies of training images) sums them over the repeats, with ``per_repeat`` counts.
    """
    check_number("repeats", repeats, minimum=1, maximum=100, integer=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    results = []
    for repeat in range(repeats):
        log.info("repeat %d/%d: folds seed %d", repeat + 1, repeats, seed + repeat)
        results.append(cross_validate(data_path, label, model_name, folds=folds, seed=seed + repeat, **options))
    pooled = [r["auc_pooled"] for r in results]
    first = results[0]
    fused = ({key: [r[key] for r in results] for key in ("fused_auc_pooled", "probe_fused_auc_pooled")}
             | {"covariates": results[0]["covariates"]} if "fused_auc_pooled" in results[0] else {})
    copies = [r["copies_in_fit"]["records"] if "copies_in_fit" in r else 0 for r in results]
    copied = ({"copies_in_fit": {"records": sum(copies), "of": first["n"] * repeats, "per_repeat": copies}}
              if any(copies) else {})
    return {**_summarise([fold for r in results for fold in r["folds"]]), "auc_pooled": pooled, **copied,
            "probe_auc_pooled": [r["probe_auc_pooled"] for r in results], **fused,
            "auc_pooled_mean": float(np.mean(pooled)),
            "auc_pooled_std": float(np.std(pooled, ddof=1)) if repeats > 1 else None,
            "seeds": [seed + r for r in range(repeats)], "folds_k": folds, "n": first["n"], "splits": first["splits"],
            "label": label,
            "classes": first["classes"], "model": model_name, "overrides": first["overrides"],
            "ensemble": first["ensemble"],
            "train": first["train"], "majority_acc": first["majority_acc"], "repeats": results,
            "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1)}


def cv_settings(model_name: str, label: str, seed: int = 0, *, epochs: int | None = None, lr: float | None = None,
                batch_size: int | None = None, contrastive_weight: float | None = None,
                skip_flagged: bool | None = None, overrides: dict[str, Any] | None = None,
                captions: str | Path | CaptionConfig | None = None, ensemble: int | None = None,
                label_smoothing: float | None = None, self_supervised_weight: float | None = None,
                covariates: list[str] | None = None, train_options: dict[str, Any] | None = None) -> RecipeSettings:
    """The training settings of every fold: ``model_name``'s recipe with a head on ``label`` (weight 1)
    and label captions as texts; the options given (not None) and ``train_options`` (any other
    ``TrainConfig`` field) replace the recipe's."""
    options = merge_train_options(
        {"epochs": epochs, "lr": lr, "batch_size": batch_size, "contrastive_weight": contrastive_weight,
         "skip_flagged": skip_flagged, "label_smoothing": label_smoothing,
         "self_supervised_weight": self_supervised_weight, "covariates": covariates},
        train_options or {}, fixed=BENCHMARK_FIXED)
    return resolve_recipe(model_name, model_overrides=overrides, captions=captions, ensemble=ensemble, seed=seed,
                          text_source="captions", label_columns=[label], supervised_weight=1.0, **options)


def make_folds(y: np.ndarray, folds: int, seed: int,
               groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train indices, test indices) per fold: stratified on ``y``, shuffled with ``seed``.

    With ``groups`` (one id per record, e.g. a patient), ``StratifiedGroupKFold`` keeps every
    group within one fold; stratification is then approximate.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if folds < 2:
        raise InputError(f"folds must be at least 2, got {folds}")
    smallest = int(np.bincount(y).min())
    if smallest < folds:
        raise InputError(f"{folds} folds need at least {folds} records of every class; "
                         f"the smallest class has {smallest}")
    if groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y))
    distinct = len(set(groups.tolist()))
    if distinct < folds:
        raise InputError(f"{folds} folds need at least {folds} groups, got {distinct}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(splitter.split(np.zeros(len(y)), y, groups))
    classes = set(y.tolist())
    for fold, (train, test) in enumerate(splits, 1):  # groups can put a whole class in one fold
        if set(y[train].tolist()) != classes:
            missing = sorted(classes - set(y[train].tolist()))
            raise InputError(f"fold {fold} of {folds}: its training records hold no class {missing} (the groups "
                             f"holding that class all fall in this fold); use fewer folds or other groups")
        scored = len(set(y[test].tolist()))
        if scored < len(classes):  # _fold_metrics leaves its AUC and balanced accuracy out of the means
            what = ("records of one class only (its groups): its AUC and balanced accuracy are undefined" if scored == 1
                    else f"{scored} of the {len(classes)} classes only (its groups): its macro AUC and balanced "
                    f"accuracy would be over those {scored}, another task than the other folds'")
            log.warning("fold %d of %d scores %s and are left out of their means, which are then over fewer folds "
                        "than the accuracy's", fold, folds, what)
    return splits


def fold_copies(dataset: Dataset, splits: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, Any] | None]:
    """Per fold, its held-out records whose image is a byte-for-byte copy of an image of its training folds (the
    same image filed twice under two names): ``eval.contamination.copies_in_fit``, with its warning; None for a
    fold without any. Folds are drawn on records, so copies can fall on both sides: their figures measure what
    the fold model was trained on."""
    copies = []
    for fold, (train_index, test_index) in enumerate(splits, 1):
        train_set = dataset.subset([dataset[int(i)] for i in train_index])
        test_set = dataset.subset([dataset[int(i)] for i in test_index])
        copies.append(copies_in_fit(train_set, test_set, f"the training folds of fold {fold} of {len(splits)}",
                                    what=f"held-out images of fold {fold}"))
    return copies


def _copies_summary(copies: list[dict[str, Any] | None], n: int) -> dict[str, Any]:
    """The result's ``copies_in_fit`` (absent when no fold has any): held-out records, over all folds, whose image
    copies one of their fold's training images, of the ``n`` records (each held out once), and the count per fold."""
    if not any(copies):
        return {}
    per_fold = [block["records"] if block else 0 for block in copies]
    return {"copies_in_fit": {"records": sum(per_fold), "of": n, "per_fold": per_fold}}


def _groups(dataset: Dataset, column: str) -> np.ndarray:
    missing = [r.id for r in dataset if column not in r.meta]
    if len(missing) == len(dataset):
        raise InputError(f"{dataset.source}: unknown group column {column!r}; "
                         f"columns: {', '.join(dataset.columns()) or 'none'}")
    if missing:
        raise InputError(f"{dataset.source}: {len(missing)} records have no {column!r} value "
                         f"(first: {missing[0]}); every record needs a group")
    return np.array([str(r.meta[column]) for r in dataset])


def _run_fold(dataset: Dataset, label: str, classes: list[str], train_index: np.ndarray,
              test_index: np.ndarray, settings: RecipeSettings, fold: int,
              show_progress: bool) -> tuple[dict, dict[str, np.ndarray]]:
    started = time.perf_counter()
    train_set = dataset.subset([dataset[int(i)] for i in train_index])
    test_set = dataset.subset([dataset[int(i)] for i in test_index])
    # initial weights, order and augmentation differ per fold and per ensemble member, reproducibly
    captions = captions_for(test_set, settings.captions)  # the CaptionConfig read in cross_validate
    # every record is labelled: zero_shot and the probe score them in this order
    y_train, y = class_targets(train_set, label, classes), class_targets(test_set, label, classes)
    heads, shots, probes, n_trained = [], [], [], 0
    for member in range(settings.ensemble):
        fold_settings = dataclasses.replace(settings, train=dataclasses.replace(
            settings.train, seed=settings.train.seed * 100 + fold + MEMBER_SEED_STRIDE * member))
        if settings.ensemble > 1:
            log.info("fold %d: ensemble member %d of %d (seed %d)", fold + 1, member + 1, settings.ensemble,
                     fold_settings.train.seed)
        with tempfile.TemporaryDirectory(prefix="medvl-cv-") as scratch:
            model = train_recipe(fold_settings, train_set, scratch, show_progress=show_progress)
        heads.append(head_scores(model, test_set, label, show_progress))
        shots.append(np.asarray(zero_shot(model, test_set, label, captions=captions, classes=classes,
                                          show_progress=False, keep_scores=True)["probabilities"]))
        probes.append(_probe(model, train_set, y_train, test_set, y, classes))
        if member == 0:  # every member trains on the same records
            n_trained = model.meta["training"]["records"]
    probabilities = np.mean(heads, axis=0)
    head = _fold_metrics(y, probabilities, classes)
    prompts = _fold_metrics(y, np.mean(shots, axis=0), classes)
    probe_probabilities = np.mean(probes, axis=0)
    probe = _fold_metrics(y, probe_probabilities, classes)
    scores = {"head": probabilities, "probe": probe_probabilities}
    fused: dict[str, Any] = {}
    if settings.train.covariates:
        covariate_model = CovariateModel.fit(train_set.records, y_train, len(classes), settings.train.covariates,
                                             f"{dataset.source} (fold {fold + 1} training records)", label)
        alone = covariate_model.probabilities(test_set.records)
        scores["fused"] = covariate_model.fuse(probabilities, covariate_probabilities=alone)
        scores["probe_fused"] = covariate_model.fuse(probe_probabilities, covariate_probabilities=alone)
        for prefix, key in (("fused_", "fused"), ("probe_fused_", "probe_fused")):
            metrics = _fold_metrics(y, scores[key], classes)
            fused.update({f"{prefix}auc": metrics["macro_auc"], f"{prefix}acc": metrics["accuracy"],
                          f"{prefix}balanced_accuracy": metrics["balanced_accuracy"]})
        fused["covariates_auc"] = _fold_metrics(y, alone, classes)["macro_auc"]
        fused["fused_probabilities"] = scores["fused"].tolist()
    result = {"fold": fold + 1, "n_train": len(train_set), "n_trained": n_trained,
              "n_test": len(test_set),
              "auc": head["macro_auc"], "acc": head["accuracy"],
              "balanced_accuracy": head["balanced_accuracy"], "zero_shot_auc": prompts["macro_auc"],
              "zero_shot_acc": prompts["accuracy"], "zero_shot_balanced_accuracy": prompts["balanced_accuracy"],
              "probe_auc": probe["macro_auc"], "probe_acc": probe["accuracy"],
              "probe_balanced_accuracy": probe["balanced_accuracy"],
              "confusion_matrix": head["confusion_matrix"], "test_ids": [r.id for r in test_set],
              "probabilities": probabilities.tolist(), **fused,  # unrounded: rounding ties the argmax and ranks
              "seconds": round(time.perf_counter() - started, 1)}
    log.info("fold %d: head AUC %.3f, zero-shot AUC %.3f, linear-probe AUC %.3f", fold + 1,
             result["auc"] or float("nan"), result["zero_shot_auc"] or float("nan"),
             result["probe_auc"] or float("nan"))
    if fused:
        log.info("fold %d: with covariates: head AUC %.3f, linear-probe AUC %.3f (covariates alone %.3f)", fold + 1,
                 fused["fused_auc"] or float("nan"), fused["probe_fused_auc"] or float("nan"),
                 fused["covariates_auc"] or float("nan"))
    return result, scores


def _fold_metrics(y: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """``classification_metrics`` of a held-out fold, with macro AUC and balanced accuracy None when the fold scores
    fewer than all ``classes`` (groups can do that): of one class they are undefined (the recall of that one class
    is no balanced accuracy: a model answering one class would score 1.0 on it); of 2 of 3 classes they are averaged
    over those 2, another, often easier, task than the other folds score. ``_summarise`` leaves them out of the
    means and counts the folds (``KEY_folds``); the pooled AUC still holds every fold's scores."""
    metrics = classification_metrics(y, probabilities, classes)
    if len(np.unique(y)) < len(classes):
        metrics["macro_auc"] = metrics["balanced_accuracy"] = None
    return metrics


def _probe(model: DualEncoder, train_set: Dataset, y_train: np.ndarray, test_set: Dataset, y_test: np.ndarray,
           classes: list[str]) -> np.ndarray:
    """The held-out fold's class probabilities from ``medvl eval linear-probe``'s probe (C by 3-fold CV) fitted
    on the fold model's image features of every training-fold record."""
    x_train = embed_images(model, train_set, features=True, show_progress=False).numpy()
    x_test = embed_images(model, test_set, features=True, show_progress=False).numpy()
    return np.asarray(fit_and_score(x_train, y_train, x_test, y_test, classes, cv=True,
                                    keep_scores=True)["probabilities"])


def _summarise(results: list[dict]) -> dict[str, float | None]:
    """Mean and sample std over folds of every metric; a metric None on a fold (AUC and balanced accuracy of a fold
    scoring fewer than all classes, ``_fold_metrics``) is left out, and ``KEY_folds`` says how many folds its mean
    is over."""
    summary: dict[str, float | None] = {}
    keys = SUMMARY_METRICS + (COVARIATE_METRICS if results and "fused_auc" in results[0] else ())
    for key in keys:
        values = [r[key] for r in results if r[key] is not None]
        summary[key] = float(np.mean(values)) if values else None
        summary[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        if len(values) < len(results):  # a fold where it is undefined (one class scored): how many the mean is over
            summary[f"{key}_folds"] = len(values)
    return summary
