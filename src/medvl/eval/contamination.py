"""Was a scored split part of the model's training data? A trust check on every evaluation's inputs.

A model trained by ``medvl train`` (or ``medvl train vqa`` / ``report``) records in its meta (``training``)
which data it learned from, as a SHA-256 of the data's resolved path (``data_sha256``: the path itself,
which may name a patient or a project, is not kept beyond what ``data`` already holds), and the splits of
the records it trained on (``splits``). An evaluation of the same data then counts the scored records of
those splits: figures on them are training figures, not a test, so the result gets a
``trained_on_scored`` block and a warning (``records_trained``: how many the model learned from; fewer
than ``records`` when it trained on a part of the split, e.g. a benchmark's held-out cases).
Only the path and split names are compared: a copy of the data elsewhere is not recognised, and nothing
about single images is kept in the model. A VQA model's held-out questions (its ``holdout`` meta) are not
counted (``questions_trained_on``).

``copies_in_fit`` is the other direction: scored images that are byte-for-byte copies of the images a probe,
threshold or bank was fitted on, found by content (``Dataset.copied_images``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.record import Dataset

log = logging.getLogger(__name__)


def data_sha256(source: str) -> str:
    """SHA-256 of a dataset source's resolved path (the same data read from another folder differs)."""
    return hashlib.sha256(str(Path(source).resolve()).encode("utf-8")).hexdigest()


def training_data(dataset: Dataset) -> dict[str, Any]:
    """What a model's meta ``training`` block records of the data it trained on."""
    return {"data_sha256": data_sha256(dataset.source), "splits": sorted({record.split for record in dataset})}


def trained_on_scored(model: Any, dataset: Dataset, what: str = "scored records") -> dict[str, Any] | None:
    """How many records of ``dataset`` come from the data and splits ``model`` was trained on; None when none
    (or the model records no training data: a transformers folder, or a medvl model saved before this check).
    A warning says so (counts and split names only)."""
    return _trained_block(model, dataset.source, [record.split for record in dataset], what)


def questions_trained_on(model: Any, items: Sequence[Any], source: str) -> dict[str, Any] | None:
    """``trained_on_scored`` for VQA questions (``VQAItem``) read from ``source``: the questions a VQA model held
    out from its training (``--holdout``, kept in its meta) are not counted."""
    from ..models.vqa import held_out_ids

    held = held_out_ids((getattr(model, "meta", None) or {}).get("holdout") or {})
    return _trained_block(model, source, [None if (item.split, item.qid) in held else item.split for item in items],
                          "scored questions")


def _trained_block(model: Any, source: str, splits_scored: list[str | None], what: str) -> dict[str, Any] | None:
    """The ``trained_on_scored`` block of scored records from ``source`` whose splits are ``splits_scored``
    (None: a record known to be held out of training)."""
    training = (getattr(model, "meta", None) or {}).get("training") or {}
    if not training.get("data_sha256") or training["data_sha256"] != data_sha256(source):
        return None
    splits = set(training.get("splits") or [])
    seen = sum(split in splits for split in splits_scored)
    if not seen:
        return None
    trained = training.get("records", training.get("questions"))
    log.warning("%d of %d %s come from split(s) %s of the data the model was trained on (it learned from %s "
                "of them): figures on them are training figures, not a test", seen, len(splits_scored), what,
                ", ".join(sorted(splits)), trained if trained is not None else "some")
    return {"records": seen, "of": len(splits_scored), "splits": sorted(splits), "records_trained": trained}


def copies_in_fit(fit: Dataset, scored: Dataset, fit_name: str, what: str = "scored images") -> dict[str, Any] | None:
    """How many records of ``scored`` (``what``, in the warning) have an image that is a byte-for-byte copy of
    an image in ``fit`` (the images a probe, threshold, temperature or bridge was fitted on, named ``fit_name``
    in the result and the warning), under another path or file name: ``Dataset.copied_images``. None when
    none. Not refused, unlike the same image file in both (``Dataset.shared_images``): official splits can
    hold a few such copies (PneumoniaMNIST's train and val do), and the figures then say how many. Counts
    only, no file names, in the warning."""
    copies = fit.copied_images(scored)
    if not copies:
        return None
    log.warning("%d of %d %s are byte-for-byte copies of images in %s (another file or split): on them the "
                "figures measure what was fitted, not generalisation; `medvl audit` lists duplicates", copies,
                len(scored), what, fit_name)
    return {"records": copies, "of": len(scored), "fit": fit_name}
