"""Trust checks of an evaluation: bootstrap intervals against loop references, sanity baselines and
their verdict, corruption severities, subgroup metrics against hand computation."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import medvl
from medvl.data import captions_for
from medvl.data.images import read_image
from medvl.data.record import Dataset, Record
from medvl.embed import class_embeddings
from medvl.errors import InputError
from medvl.eval import robustness
from medvl.eval.bootstrap import bootstrap_ci, difference_ci
from medvl.eval.metrics import classification_metrics
from medvl.eval.robustness import CORRUPTIONS, corrupt, corruption_curves
from medvl.eval.sanity import blank_image_embedding, compare_to_baselines, retrieval_sanity, sanity_baselines
from medvl.eval.subgroups import age_band, groups_from_records, is_age_column, macro_auc, subgroup_metrics
from medvl.eval.zero_shot import zero_shot
from medvl.models.preprocess import read_for

# ---------------------------------------------------------------- bootstrap


def _stratified(rng, y):
    """One stratified draw: each class's records drawn among themselves (in class order), its count kept."""
    parts = []
    for label in sorted(set(y.tolist())):
        members = np.flatnonzero(y == label)
        parts.append(members[rng.integers(0, len(members), len(members))])
    return np.concatenate(parts)


def _reference_ci(metric, y, scores, resamples, seed, level):
    """The stratified percentile bootstrap written out as a plain loop."""
    rng = np.random.default_rng(seed)
    values = [metric(y[index], scores[index]) for index in (_stratified(rng, y) for _ in range(resamples))]
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return metric(y, scores), low, high, len(values)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_bootstrap_ci_matches_a_loop_reference_and_brackets_the_value(level):
    rng = np.random.default_rng(1)
    y = np.array([1, 1] + [0] * 10)  # few positives: a plain draw often has none; a stratified one keeps both
    scores = rng.random(12) + 0.3 * y
    result = bootstrap_ci(roc_auc_score, y, scores, resamples=150, seed=7, level=level)
    value, low, high, used = _reference_ci(roc_auc_score, y, scores, 150, 7, level)
    assert set(result) == {"value", "low", "high", "resamples"}
    assert result["value"] == pytest.approx(value) and result["resamples"] == used == 150
    assert result["low"] == pytest.approx(low) and result["high"] == pytest.approx(high)
    assert result["low"] <= result["value"] <= result["high"]
    probabilities = np.stack([1 - scores, scores], 1)
    fast = bootstrap_ci(macro_auc, y, probabilities, resamples=150, seed=7, level=level)  # the same AUC from ranks
    assert fast == pytest.approx(result)
    assert bootstrap_ci(macro_auc, y, probabilities, resamples=150, seed=7, level=level) == fast  # seeded
    assert bootstrap_ci(macro_auc, y, probabilities, resamples=150, seed=8, level=level) != fast


def test_a_plain_bootstrap_of_a_metric_needing_every_class_leaves_out_only_draws_lacking_one():
    """Accuracy and balanced accuracy take plain draws over records (the class mix varies from draw to draw);
    balanced accuracy leaves out the draws that lack a class. A model answering one class keeps an interval
    as wide as its sampling uncertainty, where a stratified draw (each class's count fixed) gave it none."""
    from medvl.eval.subgroups import accuracy, balanced_accuracy

    y = np.array([0] * 9 + [1] * 3)
    answers = np.zeros((12, 2))
    answers[:, 0] = 1  # always class 0
    rng = np.random.default_rng(4)
    draws = [rng.integers(0, 12, 12) for _ in range(400)]
    complete = [index for index in draws if len(np.unique(y[index])) == 2]
    assert 0 < len(complete) < len(draws)  # some draws hold no positive
    for metric, used in ((accuracy, draws), (balanced_accuracy, complete)):
        values = [metric(y[index], answers[index]) for index in used]
        low, high = np.percentile(values, [2.5, 97.5])
        result = bootstrap_ci(metric, y, answers, resamples=400, seed=4, need_both_classes=metric is balanced_accuracy,
                              stratified=False)
        assert result == {"value": metric(y, answers), "low": low, "high": high, "resamples": len(used)}
    assert bootstrap_ci(accuracy, y, answers, resamples=400, seed=4, need_both_classes=False)["low"] < 0.75
    stratified = bootstrap_ci(accuracy, y, answers, resamples=400, seed=4)
    assert stratified["low"] == stratified["high"] == 0.75  # why a stratified draw is not for accuracy


def test_bootstrap_ci_without_class_requirement_uses_every_draw_and_narrows_with_level():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    predicted = np.where(rng.random(80) < 0.8, y, 1 - y)

    def accuracy(truth, guess):
        return float((truth == guess).mean())

    wide = bootstrap_ci(accuracy, y, predicted, resamples=300, need_both_classes=False)
    narrow = bootstrap_ci(accuracy, y, predicted, resamples=300, need_both_classes=False, level=0.5)
    assert wide["resamples"] == 300 and wide["value"] == pytest.approx((y == predicted).mean())
    assert wide["low"] < narrow["low"] <= narrow["high"] < wide["high"]


