"""The trainer: one loop for every objective (contrastive image-text with optional supervised heads,
VQA, report generation).

A model kind brings an ``Objective`` (its model, its examples and its loss); ``fit`` runs it:
AdamW, linear warmup then cosine decay, gradient accumulation, checkpoints every N optimizer
steps (``resume=True`` continues bit-for-bit from the last one), seeded data order and
augmentation, a rich progress bar, metrics appended to ``metrics.jsonl``.

Output directory layout::

    OUT/model/            the final model (save_pretrained); ``load_model(OUT)`` finds it
    OUT/checkpoint/       model + optimizer/scheduler state of the last checkpoint (written as one folder,
                          both recording its step)
    OUT/metrics.jsonl     one JSON object per logged step (its batch's losses; full_batch false for an
                          epoch's short last batch) / epoch
    OUT/train_config.json the resolved training config
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import check_numbers
from ..data import captions_for
from ..data.audit import CONTENT_FLAGS, audit_dataset, flagged_ids
from ..data.captions import NO_FINDING, CaptionConfig, binary_finding
from ..data.loaders.vqa import leave_out_images
from ..data.loading import check_workers, image_sources, load_all
from ..data.record import Dataset, records_digest
from ..errors import DataError, InputError, ModelError, TrainingError, WriteError, one_line
from ..eval.contamination import training_data, with_earlier
from ..eval.covariates import check_covariates, present_columns
from ..eval.head import class_order
from ..eval.subgroups import groups_from_records
from ..io import (
    atomic_write_bytes,
    file_sha256,
    json_ready,
    loads_json,
    read_json,
    replace_dir,
    staged_for,
    write_errors_named,
    write_json,
)
from ..models.config import MIN_WORD_TEXTS
from ..models.dual import (  # CHECKPOINT_STEP: the step of STATE_FILE
    CHECKPOINT_STEP,
    META_FILE,
    WEIGHTS_FILE,
    DualEncoder,
)
from ..models.losses import nt_xent_loss
from ..models.preprocess import random_resized_crop
from ..models.registry import MAX_SEED
from ..models.registry import seed_everything as seed_everything  # here for the trainers that seed a model's init
from ..progress import progress_bar
from . import distributed

log = logging.getLogger(__name__)

MODEL_DIR, CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE = "model", "checkpoint", "metrics.jsonl", "train_config.json"
STATE_FILE = "state.pt"  # in CHECKPOINT_DIR: optimizer, scheduler, step and batch index
SECOND_VIEW_SEED = 7_919  # offset of the augmentation seed of the self-supervised second view
MIXUP_SEED = 15_485_863  # offset from the batch's augmentation seed of the seed of mixup's draws (share, partners)
MAX_MIXUP = 10.0  # Beta(10, 10) draws a share within 0.5 +- 0.22 nineteen times in twenty: past it, every image is
# about an even blend of two, whatever the value (a larger one is a typo)
MAX_LR = 10.0  # a peak learning rate above this is a typo (AdamW steps are about lr in size)
MAX_EPOCHS = 10_000  # more is a typo: the warmup alone would hold the learning rate near 0 for a lifetime
MAX_TEMPERATURE = 100.0  # a learned temperature above this (the highest a model may start at) leaves the image-text
# logits within 0.02 of each other: the contrastive loss sits at its chance value and teaches nothing
# Logits of one image within this of each other (softmax within ~5 % of uniform) for COLLAPSE_STEPS steps in a row:
# the model has collapsed (a tower embedding every input alike, or a temperature run high), unless its logits were
# already that flat at the first step (a high init_temperature): then below a tenth of the first step's spread
FLAT_LOGITS, COLLAPSE_STEPS = 0.05, 20
_WARNED_INERT: set[tuple[str, str, str]] = set()  # (setting, value, reason) warned as having no effect


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training records
    batch_size: int = 64  # records per forward pass
    grad_accum: int = 1  # forward passes per optimizer step
    lr: float = 1e-3  # peak learning rate (image tower, heads, projections)
    text_lr: float | None = None  # text tower peak lr; None: lr for random init, lr/20 if pretrained (train_config.json
    # records the value used as text_lr_used)
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms, biases, temperature)
    warmup_fraction: float = 0.05  # share of the optimizer steps with linear warmup
    seed: int = 0  # seeds data order and augmentation; the model's own init is create_model(NAME, seed=...)'s, which
    # medvl train calls with this seed (give it the same for a reproducible run); the heads training adds are drawn
    # right after that init (a loaded model's: from this seed), as medvl train draws them (add_heads)
    loss: str | None = None  # clip | siglip; None keeps the model config's loss
    text_source: str = "auto"  # auto: report text if present else captions | text | captions | both
    label_columns: list[str] = field(default_factory=list)  # labels for captions / supervised heads
    supervised_weight: float = 0.0  # weight of the cross-entropy of supervised heads (0 = none)
    contrastive_weight: float = 1.0  # weight of the image-text loss (0 = supervised only)
    label_smoothing: float = 0.0  # supervised heads: share of each target spread evenly over the classes (0-0.9)
    mixup: float = 0.0  # supervised heads: mixup (Zhang et al. 2018) with a share drawn from Beta(mixup, mixup) (0-10);
    # each image mixed with another of the batch, the heads' loss the same mix of both targets' cross-entropies
    # (an extra forward of the image tower; the image-text and self-supervised losses see the images unmixed). 0 = off
    self_supervised_weight: float = 0.0  # weight of a SimCLR loss between two views of each image (SLIP); 0 = off
    self_supervised_crop: float = 0.25  # the second view: a random crop of this share of the image or more
    self_supervised_temperature: float = 0.1  # temperature of that loss
    self_supervised_epochs: int = 0  # epochs of that loss alone (images only, labels and texts unused) before
    # ``epochs`` of the losses above; each phase has its own warmup and cosine decay. 0 = no such phase
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at the end of each epoch
    log_every: int = 10  # optimizer steps between metrics lines
    max_steps: int | None = None  # stop early after this many optimizer steps
    recipe: str | None = None  # the registered config whose recipe gave the defaults (medvl.train.recipes)
    workers: int | None = None  # processes reading the images once before training; None: auto, 0: in-process
    leave_out_images_of: list[str] = field(default_factory=list)  # VQA question files: records whose image
    # they ask about are left out (medvl.data.loaders.vqa.leave_out_images; pretraining for a VQA benchmark)
    meta_text: str | None = None  # a record meta field drawn as a further training text when a record has it
    # (MedPix: "case_diagnosis", shared by a case's images, which then count as positives of each other)
    meta_text_share: float = 0.25  # probability that a record with ``meta_text`` is paired with it
    skip_flagged: bool = False  # leave out training records whose image the audit (medvl.data.audit) finds
    # unreadable, blank or streaked (content lost along one axis); scoring still sees every image
    batch_group: str | None = None  # a label column or meta field: some batches are drawn from one value of it
    # (hard negatives: e.g. MedPix's location_category puts brain images against brain captions), see grouped_order
    batch_group_share: float = 0.5  # share of the full batches of each group drawn as single-group batches
    ema_decay: float = 0.0  # an exponential moving average of the trained weights (and BatchNorm statistics) with
    # this decay per optimizer step (e.g. 0.99: about the last 100 steps) is the saved model; 0 = off, the last step's
    covariates: list[str] = field(default_factory=list)  # patient metadata columns (e.g. age_approx, sex) fused
    # with the model's image classifiers when it is evaluated (medvl.eval.covariates: medvl eval linear-probe, medvl
    # bench cv); not used in training, saved in the model's meta as ``covariates``

    def validate(self) -> None:
        """Refuse values that would train nothing or train garbage (before any data is read)."""
        self.validate_numbers()
        if self.text_source not in ("auto", "text", "captions", "both"):
            raise InputError(f"text_source must be auto, text, captions or both, got {self.text_source!r}")
        if self.loss not in (None, "clip", "siglip"):
            raise InputError(f"loss must be clip or siglip, got {self.loss!r}")
        self.check_label_columns()
        for name in ("batch_group", "meta_text"):  # an empty name switched the setting off without a word
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise InputError(f"{name}: {'empty column name' if isinstance(value, str) else f'got {value!r}'}; "
                                 "leave it out for none")
        if self.supervised_weight > 0 and not self.label_columns:
            raise InputError("supervised_weight > 0 needs label_columns")
        if self.mixup > 0 and self.supervised_weight == 0:  # a candidate run would be the baseline under its name
            raise InputError(f"mixup {self.mixup:g} has no effect: it mixes the images and targets of the supervised "
                             "heads, and supervised_weight is 0; set supervised_weight > 0 or leave mixup out")
        if not isinstance(self.covariates, list) or not all(isinstance(c, str) for c in self.covariates):
            raise InputError(f"covariates must be a list of column names, got {self.covariates!r}")
        from ..eval.covariates import parse_columns

        self.covariates = parse_columns(self.covariates)  # trimmed; a repeat or "none" beside a name refused
        for name, reason in self.inert_settings().items():
            if (name, repr(getattr(self, name)), reason) not in _WARNED_INERT:  # once a process, not once a fold
                _WARNED_INERT.add((name, repr(getattr(self, name)), reason))
                log.warning("training setting %s=%r has no effect: %s", name, getattr(self, name), reason)

    def check_label_columns(self) -> None:
        """``label_columns`` is a list of distinct column names (a string would be read as its letters, None
        fails only once training is over, a repeat repeats the column in every caption)."""
        columns = self.label_columns
        if not isinstance(columns, list) or not all(isinstance(c, str) and c.strip() for c in columns):
            raise InputError(f"label_columns must be a list of column names, got {columns!r}")
        repeated = sorted({c for c in columns if columns.count(c) > 1})
        if repeated:
            raise InputError(f"label column(s) {', '.join(repeated)} given more than once: {', '.join(columns)}")

    def inert_settings(self) -> dict[str, str]:
        """Settings changed from their default that do nothing because the setting they tune is off, each with
        the reason (a value a user set that would change nothing is warned)."""
        ssl_off = self.self_supervised_weight == 0 and self.self_supervised_epochs == 0
        dependent = {
            "label_smoothing": (self.supervised_weight == 0, "it smooths the supervised heads' targets, and "
                                                             "supervised_weight is 0"),
            "self_supervised_crop": (ssl_off, "it tunes the self-supervised loss, which is off "
                                              "(self_supervised_weight and self_supervised_epochs are 0)"),
            "self_supervised_temperature": (ssl_off, "it tunes the self-supervised loss, which is off "
                                                     "(self_supervised_weight and self_supervised_epochs are 0)"),
            "meta_text_share": (not self.meta_text, "it is how often meta_text is drawn, and meta_text is not set"),
            "batch_group_share": (not self.batch_group, "it is the share of single-group batches, and batch_group "
                                                        "is not set"),
        }
        defaults = {f.name: f.default for f in fields(self)}
        return {name: reason for name, (off, reason) in dependent.items()
                if off and getattr(self, name) != defaults[name]}

    def validate_numbers(self) -> None:
        """The range of every numeric field (one shared check, as the CLI options)."""
        whole = {"integer": True}
        check_numbers({
            "epochs": (self.epochs, {"minimum": 1, "maximum": MAX_EPOCHS, **whole}),
            "batch_size": (self.batch_size, {"minimum": 2, **whole}),
            "grad_accum": (self.grad_accum, {"minimum": 1, **whole}),
            "lr": (self.lr, {"minimum": 0, "exclusive_minimum": True, "maximum": MAX_LR}),
            "text_lr": (self.text_lr, {"minimum": 0, "exclusive_minimum": True, "maximum": MAX_LR, "optional": True}),
            "weight_decay": (self.weight_decay, {"minimum": 0, "maximum": 1}),
            "warmup_fraction": (self.warmup_fraction, {"minimum": 0, "maximum": 1}),
            "seed": (self.seed, {"minimum": 0, "maximum": MAX_SEED, **whole}),
            "supervised_weight": (self.supervised_weight, {"minimum": 0}),
            "contrastive_weight": (self.contrastive_weight, {"minimum": 0}),
            "label_smoothing": (self.label_smoothing, {"minimum": 0, "maximum": 0.9}),
            "mixup": (self.mixup, {"minimum": 0, "maximum": MAX_MIXUP}),
            "self_supervised_weight": (self.self_supervised_weight, {"minimum": 0}),
            "self_supervised_crop": (self.self_supervised_crop, {"minimum": 0.01, "maximum": 1}),
            "self_supervised_temperature": (self.self_supervised_temperature, {"minimum": 0.01, "maximum": 10}),
            "self_supervised_epochs": (self.self_supervised_epochs, {"minimum": 0, "maximum": MAX_EPOCHS, **whole}),
            "checkpoint_every": (self.checkpoint_every, {"minimum": 0, **whole}),
            "log_every": (self.log_every, {"minimum": 1, **whole}),
            "max_steps": (self.max_steps, {"minimum": 1, "optional": True, **whole}),
            "meta_text_share": (self.meta_text_share, {"minimum": 0, "maximum": 1}),
            "batch_group_share": (self.batch_group_share, {"minimum": 0, "maximum": 1}),
            "ema_decay": (self.ema_decay, {"minimum": 0, "maximum": 0.9999}),
        })
        check_workers(self.workers)  # the one check of every --workers: 0 to the cores this process may use
        if self.supervised_weight == 0 and self.contrastive_weight == 0 and self.self_supervised_weight == 0:
            raise InputError("supervised_weight, contrastive_weight and self_supervised_weight are all 0: "
                             "nothing to train")


def text_source_for(dataset: Dataset, config: TrainConfig) -> str:
    """The text source of a run on ``dataset``: ``config.text_source``, with ``auto`` resolved (the records'
    report text when every record has one, else captions made from labels for every record) and logged, with a
    warning when that leaves reports unused. An InputError when the records lack the text or the label columns
    the source needs."""
    source, with_text = config.text_source, sum(bool(r.text) for r in dataset.records)
    without_text = len(dataset) - with_text
    if source == "auto":
        source = "captions" if without_text else "text"
        if without_text and with_text:
            log.warning("text_source auto: %d of %d training records have no report text, so every record trains "
                        "on captions made from its labels and the %d reports are not used (text_source text or "
                        "both needs a report in every record)", without_text, len(dataset), with_text)
        else:
            log.info("text_source auto: training on %s", "the records' report text" if source == "text" else
                     "captions made from the records' labels (no record has report text)")
    if source in ("text", "both") and without_text:
        raise InputError(f"{dataset.source}: {without_text} records have no text; "
                         f"use text_source='captions' with label columns")
    if source in ("captions", "both") and not config.label_columns:
        if config.text_source == "auto":
            raise InputError(f"{dataset.source}: {without_text} of {len(dataset)} records have no text; pass label "
                             f"columns (--label-column) so captions can be made from labels")
        raise InputError(f"{dataset.source}: text_source {source} makes captions from labels and needs label "
                         f"columns (--label-column)")
    return source


def check_label_columns(dataset: Dataset, config: TrainConfig) -> None:
    """InputError when a label column of ``config`` is not a label column of ``dataset`` (its captions would name
    no label, and its head would have no class)."""
    missing = [c for c in config.label_columns if c not in dataset.label_names]
    if missing:
        available = ", ".join(dataset.label_names) or "none"
        raise InputError(f"{dataset.source}: training was asked with label columns {config.label_columns}, but "
                         f"{missing} are not label columns here (available: {available})")


def trainable_records(dataset: Dataset, config: TrainConfig, source: str) -> Dataset:
    """``dataset`` without the records the run cannot train on, their count logged: with supervised heads, a
    record missing one of the label columns (it has no target); with captions, a record that has none of them
    (its caption would be a bare template, the same for every such record, so they would all be positives of
    one another). A record with some of the label columns has its caption made from those."""
    columns = config.label_columns
    if config.supervised_weight > 0:
        kept = [r for r in dataset.records if all(c in r.labels for c in columns)]
        reason = "missing one of the label columns {} (the supervised heads need each)"
    elif source in ("captions", "both") and config.contrastive_weight > 0:
        kept = [r for r in dataset.records if any(c in r.labels for c in columns)]
        reason = "with none of the label columns {} (their caption would name no label)"
    else:
        return dataset
    if len(kept) < len(dataset):
        log.info("left out %d of %d training records %s", len(dataset) - len(kept), len(dataset),
                 reason.format(", ".join(columns)))
        return dataset.subset(kept)
    return dataset


def warn_single_class(dataset: Dataset, config: TrainConfig, source: str) -> None:
    """Warn of labels with a single class in the training records: a supervised head on it has nothing to tell
    apart, and captions that all name the same labels are positives of one another, so the image-text loss
    learns nothing from them."""
    columns = config.label_columns
    for column in columns if config.supervised_weight > 0 else []:
        if len(dataset.classes(column)) == 1:
            log.warning("label %r has one class in the %d training records: its supervised head has nothing to "
                        "tell apart and learns nothing", column, len(dataset))
    if source in ("captions", "both") and config.contrastive_weight > 0 and columns:
        if len({tuple(str(r.labels.get(c)) for c in columns) for r in dataset.records}) == 1:
            log.warning("every one of the %d training records has the same class in label column(s) %s: their "
                        "captions are positives of one another, and the image-text loss learns nothing from them",
                        len(dataset), ", ".join(columns))
        elif len(columns) > 1:
            for column in columns:
                if len(dataset.classes(column)) == 1:
                    log.warning("label %r has one class in the %d training records: every caption names it, so "
                                "the image-text loss learns nothing about it", column, len(dataset))


def _logit_spread(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                  pair_ids: torch.Tensor) -> float | None:
    """The largest difference between two logits of one image over the batch's texts (None: one pair only)."""
    if len(set(pair_ids.tolist())) < 2:
        return None
    with torch.no_grad():
        logits = logit_scale.detach().exp() * (F.normalize(image_emb.detach().float(), dim=-1)
                                               @ F.normalize(text_emb.detach().float(), dim=-1).T)
        return float((logits.max(dim=1).values - logits.min(dim=1).values).max())


