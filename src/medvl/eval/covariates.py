"""Patient covariates (age, sex, ...) fused with an image classifier's class probabilities.

Some datasets ship patient metadata next to each image (ISIC: ``age_approx`` and ``sex``) that tells
the classes apart on its own: melanoma patients are older than nevus patients. A covariate model is a
logistic regression on metadata columns of the training records; its class probabilities are combined
with the image classifier's by naive-Bayes late fusion (image and covariates taken as independent given
the class)::

    p(class | image, covariates)  ~  p(class | image) * p(class | covariates) / p(class)

with ``p(class)`` the training class frequencies. A record whose covariates are all missing gets the
covariate model's prediction for "all missing": about the prior when missingness does not depend on the
class, in any case one and the same multiplier for every such record, so a binary ranking among them is
the image's.

Columns are encoded from the training records: a column of which at least ``NUMERIC_SHARE`` (90 %) of the
present values parse as numbers is numeric (standardised value, missing = 0, plus a missing indicator; its few
other values, such as an age written "85+" or "adult", are read as missing, with a warning that counts them and
``non_numeric_share`` in the description, so that one such value does not turn a column of ages into categories
in one fold of a cross-validation and leave it numeric in the next; a scored value outside the training
records' range is clipped to it, so a typo such as an age of 700 or -5, or ages in months, pushes no further
than the oldest or youngest training patient instead of being extrapolated without bound: counted as
``out_of_range_share_scored`` and warned by the linear probe); any other column is categorical
(one indicator per training value, at most ``MAX_CATEGORIES`` of them, and not mostly values of one record
each: a column of ids or free text is refused, and its values never reach an output; a missing or unseen
value sets none). Missing: absent, empty, ``nan``, ``na``, ``n/a``, ``none``, ``null``, ``unknown`` (any case).
A numeric column with a different whole number in every training record looks like a row or patient number:
it is kept (a fine measurement can look the same) with a warning.

A covariate may not restate the label: the label column itself is refused, and so is a column that
separates the training classes perfectly (each category of one class, or numeric ranges of the classes
that do not overlap) over at least ``LEAK_MIN_RECORDS`` records, e.g. ISIC's ``diagnosis`` when the label
is ``benign_malignant``: its fused score would be the answer read back, not a prediction.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.record import Record
from ..errors import InputError

log = logging.getLogger(__name__)

MISSING = frozenset({"", "nan", "na", "n/a", "none", "null", "unknown"})
MAX_CATEGORIES = 20  # distinct values a categorical covariate may have
NUMERIC_SHARE = 0.9  # a column with at least this share of its present values numbers is numeric
EPSILON = 1e-6  # probabilities are clipped to [EPSILON, 1 - EPSILON] before logs
MAX_MAGNITUDE = 1e100  # a numeric covariate of this magnitude or more (or inf) is refused; "nan" is missing
LEAK_MIN_RECORDS = 20  # a column that separates the classes perfectly over this many records restates the label


def parse_columns(text: str | Sequence[str] | None) -> list[str]:
    """Covariate columns from an option: ``"age_approx,sex"`` or a list; ``"none"`` / empty = none."""
    if text is None:
        return []
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [name.strip() for name in names if name.strip()]
    if [name.lower() for name in names] == ["none"]:
        return []
    if "none" in (name.lower() for name in names):
        raise InputError(f"covariates: 'none' (the image alone) cannot be combined with column names: "
                         f"{', '.join(names)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"covariate column(s) {', '.join(repeated)} given more than once: {', '.join(names)}")
    return names


def covariate_value(record: Record, column: str) -> str | None:
    """The record's value of ``column`` as stripped text, None when missing."""
    value = record.meta.get(column)
    if value is None and column in record.labels:
        value = record.labels[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in MISSING else text


def present_columns(records: Sequence[Record], columns: Sequence[str], source: str, whose: str) -> list[str]:
    """``columns`` that some record has a value of; the others are left out with a warning (names only), for
    default covariates (``whose``: "the recipe's", "the model's") on data that may not carry them."""
    present = [c for c in columns if any(covariate_value(record, c) is not None for record in records)]
    if present != list(columns):
        log.warning("%s: no record has %s covariate column(s) %s; scored on the image alone for them", source,
                    whose, ", ".join(c for c in columns if c not in present))
    return present


def model_covariates(model: Any, records: Sequence[Record], source: str) -> list[str]:
    """The covariates a trained model fuses (its meta's ``covariates``, from its recipe) that ``records``, the
    probe's training records, have; the others are left out with a warning (``present_columns``)."""
    return present_columns(records, getattr(model, "meta", {}).get("covariates", []), source, "the model's")


def check_covariates(records: Sequence[Record], columns: Sequence[str], labels: Sequence[str],
                     source: str) -> CovariateEncoder:
    """The encoder of ``columns`` fitted on ``records`` (training records), after every check: each column has
    a value, is a number or a category (``CovariateEncoder.fit``), and is not one of ``labels`` nor restates it
    (``check_not_label``). InputError naming ``source`` and the column otherwise."""
    encoder = CovariateEncoder.fit(records, columns, source)
    check_not_label(records, columns, labels, source)
    return encoder


def check_not_label(records: Sequence[Record], columns: Sequence[str], labels: Sequence[str], source: str) -> None:
    """InputError for a covariate that is one of ``labels`` or restates one (see the module docstring)."""
    for label in labels:
        if label in columns:
            raise InputError(f"{source}: {label!r} is the label column; it cannot also be a covariate")
        for column in columns:
            if _separates(records, column, label, source):
                raise InputError(f"{source}: covariate column {column!r} separates the classes of label {label!r} "
                                 f"perfectly on the training records: it restates the label (a leak), not a "
                                 f"covariate; leave it out of the covariates")


def _separates(records: Sequence[Record], column: str, label: str, source: str) -> bool:
    """Whether ``column``'s present values tell ``label``'s classes apart without error (at least
    ``LEAK_MIN_RECORDS`` records with both, at least 2 classes among them)."""
    pairs = [(covariate_value(record, column), record.labels.get(label)) for record in records]
    known = [(value, str(target).strip()) for value, target in pairs
             if value is not None and target is not None and str(target).strip()]
    if len(known) < LEAK_MIN_RECORDS or len({target for _, target in known}) < 2:
        return False
    numbers = [_parsed(value, column, source) for value, _ in known]
    if None not in numbers:  # numeric: the classes' ranges of values, sorted, must not overlap
        by_class: dict[str, list[float]] = {}
        for number, (_, target) in zip(numbers, known, strict=True):
            by_class.setdefault(target, []).append(number or 0.0)
        spans = sorted((min(values), max(values)) for values in by_class.values())
        return all(before[1] < after[0] for before, after in itertools.pairwise(spans))
    classes_of: dict[str, set[str]] = {}
    for value, target in known:
        classes_of.setdefault(value, set()).add(target)
    return all(len(targets) == 1 for targets in classes_of.values())


def _number(text: str) -> float | None:
    """The value as a number; None for text. ``_OutOfRange`` for inf or a magnitude of at least ``MAX_MAGNITUDE``,
    which no covariate has and which would overflow the standardisation (``_parsed`` turns it into an InputError
    naming the column)."""
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number) or abs(number) >= MAX_MAGNITUDE:
        raise _OutOfRange
    return number


