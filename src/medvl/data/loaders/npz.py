"""MedMNIST-style ``.npz`` loader.

The archive holds ``{split}_images`` and ``{split}_labels`` arrays for any set of split names
(MedMNIST: ``train``, ``val``, ``test``):

- images: ``(N, H, W)`` grayscale, ``(N, H, W, 3)`` RGB, or ``(N, D, H, W)`` 3D volumes; each
  record holds a view of its slice (no per-record copy);
- labels ``(N,)`` or ``(N, 1)`` integer class indices: one categorical label column ``label``
  whose values are class names, from ``class_names=`` or a ``class_names`` / ``label_names``
  array in the archive, else the index as a string (``"0"``, ``"1"``, ...);
- labels ``(N, K)``, K > 1, of 0/1: multi-label, one binary column per class with values ``"0"``
  / ``"1"`` (NaN = missing); columns are named by the class names when given, else ``label_0``
  .. ``label_{K-1}``.

Record ids are ``"{split}_{index}"``. ``dataset.default_labels`` is every label column.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..record import Dataset, Record

log = logging.getLogger(__name__)

CLASS_NAME_KEYS = ("class_names", "label_names")
LABEL_COLUMN = "label"


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the archive, read into memory once."""
    if not zipfile.is_zipfile(path):
        raise DataError(path, "not an .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(path, f"cannot read the arrays ({error})") from None


def _stored_class_names(path: Path, arrays: dict[str, np.ndarray]) -> list[str] | None:
    key = next((key for key in CLASS_NAME_KEYS if key in arrays), None)
    if key is None:
        return None
    names = arrays[key]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(path, f"{key!r} must be a 1-D string array, got {names.dtype} "
                              f"{names.shape}")
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names.tolist()]


def _check_images(path: Path, key: str, images: np.ndarray) -> None:
    if images.ndim not in (3, 4) or images.dtype.kind not in "biuf":
        raise DataError(path, f"{key!r} must be a numeric (N,H,W), (N,H,W,3) or (N,D,H,W) array, "
                              f"got {images.dtype} {images.shape}")


def _class_indices(path: Path, key: str, labels: np.ndarray) -> np.ndarray:
    """Categorical labels as int64 indices, refusing non-integer or negative values."""
    flat = labels.reshape(-1)
    if flat.dtype.kind == "f" and not np.all(np.isfinite(flat) & (flat == np.round(flat))):
        raise DataError(path, f"{key!r} must hold integer class indices")
    if flat.dtype.kind not in "biuf":
        raise DataError(path, f"{key!r} must hold integer class indices, got {flat.dtype}")
    indices = flat.astype(np.int64)
    if indices.size and indices.min() < 0:
        raise DataError(path, f"{key!r} holds a negative class index ({indices.min()})")
    return indices


def _categorical(path: Path, key: str, labels: np.ndarray,
                 class_names: Sequence[str] | None) -> list[dict[str, str]]:
    indices = _class_indices(path, key, labels)
    if class_names is not None and indices.size and indices.max() >= len(class_names):
        raise DataError(path, f"{key!r} holds class index {indices.max()} but only "
                              f"{len(class_names)} class names are given")
    names = list(class_names) if class_names is not None else None
    return [{LABEL_COLUMN: names[i] if names else str(i)} for i in indices.tolist()]


def _multi_label_columns(path: Path, count: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [f"{LABEL_COLUMN}_{k}" for k in range(count)]
    if len(class_names) != count:
        raise DataError(path, f"{len(class_names)} class names for {count} label columns")
    return list(class_names)


def _multi_label(path: Path, key: str, labels: np.ndarray,
                 columns: list[str]) -> list[dict[str, str]]:
    values = labels.astype(np.float64)
    known = ~np.isnan(values)
    if not np.all((values[known] == 0) | (values[known] == 1)):
        raise DataError(path, f"{key!r} has shape {labels.shape}: a multi-label array must hold "
                              "only 0/1 (or NaN for missing)")
    return [
        {column: str(int(value)) for column, value, ok in zip(columns, row, mask, strict=True)
         if ok}
        for row, mask in zip(values.tolist(), known.tolist(), strict=True)
    ]


def _split_labels(path: Path, split: str, arrays: dict[str, np.ndarray],
                  class_names: Sequence[str] | None) -> tuple[list[str], list[dict[str, str]]]:
    """(label columns, per-record labels) of one split."""
    key = f"{split}_labels"
    images = arrays[f"{split}_images"]
    if key not in arrays:
        raise DataError(path, f"'{split}_images' has no matching {key!r} array")
    labels = arrays[key]
    if labels.shape[:1] != images.shape[:1]:
        raise DataError(path, f"{key!r} has {labels.shape[0] if labels.ndim else 0} rows but "
                              f"'{split}_images' has {images.shape[0]}")
    if labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1):
        return [LABEL_COLUMN], _categorical(path, key, labels, class_names)
    if labels.ndim == 2:
        columns = _multi_label_columns(path, labels.shape[1], class_names)
        return columns, _multi_label(path, key, labels, columns)
    raise DataError(path, f"{key!r} must be (N,), (N,1) or (N,K), got {labels.shape}")


def load_npz(path: str | Path, class_names: Sequence[str] | None = None) -> Dataset:
    """Load a MedMNIST-style ``.npz`` (see the module docstring for the layout)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    arrays = _read_arrays(path)
    splits = [key[: -len("_images")] for key in arrays if key.endswith("_images")]
    if not splits:
        raise DataError(path, f"no '<split>_images' arrays; keys found: "
                              f"{', '.join(arrays) or 'none'}")
    if class_names is None:
        class_names = _stored_class_names(path, arrays)
    records: list[Record] = []
    label_names: list[str] | None = None
    for split in splits:
        images = arrays[f"{split}_images"]
        _check_images(path, f"{split}_images", images)
        columns, labels = _split_labels(path, split, arrays, class_names)
        if label_names is not None and columns != label_names:
            raise DataError(path, f"'{split}_labels' columns {columns} differ from the other "
                                  f"splits' {label_names}")
        label_names = columns
        records += [Record(id=f"{split}_{index}", images=[images[index]], labels=label,
                           split=split) for index, label in enumerate(labels)]
    used = {f"{s}_{kind}" for s in splits for kind in ("images", "labels")} | set(CLASS_NAME_KEYS)
    if set(arrays) - used:
        log.warning("%s: ignoring arrays %s", path, ", ".join(sorted(set(arrays) - used)))
    dataset = Dataset(records, source=str(path), label_names=label_names or [],
                      default_labels=label_names or [])
    return dataset
