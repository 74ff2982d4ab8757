"""Fitting a model's out-of-distribution guard (``medvl.models.ood``) and scoring datasets with it."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from ..data.record import Dataset
from ..embed import embed_images
from ..errors import InputError, ModelError
from ..models.ood import OODGuard, image_config_sha256, image_tower_sha256
from .contamination import dataset_files, learned_splits, record_files, training_data

log = logging.getLogger(__name__)

MIN_FIT = 20  # fewer training images than this give no usable covariance
MIN_SPREAD = 1e-8  # total variance of the fitted (unit-length) features below which they are one image's


def fit_ood(model, fit_set: Dataset, calibration_set: Dataset, quantile: float = 0.99,
            show_progress: bool = True) -> OODGuard:
    """Fit the guard on ``fit_set``'s embeddings, its threshold the split-conformal ``quantile`` of
    ``calibration_set``'s scores (``conformal_threshold``; a split the guard was not fitted on: the fitted images
    score lower than new ones). A calibration split too small for the quantile (``calibration_needed``) is
    warned about; ``info["expected_flagged_share"]`` is the share of in-distribution images expected flagged."""
    from sklearn.covariance import LedoitWolf

    check_quantile(quantile)
    if len(fit_set) < MIN_FIT:
        raise InputError(f"{fit_set.source}: need at least {MIN_FIT} images to fit an OOD guard, got {len(fit_set)}")
    if len(calibration_set) < 10:
        raise InputError(f"{calibration_set.source}: need at least 10 calibration images, got {len(calibration_set)}")
    fitted = torch.nn.functional.normalize(embed_images(model, fit_set, features=True, show_progress=show_progress),
                                           dim=-1).double().numpy()
    shrunk = LedoitWolf().fit(fitted)
    spread = float(np.trace(shrunk.covariance_))
    if not spread >= MIN_SPREAD:  # a zero covariance gives a zero precision: every score 0, nothing ever flagged
        raise InputError(f"{fit_set.source}: the {len(fit_set)} images of the fitted split "
                         f"{', '.join(map(repr, fit_set.splits))} have (near) identical features (total variance "
                         f"{spread:.2g}): a guard fitted on them cannot flag anything; fit it on varied images")
    guard = OODGuard(mean=torch.from_numpy(shrunk.location_).float(),
                     precision=torch.from_numpy(shrunk.precision_).float(), threshold=float("inf"), info={})
    calibration = guard.scores(embed_images(model, calibration_set, features=True,
                                            show_progress=show_progress)).numpy()
    if not np.ptp(calibration) > 0:
        raise InputError(f"{calibration_set.source}: the {len(calibration_set)} images of the calibration split "
                         f"{', '.join(map(repr, calibration_set.splits))} all score {calibration[0]:.4g}: a threshold "
                         "needs the spread of varied in-distribution images; calibrate on such a split")
    guard.threshold, expected = conformal_threshold(calibration, quantile)
    if expected > 1 - quantile + 1e-12:
        log.warning("%s: %d calibration images are fewer than the %d the %.4g quantile needs: the threshold is their "
                    "highest score, and %.1f%% of in-distribution images are expected to be flagged (1 in %d), "
                    "not %.1f%%", calibration_set.source, len(calibration), calibration_needed(quantile), quantile,
                    100 * expected, len(calibration) + 1, 100 * (1 - quantile))
    guard.info = {"quantile": quantile, "fit_images": len(fit_set), "calibration_images": len(calibration_set),
                  "shrinkage": round(float(shrunk.shrinkage_), 4),
                  "calibration_flagged_share": round(float((calibration > guard.threshold).mean()), 4),
                  "expected_flagged_share": round(expected, 4), "image_tower_sha256": image_tower_sha256(model),
                  "image_config_sha256": image_config_sha256(model), "fit_data": training_data(fit_set),
                  "calibration_data": training_data(calibration_set)}
    return guard


def conformal_threshold(scores: np.ndarray, quantile: float) -> tuple[float, float]:
    """The split-conformal threshold of ``n`` calibration ``scores`` and the share of new in-distribution images
    expected above it. The threshold is the k-th smallest score, k = ceil((n + 1) * quantile): for scores
    exchangeable with the calibration ones, a new image scores above it with probability (n + 1 - k) / (n + 1)
    (at most that when scores tie), which is at most 1 - quantile. With fewer than ``calibration_needed`` images
    k exceeds n: the threshold is then the highest score and the expected share 1 / (n + 1), above 1 - quantile."""
    n = len(scores)
    rank = min(math.ceil((n + 1) * quantile - 1e-9), n)  # the tolerance: (n + 1) * q of an exact integer in floats
    return float(np.sort(scores)[rank - 1]), (n + 1 - rank) / (n + 1)


def calibration_needed(quantile: float) -> int:
    """The fewest calibration images whose split-conformal threshold keeps the expected flagged share of
    in-distribution images at most 1 - quantile: quantile / (1 - quantile), rounded up (99 for 0.99)."""
    return math.ceil(quantile / (1 - quantile) - 1e-9)


def check_quantile(quantile: float) -> None:
    """The guard's threshold quantile must be in [0.5, 1)."""
    if not 0.5 <= quantile < 1:
        raise InputError(f"quantile must be in [0.5, 1), got {quantile}")


