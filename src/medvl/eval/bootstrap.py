"""Percentile bootstrap intervals over records, seeded (plain numpy).

A draw is ``numpy.random.default_rng(seed).integers(0, n, n)`` taken in turn, so the same seed gives
the same draws everywhere. With ``need_both_classes`` (AUC-like metrics, defined only when every class is
present) the bootstrap is stratified, as pROC's AUC intervals are: each class's records are drawn among
themselves, keeping its count, so every draw holds every class and is used. (Draws missing a class used to be
skipped: on a group with a class of one or two records most draws were, and the interval came from the few
holding them, its coverage far below the level.) ``resamples`` in a result is the count of draws used.
The interval at ``level`` is the ((1 - level) / 2, (1 + level) / 2) percentile pair of the metric over
the draws (numpy's linear interpolation); ``value`` is the metric on all records.

A metric that is a share of records (accuracy) or a mean of per-class recalls (balanced accuracy, sensitivity,
specificity) takes the plain bootstrap instead (``stratified=False``): the class mix is part of what varies from
sample to sample, and a stratified draw would hide it (a model answering one class would get an interval of zero
width). Balanced accuracy is undefined on a draw lacking a class: such draws are left out (``every_class_draws``),
which at the sizes these figures are reported for (tens of records per class) is almost never one.
``bench run`` and ``bench medmnist`` both take these draws, so the two give the same interval for the same figure;
``medvl.eval.subgroups.DRAWS`` says which each metric takes, for the headline rows and the subgroup rows alike.

The unit resampled is the record unless ``groups`` (one id per record: a case or patient id, the image of a VQA
question) is given: then a draw is a cluster bootstrap, whole groups drawn with replacement (as many as there are)
and every record of each drawn group kept, since records of one case are not independent and a draw of records
would give intervals too narrow. Stratified draws then stratify the groups by class when every group holds one class
only (a group is drawn among the groups of its class, keeping their count: the stratified draw above, of cases);
when a group holds several classes, strata by each group's set of classes would draw a group whose set is its own
in every draw, exactly once, and its variation (a case holding most records) would never reach the interval: the
groups are then drawn plainly and a draw lacking a class is drawn again (at most ``MAX_REDRAWS`` times the
resamples in all), so every draw still holds every class. Without ``groups`` the draws are those above, bit for
bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..checks import check_number
from ..errors import InputError

Metric = Callable[..., float | None]  # metric(y_true, *arrays) on one (re)sample -> a number


def bootstrap_draws(y_true: np.ndarray, resamples: int = 1000, seed: int = 0,
                    need_both_classes: bool = True, rng: np.random.Generator | None = None,
                    groups: np.ndarray | Sequence | None = None) -> list[np.ndarray]:
    """Index arrays of ``resamples`` draws with replacement of ``len(y_true)`` records.

    With ``need_both_classes`` each draw is stratified by class (each class's records drawn among themselves,
    its count kept). ``rng`` (instead of ``seed``) continues an existing stream. ``groups`` (one id per record):
    whole groups are drawn instead of records (``_group_draws``; see the module docstring).
    """
    y_true = np.asarray(y_true)
    rng = rng if rng is not None else np.random.default_rng(seed)
    if groups is not None:
        return _group_draws(y_true, _check_groups(groups, len(y_true)), resamples, need_both_classes, rng)
    if not need_both_classes:
        return [rng.integers(0, len(y_true), len(y_true)) for _ in range(resamples)]
    codes = np.unique(y_true, return_inverse=True)[1].reshape(-1)
    members = [np.flatnonzero(codes == code) for code in range(int(codes.max()) + 1 if len(codes) else 0)]
    return [np.concatenate([group[rng.integers(0, len(group), len(group))] for group in members])
            for _ in range(resamples)]


MAX_REDRAWS = 100  # cluster draws tried per resample, at most, to find ones holding every class (``_group_draws``)


def _group_draws(y_true: np.ndarray, groups: np.ndarray, resamples: int, stratified: bool,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Cluster bootstrap draws: per draw, as many groups as there are drawn with replacement, each with every one of
    its records (groups in order of first appearance). ``stratified`` (every draw must hold every class): when each
    group holds one class, the groups are drawn among those of the same class, each class keeping its count of
    groups; else plainly, a draw lacking a class drawn again (the module docstring), so that fewer than
    ``resamples`` draws may come back when a class is in very few groups."""
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
    first: dict[int, int] = {}
    for index, code in enumerate(codes.tolist()):
        first.setdefault(code, index)
    members = [np.flatnonzero(codes == code) for code in sorted(first, key=first.__getitem__)]
    signatures = [tuple(np.unique(y_true[index]).tolist()) for index in members]
    if stratified and all(len(signature) == 1 for signature in signatures):
        strata = [np.array([g for g, signature in enumerate(signatures) if signature == key])
                  for key in sorted(set(signatures))]
        return [np.concatenate([members[g] for stratum in strata
                                for g in stratum[rng.integers(0, len(stratum), len(stratum))]])
                for _ in range(resamples)]
    classes = len(np.unique(y_true))
    draws: list[np.ndarray] = []
    for _ in range(MAX_REDRAWS * resamples if stratified else resamples):
        drawn = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if not stratified or len(np.unique(y_true[drawn])) == classes:
            draws.append(drawn)
            if len(draws) == resamples:
                break
    return draws