def test_difference_ci_matches_a_loop_reference():
    rng = np.random.default_rng(3)
    y_a, y_b = rng.integers(0, 2, 30), rng.integers(0, 2, 20)
    s_a, s_b = rng.random(30) + 0.5 * y_a, rng.random(20) + 0.1 * y_b
    result = difference_ci(roc_auc_score, (y_a, s_a), (y_b, s_b), resamples=100, seed=4)
    draws = np.random.default_rng(4)
    gaps = []
    for _ in range(100):
        a, b = _stratified(draws, y_a), _stratified(draws, y_b)
        gaps.append(roc_auc_score(y_a[a], s_a[a]) - roc_auc_score(y_b[b], s_b[b]))
    assert result["value"] == pytest.approx(roc_auc_score(y_a, s_a) - roc_auc_score(y_b, s_b))
    assert result["resamples"] == len(gaps) == 100
    assert [result["low"], result["high"]] == pytest.approx(np.percentile(gaps, [2.5, 97.5]))
    same = difference_ci(roc_auc_score, (y_a, s_a), (y_a, s_a), resamples=100)
    assert same["value"] == 0 and same["low"] < 0 < same["high"]


def test_a_small_group_with_rare_classes_gets_an_interval_from_every_draw_and_near_nominal_coverage():
    """Draws missing a class used to be skipped: a 12-record group with classes of one or two records kept about
    a sixth of the draws, and its "95 %" macro-AUC interval covered the true value 65 % of the time. Stratified,
    every draw is used, and the coverage of a small-but-not-tiny group is near the level."""
    rng = np.random.default_rng(1)
    classes = 3

    def sample(counts):
        y = np.repeat(np.arange(classes), counts)
        scores = rng.normal(size=(len(y), classes))
        scores[np.arange(len(y)), y] += 1.0
        return y, scores

    big_y, big_scores = sample([20_000] * classes)
    truth = macro_auc(big_y, big_scores)
    rare = bootstrap_ci(macro_auc, *sample([1, 2, 9]), resamples=200, seed=0)
    assert rare["resamples"] == 200
    covered = 0
    for seed in range(100):
        interval = bootstrap_ci(macro_auc, *sample([15, 15, 15]), resamples=200, seed=seed)
        covered += interval["low"] <= truth <= interval["high"]
    assert covered >= 85  # 0.95 nominal; the percentile bootstrap runs a little under it at n = 45


def test_bootstrap_inputs_are_checked():
    y, scores = np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])
    with pytest.raises(InputError, match="4 rows"):
        bootstrap_ci(roc_auc_score, y, scores[:3])
    with pytest.raises(InputError, match="confidence level"):
        bootstrap_ci(roc_auc_score, y, scores, level=1.0)
    with pytest.raises(InputError, match="resamples"):
        bootstrap_ci(roc_auc_score, y, scores, resamples=0)
    with pytest.raises(InputError, match="single class"):
        bootstrap_ci(roc_auc_score, np.zeros(4, int), scores)
    with pytest.raises(InputError, match="second group"):
        difference_ci(roc_auc_score, (y, scores), (np.ones(4, int), scores))


# ---------------------------------------------------------------- subgroups


def test_age_bands_and_age_columns():
    cases = {39.9: "<40", 40: "40-59", "59.5": "40-59", 60.0: "60-79", "80": "80+", 95: "80+", "065Y": "60-79",
             "018M": "<40", " 45 ": "40-59", None: "unknown", "": "unknown", float("nan"): "unknown",
             "unknown": "unknown", -1: "unknown", 200: "unknown", True: "unknown"}
    for age, band in cases.items():
        assert age_band(age) == band, age
    assert all(is_age_column(c) for c in ("age", "age_approx", "PatientAge", "patient_age"))
    assert not any(is_age_column(c) for c in ("image", "stage", "average", "view"))


def _record(i, labels, meta):
    return Record(id=f"r{i}", images=[np.zeros((4, 4), np.uint8)], labels=labels, meta=meta)


def test_groups_from_records_reads_labels_then_meta_and_bands_ages():
    records = [_record(0, {"finding": "a", "sex": "F"}, {"age_approx": "55.0", "site": "torso"}),
               _record(1, {"finding": "b"}, {"sex": "M", "age_approx": "", "site": "head"}),
               _record(2, {"finding": "a"}, {"age_approx": "85"})]
    groups = groups_from_records(records, ["sex", "age_approx", "site"])
    assert groups == {"sex": ["F", "M", None], "age_approx": ["40-59", None, "80+"], "site": ["torso", "head", None]}
    with pytest.raises(InputError, match="'ward'.*columns present: age_approx, finding, sex, site"):
        groups_from_records(records, ["ward"])


def _hand_metrics(y, p):
    predicted = p.argmax(1)
    return (roc_auc_score(y, p[:, 1]), balanced_accuracy_score(y, predicted), float((predicted == y).mean()))


