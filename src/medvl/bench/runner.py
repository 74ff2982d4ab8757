"""Run a benchmark suite: every model x task x dataset cell, with its checks, into results.json and report.html.

Layout of the output folder::

    suite.json        the parsed suite, the models, what each generated dataset was generated with (its
                      dataset.json generator block) and the package versions of the run
    data/NAME/        datasets the suite generates (the phantom), reused by later runs with the same settings
    data/NAME.generate.json  the generate settings data/NAME was made with (other settings: generated again)
    cells/*.json      one finished cell each (written atomically): its rows, plots, flags and fingerprint
    results.json      every row of every cell (one row per model x task x dataset x metric), the flags,
                      ``skipped``: every check (or part of one) a cell did not run, and every check it ran on
                      part of the scored data only (``partly_scored`` true: a subgroup column with some groups
                      scored), with the reason, and
                      ``skipped_metrics``: every figure a task asked for but could not score (a few-shot count a
                      class cannot fill), with the reason: not a check
    report.html       tables and plots, the models side by side

A cell's fingerprint hashes the model folder's files, the dataset's files (a data file or folder, every image file
its records name: a manifest file's images and the phantom dataset.json beside it, a manifest's images outside its
folder; never the run's own output folder inside a dataset folder) and caption file, the task (and
the files of its knowledge folder), the checks and their settings, the seed, medvl's source code and the
versions of the packages that move figures (``FIGURE_PACKAGES``: medvl, torch, numpy, scikit-learn, transformers,
monai; a rerun after an upgrade scores again); a cell file whose fingerprint matches is reused, so an
interrupted run resumes and a finished run is not recomputed (one whose contents are not as a run writes them,
damaged by hand or a tool, is scored again with a warning). A run removes the earlier results.json and
report.html of its folder before it starts, so the two always describe the suite.json beside them. Evaluation is
composed from ``medvl.eval`` (this module scores nothing by hand).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, InputError
from ..io import file_sha256, loads_json, read_json, write_json
from .suite import (
    DEFAULT_GROUP_COLUMN,
    IMAGE_UNIT,
    TASKS,
    TRAINING_TASKS,
    DatasetSpec,
    SuiteSpec,
    TaskSpec,
    check_models,
    generate_settings,
    task_knowledge,
)

log = logging.getLogger(__name__)

STATE_FILE = "suite.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
CELLS_DIR = "cells"
DEFAULT_CORRUPTION = {"kinds": ["noise", "blur", "contrast", "gamma", "jpeg", "rotation", "crop"],
                      "severities": [1, 2, 3, 4, 5], "max_images": 200}


# ------------------------------------------------------------------ datasets


@dataclass
class PreparedDataset:
    """A suite dataset ready to score: its location, loaded records (or questions) and file hashes."""

    spec: DatasetSpec
    path: Path
    dataset: Any = None  # medvl Dataset (kind images)
    questions: list | None = None  # VQA items (kind vqa)
    hashes: dict[str, Any] = field(default_factory=dict)
    generator: dict[str, Any] | None = None  # the phantom generator settings, when the data is a phantom
    # the bootstrap's resampling unit: a record column (a case id) whose records are drawn together, or None: each
    # image (a VQA question's image) its own unit (``unit_column``)
    group_column: str | None = None

    def split(self, name: str):
        return self.dataset.select(name)

    @property
    def bootstrap_unit(self) -> str:
        """What one bootstrap draw resamples: the group column's name, ``image``, or ``question image``."""
        return self.group_column or (f"question {IMAGE_UNIT}" if self.spec.kind == "vqa" else IMAGE_UNIT)

    def units(self, records: Iterable[Any]) -> list[str] | None:
        """Each record's resampling unit (its ``group_column`` value), or None: each record its own unit."""
        if self.group_column is None:
            return None
        return [str(r.labels.get(self.group_column, r.meta.get(self.group_column))) for r in records]

    def for_spatial_dims(self, spatial_dims: int, splits: set[str]) -> PreparedDataset:
        """The records a model of ``spatial_dims`` can take (``Dataset.for_spatial_dims``: a DICOM folder's 2D
        images for a 2D model, its 3D series for a 3D one; the others left out with a warning); InputError when
        one of ``splits`` (those the suite reads) is left with none."""
        if self.dataset is None:
            return self
        kept = self.dataset.for_spatial_dims(spatial_dims)
        if kept is self.dataset:
            return self
        empty = sorted(split for split in splits if not any(record.split == split for record in kept))
        if empty:
            raise InputError(f"{self.path}: dataset {self.spec.name!r} has no record a {spatial_dims}D model can "
                             f"take in split {', '.join(map(repr, empty))}")
        return dataclasses.replace(self, dataset=kept)


def files_digest(path: Path, referenced: Iterable[Path] = (), exclude: Path | None = None) -> dict[str, Any]:
    """SHA-256 of a data file, or of every file under a folder (relative path and content, in path order), then
    of every ``referenced`` file not among those (the images a manifest file names, or a manifest's images outside
    its folder; named relative to the data's folder where they lie under it). ``exclude``: a folder under ``path``
    left out (the run's own output inside a dataset folder, which is not data). Names are hashed as the bytes the
    file system holds (they need not be UTF-8)."""
    root = path if path.is_dir() else path.parent
    if path.is_dir():
        skip = exclude.resolve() if exclude is not None else None
        if skip is not None and (skip == path.resolve() or not skip.is_relative_to(path.resolve())):
            skip = None  # a folder outside the data (or holding it, as OUT/data/NAME): nothing to leave out
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and (skip is None or not p.resolve().is_relative_to(skip)))
    else:
        files = [path]
    hashed = {file.resolve() for file in files}
    extra = sorted({file.resolve() for file in referenced} - hashed)
    combined = hashlib.sha256()
    for file in files:
        combined.update(os.fsencode(file.relative_to(path) if path.is_dir() else file.name))
        combined.update(bytes.fromhex(file_sha256(file)))
    for file in extra:
        combined.update(os.fsencode(_data_name(file, root)))
        try:
            combined.update(bytes.fromhex(file_sha256(file)))
        except OSError as err:
            raise DataError(file, f"image named by dataset {path} cannot be read ({err.strerror or err})") from None
    return {"sha256": combined.hexdigest(), "files": len(files) + len(extra)}


def _data_name(file: Path, root: Path) -> str:
    """A referenced file's name in the data hash: relative to the data's folder when under it, else absolute."""
    try:
        return str(file.relative_to(root.resolve()))
    except ValueError:
        return str(file)


def _image_files(item: PreparedDataset) -> list[Path]:
    """The image files the loaded records (or questions) name; arrays held in the data file itself are hashed
    with it."""
    if item.questions is not None:
        return [Path(image) for question in item.questions for image in (question.images or (question.image,))]
    if item.dataset is None:
        return []
    return [Path(image) for record in item.dataset.records for image in record.images
            if isinstance(image, str | Path)]


def prepare_datasets(suite: SuiteSpec, out: Path, needed_splits: dict[str, set[str]],
                     show_progress: bool, allow_outside_root: bool = False) -> dict[str, PreparedDataset]:
    """Generate (phantom) and load every dataset; check the splits, label columns and subgroup columns
    the suite's tasks need (InputError before any model is run). ``allow_outside_root``: let a manifest or
    question file name images outside its own folder (``medvl.data.loaders.roots``; refused by default)."""
    from ..data.phantom.generate import phantom_description

    prepared = {}
    for name, spec in suite.datasets.items():
        path = Path(spec.path) if spec.path is not None else _generated(spec, out / "data" / name, show_progress)
        item = PreparedDataset(spec=spec, path=path)
        if spec.kind == "vqa":
            _load_questions(item, needed_splits[name], allow_outside_root)
        else:
            _load_images(item, suite, needed_splits[name], allow_outside_root)
        described = [path.parent / "dataset.json"] if path.is_file() and phantom_description(path) else []
        item.hashes = files_digest(path, [*_image_files(item), *described], exclude=out)  # the sidecar read too
        if spec.captions is not None:  # the prompts are part of what a zero-shot cell scored
            item.hashes["captions_sha256"] = file_sha256(Path(spec.captions))
        prepared[name] = item
    return prepared


def _generated(spec: DatasetSpec, folder: Path, show_progress: bool) -> Path:
    """The phantom of ``spec.generate`` in ``folder``: reused when it was generated with every one of the same
    settings (``NAME.generate.json`` beside it says which), else generated again."""
    from ..data.phantom import generate_phantom

    settings = generate_settings(spec)
    marker = folder.with_name(f"{folder.name}.generate.json")
    if folder.is_dir() and marker.is_file():
        try:
            if read_json(marker) == settings:
                return folder
        except (OSError, ValueError):
            pass  # an unreadable marker: generated again
    if folder.is_dir() and any(folder.iterdir()):
        log.info("%s: generating again, %s", folder, "its generate settings changed" if marker.is_file() else
                 "no record of the settings it was generated with (an earlier medvl, or an interrupted generation)")
    marker.unlink(missing_ok=True)  # until the new data is complete, the folder matches no settings
    generate_phantom(folder, progress=show_progress, overwrite=True, **settings)
    write_json(marker, settings)
    return folder


