"""Sanity checks of heatmap methods: does a map depend on the model's weights and on the finding explained?

Adebayo et al. (2018), "Sanity checks for saliency maps": a map that barely changes when the model's weights are
replaced by random ones shows the image (its edges, its intensity), not what the model uses, however well it
points at a finding. Two checks, each a mean Spearman rank correlation over a few images (1 = the same ranking of
the pixels, 0 = unrelated):

* **model randomisation**: the trained model's map of each image's true class against the map, for the same image
  and class, of a copy whose image tower (``image_encoder``) and ``image_projection`` are re-initialised with a
  fixed seed (``randomised_image_tower``; the text tower is kept, so the class texts are the same). A method
  **passes** when the mean of this correlation's absolute value (``randomised_abs``) is below ``RANDOMISED_MAX``
  (0.5): most of its map comes from the weights. Absolute, because a map ranking the pixels in reverse under
  random weights (-0.6) depends on the image as much as one ranking them alike, and because signed values of
  several images can cancel in a mean; the signed mean is reported beside it (``randomised``).
* **class sensitivity**: within the trained model, the map of the true class against the map of another class
  (the next one in the class order) for the same image. A map of one finding should differ from that of another;
  a correlation near 1 means the method draws the same map whatever the finding (reported, not part of the rule:
  two findings can share evidence).

A pair in which either map is constant has no rank correlation: it is left out of the mean and counted
(``constant``); a method with no pair left has no mean (None) and does not pass.
Figures on the demo model: docs/benchmarks.md, "Heatmap sanity checks"; ``benchmarks/heatmap_sanity.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..embed import class_embeddings
from ..errors import DataError, InputError
from ..predict import class_prompts
from .heatmaps import METHODS, check_heatmap_model, check_methods, check_settings, heatmaps

RANDOMISED_MAX = 0.5  # a method passes the model-randomisation check when its mean Spearman is below this
MapFunction = Callable[[Any, torch.Tensor, torch.Tensor, int], torch.Tensor]  # model, pixels, texts, target -> maps


def randomised_image_tower(model, seed: int = 0):
    """A deep copy of ``model`` whose image encoder and image projection are re-initialised (each module's own
    ``reset_parameters``, which also resets batch-norm statistics; a parameter of a module without one, such as
    a position embedding, drawn from N(0, 0.02)) with ``seed``; the text tower and the logit scale are kept.
    The global random state is left as it was."""
    check_heatmap_model(model)
    randomised = copy.deepcopy(model).eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for tower in (randomised.image_encoder, randomised.image_projection):
            for module in tower.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                    continue
                for parameter in module.parameters(recurse=False):
                    torch.nn.init.normal_(parameter, std=0.02)
    return randomised


def rank_correlation(first: np.ndarray, second: np.ndarray) -> float | None:
    """Spearman rank correlation of two maps' pixels (ties share their mean rank); None when either is constant."""
    from scipy.stats import rankdata

    a, b = (rankdata(np.asarray(m, dtype=np.float64).ravel()) for m in (first, second))
    if a.shape != b.shape:
        raise InputError(f"maps of different sizes: {np.shape(first)} vs {np.shape(second)}")
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def sanity_check(model, dataset, label: str = "finding", methods: Sequence[str] | None = None,
                 settings: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0, captions=None,
                 extra_maps: Mapping[str, MapFunction] | None = None,
                 classes: Sequence[str] | None = None) -> dict[str, Any]:
    """The model-randomisation and class-sensitivity checks (module docstring) of each heatmap method on the
    records of ``dataset`` (a few: every map is drawn three times per image), each explained for its ``label``
    class among ``classes`` (default: ``dataset``'s classes of ``label``; at least 2). ``methods``: default every
    heatmap method; ``settings`` per method as for ``heatmaps``; ``seed``: the re-initialisation's.
    ``extra_maps``: other map functions by name, called as ``function(model, pixels, class_embeddings, target)``
    -> (N, H, W) maps (a baseline, or a method under study), checked the same way.
    Returns per method ``randomised`` and ``other_class`` (mean Spearman, or None), ``randomised_abs`` (the mean of
    the absolute values), ``n`` (pairs scored each), ``constant`` (pairs left out) and ``passes``
    (``randomised_abs`` below ``RANDOMISED_MAX``), with the rule."""
    check_heatmap_model(model)
    methods = check_methods(methods or METHODS)
    check_settings(methods, settings)
    makers = _map_functions(methods, settings, extra_maps)
    dataset.require_label(label)
    records = [r for r in dataset if label in r.labels]
    classes = list(classes) if classes is not None else dataset.classes(label)
    unknown = sorted({str(r.labels[label]) for r in records} - set(classes))
    if unknown:
        raise InputError(f"{dataset.source}: classes {unknown} of {label!r} are not among {classes}")
    if not records or len(classes) < 2:
        raise DataError(dataset.source, f"the sanity check needs records of at least 2 {label!r} classes, got "
                                        f"{len(records)} records of {len(classes)}")
    texts = class_embeddings(model, class_prompts(model, classes, label, captions, described_only=False)[1])
    randomised = randomised_image_tower(model, seed)
    scores: dict[str, dict[str, list[float | None]]] = {name: {"randomised": [], "other_class": []} for name in makers}
    for record in records:
        pixels = model.preprocessor.load_many([record.image])
        target = classes.index(str(record.labels[label]))
        other = (target + 1) % len(classes)
        for name, make in makers.items():
            trained = _draw(make, model, pixels, texts, target)
            scores[name]["randomised"].append(rank_correlation(trained, _draw(make, randomised, pixels, texts, target)))
            scores[name]["other_class"].append(rank_correlation(trained, _draw(make, model, pixels, texts, other)))
    return {"label": label, "classes": classes, "images": len(records), "seed": seed,
            "rule": f"passes when the mean absolute Spearman correlation with the randomised model is below "
                    f"{RANDOMISED_MAX}",
            "methods": {name: _summary(values) for name, values in scores.items()}}