def test_a_cluster_bootstrap_draws_whole_cases_and_without_groups_the_draws_are_unchanged():
    """Records of one case are not independent: with ``groups`` a draw takes whole cases. Reference: every case
    holding k identical copies of one record, the cluster bootstrap gives exactly the record bootstrap of the
    records themselves (same draws case for case), while the record bootstrap of the copies is far too narrow.
    Without groups (or a group per record) the draws are those of before, bit for bit."""
    from medvl.eval.bootstrap import bootstrap_draws
    from medvl.eval.subgroups import DRAWS, accuracy, balanced_accuracy

    rng = np.random.default_rng(3)
    y = np.array([0, 1, 2] * 8)
    probabilities = rng.dirichlet([1, 1, 1], len(y)) + 0.4 * np.eye(3)[y]
    copies = 5
    y_copied, p_copied = np.repeat(y, copies), np.repeat(probabilities, copies, axis=0)
    cases = np.repeat([f"case{i}" for i in range(len(y))], copies)
    for metric, function in (("auc", macro_auc), ("accuracy", accuracy), ("balanced_accuracy", balanced_accuracy)):
        alone = bootstrap_ci(function, y, probabilities, resamples=200, seed=4, **DRAWS[metric])
        clustered = bootstrap_ci(function, y_copied, p_copied, resamples=200, seed=4, groups=cases, **DRAWS[metric])
        assert clustered == pytest.approx(alone), metric
        naive = bootstrap_ci(function, y_copied, p_copied, resamples=200, seed=4, **DRAWS[metric])
        assert naive["high"] - naive["low"] < 0.7 * (alone["high"] - alone["low"]), metric
    draws = bootstrap_draws(y_copied, 20, seed=1, groups=cases)
    for index in draws:  # every case drawn is whole, and every class is in every stratified draw
        assert len(index) == len(y_copied) and set(y_copied[index]) == {0, 1, 2}
        drawn = cases[index]
        assert all((drawn == case).sum() % copies == 0 for case in set(drawn))
    for stratified in (True, False):
        before = bootstrap_draws(y, 30, seed=2, need_both_classes=stratified)
        singletons = bootstrap_draws(y, 30, seed=2, need_both_classes=stratified, groups=np.arange(len(y)))
        assert all(np.array_equal(a, b) for a, b in zip(before, singletons, strict=True))
    first, second = (y_copied[:60], p_copied[:60]), (y_copied[60:], p_copied[60:])
    gap = difference_ci(macro_auc, first, second, resamples=200, seed=5, groups=(cases[:60], cases[60:]))
    reference = difference_ci(macro_auc, (y[:12], probabilities[:12]), (y[12:], probabilities[12:]), resamples=200,
                              seed=5)
    assert gap == pytest.approx(reference)


def test_a_case_holding_several_classes_is_drawn_plainly_not_in_a_stratum_of_its_own():
    """Groups were stratified by the set of classes each held: a case whose set was its own (here the one case
    holding 80 of 100 records, of both classes) was in every draw exactly once, so its variation never reached the
    interval, which came out narrower than the per-image one it was to widen (0.80-0.91 against a plain cluster
    bootstrap's 0.31-0.95). With a case of several classes the cases are drawn plainly, a draw lacking a class drawn
    again: equal to that reference, draw for draw."""
    from medvl.eval.bootstrap import bootstrap_draws

    rng = np.random.default_rng(11)
    y = np.array([0, 1] * 50)
    scores = rng.random(100) + 0.3 * y
    cases = np.array(["big"] * 80 + [f"small{i}" for i in range(20)])
    members = [np.flatnonzero(cases == case) for case in dict.fromkeys(cases.tolist())]
    reference, stream = [], np.random.default_rng(8)
    while len(reference) < 300:  # a plain cluster bootstrap, written out: whole cases, every class in each draw
        drawn = np.concatenate([members[g] for g in stream.integers(0, len(members), len(members))])
        if len(set(y[drawn])) == 2:
            reference.append(drawn)
    draws = bootstrap_draws(y, 300, seed=8, groups=cases)
    assert len(draws) == 300 and all(np.array_equal(a, b) for a, b in zip(draws, reference, strict=True))
    assert sum(not (cases[index] == "big").any() for index in draws) > 0  # the big case is left out of some draws
    clustered = bootstrap_ci(roc_auc_score, y, scores, resamples=300, seed=8, groups=cases)
    per_image = bootstrap_ci(roc_auc_score, y, scores, resamples=300, seed=8)
    assert clustered["high"] - clustered["low"] > 1.5 * (per_image["high"] - per_image["low"])


def test_subgroup_sizes_count_cases_when_records_share_one():
    """A group of 12 images from 2 patients is two patients: with ``units`` it is under ``min_size`` 10 and not
    scored (nor the worst group), and each scored group says its count of cases beside its records."""
    rng = np.random.default_rng(6)
    y = np.array([0, 1] * 30)
    probabilities = rng.dirichlet([1, 1], len(y)) + 0.3 * np.eye(2)[y]
    band = ["<40"] * 24 + ["40-59"] * 24 + ["80+"] * 12
    cases = [f"a{i}" for i in range(24)] + [f"b{i // 2}" for i in range(24)] + [f"c{i // 6}" for i in range(12)]
    by_image = subgroup_metrics(y, probabilities, {"age": band}, resamples=50)["columns"]["age"]
    assert "80+" in by_image["groups"]  # 12 images: scored, though they are two patients
    result = subgroup_metrics(y, probabilities, {"age": band}, resamples=50, units=cases)
    column = result["columns"]["age"]
    assert result["units"] == 24 + 12 + 2 and column["too_small"] == {"80+": 2}
    assert {name: group["units"] for name, group in column["groups"].items()} == {"<40": 24, "40-59": 12}
    assert column["groups"]["40-59"]["n"] == 24 and column["worst_group"] in ("<40", "40-59")