def generated_data(datasets: dict[str, PreparedDataset]) -> dict[str, Any]:
    """The generator block (``dataset.json``) of every dataset the suite generated, by name."""
    described = {}
    for name, item in datasets.items():
        if item.spec.path is None:
            description = json.loads((item.path / "dataset.json").read_text(encoding="utf-8"))
            described[name] = description.get("generator")
    return described


def _load_images(item: PreparedDataset, suite: SuiteSpec, splits: set[str], allow_outside_root: bool) -> None:
    from ..data import load_dataset
    from ..data.phantom.generate import phantom_description
    from ..eval.subgroups import check_group_column

    spec = item.spec
    dataset = load_dataset(item.path, allow_outside_root=allow_outside_root)
    missing = sorted(splits - set(dataset.splits))
    if missing:
        raise InputError(f"{item.path}: dataset {spec.name!r} has no split {', '.join(missing)} "
                         f"(splits: {', '.join(dataset.splits)}; set it in the suite or with --split)")
    for task in suite.tasks:
        label = task.label or spec.label
        if task.dataset == spec.name and label and TASKS[task.task] == "dual":
            dataset.require_label(label)
    present = set(dataset.columns())
    unknown = [column for column in spec.subgroups if column not in present]
    if unknown:
        raise InputError(f"{item.path}: dataset {spec.name!r} has no column {', '.join(unknown)} for subgroups "
                         f"(columns: {', '.join(sorted(present))})")
    for column in spec.subgroups:  # its values would be listed in the outputs, one group per record
        try:
            check_group_column(dataset.records, column)
        except InputError as error:
            raise InputError(f"{item.path}: dataset {spec.name!r}: {error}") from None
    item.dataset = dataset
    item.group_column = unit_column(dataset, spec, item.path)
    description = phantom_description(item.path)  # a phantom folder, or its manifest file
    if description is not None and description.get("name") == "phantom-cxr":
        item.generator = description.get("generator")


def unit_column(dataset: Any, spec: DatasetSpec, path: Path) -> str | None:
    """The column whose records a bootstrap draws together (``DatasetSpec.group_column``): the suite's, every record
    needing a value (InputError counting those without); else ``DEFAULT_GROUP_COLUMN`` (MedPix's case id) when every
    record has one; else None (each image its own unit, ``image``)."""
    def value(record: Any, column: str) -> Any:
        found = record.labels.get(column, record.meta.get(column))
        return None if found is None or (isinstance(found, str) and not found.strip()) else found

    column = spec.group_column
    if column == IMAGE_UNIT:
        return None
    if column is None:
        every = len(dataset) and all(value(r, DEFAULT_GROUP_COLUMN) is not None for r in dataset.records)
        return DEFAULT_GROUP_COLUMN if every else None
    lacking = sum(value(r, column) is None for r in dataset.records)
    if lacking:
        raise InputError(f"{path}: dataset {spec.name!r}: group_column {column!r}: {lacking} of {len(dataset)} "
                         f"records have no value (every record needs its case; columns: "
                         f"{', '.join(dataset.columns())})")
    return column


def _load_questions(item: PreparedDataset, splits: set[str], allow_outside_root: bool) -> None:
    """The question file's questions, each split checked; ``heldout`` (the questions a model held out, when the
    file has no split of that name) is checked per model (``check_held_out_questions``)."""
    from ..data.loaders.vqa import load_vqa
    from ..models.vqa import HELDOUT, select_questions

    questions = load_vqa(item.path, allow_outside_root=allow_outside_root)
    for split in splits:
        if split != HELDOUT or any(question.split == HELDOUT for question in questions):
            select_questions(questions, split, str(item.path), None)
    item.questions = questions


def check_held_out_questions(suite: SuiteSpec, models: list[str | Path],
                             prepared: dict[str, PreparedDataset]) -> None:
    """For each task that scores split ``heldout`` of a question file, that every model holds out questions and
    that they are in the file as they were held out (``models.vqa.held_questions``); checked before any model runs,
    from each model's meta.json (InputError / DataError naming the model)."""
    from ..models.vqa import saved_holdout, select_questions

    for task in suite.tasks:
        spec, item = suite.datasets[task.dataset], prepared[task.dataset]
        if task.task != "vqa" or item.questions is None:
            continue
        for model in models:
            try:
                select_questions(item.questions, spec.split, str(item.path), None, holdout=saved_holdout(model))
            except DataError as error:
                raise DataError(error.path, f"{error.problem} (model {model}, task {task.key} of {suite.source})") \
                    from None
            except InputError as error:
                raise InputError(f"{model}: task {task.key} of {suite.source}: {error}") from None


def needed_splits(suite: SuiteSpec) -> dict[str, set[str]]:
    """Per dataset, the splits its tasks and checks read."""
    needed: dict[str, set[str]] = {name: set() for name in suite.datasets}
    for task in suite.tasks:
        spec = suite.datasets[task.dataset]
        needed[task.dataset].add(spec.split)
        if task.task in TRAINING_TASKS:
            source = task.train_dataset or task.dataset
            train_split = suite.datasets[source].train_split
            if train_split:
                needed[source].add(train_split)
        if "calibration" in suite.task_checks(task) and spec.calibration_split and spec.calibration_split != spec.split:
            needed[task.dataset].add(spec.calibration_split)
    return needed


def check_fits_apart(suite: SuiteSpec, prepared: dict[str, PreparedDataset]) -> list[str]:
    """InputError (before any model runs) when a split a task fits on holds images of the split it scores: a
    probe fitted, or a case index filled, with the very images it is scored on (the ``train_split``), or a
    temperature fitted on them (the ``calibration_split`` of a task with the ``calibration`` check), or a
    linear probe's temperature fitted on the probe's own training images (``_calibration_apart_from_training``).
    Byte-for-byte copies of fitted images among the scored ones (another file, or one image filed in two
    splits) are not refused but returned as ``leak`` flags of the run (``eval.contamination.copies_in_fit``)."""
    flags = []
    for task in suite.tasks:
        spec = suite.datasets[task.dataset]
        source = task.train_dataset or task.dataset
        train_split = suite.datasets[source].train_split
        if task.task in TRAINING_TASKS and train_split:
            flags += _fit_apart(suite, task, prepared, source, train_split, f"train_split {train_split!r}",
                                "fit on other images than those scored")
        fit_name = spec.calibration_split
        if "calibration" in suite.task_checks(task) and fit_name and fit_name != spec.split:
            flags += _fit_apart(suite, task, prepared, task.dataset, fit_name, f"the calibration split {fit_name!r}",
                                "fit the temperature on other images than those scored")
            if task.task == "linear-probe" and train_split:
                _calibration_apart_from_training(suite, task, prepared, source, train_split, fit_name)
    return flags


def _calibration_apart_from_training(suite: SuiteSpec, task: TaskSpec, prepared: dict[str, PreparedDataset],
                                     source: str, train_split: str, fit_name: str) -> None:
    """InputError when a probe's calibration split holds images of its training split: the probe's predictions
    on its own training images are over-confident, so a temperature and abstention threshold fitted on them
    calibrate nothing (a zero-shot task trains nothing, so any split but the scored one calibrates it)."""
    if prepared[task.dataset].dataset is None or prepared[source].dataset is None:
        return
    calibration = prepared[task.dataset].split(fit_name)
    shared = prepared[source].split(train_split).shared_images(calibration)
    if shared:
        raise InputError(f"{suite.source}: task {task.key}: the calibration split {fit_name!r} of dataset "
                         f"{task.dataset!r} holds {shared} images of the train_split {train_split!r} of dataset "
                         f"{source!r}; fit the temperature on other images than those the probe is fitted on")


def _fit_apart(suite: SuiteSpec, task: TaskSpec, prepared: dict[str, PreparedDataset], source: str, split: str,
               what: str, advice: str) -> list[str]:
    from ..eval.contamination import copies_in_fit

    spec = suite.datasets[task.dataset]
    if prepared[task.dataset].dataset is None or prepared[source].dataset is None:
        return []
    scored, fitted = prepared[task.dataset].split(spec.split), prepared[source].split(split)
    shared = scored.shared_images(fitted)
    if shared:
        raise InputError(f"{suite.source}: task {task.key}: {what} of dataset {source!r} holds {shared} images "
                         f"of the scored split {spec.split!r}; {advice}")
    copies = copies_in_fit(fitted, scored, f"{what} of dataset {source!r}")
    if not copies:
        return []
    return [f"{task.key} / leak: {copies['records']} of {copies['of']} scored images of split {spec.split!r} are "
            f"byte-for-byte copies of images in {copies['fit']}"]


