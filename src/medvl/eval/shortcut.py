"""Shortcut detection: does a model answer from the finding, or from a marker in a corner?

Two checks, each a counterfactual that a model reading the anatomy passes and a shortcut model fails:

* **Masked accuracy drop** (``masked_accuracy_drop``): the same images answered again with one
  region filled by its local background (the median of a band around it, as wide as half the
  region's side). The region is a known marker box (a shortcut phantom's ``generator.shortcut.box``,
  ``medvl.data.phantom.generate.shortcut_spec``), one image corner, or by default each of the four
  corners in turn (a data set without a known marker). A corner holds no anatomy, so hiding it
  changes nothing for a model that reads the chest.
* **Counterfactual pair accuracy** (``medvl.eval.counterfactual``): on pairs that differ only in
  the finding (phantom twins), a model that reads the finding gets both images right about as
  often as its accuracy on the data set promises; a model answering from a marker (absent from the
  twins, or identical in both) cannot.

``shortcut_check`` runs both and flags the model when either fails (thresholds below).

Thresholds, and why
-------------------
* Masked drop: flagged when hiding one region lowers the balanced accuracy by at least
  ``MAX_MASKED_DROP`` = 0.05 **and** the change is beyond chance: the McNemar statistic
  ``z = (right->wrong - wrong->right) / sqrt(right->wrong + wrong->right)`` of the per-image answers
  is at least the one-sided normal quantile for ``MASKED_ALPHA`` = 0.025, Bonferroni-corrected over
  the regions tried (1.96 for one region, 2.50 for four). A region of about 2 % of the image
  (0.15 x 0.15 of it) with no anatomy in it should change no answer of a model that reads the
  chest, so any real drop is suspect; 5 points of balanced accuracy is the smallest drop we report as
  a shortcut (a few answers flipping on a small test set are noise, which the z test guards
  against; a large test set could show a significant but tiny drop, which the 5 points ignore).
* Pair accuracy: if the model answers each image of a pair correctly as often as it does on the
  data set (its recall of each image's class), then P(both right) >= recall_a + recall_b - 1
  (Bonferroni), whatever the correlation of its errors. ``pair_accuracy_bound`` is that bound
  averaged over the pairs. Flagged when the pair accuracy falls below the bound by more than
  ``max(PAIR_TOLERANCE, 2 standard errors)``: ``PAIR_TOLERANCE`` = 0.10 allows for the rendered twins
  being a slightly different population from the data set (cured patients, grown findings), the
  standard error ``sqrt(b (1 - b) / n_pairs)`` for the finite number of pairs. A bound <= 0 (a
  model near chance on the data set) promises nothing and the pair criterion is not applied.
  Nearest-neighbour pairs (real data, ``counterfactual.nearest_neighbour_pairs``) pair each image with the
  most similar image of another label (in pixel space, ``counterfactual.pixel_vectors``, as ``bench run`` and
  the counterfactual check choose them; or in an embedding given), harder than a random pair by construction,
  so no bound holds for them: their accuracy is reported, never used to flag (``bench run`` gives this check
  no pairs on real data).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm

from ..data.captions import CaptionConfig
from ..data.images import read_image_2d
from ..data.record import Dataset, ImageSource
from ..errors import InputError
from ..models.dual import DualEncoder
from ..models.preprocess import read_for
from .counterfactual import (
    NEAREST_NEIGHBOUR,
    CounterfactualPair,
    class_indices,
    pair_accuracy,
    predict_probabilities,
    use_head,
)
from .metrics import classification_metrics

log = logging.getLogger(__name__)

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")  # image corners as displayed
CORNER_FRACTION = 0.15  # side of a corner region, as a fraction of the image's shorter side
MAX_MASKED_DROP = 0.05  # balanced-accuracy drop from hiding one region that flags a model
MASKED_ALPHA = 0.025  # one-sided significance of the McNemar test, shared by the regions tried
PAIR_TOLERANCE = 0.10  # allowed shortfall of pair accuracy below its bound (at least 2 standard errors)

Region = str | Sequence[int]  # a corner name or a box [x0, y0, x1, y1] (end-exclusive pixels)


def corner_box(shape: tuple[int, ...], corner: str, fraction: float = CORNER_FRACTION) -> list[int]:
    """Box ``[x0, y0, x1, y1]`` of a square ``fraction`` of the shorter side in an image corner."""
    if corner not in CORNERS:
        raise InputError(f"corner must be one of {', '.join(CORNERS)}, got {corner!r}")
    height, width = shape[:2]
    side = max(1, round(fraction * min(height, width)))
    x0 = 0 if corner.endswith("left") else width - side
    y0 = 0 if corner.startswith("top") else height - side
    return [x0, y0, x0 + side, y0 + side]


def mask_region(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """A copy of a 2D image (HxW or HxWxC) with ``box`` filled by its local background: the median
    (per channel) of the band around it, half the box's longer side wide, inside the image."""
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = image.shape[:2]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InputError(f"region {list(box)} is not a box inside a {width} x {height} image "
                         f"(expected [x0, y0, x1, y1], 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
    band = max(2, max(x1 - x0, y1 - y0) // 2)
    outer = (slice(max(0, y0 - band), min(height, y1 + band)), slice(max(0, x0 - band), min(width, x1 + band)))
    around = np.ones(image.shape[:2], dtype=bool)
    around[y0:y1, x0:x1] = False
    pixels = image[outer][around[outer]]
    if pixels.size == 0:
        raise InputError(f"region {list(box)} covers the whole {width} x {height} image: no background to fill it")
    masked = image.copy()
    masked[y0:y1, x0:x1] = np.median(pixels, axis=0).astype(image.dtype)
    return masked


def _regions(region: Region | None) -> dict[str, Region]:
    """Name -> region: the four corners by default, else the one corner or box given."""
    if region is None:
        return {corner: corner for corner in CORNERS}
    if isinstance(region, str):
        corner_box((2, 2), region)  # checks the name
        return {region: region}
    box = list(region)
    if len(box) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in box):
        raise InputError(f"region must be a corner ({', '.join(CORNERS)}) or a box [x0, y0, x1, y1] of "
                         f"4 integers, got {region!r}")
    return {"box": [int(v) for v in box]}


def _masked(image: ImageSource, region: Region, fraction: float) -> np.ndarray:
    array = image if isinstance(image, np.ndarray) else read_image_2d(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise InputError(f"masking needs 2D images (HxW or HxWxC), got shape {array.shape}")
    box = corner_box(array.shape, region, fraction) if isinstance(region, str) else region
    return mask_region(array, box)


def masked_accuracy_drop(model: DualEncoder, dataset: Dataset, label: str, region: Region | None = None,
                         fraction: float = CORNER_FRACTION, captions: CaptionConfig | None = None,
                         classes: Sequence[str] | None = None, batch_size: int = 64,
                         method: str | None = None) -> dict[str, Any]:
    """Accuracy of the model's answers for ``label`` with and without each region hidden.

    ``region``: a box ``[x0, y0, x1, y1]`` (pixels, e.g. a shortcut phantom's marker box), a corner
    name, or None for each of the four corners (``fraction`` of the shorter side). Answers as in
    ``counterfactual.pair_accuracy`` (``method`` None: the model's head for ``label``, else zero-shot;
    "head" or "zero_shot" chooses).

    Returns ``label``, ``method``, ``classes``, ``n``, ``unmasked`` (``accuracy``,
    ``balanced_accuracy``, ``macro_auc``, ``recall`` per class), ``regions`` (name -> ``box`` or
    ``corner`` + ``fraction``, ``accuracy``, ``balanced_accuracy``, ``macro_auc``, ``drop`` of each
    of the three (unmasked minus masked), ``right_to_wrong``, ``wrong_to_right``, ``z`` (McNemar)),
    ``worst_region`` (largest balanced-accuracy drop) and its ``drop`` and ``z``.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise InputError(f"fraction must be in (0, 1), got {fraction}")
    regions = _regions(region)
    dataset = dataset.with_labels([label])
    if len(dataset) == 0:
        raise InputError(f"{dataset.source}: no records with label {label!r}")
    if not classes and not use_head(model, label, method):
        classes = dataset.classes(label)  # zero-shot among the data set's classes, as ``zero_shot``
    answers: dict[str, list[np.ndarray]] = {name: [] for name in ("", *regions)}
    class_names: list[str] = []
    answered = ""
    for start in range(0, len(dataset), batch_size):
        images = [r.image for r in dataset.records[start:start + batch_size]]
        arrays = [read_for(model, image) for image in images]  # as the model is fed them
        for name, chosen in (("", None), *regions.items()):
            batch = arrays if chosen is None else [_masked(a, chosen, fraction) for a in arrays]
            probabilities, class_names, answered = predict_probabilities(model, batch, label, captions, classes,
                                                                         batch_size, method)
            answers[name].append(probabilities)
    truth = class_indices([r.labels for r in dataset], label, class_names, dataset.source)
    unmasked = np.concatenate(answers[""])
    result: dict[str, Any] = {"label": label, "method": answered, "classes": class_names, "n": len(dataset),
                              "unmasked": _scores(truth, unmasked, class_names, recall=True), "regions": {}}
    for name, chosen in regions.items():
        masked = np.concatenate(answers[name])
        where = {"box": chosen} if name == "box" else {"corner": name, "fraction": float(fraction)}
        result["regions"][name] = {**where, **_scores(truth, masked, class_names),
                                   **_changes(truth, unmasked, masked, result["unmasked"], class_names)}
    worst = max(result["regions"], key=lambda name: result["regions"][name]["drop"]["balanced_accuracy"])
    result.update(worst_region=worst, drop=result["regions"][worst]["drop"]["balanced_accuracy"],
                  z=result["regions"][worst]["z"])
    return result


def _scores(truth: np.ndarray, probabilities: np.ndarray, classes: list[str], recall: bool = False) -> dict[str, Any]:
    metrics = classification_metrics(truth, probabilities, classes)
    scores = {key: metrics[key] for key in ("accuracy", "balanced_accuracy", "macro_auc")}
    if recall:
        scores["recall"] = {name: row["recall"] if row["support"] else None
                            for name, row in metrics["per_class"].items()}
    return scores


def _changes(truth: np.ndarray, unmasked: np.ndarray, masked: np.ndarray, before: dict[str, Any],
             classes: list[str]) -> dict[str, Any]:
    """Drops of the three scores and the McNemar count of answers that turned wrong or right."""
    after = _scores(truth, masked, classes)
    drop = {key: None if before[key] is None or after[key] is None else before[key] - after[key]
            for key in ("accuracy", "balanced_accuracy", "macro_auc")}
    right_before, right_after = unmasked.argmax(1) == truth, masked.argmax(1) == truth
    to_wrong, to_right = int((right_before & ~right_after).sum()), int((~right_before & right_after).sum())
    z = (to_wrong - to_right) / math.sqrt(to_wrong + to_right) if to_wrong + to_right else 0.0
    return {"drop": drop, "right_to_wrong": to_wrong, "wrong_to_right": to_right, "z": z}


def shortcut_check(model: DualEncoder, dataset: Dataset, label: str, region: Region | None = None,
                   pairs: Sequence[CounterfactualPair] | None = None, fraction: float = CORNER_FRACTION,
                   captions: CaptionConfig | None = None, classes: Sequence[str] | None = None,
                   batch_size: int = 64, method: str | None = None) -> dict[str, Any]:
    """Flag a model whose answers for ``label`` on ``dataset`` come from a shortcut (module docstring).

    ``method``: the answers checked, as in ``masked_accuracy_drop`` (None: the head for ``label`` if the
    model has one, else zero-shot; "head" or "zero_shot").

    ``region`` as in ``masked_accuracy_drop`` (a marker box if known, else the four corners).
    ``pairs``: counterfactual pairs labelled with ``label`` (phantom twins rendered at the data
    set's size; nearest-neighbour pairs are reported only).

    Returns ``label``, ``method``, ``flagged`` (bool), ``reasons`` (one sentence per failed check),
    ``accuracy`` and ``balanced_accuracy`` (unmasked), ``masked_accuracy`` and
    ``masked_balanced_accuracy`` (with the worst region hidden), ``masked_drop`` (balanced-accuracy
    drop of the worst region), ``masked_region`` (its name), ``masked_z`` (its McNemar z),
    ``pair_accuracy`` and ``pair_accuracy_bound`` (None without pairs; a bound <= 0 is reported but
    not applied), ``thresholds`` (``masked_drop``, ``masked_z``, ``pair_accuracy``: the pair accuracy
    below which the model is flagged, or None when the pair criterion does not apply), ``masked``
    (the ``masked_accuracy_drop`` result) and ``pairs`` (the ``pair_accuracy`` result with per-pair
    answers, or None).
    """
    masked = masked_accuracy_drop(model, dataset, label, region, fraction, captions, classes, batch_size, method)
    z_needed = float(norm.isf(MASKED_ALPHA / len(masked["regions"])))
    reasons = _masked_reasons(masked, z_needed)
    worst = masked["regions"][masked["worst_region"]]
    result: dict[str, Any] = {
        "label": label, "method": masked["method"], "flagged": False, "reasons": reasons,
        "accuracy": masked["unmasked"]["accuracy"], "balanced_accuracy": masked["unmasked"]["balanced_accuracy"],
        "masked_accuracy": worst["accuracy"], "masked_balanced_accuracy": worst["balanced_accuracy"],
        "masked_drop": masked["drop"], "masked_region": masked["worst_region"], "masked_z": masked["z"],
        "pair_accuracy": None, "pair_accuracy_bound": None,
        "thresholds": {"masked_drop": MAX_MASKED_DROP, "masked_z": z_needed, "pair_accuracy": None},
        "masked": masked, "pairs": None,
    }
    if pairs:
        paired = pair_accuracy(model, pairs, label, captions, masked["classes"], batch_size, keep_pairs=True,
                               method=masked["method"])
        result.update(pairs=paired, pair_accuracy=paired["pair_accuracy"])
        bound = _pair_bound(paired, masked["unmasked"]["recall"])
        result["pair_accuracy_bound"] = bound
        if bound is not None and bound > 0:
            threshold = bound - max(PAIR_TOLERANCE, 2.0 * math.sqrt(bound * (1.0 - bound) / paired["n_pairs"]))
            result["thresholds"]["pair_accuracy"] = threshold
            if paired["pair_accuracy"] < threshold:
                reasons.append(f"counterfactual pair accuracy {paired['pair_accuracy']:.2f} is below {threshold:.2f}: "
                               f"the model's recall on the data set promises at least {bound:.2f} on pairs that "
                               f"differ only in the finding")
    result["flagged"] = bool(reasons)
    log.info("shortcut check of %s on %d records: %s", label, masked["n"],
             "flagged" if reasons else "not flagged")
    return result


def _masked_reasons(masked: dict[str, Any], z_needed: float) -> list[str]:
    reasons = []
    for name, scores in masked["regions"].items():
        drop = scores["drop"]["balanced_accuracy"]
        # "at least" allows for float rounding: an exact 5-point drop can come out as 0.04999999999999993
        if drop >= MAX_MASKED_DROP - 1e-9 and scores["z"] >= z_needed:
            where = f"box {scores['box']}" if name == "box" else f"the {name.replace('_', ' ')} corner"
            reasons.append(f"hiding {where} lowers the balanced accuracy by {drop:.2f} "
                           f"(McNemar z {scores['z']:.1f} >= {z_needed:.2f})")
    return reasons


def _pair_bound(paired: dict[str, Any], recall: dict[str, float | None]) -> float | None:
    """Mean over the (generated) pairs of recall_a + recall_b - 1; None when no pair has both recalls."""
    bounds = []
    for pair in paired["pairs"]:
        recall_a, recall_b = recall.get(pair["class_a"]), recall.get(pair["class_b"])
        if pair["variation"] != NEAREST_NEIGHBOUR and recall_a is not None and recall_b is not None:
            bounds.append(recall_a + recall_b - 1.0)
    return float(np.mean(bounds)) if bounds else None