def test_subgroup_metrics_match_hand_computation_and_find_the_worst_group():
    rng = np.random.default_rng(5)
    sizes = {"A": 40, "B": 30, "C": 6}  # C is below min_size
    separation = {"A": 2.0, "B": 0.3, "C": 2.0}
    y, p, group = [], [], []
    for name, n in sizes.items():
        truth = np.arange(n) % 2
        positive = 1 / (1 + np.exp(-(rng.normal(size=n) + separation[name] * (2 * truth - 1))))
        y += truth.tolist()
        p += np.stack([1 - positive, positive], 1).tolist()
        group += [name] * n
    y, p = np.array(y), np.array(p)
    group[0] = None  # a record without a value: in no group
    result = subgroup_metrics(y, p, {"site": group}, min_size=10, resamples=300, seed=1)
    column = result["columns"]["site"]
    assert result["n"] == 76 and column["missing"] == 1
    # a value too rare to score is counted, never named (it may be a note or an id); age bands are named
    assert set(column["groups"]) == {"A", "B"} and column["too_small"] == {}
    assert column["unnamed_small_groups"] == 1 and column["unnamed_small_records"] == 6
    hand = {}
    for name in ("A", "B"):
        members = np.array([g == name for g in group])
        hand[name] = _hand_metrics(y[members], p[members])
        scored = column["groups"][name]
        assert scored["n"] == members.sum()
        for key, expected in zip(("auc", "balanced_accuracy", "accuracy"), hand[name], strict=True):
            assert scored[key]["value"] == pytest.approx(expected)
            assert scored[key]["low"] <= scored[key]["value"] <= scored[key]["high"]
    assert column["worst_group"] == "B" and column["best_group"] == "A"
    gap = column["gap"]
    assert gap["value"] == pytest.approx(hand["A"][0] - hand["B"][0]) and gap["value"] > 0.2
    assert gap["low"] <= gap["value"] <= gap["high"]
    by_accuracy = subgroup_metrics(y, p[:, 1], {"site": group}, resamples=100, headline="accuracy")  # 1D scores
    assert by_accuracy["columns"]["site"]["gap"]["value"] == pytest.approx(hand["A"][2] - hand["B"][2])


def test_multiclass_subgroup_auc_is_the_macro_over_classes_present():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, 60)
    y[:20] = rng.integers(0, 2, 20)  # group "x" holds classes 0 and 1 only
    p = rng.dirichlet(np.ones(4), 60)
    group = ["x"] * 20 + ["y"] * 40
    column = subgroup_metrics(y, p, {"g": group}, resamples=50)["columns"]["g"]
    for name, members in (("x", slice(0, 20)), ("y", slice(20, 60))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reference's sklearn notes that group x lacks classes 2 and 3
            expected = classification_metrics(y[members], p[members], list("abcd"))
        assert column["groups"][name]["auc"]["value"] == pytest.approx(expected["macro_auc"])
        assert column["groups"][name]["balanced_accuracy"]["value"] == pytest.approx(expected["balanced_accuracy"])
    assert macro_auc(np.zeros(5, int), p[:5]) is None


def test_single_class_groups_have_no_auc_and_are_left_out_of_the_gap():
    y = np.array([0] * 12 + [0, 1] * 6)
    p = np.linspace(0.1, 0.9, 24)
    column = subgroup_metrics(y, p, {"g": ["one"] * 12 + ["two"] * 12}, resamples=50)["columns"]["g"]
    assert column["groups"]["one"]["auc"] is None and column["groups"]["one"]["accuracy"]["value"] is not None
    assert column["worst_group"] is None and column["gap"] is None


def test_rough_mark_counts_the_smallest_class_present_against_small_class():
    """The one rule for a rough interval (a subgroup's rows and bench run's headline rows): the fewest records of
    a class present, against ``SMALL_CLASS``; a class index absent from the records is no class of 0 records."""
    from medvl.eval.subgroups import SMALL_CLASS, rough_mark

    below = [0] * (SMALL_CLASS - 1) + [2] * 30  # class 1 absent
    assert rough_mark(below) == {"smallest_class": SMALL_CLASS - 1, "rough": True}
    assert rough_mark(np.array([0] * SMALL_CLASS + [1] * 30)) == {"smallest_class": SMALL_CLASS, "rough": False}


def test_a_group_with_a_class_of_few_records_is_kept_marked_rough_and_left_out_of_the_gap():
    """A group of 12 records with one positive was scored as any other: its "95 %" AUC interval covers about 56 %
    of the time, yet it could be the worst group of a gap whose interval excluded 0. It is kept, marked ``rough``,
    and the worst and best groups are chosen among the others."""
    from medvl.eval.subgroups import SMALL_CLASS

    rng = np.random.default_rng(3)
    y = np.array([1] + [0] * 11 + [0, 1] * 20 + [0, 1] * 20)
    positive = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 1.5 * (2 * y - 1))))
    positive[0] = 0.01  # the rough group's one positive scored lowest: its AUC is 0, the lowest of all
    group = ["few"] * 12 + ["A"] * 40 + ["B"] * 40
    column = subgroup_metrics(y, positive, {"site": group}, resamples=100)["columns"]["site"]
    few = column["groups"]["few"]
    assert few["smallest_class"] == 1 < SMALL_CLASS and few["rough"] is True and few["auc"]["value"] == 0.0
    assert column["groups"]["A"]["rough"] is False and column["rough_groups"] == 1
    assert {column["worst_group"], column["best_group"]} == {"A", "B"}  # not "few", though its AUC is lowest
    only_rough = subgroup_metrics(y[:52], positive[:52], {"site": group[:52]}, resamples=50)["columns"]["site"]
    assert only_rough["worst_group"] is None and only_rough["gap"] is None  # one group left: no gap


