"""Zero-shot prediction for individual image files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .data import CaptionConfig, captions_for
from .errors import InputError
from .eval.zero_shot import zero_shot_probabilities
from .models.dual import DualEncoder
from .models.registry import load_model


def predict(model: DualEncoder | str | Path, images: Sequence[str | Path], class_names: Sequence[str],
            label_column: str | None = None, captions: CaptionConfig | str | Path | None = None,
            backend: str = "torch") -> list[dict]:
    """For each image: the most likely class among ``class_names`` and every class's probability.

    Class descriptions come from ``captions`` (a config or a file), else from the captions the
    model was trained with; ``label_column`` picks which column's descriptions apply (default: the
    first column that describes every requested class). ``backend``: see ``load_model`` (model paths only).
    """
    if len(set(class_names)) < 2:
        raise InputError(f"need at least 2 distinct labels, got {list(class_names)}")
    if not images:
        raise InputError("no images given")
    net = model if isinstance(model, DualEncoder) else load_model(model, backend=backend)
    _, prompts = class_prompts(net, class_names, label_column, captions)
    probabilities = zero_shot_probabilities(net, net.encode_images(list(images)), prompts)
    results = []
    for path, row in zip(images, probabilities, strict=True):
        scores = {name: float(p) for name, p in zip(class_names, row, strict=True)}
        results.append({"image": str(path), "prediction": max(scores.items(), key=lambda item: item[1])[0],
                        "probabilities": scores})
    return results


def class_prompts(net: DualEncoder, class_names: Sequence[str], label_column: str | None = None,
                  captions: CaptionConfig | str | Path | None = None) -> tuple[str, list[list[str]]]:
    """The label column whose descriptions apply and each class's prompt ensemble (see ``predict``)."""
    config = captions_for(None, captions, net)
    column = label_column or caption_column_for(config, class_names)
    return column, [config.prompts(column, name) for name in class_names]


def caption_column_for(config: CaptionConfig, class_names: Sequence[str]) -> str:
    """The first label column whose class descriptions cover every requested class ("" for none:
    the generic templates apply)."""
    for column, per_class in config.classes.items():
        if set(class_names) <= set(per_class):
            return column
    return ""
