"""The one record type every loader yields, and the dataset that holds them.

Label encoding: ``Record.labels`` maps a label column name to its value for this record. A value
is always a string: a class name for a categorical column, ``"0"`` / ``"1"`` for a binary column
of a multi-label dataset. A missing label is absent from the dict (never guessed); loaders skip records
whose requested label is empty and log how many they skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

ALL_SPLITS = "all"
# a record's ``meta["kind"]`` (the DICOM folder loader's: a 2D image or a 3D series) -> the model it fits
KIND_DIMS = {"image": 2, "volume": 3}
KIND_NAMES = {"image": "2D image(s)", "volume": "3D volume(s)"}
MODEL_TAKES = {2: "2D images", 3: "3D volumes (DxHxW)"}
# what a record without an image is good for: no medvl command (every one reads images), the Python API
TEXT_ONLY_USE = ("medvl's commands read images; use text-only data from Python (medvl.load_dataset for its texts "
                 "and labels, medvl.rag.labels to label its reports)")


@runtime_checkable
class LoadableImage(Protocol):
    """An image that is not one file, read when needed by its own ``load()`` (a DICOM series read
    as one volume: ``medvl.data.loaders.dicom.DicomVolume``)."""

    def load(self) -> np.ndarray: ...


ImageSource = Path | np.ndarray | LoadableImage  # what ``Record.images`` holds


@dataclass
class Record:
    """One case: image(s), optional text, labels, metadata and the split it belongs to."""

    id: str
    # file paths and loadable images (read lazily) or arrays (HxW, HxWxC or DxHxW); patient data: kept out of repr
    images: list[ImageSource] = field(repr=False)
    text: str | None = field(default=None, repr=False)  # report / caption; patient data: never logged
    labels: dict[str, Any] = field(default_factory=dict)
    # may carry report sections or case text (IU X-ray, MedPix): kept out of repr like ``text``
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    split: str = ALL_SPLITS

    @property
    def image(self) -> ImageSource:
        """The first (usually only) image of the record; ``InputError`` for a text-only record."""
        if not self.images:  # image commands refuse such a dataset first, naming its file (Dataset.require_images)
            raise InputError(f"record {self.id!r} has no image (a text-only record, as the IU X-ray reports' are); "
                             f"{TEXT_ONLY_USE}")
        return self.images[0]


SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def hash_split(record_id: str, fractions: Sequence[tuple[str, float]] = SPLIT_FRACTIONS) -> str:
    """A split decided by the record id alone: the same id always lands in the same split, on any
    machine and whatever the other records are (sha1 of the id, first 8 bytes, as a fraction of 2**64)."""
    digest = hashlib.sha1(record_id.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    total = 0.0
    for name, fraction in fractions:
        total += fraction
        if position < total:
            return name
    return fractions[-1][0]


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def canonical_bytes(array: np.ndarray) -> bytes:
    """An array's values, dtype and shape as bytes: equal for equal arrays only (what their digests hash)."""
    return np.ascontiguousarray(array).tobytes() + str((array.dtype.str, array.shape)).encode()


def _content_digest(source: ImageSource, sizes: set[int]) -> bytes | None:
    """SHA-256 of an image file's bytes (only when its size is in ``sizes``: no other file can equal it
    otherwise) or of an array's dtype, shape and values; None for an image read by its own loader (a DICOM
    series) or a file that cannot be read."""
    if isinstance(source, np.ndarray):
        return hashlib.sha256(canonical_bytes(source)).digest()
    if not isinstance(source, Path) or (size := _file_size(source)) < 0 or size not in sizes:
        return None
    digest = hashlib.sha256()
    try:
        with source.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return b"file:" + digest.digest()