def test_subgroup_balanced_accuracy_takes_the_headline_rows_plain_draws():
    """Subgroup balanced accuracy took class-stratified draws, hiding the class-mix variation, while bench run's
    headline row takes plain ones: one group holding every record got a narrower interval than the headline row
    for the same figure. Its worst-group gap (and a one-class group's, which used to be refused) draws plainly too."""
    from medvl.eval.subgroups import DRAWS, balanced_accuracy

    rng = np.random.default_rng(1)
    y = np.array([0] * 30 + [1] * 6 + [2] * 4)
    p = rng.dirichlet([1, 1, 1], 40)
    p[np.arange(40), y] += 0.3 * rng.random(40)
    p /= p.sum(1, keepdims=True)
    whole = subgroup_metrics(y, p, {"site": ["A"] * 40}, resamples=300, seed=0)["columns"]["site"]["groups"]["A"]
    headline = bootstrap_ci(balanced_accuracy, y, p, resamples=300, seed=0, **DRAWS["balanced_accuracy"])
    assert whole["balanced_accuracy"] == headline and headline["resamples"] < 300  # draws lacking a class left out
    assert DRAWS["balanced_accuracy"]["stratified"] is False and DRAWS["auc"]["stratified"] is True
    # the gap: A and B hold classes 0, 1 and 2, 5 records or more each (a rough group, or one lacking a class, is
    # left out of it)
    y = np.array(([0] * 10 + [1] * 5 + [2] * 5) * 2)
    p = rng.dirichlet([1, 1, 1], 40)
    p[np.arange(40), y] += 0.3 * rng.random(40)
    group = ["A"] * 20 + ["B"] * 20
    column = subgroup_metrics(y, p, {"g": group}, resamples=1000, seed=2, headline="balanced_accuracy")["columns"]["g"]
    members = {"A": np.arange(20), "B": np.arange(20, 40)}
    first, second = members[column["best_group"]], members[column["worst_group"]]
    draws, gaps = np.random.default_rng(2), []
    for _ in range(1000):
        draw_a, draw_b = first[draws.integers(0, 20, 20)], second[draws.integers(0, 20, 20)]
        if len(set(y[draw_a])) == len(set(y[first])) and len(set(y[draw_b])) == len(set(y[second])):
            gaps.append(balanced_accuracy(y[draw_a], p[draw_a]) - balanced_accuracy(y[draw_b], p[draw_b]))
    assert column["gap"]["resamples"] == len(gaps) < 1000
    assert [column["gap"]["low"], column["gap"]["high"]] == pytest.approx(np.percentile(gaps, [2.5, 97.5]))


def test_a_group_lacking_a_class_is_not_compared_on_a_class_averaged_headline():
    """With headline balanced_accuracy a one-class group (all negatives) was ranked by its recall of that one class
    against the other groups' mean recall over both: it could be the best group of a "significant" gap the model
    does not have. A group lacking a class is scored and kept (``missing_classes``) but left out of the worst-group
    choice for a class-averaged headline (AUC, balanced accuracy; a multi-class AUC over fewer classes too); with
    accuracy it is compared."""
    rng = np.random.default_rng(4)
    y = np.array([0] * 30 + [0, 1] * 20 + [0, 1] * 20)
    positive = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 1.0 * (2 * y - 1))))
    positive[:30] = 0.05  # every negative of the one-class group called right: its recall, and so its "balanced
    group = ["negatives"] * 30 + ["A"] * 40 + ["B"] * 40  # accuracy", is 1.0, above any two-class group's
    column = subgroup_metrics(y, positive, {"site": group}, resamples=100, headline="balanced_accuracy")
    column = column["columns"]["site"]
    negatives = column["groups"]["negatives"]
    assert negatives["balanced_accuracy"]["value"] == 1.0 and negatives["missing_classes"] == 1
    assert column["groups"]["A"]["missing_classes"] == 0 and column["incomplete_groups"] == 1
    assert {column["worst_group"], column["best_group"]} == {"A", "B"}
    by_accuracy = subgroup_metrics(y, positive, {"site": group}, resamples=50, headline="accuracy")
    assert by_accuracy["columns"]["site"]["best_group"] == "negatives"  # accuracy needs no class to average over
    assert by_accuracy["columns"]["site"]["incomplete_groups"] == 0
    # three classes, one group lacking class 2: its macro AUC is over two classes, not compared
    y3 = np.array([0, 1] * 15 + [0, 1, 2] * 10 + [0, 1, 2] * 10)
    p3 = rng.dirichlet([1, 1, 1], len(y3))
    p3[np.arange(len(y3)), y3] += np.where(np.arange(len(y3)) < 30, 2.0, 0.3)  # the two-class group looks best
    p3 /= p3.sum(1, keepdims=True)
    column = subgroup_metrics(y3, p3, {"g": ["two"] * 30 + ["C"] * 30 + ["D"] * 30}, resamples=50)["columns"]["g"]
    assert column["groups"]["two"]["auc"]["value"] == 1.0 and column["groups"]["two"]["missing_classes"] == 1
    assert {column["worst_group"], column["best_group"]} == {"C", "D"}
    from medvl.bench.runner import _unscored_groups  # bench run's skipped list says so

    assert "1 scored group lacking one of the scored records' classes: an AUC over fewer classes, left out of the " \
           "worst-group gap" in (_unscored_groups(column, len(y3), 10, []) or "")
    # a group both rough and lacking a class is counted once, as rough (a column of 2 groups read as 3)
    both = {"groups": {"A": {"missing_classes": 1, "auc": {"value": 0.7}, "rough": True},
                       "B": {"missing_classes": 0, "auc": {"value": 0.8}, "rough": False}},
            "missing": 0, "too_small": {}, "rough_groups": 1, "gap": None}
    words = _unscored_groups(both, 40, 10, []) or ""
    assert "1 scored group with a class of fewer than" in words and "lacking one of" not in words, words


