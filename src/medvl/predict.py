"""Zero-shot prediction for individual image files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .data import CaptionConfig, captions_for
from .data.audit import input_flags, warn_without_content
from .data.captions import binary_finding
from .errors import InputError
from .eval.ood import warn_flagged
from .eval.zero_shot import zero_shot_probabilities
from .models.dual import DualEncoder
from .models.ood import embed_checked
from .models.registry import load_model

# the most distinct labels a prediction or an explanation is asked to choose among (``medvl predict``, ``medvl
# explain``, /v1/zero-shot, /v1/explain alike): each is a prompt ensemble through the text tower, and a softmax over
# more classes than a reader can weigh answers nothing (a model's own caption classes, asked for by giving none, are
# not limited)
MAX_LABELS = 64


def predict(model: DualEncoder | str | Path, images: Sequence[str | Path], class_names: Sequence[str],
            label_column: str | None = None, captions: CaptionConfig | str | Path | None = None,
            backend: str = "torch", batch_size: int = 64) -> list[dict]:
    """The answer for each image (``predict_answers``'s ``predictions``)."""
    return predict_answers(model, images, class_names, label_column, captions, backend, batch_size)["predictions"]


def predict_answers(model: DualEncoder | str | Path, images: Sequence[str | Path], class_names: Sequence[str],
                    label_column: str | None = None, captions: CaptionConfig | str | Path | None = None,
                    backend: str = "torch", batch_size: int = 64) -> dict:
    """``predictions``, for each image in order: its file name (``image``: the last path component only, as
    ``medvl.index.describe_target`` names files: the folders above may name a patient), the most likely class
    among ``class_names``, every class's probability, and ``input_flags``: whether the image is blank or streaked
    as the model sees it (flag -> reason, ``medvl.data.audit.input_flags``; {} for an image with content: an answer
    on a flagged one means nothing, and a warning says how many there were); when the model has an OOD guard, also
    ``ood_score`` / ``out_of_distribution`` (answers for images unlike the training images are
    unreliable; a warning says how many there were).

    Class descriptions come from ``captions`` (a config or a file), else from the captions the
    model was trained with; ``label_column`` picks which column's descriptions apply (default: the
    first column that describes every requested class; one the captions do not describe is refused).
    ``backend``: see ``load_model`` (model paths only). Images are read ``batch_size`` at a time.

    Beside them, as the service's /v1/zero-shot answers: ``model`` (the model's config name, never its path: the
    folders above may name a patient), ``label_column`` (the column whose descriptions were used; None for the
    generic templates) and ``warnings`` (``prompt_warnings``: classes answered from their bare names).
    """
    class_names = check_class_names(class_names)
    if not images:
        raise InputError("no images given")
    net = model if isinstance(model, DualEncoder) else load_model(model, backend=backend)
    column, prompts = class_prompts(net, class_names, label_column, captions)
    results, guarded = [], []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        pixels = net.preprocessor.load_many(chunk)  # read once: checked as the model sees it, then encoded
        embeddings, flags = embed_checked(net, pixels)  # the guard's flags (if any) from the same pass
        probabilities = zero_shot_probabilities(net, embeddings, prompts)
        for path, row, flag, image in zip(chunk, probabilities, flags, pixels, strict=True):
            scores = {name: float(p) for name, p in zip(class_names, row, strict=True)}
            results.append({"image": Path(path).name, "prediction": max(scores.items(), key=lambda item: item[1])[0],
                            "probabilities": scores, "input_flags": input_flags(image.numpy()), **flag})
            guarded += [flag] if flag else []
    warn_flagged(guarded, "images")
    warn_without_content([row["input_flags"] for row in results], "images")
    return {"model": net.config.name, "predictions": results, "label_column": column or None,
            "warnings": prompt_warnings(net, class_names, column, captions)}


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """The distinct class names, in order (a repeated name is one class, not two in the softmax); InputError
    for fewer than 2 or more than ``MAX_LABELS`` (the service's /v1/zero-shot refuses with the same words)."""
    distinct = check_label_count(class_names)
    if len(distinct) < 2:
        raise InputError(f"need at least 2 distinct labels, got {distinct}")
    return distinct


def check_label_count(labels: Sequence[str]) -> list[str]:
    """The distinct ``labels``, in order; InputError for more than ``MAX_LABELS`` of them (not echoed: a long list)."""
    distinct = list(dict.fromkeys(labels))
    if len(distinct) > MAX_LABELS:
        raise InputError(f"at most {MAX_LABELS} labels, got {len(distinct)}")
    return distinct


def checked_label_column(label_column: str | None) -> str | None:
    """``label_column`` checked: None is the default column; an empty or blank name is an InputError, the same in
    ``predict``, ``explain`` and the service (whose form treats an empty field as one left out, as browsers send
    it), never taken for the default nor looked up as a column named ``' '``."""
    if label_column is not None and not label_column.strip():
        raise InputError("label column: empty column name (leave it out for the default)")
    return label_column


def class_prompts(net: DualEncoder, class_names: Sequence[str], label_column: str | None = None,
                  captions: CaptionConfig | str | Path | None = None,
                  described_only: bool = True) -> tuple[str, list[list[str]]]:
    """The label column whose descriptions apply and each class's prompt ensemble (see ``predict``).

    A ``label_column`` the captions do not describe is an unknown label column (InputError) when they
    describe any; ``described_only=False`` lets a dataset's own column fall back to the class names."""
    config = captions_for(None, captions, net)
    label_column = checked_label_column(label_column)
    if label_column and described_only:
        config.check_column(label_column)
    column = label_column or caption_column_for(config, class_names)
    config.warn_undescribed(column, class_names)
    prompts = [config.prompts(column, name, binary_finding(column, class_names)) for name in class_names]
    if described_only:
        check_classes_read_apart(net, class_names, prompts)
    return column, prompts


def check_classes_read_apart(net: DualEncoder, class_names: Sequence[str], prompts: list[list[str]]) -> None:
    """InputError when two classes' prompts are the same tokens to the model's text tower ("cardiomegaly" and
    "Cardiomegaly" to a lower-casing tokenizer): one embedding for both, whose probability the softmax would split
    between them whatever the image."""
    seen: dict[tuple, str] = {}
    for name, ensemble in zip(class_names, prompts, strict=True):
        tokens = tuple(net.text_tokens(list(ensemble)))
        if tokens in seen:
            raise InputError(f"labels {seen[tokens]!r} and {name!r} read as the same text to the model (its tokenizer "
                             "ignores what tells them apart): give one of them")
        seen[tokens] = name


def prompt_warnings(net: DualEncoder, class_names: Sequence[str], column: str,
                    captions: CaptionConfig | str | Path | None = None) -> list[str]:
    """The warning ``class_prompts`` logs about a label set's prompts (bare class names: no label column describes
    them), as a list for an answer to carry (the service's ``warnings``); empty when every class is described."""
    warning = captions_for(None, captions, net).undescribed_warning(column, class_names)
    return [warning] if warning else []


def caption_column_for(config: CaptionConfig, class_names: Sequence[str]) -> str:
    """The first label column whose class descriptions cover every requested class ("" for none:
    the generic templates apply)."""
    for column, per_class in config.classes.items():
        if set(class_names) <= set(per_class):
            return column
    return ""
