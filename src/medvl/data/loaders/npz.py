"""MedMNIST-style ``.npz`` loader.

The archive holds ``{split}_images`` and ``{split}_labels`` arrays for any set of split names
(MedMNIST: ``train``, ``val``, ``test``):

- images: ``(N, H, W)`` grayscale (or ``(N, H, W, 1)``, read as such), ``(N, H, W, 3)`` RGB (whatever the
  dtype: a 3D model refuses them), or ``(N, D, H, W)`` 3D volumes; each record holds a view of its slice (no
  per-record copy); a last axis of 2 or 4 (grey + alpha, RGBA) is refused rather than read as a volume 2 or 4
  pixels wide;
- labels ``(N,)`` or ``(N, 1)`` integer class indices: one categorical label column ``label``
  whose values are class names, from ``class_names=`` or a ``class_names`` / ``label_names``
  array in the archive, else the index as a string (``"0"``, ``"1"``, ...);
- labels ``(N, K)``, K > 1, of 0/1: multi-label, one binary column per class with values ``"0"``
  / ``"1"`` (NaN = missing); columns are named by the class names when given, else ``label_0``
  .. ``label_{K-1}``. The array must be of numbers (bool, integer or float): text (``'yes'`` / ``'no'``, even
  ``'0'`` / ``'1'``), dates and complex values are refused.

Record ids are ``"{split}_{index}"``. ``dataset.default_labels`` is every label column.

Untrusted archives: nothing is decompressed before its ``.npy`` header has been read from the zip
member and checked. Only the arrays named above are read (others are listed in a warning, never
decoded). An array whose declared element count or byte size exceeds ``max_bytes``
(``MAX_NPZ_BYTES`` = 1.5 GiB by default, for each array and for all arrays read together) is
refused as a likely decompression bomb: a 2 MB file of zeros can declare gigabytes. The default lets
every 28 px and 64 px MedMNIST file through (the largest, PathMNIST-64, holds 1.32 GB of images;
PneumoniaMNIST-28 holds 4.6 MB); pass a larger ``max_bytes`` (``load_dataset(...,
max_npz_bytes=...)``) for the 128 / 224 px versions, which the loader holds in memory whole. The
declared size must also match the member's size in the zip directory, and the zip's CRC is
checked. Object (pickled) arrays are refused (``allow_pickle`` stays False), so are images that are
not numeric 3D / 4D arrays, images with an empty axis, and float images holding NaN or infinite
values. Every failure is a ``DataError`` naming the file and the array.
"""

from __future__ import annotations

import logging
import math
import tokenize
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...checks import check_number
from ...errors import DataError
from ..record import Dataset, Record
from .manifest import check_reserved_split_name

log = logging.getLogger(__name__)

CLASS_NAME_KEYS = ("class_names", "label_names")
LABEL_COLUMN = "label"
MAX_NPZ_BYTES = 3 << 29  # 1.5 GiB: declared array bytes (and elements) read from one archive, each and in total
# what a corrupt member can raise while numpy reads it through zipfile / zlib (TokenError, SyntaxError: numpy
# tokenizes a .npy header literal_eval refused, and unbalanced brackets fail there)
_READ_ERRORS = (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                RuntimeError, tokenize.TokenError, SyntaxError)


@dataclass(frozen=True)
class _Declared:
    """What a member's ``.npy`` header says, read before any array data is decompressed."""

    key: str  # the member name without ``.npy``
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int  # header length: the array data starts here in the member

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.elements * self.dtype.itemsize