def test_subgroup_inputs_are_checked():
    y, p = np.array([0, 1] * 10), np.full(20, 0.5)
    with pytest.raises(InputError, match="'sex' has 3 values for 20 records"):
        subgroup_metrics(y, p, {"sex": ["F", "M", "F"]})
    with pytest.raises(InputError, match="probabilities"):
        subgroup_metrics(y, np.ones((20, 3, 1)), {"sex": ["F"] * 20})
    with pytest.raises(InputError, match="headline"):
        subgroup_metrics(y, p, {"sex": ["F"] * 20}, headline="f1")
    with pytest.raises(InputError, match="class indices"):
        subgroup_metrics(y.astype(float), p, {"sex": ["F"] * 20})


# ---------------------------------------------------------------- sanity baselines


def test_verdict_on_given_metrics():
    baselines = {"blank_image": {"auc": 0.5, "balanced_accuracy": 0.5},
                 "shuffled_pairing": {"auc": 0.49, "balanced_accuracy": 0.5},
                 "label_prior": {"auc": 0.5, "balanced_accuracy": 0.5, "accuracy": 0.9}}
    assert compare_to_baselines({"auc": 0.81, "balanced_accuracy": 0.7}, baselines) == (True, [])
    beats, flags = compare_to_baselines({"auc": 0.81, "balanced_accuracy": 0.51}, baselines)
    assert not beats and len(flags) == 3
    assert flags[0] == "balanced accuracy 0.510 does not beat the blank-image baseline 0.500 by 0.05"
    beats, flags = compare_to_baselines({"auc": 0.81, "accuracy": 0.88}, baselines, metrics=["auc", "accuracy"])
    assert flags == ["accuracy 0.880 does not beat the label-prior baseline 0.900 by 0.05"]
    assert compare_to_baselines({"auc": 0.55}, baselines, metrics=["auc"], margin=0.05) == (True, [])
    beats, flags = compare_to_baselines({"auc": None}, baselines, metrics=["auc"])
    assert not beats and "undefined" in flags[0]


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return medvl.create_model("phantom-tiny")


@pytest.fixture(scope="module")
def phantom(phantom_dir):
    return medvl.load_dataset(phantom_dir)


def test_blank_embedding_is_that_of_a_mid_grey_image_of_any_shape(random_model):
    blank = blank_image_embedding(random_model)
    for shape in ((64, 64), (100, 80), (50, 70, 3)):
        grey = random_model.encode_images([np.full(shape, 128, np.uint8)])
        assert torch.allclose(grey, blank, atol=1e-5)


def test_a_random_model_is_flagged_and_its_baselines_are_at_chance(random_model, phantom):
    result = sanity_baselines(random_model, phantom, "finding", shuffles=50, show_progress=False)
    plain = zero_shot(random_model, phantom, "finding", captions_for(phantom, model=random_model),
                      show_progress=False)
    k = len(plain["classes"])
    assert result["model"] == pytest.approx({"auc": plain["macro_auc"], "accuracy": plain["accuracy"],
                                             "balanced_accuracy": plain["balanced_accuracy"]})
    blank, prior, shuffled = (result["baselines"][name] for name in ("blank_image", "label_prior", "shuffled_pairing"))
    assert blank["auc"] == 0.5 and blank["balanced_accuracy"] == pytest.approx(1 / k)  # one answer for all
    assert prior["auc"] == 0.5 and prior["accuracy"] == pytest.approx(plain["chance_accuracy"])
    assert 0.44 < shuffled["auc"] < 0.56 and shuffled["shuffles"] == 50
    assert result["beats_baselines"] is (not result["flags"])
    assert not result["beats_baselines"]  # random weights do not see the findings


