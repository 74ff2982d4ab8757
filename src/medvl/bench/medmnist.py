"""The MedMNIST recipe: train on the train split, pick the threshold on held-out data, score a split.

Recipe (documented in docs/benchmarks.md): the registered ``medmnist-small`` dual encoder is
trained with a supervised linear head on the label (cross-entropy) plus the image-text contrastive
loss on caption templates made from the class names (UniMed-CLIP style), with the settings of the
model's recipe (``medvl models --recipe medmnist-small``: what ``medvl train`` uses). The recipe also
says how the benchmark scores: ``ensemble`` members (seeds seed, seed + 1, ...) whose head
probabilities are averaged over the plain image and the recipe's ``test_time_views`` (small shifts
and scales; never flips, laterality matters on a chest X-ray), and the ``operating_point``: the
binary decision threshold behind the headline accuracy, picked on validation data that is never the
scored data (the train file's ``val`` split when the scored data is something else, otherwise a
seeded 10 % of the train split held out from training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import check_number
from ..data.captions import CaptionConfig, load_captions
from ..data.loaders import load_dataset
from ..data.loading import image_sources
from ..data.record import ALL_SPLITS, Dataset
from ..errors import InputError
from ..eval.bootstrap import bootstrap_ci, bootstrap_draws, every_class_draws, percentile_interval
from ..eval.contamination import copies_in_fit
from ..eval.head import class_order, class_targets
from ..eval.metrics import classification_metrics
from ..eval.robustness import CORRUPTIONS, PARAMETERS, check_corruption, corrupt
from ..eval.subgroups import DRAWS, macro_auc
from ..io import RUN_OWN_ENTRIES, replace_dir, staged_for, write_errors_named
from ..models.dual import DualEncoder
from ..models.preprocess import affine_warp, read_for
from ..progress import progress_bar
from ..train.recipes import (
    BENCHMARK_FIXED,
    RecipeSettings,
    caption_set,
    merge_train_options,
    resolve_recipe,
    train_recipe,
)

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
                 out: str | Path | None = None, show_progress: bool = True,
                 target_prior: float | None = None, bootstrap: int | None = None, ensemble: int | None = None,
                 test_time_augmentation: bool | None = None, operating_point: str | None = None,
                 model_overrides: dict[str, Any] | None = None, label_smoothing: float | None = None,
                 shifts: list[int] | None = None, train_options: dict[str, Any] | None = None,
                 overwrite: bool = False) -> dict:
    """Train and score; returns a dict with top-level ``auc`` and ``acc`` (and the threshold).

    ``epochs``, ``ensemble``, ``operating_point`` None = the recipe's; ``test_time_augmentation``
    None = the recipe's views, False = the plain image only. The head on ``label``, its weight and
    the caption texts are always part of this benchmark. A binary task's ``acc`` uses the threshold of
    the operating point; with ``target_prior`` (the share of positives expected where the model is
    used), ``operating_points`` scores every threshold with ``bootstrap`` resamples (None = 2000; given without
    ``target_prior`` an InputError, as nothing would use it) (``operating_points()``). ``out`` keeps the trained
    model (``out/member-N`` for an ensemble): a new or empty
    folder, or with ``overwrite`` an earlier run's (``check_out_folder``), written only once the whole run has
    succeeded (a failure leaves ``out`` as it was). The scored and threshold splits' classes and image shapes are
    checked before any training (``check_scored_data``). ``target_prior`` and an ``operating_point`` apply to
    binary tasks: given for a task of more classes they are an InputError.
    With more than one member, ``members`` holds each member's own figures, scored the same way
    (``shifted`` included).
    ``model_overrides`` (``--set``), ``label_smoothing`` and ``train_options`` (any other ``TrainConfig``
    field, ``--train-set``) replace the recipe's. ``shifts`` (corruption
    severities, e.g. [1, 2, 3]) adds ``shifted``: the scored split again under every corruption of
    ``medvl.eval.robustness`` at those severities (``shifted_scores``), a robustness check for a test split
    drawn apart from the training data. ``copies_in_fit`` counts the scored images that are byte-for-byte copies of
    training images (``benchmark_data``: refused when they are most of them) and ``flags`` says so (``copies_flag``).
    """
    started = time.perf_counter()
    settings = medmnist_settings(model_name, epochs, seed, ensemble=ensemble, operating_point=operating_point,
                                 test_time_views=[] if test_time_augmentation is False else None,
                                 model_overrides=model_overrides, label_smoothing=label_smoothing,
                                 train_options=train_options)
    for severity in shifts or []:
        check_corruption(CORRUPTIONS[0], severity)
    if target_prior is not None:
        _check_prior(target_prior)  # before any training
    elif settings.operating_point == "max_accuracy_at_prior":
        raise InputError("the operating point max_accuracy_at_prior needs --target-prior")
    if bootstrap is None:
        bootstrap = 2000
    elif target_prior is None:
        raise InputError("--bootstrap (resamples for the --target-prior intervals) needs --target-prior")
    check_number("bootstrap resamples", bootstrap, minimum=100, integer=True)
    check_out_folder(out, overwrite)
    data = benchmark_data(train_path, test_path, test_split, seed)
    _check_binary_options(data, train_path, target_prior, operating_point)
    check_scored_data(data, settings, f"{test_path}:{test_split}", f"{train_path}:train")
    settings.captions = task_captions(Path(train_path), data.classes)

    def score(scored: list[DualEncoder]) -> dict:
        scores = score_models(scored, data, settings.test_time_views, settings.operating_point, target_prior,
                              bootstrap, seed, show_progress)
        return {**scores, "shifted": shifted_scores(scored, data, settings.test_time_views, scores["threshold"],
                                                    shifts, seed, show_progress) if shifts else None}

    with _staged(out) as folder:  # --out gets the models only once every figure is computed
        models = train_members(settings, data.fit, folder, show_progress)
        members = []
        if len(models) > 1:  # each member alone, scored as the ensemble is: the spread across seeds
            members = [{"seed": settings.train.seed + i, **score([member])} for i, member in enumerate(models)]
        scores = score(models)
    return {**scores, "members": members,
            "train": f"{train_path}:train", "n_fit": len(data.fit), "test": f"{test_path}:{test_split}",
            "n_test": len(data.test), **({"copies_in_fit": data.copies_in_fit} if data.copies_in_fit else {}),
            "flags": copies_flag(data.copies_in_fit),
            "model": model_name, "epochs": settings.train.epochs, "seed": seed,
            "ensemble": settings.ensemble, "test_time_views": len(settings.test_time_views),
            "settings": settings.to_dict(),
            "seconds": round(time.perf_counter() - started, 1)}


@dataclasses.dataclass
class BenchmarkData:
    """The records of one benchmark run: trained on ``fit``, threshold chosen on ``calibration``
    (described by ``calibration_name``), scored on ``test``."""

    fit: Dataset
    calibration: Dataset
    calibration_name: str
    test: Dataset
    classes: list[str]
    copies_in_fit: dict | None = None  # scored images that are byte-for-byte copies of training images


def benchmark_data(train_path: str | Path, test_path: str | Path, test_split: str, seed: int) -> BenchmarkData:
    """The train file's ``train`` split to fit on; the threshold data is its ``val`` split unless that is
    the scored split (the same file, or most of the scored images copied in it), else a seeded 10 % of
    ``train`` held out from training. Scored images that are byte-for-byte copies of training images (a copy of the
    train file under another name, one image filed in two splits) are counted (``copies_in_fit``), and refused
    (InputError) when they are most of the scored split, as the train file's own train split is."""
    same_data = Path(train_path).resolve() == Path(test_path).resolve()
    if same_data and test_split in ("train", ALL_SPLITS):  # the models would be scored on their training images
        raise InputError(f"--test-data {test_path} --test-split {test_split} holds the training images "
                         f"(--train-data is the same file and trains on its train split); score val or test")
    train_all = load_dataset(train_path, label_columns=[LABEL])
    test_set = load_dataset(test_path, label_columns=[LABEL]).select(test_split)
    train_set = train_all.select("train")
    if "val" in train_all.splits and not (same_data and test_split == "val") \
            and not _mostly_the_same(train_all.select("val"), test_set):
        fit_set, calib_set = train_set, train_all.select("val")
        calibration = f"{Path(train_path).name}:val"
    else:
        fit_set, calib_set = _hold_out(train_set, 0.1, seed)
        calibration = "10% of train held out"
    classes = sorted(train_set.classes(LABEL), key=class_order)
    held = sorted(set(calib_set.classes(LABEL)), key=class_order)
    if len(classes) == 2 and held != classes:  # a threshold cannot be chosen on one class (found after training)
        raise InputError(f"the threshold data ({calibration}) holds only class(es) {held} of {classes}: a binary "
                         "task's threshold is chosen on both; give a train file whose val split holds both")
    copies = copies_in_fit(fit_set, test_set, f"the training split ({Path(train_path).name}:train)")
    if copies and 2 * copies["records"] > copies["of"]:  # as the same file's train split, under another name
        raise InputError(f"--test-data {test_path} --test-split {test_split}: {copies['records']} of "
                         f"{copies['of']} scored images are byte-for-byte copies of images in {copies['fit']} (a copy "
                         "of the training data?): the figures would be training figures; score other images")
    return BenchmarkData(fit_set, calib_set, calibration, test_set, classes, copies)