def check_task_inputs(suite: SuiteSpec, prepared: dict[str, PreparedDataset]) -> None:
    """What a task would otherwise find wrong only once it runs, checked before anything is written
    (InputError): the classes of a probe's training split against its scored split
    (``eval.linear_probe.probe_classes``) and, with the calibration check, its calibration split
    (``eval.linear_probe.check_calibration_classes``), a task's own covariate columns on its training split
    (``eval.covariates.check_covariates``), the classes of a zero-shot task's scored and calibration splits
    (``eval.zero_shot.zero_shot_classes``, among the label's classes over every split), and a scored split of a
    zero-shot, linear-probe or few-shot task that holds one class of its label (its AUC, the headline row, is
    undefined)."""
    from ..eval.covariates import check_covariates
    from ..eval.linear_probe import check_calibration_classes, probe_classes
    from ..eval.zero_shot import label_classes, zero_shot_classes

    for task in suite.tasks:
        spec = suite.datasets[task.dataset]
        label = task.label or spec.label
        source = suite.datasets[task.train_dataset or task.dataset]
        if task.task in AUC_TASKS and label and prepared[task.dataset].dataset is not None:
            _check_two_classes(suite, task, prepared[task.dataset].split(spec.split), label)
        if (task.task in ("linear-probe", "few-shot") and label and source.train_split
                and prepared[source.name].dataset is not None and prepared[task.dataset].dataset is not None):
            fitted = prepared[source.name].split(source.train_split)
            where = f"{suite.source}: task {task.key}: train_split {source.train_split!r}"
            try:
                classes = probe_classes(fitted, prepared[task.dataset].split(spec.split), label)
            except InputError as error:
                raise InputError(f"{where}: {error}") from None
            if task.task == "linear-probe" and task.covariates:
                check_covariates(fitted.records, task.covariates, [label], where)
            if task.task == "linear-probe" and (fit_name := _temperature_split(suite, task)):
                try:
                    check_calibration_classes(prepared[task.dataset].split(fit_name), label, classes)
                except InputError as error:
                    raise InputError(f"{suite.source}: task {task.key}: calibration_split {fit_name!r}: "
                                     f"{error}") from None
        if task.task != "zero-shot" or not label or prepared[task.dataset].dataset is None:
            continue
        classes = zero_shot_classes(prepared[task.dataset].split(spec.split), label,
                                    label_classes(prepared[task.dataset].dataset, label))
        if fit_name := _temperature_split(suite, task):
            try:
                zero_shot_classes(prepared[task.dataset].split(fit_name), label, classes)
            except InputError as error:
                raise InputError(f"{suite.source}: task {task.key}: calibration_split {fit_name!r}: {error}") from None


def _temperature_split(suite: SuiteSpec, task: TaskSpec) -> str | None:
    """The split ``task`` fits a temperature on: its dataset's ``calibration_split`` with the calibration check,
    when one is named apart from the scored split; else None."""
    spec = suite.datasets[task.dataset]
    fit_name = spec.calibration_split
    return fit_name if "calibration" in suite.task_checks(task) and fit_name and fit_name != spec.split else None


AUC_TASKS = ("zero-shot", "linear-probe", "few-shot")  # tasks whose headline is an AUC: a one-class split is refused


def _check_two_classes(suite: SuiteSpec, task: TaskSpec, scored, label: str) -> None:
    """InputError when the scored split's records with ``label`` hold a single class of it."""
    present = scored.classes(label) if label in scored.label_names else []
    if len(present) == 1:
        split = suite.datasets[task.dataset].split
        raise InputError(f"{suite.source}: task {task.key}: split {split!r} of {scored.source} holds one class of "
                         f"{label!r} ({present[0]}); its AUC is undefined (score a split with two classes or more)")


# ------------------------------------------------------------------ the run


def model_labels(models: list[str | Path]) -> dict[str, str]:
    """A short unique name per model folder: its name (its parent's for a train output's ``model/``), as the user
    named it: a symlink keeps its own name (``.`` and ``..`` are resolved, links are not followed)."""
    labels: dict[str, str] = {}
    for model in models:
        path = Path(os.path.abspath(model))
        name = path.parent.name if path.name == "model" else path.name
        label, n = name, 2
        while label in labels.values():
            label, n = f"{name}-{n}", n + 1
        labels[str(model)] = label
    return labels


# the packages whose version can move a cell's figures (kernels, solvers, transforms, tokenizers): part of its
# fingerprint, so a rerun after an upgrade scores again rather than reusing figures the new versions would not give
FIGURE_PACKAGES = ("medvl", "torch", "transformers", "monai", "numpy", "scikit-learn")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in FIGURE_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def run_suite(suite: SuiteSpec, models: list[str | Path], out: str | Path, *, show_progress: bool = True,
              overwrite: bool = False, allow_outside_root: bool = False) -> dict[str, Any]:
    """Score every model on every task of ``suite`` into ``out`` (see the module docstring).

    Everything that can be checked without running a model is checked first: the models' kinds
    against the tasks, the output folder, the datasets' splits and columns. ``allow_outside_root``: datasets
    may name images outside their own folder (``prepare_datasets``)."""
    from ..models.registry import model_spatial_dims

    started = time.perf_counter()
    check_models(suite, models)
    labels = model_labels(models)
    out = Path(out)
    versions = package_versions()
    _check_out(out, suite, overwrite)
    needed = needed_splits(suite)
    datasets = prepare_datasets(suite, out, needed, show_progress, allow_outside_root)
    leaks = check_fits_apart(suite, datasets)
    check_held_out_questions(suite, models, datasets)
    dims = {str(model): model_spatial_dims(model) for model in models}
    # per kind of model, the records it takes (a DICOM folder's 2D images, or its 3D series)
    of_kind = {spatial_dims: {name: item.for_spatial_dims(spatial_dims, needed[name])
                              for name, item in datasets.items()} for spatial_dims in sorted(set(dims.values()))}
    for kept in of_kind.values():
        check_task_inputs(suite, kept)
    for finished in (RESULTS_FILE, REPORT_FILE):  # an earlier run's: rewritten when this one ends
        (out / finished).unlink(missing_ok=True)
    if overwrite:  # only now that every check passed: a refused run leaves the folder as it was
        for stale in (out / CELLS_DIR).glob("*.json"):
            stale.unlink()
    write_json(out / STATE_FILE, {"suite": suite.to_dict(), "models": {labels[str(m)]: str(m) for m in models},
                                  "generated": generated_data(datasets), "versions": versions})
    cells, computed = [], 0
    for model in models:
        loaded = _LazyModel(str(model))
        digest, spatial_dims = files_digest(_model_folder(model))["sha256"], dims[str(model)]
        for task in suite.tasks:
            cell, fresh = _cell(suite, task, of_kind[spatial_dims], loaded, labels[str(model)], digest, out,
                                versions, show_progress, spatial_dims=spatial_dims)
            cells.append(cell)
            computed += fresh
        loaded.release()
    rows = [row for cell in cells for row in cell["rows"]]
    results = {"suite": suite.name, "source": suite.source, "seed": suite.seed, "bootstrap": suite.bootstrap,
               "models": {labels[str(m)]: str(m) for m in models}, "versions": versions,
               "data_hashes": {name: d.hashes for name, d in datasets.items()},
               # what each dataset's bootstrap draws resample (and subgroup sizes count): a case column or the image
               "bootstrap_unit": {name: d.bootstrap_unit for name, d in datasets.items()},
               "rows": rows, "flags": leaks + [flag for cell in cells for flag in cell["flags"]],
               "skipped": skipped_checks(cells), "skipped_metrics": skipped_metrics(cells),
               "cells": {"total": len(cells), "computed": computed, "reused": len(cells) - computed},
               "seconds": round(time.perf_counter() - started, 1)}
    from .html import write_suite_report

    results["plots"] = write_suite_report(out / REPORT_FILE, suite, results, cells)
    write_json(out / RESULTS_FILE, results)
    return results