def test_a_model_that_cannot_look_is_flagged_and_one_that_does_passes(random_model, phantom):
    same_image = read_image(phantom[0].image)
    blind = phantom.subset([dataclasses.replace(r, images=[same_image]) for r in phantom])
    result = sanity_baselines(random_model, blind, "sex", show_progress=False)
    assert result["model"]["auc"] == 0.5 and not result["beats_baselines"]
    assert any("blank-image baseline" in flag for flag in result["flags"])
    # image embeddings pointing at each record's own class prompts: a perfect zero-shot classifier
    captions = captions_for(phantom, model=random_model)
    classes = phantom.classes("sex")
    prompts = class_embeddings(random_model, [captions.prompts("sex", c) for c in classes])
    perfect = prompts[[classes.index(r.labels["sex"]) for r in phantom]]
    result = sanity_baselines(random_model, phantom, "sex", image_embeddings=perfect, show_progress=False)
    assert result["model"]["auc"] == 1.0 and result["beats_baselines"] and result["flags"] == []
    assert result["baselines"]["shuffled_pairing"]["p_value"]["auc"] == pytest.approx(1 / 101)


def test_sanity_of_given_scores_leaves_out_the_blank_image(random_model, phantom):
    classes = phantom.classes("view")
    y = np.array([classes.index(r.labels["view"]) for r in phantom])
    noisy = np.eye(len(classes))[y] * 0.6 + np.random.default_rng(0).random((len(y), len(classes))) * 0.5
    result = sanity_baselines(random_model, phantom, "view", probabilities=noisy, show_progress=False)
    assert set(result["baselines"]) == {"shuffled_pairing", "label_prior"} and "blank_image" in result["skipped"]
    hand = _hand_metrics(y, noisy)
    assert [result["model"][k] for k in ("auc", "balanced_accuracy", "accuracy")] == pytest.approx(hand)
    assert result["beats_baselines"] and hand[0] > 0.8
    with pytest.raises(InputError, match=r"probabilities must be \(96 records"):
        sanity_baselines(random_model, phantom, "view", probabilities=noisy[:10])


def test_retrieval_sanity(random_model, phantom):
    texts = random_model.encode_texts([r.text for r in phantom])  # images embedded as their own report
    good = retrieval_sanity(random_model, phantom, image_embeddings=texts, show_progress=False)
    # a random text tower maps reports close together, so a few near-identical reports outrank their own
    assert good["model"]["i2t_R@1"] > 0.9 and good["beats_baselines"]
    assert good["shuffled_pairing"]["i2t_R@1"] < 0.5
    chance = retrieval_sanity(random_model, phantom, show_progress=False)
    assert not chance["beats_baselines"] and chance["flags"]


def test_sanity_inputs_are_checked(random_model, phantom):
    with pytest.raises(InputError, match="margin"):
        sanity_baselines(random_model, phantom, "sex", margin=-0.1)
    with pytest.raises(InputError, match="compare"):
        sanity_baselines(random_model, phantom, "sex", compare=["f1"])
    with pytest.raises(InputError, match="unknown label column 'ward'"):
        sanity_baselines(random_model, phantom, "ward", show_progress=False)


# ---------------------------------------------------------------- corruptions


@pytest.fixture(scope="module")
def images(phantom):
    gray = read_image(phantom[0].image)
    assert gray.dtype == np.uint8 and gray.ndim == 2
    return {"gray": gray, "rgb": np.stack([gray, gray[::-1], gray[:, ::-1]], -1),
            "float": gray.astype(np.float32) * 3.7 - 100.0, "uint16": gray.astype(np.uint16) * 200 + 50}


def _distance(a, b, image):
    span = 255.0 if image.dtype == np.uint8 else float(image.max()) - float(image.min())
    return float(np.abs(a.astype(float) - b.astype(float)).mean()) / span


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("name", ["gray", "rgb", "float", "uint16"])
def test_corruption_grows_with_severity_and_keeps_shape_dtype_and_range(images, kind, name):
    image = images[name]
    low, high = (0, 255) if image.dtype == np.uint8 else (image.min(), image.max())
    distances = []
    for severity in range(1, 6):
        out = corrupt(image, kind, severity, seed=3)
        assert out.shape == image.shape and out.dtype == image.dtype
        assert low <= out.min() and out.max() <= high
        assert np.array_equal(out, corrupt(image, kind, severity, seed=3))  # deterministic per seed
        distances.append(_distance(out, image, image))
    assert distances[0] > 0 and distances[-1] > distances[0]
    assert all(later >= earlier for earlier, later in zip(distances, distances[1:], strict=False)), distances


def test_noise_depends_on_the_seed_and_constant_images_pass_unchanged(images):
    assert not np.array_equal(corrupt(images["gray"], "noise", 3, seed=0), corrupt(images["gray"], "noise", 3, seed=1))
    flat = np.full((16, 16), 7.5, np.float32)
    assert np.array_equal(corrupt(flat, "noise", 5), flat)


def test_corruption_inputs_are_checked(images):
    for kind, severity in (("snow", 1), ("noise", 0), ("noise", 6), ("blur", 2.5), ("blur", True)):
        with pytest.raises(InputError, match="corruption"):
            corrupt(images["gray"], kind, severity)
    for bad in (np.zeros((8, 8, 2)), np.zeros(8), np.full((8, 8), np.nan)):
        with pytest.raises(InputError, match="image"):
            corrupt(bad, "blur", 1)