class Dataset(Sequence[Record]):
    """A sized, indexable sequence of records from one source."""

    def __init__(self, records: list[Record], source: str, label_names: Sequence[str] = (),
                 default_labels: Sequence[str] = (), captions: dict[str, Any] | None = None,
                 files: Sequence[tuple[Path, str | None]] | None = None):
        self.records = list(records)
        self.source = source  # the path it was read from, for error messages
        # the files the records were read from, each with the one split it holds (None: any split); None: the
        # source itself when it is a file (a folder of VQA question files names each file and its split)
        self.files = None if files is None else list(files)
        self.label_names = list(label_names)  # every candidate label column
        self.default_labels = list(default_labels)  # the columns to use when none are asked for
        self.captions = captions  # the dataset's own caption config (templates, class descriptions)

    def shared_images(self, other: Dataset) -> int:
        """How many records of ``other`` have an image file (same resolved path) that a record of this dataset
        has, or are one of its records held as arrays (an ``.npz``: the same file and record id): nonzero when a
        split meant to be apart from this one overlaps it (a leak)."""
        mine = {source.resolve() for record in self.records for source in record.images if isinstance(source, Path)}
        same_file = bool(self.source) and _resolved(self.source) == _resolved(other.source)
        my_ids = {record.id for record in self.records} if same_file else set()
        return sum(any(isinstance(source, Path) and source.resolve() in mine for source in record.images)
                   or (record.id in my_ids and not any(isinstance(source, Path) for source in record.images))
                   for record in other.records)

    def copied_images(self, other: Dataset) -> int:
        """How many records of ``other`` that share no image file with this dataset (``shared_images``) have
        an image byte for byte equal to one of this dataset's: a copy of the data under another folder or
        file name, or one image filed in two splits (arrays: equal dtype, shape and values). Files are read
        only when their size matches one of the other side's, so two unrelated datasets cost a ``stat`` per
        file; an image that cannot be read counts as no copy (loading it reports the problem)."""
        mine_paths = {source.resolve() for record in self.records for source in record.images
                      if isinstance(source, Path)}
        candidates = [record for record in other.records
                      if not any(isinstance(s, Path) and s.resolve() in mine_paths for s in record.images)]
        their_sizes = {_file_size(s) for record in candidates for s in record.images if isinstance(s, Path)}
        mine = {digest for record in self.records for source in record.images
                if (digest := _content_digest(source, their_sizes)) is not None}
        if not mine:
            return 0
        my_sizes = {_file_size(s) for record in self.records for s in record.images if isinstance(s, Path)}
        return sum(any(_content_digest(source, my_sizes) in mine for source in record.images)
                   for record in candidates)

    def columns(self) -> list[str]:
        """Every column name the records carry, sorted: the label columns and the metadata keys (names only: a
        group, subgroup or covariate column is looked up among them)."""
        return sorted(set(self.label_names) | {key for record in self.records for key in record.meta})

    def subset(self, records: list[Record], label_names: Sequence[str] | None = None) -> Dataset:
        """A dataset of other records from the same source, keeping its settings."""
        names = self.label_names if label_names is None else label_names
        defaults = [c for c in self.default_labels if c in names]
        return Dataset(records, self.source, names, defaults, self.captions, self.files)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(self.records[index])
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"Dataset({self.source!r}, n={len(self)}, splits={self.splits}, labels={self.label_names})"

    @property
    def splits(self) -> list[str]:
        """The split names present, in first-seen order."""
        return list(dict.fromkeys(r.split for r in self.records))

    def select(self, split: str) -> Dataset:
        """Records of one split; ``all`` keeps every record."""
        if split == ALL_SPLITS:
            return self
        if split not in self.splits:
            raise InputError(
                f"{self.source}: no split {split!r}; splits present: {', '.join(self.splits) or 'none'}"
                f" (or 'all')"
            )
        variants = [name for name in self.splits if name != split and name.strip().lower() == split.strip().lower()]
        if variants:  # "train" and "Train": the records of the other spelling are left out
            log.warning("%s: split %r leaves out %d records of split(s) %s, whose names differ from it only in case "
                        "or spaces; correct the split column if they belong together", self.source, split,
                        sum(r.split in variants for r in self.records), ", ".join(map(repr, variants)))
        return self.subset([r for r in self.records if r.split == split])

    def kinds(self) -> set[str]:
        """The record kinds (``meta["kind"]``: ``image`` / ``volume``) of a DICOM folder's records; empty for
        other loaders, whose records carry none."""
        return {kind for record in self.records if (kind := record.meta.get("kind")) in KIND_DIMS}

    def require_images(self) -> None:
        """InputError naming the dataset's file or folder when a record has no image (a text-only dataset such
        as the IU X-ray reports): a command that reads images refuses it before any work, rather than at its
        first record (``Record.image``), which knows no file."""
        missing = sum(not record.images for record in self.records)
        if not missing:
            return
        what = (f"a text-only dataset ({len(self)} records, none with an image)" if missing == len(self) else
                f"{missing} of its {len(self)} records have no image (text only)")
        raise InputError(f"{self.source}: {what}; {TEXT_ONLY_USE}")

    def for_spatial_dims(self, spatial_dims: int) -> Dataset:
        """The records a model of ``spatial_dims`` (2: images, 3: volumes) can take. Records whose
        ``meta["kind"]`` is of the other kind (a DICOM folder, a PACS pull, holds 2D images, ``image``,
        next to 3D series, ``volume``) are left out, with a warning counting them per kind; records
        without a kind (other loaders: their images are checked when read) are all kept. InputError
        when no record is left, or when a record has no image at all (``require_images``)."""
        self.require_images()
        other = Counter(kind for record in self.records
                        if (kind := record.meta.get("kind")) in KIND_DIMS and KIND_DIMS[kind] != spatial_dims)
        if not other:
            return self
        kept = [record for record in self.records
                if KIND_DIMS.get(str(record.meta.get("kind")), spatial_dims) == spatial_dims]
        counts = " and ".join(f"{count} {KIND_NAMES[kind]}" for kind, count in sorted(other.items()))
        takes = MODEL_TAKES.get(spatial_dims, f"{spatial_dims}D input")
        if not kept:
            raise InputError(f"{self.source}: no record fits a {spatial_dims}D model, which takes {takes}: its "
                             f"{len(self)} record(s) are {counts}")
        log.warning("%s: left out %s, which a %dD model cannot take (it takes %s); %d record(s) remain",
                    self.source, counts, spatial_dims, takes, len(kept))
        return self.subset(kept)

    def classes(self, label: str) -> list[str]:
        """Sorted distinct class names of a categorical label column."""
        self.require_label(label)
        return sorted({str(r.labels[label]) for r in self.records if label in r.labels})

    def require_label(self, label: str) -> None:
        if label not in self.label_names:
            raise InputError(
                f"{self.source}: unknown label column {label!r}; "
                f"available: {', '.join(self.label_names) or 'none'}"
            )

    def with_labels(self, labels: Sequence[str]) -> Dataset:
        """Keep only the given label columns, dropping records where any of them is empty."""
        for label in labels:
            self.require_label(label)
        kept = [r for r in self.records if all(label in r.labels for label in labels)]
        if len(kept) < len(self.records):  # of the records given: one split's, when a split was chosen first
            where = f" of split {self.splits[0]!r}" if len(self.splits) == 1 and self.splits[0] != ALL_SPLITS else ""
            log.info("%s: skipped %d records with an empty label in %s (of %d records%s)", self.source,
                     len(self.records) - len(kept), ", ".join(labels), len(self.records), where)
        subset = self.subset(kept, list(labels))
        subset.default_labels = list(labels)
        return subset