def copies_flag(copies: dict[str, Any] | None) -> list[str]:
    """The run's flags (``flags`` of its result, as ``bench run``'s ``leak`` flags): scored images that are
    byte-for-byte copies of training images (``copies_in_fit``; refused when they are most of the split)."""
    if not copies:
        return []
    return [f"leak: {copies['records']} of {copies['of']} scored images are byte-for-byte copies of images in "
            f"{copies['fit']}: on them the figures measure what was trained on, not generalisation"]


def check_out_folder(out: str | Path | None, overwrite: bool = False) -> None:
    """``--out`` must be new or empty; with ``overwrite`` it may hold an earlier run's models (a training run's
    entries, or ``member-N`` folders), replaced once the new run has succeeded. Anything else is refused
    (InputError) before any work: the folder is replaced as a whole, so it is never one holding other files."""
    if out is None:
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: --out is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    earlier = all(entry.name in RUN_OWN_ENTRIES or (entry.is_dir() and entry.name.startswith("member-"))
                  for entry in out.iterdir())
    if not overwrite:
        raise InputError(f"{out}: --out exists and is not empty; choose a new --out"
                         + (", or --overwrite to replace the models there" if earlier else ""))
    if not earlier:
        raise InputError(f"{out}: --out holds files that are not a bench medmnist output (its models); "
                         "--overwrite replaces only an earlier run's folder; choose a new --out")


