"""Grounding quality of heatmaps against boxes and masks: pointing game, IoU, Dice, baselines.

Conventions: a heatmap is a (rows, columns) float array, higher = more evidence; boxes are
``[x0, y0, x1, y1]`` pixels, end-exclusive (x = column), as the phantom writes them, so
``mask[y0:y1, x0:x1]`` holds a finding's whole mask. A box reaching outside the image and an empty
mask are refused, not clipped or scored (an empty mask against a map with no evidence gave IoU 1).

* **Pointing game** (Zhang et al. 2016): a hit when the map's peak lies inside the region, or within
  ``tolerance`` pixels (Euclidean) of it. The **peak** (``peak``) is the centre of the map's maximal
  region, not one corner of it: the pixel nearest the centroid of every pixel within ``PEAK_RTOL`` of the
  maximum (relative to the map's scale). Token maps upsampled bilinearly (patch_text, Grad-CAM) have flat
  maxima, e.g. a border cell's maximum is a plateau half a cell wide, whose values differ only by float
  rounding that changes with how many images share a forward pass; the first maximum in row-major order
  was the plateau's top-left corner, picked by that rounding. A constant map (no evidence anywhere) has
  no peak and is never a hit.
* **Energy in box**: the share of the min-max normalised map's mass inside the box (Wang et al.
  2020, Score-CAM's energy-based pointing game); 1 = all the evidence in the box.
* **IoU / Dice at a threshold t**: the map is min-max normalised to [0, 1] and the pixels >= t form
  the predicted region, compared with the finding's mask.
* Baselines: a **random map** (uniform noise per pixel, seeded: its maximum is a uniformly random
  pixel) and a **centre prior** (an isotropic Gaussian on the image centre, sigma a quarter of the
  side: its maximum is the centre pixel).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..embed import class_embeddings
from ..errors import DataError, InputError
from ..predict import class_prompts
from .heatmaps import METHODS, check_heatmap_model, check_methods, check_settings, heatmaps, resize_map, target_index

BASELINES = ("random", "centre")
THRESHOLDS = (0.25, 0.5, 0.75)
PEAK_RTOL = 1e-6  # values this close to the maximum (relative to the map's scale) tie with it: float32 rounding


def normalise_map(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (float64); a constant map becomes all zeros."""
    values = np.asarray(heatmap, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def peak(heatmap: np.ndarray, rtol: float = PEAK_RTOL) -> tuple[int, int] | None:
    """(row, column) of the centre of the map's maximal region; None for a constant map (no peak).

    The maximal region is every pixel within ``rtol`` x the map's scale (the larger of its range and
    its maximum's magnitude) of the maximum: a plateau, or a tie, of values equal up to float rounding.
    Its centre is the region's pixel nearest the region's centroid (the first in row-major order when
    several are as near), so the peak is always a pixel of the maximal region, also when that region
    is not convex or lies in separate places."""
    values = np.asarray(heatmap, dtype=np.float64)
    high, low = float(values.max()), float(values.min())
    if not high > low:  # constant, or not finite
        return None
    rows, cols = np.nonzero(values >= high - rtol * max(high - low, abs(high)))
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return int(rows[nearest]), int(cols[nearest])


def box_mask(box: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """A boolean (rows, columns) mask of an end-exclusive ``[x0, y0, x1, y1]`` box, which must lie in ``shape``."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise InputError(f"box {list(box)} is not [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
    if x1 > shape[1] or y1 > shape[0]:
        raise InputError(f"box {list(box)} reaches outside the image of {shape[1]} x {shape[0]} pixels (x1 <= width, "
                         "y1 <= height)")
    mask = np.zeros(tuple(shape[:2]), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def pointing_hit(heatmap: np.ndarray, region: np.ndarray, tolerance: float = 0.0) -> bool:
    """True when the map's peak (``peak``) lies in ``region`` (boolean, same shape) or within ``tolerance`` px
    of it; False for a constant map, which has no peak."""
    _check_same_shape(heatmap, region)
    where = peak(heatmap)
    if where is None:
        return False
    row, col = where
    if region[row, col]:
        return True
    if tolerance <= 0 or not region.any():
        return False
    rows, cols = np.nonzero(region)
    return bool(np.min((rows - row) ** 2 + (cols - col) ** 2) <= tolerance ** 2)


def energy_in(heatmap: np.ndarray, region: np.ndarray) -> float:
    """Share of the normalised map's mass inside ``region`` (0 for a constant map)."""
    _check_same_shape(heatmap, region)
    values = normalise_map(heatmap)
    total = float(values.sum())
    return float(values[region].sum()) / total if total > 0 else 0.0


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    _check_same_shape(predicted, truth)
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|) of two boolean masks (1 when both are empty)."""
    _check_same_shape(predicted, truth)
    total = int(predicted.sum()) + int(truth.sum())
    return float(2 * np.logical_and(predicted, truth).sum() / total) if total else 1.0


def random_map(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """The random baseline: uniform noise in [0, 1) per pixel."""
    return rng.random(tuple(shape[:2]))


def centre_prior(shape: Sequence[int], sigma: float = 0.25) -> np.ndarray:
    """The centre baseline: a Gaussian on the image centre, ``sigma`` in fractions of each side."""
    rows, cols = (np.arange(n, dtype=np.float64) - (n - 1) / 2 for n in shape[:2])
    return np.exp(-0.5 * ((rows[:, None] / (sigma * shape[0])) ** 2 + (cols[None, :] / (sigma * shape[1])) ** 2))


def region_scores(heatmap: np.ndarray, mask: np.ndarray, box: Sequence[int],
                  thresholds: Sequence[float] = THRESHOLDS, tolerance: float = 0.0) -> dict[str, float]:
    """Every grounding score of one map against one finding's mask and box (InputError for an empty mask: IoU and
    Dice of an empty prediction would score 1)."""
    in_box = box_mask(box, np.shape(heatmap))
    _check_same_shape(heatmap, mask)
    if not np.any(mask):
        raise InputError("the finding's mask is empty: nothing to ground against")
    scores = {"pointing_box": float(pointing_hit(heatmap, in_box, tolerance)),
              "pointing_mask": float(pointing_hit(heatmap, mask, tolerance)),
              "energy_box": energy_in(heatmap, in_box)}
    values = normalise_map(heatmap)
    for t in thresholds:
        predicted = values >= t if values.max() > 0 else np.zeros_like(mask)
        scores[f"iou@{t:g}"] = iou(predicted, mask)
        scores[f"dice@{t:g}"] = dice(predicted, mask)
    return scores


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean of each score per finding and method, plus ``all`` (every finding pooled).

    ``rows``: one per (case, finding, method) with keys ``finding``, ``method`` and the scores."""
    out: dict[str, dict[str, Any]] = {}
    for finding in sorted({r["finding"] for r in rows}) + ["all"]:
        chosen = [r for r in rows if finding in ("all", r["finding"])]
        per_method: dict[str, Any] = {}
        for method in dict.fromkeys(r["method"] for r in chosen):
            mine = [r for r in chosen if r["method"] == method]
            keys = [k for k in mine[0] if k not in ("finding", "method", "id")]
            per_method[method] = {k: float(np.mean([r[k] for r in mine])) for k in keys}
        out[finding] = {"n": len({r["id"] for r in chosen}), **per_method}
    return out


