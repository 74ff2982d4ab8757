"""Linear probe: logistic regression (scikit-learn) on frozen image features, full and few-shot."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data.audit import content_summary
from ..data.record import Dataset
from ..embed import embed_images
from ..errors import InputError
from ..models.dual import DualEncoder
from .covariates import CovariateModel
from .metrics import classification_metrics

log = logging.getLogger(__name__)


def linear_probe(model: DualEncoder, train_data: Dataset, test_data: Dataset, label: str,
                 few_shot: Sequence[int] = (1, 4, 16), repeats: int = 5, seed: int = 0,
                 show_progress: bool = True, keep_scores: bool = False,
                 calibration_data: Dataset | None = None, covariates: Sequence[str] = ()) -> dict:
    """Fit on ``train_data`` features, report AUC / accuracy on ``test_data``.

    The regularisation strength (C in 0.001..1) is chosen by 3-fold cross-validation on the training features.
    Few-shot: ``k`` training images per class, ``repeats`` random draws, mean and sample sd (ddof=1; None for
    a single draw) reported; a ``k`` above
    the smallest class's training count is skipped with a warning and named in ``few_shot_skipped``. A training
    class without a scored record is left out of the macro AUC and named in ``classes_absent``, with a warning.
    ``keep_scores`` adds the full probe's per-image ``probabilities`` and true class indices ``y_true``;
    ``calibration_data`` adds ``calibration``: the same probe's ``probabilities`` and ``y_true`` on those
    records (a held-out split to fit a temperature on; InputError when it holds an image of ``train_data``).

    ``covariates``: metadata columns of the records (e.g. ``age_approx``, ``sex``) whose logistic regression,
    fitted on ``train_data``, is fused with the full probe's probabilities (``medvl.eval.covariates``): then
    ``auc``, ``accuracy``, ``balanced_accuracy``, the kept and calibration probabilities are the fused ones,
    ``image_only`` holds the probe's own three figures, and ``covariates`` the columns (kind, missing share in
    training and in the scored records) with ``covariates["auc"]``, the covariates alone. Few-shot probes
    stay image-only, and then say so: each ``few_shot`` entry has ``image_only: true`` (beside fused headline
    figures they would read as fused).
    """
    train_data, test_data = train_data.with_labels([label]), test_data.with_labels([label])
    classes = probe_classes(train_data, test_data, label)
    if calibration_data is not None:  # before any image is read
        calibration_data = calibration_data.with_labels([label])
        check_calibration_classes(calibration_data, label, classes)
        check_calibration_apart(train_data, calibration_data)
    index = {name: i for i, name in enumerate(classes)}
    y_train = np.array([index[str(r.labels[label])] for r in train_data])
    y_test = np.array([index[str(r.labels[label])] for r in test_data])
    covariate_model = None
    if covariates:  # a bad column fails before any image is read
        covariate_model = CovariateModel.fit(train_data.records, y_train, len(classes), covariates,
                                             f"{train_data.source} (training records)", label)
    x_train = embed_images(model, train_data, features=True, show_progress=show_progress).numpy()
    content: list[dict[str, str]] = []
    x_test = embed_images(model, test_data, features=True, show_progress=show_progress, content=content).numpy()
    calibration = None
    if calibration_data is not None:
        y_calibration = np.array([index[str(r.labels[label])] for r in calibration_data])
        x_calibration = embed_images(model, calibration_data, features=True, show_progress=show_progress).numpy()
        calibration = (x_calibration, y_calibration)
    full = fit_and_score(x_train, y_train, x_test, y_test, classes, cv=True,
                         keep_scores=keep_scores or covariate_model is not None,
                         extra=None if calibration is None else calibration[0])
    fusion: dict[str, Any] = {}
    if covariate_model is not None:
        full, fusion = _fuse_covariates(full, covariate_model, test_data, y_test, classes, calibration_data)
    kept = {key: full.pop(key) for key in ("probabilities", "y_true") if key in full}
    if not keep_scores:  # kept above only for the fusion
        kept.clear()
    if calibration is not None:
        kept["calibration"] = {"probabilities": full.pop("extra_probabilities"),
                                 "y_true": calibration[1].tolist()}
    result = {"label": label, "classes": classes, "n_train": len(y_train), "n_test": len(y_test),
              "auc": full["macro_auc"], "accuracy": full["accuracy"],
              "balanced_accuracy": full["balanced_accuracy"], "full": full, **fusion, "few_shot": {}, **kept}
    absent = [name for i, name in enumerate(classes) if not (y_test == i).any()]
    if absent:  # said, as zero-shot says it: the macro AUC is over fewer classes than the probe knows
        result["classes_absent"] = absent
        log.warning("%d of the %d classes of %r have no scored record; the macro AUC leaves them out: %s",
                    len(absent), len(classes), label, ", ".join(absent[:10]))
    empty = content_summary(content, "scored images")
    if empty is not None:  # their probe answers are read from noise
        result["input_content"] = empty
    counts = np.bincount(y_train, minlength=len(classes))
    for k in few_shot:
        if counts.min() < k:  # said, not left out of the table without a word
            short = [f"{classes[i]!r} ({int(count)})" for i, count in enumerate(counts) if count < k]
            reason = (f"{'class' if len(short) == 1 else f'{len(short)} classes'} {', '.join(short[:10])} "
                      f"{'has' if len(short) == 1 else 'have'} fewer than {k} training images")
            log.warning("%d-shot probe skipped: %s", k, reason)
            result.setdefault("few_shot_skipped", {})[str(k)] = reason
            continue
        rng = np.random.default_rng([seed, k])  # each k its own draws: a k-shot figure whatever the other k asked
        runs = [_few_shot_once(x_train, y_train, x_test, y_test, classes, k, rng) for _ in range(repeats)]
        scores = [run for run in runs if run is not None]
        if scores:
            aucs = [s["macro_auc"] for s in scores if s["macro_auc"] is not None]
            accs = [s["accuracy"] for s in scores]
            result["few_shot"][str(k)] = {
                "auc_mean": float(np.mean(aucs)) if aucs else None,
                "auc_std": _sample_sd(aucs),
                "accuracy_mean": float(np.mean(accs)), "accuracy_std": _sample_sd(accs),
                "repeats": len(scores), **({"image_only": True} if covariate_model is not None else {})}
    return result


def _sample_sd(values: Sequence[float]) -> float | None:
    """The sample standard deviation (ddof=1) of the few-shot draws, as ``bench cv`` gives over folds (the population
    sd of 5 draws is 0.89 of it, and the rows' "mean ± 1.96 sd" as much too narrow); None for fewer than 2 draws."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def probe_classes(train_data: Dataset, test_data: Dataset, label: str) -> list[str]:
    """The classes a probe of ``label`` fitted on ``train_data`` scores ``test_data`` among (the training ones,
    sorted); InputError when the test records hold a class training lacks, or training has fewer than two."""
    train_data, test_data = train_data.with_labels([label]), test_data.with_labels([label])
    for data, what in ((train_data, "training"), (test_data, "scored")):
        if not len(data):
            raise InputError(f"{data.source}: no {what} records with label {label!r}")
    classes = sorted(set(train_data.classes(label)))
    unknown = set(test_data.classes(label)) - set(classes)
    if unknown:
        raise InputError(f"{test_data.source}: test classes {sorted(unknown)} not in training classes {classes}")
    if len(classes) < 2:
        raise InputError(f"{train_data.source}: label {label!r} needs at least 2 classes in training data")
    return classes


def check_calibration_apart(train_data: Dataset, calibration_data: Dataset) -> None:
    """InputError when ``calibration_data`` holds images of ``train_data`` (``Dataset.shared_images``): the
    probe's predictions on its own training images are over-confident, so a temperature fitted on them
    calibrates nothing."""
    shared = train_data.shared_images(calibration_data)
    if shared:
        raise InputError(f"{calibration_data.source}: {shared} of the {len(calibration_data)} calibration records "
                         "have an image the probe is fitted on; fit the temperature on other images")


def check_calibration_classes(calibration_data: Dataset, label: str, classes: Sequence[str]) -> None:
    """InputError when the records of ``calibration_data`` with ``label`` hold a class outside ``classes`` (the
    probe's training classes, ``probe_classes``): the probe gives it no probability to fit a temperature on."""
    unknown = set(calibration_data.with_labels([label]).classes(label)) - set(classes)
    if unknown:
        raise InputError(f"{calibration_data.source}: calibration classes {sorted(unknown)} not in training "
                         f"classes {list(classes)}")


def _fuse_covariates(full: dict, model: CovariateModel, test_data: Dataset, y_test: np.ndarray, classes: list[str],
                     calibration_data: Dataset | None) -> tuple[dict, dict]:
    """The full probe's metrics with its probabilities fused with the covariate model's; and the
    ``image_only`` and ``covariates`` entries of the result."""
    image = np.asarray(full["probabilities"])
    alone = model.probabilities(test_data.records)
    probabilities = model.fuse(image, covariate_probabilities=alone)
    fused = {**classification_metrics(y_test, probabilities, classes), "probabilities": probabilities.tolist(),
             "y_true": y_test.tolist()}
    if "extra_probabilities" in full and calibration_data is not None:
        fused["extra_probabilities"] = model.fuse(np.asarray(full["extra_probabilities"]),
                                                  calibration_data.records).tolist()
    described = model.describe(test_data.records)
    for column, entry in described["columns"].items():
        if entry["missing_share_scored"] == 1.0:
            log.warning("%s: covariate column %r is missing in all %d scored records; their fused probabilities "
                        "are about the image's", test_data.source, column, len(test_data))
        elif entry["missing_share_scored"] + entry.get("unseen_share_scored", 0.0) > 1 - 0.5 / len(test_data):
            log.warning("%s: covariate column %r has no value in the %d scored records that the training records "
                        "had (values never seen count as missing)", test_data.source, column, len(test_data))
        if entry.get("out_of_range_share_scored"):
            low, high = entry["range"]
            log.warning("%s: covariate column %r is outside the training records' range [%g, %g] in %d of %d scored "
                        "records (out_of_range_share_scored); they are scored as the nearest end of that range: "
                        "check for typos or other units", test_data.source, column, low, high,
                        round(entry["out_of_range_share_scored"] * len(test_data)), len(test_data))
    fusion = {"image_only": {"auc": full["macro_auc"], "accuracy": full["accuracy"],
                             "balanced_accuracy": full["balanced_accuracy"]},
              "covariates": {**described, "auc": classification_metrics(y_test, alone, classes)["macro_auc"],
                             "fusion": "naive Bayes: p_image * p_covariates / prior"}}
    return fused, fusion


def fit_and_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  classes: Sequence[str], cv: bool, keep_scores: bool = False,
                  extra: np.ndarray | None = None) -> dict:
    """Fit the probe, score it on the test features; ``extra`` features also get the probe's
    ``extra_probabilities`` (columns in ``classes`` order)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    folds = min(3, int(np.bincount(y_train).min()))
    if cv and folds >= 2:
        grid = {"logisticregression__C": np.logspace(-3, 0, 4).tolist()}
        probe = GridSearchCV(probe, grid, cv=folds, scoring="neg_log_loss")
    probe.fit(x_train, y_train)
    probabilities = _probabilities(probe, x_test, len(classes))
    result = classification_metrics(y_test, probabilities, classes)
    if keep_scores:
        result.update(probabilities=probabilities.tolist(), y_true=y_test.tolist())
    if extra is not None:
        result["extra_probabilities"] = _probabilities(probe, extra, len(classes)).tolist()
    return result


def _probabilities(probe, features: np.ndarray, num_classes: int) -> np.ndarray:
    """The probe's class probabilities, a zero column for a class it never saw in training."""
    probabilities = np.zeros((len(features), num_classes))
    probabilities[:, probe.classes_] = probe.predict_proba(features)
    return probabilities


def _few_shot_once(x_train, y_train, x_test, y_test, classes, k, rng) -> dict | None:
    chosen = []
    for c in range(len(classes)):
        members = np.flatnonzero(y_train == c)
        if len(members) < k:
            return None
        chosen.extend(rng.choice(members, size=k, replace=False))
    rows = np.array(chosen)
    return fit_and_score(x_train[rows], y_train[rows], x_test, y_test, classes, cv=False)