def test_corruption_curves(random_model, phantom, monkeypatch):
    subset = phantom.subset(phantom.records[:40])
    reads = []

    def counting_read(model, source):
        reads.append(source)
        return read_for(model, source)

    monkeypatch.setattr(robustness, "read_for", counting_read)
    result = corruption_curves(random_model, subset, "sex", kinds=("noise", "contrast"), severities=(1, 5),
                               show_progress=False)
    assert len(reads) == len(subset)  # each image read once, corrupted in memory
    plain = zero_shot(random_model, subset, "sex", captions_for(subset, model=random_model), show_progress=False)
    assert result["clean"] == pytest.approx({"auc": plain["macro_auc"], "accuracy": plain["accuracy"],
                                             "balanced_accuracy": plain["balanced_accuracy"]})
    assert result["parameters"]["noise"] == {"name": "std", "values": [0.04, 0.26]}
    for kind in ("noise", "contrast"):
        points = result["curves"][kind]
        assert [p["severity"] for p in points] == [1, 5]
        assert set(points[0]) == {"severity", "auc", "balanced_accuracy", "accuracy"}
        expected = np.mean([(result["clean"]["auc"] - p["auc"]) / result["clean"]["auc"] for p in points])
        assert result["summary"]["relative_degradation"][kind] == pytest.approx(expected)
    assert result["curves"]["contrast"][1] != result["curves"]["contrast"][0]
    summary = result["summary"]
    assert summary["worst_kind"] == max(summary["relative_degradation"], key=summary["relative_degradation"].get)
    with pytest.raises(InputError, match="unknown corruption 'snow'"):
        corruption_curves(random_model, subset, "sex", kinds=("snow",))
    with pytest.raises(InputError, match="severity"):
        corruption_curves(random_model, subset, "sex", severities=(0,))
    for kinds, severities, message in ((("noise", "blur", "noise"), (1,), "corruption kind 'noise' is given twice"),
                                       (("noise",), (1, 3, 1), "corruption severity 1 is given twice")):
        with pytest.raises(InputError, match=message):  # was scored again: the same rows twice over
            corruption_curves(random_model, subset, "sex", kinds=kinds, severities=severities)


def test_corruption_severities_do_the_same_damage_at_every_native_size(random_model, phantom):
    """Each film is corrupted at the model's input size: the same films at 4x their size (every pixel a 4x4
    block, which the model's area resize averages back exactly) give the same curves. Corrupted at their native
    size, per-pixel noise and JPEG blocks were averaged away by the resize: the large films looked robust."""
    side = random_model.config.image.image_size
    films = [r for r in phantom.records[:24] if read_for(random_model, r.image).shape[:2] == (side, side)]
    small = phantom.subset([dataclasses.replace(r, images=[read_for(random_model, r.image)]) for r in films])
    large = phantom.subset([dataclasses.replace(r, images=[np.kron(read_for(random_model, r.image),
                                                                   np.ones((4, 4), np.uint8))]) for r in films])
    assert len(small) >= 10 and large.records[0].image.shape == (4 * side, 4 * side)
    assert np.array_equal(robustness.model_sized(random_model, large.records[0].image), small.records[0].image)
    kinds, severities = ("noise", "jpeg", "blur"), (1, 5)
    curves = [corruption_curves(random_model, data, "sex", kinds=kinds, severities=severities, show_progress=False)
              for data in (small, large)]
    assert curves[0]["clean"] == curves[1]["clean"]
    assert curves[0]["curves"] == curves[1]["curves"]
    assert curves[0]["curves"]["noise"][1] != curves[0]["curves"]["noise"][0]


def test_the_corruption_check_corrupts_what_the_model_reads(random_model, tmp_path):
    """``model_sized`` gives pixels the preprocessor reads as it reads the file, up to 8-bit rounding: a 16-bit
    film was area-averaged before its own min-max stretch, so a small bright marker no longer set its contrast."""
    from test_adapters import _films

    side, step = random_model.config.image.image_size, 0.5 / 255 + 1e-6
    for path in _films(tmp_path):
        sized = robustness.model_sized(random_model, path)
        clean = random_model.preprocessor.load(path)
        assert float((random_model.preprocessor.load(sized) - clean).abs().max()) <= step
        assert sized.dtype == np.uint8 and sized.shape == (side, side)
        assert float((random_model.preprocessor.load(corrupt(sized, "noise", 5)) - clean).abs().max()) > 0.2


def test_in_memory_datasets_work_end_to_end(random_model):
    rng = np.random.default_rng(0)
    records = [Record(id=f"m{i}", images=[rng.integers(0, 255, (32, 32), dtype=np.uint8)],
                      labels={"label": "yes" if i % 2 else "no"}, meta={"age": str(20 + 3 * i)}) for i in range(24)]
    dataset = Dataset(records, "<memory>", ["label"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn warnings from single-class bootstrap draws
        curves = corruption_curves(random_model, dataset, "label", kinds=("rotation",), severities=(2,),
                                   show_progress=False)
        scored = zero_shot(random_model, dataset, "label", keep_scores=True, show_progress=False)
        groups = groups_from_records(dataset, ["age"])
        result = subgroup_metrics(np.array(scored["y_true"]), np.array(scored["probabilities"]), groups,
                                  min_size=5, resamples=50)
    assert curves["n"] == 24
    assert list(result["columns"]["age"]["groups"]) == ["<40", "40-59", "60-79"]  # age order, not alphabetical
    assert result["columns"]["age"]["too_small"] == {"80+": 4}