class _PairedTexts:
    """Chooses the training text of each record and the key that marks identical pairs."""

    def __init__(self, dataset: Dataset, config: TrainConfig, captions: CaptionConfig, source: str | None = None):
        """``source``: the resolved text source (``text_source_for``); None resolves it here."""
        self.records, self.config, self.captions = dataset.records, config, captions
        self.source = source or text_source_for(dataset, config)
        # one 0/1 column per finding: captions name the findings a record has, never "1, 0."
        self.binary = [column for column in config.label_columns if binary_finding(column, dataset.classes(column))]
        if self.source in ("captions", "both") and config.contrastive_weight > 0:
            for column in config.label_columns:  # bare label words as captions: a caption file with other names
                captions.warn_undescribed(column, dataset.classes(column), what="training captions")
        if config.meta_text and not any(r.meta.get(config.meta_text) for r in dataset.records):
            fields = sorted({key for r in dataset.records for key, value in r.meta.items() if isinstance(value, str)})
            raise InputError(f"{dataset.source}: no record has a {config.meta_text!r} text (meta_text); "
                             f"text fields: {', '.join(fields) or 'none'}")

    def batch(self, indices: Sequence[int], rng: random.Random) -> tuple[list[str], torch.Tensor]:
        texts: list[str] = []
        keys: list[tuple[str | None, ...]] = []  # one per distinct caption source: positives share it
        for index in indices:
            record = self.records[index]
            extra = record.meta.get(self.config.meta_text) if self.config.meta_text else None
            if extra and rng.random() < self.config.meta_text_share:
                texts.append(str(extra))
                keys.append(("meta", str(extra)))
                continue
            use_caption = self.source == "captions" or (self.source == "both" and rng.random() < 0.5)
            if use_caption:
                texts.append(self.captions.caption(record.labels, self.config.label_columns, rng, self.binary))
                keys.append(("labels", *(str(record.labels.get(c)) for c in self.config.label_columns)))
            else:
                texts.append(record.text or "")
                keys.append(("text", record.text))
        ids = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        return texts, torch.tensor([ids[key] for key in keys])

    def corpus(self) -> list[str]:
        """The records' texts (reports, ``meta_text``): patient data, for the tokenizer."""
        texts = [r.text for r in self.records if r.text]
        if self.config.meta_text:
            texts.extend(str(r.meta[self.config.meta_text]) for r in self.records if r.meta.get(self.config.meta_text))
        return texts

    def prompts(self) -> list[str]:
        """The captions' prompts of every described class and of the binary finding columns (named by the column,
        as their captions are): no patient data (the captions are kept in the model's meta; column names are the
        table's schema), so every word of theirs may enter the tokenizer's vocabulary."""
        described = [prompt for column, per_class in self.captions.classes.items() for class_name in per_class
                     for prompt in self.captions.prompts(column, class_name)]
        named = [prompt for column in self.binary for class_name in ("0", "1")
                 for prompt in self.captions.prompts(column, class_name, binary=True)]
        return [*described, *named, *self.captions.prompts("", NO_FINDING)] if self.binary else described


class Objective(Protocol):
    """What a model kind brings to the trainer: the model, the number of examples and the loss.

    ``fit`` calls ``start`` once (``checkpoint`` is the model folder to resume from, or None for a
    fresh run), then ``losses`` for each batch of example indices; the returned dict's ``"loss"`` is
    optimised, every entry is logged. ``finish`` fills the model's metadata before the final save.
    """

    model: Any  # an nn.Module with save_pretrained(dir) and a ``meta`` dict
    title: str  # what it trains, for messages ("VQA training")
    # True when ``losses`` runs only this rank's shard of the batch under torchrun (``distributed.shard``); fit
    # refuses to run the others on several processes, where every rank would train on the whole batch
    data_parallel: bool

    def __len__(self) -> int: ...

    def start(self, checkpoint: Path | None, show_progress: bool) -> None: ...

    def losses(self, indices: list[int], seed: int) -> dict[str, torch.Tensor]: ...

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]: ...

    def log_extra(self) -> dict[str, float]: ...

    def describe(self, resolved: bool = True) -> dict[str, Any]: ...

    def finish(self, steps: int) -> None: ...


CaptionSource = str | Path | CaptionConfig | None  # a caption file, a ready config, or None (``captions_for``)


@dataclass
class PreparedRun:
    """What a run trains on once its settings are checked against its data (``prepare_run``)."""

    dataset: Dataset  # the records trained on
    config: TrainConfig  # the settings as applied (the covariates kept): what train_config.json records
    captions: CaptionConfig  # the caption set (``captions_for``)
    text_source: str  # ``config.text_source`` resolved (``text_source_for``)


