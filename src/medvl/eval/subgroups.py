"""Metrics per patient subgroup (sex, age band, view, site...) with bootstrap intervals and the
worst-group gap.

Conventions: ``y_true`` holds class indices (N,); ``probabilities`` is (N, K) class scores, or (N,)
positive-class scores of a binary task. AUC is one-vs-rest, averaged over the classes present in
the (sub)group (the ``medvl.eval.metrics.classification_metrics`` convention); a group holding a
single class has no AUC (None). Balanced accuracy is the mean recall over the classes present
(sklearn's ``balanced_accuracy_score``). A group value that is missing (None, empty, NaN) puts the
record in no group of that column; it is counted under ``missing``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..checks import check_number
from ..data.record import Record
from ..errors import InputError
from .bootstrap import bootstrap_ci, difference_ci, group_count

# Upper bound (exclusive, years) and name of each age band, in order.
AGE_BANDS = ((40.0, "<40"), (60.0, "40-59"), (80.0, "60-79"), (math.inf, "80+"))
UNKNOWN_AGE = "unknown"
_BAND_NAMES = frozenset(band for _, band in AGE_BANDS)  # group names medvl makes itself: safe to show
MAX_AGE = 130.0  # years; anything above is taken for a data error, not an age
METRICS = ("auc", "balanced_accuracy", "accuracy")
# DICOM age strings (PatientAge, 0010,1010): nnnD / nnnW / nnnM / nnnY
_DICOM_AGE = re.compile(r"^(\d{1,3})\s*([DWMY])$", re.IGNORECASE)
_DICOM_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_band(age: Any) -> str:
    """The age band of an age in years: ``<40``, ``40-59``, ``60-79`` or ``80+``.

    Takes numbers and numeric strings (ISIC's ``age_approx`` is a float such as ``55.0`` or empty),
    and DICOM age strings (``065Y``, ``018M``); anything missing, unparseable, negative or above
    130 years is ``unknown``.
    """
    years = _years(age)
    if years is None:
        return UNKNOWN_AGE
    return next(name for upper, name in AGE_BANDS if years < upper)


def _years(age: Any) -> float | None:
    if age is None or isinstance(age, bool):
        return None
    if isinstance(age, str):
        text = age.strip()
        dicom = _DICOM_AGE.match(text)
        if dicom:
            return int(dicom.group(1)) * _DICOM_UNIT_YEARS[dicom.group(2).upper()]
        try:
            age = float(text)
        except ValueError:
            return None
    try:
        years = float(age)
    except (TypeError, ValueError):
        return None
    return years if math.isfinite(years) and 0 <= years <= MAX_AGE else None


def is_age_column(column: str) -> bool:
    """True for a column naming an age (``age``, ``age_approx``, ``PatientAge``), not ``image`` or ``stage``."""
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", column).lower()
    return "age" in re.split(r"[^a-z0-9]+", words)


def groups_from_records(records: Iterable[Record], columns: Sequence[str]) -> dict[str, list[str | None]]:
    """Per column, each record's group value from ``record.labels`` or else ``record.meta``.

    Values become strings; a missing or empty value is None. An age-like column (``is_age_column``)
    is banded with ``age_band`` (an unknown age is None). A column found in no record is an InputError.
    """
    records = list(records)
    result: dict[str, list[str | None]] = {}
    for column in columns:
        raw = [r.labels.get(column, r.meta.get(column)) for r in records]
        if records and all(_missing(value) for value in raw):
            seen = sorted({key for r in records for key in (*r.labels, *r.meta)})
            raise InputError(f"group column {column!r} is in no record's labels or meta; "
                             f"columns present: {', '.join(seen) or 'none'}")
        if is_age_column(column):
            bands = [age_band(value) for value in raw]
            result[column] = [None if band == UNKNOWN_AGE else band for band in bands]
        else:
            result[column] = [None if _missing(value) else str(value) for value in raw]
    return result


# a group column of at least this many values averaging under this many records each is an identifier (a patient id
# over a few images per patient), refused as one whose values mostly appear once is (``check_group_column``)
IDENTIFIER_MIN_VALUES, IDENTIFIER_RECORDS_PER_VALUE = 10, 3
# values seen once are identifiers or free text only when they hold this share of the records with a value: a
# category column with a long tail (PA 88, AP 29 and three rare views) scores its big groups, the rare ones too small
IDENTIFIER_SINGLE_SHARE = 0.25


def check_group_column(records: Iterable[Record], column: str, role: str = "subgroup") -> None:
    """InputError for a group ``column`` of identifiers or free text (a patient name, an MRN, a note): at least 3
    distinct values, more than half of them in one record only (the covariates' rule,
    ``covariates.CovariateEncoder.fit``) and those single-record values holding at least ``IDENTIFIER_SINGLE_SHARE``
    of the records with a value (a few rare categories beside well-filled ones are not identifiers); or at least
    ``IDENTIFIER_MIN_VALUES`` values averaging under ``IDENTIFIER_RECORDS_PER_VALUE`` records (a patient id over two
    images each). Each record, or patient, would be a group of its own, too small to score, listed by its value in
    the outputs; the message counts, never quotes. An age-like column (``is_age_column``:
    a test of its name) is banded: its values that read as ages are never refused, the others (``unreadable_ages``)
    are held to the same rules, so notes in a column named ``age_note`` are refused as in any other. ``role``: what
    the column is used as, in the message (a ``label`` of classes, for a concept bottleneck)."""
    records = list(records)
    if is_age_column(column):
        values = unreadable_ages(records, column)
    else:
        values = [str(value) for value in (r.labels.get(column, r.meta.get(column)) for r in records)
                  if not _missing(value)]
    counts = Counter(values)
    once = sum(count == 1 for count in counts.values())
    what = "values that are not ages" if is_age_column(column) else "values"
    if len(counts) >= 3 and once > len(counts) / 2 and once >= IDENTIFIER_SINGLE_SHARE * len(values):
        raise InputError(f"{role} column {column!r} has {len(counts)} distinct {what} in {len(values)} records, "
                         f"{once} of them in one record only; a {role} is a category shared by records, not an "
                         "identifier or free text")
    if len(counts) >= IDENTIFIER_MIN_VALUES and len(counts) * IDENTIFIER_RECORDS_PER_VALUE > len(values):
        # a patient id over two or three images per patient: few values once, yet every group is a patient
        raise InputError(f"{role} column {column!r} has {len(counts)} distinct {what} in {len(values)} records "
                         f"(under {IDENTIFIER_RECORDS_PER_VALUE} records a value); a {role} is a category shared by "
                         "many records, not an identifier such as a patient or study id")


def unreadable_ages(records: Iterable[Record], column: str) -> list[str]:
    """The values of an age-like ``column`` (``is_age_column``) that records hold but ``age_band`` cannot read
    (``67+``, ``early 40s``, an age above 130), one per such record: they fall in no group, like a missing value,
    but are not missing. [] for another column."""
    if not is_age_column(column):
        return []
    raw = [r.labels.get(column, r.meta.get(column)) for r in records]
    return [str(value) for value in raw if not _missing(value) and age_band(value) == UNKNOWN_AGE]


def valued_columns(records: Iterable[Record], columns: Sequence[str]) -> list[str]:
    """The ``columns`` at least one of ``records`` has a value for (in its labels or meta): those
    ``groups_from_records`` can group by."""
    records = list(records)
    return [column for column in columns
            if any(not _missing(r.labels.get(column, r.meta.get(column))) for r in records)]


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def macro_auc(y_true: np.ndarray, probabilities: np.ndarray) -> float | None:
    """One-vs-rest AUC averaged over the classes present in ``y_true``; None for a single class.

    Computed from ranks (the Mann-Whitney identity, ties given mid-ranks), equal to sklearn's
    ``roc_auc_score`` class by class; a bootstrap calls it thousands of times, and sklearn's input
    checks cost ~2 ms a call.
    """
    present = np.unique(y_true)
    if len(present) < 2:
        return None
    ranks = rankdata(probabilities[:, present], axis=0)
    positive = y_true[:, None] == present[None, :]
    n_pos = positive.sum(0)
    n_neg = len(y_true) - n_pos
    aucs = ((ranks * positive).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(aucs.mean())


def balanced_accuracy(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean recall of the argmax prediction over the classes present in ``y_true``."""
    correct = probabilities.argmax(1) == y_true
    counts = np.bincount(y_true)
    hits = np.bincount(y_true, weights=correct)
    present = counts > 0
    return float((hits[present] / counts[present]).mean())


def accuracy(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Share of records whose argmax prediction is the true class."""
    return float((probabilities.argmax(1) == y_true).mean())


_METRIC_FUNCTIONS = {"auc": macro_auc, "balanced_accuracy": balanced_accuracy, "accuracy": accuracy}
# metrics averaged over the classes a group holds: a group lacking one of the scored records' classes is not compared
CLASS_AVERAGED = ("auc", "balanced_accuracy")
# the bootstrap draws of each metric's interval (``medvl.eval.bootstrap``), for bench run's headline rows, the
# subgroup rows and the worst-group gap alike: AUC's stratified by class; accuracy's and balanced accuracy's plain,
# the class mix varying as it does between samples (balanced accuracy's without the draws lacking a class)
DRAWS: dict[str, dict[str, Any]] = {"auc": {"need_both_classes": True, "stratified": True},
                                     "balanced_accuracy": {"need_both_classes": True, "stratified": False},
                                     "accuracy": {"need_both_classes": False, "stratified": False}}


def subgroup_metrics(y_true: np.ndarray | Sequence[int], probabilities: np.ndarray | Sequence,
                     groups: Mapping[str, Sequence[Any]], min_size: int = 10, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, headline: str = "auc", units: Sequence[Any] | None = None) -> dict:
    """AUC, balanced accuracy and accuracy with bootstrap intervals per group of each column.

    ``groups`` maps a column name to one value per record (``groups_from_records`` makes it from
    records). ``units``: one resampling unit id per record (a case or patient id, when several records are of one
    case): every interval is then a cluster bootstrap over them (``medvl.eval.bootstrap``), and a group's size is
    its count of distinct units. Groups with fewer than ``min_size`` of them (records without ``units``) are not
    scored (counted, see below).
    Per column, the scored group with the lowest ``headline`` metric is ``worst_group``, the highest
    ``best_group``, and ``gap`` (best minus worst) has an interval from resampling within each of the
    two groups. The two are chosen on all records, so the gap interval does not cover that choice. A ``rough``
    group (a class of fewer than ``SMALL_CLASS`` records) is scored and kept, but is neither: its "95 %" interval
    covers the true value far less often (about 56 % with one record of a class, 74 % with two), and a gap drawn
    from it would look significant when it is not. With a class-averaged ``headline`` (``CLASS_AVERAGED``: AUC,
    balanced accuracy) a group lacking one of the scored records' classes is neither either: its metric averages
    over fewer classes (a one-class group's balanced accuracy is its recall of that class).

    Returns ``n``, ``units`` (distinct units of all records; ``n`` without ``units``), ``headline``, ``min_size``,
    ``level`` and ``columns``: per column ``groups`` (per value: ``n``, ``units`` (its distinct units),
    ``smallest_class`` (the fewest records of a class present), ``rough`` (``smallest_class`` under
    ``SMALL_CLASS``: its intervals are rough, and it is left out of the worst-group choice), ``missing_classes``
    (how many of the scored records' classes it lacks) and each metric as
    ``{value, low, high, resamples}``, or None for AUC of a single-class group; each metric's interval takes the
    draws ``DRAWS`` names: AUC's stratified by class), ``too_small`` (age band -> its units: the bands medvl
    names), ``unnamed_small_groups`` and ``unnamed_small_records`` (how many other values are too small, and their
    records: counted, never named, since a rare value may be free text or an identifier), ``rough_groups`` (how
    many scored groups are ``rough``), ``incomplete_groups`` (how many lack a class and were left out of the
    worst-group choice for it: 0 with the ``accuracy`` headline), ``missing`` (records without a value),
    ``worst_group``, ``best_group`` and ``gap`` (None when fewer than two groups are scored, not rough and, for a
    class-averaged headline, holding every class).
    """
    y, scores = _check_scores(y_true, probabilities)
    check_number("min_size", min_size, minimum=1, integer=True)
    if headline not in _METRIC_FUNCTIONS:
        raise InputError(f"headline metric must be one of {', '.join(METRICS)}, got {headline!r}")
    settings = {"resamples": resamples, "seed": seed, "level": level}
    ids = None if units is None else np.array(_group_labels("units", units, len(y)), dtype=object)
    if ids is not None and any(unit is None for unit in ids):
        raise InputError(f"{sum(unit is None for unit in ids)} of {len(y)} records have no resampling unit id")
    columns = {}
    for column, values in groups.items():
        labels = _group_labels(column, values, len(y))
        columns[column] = _column_metrics(y, scores, labels, min_size, headline, settings, ids)
    return {"n": int(len(y)), "units": group_count(ids, len(y)), "headline": headline, "min_size": min_size,
            "level": level, "columns": columns}


def _check_scores(y_true: np.ndarray | Sequence[int], probabilities: np.ndarray | Sequence) -> tuple[np.ndarray, ...]:
    y = np.asarray(y_true)
    scores = np.asarray(probabilities, dtype=float)
    if scores.ndim == 1:
        scores = np.stack([1 - scores, scores], axis=1)  # positive-class scores of a binary task
    if y.ndim != 1 or len(y) == 0 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"y_true must be a non-empty 1D array of class indices, got shape {y.shape} "
                         f"dtype {y.dtype}")
    if scores.ndim != 2 or scores.shape[0] != len(y) or scores.shape[1] < 2:
        raise InputError(f"probabilities must be ({len(y)}, K>=2) or ({len(y)},), got shape {np.shape(probabilities)}")
    if not np.isfinite(scores).all():
        raise InputError("probabilities contain NaN or infinite values")
    if y.min() < 0 or y.max() >= scores.shape[1]:
        raise InputError(f"y_true must lie in [0, {scores.shape[1] - 1}], got [{y.min()}, {y.max()}]")
    return y, scores


def _group_labels(column: str, values: Sequence[Any], n: int) -> list[str | None]:
    values = list(values)
    if len(values) != n:
        raise InputError(f"group column {column!r} has {len(values)} values for {n} records")
    return [None if _missing(value) else str(value) for value in values]


def _column_metrics(y: np.ndarray, scores: np.ndarray, labels: list[str | None], min_size: int,
                    headline: str, settings: dict, units: np.ndarray | None = None) -> dict:
    names = sorted({label for label in labels if label is not None}, key=_group_order)
    members = {name: np.array([i for i, label in enumerate(labels) if label == name]) for name in names}

    def size(index: np.ndarray) -> int:  # records, or the distinct cases among them
        return group_count(None if units is None else units[index], len(index))

    def unit_of(index: np.ndarray) -> dict:
        return {} if units is None else {"groups": units[index]}

    scored = {name: index for name, index in members.items() if size(index) >= min_size}
    small = {name: index for name, index in members.items() if name not in scored}
    classes = len(np.unique(y))
    groups = {name: {**_group_metrics(y[index], scores[index], settings | unit_of(index)), "units": size(index),
                     "missing_classes": classes - len(np.unique(y[index]))}
              for name, index in scored.items()}
    # a rough group's interval covers far less than its level: it would make a gap look significant that is not;
    # a class-averaged headline (AUC, balanced accuracy) of a group lacking a class averages over fewer classes (a
    # one-class group's balanced accuracy is its recall of that class): not the metric the other groups have
    averaged = headline in CLASS_AVERAGED
    ranked = sorted((g[headline]["value"], name) for name, g in groups.items()
                    if g[headline] is not None and not g["rough"] and not (averaged and g["missing_classes"]))
    worst, best, gap = None, None, None
    if len(ranked) >= 2:
        worst, best = ranked[0][1], ranked[-1][1]
        metric = _METRIC_FUNCTIONS[headline]
        pair = None if units is None else (units[scored[best]], units[scored[worst]])
        gap = difference_ci(metric, (y[scored[best]], scores[scored[best]]), (y[scored[worst]], scores[scored[worst]]),
                            **DRAWS[headline], **settings, groups=pair)
    return {"groups": groups,
            # a value too rare to score may be free text or an identifier (a column mostly of categories with a few
            # notes, or one patient's note on two films, passes check_group_column): such values are counted, never
            # listed by their value; only the age bands medvl names itself are
            "too_small": {name: size(index) for name, index in small.items() if name in _BAND_NAMES},
            "unnamed_small_groups": sum(name not in _BAND_NAMES for name in small),
            "unnamed_small_records": sum(len(index) for name, index in small.items() if name not in _BAND_NAMES),
            "rough_groups": sum(group["rough"] for group in groups.values()),
            "incomplete_groups": sum(bool(group["missing_classes"]) for group in groups.values()) if averaged else 0,
            "missing": sum(label is None for label in labels),
            "worst_group": worst, "best_group": best, "gap": gap}


def _group_order(name: str) -> tuple[int, str]:
    """Age bands in age order, then other values alphabetically."""
    bands = [band for _, band in AGE_BANDS]
    return (bands.index(name), "") if name in bands else (len(bands), name)


SMALL_CLASS = 5  # a class with fewer records: the intervals of its records cover less than their level


def rough_mark(y_true: np.ndarray | Sequence[int]) -> dict[str, Any]:
    """``smallest_class`` (the fewest records of a class present in ``y_true``, class indices) and ``rough``
    (``smallest_class`` under ``SMALL_CLASS``): the bootstrap interval of a metric over such records covers the true
    value far less often than its level says (about 60 % for a "95 %" interval at 12 records in 6 classes, 78 % for
    a macro AUC over classes of 35, 3 and 2 records), so its bounds are to be read as rough. The one rule for a
    subgroup's rows and for ``bench run``'s headline rows of a whole scored split."""
    y = np.asarray(y_true)
    smallest = int(np.bincount(y)[np.unique(y)].min())
    return {"smallest_class": smallest, "rough": smallest < SMALL_CLASS}


def _group_metrics(y: np.ndarray, scores: np.ndarray, settings: dict) -> dict:
    several = len(np.unique(y)) > 1
    return {
        "n": int(len(y)),
        **rough_mark(y),  # a class of 1 or 2 records: the group's intervals are rough
        "auc": bootstrap_ci(macro_auc, y, scores, **DRAWS["auc"], **settings) if several else None,
        # a one-class group's draws all hold its class: balanced accuracy is its recall, drawn plainly
        "balanced_accuracy": bootstrap_ci(balanced_accuracy, y, scores, **DRAWS["balanced_accuracy"]
                                          | {"need_both_classes": several}, **settings),
        "accuracy": bootstrap_ci(accuracy, y, scores, **DRAWS["accuracy"], **settings),
    }
