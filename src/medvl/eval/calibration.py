"""Calibration and selective prediction on class probabilities (plain numpy).

``probs`` is (N, K) with rows summing to 1, ``logits`` is (N, K), ``targets`` holds class indices
(N,). Confidence means the top-label probability; a prediction is correct when its argmax equals
the target. Each function is checked against a loop reference in the tests.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.01, 100.0)  # fit_temperature's search range
# what ``brier_score`` is, where a figure of it is shown (the CLI tables, bench rows): with two classes it is twice the
# binary Brier score (scikit-learn's ``brier_score_loss``) most papers give, so it is never labelled just "Brier"
BRIER_FORM = "sum over classes"


def _check_targets(targets: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.shape != (n,):
        raise InputError(f"targets must have shape ({n},), got {targets.shape}")
    if not np.issubdtype(targets.dtype, np.integer):
        raise InputError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if n and (targets.min() < 0 or targets.max() >= num_classes):
        raise InputError(f"targets must lie in [0, {num_classes - 1}], got [{targets.min()}, {targets.max()}]")
    return targets


def _check_scores(scores: np.ndarray, targets: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] < 2:
        raise InputError(f"{kind} must be (N>0, K>=2), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise InputError(f"{kind} contain NaN or infinite values")
    return scores, _check_targets(targets, scores.shape[0], scores.shape[1])


def check_probabilities(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated float probabilities and integer targets; rows must be in [0, 1] and sum to 1."""
    probs, targets = _check_scores(probs, targets, "probabilities")
    if probs.min() < 0 or probs.max() > 1:
        raise InputError(f"probabilities must lie in [0, 1], got [{probs.min():.4g}, {probs.max():.4g}]")
    worst = np.abs(probs.sum(1) - 1).max()
    if worst > 1e-4:
        raise InputError(f"probability rows must sum to 1, worst row is off by {worst:.3g}")
    return probs, targets


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL of softmax(logits / temperature) at the targets."""
    logits, targets = _check_scores(logits, targets, "logits")
    scaled = logits / temperature
    top = scaled.max(1, keepdims=True)
    log_norm = np.log(np.exp(scaled - top).sum(1)) + top[:, 0]
    return float(np.mean(log_norm - scaled[np.arange(len(targets)), targets]))


def reliability_bins(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> list[dict]:
    """Top-label reliability diagram over ``bins`` equal-width confidence bins of (0, 1].

    Each bin: ``lower``, ``upper``, ``count``, mean ``confidence`` and ``accuracy`` (None when empty).
    A confidence c falls in the bin with lower < c <= upper.
    """
    probs, targets = check_probabilities(probs, targets)
    if bins < 1:
        raise InputError(f"bins must be >= 1, got {bins}")
    confidence = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    confidence_sums = np.bincount(index, weights=confidence, minlength=bins)
    correct_sums = np.bincount(index, weights=correct.astype(float), minlength=bins)
    return [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(counts[b]),
             "confidence": float(confidence_sums[b] / counts[b]) if counts[b] else None,
             "accuracy": float(correct_sums[b] / counts[b]) if counts[b] else None}
            for b in range(bins)]


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: count-weighted mean |accuracy - confidence| over equal-width bins."""
    table = reliability_bins(probs, targets, bins)
    total = sum(b["count"] for b in table)
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]) / total)