def prepare_run(model: DualEncoder, dataset: Dataset, config: TrainConfig, captions: CaptionSource = None, *,
                show_progress: bool = True, recipe_covariates: bool = False) -> PreparedRun:
    """The records, settings and captions a run of ``model`` on ``dataset`` trains with: the one path of
    ``train`` and of ``medvl.train.recipes`` (the CLI, the service, the benchmarks), so that every setting is
    applied whoever starts the run. ``config`` itself is not changed (a checked copy is returned).

    In order: the settings checked (``TrainConfig.validate``, the label columns against the data); records the
    model cannot take left out (a DICOM folder's 3D series for a 2D model, ``Dataset.for_spatial_dims``), then
    those whose image a question file of ``leave_out_images_of`` asks about; with supervised heads, records
    without one of the label columns; the covariates checked against the records left (``run_covariates``;
    ``recipe_covariates``: they are the recipe's defaults, not asked for); with ``skip_flagged``, records whose
    image the audit flags; records the text source cannot use (``trainable_records``). The captions are
    ``captions_for(dataset, captions, model)``: a file or config given, else the dataset's own (dataset.json),
    else the model's, else generic templates."""
    config = dataclasses.replace(config)
    config.validate()
    dataset = dataset.for_spatial_dims(model.config.image.spatial_dims)
    check_label_columns(dataset, config)
    if config.leave_out_images_of:
        dataset, left_out = leave_out_images(dataset, config.leave_out_images_of)
        log.info("left out %d training records whose image the %d question file(s) ask about; %d remain",
                 left_out, len(config.leave_out_images_of), len(dataset))
    if config.supervised_weight > 0:
        dataset = dataset.with_labels(config.label_columns)
    config.covariates = run_covariates(dataset, config.covariates, config.label_columns,
                                       recipe=(config.recipe or "model") if recipe_covariates else None)
    if config.skip_flagged:
        dataset = skip_flagged_records(dataset, config.workers, show_progress)
    source = text_source_for(dataset, config)
    dataset = trainable_records(dataset, config, source)
    if len(dataset) < 2:
        raise InputError(f"{dataset.source}: need at least 2 training records, got {len(dataset)}")
    warn_single_class(dataset, config, source)
    return PreparedRun(dataset, config, captions_for(dataset, captions, model), source)


def run_covariates(dataset: Dataset, columns: Sequence[str], labels: Sequence[str], recipe: str | None = None
                   ) -> list[str]:
    """The covariate columns of a run on ``dataset`` whose label columns are ``labels``, checked before any
    training: an id or free-text column, a column no record has a value of, or one that is or restates a label
    (``medvl.eval.covariates.check_covariates``) is an InputError. ``recipe``: the columns are that recipe's
    defaults, not asked for, so those no record has, or that are a label column of the run, are left out with a
    warning (a recipe made on data with patient metadata still trains on data without it, or on that column)."""
    columns = list(columns)
    if recipe is not None:
        columns = present_columns(dataset.records, columns, str(dataset.source), "the recipe's")
        clashing = [column for column in columns if column in labels]
        if clashing:
            columns = [column for column in columns if column not in labels]
            log.warning("the %s recipe's covariate(s) %s are label columns of this run, so they are left out of the "
                        "covariates (kept: %s; --train-set covariates='[...]' chooses them)", recipe,
                        ", ".join(clashing), ", ".join(columns) or "none")
    if columns:
        check_covariates(dataset.records, columns, labels, str(dataset.source))
    return columns


def skip_flagged_records(dataset: Dataset, workers: int | None = None, show_progress: bool = True) -> Dataset:
    """``dataset`` without the records whose image ``medvl.data.audit`` flags unreadable, blank or
    streaked (their count logged per flag); InputError if no record is left."""
    audit = audit_dataset(dataset, workers=workers, show_progress=show_progress)
    skipped = flagged_ids(audit, CONTENT_FLAGS)
    kept = dataset.subset([record for record in dataset.records if record.id not in skipped])
    counts = ", ".join(f"{flag} {audit['counts'][flag]}" for flag in CONTENT_FLAGS)
    if not len(kept):
        raise InputError(f"{dataset.source}: every training image is flagged by the image audit ({counts}); "
                         "nothing to train on")
    log.info("skipped %d of %d training records flagged by the image audit (%s)", len(skipped), len(dataset), counts)
    return kept


def train(model: DualEncoder, dataset: Dataset, config: TrainConfig, out_dir: str | Path,
          captions: CaptionSource = None, resume: bool = False, show_progress: bool = True,
          on_epoch_end: Callable[[DualEncoder, int], dict[str, float]] | None = None,
          data_parallel: bool = True) -> DualEncoder:
    """Train the dual encoder ``model`` on ``dataset`` and save it to ``out_dir/model``; returns it.

    ``config.seed`` seeds the data order and augmentation, not ``model``'s own init, which exists before: build it
    with ``create_model(name, seed=config.seed)`` (as ``medvl train`` does) and the run is reproducible, two such
    calls giving the same weights, and the weights ``medvl train --seed`` gives. The supervised heads training adds
    (``add_heads``) are drawn, as ``medvl train`` draws them, right after the data is prepared from torch's generator
    as the seeded init left it; for a model not built by a seeded ``create_model`` (a loaded one), from
    ``config.seed``.

    Every setting of ``config`` is applied as ``medvl train`` applies it (``prepare_run``: records left out by
    ``leave_out_images_of`` and ``skip_flagged``, covariates checked; ``captions`` a caption file or config, None
    for the dataset's own, else the model's, else generic templates); ``out_dir/train_config.json`` records the
    settings as applied. ``out_dir`` must be missing or empty unless ``resume``, and then missing, empty or a run
    folder (its ``train_config.json`` or ``checkpoint/``). A loss or gradient that becomes NaN or
    infinite stops the run with a ``TrainingError`` before the optimizer step, so the last
    checkpoint (if any) is a good one and is kept. A failed write (full disk) raises a
    ``WriteError`` naming the path; a fresh run then removes what it wrote (and nothing else).

    Under torchrun (``WORLD_SIZE`` above 1) every process trains its shard of each global batch and only rank 0
    writes (``medvl.train.distributed``); what the caller does with the returned model is its own to keep to rank 0
    (``distributed.ran_as_main``). ``data_parallel=False`` refuses to run there instead (``fit``).
    """
    prepared = prepare_run(model, dataset, config, captions, show_progress=show_progress)
    origin = getattr(model, "origin", None)
    if not (isinstance(origin, dict) and origin.get("init") == "random" and origin.get("seed") is not None):
        torch.manual_seed(prepared.config.seed)  # no seeded init to follow: the new heads are seeded by the run's seed
    add_heads(model, prepared.dataset, prepared.config)
    return train_prepared(model, prepared, out_dir, resume=resume, show_progress=show_progress,
                          on_epoch_end=on_epoch_end, data_parallel=data_parallel)


def add_heads(model: DualEncoder, dataset: Dataset, config: TrainConfig) -> None:
    """The supervised heads of the run (``label_columns`` when ``supervised_weight`` > 0) that ``model`` has not,
    their classes in ``class_order`` (numeric names by value), initialised from torch's generator as it stands: the
    one place ``medvl train`` (``recipes.train_recipe``) and ``train`` add them, each right after ``prepare_run``, so
    both give the same model for the same seed."""
    for column in config.label_columns if config.supervised_weight > 0 else []:
        if column not in model.heads:
            model.add_head(column, sorted(dataset.classes(column), key=class_order))


def train_prepared(model: DualEncoder, prepared: PreparedRun, out_dir: str | Path, resume: bool = False,
                   show_progress: bool = True,
                   on_epoch_end: Callable[[DualEncoder, int], dict[str, float]] | None = None,
                   data_parallel: bool = False) -> DualEncoder:
    """``train`` on what ``prepare_run`` returned (the caller adds the heads to the model in between,
    ``add_heads``); ``data_parallel`` as for ``fit``."""
    if getattr(model, "ood", None) is not None:  # its statistics describe the weights this training changes
        log.warning("the starting model's OOD guard is not carried into the trained model (%s): it was fitted on the "
                    "weights training changes; fit one for the trained model with `medvl ood fit --model %s --data "
                    "DATA`", Path(out_dir) / MODEL_DIR, Path(out_dir) / MODEL_DIR)
        model.ood = None
    objective = ContrastiveObjective(model, prepared.dataset, prepared.config, prepared.captions,
                                     prepared.text_source)
    return fit(objective, prepared.config, out_dir, resume=resume, show_progress=show_progress,
               on_epoch_end=on_epoch_end, data_parallel=data_parallel)