def phantom_truth(record, finding: str) -> tuple[np.ndarray, list[int]] | None:
    """The mask and box of ``finding`` in a 2D phantom record (``boxes`` column and ``masks/`` folder
    beside ``images/``, as ``medvl phantom`` writes them), or None when the case has no box for it.

    DataError naming the mask when it is missing, a 3D (NIfTI) mask, or empty, or when the box does not
    lie inside it."""
    from PIL import Image

    boxes = json.loads(record.labels.get("boxes") or "{}")
    if finding not in boxes:
        return None
    image = Path(record.image)
    name = image.name[:-len(".nii.gz")] if image.name.lower().endswith(".nii.gz") else image.stem
    mask_path = image.parent.parent / "masks" / f"{name}_{finding}.png"
    if not mask_path.is_file():
        volume = mask_path.with_name(f"{name}_{finding}.nii.gz")
        if volume.is_file():
            raise DataError(volume, "a 3D mask: grounding scores 2D images against 2D (PNG) masks; volumes are "
                                    "not supported")
        raise DataError(mask_path, f"mask of {finding!r} not found (the manifest gives it a box)")
    with Image.open(mask_path) as handle:
        mask = np.asarray(handle.convert("L")) > 0
    box = [int(v) for v in boxes[finding]]
    if not mask.any():
        raise DataError(mask_path, f"mask of {finding!r} is empty (the manifest gives it the box {box})")
    rows, cols = mask.shape
    if len(box) != 4 or not (0 <= box[0] < box[2] <= cols and 0 <= box[1] < box[3] <= rows):
        raise DataError(mask_path, f"the manifest's box {box} of {finding!r} ({record.id}) is not an [x0, y0, x1, y1] "
                                   f"box inside the mask's {cols} x {rows} pixels")
    return mask, box