def _check_groups(groups: np.ndarray | Sequence, n: int) -> np.ndarray:
    ids = np.asarray([str(group) for group in groups])
    if len(ids) != n:
        raise InputError(f"bootstrap groups must hold one id per record ({n}), got {len(ids)}")
    return ids


def group_count(groups: np.ndarray | Sequence | None, n: int) -> int:
    """How many resampling units ``n`` records form: their distinct ``groups``, or ``n`` without groups."""
    return n if groups is None else len(set(_check_groups(groups, n).tolist()))


def every_class_draws(y_true: np.ndarray, draws: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The ``draws`` that hold every class of ``y_true`` (a plain bootstrap of a metric needing every class)."""
    y_true = np.asarray(y_true)
    classes = len(np.unique(y_true))
    return [index for index in draws if len(np.unique(y_true[index])) == classes]


def percentile_interval(metric_of_index: Callable[[np.ndarray], float], n: int, draws: Sequence[np.ndarray],
                        level: float = 0.95) -> dict[str, float | None]:
    """``value`` of ``metric_of_index`` on all ``n`` records, ``low`` / ``high`` percentiles over ``draws``
    (None when there is no draw)."""
    value = metric_of_index(np.arange(n))
    if not draws:
        return {"value": value, "low": None, "high": None}
    values = np.array([metric_of_index(index) for index in draws], dtype=float)
    tail = (100 - 100 * level) / 2  # 2.5 exactly for level 0.95
    low, high = np.percentile(values, [tail, 100 - tail])
    return {"value": value, "low": float(low), "high": float(high)}


def bootstrap_ci(metric: Metric, y_true: np.ndarray | Sequence, *arrays: np.ndarray | Sequence,
                 resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 need_both_classes: bool = True, stratified: bool = True,
                 groups: np.ndarray | Sequence | None = None) -> dict:
    """Percentile bootstrap interval of ``metric(y_true, *arrays)`` over records.

    ``arrays`` (e.g. scores or predictions) are resampled with ``y_true`` along their first axis.
    ``need_both_classes`` (the metric is undefined without every class): stratified draws, or with
    ``stratified=False`` plain draws of which those lacking a class are left out (balanced accuracy); without
    it, plain draws, all used (accuracy). Returns ``value`` (on all records), ``low``, ``high`` (None if no draw
    was usable) and ``resamples`` (draws used). ``groups`` (one id per record, e.g. a case id): a cluster
    bootstrap drawing whole groups (the module docstring). Example: ``bootstrap_ci(roc_auc_score, y, scores)``.
    """
    y, rest = _check_sample("y_true", y_true, arrays)
    _check_settings(resamples, level)
    if need_both_classes:
        _require_classes("y_true", y)
    draws = bootstrap_draws(y, resamples, seed, need_both_classes and stratified, groups=groups)
    if need_both_classes and not stratified:
        draws = every_class_draws(y, draws)
    interval = percentile_interval(lambda index: _number(metric(y[index], *(a[index] for a in rest))),
                                   len(y), draws, level)
    return {**interval, "resamples": len(draws)}


def difference_ci(metric: Metric, first: Sequence[np.ndarray | Sequence], second: Sequence[np.ndarray | Sequence],
                  resamples: int = 1000, seed: int = 0, level: float = 0.95, need_both_classes: bool = True,
                  stratified: bool = True,
                  groups: tuple[np.ndarray | Sequence, np.ndarray | Sequence] | None = None) -> dict:
    """Bootstrap interval of ``metric(*first) - metric(*second)`` for two groups of records.

    ``first`` and ``second`` are ``(y_true, *arrays)`` of each group; each draw resamples both groups
    independently (within group, so each keeps its size; with ``need_both_classes`` within each class of a
    group too, or with ``stratified=False`` plainly, a pair being left out when either draw lacks a class of its
    group, as ``bootstrap_ci`` draws balanced accuracy). ``groups``: one id per record of each group (a case id),
    for a cluster bootstrap of each (whole cases drawn; the module docstring). Returns ``value``, ``low``, ``high``,
    ``resamples``.
    """
    if len(first) < 1 or len(second) < 1:
        raise InputError("difference_ci needs (y_true, *arrays) for each group, got an empty group")
    y_a, rest_a = _check_sample("first group y_true", first[0], first[1:])
    y_b, rest_b = _check_sample("second group y_true", second[0], second[1:])
    _check_settings(resamples, level)
    if need_both_classes and stratified:  # a plain draw of a one-class group holds its class
        _require_classes("first group y_true", y_a)
        _require_classes("second group y_true", y_b)
    rng = np.random.default_rng(seed)
    groups_a, groups_b = groups if groups is not None else (None, None)
    pairs = []
    for _ in range(resamples):
        a = bootstrap_draws(y_a, 1, rng=rng, need_both_classes=need_both_classes and stratified, groups=groups_a)
        b = bootstrap_draws(y_b, 1, rng=rng, need_both_classes=need_both_classes and stratified, groups=groups_b)
        if need_both_classes and not stratified:
            a, b = every_class_draws(y_a, a), every_class_draws(y_b, b)
        if a and b:
            pairs.append((a[0], b[0]))

    def gap(index_a: np.ndarray, index_b: np.ndarray) -> float:
        return (_number(metric(y_a[index_a], *(x[index_a] for x in rest_a)))
                - _number(metric(y_b[index_b], *(x[index_b] for x in rest_b))))

    value = gap(np.arange(len(y_a)), np.arange(len(y_b)))
    if not pairs:
        return {"value": value, "low": None, "high": None, "resamples": 0}
    tail = (100 - 100 * level) / 2
    low, high = np.percentile([gap(a, b) for a, b in pairs], [tail, 100 - tail])
    return {"value": value, "low": float(low), "high": float(high), "resamples": len(pairs)}


def _number(value: float | None) -> float:
    if value is None:
        raise InputError("the metric is undefined (None) on a bootstrap sample; it needs classes the sample "
                         "lacks (keep need_both_classes=True for AUC-like metrics)")
    return float(value)


def _check_sample(name: str, y_true: np.ndarray | Sequence,
                  arrays: Sequence[np.ndarray | Sequence]) -> tuple[np.ndarray, list[np.ndarray]]:
    y = np.asarray(y_true)
    if y.ndim != 1 or len(y) == 0:
        raise InputError(f"{name} must be a non-empty 1D array of labels, got shape {y.shape}")
    rest = [np.asarray(a) for a in arrays]
    for position, array in enumerate(rest, start=1):
        if array.ndim == 0 or len(array) != len(y):
            raise InputError(f"array {position} beside {name} must have {len(y)} rows (one per record), "
                             f"got shape {array.shape}")
    return y, rest


def _check_settings(resamples: int, level: float) -> None:
    check_number("bootstrap resamples", resamples, minimum=1, integer=True)
    check_number("confidence level", level, minimum=0, maximum=1, exclusive_minimum=True)
    if level >= 1:
        raise InputError(f"confidence level must lie strictly between 0 and 1, got {level}")


def _require_classes(name: str, y: np.ndarray) -> None:
    if len(np.unique(y)) < 2:
        raise InputError(f"{name} holds a single class ({y[0]!r}); a bootstrap that needs both classes "
                         f"cannot draw any sample (pass need_both_classes=False for a metric defined on one class)")
