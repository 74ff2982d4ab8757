"""Zero-shot classification with prompt ensembles (CLIP protocol)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ..data.captions import CaptionConfig, binary_finding
from ..data.record import Dataset
from ..embed import class_embeddings, embed_images
from ..errors import InputError
from ..models.dual import DualEncoder
from .metrics import classification_metrics

log = logging.getLogger(__name__)


def scaled_similarities(model: DualEncoder, image_embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (N, K) of normalised image and class embeddings times the model's learned
    scale (1 / temperature, capped at 100 as in training): the zero-shot logits."""
    return model.logit_scale.detach().clamp(max=4.6052).exp() * image_embeddings @ classes.t()


def zero_shot_logits(model: DualEncoder, image_embeddings: torch.Tensor, prompts: list[list[str]]) -> torch.Tensor:
    """Scaled cosine similarity (N, K) of each image to each class's prompt ensemble."""
    return scaled_similarities(model, image_embeddings, class_embeddings(model, prompts))


def zero_shot_probabilities(model: DualEncoder, image_embeddings: torch.Tensor,
                            prompts: list[list[str]]) -> np.ndarray:
    """Softmax over classes of scaled cosine similarity to each class's prompt ensemble."""
    return zero_shot_logits(model, image_embeddings, prompts).softmax(-1).numpy()


def label_classes(dataset: Dataset, label: str) -> list[str]:
    """The classes of ``label`` over every record of ``dataset`` (give the whole dataset, all splits): what a
    split of it is scored among, so that a split lacking a class is not scored as an easier task."""
    return sorted({str(r.labels[label]) for r in dataset if label in r.labels})


def zero_shot_classes(dataset: Dataset, label: str, classes: Sequence[str] | None = None) -> list[str]:
    """The classes ``dataset``'s ``label`` is scored among (``classes``, else those present), checked before
    any image is embedded: InputError when no record has the label, fewer than 2 classes, or a record's
    class is not among them."""
    dataset.require_label(label)
    present = [str(r.labels[label]) for r in dataset if label in r.labels]
    if not present:
        raise InputError(f"{dataset.source}: no records with label {label!r}")
    class_names = list(dict.fromkeys(classes)) if classes else sorted(set(present))  # a repeat is one class
    if len(class_names) < 2:
        raise InputError(f"{dataset.source}: label {label!r} needs at least 2 classes, got {class_names}")
    unknown = set(present) - set(class_names)
    if unknown:
        raise InputError(f"{dataset.source}: records have classes {sorted(unknown)} not in {class_names}")
    return class_names


def zero_shot(model: DualEncoder, dataset: Dataset, label: str,
              captions: CaptionConfig | None = None, classes: Sequence[str] | None = None,
              show_progress: bool = True, image_embeddings: torch.Tensor | None = None,
              keep_scores: bool = False, keep_logits: bool = False) -> dict:
    """Classify every record's image among the classes of ``label`` from text prompts alone.

    Returns accuracy, balanced accuracy, macro AUC, a per-class table, the confusion matrix and
    the prompts used. ``classes`` defaults to the classes present in the dataset; give the label's classes
    over the whole dataset (``label_classes``) when scoring one split: a class without a scored record stays a
    candidate (it can be a wrong answer), and is named in ``classes_absent`` with a warning.
    ``image_embeddings`` (rows aligned with ``dataset``) skips embedding; ``keep_scores`` adds
    the per-image ``probabilities`` and true class indices ``y_true``; ``keep_logits`` adds the
    scaled similarities ``logits`` the probabilities are the softmax of (for temperature fitting).
    """
    captions = captions or CaptionConfig()
    class_names, prompts, logits, y_true = _labelled_logits(model, dataset, label, captions, classes, show_progress,
                                                            image_embeddings)
    captions.warn_undescribed(label, class_names)
    probabilities = logits.softmax(-1).numpy()
    metrics = classification_metrics(y_true, probabilities, class_names)
    absent = _absent_classes(class_names, y_true)
    if absent:
        metrics["classes_absent"] = absent
        log.warning("%d of the %d classes of %r have no scored record; they stay candidates: %s", len(absent),
                    len(class_names), label, ", ".join(absent[:10]))
    metrics.update(label=label, classes=class_names, chance_accuracy=_majority_rate(y_true),
                   chance_balanced_accuracy=1.0 / len(class_names),
                   prompts=dict(zip(class_names, prompts, strict=True)))
    if keep_scores:
        metrics.update(probabilities=probabilities.tolist(), y_true=y_true.tolist())
    if keep_logits:
        metrics.update(logits=logits.numpy().tolist(), y_true=y_true.tolist())
    return metrics


def _labelled_logits(model: DualEncoder, dataset: Dataset, label: str, captions: CaptionConfig,
                     classes: Sequence[str] | None, show_progress: bool, image_embeddings: torch.Tensor | None,
                     ) -> tuple[list[str], list[list[str]], torch.Tensor, np.ndarray]:
    """The classes, their prompts, and the zero-shot logits and true class indices of ``dataset``'s records
    with ``label`` (``image_embeddings``, aligned with ``dataset``, skips embedding)."""
    if image_embeddings is not None and len(image_embeddings) != len(dataset):
        raise InputError(f"{len(image_embeddings)} embeddings for {len(dataset)} records")
    keep = [i for i, r in enumerate(dataset) if label in r.labels] if label in dataset.label_names else []
    class_names = zero_shot_classes(dataset, label, classes)
    dataset = dataset.with_labels([label])
    index = {name: i for i, name in enumerate(class_names)}
    prompts = [captions.prompts(label, name, binary_finding(label, class_names)) for name in class_names]
    if image_embeddings is not None:
        embeddings = image_embeddings[keep]
    else:
        embeddings = embed_images(model, dataset, show_progress=show_progress)
    y_true = np.array([index[str(r.labels[label])] for r in dataset])
    return class_names, prompts, zero_shot_logits(model, embeddings, prompts), y_true


def _absent_classes(class_names: list[str], y_true: np.ndarray) -> list[str]:
    return [name for i, name in enumerate(class_names) if not (y_true == i).any()]


def zero_shot_calibration(model: DualEncoder, fit_set: Dataset, label: str, captions: CaptionConfig,
                          classes: Sequence[str], logits: np.ndarray, y_true: np.ndarray, show_progress: bool = True,
                          curve_points: int = 5, fit_name: str = "the calibration split") -> dict:
    """``calibration.calibration_report`` of zero-shot ``logits`` / ``y_true`` with the temperature fitted
    on ``fit_set``'s zero-shot logits for the same ``classes`` and ``captions`` (a split other than the
    scored one). Classes ``fit_set`` (named ``fit_name`` in the warning) lacks are warned about: the
    temperature is fitted without them."""
    from .calibration import calibration_report

    class_names, _, fit_logits, fit_true = _labelled_logits(model, fit_set, label, captions, classes, show_progress,
                                                            None)
    absent = _absent_classes(class_names, fit_true)
    if absent:
        log.warning("%s has no record of %d of the %d classes of %r: the temperature is fitted without them: %s",
                    fit_name, len(absent), len(class_names), label, ", ".join(absent[:10]))
    return calibration_report(fit_logits.numpy(), fit_true, logits, y_true, curve_points=curve_points)


def _majority_rate(y_true: np.ndarray) -> float:
    return float(np.bincount(y_true).max() / len(y_true))