@contextlib.contextmanager
def _staged(out: str | Path | None) -> Iterator[Path | None]:
    """A staging folder beside ``out`` renamed onto it when the block succeeds (removed on failure); None
    without ``out`` (the models go to a scratch folder)."""
    if out is None:
        yield None
        return
    target = Path(out).absolute()
    with write_errors_named(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_for(target, target.parent, f".{target.name}.tmp-") as staging:
            yield staging
            replace_dir(staging, target)


def check_scored_data(data: BenchmarkData, settings: RecipeSettings, test_name: str, train_name: str) -> None:
    """Before any training (InputError / DataError): the scored split holds two classes or more (the AUC, the
    headline, is undefined on one); every class of the scored and the threshold split is one the training split
    has; their images are scaled to [0, 1] as the training images are (``intensity_scaling``: uint8 pixels and the
    same values stored as float32 reach the model as other inputs), and they are read as the model will read them
    (one image of each array shape and type, named by file and record)."""
    from ..models.registry import resolve_model

    present = sorted(data.test.classes(LABEL), key=class_order)
    if len(present) == 1:
        raise InputError(f"{test_name} holds one class of {LABEL!r} ({present[0]}); its AUC is undefined "
                         "(score a split with two classes or more)")
    for name, dataset in ((test_name, data.test), (data.calibration_name, data.calibration)):
        unknown = sorted(set(dataset.classes(LABEL)) - set(data.classes), key=class_order)
        if unknown:
            raise InputError(f"{name}: classes {unknown} were not in the training data ({train_name} holds "
                             f"{data.classes})")
    preprocessor = resolve_model(settings.model, **settings.model_overrides).preprocessor
    trained = {preprocessor.intensity_scaling(image): image.dtype for image in _array_kinds(data.fit).values()}
    for name, dataset in ((test_name, data.test), (data.calibration_name, data.calibration)):
        for source, image in _array_kinds(dataset).items():
            scaling = preprocessor.intensity_scaling(image)
            if trained and scaling not in trained:
                train_scaling, train_dtype = next(iter(trained.items()))
                raise InputError(f"{name}: images are {image.dtype} ({scaling}), but the training images "
                                 f"({train_name}) are {train_dtype} ({train_scaling}): the model would see them scaled "
                                 f"otherwise than it was trained; store the scored images as {train_dtype}")
            preprocessor.load(image, source=source)


def _array_kinds(dataset: Dataset) -> dict[str, np.ndarray]:
    """One in-memory image of each array shape and dtype in ``dataset`` (images given as files are read
    later), keyed by what an error names it by (its file and record)."""
    seen: set[tuple] = set()
    kinds: dict[str, np.ndarray] = {}
    for record, source in zip(dataset.records, image_sources(dataset), strict=True):
        image = record.image
        if isinstance(image, np.ndarray) and (image.shape, image.dtype.str) not in seen:
            seen.add((image.shape, image.dtype.str))
            kinds[str(source)] = image
    return kinds


def _check_binary_options(data: BenchmarkData, train_path: str | Path, target_prior: float | None,
                          operating_point: str | None) -> None:
    """--target-prior and --operating-point choose a binary task's threshold: refused (InputError) for a task of
    more classes, where nothing would use them."""
    if len(data.classes) == 2:
        return
    for option, value in (("--target-prior", target_prior), ("--operating-point", operating_point)):
        if value is not None:
            raise InputError(f"{option} applies to binary tasks; {train_path} has {len(data.classes)} classes "
                             f"({', '.join(data.classes)}), scored by the argmax")


def _mostly_the_same(calibration: Any, scored: Any) -> bool:
    """The train file's ``val`` holds (copies of) most of the scored images, under another path (a copy of the train
    file given as --test-data): a threshold chosen on it would be tuned on the scored split. Said, and the caller
    holds out 10 % of train instead."""
    shared = calibration.shared_images(scored) + calibration.copied_images(scored)
    if 2 * shared <= len(scored):
        return False
    log.warning("%d of the %d scored images are in the train file's val split (a copy of the same data?): the "
                "threshold is chosen on 10%% of train held out instead", shared, len(scored))
    return True


def score_models(models: list[DualEncoder], data: BenchmarkData, views: list[list[float]], operating_point: str,
                 target_prior: float | None = None, bootstrap: int = 2000, seed: int = 0,
                 show_progress: bool = True) -> dict:
    """AUC and ACC of ``models``' averaged head probabilities (``ensemble_scores``) on ``data.test``; a
    binary task's ACC at the ``operating_point`` threshold chosen on ``data.calibration``, and with
    ``target_prior`` every threshold scored with ``bootstrap`` resamples (``operating_points``). For a binary
    task every figure of ``metrics`` (accuracy, balanced accuracy, confusion matrix, per-class precision,
    recall and F1) is at that threshold, the argmax ones under ``*_argmax``."""
    threshold, points = None, None
    probabilities = ensemble_scores(models, data.test, LABEL, views, show_progress)
    y_true = class_targets(data.test, LABEL, data.classes)
    metrics = classification_metrics(y_true, probabilities, data.classes)
    if len(data.classes) == 2:
        calibration_scores = ensemble_scores(models, data.calibration, LABEL, views, show_progress)
        calibration_y = class_targets(data.calibration, LABEL, data.classes)
        threshold = _best_threshold(calibration_scores, calibration_y, _threshold_prior(operating_point, target_prior))
        # every figure of ``metrics`` at the operating threshold, the argmax ones kept under ``*_argmax`` (only the
        # accuracy used to be thresholded: beside it the balanced accuracy and the confusion matrix were the argmax's)
        predicted = (probabilities[:, 1] >= threshold).astype(int)
        at_threshold = classification_metrics(y_true, np.eye(2)[predicted], data.classes)
        for key in ("accuracy", "balanced_accuracy", "confusion_matrix"):
            metrics[f"{key}_argmax"] = metrics[key]
            metrics[key] = at_threshold[key]
        for name, row in metrics["per_class"].items():  # precision / recall / F1 at the threshold, AUC as scored
            metrics.setdefault("per_class_argmax", {})[name] = dict(row)
            row.update({key: at_threshold["per_class"][name][key] for key in ("precision", "recall", "f1")})
        if target_prior is not None:
            points = operating_points(calibration_scores, calibration_y, probabilities, y_true, target_prior,
                                      resamples=bootstrap, seed=seed)
    return {"auc": metrics["macro_auc"], "acc": metrics["accuracy"], "threshold": threshold,
            "operating_point": operating_point if threshold is not None else None, "operating_points": points,
            "threshold_from": data.calibration_name if threshold is not None else None, "metrics": metrics}


def shifted_scores(models: list[DualEncoder], data: BenchmarkData, views: list[list[float]],
                   threshold: float | None, severities: list[int], seed: int = 0, show_progress: bool = True) -> dict:
    """``models`` on ``data.test`` under every corruption kind at each of ``severities``.

    Each image is corrupted in memory (``medvl.eval.robustness.corrupt``, seeded per record) and scored
    as the clean split is (ensemble, test-time ``views``), with the ``threshold`` chosen on clean
    calibration data, as a deployed model would be. Returns ``severities``, ``parameters`` (each kind's
    parameter at those severities), ``auc`` and (binary tasks) ``balanced_accuracy`` per kind (a list
    over the severities), their means over every condition (``mean_auc``, ``mean_balanced_accuracy``),
    ``worst``: the kind and severity with the lowest AUC, and ``unchanged``: the [kind, severity] conditions that
    leave every image as it was (blur of 0.005 x 28 px rounds away in 8 bits), said with a warning.
    """
    images = [read_for(models[0], r.image) for r in data.test]
    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(len(images))]
    y_true = class_targets(data.test, LABEL, data.classes)
    auc: dict[str, list[float]] = {}
    balanced: dict[str, list[float]] = {}
    unchanged: list[list[Any]] = []
    with progress_bar("Shifted copies", total=len(CORRUPTIONS) * len(severities), enabled=show_progress) as advance:
        for kind in CORRUPTIONS:
            for severity in severities:
                corrupted = [corrupt(image, kind, severity, s) for image, s in zip(images, seeds, strict=True)]
                if all(np.array_equal(after, before) for after, before in zip(corrupted, images, strict=True)):
                    unchanged.append([kind, severity])  # e.g. blur of 0.14 px on a 28 px image: the clean split
                shifted = data.test.subset([dataclasses.replace(r, images=[image])
                                            for r, image in zip(data.test, corrupted, strict=True)])
                probabilities = ensemble_scores(models, shifted, LABEL, views, show_progress=False)
                metrics = classification_metrics(y_true, probabilities, data.classes)
                auc.setdefault(kind, []).append(metrics["macro_auc"])
                if threshold is not None:
                    predicted = (probabilities[:, 1] >= threshold).astype(int)
                    balanced.setdefault(kind, []).append(prior_weighted_accuracy(y_true, predicted, 0.5))
                advance(1)
    conditions = [(kind, severity, value) for kind, values in auc.items()
                  for severity, value in zip(severities, values, strict=True)]
    worst = min(conditions, key=lambda condition: condition[2])
    if unchanged:
        log.warning("%d of the %d shifted conditions leave every image unchanged (%s): they score as the clean "
                    "split and count so in the means", len(unchanged), len(conditions),
                    ", ".join(f"{kind} {severity}" for kind, severity in unchanged))
    return {"severities": list(severities),
            "parameters": {kind: {"name": PARAMETERS[kind][0],
                                  "values": [PARAMETERS[kind][1][s - 1] for s in severities]} for kind in auc},
            "auc": auc, "balanced_accuracy": balanced or None,
            "mean_auc": float(np.mean([value for _, _, value in conditions])),
            "mean_balanced_accuracy": float(np.mean([v for values in balanced.values() for v in values]))
            if balanced else None,
            "worst": {"kind": worst[0], "severity": worst[1], "auc": worst[2]}, "unchanged": unchanged}


