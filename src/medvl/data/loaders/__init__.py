"""Dataset loaders, chosen by what a path is: ``load_dataset(path)``.

Every loader returns a ``Dataset`` of ``Record`` with ``Dataset.source`` = the file or folder read,
``Dataset.label_names`` = every candidate label column, and two extra attributes:
``default_labels`` (``list[str]``, the label columns to use when none are asked for; ``[]`` if the
data does not say) and ``captions`` (a caption config dict from a ``dataset.json`` sidecar, or
``None``). Label values are class-name strings; a missing label is absent from ``Record.labels``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from ...errors import DataError
from ..record import Dataset
from .manifest import MANIFEST_SUFFIXES, find_manifest, load_manifest
from .medpix import DESCRIPTIONS_GLOB, is_medpix_folder, load_medpix
from .npz import load_npz

log = logging.getLogger(__name__)

__all__ = ["SUPPORTED_KINDS", "load_dataset", "load_manifest", "load_medpix", "load_npz"]

SUPPORTED_KINDS = (
    "a .csv or .jsonl manifest; "
    "a folder with dataset.json, manifest.csv, manifest.jsonl or metadata.csv; "
    "a MedMNIST-style .npz file (or a folder holding exactly one); "
    f"a MedPix 2.0 folder ({DESCRIPTIONS_GLOB})"
)


def _load_folder(folder: Path) -> Dataset:
    manifest = find_manifest(folder)
    if manifest is not None:
        return load_manifest(manifest)
    if is_medpix_folder(folder):
        return load_medpix(folder)
    archives = sorted(folder.glob("*.npz"))
    if len(archives) == 1:
        return load_npz(archives[0])
    found = f" ({len(archives)} .npz files: pass one)" if archives else ""
    raise DataError(folder, f"unrecognised dataset folder{found}; supported: {SUPPORTED_KINDS}")


def _load(path: Path) -> Dataset:
    if not path.exists():
        raise DataError(path, "dataset path not found")
    if path.is_dir():
        return _load_folder(path)
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return load_manifest(path)
    if suffix == ".npz":
        return load_npz(path)
    raise DataError(path, f"unrecognised dataset file {suffix or '(no suffix)'!r}; "
                          f"supported: {SUPPORTED_KINDS}")


def load_dataset(path: str | Path, label_columns: Sequence[str] | None = None) -> Dataset:
    """Load the dataset at ``path`` (see ``SUPPORTED_KINDS``).

    With ``label_columns``, keep only those label columns and drop records where any of them is
    empty (the count is logged); an unknown column is an ``InputError`` naming the source and the
    available columns.
    """
    dataset = _load(Path(path))
    log.info("%s: %d records, splits %s, label columns %s", dataset.source, len(dataset),
             dataset.splits, dataset.label_names)
    if label_columns:
        dataset = dataset.with_labels(list(label_columns))
    return dataset
