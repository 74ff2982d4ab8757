"""Scoring a dataset with a model's supervised head (the benchmark recipes share these helpers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.record import Dataset
from ..embed import embed_images
from ..errors import InputError
from ..models.dual import DualEncoder


def class_order(name: str) -> tuple[int, int | str]:
    """Sort key for class names: numeric names ("0", "1", "10") by value first, then the rest. Numeric means
    decimal digits only (what ``int`` reads): "²" or "①" are digits to ``str.isdigit`` but not numbers, and sort
    as text."""
    return (0, int(name)) if name.isdecimal() else (1, name)


def head_scores(model: DualEncoder, dataset: Dataset, label: str, show_progress: bool = True) -> np.ndarray:
    """(N, K) class probabilities of the model's head for ``label`` on every record, in order."""
    features = embed_images(model, dataset, features=True, show_progress=show_progress)
    return model.head_probabilities(label, features).numpy()


def class_targets(dataset: Dataset, label: str, classes: Sequence[str]) -> np.ndarray:
    """Index into ``classes`` of each record's ``label`` value; InputError for a class not listed."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = {str(r.labels[label]) for r in dataset} - set(index)
    if unknown:
        raise InputError(f"{dataset.source}: classes {sorted(unknown)} were not in the training data")
    return np.array([index[str(r.labels[label])] for r in dataset])