def fit(objective: Objective, config: TrainConfig, out_dir: str | Path, resume: bool = False,
        show_progress: bool = True, on_epoch_end: Callable[[Any, int], dict[str, float]] | None = None,
        data_parallel: bool = False) -> Any:
    """Run ``objective`` for ``config``'s epochs, checkpointing into ``out_dir``; returns the trained model.

    The contract of ``train`` (fresh or resumed output folder, NaN stops, atomic checkpoints, a
    failed fresh run leaves nothing behind) holds for every objective.

    Under torchrun (``WORLD_SIZE`` above 1) the run is refused with an InputError before anything is written unless
    the objective shards its batch (``Objective.data_parallel``) and the caller says, with ``data_parallel``, that
    it keeps what follows training to rank 0 (``medvl train``, ``medvl.train``): a command that trained
    data-parallel and then scored or wrote on every rank would report N different results and write over itself.
    """
    config.validate_numbers()
    processes = distributed.requested_world_size()
    if processes > 1 and not objective.data_parallel:
        raise InputError(f"{objective.title} does not run data-parallel: each of the {processes} processes would "
                         "train on the whole batch; start it in one process (without torchrun)")
    if not data_parallel:
        distributed.check_single_process()
    joined = not distributed.initialized() and distributed.init_from_env()  # a caller's own group stays theirs
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume)
    present = _entries(out_dir)  # what the folder held before this run: never removed by its cleanup
    distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
    if resume:  # also when there is no checkpoint: a fresh start would replace the model of the run there
        check_same_run(out_dir, config, objective)
    state = _resume_state(out_dir) if resume else None
    if state is None:
        torch.manual_seed(config.seed)
    wanted = json_ready(objective.model.config.to_dict())  # the run's model, as check_same_run compared it
    objective.start(out_dir / CHECKPOINT_DIR / MODEL_DIR if state is not None else None, show_progress)
    if state is not None:
        check_checkpoint_model(out_dir / CHECKPOINT_DIR, wanted, json_ready(objective.model.config.to_dict()))
    objective.model.meta.pop(CHECKPOINT_STEP, None)  # the checkpoint's mark, not the trained model's
    # a fresh start in a run folder (resume without a checkpoint) logs every step again: the run's metrics, kept to
    # be put back if it fails before its first checkpoint (the folder's model is then still the earlier run's)
    earlier_metrics = _read_or_none(out_dir / METRICS_FILE) if state is None and distributed.is_main() else None
    with _run_folder_held(out_dir) if distributed.is_main() else contextlib.nullcontext():  # rank 0 writes
        try:
            run = _Run(objective, config, out_dir, state, show_progress and distributed.is_main(), on_epoch_end)
            with distributed.peers_watched():  # another rank gone: one line, not gloo's traceback
                trained = run.run()
        except WriteError:
            if state is None and distributed.is_main():  # a fresh run: nothing of it is worth keeping without a model
                _remove_run_output(out_dir, present)
                _put_back(out_dir / METRICS_FILE, earlier_metrics)
            raise
        except BaseException:  # NaN loss, a corrupt image, Ctrl-C: keep a checkpoint to resume from, else nothing
            if state is None and distributed.is_main() and not (out_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
                _remove_run_output(out_dir, present)  # its settings file alone would block the corrected rerun
                _put_back(out_dir / METRICS_FILE, earlier_metrics)
            raise
    if joined:
        distributed.shutdown()
    return trained


class ContrastiveObjective:
    """Image-text contrastive loss (CLIP / SigLIP) plus optional supervised heads on the image features and
    an optional self-supervised loss between two views of each image.

    The self-supervised term (``self_supervised_weight``, SLIP: Mu et al. 2022) is SimCLR's NT-Xent
    between the image features of the batch as the other losses see it and a second view of the same
    images (augmented with another seed, then cropped to a random box of ``self_supervised_crop`` of the
    image or more and resized back), each through a small MLP (``DualEncoder.add_view_projection``) that
    is dropped when training ends. The image tower then also learns from the images alone: what does not
    change under crops, flips and colour jitter. With ``self_supervised_epochs`` the run starts with that
    many epochs of this loss alone (``pretraining_losses``: no text, no label), then trains the losses above.

    With ``mixup`` (Zhang et al. 2018) the supervised heads train on blends of two images instead: a share
    ``lam`` ~ Beta(mixup, mixup) and a partner for each image (a permutation of the batch) drawn from the step's
    seed, the heads read the features of ``lam * x + (1 - lam) * x[partner]`` (``x`` the first view's augmented,
    normalised pixels; an extra forward of the image tower, whose BatchNorm statistics then also see the blends),
    and each head's loss is ``lam * CE(y) + (1 - lam) * CE(y[partner])`` (label smoothing as without mixup). The
    image-text and self-supervised losses see the unmixed first view; the self-supervised phase has no mixup.
    Under torchrun the draws are over the global batch and each rank blends its rows, as one process would.
    """

    title = "contrastive training"
    data_parallel = True

    def __init__(self, model: DualEncoder, dataset: Dataset, config: TrainConfig, captions: CaptionConfig,
                 text_source: str | None = None):
        self.model, self.dataset, self.config = model, dataset, config
        self.start_weights = starting_weights(model)
        model.origin = None  # its weights change from here on
        self.texts = _PairedTexts(dataset, config, captions, text_source)
        if config.loss:
            model.config.loss = config.loss
        self.pixels = torch.empty(0)
        self.targets: dict[str, torch.Tensor] = {}
        self._spread: float | None = None  # the last batch's largest spread of one image's logits
        self._first_spread: float | None = None  # the same at the run's first step (of this process)
        self._flat_steps = 0  # steps in a row with flat logits (``collapse``)

    def __len__(self) -> int:
        return len(self.dataset)

    def group_keys(self, column: str) -> list[str | None]:
        """Each record's value of ``column`` for ``TrainConfig.batch_group``, as subgroup analysis reads a
        group column (``groups_from_records``: a label, else a meta field; None where missing; ages
        banded); InputError, naming the dataset, if no record has it."""
        try:
            return groups_from_records(self.dataset.records, [column])[column]
        except InputError as error:
            raise InputError(f"{self.dataset.source}: batch_group: {error}") from None

    def start(self, checkpoint: Path | None, show_progress: bool) -> None:
        if checkpoint is not None:
            self.model = DualEncoder.from_pretrained(checkpoint, load_guard=False)  # a trained model has no guard
            self.model.origin = None  # trained on from here: not the checkpoint's weights once saved
        else:
            # a random-init tower learns its vocabulary from this corpus; a trained model's tower keeps its own
            self.model.text_encoder.fit_tokenizer(self.texts.corpus(), public_texts=self.texts.prompts())
            add_heads(self.model, self.dataset, self.config)  # those a caller of fit has not added (``train`` has)
        self.model.text_encoder.vocabulary_fixed = True  # trained with it from here on
        wants_views = self.config.self_supervised_weight > 0 or self.config.self_supervised_epochs > 0
        if wants_views and self.model.view_projection is None:
            self.model.add_view_projection()  # a resumed run has it from its checkpoint
        # every training image read once, kept for every epoch as float16 [0, 1] (augmented per step)
        self.pixels = load_all(self.model.preprocessor, [r.image for r in self.dataset], show_progress,
                               self.config.workers, sources=image_sources(self.dataset))
        self.targets = _head_targets(self.model, self.dataset) if self.config.supervised_weight > 0 else {}
        if self.config.supervised_weight == 0 and self.model.heads:
            log.warning("the model's supervised head(s) %s are not trained (supervised_weight is 0): they keep what "
                        "they learned before, on an image tower this training changes", ", ".join(self.model.heads))

    def losses(self, indices: list[int], seed: int) -> dict[str, torch.Tensor]:
        """The loss of the global batch ``indices``; under torchrun this rank encodes only its shard and
        the contrastive loss uses every rank's embeddings (global negatives, see ``distributed``). With ``mixup``
        the heads' cross-entropy is over blended images (``_mixed_view``), under the same ``ce_{column}`` name."""
        model, config = self.model, self.config
        local, batch, features, augmented = self._first_view(indices, seed)
        loss = torch.zeros(())
        parts: dict[str, torch.Tensor] = {}
        if config.self_supervised_weight > 0:
            parts["self_supervised"] = self._view_loss(batch, local, features, seed)
            loss = loss + config.self_supervised_weight * parts["self_supervised"]
        if config.contrastive_weight > 0:
            texts, pair_ids = self.texts.batch(indices, random.Random(seed))
            image_emb = distributed.gather_with_grad(model.embed_image_features(features), len(indices))
            text_emb = distributed.gather_with_grad(model.embed_texts(texts[local]), len(indices))
            parts["contrastive"] = model.contrastive_loss(image_emb, text_emb, pair_ids)
            loss = loss + config.contrastive_weight * parts["contrastive"]
            self._spread = _logit_spread(image_emb, text_emb, model.logit_scale, pair_ids)
        divisor = distributed.sample_divisor(len(indices))
        head_features, share, partners = features, 1.0, None  # mixup off: the heads see the first view itself
        if config.mixup > 0 and self.targets:
            share, partners, head_features = self._mixed_view(augmented, local, seed)
        for column, target in self.targets.items():
            logits, batch_targets = model.heads[column](head_features), target[indices]
            ce = F.cross_entropy(logits, batch_targets[local], reduction="sum", label_smoothing=config.label_smoothing)
            if partners is not None:  # the partners' targets in the share of their pixels
                ce = share * ce + (1 - share) * F.cross_entropy(logits, batch_targets[partners[local]],
                                                                reduction="sum", label_smoothing=config.label_smoothing)
            parts[f"ce_{column}"] = ce / divisor
            loss = loss + config.supervised_weight * parts[f"ce_{column}"]
        parts["loss"] = loss
        return parts

    def pretraining_losses(self, indices: list[int], seed: int) -> dict[str, torch.Tensor]:
        """The loss of a batch of the self-supervised phase (``self_supervised_epochs``): the two-view
        loss alone, from the images only (no text, no label); same views as in ``losses``."""
        local, batch, features, _ = self._first_view(indices, seed)
        view_loss = self._view_loss(batch, local, features, seed)
        return {"self_supervised": view_loss, "loss": view_loss}

    def _first_view(self, indices: list[int], seed: int) -> tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's shard of the global batch (the whole batch in a single process), the batch's
        pixels (float, [0, 1]), the image features of this rank's augmented shard and the augmented global batch
        (its rows on other ranks are partners of this rank's under mixup)."""
        local = distributed.shard(len(indices))
        batch = self.pixels[indices].float()
        augmented = self.model.preprocessor.augment(batch, seed)
        pixels = augmented[local]
        return local, batch, self.model.image_features(self.model.preprocessor.normalize(pixels)), augmented

    def _mixed_view(self, augmented: torch.Tensor, local: slice, seed: int) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Mixup of the first view: the share ``lam`` ~ Beta(mixup, mixup) and a permutation of the global batch
        (``partners``: row i is mixed with row partners[i]) drawn from ``seed`` over the global batch, as one process
        would draw them, and the image features of this rank's rows of ``lam * x + (1 - lam) * x[partners]``, ``x``
        the augmented, normalised pixels (an extra forward of the image tower)."""
        generator = np.random.default_rng(seed + MIXUP_SEED)  # its own stream: the global torch RNG is not drawn
        share = float(generator.beta(self.config.mixup, self.config.mixup))
        partners = torch.from_numpy(generator.permutation(len(augmented)))
        normalize = self.model.preprocessor.normalize
        mixed = share * normalize(augmented[local]) + (1 - share) * normalize(augmented[partners[local]])
        return share, partners, self.model.image_features(mixed)

    def _view_loss(self, batch: torch.Tensor, local: slice, features: torch.Tensor, seed: int) -> torch.Tensor:
        """NT-Xent between ``features`` (this rank's rows of the first view of the global ``batch``) and a
        second, cropped view of the same images; under torchrun over the global batch of both views."""
        model, config = self.model, self.config
        assert model.view_projection is not None  # added in start() (or restored from the checkpoint)
        second = model.preprocessor.augment(batch, seed + SECOND_VIEW_SEED)
        second = random_resized_crop(second, config.self_supervised_crop, seed)[local]  # as one process would
        second_features = model.image_features(model.preprocessor.normalize(second))
        first = distributed.gather_with_grad(model.view_projection(features), len(batch))
        other = distributed.gather_with_grad(model.view_projection(second_features), len(batch))
        return nt_xent_loss(first, other, config.self_supervised_temperature)

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        return param_groups(self.model, config, {"text_encoder.": text_learning_rate(self.model, config)})

    def log_extra(self) -> dict[str, float]:
        return {"temperature": float(1 / self.model.logit_scale.detach().exp())}

    def collapse(self) -> str | None:
        """Why the model can no longer learn, else None (too high a learning rate, both): a learned temperature run
        away past ``MAX_TEMPERATURE`` (or twice the model's ``init_temperature``, which may be up to it, so that a
        first step from there is not a run-away; ``contrastive_loss`` clamps it from below only), or, at any
        temperature, each image's logits within ``FLAT_LOGITS`` of each other for ``COLLAPSE_STEPS`` steps in a row
        (a tower that embeds every input alike; for a model whose logits were that flat at its first step, a tenth
        of that step's spread). Every logit is then about the same, the loss stays finite at its chance value and the
        gradients reaching the towers vanish, so the run would go on and save a constant model."""
        if self.config.contrastive_weight == 0:
            return None
        temperature = float(1 / self.model.logit_scale.detach().exp())
        limit = max(MAX_TEMPERATURE, 2 * self.model.config.init_temperature)  # a model may start at the maximum
        if temperature > limit:
            return (f"the temperature of the image-text logits became {temperature:.3g} (above {limit:g}): every "
                    "image scores every text alike, and the model learns nothing more")
        spread, self._spread = self._spread, None
        if spread is None:  # one pair only in the batch: nothing to compare
            return None
        if self._first_spread is None:
            self._first_spread = spread
        flat = min(FLAT_LOGITS, self._first_spread / 10)
        self._flat_steps = self._flat_steps + 1 if spread < flat else 0
        if self._flat_steps < COLLAPSE_STEPS:
            return None
        return (f"the logits of each image lay within {flat:.3g} of each other in each of the last {COLLAPSE_STEPS} "
                f"batches (last {spread:.3g}, temperature {temperature:.3g}): every image scores every text alike, "
                "and the model learns nothing more")

    def describe(self, resolved: bool = True) -> dict[str, Any]:
        """What ``check_same_run`` compares on resume: besides the model's config and its starting weights
        (``starting_weights``), the data (``resolved``: the records' digest over the image files' resolved paths)
        and the caption set (its prompts are the texts of label captions and fitted the tokenizer; the model's meta
        keeps it)."""
        return {"model": self.model.config.to_dict(), "start": self.start_weights,
                "data": self.dataset.source, "records": len(self.dataset),
                "records_sha256": records_digest(self.dataset.records, resolved),
                "captions": self.texts.captions.to_dict()}

    def finish(self, steps: int) -> None:
        self.model.drop_view_projection()  # a training device only: the saved model has no use for it
        self.model.meta["captions"] = self.texts.captions.to_dict()
        self.model.meta["label_columns"] = list(self.config.label_columns)
        self.model.meta["covariates"] = list(self.config.covariates)
        run = {"steps": steps, "records": len(self.dataset), "data": self.dataset.source,
               "loss": self.model.config.loss, "text_source": self.texts.source, **training_data(self.dataset)}
        self.model.meta["training"] = with_earlier(run, self.model.meta.get("training"))  # a saved model's runs too


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """A training output folder must be missing or empty, unless the run resumes; a folder resumed must be
    empty or a medvl run folder (its ``train_config.json`` or ``checkpoint/``): resuming into a data set or
    any other folder continues no run, and a failure there would have nothing of its own to clean up."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: the output folder is a file")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not resume:
        raise InputError(f"{out_dir}: output folder exists and is not empty "
                         "(--resume / resume=True continues it; or choose a new folder)")
    if not (out_dir / CONFIG_FILE).is_file() and not (out_dir / CHECKPOINT_DIR).is_dir():
        raise InputError(f"{out_dir}: --resume continues a training run, and this folder is not empty and holds "
                         f"no run ({CONFIG_FILE} or {CHECKPOINT_DIR}/); choose a new or empty --out")


RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR, MODEL_DIR)  # what a run writes into its folder


def _entries(out_dir: Path) -> set[str] | None:
    """The names in ``out_dir`` (None if it does not exist)."""
    return {child.name for child in out_dir.iterdir()} if out_dir.is_dir() else None


def _remove_run_output(out_dir: Path, present: set[str] | None) -> None:
    """Remove what a failed fresh run wrote: its own entries (``RUN_ENTRIES`` and their staging siblings,
    ``.NAME.tmp-*`` / ``.NAME.old-*``) that were not in the folder when it started (``present``; None: the
    folder itself was missing, and is removed too once empty). Anything else is left as it is."""
    for child in out_dir.iterdir() if out_dir.is_dir() else []:
        if child.name in (present or set()) or not _is_run_entry(child.name):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    if present is None:
        with contextlib.suppress(OSError):
            out_dir.rmdir()  # only if empty


# The names medvl's own staging takes for a run's entries, exactly: tempfile's 8 random characters after the prefix
# (``io.staging_folder``: ``.checkpoint.tmp-*``, ``.model.tmp-*``), the replaced folder kept until the rename
# (``io.replace_dir``: ``.NAME.old-PID-*``) and an atomic write's temporary file (``io.atomic_write_bytes``:
# ``.NAME.*.tmp``).
_RANDOM = "[a-z0-9_]{8}"
STAGING_NAME = re.compile(rf"\.(?:{'|'.join(re.escape(entry) for entry in RUN_ENTRIES)})\."
                          rf"(?:tmp-{_RANDOM}|old-[0-9]+-{_RANDOM}|{_RANDOM}\.tmp)")


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or any(name.startswith(f".{entry}.") for entry in RUN_ENTRIES)


@contextlib.contextmanager
def _run_folder_held(out_dir: Path) -> Iterator[None]:
    """Hold a shared lock (``flock``) on the run folder while the run writes into it, released when the process
    ends however it ends (a SIGKILL too). First, when no other process holds it (no other run is writing into the
    folder: a live run's staging folders are never touched), remove the staging entries earlier runs left
    (``_remove_stale_entries``: a run killed while writing a checkpoint leaves its staging folder). Taken by rank 0,
    the only rank that writes there; on a file system without locks nothing is removed."""
    with write_errors_named(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)  # a fresh run's folder holds the lock from its start
    handle = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another run holds the folder (or no locks here): what it stages may be written now
            pass
        else:
            _remove_stale_entries(out_dir)
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_SH)  # from exclusive to shared, or waiting for another run's cleanup
        yield
    finally:
        os.close(handle)


def _remove_stale_entries(out_dir: Path) -> None:
    """Remove the staging entries of a run's files (``.checkpoint.tmp-*``, ``.model.tmp-*``, ``.checkpoint.old-*``,
    the temporary files of an atomic write) that a run killed while writing left behind; anything else stays."""
    for child in out_dir.iterdir():
        if not STAGING_NAME.fullmatch(child.name):  # a user's own .model.backup or .metrics.jsonl.bak stays
            continue
        log.info("%s: removing %s, left by an interrupted write", out_dir, child.name)
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


class _Run:
    def __init__(self, objective: Objective, config: TrainConfig, out_dir: Path, state: dict[str, Any] | None,
                 show_progress: bool, on_epoch_end: Callable[[Any, int], dict[str, float]] | None):
        self.objective, self.config, self.out_dir = objective, config, out_dir
        self.show_progress, self.on_epoch_end = show_progress, on_epoch_end
        self.examples = len(objective)
        self.group_keys: list[str | None] | None = None
        if config.batch_group:
            if not hasattr(objective, "group_keys"):
                raise InputError(f"batch_group is for image-text training; this objective "
                                 f"({type(objective).__name__}) draws its batches at random")
            self.group_keys = objective.group_keys(config.batch_group)
        self._epoch_order: tuple[int, list[int]] = (-1, [])
        processes = distributed.world_size()
        if config.batch_size < 2 * processes:  # each process encodes its shard of a global batch: none may be empty
            raise InputError(f"batch_size {config.batch_size} cannot give each of {processes} processes at least 2 "
                             f"records of a batch (at least 2 x {processes} = {2 * processes} needed)")
        self.batches_per_epoch = len(epoch_batch_sizes(self.examples, config.batch_size, distributed.world_size()))
        last = self.examples % config.batch_size
        skipped = self.batches_per_epoch < math.ceil(self.examples / config.batch_size)
        if skipped and last >= 2 and distributed.is_main():  # one process would train on it
            log.warning("the last batch of each epoch (%d of %d records) is skipped on %d processes: a single "
                        "process would train on it (%d steps per epoch against %d); a batch size dividing "
                        "the records, or leaving at least %d in the last batch, keeps the runs equal", last,
                        self.examples, distributed.world_size(), self.batches_per_epoch,
                        self.batches_per_epoch + 1, 2 * distributed.world_size())
        if self.batches_per_epoch < 1:
            raise InputError(f"{self.examples} training examples cannot give each of {distributed.world_size()} "
                             f"processes at least 2")
        steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        # the self-supervised phase (if any), then the main one, each with its own warmup and cosine decay
        self.pretraining_steps = steps_per_epoch * config.self_supervised_epochs
        if self.pretraining_steps and not hasattr(objective, "pretraining_losses"):
            raise InputError(f"self_supervised_epochs is for image training; this objective "
                             f"({type(objective).__name__}) has no self-supervised phase")
        self.total_steps = self.pretraining_steps + steps_per_epoch * config.epochs
        if config.max_steps:  # a shorter run: the schedules end where it stops
            if self.pretraining_steps and config.max_steps <= self.pretraining_steps and distributed.is_main():
                log.warning("max_steps %d ends within the %d self-supervised steps (self_supervised_epochs %d): the "
                            "image-text loss (and any supervised head) never trains; the saved model's text tower "
                            "and temperature are as they started", config.max_steps, self.pretraining_steps,
                            config.self_supervised_epochs)
            self.total_steps = min(self.total_steps, config.max_steps)
            self.pretraining_steps = min(self.pretraining_steps, self.total_steps)
        main_steps = self.total_steps - self.pretraining_steps
        self.optimizer = torch.optim.AdamW(objective.param_groups(config))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: _phased_warmup_cosine(s, self.pretraining_steps, main_steps,
                                                            config.warmup_fraction))
        text_lr = trained_text_lr(objective.model, config)
        self.text_group = None if text_lr in (None, config.lr) else next(  # its groups all follow one schedule
            (i for i, group in enumerate(self.optimizer.param_groups) if group["initial_lr"] == text_lr), None)
        self.step, self.batch_index = 0, 0
        self.average = WeightAverage(objective.model, config.ema_decay) if config.ema_decay else None
        if state is not None:
            self._load_state(state, out_dir / CHECKPOINT_DIR / STATE_FILE)
            log.info("resumed from step %d", self.step)
        if distributed.is_main():  # a fresh start in a run folder (step 0) logs every step again
            _drop_metrics_after(out_dir / METRICS_FILE, self.step)

    def _load_state(self, state: dict[str, Any], path: Path) -> None:
        """The optimizer, scheduler, step and batch index (and weight average) of the checkpoint state file ``path``;
        a DataError naming it when they are damaged or do not belong together: torch would raise its own error (at
        once, or at the first step), or train on silently from reset Adam moments or from other batches than the run
        would have drawn."""
        groups = [{key: value for key, value in group.items() if key != "params"}
                  for group in self.optimizer.param_groups]  # this run's settings (and peak lr) of each group
        scheduler = self.scheduler.state_dict()
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as err:
            raise damaged_state(path, f"optimizer or scheduler: {one_line(err, 120)}") from None
        step, batch_index = state["step"], state["batch_index"]
        differing = other_settings(self.optimizer, groups)
        if differing:  # an intact checkpoint of a run with other settings: not one to throw away as damaged
            raise DataError(path, f"the checkpoint was trained with other settings than this run's ({differing}): "
                                  f"it is not of the run {CONFIG_FILE} records (copied from another run folder, or "
                                  f"the file replaced); put that run's {CONFIG_FILE} back and resume with its "
                                  f"settings, or train into a new --out")
        problem = _optimizer_problem(self.optimizer, groups, step) or _scheduler_problem(
            state["scheduler"], scheduler, step) or self._position_problem(step, batch_index)
        if problem:
            raise damaged_state(path, problem)
        self.step, self.batch_index = step, batch_index
        if self.average is not None:
            self.average.load_state_dict(state.get("ema"), path)

    def _position_problem(self, step: int, batch_index: int) -> str | None:
        """Why ``step`` and ``batch_index`` are not a position of this run (None when they are): the step within
        its steps, the batch index the one that step reached (``_train_step``: ``grad_accum`` batches a step, an
        epoch's last step cut at its end)."""
        if not 0 <= step <= self.total_steps:
            return f"step {step} is not one of this run's {self.total_steps} steps"
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.config.grad_accum)
        epoch, within = divmod(step, steps_per_epoch)
        expected = epoch * self.batches_per_epoch + min(within * self.config.grad_accum, self.batches_per_epoch)
        if batch_index != expected:
            return f"batch_index {batch_index} is not step {step}'s ({expected})"
        return None

    @property
    def model(self) -> Any:
        return self.objective.model

    def run(self) -> Any:
        if distributed.is_main():
            with write_errors_named(self.out_dir):
                self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.out_dir / CONFIG_FILE, run_settings(self.config, self.objective))
        total_batches = self.total_steps * self.config.grad_accum
        with progress_bar("Training", total=total_batches, enabled=self.show_progress) as advance:
            advance(self.batch_index)
            while self.step < self.total_steps:
                self._train_step(advance)
        if self.average is not None:
            self.average.copy_to(self.model)  # the saved model is the average
        self.objective.finish(self.step)
        if distributed.is_main():
            self._save(self.out_dir / MODEL_DIR)
        distributed.barrier()  # no rank returns before the model is saved
        return self.model

    def _save(self, directory: Path) -> None:
        try:
            self.model.save_pretrained(directory)
        except ModelError as err:  # non-finite weights: the run diverged between two loss checks
            raise TrainingError(f"{self.out_dir}: training stopped at step {self.step}: {err}; "
                                f"{self._last_checkpoint()}") from None

    def _train_step(self, advance) -> None:
        self.model.train()
        losses: list[dict[str, float]] = []
        full = True  # every batch of this step has batch_size examples (an epoch's last batch may have fewer)
        # the batches this step accumulates: grad_accum, fewer at an epoch's end (the step's loss is their mean)
        accumulated = min(self.config.grad_accum, self.batches_per_epoch - self.batch_index % self.batches_per_epoch)
        for _ in range(accumulated):
            indices = self._batch_indices(self.batch_index)
            full = full and len(indices) == self.config.batch_size
            parts = self._forward(indices)
            self._check_finite("the loss", parts["loss"])
            (parts["loss"] / accumulated).backward()
            losses.append({k: float(v.detach()) for k, v in parts.items()})
            self.batch_index += 1
            advance(1)
        distributed.average_gradients(self.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self._check_finite("the gradient norm", grad_norm)
        self.optimizer.step()
        self._check_learning()
        if self.average is not None:
            self.average.update(self.model)
        lrs = self._learning_rates()  # the learning rates this step trained with (logged)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        epoch_done = self.batch_index % self.batches_per_epoch == 0
        if self.step % self.config.log_every == 0 or self.step == self.total_steps:
            # every rank takes part: under torchrun a supervised term is this rank's shard only until averaged
            self._log(distributed.mean_over_ranks({k: sum(d[k] for d in losses) / len(losses) for k in losses[0]}),
                      full, lrs)
        if epoch_done:
            self._end_epoch()
        elif self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
            self._checkpoint()

    def _check_finite(self, what: str, value: torch.Tensor) -> None:
        """Stop before a NaN / infinite value reaches the weights (the optimizer has not stepped); every
        rank stops together."""
        if distributed.all_finite(value):
            return
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        raise TrainingError(f"{self.out_dir}: training stopped at step {self.step + 1}: {what} became "
                            f"{float(value.detach())} (learning rate {lr:.3g} at this step, --lr {self.config.lr:g}); "
                            "lower --lr or check the data for "
                            f"NaN / infinite values; {self._last_checkpoint()}")

    def _check_learning(self) -> None:
        """Stop when the objective's model can no longer learn (its ``collapse``, if it has one, gives the reason):
        the loss stays finite, so ``_check_finite`` never fires, and the run would save a constant model. Checked
        after the optimizer step, before a checkpoint could keep the weights; every rank holds the same ones."""
        collapse = getattr(self.objective, "collapse", None)
        reason = collapse() if collapse is not None else None
        if reason is None:
            return
        lr = self.scheduler.get_last_lr()[0]
        seen_over_steps = bool(getattr(self.objective, "_flat_steps", 0))  # the last checkpoint may hold it too
        raise TrainingError(f"{self.out_dir}: training stopped at step {self.step + 1}: {reason} (learning rate "
                            f"{lr:.3g} at this step, --lr {self.config.lr:g}); lower --lr; "
                            f"{self._last_checkpoint(good=not seen_over_steps)}")

    def _last_checkpoint(self, good: bool = True) -> str:
        """Where the last checkpoint is, "good" unless it may hold the weights of the failure (``good=False``: a
        collapse seen over several steps)."""
        state = self.out_dir / CHECKPOINT_DIR / STATE_FILE
        if not state.is_file():
            return "no checkpoint was written"
        try:
            step = _read_state(state)["step"]
        except DataError as err:  # said in the message of the error being raised, not instead of it
            return f"the last checkpoint cannot be resumed ({err})"
        return f"the last {'good ' if good else ''}checkpoint (step {step}) is kept in {state.parent}"

    def _batch_indices(self, batch_index: int) -> list[int]:
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        seed, size = self.config.seed * 1000 + epoch, self.config.batch_size
        if self.group_keys is None:
            order = torch.randperm(self.examples, generator=torch.Generator().manual_seed(seed))
            return order[within * size:(within + 1) * size].tolist()
        if self._epoch_order[0] != epoch:  # every rank computes the same order from the same seed
            self._epoch_order = (epoch, grouped_order(self.group_keys, size, self.config.batch_group_share, seed))
        return self._epoch_order[1][within * size:(within + 1) * size]

    def _forward(self, indices: list[int]) -> dict[str, torch.Tensor]:
        seed = self.config.seed * 1_000_003 + self.batch_index
        torch.manual_seed(seed)  # dropout draws depend only on the step: resume is bit-exact
        if self.step < self.pretraining_steps:
            return self.objective.pretraining_losses(indices, seed)  # type: ignore[attr-defined]
        return self.objective.losses(indices, seed)

    def _learning_rates(self) -> dict[str, float]:
        """``lr``: the first parameter group's learning rate at this step; ``text_lr``: the text tower's, when it
        trains at another peak than ``lr`` (a pretrained tower: lr / 20 unless text_lr is set)."""
        last = self.scheduler.get_last_lr()
        rates = {"lr": float(last[0])}
        if self.text_group is not None:
            rates[TEXT_LR_LOGGED] = float(last[self.text_group])
        return rates

    def _log(self, losses: dict[str, float], full_batch: bool, lrs: dict[str, float]) -> None:
        """One metrics line: the losses of this step's batch (``full_batch`` false for an epoch's short last
        batch, whose contrastive loss is over fewer candidates and so on a lower scale: plots leave it out) and
        the learning rates ``lrs`` it trained with (``_learning_rates``)."""
        if not distributed.is_main():
            return
        line = {"step": self.step, "epoch": self.batch_index / self.batches_per_epoch,
                **lrs, **self.objective.log_extra(), **losses,
                "full_batch": full_batch}
        _append_jsonl(self.out_dir / METRICS_FILE, line)

    def _end_epoch(self) -> None:
        epoch = self.batch_index // self.batches_per_epoch
        if self.on_epoch_end is not None and distributed.is_main():
            metrics = self.on_epoch_end(self.model, epoch)
            _append_jsonl(self.out_dir / METRICS_FILE, {"step": self.step, "epoch": epoch, **metrics})
        self._checkpoint()

    def _checkpoint(self) -> None:
        """The model and the state file go into one staging folder that replaces the checkpoint in one rename, so
        the checkpoint is always one step's, and the previous one is kept until the new one is complete. Both
        record the step (``_resume_state`` compares them). Rank 0 only."""
        if not distributed.is_main():
            return
        directory = self.out_dir / CHECKPOINT_DIR
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "step": self.step, "batch_index": self.batch_index}
        if self.average is not None:
            state["ema"] = self.average.state_dict()
        buffer = io.BytesIO()  # torch.save reports a full disk as a bare RuntimeError: write the bytes ourselves
        torch.save(state, buffer)
        with write_errors_named(directory), staged_for(directory, self.out_dir, f".{CHECKPOINT_DIR}.tmp-") as staging:
            self.model.meta[CHECKPOINT_STEP] = self.step
            try:
                self._save(staging / MODEL_DIR)
            finally:
                self.model.meta.pop(CHECKPOINT_STEP, None)
            atomic_write_bytes(staging / STATE_FILE, buffer.getvalue())
            replace_dir(staging, directory)