def evaluate_grounding(model, dataset, label: str = "finding", methods: Sequence[str] | None = None,
                       thresholds: Sequence[float] = THRESHOLDS, tolerance: float = 0.0, seed: int = 0,
                       captions=None, batch_size: int = 16,
                       settings: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Grounding of each heatmap method and both baselines on every record whose ``label`` class has a
    box and mask (2D phantom layout, see ``phantom_truth``; a 3D model is a ModelError); the heatmap
    explains the true class among all of ``label``'s classes in ``dataset`` (with a method's setting
    ``head``: the class of the same name among that supervised head's). ``settings``: keyword arguments
    per method (``heatmaps``). Returns ``per_finding`` (``summarise``), ``seconds_per_image`` per method
    and the settings."""
    check_heatmap_model(model)  # before any mask is looked for: a 3D model's refusal names the real reason
    methods = check_methods(methods or METHODS)
    check_settings(methods, settings)
    _check_thresholds(thresholds)
    dataset.require_label(label)
    classes = dataset.classes(label)
    texts = class_embeddings(model, class_prompts(model, classes, label, captions, described_only=False)[1])
    cases = [(r, str(r.labels[label]), truth) for r in dataset
             for truth in [phantom_truth(r, str(r.labels[label]))] if truth is not None]
    if not cases:
        raise DataError(dataset.source, f"no record has a box and mask for its {label!r} class")
    started, rng, rows = time.perf_counter(), np.random.default_rng(seed), []
    spent = dict.fromkeys(methods, 0.0)
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        pixels = model.preprocessor.load_many([r.image for r, _, _ in chunk])
        for finding in dict.fromkeys(f for _, f, _ in chunk):
            members = [i for i, (_, f, _) in enumerate(chunk) if f == finding]
            maps: dict[str, np.ndarray] = {}
            for method in methods:  # one at a time, to time each
                clock = time.perf_counter()
                options = dict((settings or {}).get(method, {}))
                target = target_index(model, classes, finding, options.get("head"))
                maps |= heatmaps(model, pixels[members], texts, target, [method], {method: options})
                spent[method] += time.perf_counter() - clock
            for j, i in enumerate(members):
                record, _, (mask, box) = chunk[i]
                candidates = {m: resize_map(maps[m][j], mask.shape) for m in methods}
                candidates |= {"random": random_map(mask.shape, rng), "centre": centre_prior(mask.shape)}
                rows += [{"id": record.id, "finding": finding, "method": m,
                          **region_scores(heatmap, mask, box, thresholds, tolerance)}
                         for m, heatmap in candidates.items()]
    return {"label": label, "classes": classes, "methods": methods, "baselines": list(BASELINES),
            "thresholds": list(thresholds), "tolerance": tolerance, "seed": seed, "n": len(cases),
            "settings": {m: dict((settings or {}).get(m, {})) for m in methods},
            "seconds": round(time.perf_counter() - started, 2),
            "seconds_per_image": {m: round(spent[m] / len(cases), 4) for m in methods},
            "per_finding": summarise(rows)}


def beats_baselines(per_finding: dict[str, dict[str, Any]], methods: Sequence[str],
                    score: str = "pointing_box") -> dict[str, bool]:
    """Per finding: does the best heatmap method score strictly above both baselines?"""
    return {finding: max(row[m][score] for m in methods) > max(row[b][score] for b in BASELINES)
            for finding, row in per_finding.items() if finding != "all"}


def selection_key(per_finding: dict[str, dict[str, Any]], method: str,
                  score: str = "pointing_box") -> tuple[int, float]:
    """The rule that picks a method's settings on a validation split: first the number of findings on
    which ``method`` scores strictly above both baselines, then its pooled ``score`` (all findings)."""
    beaten = sum(row[method][score] > max(row[b][score] for b in BASELINES)
                 for finding, row in per_finding.items() if finding != "all")
    return int(beaten), float(per_finding["all"][method][score])


def choose_settings(model, dataset, candidates: Mapping[str, Sequence[Mapping[str, Any]]], label: str = "finding",
                    seed: int = 0, tolerance: float = 0.0, captions=None) -> dict[str, Any]:
    """Score each method's candidate settings on ``dataset`` (a validation split) with
    ``evaluate_grounding`` and keep, per method, the candidate ranked first by ``selection_key``
    (the first listed on ties). Returns ``chosen`` (method -> settings) and ``tried`` (method ->
    one entry per candidate: ``settings``, ``key`` and the candidate's ``per_finding`` scores)."""
    check_methods(list(candidates))
    chosen: dict[str, dict[str, Any]] = {}
    tried: dict[str, list[dict[str, Any]]] = {}
    for method, options in candidates.items():
        if not options:
            raise InputError(f"no candidate settings given for {method!r} (use [{{}}] for its defaults)")
        for settings in options:
            result = evaluate_grounding(model, dataset, label, [method], tolerance=tolerance, seed=seed,
                                        captions=captions, settings={method: dict(settings)})
            key = selection_key(result["per_finding"], method)
            tried.setdefault(method, []).append({"settings": dict(settings), "key": list(key),
                                                 "seconds_per_image": result["seconds_per_image"][method],
                                                 "per_finding": result["per_finding"]})
        best = max(range(len(tried[method])), key=lambda i: (tuple(tried[method][i]["key"]), -i))
        chosen[method] = tried[method][best]["settings"]
    return {"chosen": chosen, "tried": tried}


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if np.shape(a) != np.shape(b):
        raise InputError(f"heatmap and region shapes differ: {np.shape(a)} vs {np.shape(b)}")


def _check_thresholds(thresholds: Sequence[float]) -> None:
    if not thresholds or any(not 0 < float(t) <= 1 for t in thresholds):
        raise InputError(f"thresholds must be in (0, 1], got {list(thresholds)}")
