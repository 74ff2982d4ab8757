"""Was a scored split part of the model's training data? A trust check on every evaluation's inputs.

A model trained by ``medvl train`` (or ``medvl train vqa`` / ``report``) records in its meta (``training``)
which data it learned from: a SHA-256 of the data's resolved path (``data_sha256``: the path itself, which may
name a patient or a project, is not kept beyond what ``data`` already holds), the splits of the records it
trained on (``splits``), and each file those records were read from (``files``: a manifest, an ``.npz``, each
VQA question file), by the SHA-256 of its resolved path and of its bytes, with the splits learned from it. An
evaluation then counts the scored records that come from those splits of the same data path, or from one of
those files however it is named (a folder or the file in it, a relative or absolute path, a symbolic link) or
copied: figures on them are training figures, not a test, so the result gets a ``trained_on_scored`` block and
a warning (``records_trained``: how many the model learned from; fewer than ``records`` when it trained on a
part of the split, e.g. a benchmark's held-out cases). A question file holds one split named by the file, so a
copy under another name counts under the split it was learned as. Only those files are compared: images
copied under a new table or question file are not recognised here (``copies_in_fit`` compares images), and
nothing about single images is kept in the model. A model trained from a trained one (a saved folder fine-tuned,
a VQA model or report generator started from a dual encoder with ``--init``) keeps the starting model's blocks in
its own (``earlier``: every run its weights learned from, transitively), and each is checked. A VQA model's
held-out questions (its ``holdout`` meta) are not counted (``questions_trained_on``). An OOD guard's fit and
calibration data are recorded and compared the same way (``eval.ood.guard_fitted_on_scored``).

``copies_in_fit`` is the other direction: scored images that are byte-for-byte copies of the images a probe,
threshold or bank was fitted on, found by content (``Dataset.copied_images``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.loaders.vqa import question_files
from ..data.record import Dataset

log = logging.getLogger(__name__)


def data_sha256(source: str | Path) -> str:
    """SHA-256 of a dataset source's resolved path, as the bytes that name it (the same data read from another
    folder differs; a name may hold bytes that are not UTF-8)."""
    return hashlib.sha256(os.fsencode(Path(source).resolve())).hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes, read in blocks; None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


DataFiles = Sequence[tuple[Path, str | None]]  # each file read, with the one split it holds (None: any split)


def dataset_files(dataset: Dataset) -> list[tuple[Path, str | None]]:
    """The files ``dataset``'s records were read from (``Dataset.files``; else its source when it is a file)."""
    if dataset.files is not None:
        return list(dataset.files)
    return [(Path(dataset.source), None)] if dataset.source and Path(dataset.source).is_file() else []


def file_entries(files: DataFiles, splits: Sequence[str]) -> list[dict[str, Any]]:
    """What a ``training`` block records of the files learned from: each file whose split (or any split) is one of
    ``splits``, by the SHA-256 of its resolved path and of its bytes, with the splits learned from it."""
    entries = []
    for path, held in dict.fromkeys(files):
        learned = sorted(set(splits) if held is None else {held} & set(splits))
        if learned:
            entries.append({"path_sha256": data_sha256(path), "sha256": file_sha256(path), "splits": learned})
    return entries


def training_data(dataset: Dataset) -> dict[str, Any]:
    """What a model's meta ``training`` block records of the data it trained on."""
    splits = sorted({record.split for record in dataset})
    return {"data_sha256": data_sha256(dataset.source), "splits": splits,
            "files": file_entries(dataset_files(dataset), splits)}


def with_earlier(block: dict[str, Any], starting: dict[str, Any] | None) -> dict[str, Any]:
    """The ``training`` block of a run (``block``) that started from weights trained as ``starting`` records (the
    starting model's ``training`` block; None or empty for a random init): its runs are kept under ``earlier``,
    so that the data every one of them learned from stays known to ``trained_on_scored``."""
    earlier = training_blocks(starting)
    return {**block, "earlier": earlier} if earlier else block


def copy_training(starting: Any, model: Any) -> None:
    """A model whose towers are copied from ``starting`` (``--init``) has learned what ``starting`` learned: its
    ``training`` block, which the run's own then keeps (``with_earlier``)."""
    training = _training(starting)
    if training:
        model.meta["training"] = training