class WeightAverage:
    """An exponential moving average of a model's trained parameters and floating-point buffers (BatchNorm's
    running statistics), updated after each optimizer step: ``average = d * average + (1 - d) * weights`` with
    ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update, so that the first steps, far from the end, weigh
    little (Polyak averaging as TensorFlow's ExponentialMovingAverage does it). Frozen parameters (a frozen text
    tower) are not copied: they do not change."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        buffers = [name for name, buffer in model.named_buffers() if buffer.is_floating_point()]
        self.names = [name for name, param in model.named_parameters() if param.requires_grad] + buffers
        current = model.state_dict()
        self.average = {name: current[name].detach().clone() for name in self.names}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        for name in self.names:
            self.average[name].lerp_(current[name].detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        current = model.state_dict()
        for name in self.names:
            current[name].copy_(self.average[name])

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state: dict[str, Any] | None, path: Path) -> None:
        """The average of a checkpoint (``path``: its state file, named if the state holds none that fits)."""
        if not isinstance(state, dict) or not isinstance(state.get("average"), dict) or \
                set(state["average"]) != set(self.names):
            raise DataError(path, "the checkpoint holds no weight average of this model (ema_decay); delete "
                                  f"{path.parent} to start fresh")
        shapes = {name: tensor.shape for name, tensor in self.average.items()}
        updates = state.get("updates")
        if not all(isinstance(tensor, torch.Tensor) and tensor.shape == shapes[name]
                   for name, tensor in state["average"].items()) or isinstance(updates, bool) or \
                not isinstance(updates, int) or updates < 0:
            raise damaged_state(path, "its weight average (ema) does not fit this model")
        self.average = {name: tensor.clone() for name, tensor in state["average"].items()}
        self.updates = updates


def epoch_batch_sizes(examples: int, batch_size: int, processes: int = 1) -> list[int]:
    """The sizes of one epoch's batches (global batches under torchrun): full ones, then the rest, unless it would
    leave a process a single record: that last batch is skipped (it is another record each epoch), since batch norm
    cannot train on one record and one image-text pair has no negatives."""
    full, last = divmod(examples, batch_size)
    return [batch_size] * full + ([last] if last >= 2 * processes else [])


def grouped_order(keys: Sequence[str | None], batch_size: int, share: float, seed: int) -> list[int]:
    """One epoch's order of the indices of ``keys`` in which some batches hold a single group (hard negatives).

    Cut into consecutive ``batch_size`` slices, the order gives every index once. Each group's records
    (in a seeded random order) make ``len // batch_size`` full batches; each of those is kept as a
    single-group batch with probability ``share`` (records without a key never are). All other
    records are shuffled together into mixed batches. The full batches come in a random order and the
    one short batch, if any, last, so every slice but the last is full, as with a plain permutation.
    """
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(len(keys))
    by_group: dict[str, list[int]] = {}
    for index in permutation.tolist():
        key = keys[index]
        if key is not None:
            by_group.setdefault(key, []).append(index)
    batches: list[list[int]] = []
    taken: set[int] = set()
    for group in sorted(by_group):
        members = by_group[group]
        for start in range(0, len(members) - batch_size + 1, batch_size):
            if rng.random() < share:
                batches.append(members[start:start + batch_size])
                taken.update(members[start:start + batch_size])
    rest = [index for index in permutation.tolist() if index not in taken]
    batches.extend(rest[start:start + batch_size] for start in range(0, len(rest), batch_size))
    full = [batch for batch in batches if len(batch) == batch_size]
    short = [batch for batch in batches if len(batch) < batch_size]
    return [index for position in rng.permutation(len(full)).tolist() for index in full[position]] + \
        [index for batch in short for index in batch]


RESUMABLE = ("workers", "log_every", "checkpoint_every")  # settings a resumed run may change: no effect on its result
DATA_DIGESTS = {  # an objective's digest of its data -> what changed, when it differs
    "records_sha256": "the data's records (a report, label, split or image file changed since)",
    "questions_sha256": "the questions (a question, answer, split or image file changed since)",
}
DIGEST_PATHS = "digest_paths"  # "resolved": the run's DATA_DIGESTS are over the image files' resolved paths
TEXT_LR_USED = "text_lr_used"  # in train_config.json: the text tower's peak learning rate (train.text_lr resolved;
# not compared on --resume: it follows from train and model, which are)
TEXT_LR_LOGGED = "text_lr"  # in metrics.jsonl, beside lr when the text tower trains at another learning rate
ADDED_RUN_KEYS = (*DATA_DIGESTS, "vqa", "holdout", "captions", DIGEST_PATHS, "start")  # recorded since runs could
# have started: compared when present


def run_settings(config: TrainConfig, objective: Objective) -> dict[str, Any]:
    """What a run's ``train_config.json`` holds: the training config, the number of processes and the objective's
    ``describe()`` (the model, the data, its digest), the data's path resolved: the same data named another way,
    or from another working directory, is recorded (and compared on --resume) the same."""
    described = objective.describe()
    if isinstance(described.get("data"), str | Path) and str(described["data"]):
        described["data"] = str(Path(described["data"]).resolve())
    train = dataclasses.asdict(config)
    train["leave_out_images_of"] = _resolved_paths(train["leave_out_images_of"])  # question files, as the data
    settings = {"train": train, "processes": distributed.world_size(), **described, DIGEST_PATHS: "resolved"}
    text_lr = trained_text_lr(objective.model, config)
    if text_lr is not None:  # train.text_lr stays as given (None: the default), as the recipe and --resume read it
        settings[TEXT_LR_USED] = text_lr
    return settings


def _resolved_paths(paths: Any) -> Any:
    """File paths resolved (a run folder written before recorded them as given: resolved from the folder it is
    resumed in, as it was started); anything else as it is."""
    if not isinstance(paths, list) or not all(isinstance(path, str | Path) for path in paths):
        return paths
    return [str(Path(path).resolve()) for path in paths]


def check_same_run(out_dir: Path, config: TrainConfig, objective: Objective) -> None:
    """InputError when a resumed run is asked for other settings than the run in ``out_dir`` was started with
    (its ``train_config.json``): another model, data (its path or records), record count, number of processes,
    or any training setting but ``RESUMABLE``. The checkpoint would be continued under the new settings without
    a word (another schedule, batch order or loss; with another model named, the checkpoint's model all the
    same), and the run folder's settings would no longer say how its model was trained. Checked whether or not
    the folder holds a checkpoint: a run without one (stopped by ``max_steps`` within an epoch) starts fresh, and
    under other settings that would replace the run's model with another run's."""
    earlier = recorded_run(out_dir)
    if earlier is None:
        return
    now = json_ready(run_settings(config, objective))  # as the file holds it
    legacy = DIGEST_PATHS not in earlier  # started before the digests were over resolved paths
    if legacy:  # its digests are over the image paths as the data was named then, relative to where it started
        now.update({key: value for key, value in json_ready(objective.describe(resolved=False)).items()
                    if key in DATA_DIGESTS})
    changed = []
    for key in sorted(set(earlier) | set(now)):
        before, after = earlier.get(key), now.get(key)
        if (key in ADDED_RUN_KEYS and key not in earlier) or key == TEXT_LR_USED:  # a run started before the key
            # was recorded; a value derived from others
            continue
        if key in ("train", "vqa") and isinstance(before, dict) and isinstance(after, dict):
            changed += [f"{name} {before.get(name)!r} -> {after.get(name)!r}"
                        for name in sorted(set(before) | set(after))
                        if name not in RESUMABLE and not _init_by_digest(key, name, earlier, now)
                        and _comparable(name, before.get(name, _added_default(key, name)))
                        != _comparable(name, after.get(name))]
        elif key == "data" and isinstance(before, str) and isinstance(after, str):
            # the same file under another spelling is the same data; so is a folder named instead of the question
            # or manifest file in it when the records read are the same (their digest covers each image file's path)
            same_records = any(name in earlier and earlier.get(name) == now.get(name) for name in DATA_DIGESTS)
            if Path(before).resolve() != Path(after).resolve() and not same_records:
                changed.append(f"data {before!r} -> {after!r}")
        elif key in DATA_DIGESTS:
            if before != after:
                changed.append(DATA_DIGESTS[key] + (
                    f", or the data is named another way than when the run started: a run folder written before "
                    f"medvl compared data by its resolved paths resumes only with --data {earlier.get('data')!r} "
                    "given from the folder the run was started in" if legacy else ""))
        elif key == "init" and isinstance(before, dict) and isinstance(after, dict):  # train report's --init
            if not _same_init(before, after):
                changed.append(f"the starting model (--init) {_init_name(before)} -> {_init_name(after)}")
        elif key == "retrieval" and isinstance(before, dict) and isinstance(after, dict):  # train report's --index
            if before != {name: after.get(name) for name in before}:  # a run started before the index's identity
                # was recorded compares what it holds (context_k, the index model's name)
                changed.append(f"the retrieved contexts (--index, --context-k) {_retrieval_name(before)} -> "
                               f"{_retrieval_name(after)}")
        elif key == "captions":
            if before != after:  # named, not quoted: a caption set can be long
                changed.append("the caption set (captions)")
        elif key == "start":
            if not _same_start(before, after):
                changed.append(f"the starting model {_start_name(before)} -> {_start_name(after)}")
        elif key == "model" and isinstance(before, dict) and isinstance(after, dict):
            if _with_added_defaults(before) != after:
                names = (before.get("name"), after.get("name"))
                changed.append(f"model {names[0]!r} -> {names[1]!r}" if names[0] != names[1] else "model config")
        elif before != after:
            changed.append(f"{key} {before!r} -> {after!r}")
    if changed:
        raise InputError(f"{out_dir}: --resume continues the run there with the settings it was started with "
                         f"({CONFIG_FILE}); this command changes {', '.join(changed)}. Resume with the run's "
                         "settings, or train into a new --out")


def check_checkpoint_model(checkpoint: Path, wanted: dict[str, Any], loaded: dict[str, Any]) -> None:
    """DataError naming ``checkpoint`` and the settings that differ when the model it holds (``loaded``: its config)
    is not the run's (``wanted``: the model this command builds, which ``check_same_run`` compared with the run's
    train_config.json): a checkpoint copied from another run (another width, loss, tower) would be trained on without
    a word, and the run's settings rewritten to describe it. Weight shapes follow from the config (``load_weights``
    refuses a checkpoint whose weights do not fit its own config)."""
    changed = _config_differences(loaded, wanted)
    if changed:
        shown = ", ".join(f"{name} {mine!r} (the run's: {theirs!r})" for name, mine, theirs in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise DataError(checkpoint, f"its model is not this run's: {shown}{more}; it holds another run's checkpoint "
                                    f"(copied or restored from elsewhere): put that run's checkpoint back, or delete "
                                    f"{checkpoint} to start fresh")


def _config_differences(loaded: dict[str, Any], wanted: dict[str, Any], prefix: str = ""
                        ) -> list[tuple[str, Any, Any]]:
    """(dotted name, loaded value, wanted value) of each setting that differs between two config dicts."""
    found = []
    for name in sorted(set(loaded) | set(wanted), key=str):
        mine, theirs = loaded.get(name), wanted.get(name)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            found += _config_differences(mine, theirs, f"{prefix}{name}.")
        elif mine != theirs:
            found.append((f"{prefix}{name}", mine, theirs))
    return found


def recorded_run(out_dir: Path) -> dict[str, Any] | None:
    """The settings a run in ``out_dir`` was started with (its ``train_config.json``), or None when the folder holds
    nothing of a run to continue or replace (no ``checkpoint/``, no ``model/``): a fresh start writes the file anew.
    Beside a checkpoint or a model, a file missing or that cannot be read (cut short, not JSON, not a run's
    settings) is a ``DataError`` naming it: --resume would have nothing to compare this command with, and would
    continue the checkpoint (or replace the model) on other data or settings without a word, rewriting the run's
    record of how its model was trained."""
    path = out_dir / CONFIG_FILE
    kept = next((name for name in (CHECKPOINT_DIR, MODEL_DIR) if (out_dir / name).exists()), None)
    try:
        earlier = read_json(path)
    except FileNotFoundError:
        if kept is None:
            return None
        raise DataError(path, f"missing: the run folder holds {kept}/ but not the settings the run was started "
                              "with, which --resume checks this command against; put the run's file back (copy it "
                              "with the checkpoint), or train into a new --out") from None
    except (OSError, ValueError) as err:
        problem = one_line(err, 80)
    else:
        if isinstance(earlier, dict) and isinstance(earlier.get("train"), dict):
            return earlier
        problem = "not a medvl run's settings: no 'train' object"
    if kept is None:
        return None
    raise damaged_settings(path, problem)


def damaged_settings(path: Path, reason: str) -> DataError:
    """The error of a run's settings file (``train_config.json``) that --resume cannot read."""
    return DataError(path, f"damaged run settings ({reason}); --resume checks this command against them: restore "
                           f"the file, or delete {path.parent} to start fresh")