def skipped_checks(cells: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every check (or part of one: ``sanity: blank_image``) a cell did not run, then every check it ran on part
    of the scored data only (``subgroups: sex``, with records without a value): ``model``, ``key``, ``check``,
    ``reason`` and ``partly_scored`` (False: it produced no rows; True: it did, and the reason says what it left
    out), in cell order; a run with no flag and checks not run did not pass them."""
    return [{"model": cell["model"], "key": cell["key"], "check": check, "reason": reason, "partly_scored": partly}
            for cell in cells for partly, entries in ((False, cell["skipped"]), (True, cell["partly_scored"]))
            for check, reason in entries.items()]


def skipped_metrics(cells: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Every figure a cell's task asked for but could not score (``16-shot``: a class has fewer training images):
    ``model``, ``key``, ``metric`` and ``reason``, in cell order; task settings, not checks, so not a missing pass."""
    return [{"model": cell["model"], "key": cell["key"], "metric": metric, "reason": reason}
            for cell in cells for metric, reason in cell["skipped_metrics"].items()]


@functools.cache
def code_digest() -> str:
    """SHA-256 of medvl's own source (every .py and .yaml file of the package): a cell computed by other
    code is computed again, even under the same version number."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for file in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()):
        digest.update(str(file.relative_to(package)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _model_folder(model: str | Path) -> Path:
    from ..models.registry import model_directory

    return model_directory(model)


def _check_out(out: Path, suite: SuiteSpec, overwrite: bool) -> None:
    """``out`` must be new, empty, or an earlier run of the same suite (resumed); else ``overwrite``."""
    if not out.exists() or not any(out.iterdir()):
        return
    state = out / STATE_FILE
    if not state.is_file():
        if overwrite:
            return
        raise InputError(f"{out}: exists and is not a bench run folder (use a new --out, or --overwrite)")
    content, problem = _json_object(state)
    earlier = content.get("suite") if content is not None else None
    if not isinstance(earlier, dict):
        if overwrite:
            return
        raise InputError(f"{state}: not a bench run state file ({problem or 'no suite in it'}); use a new --out, "
                         "or --overwrite")
    if earlier.get("name") != suite.name and not overwrite:
        raise InputError(f"{out}: holds a run of suite {earlier.get('name')!r}, not {suite.name!r} "
                         "(use a new --out, or --overwrite to run into it anyway)")


def _json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object a file of the run holds, or None and why not (unreadable, not UTF-8, not JSON, not an
    object): a file damaged by an interrupted copy or an editor is never a traceback."""
    try:
        content = loads_json(path.read_bytes())
    except OSError as error:
        return None, f"unreadable: {error.strerror or type(error).__name__}"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as error:
        return None, f"not JSON: {error.msg} at line {error.lineno}"
    except ValueError as error:  # nested too deeply
        return None, f"not JSON: {error}"
    if not isinstance(content, dict):
        return None, f"a JSON {type(content).__name__}, not an object"
    return content, None


class _LazyModel:
    """A model folder loaded on first use, once per kind of task (a run whose cells are all done loads
    nothing; a transformers VLM loads once as a VQA model and once as a report generator)."""

    def __init__(self, path: str):
        self.path = path
        self._nets: dict[str, Any] = {}

    def get(self, kind: str):
        if kind not in self._nets:
            if kind == "vqa":
                from ..models.vqa import load_vqa_model

                self._nets[kind] = load_vqa_model(self.path)
            elif kind == "report":
                from ..models.decoder import load_report_generator

                self._nets[kind] = load_report_generator(self.path)
            else:
                from ..models.registry import load_model

                self._nets[kind] = load_model(self.path)
        return self._nets[kind]

    def release(self) -> None:
        self._nets.clear()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# what a changed part of a cell's fingerprint means, in the words of the log line
_CHANGED = {"model": "the model's files", "data": "the scored data", "train_data": "the training data",
            "task": "the task's settings", "dataset": "the dataset's settings", "train_dataset": "the training "
            "dataset's settings", "checks": "the checks", "corruption": "the corruption settings", "counterfactual":
            "the counterfactual settings", "seed": "the seed", "bootstrap": "the bootstrap settings", "code":
            "medvl's code", "knowledge": "the knowledge folder's files",
            **{package: f"{package}'s version" for package in FIGURE_PACKAGES}}


def _what_changed(before: Any, now: dict[str, str]) -> str:
    """Why a cell computed earlier is not reused: the parts of its fingerprint that differ."""
    if not isinstance(before, dict):
        return "it was computed by an earlier medvl that did not record what it depends on"
    changed = [_CHANGED.get(name, name) for name in now if before.get(name) != now[name]]
    return f"since it was computed, these changed: {', '.join(changed)}" if changed else "its fingerprint changed"


def _cell(suite: SuiteSpec, task: TaskSpec, datasets: dict[str, PreparedDataset], model: _LazyModel, label: str,
          digest: str, out: Path, versions: dict[str, str], show_progress: bool,
          spatial_dims: int = 2) -> tuple[dict[str, Any], bool]:
    """One model x task x dataset: reused from its cell file when the fingerprint matches, else computed
    (``spatial_dims``: the model's, which decides the checks it can take, ``SuiteSpec.model_checks``)."""
    checks, skipped = suite.model_checks(task, spatial_dims)
    data, train = datasets[task.dataset], datasets[task.train_dataset or task.dataset]
    inputs = {
        "model": digest, "data": data.hashes, "train_data": train.hashes, "task": task.__dict__,
        "dataset": data.spec.__dict__, "train_dataset": train.spec.__dict__,
        "checks": checks, "corruption": suite.corruption, "counterfactual": suite.counterfactual,
        "seed": suite.seed, "bootstrap": suite.bootstrap, "code": code_digest(),
        "knowledge": files_digest(Path(task.knowledge)) if task.knowledge is not None else None,
        **{package: versions.get(package) for package in FIGURE_PACKAGES}}
    fingerprint = _digest(inputs)
    parts = {name: _digest(value) for name, value in inputs.items()}  # which of them changed, when one did
    unique = hashlib.sha256(json.dumps([label, task.key]).encode()).hexdigest()[:8]  # slugs of two keys may agree
    path = out / CELLS_DIR / f"{_slug(label)}__{_slug(task.key)}_{unique}.json"
    # what names the cell, in its file and in each of its rows (``_Context.row``)
    identity = {"model": label, "task": task.task, "dataset": data.spec.name, "key": task.key, "split": data.spec.split}
    if path.is_file():
        cached, problem = _json_object(path)
        if cached is None:
            log.info("%s %s: scoring again, its cell file is %s", label, task.key, problem)
        elif cached.get("fingerprint") == fingerprint and (damage := _cell_damage(cached, identity)) is not None:
            log.warning("%s %s: scoring again, its cell file %s is damaged (%s)", label, task.key, path.name, damage)
        elif cached.get("fingerprint") == fingerprint:
            log.info("%s %s: done earlier, reused", label, task.key)
            return cached, False
        else:
            log.info("%s %s: scoring again, %s", label, task.key, _what_changed(cached.get("fingerprint_parts"), parts))
    else:
        log.info("%s %s: scoring", label, task.key)
    started = time.perf_counter()
    context = _Context(suite, task, data, train, model.get(TASKS[task.task]), label, checks, show_progress,
                       skipped=dict(skipped))
    RUNNERS[task.task](context)
    if task.task not in ("vqa", "report", "case-retrieval"):  # those say it from their own evaluation's result
        from ..eval.contamination import scored_records, trained_on_scored

        context.flag_trained(trained_on_scored(context.net, scored_records(data.split(data.spec.split), task.task,
                                                                            context.label_column)))
    for row in context.rows:
        row.update(seed=suite.seed, data_hashes={data.spec.name: data.hashes["sha256"]}, versions=versions)
    cell = {**identity, "label": context.label_column, "fingerprint": fingerprint,
            "fingerprint_parts": parts,
            "rows": context.rows, "plots": context.plots, "flags": context.flags, "skipped": context.skipped,
            "partly_scored": context.partly_scored, "skipped_metrics": context.skipped_metrics,
            "seconds": round(time.perf_counter() - started, 1)}
    write_json(path, cell)
    return cell, True


def _cell_damage(cell: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """What in a cell file whose fingerprint matches is not as ``_cell`` writes it (None: nothing), so a file damaged
    by hand or by a tool is scored again instead of crashing every rerun in the results or the report."""
    wrong = [name for name, value in identity.items() if cell.get(name) != value]
    if wrong:
        return f"{', '.join(wrong)} not this cell's"
    rows, flags, plots = (cell.get(name) for name in ("rows", "flags", "plots"))
    if not isinstance(rows, list) or not all(map(_is_row, rows)):
        return "rows"
    # each row names its cell as the cell does (results.json and the report read them from the rows)
    if any(row.get(name) != value for row in rows for name, value in identity.items()):
        return "rows of another cell"
    if not isinstance(flags, list) or not all(isinstance(flag, str) for flag in flags):
        return "flags"
    for name in ("skipped", "partly_scored", "skipped_metrics"):
        entries = cell.get(name)
        if not isinstance(entries, dict) or not all(isinstance(reason, str) for reason in entries.values()):
            return name
    if not isinstance(plots, dict):
        return "plots"
    return None


def _is_row(row: Any) -> bool:
    """A result row as the task runners write it: a metric name, its value and interval as numbers or null."""
    def number(value: Any) -> bool:
        return value is None or (isinstance(value, int | float) and not isinstance(value, bool))

    return (isinstance(row, dict) and isinstance(row.get("metric"), str) and "value" in row
            and all(number(row.get(name)) for name in ("value", "low", "high"))
            and isinstance(row.get("interval_kind", ""), str | None))


@dataclass
class _Context:
    """What a task runner needs, and what it records: rows (metric values with intervals), plot data,
    flags (a check that failed), checks it did not run, checks it ran on part of the data only and metrics of the
    task it could not score (each with the reason)."""

    suite: SuiteSpec
    task: TaskSpec
    data: PreparedDataset
    train: PreparedDataset  # the dataset whose train_split trains probes, fills the case index
    net: Any
    model: str
    checks: list[str]
    show_progress: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    plots: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # a check (or part of one) that produced no rows
    # a check that produced rows but left some records or groups out (what, in words): it ran, on part of the data
    partly_scored: dict[str, str] = field(default_factory=dict)
    skipped_metrics: dict[str, str] = field(default_factory=dict)  # a task setting not scored: not a check
    cache: dict[str, Any] = field(default_factory=dict)  # what two checks share (the phantom twins)

    @property
    def label_column(self) -> str | None:
        return self.task.label or self.data.spec.label

    @property
    def label(self) -> str:
        """The label column of a classification task (the suite's check guarantees one)."""
        column = self.label_column
        if column is None:
            raise InputError(f"{self.suite.source}: task {self.task.key} needs a label column")
        return column

    def row(self, metric: str, value: Any, interval: dict[str, Any] | None = None, **extra: Any) -> None:
        def finite(number: Any) -> float | None:  # an undefined metric (AUC of one class) is None, as in the file
            return None if number is None or not np.isfinite(float(number)) else float(number)

        self.rows.append({"model": self.model, "task": self.task.task, "key": self.task.key,
                          "dataset": self.data.spec.name, "split": self.data.spec.split,
                          "train_dataset": self.train.spec.name if self.task.task in TRAINING_TASKS else None,
                          "label": self.label_column, "metric": metric,
                          "value": finite(value), "low": None if interval is None else finite(interval["low"]),
                          "high": None if interval is None else finite(interval["high"]), **extra})

    def training_split(self):
        """The records probes are fitted on and the case index holds: the train dataset's ``train_split``."""
        spec = self.train.spec
        if not spec.train_split:
            raise InputError(f"{self.suite.source}: dataset {spec.name!r} has no train_split for {self.task.task}")
        return self.train.split(spec.train_split)

    def flag(self, check: str, message: str) -> None:
        self.flags.append(f"{self.model} / {self.task.key} / {check}: {message}")

    def flag_trained(self, seen: dict[str, Any] | None) -> None:
        """A ``leak`` flag when the model learned from scored records (``eval.contamination``'s block)."""
        if seen is not None:
            self.flag("leak", f"the model was trained on split(s) {', '.join(seen['splits'])} of this data: "
                              f"{seen['records']} of the {seen['of']} scored records are training figures, not a test")

    def bootstrap(self, metric: Callable[..., float], y_true: np.ndarray, *arrays: np.ndarray,
                  need_both_classes: bool = True, stratified: bool = True,
                  units: list[str] | None = None) -> dict[str, Any]:
        """``bootstrap_ci`` with the suite's resamples and seed; ``units``: each record's resampling unit (a case id,
        ``PreparedDataset.units``) for a cluster bootstrap, None for the records themselves."""
        from ..eval.bootstrap import bootstrap_ci

        return bootstrap_ci(metric, y_true, *arrays, resamples=self.suite.bootstrap, seed=self.suite.seed,
                            need_both_classes=need_both_classes, stratified=stratified, groups=units)


# ------------------------------------------------------------------ tasks


def _classification_rows(ctx: _Context, y_true: np.ndarray, probabilities: np.ndarray, scored: Any,
                         **extra: Any) -> None:
    """AUC (macro one-vs-rest), accuracy and balanced accuracy, each with its bootstrap interval (``extra``: more
    fields of each row). Each interval takes the draws ``eval.subgroups.DRAWS`` names, as the subgroup rows do: AUC's
    stratified by class; accuracy's and balanced accuracy's plain draws over the scored records (balanced accuracy's
    without those lacking a class), as ``bench medmnist`` draws them (``medvl.eval.bootstrap``); over the
    ``scored`` records' cases when the dataset has a resampling unit (``PreparedDataset.units``). Each row carries
    ``smallest_class`` and ``rough`` (``eval.subgroups.rough_mark``, the subgroup rows' rule): a class of fewer than
    ``SMALL_CLASS`` scored records makes its intervals rough."""
    from ..eval.subgroups import DRAWS, accuracy, balanced_accuracy, macro_auc, rough_mark

    units = ctx.data.units(scored.records)
    extra = {**rough_mark(y_true), **extra}
    interval = ctx.bootstrap(lambda y, p: _number(macro_auc(y, p)), y_true, probabilities, **DRAWS["auc"],
                             units=units)
    ctx.row("auc", interval["value"], interval, **extra)
    interval = ctx.bootstrap(accuracy, y_true, probabilities, **DRAWS["accuracy"], units=units)
    ctx.row("accuracy", interval["value"], interval, **extra)
    interval = ctx.bootstrap(balanced_accuracy, y_true, probabilities, **DRAWS["balanced_accuracy"], units=units)
    ctx.row("balanced_accuracy", interval["value"], interval, **extra)


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


def _zero_shot(ctx: _Context) -> None:
    from ..data import captions_for
    from ..eval import zero_shot
    from ..eval.ood import embed_checked
    from ..eval.zero_shot import label_classes

    spec, net, label = ctx.data.spec, ctx.net, ctx.label
    test = ctx.data.split(spec.split)
    captions = captions_for(test, spec.captions, net)
    embeddings, ood_block = embed_checked(net, test, ctx.show_progress)
    result = zero_shot(net, test, label, captions=captions, image_embeddings=embeddings, keep_scores=True,
                       keep_logits=True, show_progress=ctx.show_progress,
                       classes=label_classes(ctx.data.dataset, label))  # the label's, over every split
    y_true, probabilities = np.array(result["y_true"]), np.array(result["probabilities"])
    scored = test.with_labels([label])
    _classification_rows(ctx, y_true, probabilities, scored)
    ctx.plots["classes"] = result["classes"]
    ctx.plots["confusion_matrix"] = result["confusion_matrix"]
    labelled = [i for i, record in enumerate(test) if label in record.labels]  # the scored records' rows
    for check in ctx.checks:
        CHECK_RUNNERS[check](ctx, _Scored(scored, embeddings[labelled], y_true, probabilities,
                                          np.array(result["logits"]), result["classes"], captions, ood_block))


@dataclass
class _Scored:
    """A classification task's scored split, handed to its checks."""

    dataset: Any
    embeddings: Any
    y_true: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray | None
    classes: list[str]
    captions: Any = None
    ood: dict[str, Any] | None = None
    fit: tuple[np.ndarray, np.ndarray] | None = None  # logits and targets on the calibration split, if scored


def _linear_probe(ctx: _Context, few_shot: bool = False) -> None:
    """The probe as ``medvl eval linear-probe`` fits it: fused with the model's covariates (``medvl.eval.covariates``;
    those the training split has; the task's ``covariates`` instead when given, ``none`` for the image alone) for the
    full probe, with the image-only and covariates-only figures beside. Each row's ``covariates`` names the columns
    fused into its figure ([] for the image alone)."""
    from ..eval.covariates import model_covariates
    from ..eval.linear_probe import linear_probe
    from .html import DRAW_SPREAD

    spec = ctx.data.spec
    train, test = ctx.training_split(), ctx.data.split(spec.split)
    calibration = _calibration_split(ctx) if "calibration" in ctx.checks and not few_shot else None
    if few_shot:  # few-shot probes stay image-only
        covariates = []
    elif ctx.task.covariates is not None:
        covariates = list(ctx.task.covariates)
    else:
        covariates = model_covariates(ctx.net, train.records, str(train.source))
    result = linear_probe(ctx.net, train, test, ctx.label, few_shot=ctx.task.shots if few_shot else (),
                          repeats=ctx.task.repeats, seed=ctx.suite.seed, show_progress=ctx.show_progress,
                          keep_scores=True, calibration_data=calibration, covariates=covariates)
    if few_shot:
        for k, reason in result.get("few_shot_skipped", {}).items():
            ctx.skipped_metrics[f"{k}-shot"] = reason
        for k, run in result["few_shot"].items():
            for metric in ("auc", "accuracy"):
                mean, std = run[f"{metric}_mean"], run[f"{metric}_std"]
                interval = None if mean is None or std is None else {"low": max(0.0, mean - 1.96 * std),
                                                      "high": min(1.0, mean + 1.96 * std)}
                ctx.row(f"{k}-shot {metric}", mean, interval, repeats=run["repeats"], interval_kind=DRAW_SPREAD)
        ctx.plots["few_shot"] = result["few_shot"]
        return
    y_true, probabilities = np.array(result["y_true"]), np.array(result["probabilities"])
    fused_with = list(result["covariates"]["columns"]) if "covariates" in result else []
    _classification_rows(ctx, y_true, probabilities, test.with_labels([ctx.label]),
                         covariates=fused_with)  # fused when fused_with names columns
    if fused_with:
        for metric, value in result["image_only"].items():
            ctx.row(f"image-only {metric}", value, covariates=[])
        ctx.row("covariates-only auc", result["covariates"]["auc"], covariates=fused_with)
    ctx.plots["classes"] = result["classes"]
    fit = None
    if "calibration" in result:  # log-probabilities serve as logits: softmax(log p / T) rescales p
        fit = (_log(np.array(result["calibration"]["probabilities"])), np.array(result["calibration"]["y_true"]))
    scored = _Scored(test.with_labels([ctx.label]), None, y_true, probabilities, _log(probabilities),
                     result["classes"], fit=fit)
    for check in ctx.checks:
        CHECK_RUNNERS[check](ctx, scored)


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probabilities, 1e-12, None))