def _reason(error: Exception) -> str:
    """The error's type and first line (numpy adds advice on further lines; messages stay one line)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _read_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _Declared:
    """The member's declared shape and dtype (only the header bytes are decompressed)."""
    key = info.filename[: -len(".npy")]
    try:
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                raise DataError(path, f"array {key!r}: unsupported .npy format version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(member)
            offset = member.tell()
    except _READ_ERRORS as error:
        raise DataError(path, f"array {key!r}: not a readable .npy header ({_reason(error)})") from None
    return _Declared(key, info, tuple(int(n) for n in shape), dtype, offset)


def _check_declared(path: Path, declared: _Declared, max_bytes: int) -> None:
    """Refuse object arrays, oversized arrays and headers that disagree with the zip directory."""
    if declared.dtype.hasobject:
        raise DataError(path, f"array {declared.key!r} holds Python objects ({declared.dtype}); "
                              "pickled arrays are never loaded")
    if declared.elements > max_bytes or declared.nbytes > max_bytes:
        raise DataError(path, f"array {declared.key!r} declares shape {declared.shape} of {declared.dtype} "
                              f"({declared.nbytes:,} bytes), over the {max_bytes:,}-byte limit; refused before "
                              "decompressing (a larger real dataset: raise max_npz_bytes)")
    stored = declared.info.file_size - declared.data_offset
    if stored != declared.nbytes:
        raise DataError(path, f"array {declared.key!r}: the header declares {declared.nbytes:,} data bytes but the "
                              f"member holds {stored:,} (corrupt or forged archive)")


def _read_array(path: Path, archive: zipfile.ZipFile, declared: _Declared) -> np.ndarray:
    """Decompress one checked member (exactly its declared size; the zip CRC is verified at the end)."""
    try:
        with archive.open(declared.info) as member:
            array = np.lib.format.read_array(member, allow_pickle=False)
            member.read(1)  # at the end of the member: zipfile compares the CRC here
    except _READ_ERRORS as error:
        raise DataError(path, f"array {declared.key!r}: corrupt or truncated data ({_reason(error)})") from None
    return array


def _wanted(keys: Sequence[str]) -> list[str]:
    """The member keys the loader reads: ``<split>_images``, ``<split>_labels`` and class names."""
    splits = [key[: -len("_images")] for key in keys if key.endswith("_images")]
    wanted = {f"{split}_{kind}" for split in splits for kind in ("images", "labels")} | set(CLASS_NAME_KEYS)
    return [key for key in keys if key in wanted]


def _read_arrays(path: Path, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays the loader uses, each header checked (size limits, dtype) before decompressing."""
    if not zipfile.is_zipfile(path):
        raise DataError(path, "not an .npz archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename[: -len(".npy")]: info for info in archive.infolist()
                       if info.filename.endswith(".npy") and not info.is_dir()}
            ignored = [info.filename for info in archive.infolist() if info.filename[: -len(".npy")] not in members]
            keys = _wanted(list(members))
            if not any(key.endswith("_images") for key in keys):
                raise DataError(path, f"no '<split>_images' arrays; keys found: {', '.join(members) or 'none'}")
            ignored += [key for key in members if key not in keys]
            if ignored:
                log.warning("%s: ignoring %d member(s) that are not image, label or class-name arrays: %s",
                            path, len(ignored), ", ".join(sorted(ignored)[:10]))
            declared = [_read_header(path, archive, members[key]) for key in keys]
            _check_sizes(path, declared, max_bytes)
            return {item.key: _read_array(path, archive, item) for item in declared}
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise DataError(path, f"cannot read the zip archive ({type(error).__name__}: {error})") from None


def _check_sizes(path: Path, declared: list[_Declared], max_bytes: int) -> None:
    total = 0
    for item in declared:
        _check_declared(path, item, max_bytes)
        if item.key.endswith("_images"):
            _check_images(path, item.key, item.dtype, item.shape)
        total += item.nbytes
    if total > max_bytes:
        raise DataError(path, f"the arrays declare {total:,} bytes together, over the {max_bytes:,}-byte limit; "
                              "refused before decompressing (a larger real dataset: raise max_npz_bytes)")


def _stored_class_names(path: Path, arrays: dict[str, np.ndarray]) -> list[str] | None:
    key = next((key for key in CLASS_NAME_KEYS if key in arrays), None)
    if key is None:
        return None
    names = arrays[key]
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(path, f"{key!r} must be a 1-D string array, got {names.dtype} "
                              f"{names.shape}")
    return [_decoded(path, key, position, name) for position, name in enumerate(names.tolist())]


def _decoded(path: Path, key: str, position: int, name: bytes | str) -> str:
    """A stored class name as text: bytes must be UTF-8 (DataError naming the entry otherwise)."""
    if not isinstance(name, bytes):
        return str(name)
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, f"{key!r} entry {position} is not UTF-8 text (byte 0x{name[err.start]:02x} at offset "
                              f"{err.start}); store the class names as UTF-8") from None


def _check_images(path: Path, key: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """A declared image array: numeric, (N,H,W), (N,H,W,3) or (N,D,H,W), no empty image axis."""
    if len(shape) not in (3, 4) or dtype.kind not in "biuf":
        raise DataError(path, f"{key!r} must be a numeric (N,H,W), (N,H,W,3) or (N,D,H,W) array, "
                              f"got {dtype} {shape}")
    if 0 in shape[1:]:
        raise DataError(path, f"{key!r} has an empty image axis: shape {shape}")
    if len(shape) == 4 and shape[-1] in (2, 4) and min(shape[1:3]) >= 8:  # 2 or 4 wide under 8+ px: channels
        raise DataError(path, f"{key!r} has shape {shape}: {shape[-1]} channels (grey + alpha, RGBA?); give "
                              f"(N,H,W) grayscale or (N,H,W,3) RGB")


def _check_finite(path: Path, key: str, images: np.ndarray) -> None:
    """Float images must hold finite values (a NaN pixel turns every loss and metric into NaN)."""
    if images.dtype.kind == "f":
        bad = images.size - int(np.count_nonzero(np.isfinite(images)))
        if bad:
            raise DataError(path, f"{key!r} holds {bad:,} NaN or infinite pixel values")


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
    if labels.dtype.kind not in "biuf":  # text ('yes'/'no', '0'/'1'), dates, complex: not read as 0/1
        raise DataError(path, f"{key!r} has shape {labels.shape}: a multi-label array must hold 0/1 numbers "
                              f"(or NaN for missing), got {labels.dtype}")
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


def load_npz(path: str | Path, class_names: Sequence[str] | None = None,
             max_bytes: int = MAX_NPZ_BYTES) -> Dataset:
    """Load a MedMNIST-style ``.npz`` (see the module docstring for the layout and the size limit)."""
    check_number("max_bytes", max_bytes, minimum=1, integer=True)
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    arrays = _read_arrays(path, max_bytes)
    splits = [key[: -len("_images")] for key in arrays if key.endswith("_images")]
    check_reserved_split_name(path, {split: f"'{split}_images'" for split in splits})
    if class_names is None:
        class_names = _stored_class_names(path, arrays)
    if class_names is not None:
        class_names = [str(name).strip() for name in class_names]
        repeated = sorted({name for name in class_names if class_names.count(name) > 1})
        if repeated:  # two indices (or two label columns) would become one class
            raise DataError(path, f"class names repeat {', '.join(map(repr, repeated))}: each class needs its own")
        if any(not name for name in class_names):
            raise DataError(path, "a class name is empty")
    records: list[Record] = []
    label_names: list[str] | None = None
    for split in splits:
        images = arrays[f"{split}_images"]
        if images.ndim == 4 and images.shape[-1] == 1:  # (N, H, W, 1): grayscale with a channel axis (Keras)
            images = images[..., 0]
        _check_finite(path, f"{split}_images", images)
        columns, labels = _split_labels(path, split, arrays, class_names)
        if label_names is not None and columns != label_names:
            raise DataError(path, f"'{split}_labels' columns {columns} differ from the other "
                                  f"splits' {label_names}")
        label_names = columns
        records += [Record(id=f"{split}_{index}", images=[images[index]], labels=label,
                           split=split) for index, label in enumerate(labels)]
    if not records:
        raise DataError(path, "no images: every '<split>_images' array is empty")
    dataset = Dataset(records, source=str(path), label_names=label_names or [],
                      default_labels=label_names or [])
    return dataset