def starting_weights(model: Any) -> dict[str, Any] | None:
    """Where a run's starting weights come from (``DualEncoder.origin``), a saved folder's with the SHA-256 of its
    weights file: ``start`` in train_config.json, compared on --resume (a run started from trained weights, given
    a registered name instead, would be replaced by a run from a random init). None: a model built otherwise."""
    origin = getattr(model, "origin", None)
    if not isinstance(origin, dict):
        return None
    if "init" in origin:
        return dict(origin)
    return {**origin, "weights_sha256": file_sha256(Path(origin["model"]) / WEIGHTS_FILE)}


def _same_start(before: Any, after: Any) -> bool:
    """Two runs' ``start`` are the same weights: a saved folder's by its weights' digest (a copy, or the folder
    moved, is the same start), a random init by its name and seed."""
    if isinstance(before, dict) and isinstance(after, dict) and "weights_sha256" in before:
        return before.get("weights_sha256") == after.get("weights_sha256")
    return bool(before == after)


def _init_by_digest(key: str, name: str, earlier: dict[str, Any], now: dict[str, Any]) -> bool:
    """``vqa.init`` (the --init folder's path) when both runs record its weights' digest under ``start``: compared
    by that digest (``_same_start``), so a copy of the folder is the same start."""
    return key == "vqa" and name == "init" and all(
        isinstance(run.get("start"), dict) and run["start"].get("weights_sha256") for run in (earlier, now))