def _calibration_split(ctx: _Context):
    """The dataset's calibration split, or None (with the reason recorded) when it has none usable."""
    spec = ctx.data.spec
    if not spec.calibration_split or spec.calibration_split == spec.split:
        ctx.skipped["calibration"] = ("the dataset has no calibration_split" if not spec.calibration_split else
                                      f"the calibration split is the scored split ({spec.split}): a temperature "
                                      "is never fitted on the split it is reported on")
        return None
    return ctx.data.split(spec.calibration_split)


def _few_shot(ctx: _Context) -> None:
    _linear_probe(ctx, few_shot=True)


def _retrieval(ctx: _Context) -> None:
    """Recall@1/5/10 of each direction with its bootstrap interval over the queries (images, or texts), drawn by
    case when the dataset has a resampling unit: each query takes the case of its first record
    (``query_records``), so the images of one case, or its texts, are drawn together."""
    from ..eval.retrieval import retrieval
    from ..eval.sanity import beats_by

    test = ctx.data.split(ctx.data.spec.split)
    result = retrieval(ctx.net, test, show_progress=ctx.show_progress, keep_ranks=True)
    record_units = ctx.data.units(test.records)
    for short, direction in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
        ranks = np.array(result[direction]["ranks"])
        units = None if record_units is None else [record_units[i] for i in result[direction]["query_records"]]
        for k in (1, 5, 10):
            interval = ctx.bootstrap(lambda r, k=k: float((r <= k).mean()), ranks, need_both_classes=False,
                                     units=units)
            ctx.row(f"{short}_R@{k}", interval["value"], interval, chance=result[direction]["chance"][f"R@{k}"])
        ctx.row(f"{short}_median_rank", result[direction]["median_rank"])
    if "sanity" in ctx.checks:
        for short, direction in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
            chance, value = result[direction]["chance"]["R@5"], result[f"{short}_R@5"]
            ctx.row(f"sanity: {short}_R@5 with shuffled pairing (chance)", chance)
            if not beats_by(value, chance):
                ctx.flag("sanity", f"{short} R@5 {value:.3f} does not beat the shuffled-pairing (chance) "
                                   f"recall {chance:.3f} by 0.05")