def ood_summary(model, dataset: Dataset, show_progress: bool = True) -> dict[str, Any]:
    """How many of ``dataset``'s images the model's guard flags (``ModelError`` if it has none)."""
    return embed_with_guard(model, dataset, show_progress=show_progress)[1]


def embed_with_guard(model, dataset: Dataset, show_progress: bool = True,
                     content: list[dict[str, str]] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The normalised image embeddings of ``dataset`` and the guard's summary of it, from one pass of the
    image tower (the guard scores the backbone features the embeddings are projected from); ``content``: as
    for ``embed_images``."""
    guard = getattr(model, "ood", None)
    if guard is None:
        raise ModelError("the model has no OOD guard: fit one with medvl ood fit")
    features = embed_images(model, dataset, features=True, show_progress=show_progress, content=content)
    with torch.no_grad():
        embeddings = model.embed_image_features(features)
    summary = summarize(guard, guard.scores(features).numpy())
    seen = guard_fitted_on_scored(guard, dataset)
    if seen is not None:
        summary["fitted_on_scored"] = seen
    return embeddings, summary


def guard_fitted_on_scored(guard: OODGuard, dataset: Dataset) -> dict[str, Any] | None:
    """How many records of ``dataset`` come from the data and splits the guard was fitted or calibrated on (its
    ``info["fit_data"]`` / ``["calibration_data"]``: the SHA-256s of the data path and files and the split names,
    compared as ``eval.contamination`` compares a model's training data); None when none, or when the guard records
    neither (fitted by an earlier medvl). A warning says so: the guard scores the images it was fitted on lower than new
    ones, and its calibration images set the threshold, so the share flagged among them is not a test."""
    scored = record_files(dataset)
    files = dataset_files(dataset)
    roles: dict[str, list[str]] = {}
    learned: set[int] = set()
    for role in ("fit", "calibration"):
        block = guard.info.get(f"{role}_data") or {}
        if not block:
            continue
        found = learned_splits(block, dataset.source, files, scored)
        if any(split is not None for split in found):
            roles[role] = sorted({split for split in found if split is not None})
            learned |= {position for position, split in enumerate(found) if split is not None}
    splits = {split for names in roles.values() for split in names}
    records = len(learned)
    if not records:
        return None
    log.warning("%d of %d scored records come from split(s) %s of the data the OOD guard was fitted or calibrated on: "
                "the share it flags among them is not a test", records, len(dataset), ", ".join(sorted(splits)))
    return {"records": records, "of": len(dataset), "fit_splits": roles.get("fit", []),
            "calibration_splits": roles.get("calibration", [])}


def embed_checked(model, dataset: Dataset, show_progress: bool = True,
                  content: list[dict[str, str]] | None = None) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """The normalised image embeddings of ``dataset`` and, when the model has an OOD guard, the guard's
    summary of them (``embed_with_guard``); None for a model without one. One pass of the image tower.
    ``content``: as for ``embed_images``."""
    if getattr(model, "ood", None) is None:
        return embed_images(model, dataset, show_progress=show_progress, content=content), None
    return embed_with_guard(model, dataset, show_progress=show_progress, content=content)


def summarize(guard: OODGuard, scores: np.ndarray) -> dict[str, Any]:
    flagged = scores > guard.threshold
    return {"n": int(len(scores)), "flagged": int(flagged.sum()),
            "flagged_share": round(float(flagged.mean()), 4) if len(scores) else 0.0,
            "median_score": round(float(np.median(scores)), 4) if len(scores) else None,
            "threshold": round(guard.threshold, 4)}


OOD_EXCESS_LEVEL = 0.01  # one-sided level at which a flagged share above the guard's own expected share is a shift


def expected_flagged_share(guard: OODGuard) -> float:
    """The share of in-distribution images ``guard`` flags by design: its ``info["expected_flagged_share"]``
    (``1 - quantile``, or ``1 / (n + 1)`` with a small calibration split), else ``1 - quantile`` (a guard fitted
    before that share was recorded; quantile 0.99 when not recorded either)."""
    recorded = guard.info.get("expected_flagged_share")
    return float(recorded) if recorded is not None else 1.0 - float(guard.info.get("quantile", 0.99))


def flagged_excess(guard: OODGuard, flagged: int, n: int) -> dict[str, Any]:
    """Is ``flagged`` of ``n`` scored images significantly more than ``guard`` flags in distribution? Returns
    ``expected_flagged_share``, ``p_value`` (one-sided; 1.0 for ``n`` 0), ``test`` (which null) and ``shifted``:
    ``p_value`` under ``OOD_EXCESS_LEVEL``. A split-conformal guard flags about ``1 - quantile`` of in-distribution
    images on purpose, so a fixed share (5 %) would flag the guard's own distribution at a low quantile and miss
    shifts at a high one. And that share is itself random: the threshold is the k-th of ``n_cal`` calibration scores
    (``conformal_threshold``), so a new in-distribution image's chance of scoring above it is Beta(n_cal + 1 - k, k)
    over calibration draws, and the flagged count of ``n`` images beta-binomial (``test`` "beta-binomial"): a
    binomial at the expected share ignored that spread and flagged about one in-distribution split in seven at a
    stated 1 %. A guard that does not record its calibration size (fitted before it was recorded): the binomial
    (``test`` "binomial")."""
    from scipy.stats import betabinom, binomtest

    expected = expected_flagged_share(guard)
    calibration = guard.info.get("calibration_images")
    quantile = guard.info.get("quantile")
    if not n:
        p_value, test = 1.0, "none"
    elif isinstance(calibration, int) and calibration >= 1 and isinstance(quantile, int | float):
        rank = min(math.ceil((calibration + 1) * float(quantile) - 1e-9), calibration)  # as conformal_threshold
        p_value = float(betabinom.sf(int(flagged) - 1, int(n), calibration + 1 - rank, rank))
        test = "beta-binomial"
    else:
        p_value = float(binomtest(int(flagged), int(n), min(max(expected, 0.0), 1.0), alternative="greater").pvalue)
        test = "binomial"
    return {"expected_flagged_share": round(expected, 4), "p_value": min(p_value, 1.0), "test": test,
            "shifted": p_value < OOD_EXCESS_LEVEL}


def warn_flagged(flags: list[dict[str, Any]], what: str) -> None:
    """One warning when any input is out of distribution (counts only: never names or content)."""
    flagged = sum(bool(flag.get("out_of_distribution")) for flag in flags)
    if flagged:
        log.warning("%d of %d %s look unlike the model's training images (OOD score above %.3g): "
                    "their answers are unreliable", flagged, len(flags), what, flags[0]["ood_threshold"])
