"""Sanity baselines for zero-shot classification and retrieval (SURE-VQA style).

A model's metric means little until it beats answers that need no looking at the image:

- ``blank_image``: every image replaced by a constant mid-grey image (uint8 128). The preprocessor
  scales and resizes every image to the model's input, where any constant image of any shape becomes
  the same constant tensor (128 / 255 in every channel), so one encoder pass gives every record's
  blank embedding. The model then answers from the prompts alone: its scores are the same for
  every record, so its AUC is 0.5 and it predicts one class for all.
- ``shuffled_pairing``: the model's own scores with the image-label pairing permuted (``shuffles``
  seeded permutations, metrics averaged); ``p_value`` is the permutation test's share of
  permutations scoring at least the model ((1 + count) / (1 + shuffles)).
- ``label_prior``: every record scored by the class frequencies of the data: the majority class
  always predicted, AUC 0.5.

``beats_baselines`` is True when the model beats every baseline by at least ``margin`` on each
compared metric (AUC and balanced accuracy by default); ``flags`` says, in words, where it does not.
Metric keys: ``auc`` (macro one-vs-rest over the classes present, as zero-shot's ``macro_auc``),
``balanced_accuracy``, ``accuracy``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from ..checks import check_number
from ..data import captions_for
from ..data.captions import CaptionConfig
from ..data.record import Dataset
from ..embed import embed_images
from ..errors import InputError
from ..models.dual import DualEncoder
from .retrieval import retrieval
from .subgroups import accuracy, balanced_accuracy, macro_auc
from .zero_shot import zero_shot

MID_GREY = 128 / 255  # a uint8 128 image after the preprocessor's / 255
COMPARED = ("auc", "balanced_accuracy")
BASELINE_NAMES = {"blank_image": "blank-image", "shuffled_pairing": "shuffled-pairing",
                  "label_prior": "label-prior"}
METRIC_NAMES = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy"}
DIRECTION_NAMES = {"i2t": "image-to-text", "t2i": "text-to-image"}


def blank_image_embedding(model: DualEncoder) -> torch.Tensor:
    """(1, D) embedding of a constant mid-grey image at the model's input size."""
    image = model.config.image
    pixels = torch.full((1, image.in_channels, *image.volume_shape), MID_GREY)
    return model.encode_images(pixels)


def score_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float | None]:
    """``auc`` (None for a single class), ``balanced_accuracy`` and ``accuracy`` of (N, K) scores."""
    return {"auc": macro_auc(y_true, probabilities), "balanced_accuracy": balanced_accuracy(y_true, probabilities),
            "accuracy": accuracy(y_true, probabilities)}


def compare_to_baselines(model: dict, baselines: dict[str, dict], metrics: Sequence[str] = COMPARED,
                         margin: float = 0.05) -> tuple[bool, list[str]]:
    """Whether ``model`` beats every baseline by at least ``margin`` on each of ``metrics``, and a
    flag sentence for each shortfall (a metric the model lacks is a shortfall; one a baseline lacks is skipped)."""
    flags = []
    for metric in metrics:
        name = _metric_name(metric)
        value = model.get(metric)
        if value is None:
            flags.append(f"{name} of the model is undefined (a single class?), so it cannot be compared")
            continue
        for baseline, scores in baselines.items():
            reference = scores.get(metric)
            if reference is not None and not beats_by(value, reference, margin):
                flags.append(f"{name} {value:.3f} does not beat the {BASELINE_NAMES.get(baseline, baseline)} "
                             f"baseline {reference:.3f} by {margin:g}")
    return not flags, flags


def beats_by(value: float, reference: float, margin: float = 0.05) -> bool:
    """Whether ``value`` beats ``reference`` by at least ``margin``: the one rule of every sanity check. "At
    least" allows for float rounding (8/60 against a chance recall of 5/60 comes out 1.5e-16 short of 0.05)."""
    return value - reference >= margin - 1e-9