def _case_retrieval(ctx: _Context) -> None:
    import tempfile

    from ..eval.case_retrieval import case_retrieval
    from ..eval.sanity import beats_by
    from ..index import open_index
    from ..index.build import build_index

    spec = ctx.data.spec
    label = ctx.label_column
    with tempfile.TemporaryDirectory(prefix="medvl-bench-index-") as folder:
        build_index(ctx.net, ctx.training_split(), Path(folder) / "cases", model_dir=None,
                    show_progress=ctx.show_progress)
        index = open_index(Path(folder) / "cases")
        result = case_retrieval(index, ctx.net, ctx.data.split(spec.split), k=ctx.task.k,
                                label_columns=[label] if label else None, knowledge=task_knowledge(ctx.task),
                                show_progress=ctx.show_progress)
    ctx.flag_trained(result.get("trained_on_scored"))
    if "knowledge" in result:
        ctx.plots["knowledge"] = result["knowledge"]
    for metric in ("precision_at_k", "jaccard_at_k", "map"):
        ctx.row(f"{metric}", result[metric], k=result["k"])  # the k scored: at most the index's size
        ctx.row(f"sanity: {metric} of a random ranking", result[f"{metric}_baseline"])
    for block, name in (("draft", "draft"), ("nearest_report", "sanity: nearest report")):
        for metric in ("micro_f1", "macro_f1"):
            ctx.row(f"{name} finding {metric}", result[block][metric])
    ctx.row("draft abstention rate", result["draft"]["abstention_rate"])
    if "sanity" in ctx.checks and not beats_by(result["precision_at_k"], result["precision_at_k_baseline"]):
        ctx.flag("sanity", f"precision@{result['k']} {result['precision_at_k']:.3f} does not beat a random "
                           f"ranking ({result['precision_at_k_baseline']:.3f}) by 0.05")


def _vqa(ctx: _Context) -> None:
    from ..eval.sanity import beats_by
    from ..eval.vqa import evaluate_vqa
    from ..models.vqa import select_questions

    items = select_questions(ctx.data.questions or [], ctx.data.spec.split, str(ctx.data.path), None,
                             holdout=getattr(ctx.net, "meta", {}).get("holdout"))
    result = evaluate_vqa(ctx.net, items, str(ctx.data.path), show_progress=ctx.show_progress, keep_answers=True,
                          pool=ctx.data.questions)
    ctx.flag_trained(result.get("trained_on_scored"))
    images = [str(item.images or (item.image,)) for item in items]
    for prefix in ("", "blank_image_", "question_only_"):
        baseline = prefix.rstrip("_").replace("_", " ")
        name = f"sanity: {baseline} overall_accuracy" if prefix else "overall_accuracy"
        if result[f"{prefix}correct"] is None:
            ctx.skipped[f"sanity: {prefix.rstrip('_')}"] = "the model has no such baseline (no training answer prior)"
            continue
        correct = np.array(result[f"{prefix}correct"], dtype=float)
        # about 10 questions an image (VQA-RAD): the image is the unit drawn, not the question
        interval = ctx.bootstrap(lambda c: float(c.mean()), correct, need_both_classes=False, units=images)
        ctx.row(name, interval["value"], interval)
    for kind in ("closed", "open"):
        ctx.row(f"{kind}_accuracy", result[f"{kind}_accuracy"])
    ctx.plots["per_question_type"] = result["per_question_type"]
    overall = result["overall_accuracy"] or 0.0
    for baseline in ("blank_image", "question_only"):
        other = result[f"{baseline}_overall_accuracy"]
        if "sanity" in ctx.checks and other is not None and not beats_by(overall, other):
            ctx.flag("sanity", f"overall accuracy {overall:.3f} does not beat the {baseline.replace('_', ' ')} "
                               f"baseline {other:.3f} by 0.05")


def _report(ctx: _Context) -> None:
    from ..eval.report import evaluate_report_generator, report_intervals
    from ..rag import ReportLabeller

    spec = ctx.data.spec
    labeller = ReportLabeller(task_knowledge(ctx.task))
    result = evaluate_report_generator(ctx.net, ctx.data.split(spec.split), ctx.training_split(),
                                       labeller=labeller, show_progress=ctx.show_progress, keep_texts=True)
    texts = result.pop("texts")
    ctx.plots["knowledge"] = result["knowledge"]
    ctx.flag_trained(result.get("trained_on_scored"))
    units = ctx.data.units(texts["records"])  # each scored report's case: whole cases drawn, when the data has one
    for source, name in (("generated", ""), ("nearest", "sanity: nearest_report ")):
        intervals = report_intervals(texts["references"], texts[source], resamples=ctx.suite.bootstrap,
                                     seed=ctx.suite.seed, labeller=labeller, groups=units)
        for key, interval in intervals.items():
            ctx.row(f"{name}{key}", interval["value"], interval)
    ours, nearest = result["generator"]["micro_f1"], result["nearest_report"]["micro_f1"]
    if "sanity" in ctx.checks and ours < nearest:
        ctx.flag("sanity", f"finding micro F1 {ours:.3f} is below the nearest-training-report baseline {nearest:.3f}")


RUNNERS: dict[str, Callable[[_Context], None]] = {
    "zero-shot": _zero_shot, "linear-probe": _linear_probe, "few-shot": _few_shot, "retrieval": _retrieval,
    "case-retrieval": _case_retrieval, "vqa": _vqa, "report": _report}


# ------------------------------------------------------------------ checks on a scored classification


def _check_calibration(ctx: _Context, scored: _Scored) -> None:
    from ..data import captions_for
    from ..eval.calibration import BRIER_FORM, calibration_report
    from ..eval.zero_shot import zero_shot_calibration

    spec = ctx.data.spec
    fit_set = _calibration_split(ctx) if scored.fit is None and ctx.task.task == "zero-shot" else None
    if scored.logits is not None and scored.fit is not None:
        block = calibration_report(*scored.fit, scored.logits, scored.y_true, curve_points=RISK_COVERAGE_POINTS)
    elif scored.logits is not None and fit_set is not None:
        block = zero_shot_calibration(ctx.net, fit_set, ctx.label, captions_for(fit_set, spec.captions, ctx.net),
                                      scored.classes, scored.logits, scored.y_true, ctx.show_progress,
                                      curve_points=RISK_COVERAGE_POINTS)
    else:
        ctx.skipped.setdefault("calibration", "no scores on a calibration split")
        return
    for key in ("ece_before", "ece_after", "brier_before", "brier_after", "nll_before", "nll_after", "temperature"):
        ctx.row(f"calibration: {key}" + (f" ({BRIER_FORM})" if key.startswith("brier") else ""), block[key])
    ctx.row("calibration: aurc", block["risk_coverage"]["aurc"])  # after scaling, as the abstention threshold
    ctx.row("calibration: aurc_before", block["risk_coverage"]["aurc_before"])  # the model's own ranking
    # the bins are the scored split's, before and after a temperature fitted on the calibration split
    ctx.plots["calibration"] = {"reliability": block["reliability"], "fitted_on": spec.calibration_split,
                                "split": spec.split}
    ctx.plots["risk_coverage"] = {"risk_coverage": block["risk_coverage"]}
    rise = _ece_rise(block, spec.calibration_split, spec.split)
    if rise is not None:
        ctx.flag("calibration", rise)
    if block["temperature_at_bound"] is not None:
        ctx.flag("calibration", f"temperature fitted on {spec.calibration_split} ({block['n_fit']} records) is "
                                f"{block['temperature']:g}, the {block['temperature_at_bound']} end of its search "
                                "range: the figures after scaling do not come from calibration")