def medmnist_settings(model_name: str = "medmnist-small", epochs: int | None = None, seed: int = 0,
                      label_smoothing: float | None = None, train_options: dict[str, Any] | None = None,
                      **benchmark: Any) -> RecipeSettings:
    """``model_name``'s recipe with the benchmark's fixed parts: a head on ``label`` (weight 1) trained
    with class captions as texts; ``epochs`` and ``label_smoothing`` None = the recipe's; ``train_options``
    any other ``TrainConfig`` field; ``benchmark``: ``ensemble``, ``test_time_views``, ``operating_point``,
    ``model_overrides`` (None = the recipe's)."""
    options = merge_train_options({"epochs": epochs, "label_smoothing": label_smoothing}, train_options or {},
                                  fixed=BENCHMARK_FIXED)
    return resolve_recipe(model_name, seed=seed, label_columns=[LABEL], text_source="captions",
                          supervised_weight=1.0, **benchmark, **options)


def train_members(settings: RecipeSettings, fit_set: Dataset, out: str | Path | None,
                  show_progress: bool = True) -> list[DualEncoder]:
    """The ensemble: member i trained with seed ``settings.train.seed + i`` (into ``out``, or
    ``out/member-i`` for more than one member; a scratch folder without ``out``)."""
    models = []
    with tempfile.TemporaryDirectory(prefix="medvl-medmnist-") as scratch:
        root = Path(out) if out else Path(scratch)
        for member in range(settings.ensemble):
            train_config = dataclasses.replace(settings.train, seed=settings.train.seed + member)
            folder = root if settings.ensemble == 1 else root / f"member-{member}"
            if settings.ensemble > 1:
                log.info("ensemble member %d of %d (seed %d)", member + 1, settings.ensemble, train_config.seed)
            models.append(train_recipe(dataclasses.replace(settings, train=train_config), fit_set, folder,
                                       show_progress=show_progress))
    return models