def _metric_name(metric: str) -> str:
    """``balanced_accuracy`` -> "balanced accuracy", ``i2t_R@5`` -> "image-to-text R@5"."""
    direction, _, recall = metric.partition("_")
    if direction in DIRECTION_NAMES and recall.startswith("R@"):
        return f"{DIRECTION_NAMES[direction]} {recall}"
    return METRIC_NAMES.get(metric, metric)


def sanity_baselines(model: DualEncoder, dataset: Dataset, label: str, captions: CaptionConfig | None = None,
                     classes: Sequence[str] | None = None, image_embeddings: torch.Tensor | None = None,
                     seed: int = 0, margin: float = 0.05, compare: Sequence[str] = COMPARED,
                     shuffles: int = 100, show_progress: bool = True,
                     probabilities: np.ndarray | None = None) -> dict:
    """Zero-shot metrics of ``model`` on ``label`` beside the blank-image, shuffled-pairing and
    label-prior baselines (module docstring), with a verdict.

    ``captions`` default to ``captions_for(dataset, model=model)``; ``image_embeddings`` (rows aligned
    with ``dataset``) skip embedding. ``probabilities`` (rows aligned with the records that have
    ``label``, columns with ``classes``) checks another classifier's scores (a linear probe) instead of
    zero-shot; the blank-image baseline is then left out (listed under ``skipped``), since it needs
    that classifier's answer on a blank image.

    Returns ``label``, ``classes``, ``n``, ``margin``, ``compared``, ``model`` and ``baselines``
    (``blank_image`` + ``predicted_class``, ``shuffled_pairing`` + ``shuffles`` and ``p_value`` per
    compared metric, ``label_prior`` + ``majority_class``; each with ``auc``, ``balanced_accuracy``,
    ``accuracy``), ``skipped`` (baseline -> reason), ``beats_baselines`` and ``flags``.
    """
    _check_settings(margin, shuffles, compare)
    captions = captions or captions_for(dataset, model=model)
    skipped = {}
    if probabilities is None:
        scored = zero_shot(model, dataset, label, captions, classes, show_progress=show_progress,
                           image_embeddings=image_embeddings, keep_scores=True)
        y_true, scores, class_names = np.array(scored["y_true"]), np.array(scored["probabilities"]), scored["classes"]
    else:
        y_true, scores, class_names = _given_scores(dataset, label, classes, probabilities)
    own = score_metrics(y_true, scores)
    baselines = {}
    if probabilities is None:
        baselines["blank_image"] = _blank_image(model, dataset, label, captions, class_names, y_true)
    else:
        skipped["blank_image"] = "scores given as probabilities: the classifier's answer on a blank image is unknown"
    baselines["shuffled_pairing"] = _shuffled(y_true, scores, own, compare, shuffles, seed)
    baselines["label_prior"] = _label_prior(y_true, len(class_names), class_names)
    beats, flags = compare_to_baselines(own, baselines, compare, margin)
    return {"label": label, "classes": class_names, "n": int(len(y_true)), "margin": margin,
            "compared": list(compare), "model": own, "baselines": baselines, "skipped": skipped,
            "beats_baselines": beats, "flags": flags}


