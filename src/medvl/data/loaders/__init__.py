"""Dataset loaders, chosen by what a path is: ``load_dataset(path)``.

Every loader returns a ``Dataset`` of ``Record`` with ``Dataset.source`` = the file or folder read,
``Dataset.label_names`` = every candidate label column, and two extra attributes:
``default_labels`` (``list[str]``, the label columns to use when none are asked for; ``[]`` if the
data does not say) and ``captions`` (a caption config dict from a ``dataset.json`` sidecar, or
``None``). Label values are class-name strings; a missing label is absent from ``Record.labels``.

Every file a dataset names by path (manifest rows, VQA image names, the sidecar's manifest, files
linked into a MedPix or DICOM folder) must resolve inside the dataset's folder unless
``allow_outside_root=True`` (``medvl.data.loaders.roots``). ``.npz`` arrays are size-checked from
their headers before reading (``max_npz_bytes``, ``medvl.data.loaders.npz``).
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ...errors import DataError, InputError
from ..record import Dataset
from .dicom import has_dicom_files, load_dicom_folder
from .iu_xray import find_report_archive, is_report_archive, load_iu_xray
from .manifest import MANIFEST_SUFFIXES, SIDECAR_NAME, find_manifest, load_manifest
from .medpix import DESCRIPTIONS_GLOB, is_medpix_folder, load_medpix
from .npz import MAX_NPZ_BYTES, load_npz
from .vqa import load_vqa, load_vqa_dataset, vqa_files

log = logging.getLogger(__name__)

__all__ = ["MAX_NPZ_BYTES", "SUPPORTED_KINDS", "load_dataset", "load_dicom_folder", "load_iu_xray", "load_manifest",
           "load_medpix", "load_npz", "load_vqa", "load_vqa_dataset"]

SUPPORTED_KINDS = (
    "a .csv or .jsonl manifest; "
    "a folder with dataset.json, manifest.csv, manifest.jsonl or metadata.csv; "
    "a MedMNIST-style .npz file (or a folder holding exactly one); "
    f"a MedPix 2.0 folder ({DESCRIPTIONS_GLOB}); "
    "an Open-i / IU X-ray report archive (.tgz, .tar.gz or .tar; or a folder holding one named *report*, "
    "or *nlmcxr* but not NLMCXR_png / NLMCXR_dcm); "
    "a VQA-RAD / SLAKE question .json file (or a folder of them); "
    "a folder of DICOM files (optional labels.csv)"
)


def _load_folder(folder: Path, allow_outside_root: bool, max_npz_bytes: int, keep_missing_images: bool = False
                 ) -> Dataset:
    manifest = find_manifest(folder, allow_outside_root)
    if manifest is not None:
        return load_manifest(manifest, allow_outside_root, sidecar_folder=folder,
                             keep_missing_images=keep_missing_images)
    if is_medpix_folder(folder):
        return load_medpix(folder, allow_outside_root)
    if find_report_archive(folder) is not None:
        return load_iu_xray(folder)
    if vqa_files(folder):
        return load_vqa_dataset(folder, allow_outside_root=allow_outside_root)
    archives = sorted(folder.glob("*.npz"))
    if not archives and has_dicom_files(folder):
        return load_dicom_folder(folder, allow_outside_root=allow_outside_root)
    if len(archives) == 1:
        return load_npz(archives[0], max_bytes=max_npz_bytes)
    found = f" ({len(archives)} .npz files: pass one)" if archives else ""
    raise DataError(folder, f"unrecognised dataset folder{found}; supported: {SUPPORTED_KINDS}")


def _load(path: Path, allow_outside_root: bool, max_npz_bytes: int, keep_missing_images: bool = False) -> Dataset:
    if not path.exists():
        raise DataError(path, "dataset path not found")
    if path.is_dir():
        return _load_folder(path, allow_outside_root, max_npz_bytes, keep_missing_images)
    suffix = path.suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        return load_manifest(path, allow_outside_root, keep_missing_images=keep_missing_images)
    if suffix == ".npz":
        return load_npz(path, max_bytes=max_npz_bytes)
    if is_report_archive(path):
        return load_iu_xray(path)
    if path.name == SIDECAR_NAME:  # the file that makes its folder a manifest dataset, not a VQA question file
        return _load_folder(path.parent, allow_outside_root, max_npz_bytes, keep_missing_images)
    if suffix == ".json":
        return load_vqa_dataset(path, allow_outside_root=allow_outside_root)
    raise DataError(path, f"unrecognised dataset file {suffix or '(no suffix)'!r}; "
                          f"supported: {SUPPORTED_KINDS}")


SHOWN_CLASSES = 50  # a label column of at most this many distinct values is a set of classes, named in warnings ...
CLASS_REPEATS = 2  # ... when its rows hold each value this many times on average: a column whose values are mostly
# distinct (a pilot table's history or indication notes) is free text, whatever its size: counts only


def label_variants(dataset: Dataset) -> dict[str, list[list[str]]]:
    """Per label column, the groups of its distinct values that read as one value written differently: the same
    words in another case or spacing ("Nodule" / "nodule"), or the same number ("1" / "1.0"). Empty when none."""
    found: dict[str, list[list[str]]] = {}
    for column in dataset.label_names:
        groups: dict[str, set[str]] = {}
        for value in {str(r.labels[column]) for r in dataset.records if column in r.labels}:
            groups.setdefault(_canonical_label(value), set()).add(value)
        variants = sorted(sorted(group) for group in groups.values() if len(group) > 1)
        if variants:
            found[column] = variants
    return found


def _canonical_label(value: str) -> str:
    """What a label value reads as: Unicode-normalised (NFKC: a macOS NFD 'é' is the NFC one), without invisible
    format characters (a zero-width space left by copy and paste), spacing collapsed, case folded, numbers as
    numbers, exactly ("1" / "1.0" / "1e0" are one; two 17-digit accession numbers a float would round alike are
    not)."""
    text = "".join(char for char in unicodedata.normalize("NFKC", value) if unicodedata.category(char) != "Cf")
    text = " ".join(text.split()).casefold()
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    return str(number.normalize()) if number.is_finite() else text


def _shown_values(group: list[str]) -> list[str]:
    """The values of a variant group as a warning shows them: repr, or ascii when two would print the same
    (NFC / NFD accents, which repr leaves as they are)."""
    composed = {unicodedata.normalize("NFC", value) for value in group}
    return [(repr if len(composed) == len(group) else ascii)(value[:40]) for value in group]


def check_label_columns(label_columns: Sequence[str] | None) -> list[str]:
    """``label_columns`` as a list of names, each once: a string (``list()`` would split it into letters, columns
    never named) or a name given twice is an InputError."""
    if isinstance(label_columns, str | bytes):
        raise InputError(f"label_columns must be a list of column names, got a {type(label_columns).__name__} "
                         f"({label_columns!r}); pass [{label_columns!r}]")
    columns = list(label_columns or [])
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        raise InputError(f"label column(s) {', '.join(repeated)} given more than once: {', '.join(columns)}")
    return columns


def load_dataset(path: str | Path, label_columns: Sequence[str] | None = None, *,
                 allow_outside_root: bool = False, max_npz_bytes: int = MAX_NPZ_BYTES,
                 keep_missing_images: bool = False) -> Dataset:
    """Load the dataset at ``path`` (see ``SUPPORTED_KINDS``).

    ``path`` may name a folder's ``dataset.json`` (the folder is loaded). With ``label_columns`` (a list of
    names, each once), keep only those label columns and drop records where any of them is
    empty (the count is logged); an unknown column is an ``InputError`` naming the source and the
    available columns. Files named by the dataset that resolve outside its folder are a
    ``DataError`` (with their count) unless ``allow_outside_root`` (``--allow-outside-root``).
    ``max_npz_bytes`` caps the array bytes an ``.npz`` may declare (see ``medvl.data.loaders.npz``).
    ``keep_missing_images``: a manifest's rows whose image file is missing are kept as records (for an audit,
    which lists them as unreadable) instead of being an error.
    """
    check_label_columns(label_columns)
    dataset = _load(Path(path), allow_outside_root, max_npz_bytes, keep_missing_images)
    log.info("%s: %d records, splits %s, label columns %s", dataset.source, len(dataset),
             dataset.splits, dataset.label_names)
    for column, groups in label_variants(dataset).items():
        filled = sum(column in r.labels for r in dataset.records)
        distinct = len({str(r.labels[column]) for r in dataset.records if column in r.labels})
        # class names are shown; a column of many, or mostly distinct, values may hold names or notes (patient data):
        # counts only
        categorical = distinct <= SHOWN_CLASSES and distinct * CLASS_REPEATS <= filled
        shown = ("; ".join(" / ".join(_shown_values(group)) for group in groups[:3])
                 + ("; ..." if len(groups) > 3 else "")) if categorical else \
            f"values not shown: the column has {distinct} distinct values in {filled} rows"
        log.warning("%s: label column %r writes %d value(s) in more than one way (%s): each spelling is a class "
                    "of its own; correct the data if they are one", dataset.source, column, len(groups), shown)
    if label_columns:
        dataset = dataset.with_labels(list(label_columns))
    return dataset
