"""The MedMNIST recipe: train on the train split, pick the threshold on held-out data, score a split.

Recipe (documented in docs/benchmarks.md): the registered ``medmnist-small`` dual encoder is
trained with a supervised linear head on the label (cross-entropy) plus the image-text contrastive
loss on caption templates made from the class names (UniMed-CLIP style), with the settings of the
model's recipe (``medvl models --recipe medmnist-small``: what ``medvl train`` uses). Binary tasks get a
decision threshold maximising accuracy on validation data that is never the scored data:
the train file's ``val`` split when the scored data is something else, otherwise a seeded 10 %
of the train split held out from training.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from ..data.captions import CaptionConfig, load_captions
from ..data.loaders import load_dataset
from ..data.record import Dataset
from ..eval.head import class_order, class_targets, head_scores
from ..eval.metrics import classification_metrics
from ..train.recipes import RecipeSettings, caption_set, resolve_recipe, train_recipe

log = logging.getLogger(__name__)

LABEL = "label"
TEMPLATES = ["a chest x-ray showing {}.", "{}.", "an image of {}."]
# Class names of the MedMNIST v2 tasks this recipe knows (by file-name prefix), beside the tasks with
# a caption set shipped with medvl (pneumoniamnist: the medmnist-small recipe's).
SHIPPED_CAPTIONS = ("pneumoniamnist",)
KNOWN_CLASSES = {
    "breastmnist": {"0": ["malignant breast lesion"], "1": ["normal or benign breast tissue"]},
}


def run_medmnist(train_path: str | Path, test_path: str | Path, test_split: str = "test",
                 model_name: str = "medmnist-small", epochs: int | None = None, seed: int = 0,
                 out: str | Path | None = None, show_progress: bool = True) -> dict:
    """Train and score; returns a dict with top-level ``auc`` and ``acc`` (and the threshold).

    ``epochs`` None = the recipe's; the head on ``label``, its weight and the caption texts are
    always part of this benchmark, the other settings come from ``model_name``'s recipe."""
    started = time.perf_counter()
    settings = medmnist_settings(model_name, epochs, seed)
    train_all = load_dataset(train_path, label_columns=[LABEL])
    test_set = load_dataset(test_path, label_columns=[LABEL]).select(test_split)
    train_set = train_all.select("train")
    same_data = Path(train_path).resolve() == Path(test_path).resolve()
    if "val" in train_all.splits and not (same_data and test_split == "val"):
        fit_set, calib_set = train_set, train_all.select("val")
        calibration = f"{Path(train_path).name}:val"
    else:
        fit_set, calib_set = _hold_out(train_set, 0.1, seed)
        calibration = "10% of train held out"
    classes = sorted(train_set.classes(LABEL), key=class_order)
    settings.captions = task_captions(Path(train_path), classes)
    with tempfile.TemporaryDirectory(prefix="medvl-medmnist-") as scratch:
        model = train_recipe(settings, fit_set, Path(out) if out else Path(scratch), show_progress=show_progress)
    threshold = None
    if len(classes) == 2:
        threshold = _best_threshold(head_scores(model, calib_set, LABEL, show_progress),
                                    class_targets(calib_set, LABEL, classes))
    probabilities = head_scores(model, test_set, LABEL, show_progress)
    y_true = class_targets(test_set, LABEL, classes)
    metrics = classification_metrics(y_true, probabilities, classes)
    if threshold is not None:
        metrics["accuracy_argmax"] = metrics["accuracy"]
        metrics["accuracy"] = float(((probabilities[:, 1] >= threshold).astype(int) == y_true).mean())
    return {"auc": metrics["macro_auc"], "acc": metrics["accuracy"], "threshold": threshold,
            "threshold_from": calibration if threshold is not None else None,
            "train": f"{train_path}:train", "n_fit": len(fit_set), "test": f"{test_path}:{test_split}",
            "n_test": len(test_set), "model": model_name, "epochs": settings.train.epochs, "seed": seed,
            "settings": settings.to_dict(),
            "seconds": round(time.perf_counter() - started, 1), "metrics": metrics}


def medmnist_settings(model_name: str = "medmnist-small", epochs: int | None = None, seed: int = 0) -> RecipeSettings:
    """``model_name``'s recipe with the benchmark's fixed parts: a head on ``label`` (weight 1) trained
    with class captions as texts; ``epochs`` None = the recipe's."""
    return resolve_recipe(model_name, epochs=epochs, seed=seed, label_columns=[LABEL], text_source="captions",
                          supervised_weight=1.0)


def _hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(order) * fraction))
    held, kept = sorted(order[:cut]), sorted(order[cut:])
    return dataset.subset([dataset[i] for i in kept]), dataset.subset([dataset[i] for i in held])


def task_captions(path: Path, classes: list[str]) -> CaptionConfig:
    """The class captions of a known MedMNIST task (by file-name prefix), else "class N"."""
    name = path.name.lower()
    for prefix in SHIPPED_CAPTIONS:
        shipped = load_captions(caption_set(prefix))
        if name.startswith(prefix) and set(classes) <= set(shipped.classes.get(LABEL, {})):
            return shipped
    for prefix, known in KNOWN_CLASSES.items():
        if name.startswith(prefix) and set(classes) <= set(known):
            return CaptionConfig(templates=list(TEMPLATES), classes={LABEL: {c: known[c] for c in classes}})
    return CaptionConfig(templates=list(TEMPLATES), classes={LABEL: {c: [f"class {c}"] for c in classes}})


def _best_threshold(probabilities: np.ndarray, y_true: np.ndarray) -> float:
    """The positive-class threshold with the best accuracy on calibration data (midpoints)."""
    scores = np.unique(probabilities[:, 1])
    candidates = np.concatenate([[0.5], (scores[:-1] + scores[1:]) / 2]) if len(scores) > 1 else np.array([0.5])
    accuracy = [((probabilities[:, 1] >= t).astype(int) == y_true).mean() for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])
