"""The MedMNIST recipe: train on the train split, pick the threshold on held-out data, score a split.

Recipe (documented in docs/benchmarks.md): the registered ``medmnist-small`` dual encoder is
trained with a supervised linear head on the label (cross-entropy) plus the image-text contrastive
loss on caption templates made from the class names (UniMed-CLIP style). Binary tasks get a
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

from ..checks import check_number
from ..data.captions import CaptionConfig
from ..data.loaders import load_dataset
from ..data.record import Dataset
from ..eval.head import class_order, class_targets, head_scores
from ..eval.metrics import classification_metrics
from ..models.registry import create_model
from ..train.loop import TrainConfig, seed_everything, train

log = logging.getLogger(__name__)

LABEL = "label"
# Class names of the MedMNIST v2 tasks this recipe knows (by file-name prefix).
KNOWN_CLASSES = {
    "pneumoniamnist": {"0": ["normal chest x-ray", "clear lungs without pneumonia"],
                       "1": ["pneumonia", "chest x-ray with pneumonia and airspace opacity"]},
    "breastmnist": {"0": ["malignant breast lesion"], "1": ["normal or benign breast tissue"]},
}


def run_medmnist(train_path: str | Path, test_path: str | Path, test_split: str = "test",
                 model_name: str = "medmnist-small", epochs: int = 30, seed: int = 0,
                 out: str | Path | None = None, show_progress: bool = True) -> dict:
    """Train and score; returns a dict with top-level ``auc`` and ``acc`` (and the threshold)."""
    started = time.perf_counter()
    check_number("epochs", epochs, minimum=1, integer=True)
    check_number("seed", seed, minimum=0, integer=True)
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
    captions = CaptionConfig(templates=["a chest x-ray showing {}.", "{}.", "an image of {}."],
                             classes={LABEL: _descriptions(Path(train_path), classes)})
    seed_everything(seed)
    model = create_model(model_name)
    model.add_head(LABEL, classes)
    config = TrainConfig(epochs=epochs, batch_size=128, lr=2e-3, seed=seed, text_source="captions",
                         label_columns=[LABEL], supervised_weight=1.0, contrastive_weight=0.5,
                         log_every=20)
    with tempfile.TemporaryDirectory(prefix="medvl-medmnist-") as scratch:
        model = train(model, fit_set, config, Path(out) if out else Path(scratch),
                      captions=captions, show_progress=show_progress)
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
            "n_test": len(test_set), "model": model_name, "epochs": epochs, "seed": seed,
            "seconds": round(time.perf_counter() - started, 1), "metrics": metrics}


def _hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(len(order) * fraction))
    held, kept = sorted(order[:cut]), sorted(order[cut:])
    return dataset.subset([dataset[i] for i in kept]), dataset.subset([dataset[i] for i in held])


def _descriptions(path: Path, classes: list[str]) -> dict[str, list[str]]:
    for prefix, known in KNOWN_CLASSES.items():
        if path.name.lower().startswith(prefix) and set(classes) <= set(known):
            return {c: known[c] for c in classes}
    return {c: [f"class {c}"] for c in classes}


def _best_threshold(probabilities: np.ndarray, y_true: np.ndarray) -> float:
    """The positive-class threshold with the best accuracy on calibration data (midpoints)."""
    scores = np.unique(probabilities[:, 1])
    candidates = np.concatenate([[0.5], (scores[:-1] + scores[1:]) / 2]) if len(scores) > 1 else np.array([0.5])
    accuracy = [((probabilities[:, 1] >= t).astype(int) == y_true).mean() for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])