def ensemble_scores(models: list[DualEncoder], dataset: Dataset, label: str, views: list[list[float]],
                    show_progress: bool = True, chunk: int = 512) -> np.ndarray:
    """(N, K) head probabilities for ``label`` averaged over the models and over the plain image plus
    each test-time view (``view_pixels``); images are read ``chunk`` records at a time."""
    all_views = [[0.0, 0.0, 1.0], *views]
    chunks = []
    sources = image_sources(dataset)  # an array image's error names its file and record
    with progress_bar("Scoring images", total=len(dataset), enabled=show_progress) as advance:
        for start in range(0, len(dataset), chunk):
            records = dataset.records[start:start + chunk]
            pixels = models[0].preprocessor.load_many([r.image for r in records], sources[start:start + chunk])
            scores = [model.head_probabilities(label, model.encode_images(view_pixels(pixels, view), features=True))
                      for model in models for view in all_views]
            chunks.append(torch.stack(scores).mean(0))
            advance(len(records))
    return torch.cat(chunks).numpy() if chunks else np.empty((0, 0))


def view_pixels(pixels: torch.Tensor, view: list[float]) -> torch.Tensor:
    """A (N, C, H, W) batch shifted by ``view[0]``, ``view[1]`` of the image side (x right, y down)
    and scaled by ``view[2]`` about the centre (> 1 enlarges), bilinear with border padding; the
    identity view returns ``pixels`` unchanged."""
    shift_x, shift_y, scale = view
    if (shift_x, shift_y, scale) == (0.0, 0.0, 1.0):
        return pixels
    # affine_grid maps output to input positions in [-1, 1] (a side spans 2): input = (output - 2 shift) / scale
    theta = torch.tensor([[1 / scale, 0.0, -2 * shift_x / scale], [0.0, 1 / scale, -2 * shift_y / scale]],
                         dtype=pixels.dtype).expand(len(pixels), 2, 3)
    return affine_warp(pixels, theta)