def _same_init(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Two report runs' ``init`` (the --init dual encoder: ``dir``, ``name``, ``weights_sha256``) are the same
    weights: by their digest when both record one (a copy, or the folder moved, is the same init, as ``_same_start``
    has it); a run started before the digest was recorded by its folder and name."""
    if before.get("weights_sha256") and after.get("weights_sha256"):
        return bool(before["weights_sha256"] == after["weights_sha256"])
    if "weights_sha256" not in before:
        return before == {name: value for name, value in after.items() if name != "weights_sha256"}
    return before == after


def _init_name(init: dict[str, Any]) -> str:
    digest = init.get("weights_sha256")
    return f"{init.get('dir')!r}" + (f" (weights sha256 {str(digest)[:12]})" if digest else "")


def _retrieval_name(retrieval: dict[str, Any]) -> str:
    """A report run's ``retrieval`` (``train.report.retrieval_settings``) in a few words, digests cut short."""
    words = [f"context_k {retrieval.get('context_k')}", f"index model {retrieval.get('index_model')!r}"]
    words += [f"{name.replace('_', ' ')} {str(retrieval[name])[:12]}"
              for name in ("index_weights_sha256", "contexts_sha256") if retrieval.get(name)]
    return f"({', '.join(words)})"


def _start_name(start: Any) -> str:
    if not isinstance(start, dict):
        return "(not recorded: a model built without create_model or load_model)"
    if "init" in start:
        return f"{start.get('model')!r} (random init, seed {start.get('seed')})"
    return f"{start.get('model')!r} (weights sha256 {str(start.get('weights_sha256'))[:12]})"


# model config fields added after runs could have started, with the default those runs behaved as: a saved
# train_config.json without one is the same config as a new one holding the default
ADDED_MODEL_DEFAULTS = {("text", "vocab_min_texts"): MIN_WORD_TEXTS, ("decoder", "vocab_min_texts"): MIN_WORD_TEXTS}


# training settings added after runs could have started: a saved train_config.json without one was trained as the
# default (the run is then the same run under the new settings)
ADDED_TRAIN_DEFAULTS = {"ema_decay": 0.0, "mixup": 0.0}


def _comparable(name: str, value: Any) -> Any:
    """A training setting as --resume compares it: the question files of ``leave_out_images_of`` resolved."""
    return _resolved_paths(value) if name == "leave_out_images_of" else value


def _added_default(key: str, name: str) -> Any:
    return ADDED_TRAIN_DEFAULTS.get(name) if key == "train" else None


def _with_added_defaults(model: dict[str, Any]) -> dict[str, Any]:
    """A saved model config with the fields added since (``ADDED_MODEL_DEFAULTS``) at their defaults."""
    filled = {key: dict(value) if isinstance(value, dict) else value for key, value in model.items()}
    for (section, name), default in ADDED_MODEL_DEFAULTS.items():
        if isinstance(filled.get(section), dict) and name not in filled[section]:
            filled[section][name] = default
    return filled


def _resume_state(out_dir: Path) -> dict[str, Any] | None:
    """The state of ``out_dir``'s checkpoint, None if it has none. A ``DataError`` if its model is of another
    step than its state file: a checkpoint put together from two (files copied by hand, or an earlier medvl's
    checkpoint, written in two steps, interrupted between them) would go on training silently from a mismatched
    optimizer state and step, training some steps twice."""
    path = out_dir / CHECKPOINT_DIR / STATE_FILE
    if not path.is_file():
        log.warning("%s: no checkpoint to resume from; starting fresh", out_dir)
        return None
    state = _read_state(path)
    model_step = _checkpoint_model_step(path.parent / MODEL_DIR)
    if model_step is not None and model_step != state["step"]:
        raise DataError(path.parent, f"its model is of step {model_step} and its {STATE_FILE} of step "
                                     f"{state['step']}: they were not saved together, and resuming would train "
                                     f"from a mismatched state; delete {path.parent} to start fresh")
    return state


STATE_KEYS = ("optimizer", "scheduler", "step", "batch_index")


def damaged_state(path: Path, reason: str) -> DataError:
    """The error of a checkpoint state file that cannot be resumed from."""
    return DataError(path, f"damaged checkpoint state ({reason}); delete {path.parent} to start fresh")


def _optimizer_problem(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], step: int) -> str | None:
    """Why a loaded optimizer state is not one of this run at ``step`` (None when it is): each parameter group's
    settings as this run makes them (``groups``; its learning rate a finite number), each parameter's Adam moments
    of its shape, and moments that went through ``step`` steps (an emptied state would restart them from 0)."""
    for number, (group, made) in enumerate(zip(optimizer.param_groups, groups, strict=True)):
        lr = group.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
            return f"optimizer group {number}: lr {lr!r}"
        changed = next((key for key, value in made.items() if key != "lr" and group.get(key) != value), None)
        if changed is not None:
            return f"optimizer group {number}: {changed} {group.get(changed)!r}, this run's is {made[changed]!r}"
    return _optimizer_state_problem(optimizer, step)