def brier_score(probs: np.ndarray, targets: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of the squared error summed over the K classes (0..2; a uniform
    guess scores 1 - 1/K). With two classes this is twice the binary Brier score of the positive class's
    probability (scikit-learn's ``brier_score_loss``, 0..1): 0.5 for a 50/50 guess, not 0.25."""
    probs, targets = check_probabilities(probs, targets)
    one_hot = np.eye(probs.shape[1])[targets]
    return float(((probs - one_hot) ** 2).sum(1).mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The scalar T > 0 in ``bounds`` minimising the NLL of softmax(logits / T).

    A grid over log T followed by two finer grids around the best point; the NLL is smooth and
    unimodal in log T, so this reaches ~1e-4 relative precision without an optimiser dependency.
    """
    logits, targets = _check_scores(logits, targets, "logits")
    low, high = np.log(bounds[0]), np.log(bounds[1])
    best = 0.0
    for _ in range(3):
        grid = np.linspace(low, high, 201)
        losses = [negative_log_likelihood(logits, targets, float(np.exp(g))) for g in grid]
        at = int(np.argmin(losses))
        best = float(grid[at])
        low, high = grid[max(at - 1, 0)], grid[min(at + 1, len(grid) - 1)]
    return float(np.exp(best))


def temperature_at_bound(temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> str | None:
    """``"upper"`` or ``"lower"`` when a fitted temperature is the end of ``fit_temperature``'s search range (the
    NLL still fell there: the optimum lies beyond it), else None. At the upper end every probability is near
    uniform, which lowers ECE by flattening, not by calibrating (a few fitted records all misclassified do it)."""
    for name, bound in (("lower", bounds[0]), ("upper", bounds[1])):
        if abs(np.log(temperature) - np.log(bound)) < 1e-6:
            return name
    return None


def risk_coverage(probs: np.ndarray, targets: np.ndarray) -> dict:
    """Selective prediction as the confidence threshold sweeps over the observed confidences.

    For each distinct confidence t (descending), keeping predictions with confidence >= t gives a
    ``coverage`` (fraction kept) and a selective ``risk`` (error rate among those kept).
    ``aurc`` is the area under that curve as Geifman & El-Yaniv define it: the mean selective risk over the N
    coverage levels 1/N .. N/N, records of tied confidence counted at their tie's level (an always-wrong
    classifier scores 1, whatever its confidences).
    """
    probs, targets = check_probabilities(probs, targets)
    confidence = probs.max(1)
    wrong = (probs.argmax(1) != targets).astype(float)
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    cumulative_errors = np.cumsum(wrong[order])
    last_of_tie = np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True]
    kept = np.arange(1, len(order) + 1)[last_of_tie]
    coverage = kept / len(order)
    risk = cumulative_errors[last_of_tie] / kept
    sizes = np.diff(np.r_[0, kept])  # records per tie level
    aurc = float(np.sum(sizes * risk) / len(order))
    return {"threshold": sorted_confidence[last_of_tie].tolist(), "coverage": coverage.tolist(),
            "risk": risk.tolist(), "aurc": aurc}


def abstention_threshold(probs: np.ndarray, targets: np.ndarray, target_risk: float) -> dict | None:
    """The lowest confidence threshold whose selective risk on these data is <= ``target_risk``.

    Returns ``threshold`` (predict when confidence >= threshold, abstain otherwise), the
    ``coverage`` it keeps and its ``risk``; None when no threshold reaches the target.
    """
    if not 0 <= target_risk <= 1:
        raise InputError(f"target_risk must lie in [0, 1], got {target_risk}")
    curve = risk_coverage(probs, targets)
    for threshold, coverage, risk in zip(reversed(curve["threshold"]), reversed(curve["coverage"]),
                                         reversed(curve["risk"]), strict=True):
        if risk <= target_risk:
            return {"threshold": threshold, "coverage": coverage, "risk": risk}
    return None


def held_out_abstention(fit_probs: np.ndarray, fit_targets: np.ndarray, probs: np.ndarray, targets: np.ndarray,
                        target_risk: float) -> dict:
    """The abstention threshold chosen on (``fit_probs``, ``fit_targets``), a split other than the scored one,
    graded on (``probs``, ``targets``): ``threshold`` (``abstention_threshold`` on the fit data), the ``coverage``
    and selective ``risk`` it gives on the scored data (``risk`` None when it keeps none), and ``fit_coverage`` /
    ``fit_risk`` on the data it was chosen on (``chosen_on``: ``"calibration"``). When no threshold reaches
    ``target_risk`` on the fit data, ``threshold`` and the figures are None and ``reason`` says why (else None)."""
    probs, targets = check_probabilities(probs, targets)
    chosen = abstention_threshold(fit_probs, fit_targets, target_risk)
    block: dict = {"chosen_on": "calibration", "n_chosen_on": int(len(fit_targets)), "target_risk": target_risk}
    if chosen is None:
        return block | {"threshold": None, "coverage": None, "risk": None, "fit_coverage": None, "fit_risk": None,
                        "reason": f"no confidence threshold keeps the selective risk <= {target_risk:g} on the "
                                  f"{len(fit_targets)} calibration records"}
    kept = probs.max(1) >= chosen["threshold"]
    wrong = probs.argmax(1) != targets
    return block | {"threshold": chosen["threshold"], "coverage": float(kept.mean()),
                    "risk": float(wrong[kept].mean()) if kept.any() else None,
                    "fit_coverage": chosen["coverage"], "fit_risk": chosen["risk"], "reason": None}


def calibration_report(fit_logits: np.ndarray, fit_targets: np.ndarray, logits: np.ndarray, targets: np.ndarray,
                       bins: int = 15, target_risk: float = 0.1, curve_points: int = 5) -> dict:
    """Fit a temperature on (``fit_logits``, ``fit_targets``) and report calibration of (``logits``,
    ``targets``) before and after dividing by it: ECE, Brier (``brier_score``: summed over the classes, twice the
    binary figure for two classes), NLL, reliability bins, a few points of
    the risk-coverage curve (after scaling) with its area, and the abstention threshold at ``target_risk``: chosen on
    the fit records' scaled probabilities and graded on the scored ones (``held_out_abstention``), never tuned on the
    scored labels.
    ``temperature_at_bound`` is ``"upper"`` / ``"lower"`` when the fitted temperature is the end of its search
    range (``temperature_at_bound``; warned about: the figures after scaling then mean little), else None.
    Temperature scaling leaves the argmax, hence accuracy, unchanged; with two classes it leaves the order of the
    records by confidence unchanged too, with three or more it may reorder them (the top probability of two records
    can swap as the temperature changes), so the risk-coverage curve and its area depend on the temperature fitted:
    ``risk_coverage["aurc"]`` is the area after scaling (the probabilities the abstention threshold applies to),
    ``risk_coverage["aurc_before"]`` that of the unscaled scores, the model's own ranking."""
    temperature = fit_temperature(fit_logits, fit_targets)
    at_bound = temperature_at_bound(temperature)
    if at_bound is not None:
        log.warning("the temperature fitted on %d records is %g, the %s end of its search range %g..%g: the optimum "
                    "lies beyond it and the 'after' figures come from %s probabilities, not from calibration; fit it "
                    "on a larger calibration split", len(fit_targets), temperature, at_bound, *TEMPERATURE_BOUNDS,
                    "flattened (near uniform)" if at_bound == "upper" else "sharpened (near 0 / 1)")
    logits, targets = _check_scores(logits, targets, "logits")
    before, after = softmax(logits), softmax(logits / temperature)
    curve = risk_coverage(after, targets)
    picks = np.unique(np.linspace(0, len(curve["coverage"]) - 1, curve_points).round().astype(int))
    return {
        "temperature": temperature, "temperature_at_bound": at_bound, "n_fit": int(len(fit_targets)),
        "n": int(len(targets)),
        "ece_before": expected_calibration_error(before, targets, bins),
        "ece_after": expected_calibration_error(after, targets, bins),
        "brier_before": brier_score(before, targets), "brier_after": brier_score(after, targets),
        "nll_before": negative_log_likelihood(logits, targets),
        "nll_after": negative_log_likelihood(logits, targets, temperature),
        "reliability": {"before": reliability_bins(before, targets, bins),
                        "after": reliability_bins(after, targets, bins)},
        "risk_coverage": {key: [curve[key][i] for i in picks] for key in ("threshold", "coverage", "risk")}
        | {"aurc": curve["aurc"], "aurc_before": risk_coverage(before, targets)["aurc"]},
        f"abstention_threshold_at_risk_{target_risk:g}": held_out_abstention(
            softmax(np.asarray(fit_logits, dtype=float) / temperature), fit_targets, after, targets, target_risk),
    }