def _given_scores(dataset: Dataset, label: str, classes: Sequence[str] | None,
                  probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    labelled = dataset.with_labels([label])
    class_names = list(classes) if classes else labelled.classes(label)
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({str(r.labels[label]) for r in labelled} - set(index))
    if unknown:
        raise InputError(f"{dataset.source}: records have classes {unknown} not in {class_names}")
    scores = np.asarray(probabilities, dtype=float)
    if scores.shape != (len(labelled), len(class_names)) or len(class_names) < 2:
        raise InputError(f"probabilities must be ({len(labelled)} records with {label!r}, {len(class_names)} "
                         f"classes >= 2), got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise InputError("probabilities contain NaN or infinite values")
    return np.array([index[str(r.labels[label])] for r in labelled]), scores, class_names


def _blank_image(model: DualEncoder, dataset: Dataset, label: str, captions: CaptionConfig,
                 class_names: list[str], y_true: np.ndarray) -> dict:
    labelled = dataset.with_labels([label])
    blank = zero_shot(model, labelled, label, captions, class_names, show_progress=False,
                      image_embeddings=blank_image_embedding(model).expand(len(labelled), -1), keep_scores=True)
    scores = np.array(blank["probabilities"])
    return {**score_metrics(y_true, scores), "predicted_class": class_names[int(scores[0].argmax())]}


def _check_settings(margin: float, shuffles: int, compare: Sequence[str]) -> None:
    check_number("margin", margin, minimum=0, maximum=1)
    check_number("shuffles", shuffles, minimum=1, integer=True)
    unknown = [metric for metric in compare if metric not in ("auc", "balanced_accuracy", "accuracy")]
    if unknown or not compare:
        raise InputError(f"compare must name some of auc, balanced_accuracy, accuracy; got {list(compare)}")


def _shuffled(y_true: np.ndarray, probabilities: np.ndarray, own: dict, compare: Sequence[str],
              shuffles: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    runs = [score_metrics(y_true, probabilities[rng.permutation(len(y_true))]) for _ in range(shuffles)]
    means = {key: _mean([run[key] for run in runs]) for key in ("auc", "balanced_accuracy", "accuracy")}
    p_values = {}
    for metric in compare:
        values = [run[metric] for run in runs if run[metric] is not None]
        if own[metric] is not None and values:
            p_values[metric] = (1 + sum(v >= own[metric] - 1e-12 for v in values)) / (1 + len(values))
    return {**means, "shuffles": shuffles, "p_value": p_values}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _label_prior(y_true: np.ndarray, num_classes: int, class_names: list[str]) -> dict:
    prior = np.bincount(y_true, minlength=num_classes) / len(y_true)
    probabilities = np.tile(prior, (len(y_true), 1))
    return {**score_metrics(y_true, probabilities), "majority_class": class_names[int(prior.argmax())]}


def retrieval_sanity(model: DualEncoder, dataset: Dataset, ks: Sequence[int] = (1, 5, 10),
                     image_embeddings: torch.Tensor | None = None, seed: int = 0, margin: float = 0.05,
                     show_progress: bool = True) -> dict:
    """Image<->text Recall@K of the model beside the same retrieval with the texts shuffled among the
    images (one seeded permutation; the gallery of texts is unchanged, only the pairing).

    Returns ``n_images``, ``margin``, ``model`` and ``shuffled_pairing`` (``i2t_R@k`` / ``t2i_R@k``
    for each k), ``chance`` (the expected Recall@K of a random ranking), ``beats_baselines`` (the
    model beats the shuffled pairing by ``margin`` on every Recall@K) and ``flags``.
    """
    check_number("margin", margin, minimum=0, maximum=1)
    keep = [i for i, r in enumerate(dataset) if r.text]
    if len(keep) < 2:
        raise InputError(f"{dataset.source}: retrieval needs at least 2 records with text, got {len(keep)}")
    subset = dataset.subset([dataset[i] for i in keep])
    if image_embeddings is not None:
        if len(image_embeddings) != len(dataset):
            raise InputError(f"{len(image_embeddings)} image embeddings for {len(dataset)} records")
        embeddings = image_embeddings[keep]
    else:
        embeddings = embed_images(model, subset, show_progress=show_progress)
    order = np.random.default_rng(seed).permutation(len(subset))
    shuffled = subset.subset([dataclasses.replace(r, text=subset[int(j)].text) for r, j in zip(subset, order,
                                                                                                  strict=True)])
    own = retrieval(model, subset, ks, show_progress=False, image_embeddings=embeddings)
    other = retrieval(model, shuffled, ks, show_progress=False, image_embeddings=embeddings)
    keys = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in ks]
    model_recall, shuffled_recall = {key: own[key] for key in keys}, {key: other[key] for key in keys}
    chance = {f"{short}_R@{k}": own[direction]["chance"][f"R@{k}"]
              for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")) for k in ks}
    beats, flags = compare_to_baselines(model_recall, {"shuffled_pairing": shuffled_recall}, keys, margin)
    return {"n_images": own["n_images"], "margin": margin, "model": model_recall,
            "shuffled_pairing": shuffled_recall, "chance": chance, "beats_baselines": beats, "flags": flags}