def _looks_like_ids(numbers: np.ndarray) -> bool:
    """Whole numbers, a different one in each of at least ``LEAK_MIN_RECORDS`` records: an id's pattern (ages,
    counts and scores repeat over that many patients). Only warned: a fine measurement can look the same."""
    return (len(numbers) >= LEAK_MIN_RECORDS and bool(np.all(numbers == np.round(numbers)))
            and len(np.unique(numbers)) == len(numbers))


class _OutOfRange(Exception):
    """A covariate value that parses as a number but is infinite or absurdly large."""


def _parsed(value: str, column: str, source: str) -> float | None:
    try:
        return _number(value)
    except _OutOfRange:
        raise InputError(f"{source}: covariate column {column!r} has a value that is not a finite number of "
                         f"magnitude below {MAX_MAGNITUDE:g} (inf, or too large)") from None


@dataclass
class CovariateEncoder:
    """Columns of record metadata as a numeric matrix; fitted on the training records."""

    columns: list[str]
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> (mean, std)
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # numeric column -> training (min, max)
    categories: dict[str, list[str]] = field(default_factory=dict)  # column -> training values
    missing_share: dict[str, float] = field(default_factory=dict)  # column -> share missing in training
    non_numeric_share: dict[str, float] = field(default_factory=dict)  # numeric column -> share of other values

    @classmethod
    def fit(cls, records: Sequence[Record], columns: Sequence[str], source: str = "training data") -> CovariateEncoder:
        """Each column's kind and scale from ``records``; InputError for a column no record has."""
        if not columns:
            raise InputError("no covariate columns given")
        encoder = cls(list(columns))
        for column in columns:
            values = [covariate_value(record, column) for record in records]
            present = [value for value in values if value is not None]
            if not present:
                available = sorted({key for record in records for key in (*record.meta, *record.labels)})
                raise InputError(f"{source}: no record has a value for covariate column {column!r}; "
                                 f"metadata columns: {', '.join(available) or 'none'}")
            encoder.missing_share[column] = 1 - len(present) / len(values)
            parsed = [_parsed(value, column, source) for value in present]
            numbers = [number for number in parsed if number is not None]
            if numbers and len(numbers) >= NUMERIC_SHARE * len(present):
                other = len(present) - len(numbers)
                encoder.non_numeric_share[column] = other / len(values)
                if other:  # counted, not quoted: a value may be anything a site typed
                    log.warning("%s: covariate column %r is numeric but %d of its %d present values are not numbers; "
                                "they are read as missing", source, column, other, len(present))
                array = np.array(numbers, dtype=float)
                encoder.numeric[column] = (float(array.mean()), float(array.std()) or 1.0)
                encoder.bounds[column] = (float(array.min()), float(array.max()))
                if array.std() == 0:
                    log.warning("%s: covariate column %r has one value in every training record: it tells the "
                                "classes nothing", source, column)
                elif _looks_like_ids(array):
                    log.warning("%s: covariate column %r has its own whole number in every one of the %d training "
                                "records: it looks like an identifier (a row or patient number), which tells nothing "
                                "about the patient and may follow the order the data were collected in; keep it "
                                "only if it is a measurement", source, column, len(array))
            else:
                distinct = sorted(set(present))
                once = sum(present.count(value) == 1 for value in distinct)
                if len(distinct) > MAX_CATEGORIES or (len(distinct) >= 3 and once > len(distinct) / 2):
                    # an id or free text, not a category: refused, so its values never reach an output
                    raise InputError(f"{source}: covariate column {column!r} has {len(distinct)} distinct "
                                     f"non-numeric values, {once} of them in one record only; a covariate is a "
                                     f"number or a category of at most {MAX_CATEGORIES} values shared by records")
                encoder.categories[column] = distinct
                if len(distinct) == 1:
                    log.warning("%s: covariate column %r has one value in every training record: it tells the "
                                "classes nothing", source, column)
        return encoder

    def transform(self, records: Iterable[Record]) -> np.ndarray:
        """(N, width) matrix: per numeric column the standardised value (clipped to the training range) and a
        missing indicator, per categorical column one indicator per training value."""
        rows = []
        for record in records:
            row: list[float] = []
            for column in self.columns:
                value = covariate_value(record, column)
                if column in self.numeric:
                    mean, std = self.numeric[column]
                    number = None if value is None else _parsed(value, column, "scored records")
                    if number is not None:
                        number = min(max(number, self.bounds[column][0]), self.bounds[column][1])
                    row += [0.0, 1.0] if number is None else [(number - mean) / std, 0.0]
                else:
                    row += [float(value == category) for category in self.categories[column]]
            rows.append(row)
        return np.array(rows, dtype=float).reshape(len(rows), self.width)

    @property
    def width(self) -> int:
        return sum(2 if column in self.numeric else len(self.categories[column]) for column in self.columns)

    def describe(self) -> dict[str, Any]:
        """JSON-ready: each column's kind, training missing share and (categorical) values."""
        return {column: {"kind": "numeric", "missing_share": round(self.missing_share[column], 4),
                         "non_numeric_share": round(self.non_numeric_share.get(column, 0.0), 4),
                         "mean": round(self.numeric[column][0], 4), "std": round(self.numeric[column][1], 4),
                         "range": [round(bound, 4) for bound in self.bounds[column]]}
                if column in self.numeric else
                {"kind": "categorical", "missing_share": round(self.missing_share[column], 4),
                 "values": self.categories[column]}
                for column in self.columns}