RISK_COVERAGE_POINTS = 50  # points of the risk-coverage curve kept for the plot
# the least rise of ECE after temperature scaling that is flagged: half a percentage point, always visible at the
# three decimals the flag prints (a rise in the 4th decimal of a 15-bin ECE on tens of records is noise, and its
# flag read "0.128 -> 0.128"); the sanity rules' margin works the same way (``eval.sanity.beats_by``)
ECE_RISE = 0.005


def _ece_rise(block: dict[str, Any], fit_split: str | None, split: str) -> str | None:
    """The flag sentence when a temperature fitted on ``fit_split`` raises ECE on ``split`` by at least
    ``ECE_RISE`` (a calibration block of ``eval.calibration``), else None."""
    from ..eval.sanity import beats_by

    if not beats_by(block["ece_after"], block["ece_before"], ECE_RISE):
        return None
    return (f"temperature fitted on {fit_split} raises ECE on {split} "
            f"({block['ece_before']:.3f} -> {block['ece_after']:.3f})")


def _check_sanity(ctx: _Context, scored: _Scored) -> None:
    from ..eval.sanity import sanity_baselines

    result = sanity_baselines(ctx.net, scored.dataset, ctx.label, captions=scored.captions,
                              classes=scored.classes, image_embeddings=scored.embeddings, seed=ctx.suite.seed,
                              probabilities=scored.probabilities if ctx.task.task != "zero-shot" else None,
                              show_progress=ctx.show_progress)
    for baseline, metrics in result["baselines"].items():
        for key in result["compared"]:
            ctx.row(f"sanity: {baseline.replace('_', ' ')} {key}", metrics.get(key))
    ctx.plots["sanity"] = result
    for baseline, reason in result["skipped"].items():  # a linear probe's blank-image baseline
        ctx.skipped[f"sanity: {baseline}"] = reason
    for message in result["flags"]:
        ctx.flag("sanity", message)


def _check_subgroups(ctx: _Context, scored: _Scored) -> None:
    from ..eval.subgroups import groups_from_records, subgroup_metrics, unreadable_ages, valued_columns

    if not ctx.data.spec.subgroups:
        ctx.skipped["subgroups"] = "the dataset names no subgroup columns"
        return
    # a column of the dataset that no record of the scored split fills: skipped, not a failure mid-run
    columns = valued_columns(scored.dataset.records, ctx.data.spec.subgroups)
    for column in ctx.data.spec.subgroups:
        if column not in columns:
            ctx.skipped[f"subgroups: {column}"] = f"none of the {len(scored.dataset)} scored records has a value"
    if not columns:
        return
    groups = groups_from_records(scored.dataset.records, columns)
    result = subgroup_metrics(scored.y_true, scored.probabilities, groups, resamples=ctx.suite.bootstrap,
                              seed=ctx.suite.seed, units=ctx.data.units(scored.dataset.records))
    for column, block in result["columns"].items():
        for group, metrics in block["groups"].items():
            for metric in ("auc", "balanced_accuracy", "accuracy"):  # AUC is None for a single-class group
                interval = metrics.get(metric)
                if isinstance(interval, dict):
                    ctx.row(f"subgroup {column}={group}: {metric}", interval["value"], interval, n=metrics["n"],
                            smallest_class=metrics["smallest_class"], rough=metrics["rough"], **_units(ctx, metrics))
        gap = block.get("gap")
        if isinstance(gap, dict) and gap.get("value") is not None:
            ctx.row(f"subgroup {column}: worst-group auc gap", gap["value"], gap, worst=block.get("worst_group"))
        unscored = _unscored_groups(block, result["n"], result["min_size"],
                                    unreadable_ages(scored.dataset.records, column), ctx.data.group_column)
        if unscored and block["groups"]:  # some groups scored, with their rows: the column ran on part of the data
            ctx.partly_scored[f"subgroups: {column}"] = unscored
        elif unscored:  # no group large enough: no row, the column did not run
            ctx.skipped[f"subgroups: {column}"] = unscored
    ctx.plots["subgroups"] = result["columns"]


def _units(ctx: _Context, metrics: dict[str, Any]) -> dict[str, Any]:
    """A subgroup row's count of distinct cases (``units``, beside its ``n`` records) when the dataset's bootstrap
    draws cases (``PreparedDataset.group_column``)."""
    return {} if ctx.data.group_column is None else {"units": metrics["units"]}


def _unscored_groups(block: dict[str, Any], n: int, min_size: int, unreadable: list[str],
                     unit: str | None = None) -> str | None:
    """What of a subgroup column was not scored, in words (None when every record's group was): records
    without a value, records whose age cannot be read (``unreadable``: their values, counted; among the block's
    ``missing``), groups under ``min_size`` records (distinct ``unit`` values, a case column, when given),
    single-class groups (no AUC), rough groups (a class under ``SMALL_CLASS`` records; out of the gap), and no gap."""
    from ..eval.subgroups import SMALL_CLASS

    size = "records" if unit is None else f"distinct {unit} values"
    parts = []
    empty = block["missing"] - len(unreadable)
    if empty:
        parts.append(f"{empty} of {n} scored records have no value")
    if unreadable:
        # counted, never quoted: a column named like an age may hold notes (the report names no patient's text)
        parts.append(f"{len(unreadable)} of {n} have an age that cannot be read")
    if block["too_small"]:
        small = ", ".join(f"{name} ({count})" for name, count in block["too_small"].items())
        parts.append(f"groups under {min_size} {size} not scored: {small}")
    if block.get("unnamed_small_groups"):  # counted, never named: a rare value may be a note or an id
        unnamed = block["unnamed_small_groups"]
        parts.append(f"{unnamed} {'other ' * bool(block['too_small'])}value{'s' * (unnamed != 1)} under "
                     f"{min_size} {size} not scored "
                     f"({block['unnamed_small_records']} records; values not shown)")
    single = [name for name, metrics in block["groups"].items() if metrics.get("auc") is None]
    if single:
        parts.append(f"groups of one class (no AUC): {', '.join(single)}")
    rough = block.get("rough_groups", 0)
    if rough:  # counted, never named or quoted: their rows carry rough: true
        parts.append(f"{rough} scored group{'s' * (rough != 1)} with a class of fewer than {SMALL_CLASS} records: "
                     "rough intervals (rows marked rough), left out of the worst-group gap")
    # groups with an AUC over some of the classes only (a one-class group, without one, is named above; a rough
    # group, counted above, is out of the gap already: each group is counted in one phrase)
    incomplete = sum(bool(metrics.get("missing_classes")) and metrics.get("auc") is not None
                     and not metrics.get("rough") for metrics in block["groups"].values())
    if incomplete:
        parts.append(f"{incomplete} {'other ' * bool(rough)}scored group{'s' * (incomplete != 1)} lacking one of "
                     "the scored records' classes: an AUC over fewer classes, left out of the worst-group gap")
    if block.get("gap") is None:
        parts.append(f"no worst-group gap (it needs two groups with an AUC and every class at {SMALL_CLASS} records "
                     "or more)")
    return "; ".join(parts) or None


def _check_corruption(ctx: _Context, scored: _Scored) -> None:
    from ..eval.robustness import corruption_curves

    settings = {**DEFAULT_CORRUPTION, **ctx.suite.corruption}
    dataset = _sample(scored.dataset, int(settings["max_images"]), ctx.suite.seed, ctx.label)
    result = corruption_curves(ctx.net, dataset, ctx.label, kinds=tuple(settings["kinds"]),
                               severities=tuple(settings["severities"]), captions=scored.captions,
                               classes=scored.classes, seed=ctx.suite.seed, show_progress=ctx.show_progress)
    # the curves' own clean figure: the sample's, not the whole split's ``auc`` row
    ctx.row("corruption clean: auc", result["clean"]["auc"], n=result["n"])
    for kind, points in result["curves"].items():
        for point in points:
            ctx.row(f"corruption {kind} s{point['severity']}: auc", point["auc"], n=result["n"])
    if result["clean"]["auc"] is None:
        present = sorted({str(record.labels[ctx.label]) for record in dataset})
        ctx.skipped["corruption: auc"] = (f"the {result['n']} sampled images hold one class of {ctx.label!r} "
                                          f"({', '.join(present)}): AUC is undefined on them")
    ctx.plots["corruption"] = result