def other_settings(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> str | None:
    """The first optimizer setting (peak learning rate, weight decay, betas...) a loaded optimizer state holds a
    well-formed value of that is not this run's (``groups``): a state saved under other training settings (a
    checkpoint of another run), not a damaged one. None when there is none."""
    for number, (group, made) in enumerate(zip(optimizer.param_groups, groups, strict=True)):
        for key, value in made.items():
            loaded = group.get(key)
            if key == "lr" or loaded == value or type(loaded) is not type(value) or \
                    (isinstance(loaded, tuple) and isinstance(value, tuple) and len(loaded) != len(value)):
                continue
            if all(isinstance(item, float | int) and math.isfinite(item)
                   for item in (loaded if isinstance(loaded, tuple) else (loaded,))):
                return f"optimizer group {number}: {key} {loaded!r}, this run's is {value!r}"
    return None


def _optimizer_state_problem(optimizer: torch.optim.Optimizer, step: int) -> str | None:
    """Why a loaded optimizer's Adam moments are not of this run at ``step`` (None when they are)."""
    steps = []
    for param in (param for group in optimizer.param_groups for param in group["params"]):
        moments = optimizer.state.get(param, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in moments and (not isinstance(moments[name], torch.Tensor) or moments[name].shape != param.shape):
                return f"optimizer state: {name} of shape {tuple(getattr(moments[name], 'shape', ()))} for a " \
                       f"parameter of shape {tuple(param.shape)}"
        if moments:
            taken = moments.get("step")
            if not isinstance(taken, torch.Tensor) or taken.numel() != 1:  # AdamW keeps it as a one-number tensor
                return f"optimizer state: step {type(taken).__name__}, not a number"
            steps.append(int(taken))
    if max(steps, default=0) != step:
        return f"its optimizer state has gone through {max(steps, default=0)} steps, the checkpoint {step}"
    return None


def _scheduler_problem(loaded: Any, made: dict[str, Any], step: int) -> str | None:
    """Why a learning-rate scheduler state is not this run's at ``step`` (None when it is): the keys this run's
    scheduler has, its base learning rates, and ``step`` steps taken."""
    if not isinstance(loaded, dict) or set(loaded) != set(made):
        return "scheduler: not this run's learning-rate schedule"
    if loaded["base_lrs"] != made["base_lrs"]:
        return f"scheduler: base learning rates {loaded['base_lrs']!r}, this run's are {made['base_lrs']!r}"
    if loaded["last_epoch"] != step:
        return f"scheduler at step {loaded['last_epoch']!r}, the checkpoint at {step}"
    return None


def _read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state file; a ``DataError`` naming it if it cannot be read (cut short, overwritten, another
    file) rather than torch's traceback."""
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError, ValueError) as err:
        reason = str(err).strip().split("\n")[0].split(". ")[0].rstrip(".") or type(err).__name__  # torch's first
        # sentence: the rest is advice about checkpoints of its own
        raise damaged_state(path, reason) from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing or not isinstance(state["step"], int) or not isinstance(state["batch_index"], int):
        raise DataError(path, f"damaged checkpoint state (not a medvl training state: "
                              f"{'missing ' + ', '.join(missing) if missing else 'step is not a number'}); "
                              f"delete {path.parent} to start fresh")
    return state


def _checkpoint_model_step(model_dir: Path) -> int | None:
    """The step a checkpoint's model records in its meta.json; None if it records none (a checkpoint written
    before the step was recorded) or the file cannot be read (loading the model then names it)."""
    try:
        step = read_json(model_dir / META_FILE).get(CHECKPOINT_STEP)
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _head_targets(model: DualEncoder, dataset: Dataset) -> dict[str, torch.Tensor]:
    targets = {}
    for column, classes in model.meta["heads"].items():
        if column not in dataset.label_names:
            continue
        missing = sum(column not in r.labels for r in dataset)
        if missing:  # a head the model brings that the run's label columns do not name: no target to train it on
            raise InputError(f"{dataset.source}: {missing} of {len(dataset)} training records have no {column!r} "
                             f"label, which the model's head {column!r} is trained on")
        index = {name: i for i, name in enumerate(classes)}
        unknown = {str(r.labels[column]) for r in dataset} - set(index)
        if unknown:
            raise InputError(f"{dataset.source}: label {column!r} has classes {sorted(unknown)} "
                             f"the model's head does not know ({classes})")
        targets[column] = torch.tensor([index[str(r.labels[column])] for r in dataset])
    return targets


PRETRAINED_TEXT_LR_DIVISOR = 20  # a pretrained text tower's default peak lr is lr / 20: the lr of towers trained
# from scratch would wash out what it learnt


def text_learning_rate(model: Any, config: TrainConfig) -> float:
    """The peak learning rate of ``model``'s text tower (``text_encoder``): ``text_lr`` if set, else ``lr / 20``
    for a pretrained tower (all-minilm-l6-v2, a local Hugging Face folder), else ``lr``."""
    if config.text_lr is not None:
        return config.text_lr
    return config.lr / PRETRAINED_TEXT_LR_DIVISOR if model.config.text.kind == "pretrained" else config.lr


def trained_text_lr(model: Any, config: TrainConfig) -> float | None:
    """``text_learning_rate`` when some parameter of the text tower trains; None for a frozen tower or a model
    without one (a report generator)."""
    text = getattr(model, "text_encoder", None)
    if not isinstance(text, torch.nn.Module) or not any(param.requires_grad for param in text.parameters()):
        return None
    return text_learning_rate(model, config)


def param_groups(model: torch.nn.Module, config: TrainConfig,
                 prefix_lr: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: ``config.lr`` (or the lr of the first matching name prefix in ``prefix_lr``),
    weight decay on matrices only (not on norms, biases, temperatures); frozen parameters left out."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = next((value for prefix, value in (prefix_lr or {}).items() if name.startswith(prefix)), config.lr)
        decay = 0.0 if param.ndim < 2 else config.weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]


def _phased_warmup_cosine(step: int, first: int, second: int, warmup_fraction: float) -> float:
    """The learning-rate factor of ``step`` when a phase of ``first`` steps precedes one of ``second`` steps
    (``first`` may be 0): each phase warms up over ``warmup_fraction`` of its steps, then decays to 0."""
    if step < first:
        return _warmup_cosine(step, max(1, int(warmup_fraction * first)), first)
    return _warmup_cosine(step - first, max(1, int(warmup_fraction * second)), second)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _drop_metrics_after(path: Path, step: int) -> None:
    """Remove the metrics lines logged after ``step`` (the checkpoint a run resumes from): the resumed run logs
    those steps again. Written to a temporary file, then renamed. A line that is not JSON is dropped too (the last
    one cut short by the interruption, within a character or not); a line that is not UTF-8 text or nests too
    deeply (not a line medvl wrote) is a DataError naming the file."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            logged = loads_json(line).get("step")
        except json.JSONDecodeError:
            logged = None  # a line cut short by the interruption: dropped too
        except ValueError as err:  # not UTF-8 or nested too deeply: cut within a character if it is the last line
            if number < len(lines):
                raise DataError(path, f"line {number}: not a metrics line ({one_line(err, 80)}); remove that line "
                                      "or the file") from None
            logged = None
        except AttributeError:
            logged = None
        if isinstance(logged, int) and logged <= step:
            kept.append(line)
    if len(kept) < len(lines):
        atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # none yet (or unreadable: nothing to put back)
        return None


def _put_back(path: Path, content: bytes | None) -> None:
    """Write ``content`` (None: nothing) back to ``path`` after a failed fresh start truncated it; best effort,
    since the failure being raised (a full disk, say) says more."""
    if content is not None:
        with contextlib.suppress(OSError, WriteError):
            atomic_write_bytes(path, content)


def _append_jsonl(path: Path, line: dict[str, Any]) -> None:
    with write_errors_named(path), path.open("a") as handle:
        handle.write(json.dumps(line) + "\n")