class CovariateModel:
    """Logistic regression on encoded covariates; fuses its probabilities with an image classifier's."""

    def __init__(self, encoder: CovariateEncoder, num_classes: int, classifier: Any, prior: np.ndarray):
        self.encoder, self.num_classes, self.classifier, self.prior = encoder, num_classes, classifier, prior

    @classmethod
    def fit(cls, records: Sequence[Record], y: np.ndarray, num_classes: int, columns: Sequence[str],
            source: str = "training data", label: str | None = None) -> CovariateModel:
        """Fit on ``records`` with class indices ``y`` (0 .. num_classes - 1); C = 1 on standardised inputs
        (a handful of columns against hundreds of records needs little regularisation). ``label``: the
        label column ``y`` comes from; a covariate that is it or restates it is refused (``check_not_label``)."""
        from sklearn.linear_model import LogisticRegression

        encoder = check_covariates(records, columns, [] if label is None else [label], source)
        y = np.asarray(y)
        prior = np.bincount(y, minlength=num_classes) / len(y)
        classifier = None
        if len(np.unique(y)) > 1:
            classifier = LogisticRegression(C=1.0, max_iter=1000).fit(encoder.transform(records), y)
        return cls(encoder, num_classes, classifier, prior)

    def probabilities(self, records: Sequence[Record]) -> np.ndarray:
        """(N, num_classes) class probabilities from the covariates alone (a class never seen in training: 0)."""
        out = np.tile(self.prior, (len(records), 1))
        if self.classifier is not None and len(records):
            out = np.zeros((len(records), self.num_classes))
            out[:, self.classifier.classes_] = self.classifier.predict_proba(self.encoder.transform(records))
        return out

    def fuse(self, image_probabilities: np.ndarray, records: Sequence[Record] | None = None,
             covariate_probabilities: np.ndarray | None = None) -> np.ndarray:
        """Late fusion of an image classifier's (N, num_classes) probabilities with the covariates' of ``records``
        (or their ``probabilities``, already computed)."""
        if covariate_probabilities is None:
            if records is None:
                raise InputError("fuse needs the records or their covariate probabilities")
            covariate_probabilities = self.probabilities(records)
        return fuse_probabilities(image_probabilities, covariate_probabilities, self.prior)

    def describe(self, records: Sequence[Record] | None = None) -> dict[str, Any]:
        """The columns and, for ``records`` (e.g. the test set), each column's missing share there and, for a
        categorical column, the share of values training never had (they count as missing), for a numeric one
        the share outside the training range (clipped to it)."""
        columns = self.encoder.describe()
        if records is not None:
            for column in columns:
                values = [covariate_value(record, column) for record in records]
                missing = sum(value is None for value in values)
                columns[column]["missing_share_scored"] = round(missing / max(len(records), 1), 4)
                if column in self.encoder.categories:
                    unseen = sum(value is not None and value not in self.encoder.categories[column]
                                 for value in values)
                    columns[column]["unseen_share_scored"] = round(unseen / max(len(records), 1), 4)
                else:
                    low, high = self.encoder.bounds[column]
                    numbers = [_parsed(value, column, "scored records") for value in values if value is not None]
                    outside = sum(number is not None and not low <= number <= high for number in numbers)
                    columns[column]["out_of_range_share_scored"] = round(outside / max(len(records), 1), 4)
                    other = sum(number is None for number in numbers)  # read as missing
                    columns[column]["non_numeric_share_scored"] = round(other / max(len(records), 1), 4)
        return {"columns": columns, "prior": np.round(self.prior, 5).tolist()}


def fuse_probabilities(image: np.ndarray, covariates: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """softmax(log p_image + log p_covariates - log prior) per row; a class with zero prior (never seen in
    training) keeps probability 0."""
    image, covariates = np.asarray(image, dtype=float), np.asarray(covariates, dtype=float)
    if image.shape != covariates.shape:
        raise InputError(f"image probabilities {image.shape} and covariate probabilities {covariates.shape} differ")
    seen = np.asarray(prior) > 0
    logits = (np.log(np.clip(image, EPSILON, 1 - EPSILON)) + np.log(np.clip(covariates, EPSILON, 1 - EPSILON))
              - np.log(np.clip(prior, EPSILON, 1)))
    logits[:, ~seen] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    fused = np.exp(logits)
    return fused / fused.sum(axis=1, keepdims=True)