def records_digest(records: Sequence[Record], resolved: bool = False) -> str:
    """SHA-256 over each record's id, split, labels, metadata and report, and its images: an array's values, a
    file's path, size and modification time (a replaced file has a new one; reading every file to hash it
    would double the reading of an index build or a training run). A file that cannot be stat'ed counts as
    missing: the caller then names it when it reads it. Identifies the data a resumed index build or training
    run continues. ``resolved``: each file's resolved absolute path (its folder's symbolic links followed), so
    the digest does not depend on how the data's path was typed nor on the working directory; else the path as
    the loader spelt it (relative paths stay relative: what training runs recorded before)."""
    digest = hashlib.sha256()
    folders: dict[str, str] = {}  # a folder -> its resolved path: resolved once, not once per file
    for record in records:
        digest.update(json.dumps([record.id, record.split, record.labels, record.meta, record.text or None],
                                 sort_keys=True, default=str).encode())
        for image in record.images:
            if isinstance(image, np.ndarray):
                digest.update(hashlib.sha256(canonical_bytes(image)).digest())
                continue
            files = [image] if isinstance(image, Path) else list(getattr(getattr(image, "series", None), "files", []))
            for file in files:  # a DICOM series (``DicomVolume``): its slice files
                try:
                    stat = Path(file).stat()
                    state = f"|{stat.st_size}|{stat.st_mtime_ns}"
                except OSError:
                    state = "|missing"
                name = _resolved_file(file, folders) if resolved else os.fspath(file)
                digest.update(os.fsencode(name) + state.encode())  # the name's bytes: it may hold any
    return digest.hexdigest()


def _resolved_file(file: str | os.PathLike[str], folders: dict[str, str]) -> str:
    """``file`` with its folder resolved (``folders`` caches each folder's resolved path)."""
    folder, name = os.path.split(os.path.abspath(file))
    if folder not in folders:
        folders[folder] = os.path.realpath(folder)
    return os.path.join(folders[folder], name)


def _resolved(source: str | Path | None) -> str:
    """A dataset's source as a resolved path (its file or folder), for telling two loads of one file apart from
    two files."""
    return str(Path(source).resolve()) if source else ""