def _sample(dataset, limit: int, seed: int, label: str):
    """At most ``limit`` records of ``dataset`` (every one of which has ``label``), drawn with ``seed`` per class
    of ``label`` in proportion to its share (largest remainders), at least one of each class while ``limit``
    allows: the sample's AUC is defined whenever the dataset's is."""
    if len(dataset) <= limit:
        return dataset
    values = np.array([str(record.labels[label]) for record in dataset])
    classes, counts = np.unique(values, return_counts=True)
    shares = counts * limit / len(dataset)
    quota = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - quota), kind="stable")[: limit - int(quota.sum())]:
        quota[i] += 1
    for i in np.flatnonzero(quota == 0):  # a rare class: one image, from the largest quota
        donor = int(np.argmax(quota))
        if quota[donor] > 1:
            quota[donor], quota[i] = quota[donor] - 1, 1
    rng = np.random.default_rng(seed)
    chosen = np.sort(np.concatenate([rng.choice(np.flatnonzero(values == name), size=int(k), replace=False)
                                     for name, k in zip(classes, quota, strict=True)]))
    return dataset.subset([dataset[int(i)] for i in chosen])


def _phantom_pairs(ctx: _Context, check: str) -> list | None:
    """Counterfactual twins of new patients of the dataset's phantom seed, from index ``UNSEEN_PATIENTS``
    (``eval.counterfactual``): in no split of it, nor in a larger phantom of the same seed a model was trained on
    (case i of a seed is the same film whatever the phantom's size); made once per cell; None for data that is
    not a phantom, and for a label the twins do not carry (``TWIN_LABELS``: the finding columns), with what
    ``check`` does instead under ``skipped``."""
    from ..eval.counterfactual import TWIN_LABELS, UNSEEN_PATIENTS, phantom_counterfactual_pairs

    generator = ctx.data.generator
    settings = sorted(ctx.suite.counterfactual)
    if settings and (generator is None or ctx.label not in TWIN_LABELS):  # no twins made here
        why = "this dataset is not a phantom" if generator is None else f"the twins carry no {ctx.label!r} label"
        ctx.skipped.setdefault("counterfactual settings", f"counterfactual {', '.join(settings)} set the phantom "
                                                          f"twins; {why}: not used")
    if generator is None:
        return None
    if ctx.label not in TWIN_LABELS:
        instead = {"counterfactual": f"pairs of nearest scored images with another {ctx.label!r} are used instead",
                   "shortcut": "the pair criterion is left out; the masked-region drop is scored"}[check]
        ctx.skipped[f"{check}: phantom twins"] = (f"the phantom twins vary the finding and carry no {ctx.label!r} "
                                                  f"label (only finding and its binary columns); {instead}")
        return None
    if "pairs" not in ctx.cache:
        chosen = ctx.suite.counterfactual
        ctx.cache["pairs"] = phantom_counterfactual_pairs(
            int(generator.get("seed", 0)), int(chosen.get("n", 10)),
            int(chosen.get("size", generator.get("size", 128))),
            start=max(UNSEEN_PATIENTS, int(generator.get("n", 0))))
    return ctx.cache["pairs"]


def _method(ctx: _Context) -> str | None:
    """How the counterfactual and shortcut checks answer: a zero-shot cell's checks judge zero-shot, not a
    supervised head the model may also have."""
    return "zero_shot" if ctx.task.task == "zero-shot" else None


def _check_counterfactual(ctx: _Context, scored: _Scored) -> None:
    from ..eval import counterfactual

    pairs = _phantom_pairs(ctx, "counterfactual")
    if pairs is not None:
        source = (f"phantom twins of patients {pairs[0].meta['seed']}/{min(p.meta['index'] for p in pairs)} on: the "
                  "same film with the finding removed, moved, resized or on the other side")
    else:
        pairs = counterfactual.nearest_neighbour_pairs(ctx.net, scored.dataset, ctx.label,
                                                       embeddings=counterfactual.pixel_vectors(scored.dataset))
        source = "nearest-neighbour images (in pixel space, not the model's) with a different label"
    result = counterfactual.pair_accuracy(ctx.net, pairs, label=ctx.label, captions=scored.captions,
                                          classes=scored.classes, method=_method(ctx))
    ctx.row("counterfactual: pair accuracy", result["pair_accuracy"], n=result["n_pairs"])
    ctx.row("counterfactual: single-image accuracy", result["single_accuracy"])
    for variation, block in result["per_variation"].items():
        ctx.row(f"counterfactual: pair accuracy ({variation})", block["pair_accuracy"], n=block["n_pairs"])
    ctx.plots["counterfactual"] = {**result, "source": source}


def _check_shortcut(ctx: _Context, scored: _Scored) -> None:
    from ..data.phantom import shortcut_spec
    from ..eval.shortcut import shortcut_check

    marker = shortcut_spec(ctx.data.path)  # a shortcut phantom's folder or manifest file
    result = shortcut_check(ctx.net, scored.dataset, ctx.label, region=marker["box"] if marker else None,
                            pairs=_phantom_pairs(ctx, "shortcut"), captions=scored.captions, classes=scored.classes,
                            method=_method(ctx))
    ctx.row("shortcut: masked balanced accuracy drop", result["masked_drop"], region=str(result["masked_region"]))
    if result.get("pair_accuracy") is not None:
        ctx.row("shortcut: pair accuracy", result["pair_accuracy"])
        ctx.row("shortcut: pair accuracy bound", result["pair_accuracy_bound"])
    ctx.row("shortcut: flagged", float(result["flagged"]))
    ctx.plots["shortcut"] = {key: value for key, value in result.items() if key not in ("masked", "pairs")}
    for reason in result["reasons"] if result["flagged"] else []:
        ctx.flag("shortcut", reason)


def _check_ood(ctx: _Context, scored: _Scored) -> None:
    if scored.ood is None:
        ctx.skipped["ood"] = "the model has no OOD guard (medvl ood fit)"
        return
    from ..eval.ood import OOD_EXCESS_LEVEL, flagged_excess

    # tested against the share the guard flags in distribution by design, not a fixed 5 %
    excess = flagged_excess(ctx.net.ood, scored.ood["flagged"], scored.ood["n"])
    ctx.row("ood: flagged share", scored.ood["flagged_share"], n=scored.ood["n"],
            expected_flagged_share=excess["expected_flagged_share"], p_value=excess["p_value"], test=excess["test"])
    ctx.row("ood: expected flagged share (in distribution)", excess["expected_flagged_share"])
    seen = scored.ood.get("fitted_on_scored")  # eval.ood.guard_fitted_on_scored
    if seen is not None:
        roles = [f"{role} on split(s) {', '.join(seen[f'{key}_splits'])}"
                 for role, key in (("fitted", "fit"), ("calibrated", "calibration")) if seen[f"{key}_splits"]]
        ctx.flag("leak", f"the OOD guard was {' and '.join(roles)} of this data: {seen['records']} of the "
                         f"{seen['of']} scored records; the share it flags among them is not a test")
    if excess["shifted"]:
        ctx.flag("ood", f"the guard flags {scored.ood['flagged_share']:.1%} of the scored split as unlike the "
                        f"model's training images; it flags {excess['expected_flagged_share']:.1%} of "
                        f"in-distribution images by design (one-sided {excess['test']} p {_p_text(excess['p_value'])}, "
                        f"level {OOD_EXCESS_LEVEL})")


def _p_text(p_value: float) -> str:
    """A p-value for a message: two significant digits, or "< 0.0001" (an exact test's tail underflows to 0)."""
    return "< 0.0001" if p_value < 1e-4 else f"{p_value:.2g}"


CHECK_RUNNERS: dict[str, Callable[[_Context, _Scored], None]] = {
    "calibration": _check_calibration, "sanity": _check_sanity, "subgroups": _check_subgroups,
    "corruption": _check_corruption, "counterfactual": _check_counterfactual, "shortcut": _check_shortcut,
    "ood": _check_ood}


def run_suite_file(suite: str | Path, models: list[str | Path], out: str | Path, *, data: dict[str, str] | None = None,
                   splits: dict[str, str] | None = None, show_progress: bool = True,
                   overwrite: bool = False, allow_outside_root: bool = False) -> dict[str, Any]:
    """``medvl bench run``: load the suite (a file, or a shipped suite's name) with the dataset path and
    split overrides, then ``run_suite``."""
    from .suite import load_suite

    return run_suite(load_suite(suite, data=data, splits=splits), models, out, show_progress=show_progress,
                     overwrite=overwrite, allow_outside_root=allow_outside_root)


def parse_assignments(pairs: list[str], option: str) -> dict[str, str]:
    """``NAME=VALUE`` pairs of a repeatable option (``--data phantom=DIR``) as a dict; InputError otherwise."""
    parsed: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(f"{option} expects NAME=VALUE (a dataset name of the suite), got {pair!r}")
        if name.strip() in parsed:
            raise InputError(f"{option} names dataset {name.strip()!r} twice")
        parsed[name.strip()] = value.strip()
    return parsed