def _threshold_prior(operating_point: str, target_prior: float | None) -> float | None:
    """The class mix a threshold is chosen for: None = the calibration data's own."""
    return {"max_accuracy": None, "max_balanced_accuracy": 0.5, "max_accuracy_at_prior": target_prior}[operating_point]


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


def _best_threshold(probabilities: np.ndarray, y_true: np.ndarray, prior: float | None = None) -> float:
    """The positive-class threshold with the best accuracy on calibration data; with ``prior``, the best accuracy
    once the calibration data are re-weighted to that share of positives (``prior`` 0.5: the best balanced
    accuracy). Candidates: 0.5, the midpoints between consecutive distinct scores, and the two ends: at or below
    the lowest score (0, or the lowest score if negative: every record positive) and just above the highest
    (above 1 for a score of 1: none), which at a skewed prior or for badly scaled scores can be the best; on a
    tie the earlier candidate is kept."""
    scores = np.unique(probabilities[:, 1])
    ends = [min(0.0, scores[0]), np.nextafter(max(1.0, scores[-1]), np.inf)]
    candidates = np.concatenate([[0.5], (scores[:-1] + scores[1:]) / 2, ends])
    if prior is None:
        accuracy = [((probabilities[:, 1] >= t).astype(int) == y_true).mean() for t in candidates]
    else:
        accuracy = [prior_weighted_accuracy(y_true, (probabilities[:, 1] >= t).astype(int), prior)
                    for t in candidates]
    return float(candidates[int(np.argmax(accuracy))])