def training_blocks(training: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A ``training`` block and the earlier runs it keeps (``with_earlier``), latest first, each without its
    ``earlier``: every run the weights learned from."""
    if not training:
        return []
    earlier = [block for block in training.get("earlier") or [] if isinstance(block, dict)]
    return [{key: value for key, value in training.items() if key != "earlier"}, *earlier]


def learned_splits(block: dict[str, Any], source: str, files: DataFiles,
                   scored: Sequence[tuple[Path | None, str]]) -> list[str | None]:
    """Per scored record (the file it was read from, or None when not known, and its split), the split it was
    learned under by the model (or fitted on by a guard) whose ``training_data`` block is ``block``; None for a
    record it did not learn from. A record counts when it comes from the same data path (``data_sha256``) in a
    split of the block, or from a file the block records, named in any way (the resolved path: a folder or the
    file in it, a relative path, a symbolic link) or a byte-for-byte copy of one: for a file that holds one split
    named by the file (a VQA question file), every record of it, under the split the block learned it as."""
    splits = set(block.get("splits") or [])
    if block.get("data_sha256") and block["data_sha256"] == data_sha256(source):
        return [split if split in splits else None for _, split in scored]
    entries = [entry for entry in block.get("files") or [] if isinstance(entry, dict)]
    held = dict(files)
    matched = {path: _matching_entry(entries, path) for path in held} if entries else {}
    learned: list[str | None] = []
    for path, split in scored:
        entry = matched.get(path) if path is not None else None
        names = set(entry["splits"]) if entry else set()
        if entry and path is not None and held.get(path) is not None and len(names) == 1:
            learned.append(next(iter(names)))
        else:
            learned.append(split if split in names else None)
    return learned


def _matching_entry(entries: list[dict[str, Any]], path: Path) -> dict[str, Any] | None:
    """The recorded file entry that is ``path`` (its resolved path), else one with its bytes (read only then)."""
    by_path = data_sha256(path)
    found = next((entry for entry in entries if entry.get("path_sha256") == by_path), None)
    if found is not None:
        return found
    content = file_sha256(path)
    return next((entry for entry in entries if content and entry.get("sha256") == content), None)


def record_files(dataset: Dataset) -> list[tuple[Path | None, str]]:
    """Per record of ``dataset``, the file it was read from (None when not known) and its split."""
    files = dataset_files(dataset)
    by_split = {held: path for path, held in files if held is not None}
    anywhere = next((path for path, held in files if held is None), None)
    return [(by_split.get(record.split, anywhere), record.split) for record in dataset]


def scored_records(dataset: Dataset, task: str, label: str | None = None) -> Dataset:
    """The records of ``dataset`` a task scores, as its evaluation picks them: those with a report for
    retrieval, those with ``label`` otherwise (every record when there is no label)."""
    if task == "retrieval":
        return dataset.subset([record for record in dataset if record.text])
    if label is not None:
        return dataset.subset([record for record in dataset if label in record.labels])
    return dataset


def trained_on_scored(model: Any, dataset: Dataset, what: str = "scored records") -> dict[str, Any] | None:
    """How many records of ``dataset`` come from the data and splits ``model`` was trained on, in any of the runs
    its weights learned from (``training_blocks``); None when none (or the model records no training data: a
    transformers folder, or a medvl model saved before this check). A warning says so (counts and split names
    only)."""
    blocks = training_blocks(_training(model))
    files, scored = dataset_files(dataset), record_files(dataset)
    learned = [learned_splits(block, dataset.source, files, scored) for block in blocks]
    return _trained_block(blocks, learned, len(dataset), what)


def questions_trained_on(model: Any, items: Sequence[Any], source: str) -> dict[str, Any] | None:
    """``trained_on_scored`` for VQA questions (``VQAItem``) read from ``source``: the questions a VQA model held
    out from its training (``--holdout``, kept in its meta) are not counted (of its own run: an earlier run it
    started from held none out)."""
    from ..models.vqa import held_out_ids

    blocks = training_blocks(_training(model))
    if not blocks:
        return None
    files, scored = question_files(items), [(item.file, item.split) for item in items]
    learned = [learned_splits(block, source, files, scored) for block in blocks]
    held = held_out_ids((getattr(model, "meta", None) or {}).get("holdout") or {})
    learned[0] = [None if (split, item.qid) in held else split for split, item in zip(learned[0], items, strict=True)]
    return _trained_block(blocks, learned, len(items), "scored questions")


def _training(model: Any) -> dict[str, Any]:
    return (getattr(model, "meta", None) or {}).get("training") or {}


def _trained_block(blocks: list[dict[str, Any]], learned: list[list[str | None]], scored: int,
                   what: str) -> dict[str, Any] | None:
    """The ``trained_on_scored`` block of ``scored`` records, given per training run (``blocks``) the split each
    record was learned under (None: not learned from, e.g. held out of training). ``records_trained`` is the
    training records of the run that learned from them (the most of any one, when several did)."""
    first = [next((split for split in splits if split is not None), None) for splits in zip(*learned, strict=True)]
    seen = sum(split is not None for split in first)
    if not seen:
        return None
    splits = sorted({split for split in first if split is not None})
    counts = [block.get("records", block.get("questions")) for block, run in zip(blocks, learned, strict=True)
              if any(split is not None for split in run)]
    trained = max((count for count in counts if count is not None), default=None)
    log.warning("%d of %d %s come from split(s) %s of the data the model was trained on (it learned from %s "
                "of them): figures on them are training figures, not a test", seen, scored, what,
                ", ".join(splits), trained if trained is not None else "some")
    return {"records": seen, "of": scored, "splits": splits, "records_trained": trained}


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