def _map_functions(methods: Sequence[str], settings: Mapping[str, Mapping[str, Any]] | None,
                   extra_maps: Mapping[str, MapFunction] | None) -> dict[str, MapFunction]:
    """Each method's map as ``function(model, pixels, texts, target)`` -> (N, H, W), then the extra ones."""
    clash = sorted(set(methods) & set(extra_maps or {}))
    if clash:
        raise InputError(f"extra map functions may not reuse a heatmap method's name: {', '.join(clash)}")

    def method_map(method: str) -> MapFunction:
        options = {method: dict((settings or {}).get(method, {}))}
        return lambda model, pixels, texts, target: torch.as_tensor(
            heatmaps(model, pixels, texts, target, [method], options)[method])
    return {**{method: method_map(method) for method in methods}, **dict(extra_maps or {})}


def _draw(make: MapFunction, model, pixels: torch.Tensor, texts: torch.Tensor, target: int) -> np.ndarray:
    """One image's (H, W) map."""
    return make(model, pixels, texts, target)[0].detach().numpy()


def _summary(values: Mapping[str, list[float | None]]) -> dict[str, Any]:
    means: dict[str, float | None] = {}
    for key, pairs in values.items():
        scored = [v for v in pairs if v is not None]
        means[key] = round(float(np.mean(scored)), 4) if scored else None
    absolute = [abs(v) for v in values["randomised"] if v is not None]
    means["randomised_abs"] = round(float(np.mean(absolute)), 4) if absolute else None
    return {**means, "n": {key: sum(v is not None for v in pairs) for key, pairs in values.items()},
            "constant": {key: sum(v is None for v in pairs) for key, pairs in values.items()},
            "passes": means["randomised_abs"] is not None and means["randomised_abs"] < RANDOMISED_MAX}