def prior_weighted_accuracy(y_true: np.ndarray, predicted: np.ndarray, prior: float) -> float:
    """Accuracy on data whose share of positives (class 1) were ``prior``: prior x sensitivity +
    (1 - prior) x specificity (each class re-weighted; the scores and per-class rates unchanged)."""
    sensitivity, specificity = _rates(y_true, predicted)
    return prior * sensitivity + (1 - prior) * specificity


def _rates(y_true: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    positive, negative = y_true == 1, y_true == 0
    if not positive.any() or not negative.any():
        raise InputError("sensitivity and specificity need both classes in the scored data")
    return float((predicted[positive] == 1).mean()), float((predicted[negative] == 0).mean())


def operating_points(calibration_scores: np.ndarray, calibration_y: np.ndarray, scores: np.ndarray,
                     y_true: np.ndarray, target_prior: float, resamples: int = 2000, seed: int = 0) -> dict:
    """Binary decision thresholds picked on calibration data, each scored on (scores, y_true).

    Thresholds: ``max_accuracy`` (the calibration data's own class mix), ``max_accuracy_at_prior``
    (calibration data re-weighted to ``target_prior`` positives) and ``max_balanced_accuracy`` (prior
    0.5, which does not depend on the class mix). Per threshold: accuracy, sensitivity, specificity,
    balanced accuracy and the accuracy re-weighted to ``target_prior`` (``accuracy_at_prior``), each
    with a 95 % percentile bootstrap interval over ``resamples`` plain resamples of the scored records
    (seeded; ``medvl.eval.bootstrap``, the draws ``bench run`` takes): accuracy over every draw, the others
    over the ``resamples_with_both_classes`` draws holding both classes. ``auc`` (a ranking, so the same under any
    prior) takes ``bench run``'s AUC draws, stratified by class (``medvl.eval.subgroups.DRAWS``), so the two give
    the same interval for the same predictions.
    """
    _check_prior(target_prior)
    check_number("bootstrap resamples", resamples, minimum=100, integer=True)
    draws = bootstrap_draws(y_true, resamples, seed, need_both_classes=False)  # bench run's plain draws
    complete = every_class_draws(y_true, draws)  # for the figures a draw of one class leaves undefined
    positive = scores[:, 1]
    auc = bootstrap_ci(macro_auc, y_true, scores, resamples=resamples, seed=seed, **DRAWS["auc"])
    result = {"target_prior": target_prior, "scored_prior": float(y_true.mean()),
              "calibration_prior": float(calibration_y.mean()), "resamples": len(draws),
              "resamples_with_both_classes": len(complete),
              "auc": {key: auc[key] for key in ("value", "low", "high")}}
    for name, prior in (("max_accuracy", None), ("max_accuracy_at_prior", target_prior),
                        ("max_balanced_accuracy", 0.5)):
        threshold = _best_threshold(calibration_scores, calibration_y, prior)
        predicted = (positive >= threshold).astype(int)
        metrics = {
            "accuracy": lambda i, p=predicted: float((p[i] == y_true[i]).mean()),
            "sensitivity": lambda i, p=predicted: _rates(y_true[i], p[i])[0],
            "specificity": lambda i, p=predicted: _rates(y_true[i], p[i])[1],
            "balanced_accuracy": lambda i, p=predicted: prior_weighted_accuracy(y_true[i], p[i], 0.5),
            "accuracy_at_prior": lambda i, p=predicted: prior_weighted_accuracy(y_true[i], p[i], target_prior),
        }
        result[name] = {"threshold": threshold, **{
            key: _with_interval(metric, y_true, draws if key == "accuracy" else complete)
            for key, metric in metrics.items()}}
    return result


def _check_prior(prior: float) -> None:
    check_number("target prior", prior, minimum=0, maximum=1, exclusive_minimum=True)
    if prior >= 1:
        raise InputError(f"target prior must be a share of positives between 0 and 1, got {prior}")


def _with_interval(metric, y_true: np.ndarray, draws: list[np.ndarray]) -> dict[str, float | None]:
    """The metric on every record and the 2.5 / 97.5 percentiles of it over the bootstrap draws."""
    return percentile_interval(metric, len(y_true), draws, level=0.95)
