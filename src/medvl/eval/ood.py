"""Fitting a model's out-of-distribution guard (``medvl.models.ood``) and scoring datasets with it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..data.record import Dataset
from ..embed import embed_images
from ..errors import InputError, ModelError
from ..models.ood import OODGuard

log = logging.getLogger(__name__)

MIN_FIT = 20  # fewer training images than this give no usable covariance


def fit_ood(model, fit_set: Dataset, calibration_set: Dataset, quantile: float = 0.99,
            show_progress: bool = True) -> OODGuard:
    """Fit the guard on ``fit_set``'s embeddings, its threshold the ``quantile`` of ``calibration_set``'s
    scores (a split the guard was not fitted on: the fitted images score lower than new ones)."""
    from sklearn.covariance import LedoitWolf

    check_quantile(quantile)
    if len(fit_set) < MIN_FIT:
        raise InputError(f"{fit_set.source}: need at least {MIN_FIT} images to fit an OOD guard, got {len(fit_set)}")
    if len(calibration_set) < 10:
        raise InputError(f"{calibration_set.source}: need at least 10 calibration images, got {len(calibration_set)}")
    fitted = torch.nn.functional.normalize(embed_images(model, fit_set, features=True, show_progress=show_progress),
                                           dim=-1).double().numpy()
    shrunk = LedoitWolf().fit(fitted)
    guard = OODGuard(mean=torch.from_numpy(shrunk.location_).float(),
                     precision=torch.from_numpy(shrunk.precision_).float(), threshold=float("inf"), info={})
    calibration = guard.scores(embed_images(model, calibration_set, features=True,
                                            show_progress=show_progress)).numpy()
    guard.threshold = float(np.quantile(calibration, quantile))
    guard.info = {"quantile": quantile, "fit_images": len(fit_set), "calibration_images": len(calibration_set),
                  "shrinkage": round(float(shrunk.shrinkage_), 4),
                  "calibration_flagged_share": round(float((calibration > guard.threshold).mean()), 4)}
    return guard


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
    return embeddings, summarize(guard, guard.scores(features).numpy())


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


def warn_flagged(flags: list[dict[str, Any]], what: str) -> None:
    """One warning when any input is out of distribution (counts only: never names or content)."""
    flagged = sum(bool(flag.get("out_of_distribution")) for flag in flags)
    if flagged:
        log.warning("%d of %d %s look unlike the model's training images (OOD score above %.3g): "
                    "their answers are unreliable", flagged, len(flags), what, flags[0]["ood_threshold"])
