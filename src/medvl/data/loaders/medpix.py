"""MedPix 2.0 loader: CT and MR images with a caption each and a case report per case.

Folder layout (github.com/CHILab1/MedPix-2.0): ``descriptions_{split}.jsonl`` (one object per
image), ``images/<image>.jpg`` (``.png`` / ``.jpeg`` accepted; suffixes in any case, ``.JPG`` too) and, optionally,
``data_{split}.jsonl`` (one object per case, keyed by ``U_id``). Splits are the descriptions files
present (the shared copy has ``train`` and ``dev``).

Record: id = the image stem, text = ``Description.Caption``. Label columns (class names as
written; a missing value is absent):

- ``modality``: ``Type``, ``CT`` or ``MR``;
- ``plane``: ``Description.Plane`` (Axial, Coronal, Sagittal, then a long tail: 3D
  Reconstruction, Multiple or Montage, Transverse, Lateral, AP, PA, ...). ``NOS - Not specified``
  is treated as missing;
- ``location_category``: ``Location Category`` (Head, Thorax, Abdomen, Spine and Muscles,
  Reproductive and Urinary System);
- ``location``: ``Location`` (about 20 finer regions, e.g. Brain and Neuro, Chest, Pulmonary). A value naming no
  region of the body is missing (``NOT_LOCATIONS``): ``Bethesda, MD``, MedPix's own address, written as the
  location of one train case's two images.

In every field, ``N/A`` and ``Left Blank`` (the MedPix form's mark of a field nobody filled in) are missing values
(``MISSING_VALUES``), as an empty or absent one is: never a class, a caption or a prompt.

Meta: ``case_id`` (``U_id``), ``age`` (years, as written), ``sex`` (``N/A`` = missing),
``modality_detail`` (e.g. ``MR - T2 weighted``), ``acr_codes``, ``figure_part`` and, when the case
file is present, ``case_report`` (History, Exam, Findings, Differential Diagnosis, Case Diagnosis,
Discussion as one text, each part headed by its name) and ``case_diagnosis``. Reports are patient
data: never log them.

Image files must resolve inside the folder: an ``images/`` entry that is a symbolic link out of it
is refused (one ``DataError`` with the count and the first descriptions line) unless
``allow_outside_root=True`` (see ``medvl.data.loaders.roots``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...errors import DataError
from ..images import image_suffix
from ..record import Dataset, Record
from .manifest import check_reserved_split_name, read_jsonl
from .roots import check_inside_root

log = logging.getLogger(__name__)

DESCRIPTIONS_GLOB = "descriptions_*.jsonl"
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
LABEL_NAMES = ["modality", "plane", "location_category", "location"]
MISSING_VALUES = {"", "N/A", "NOS - Not specified", "Left Blank"}  # 'Left Blank': the form's field not filled in
NOT_LOCATIONS = {"Bethesda, MD"}  # Location values that name no body region (the NLM's address): missing
REPORT_PARTS = ("History", "Exam", "Findings", "Differential Diagnosis", "Case Diagnosis",
                "Discussion")
SPLIT_ORDER = ("train", "val", "valid", "validation", "dev", "test")


def is_medpix_folder(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob(DESCRIPTIONS_GLOB))


def _value(data: dict[str, Any], key: str) -> str | None:
    """A stripped string value, or None when absent or one of MISSING_VALUES."""
    value = data.get(key)
    if value is None:
        return None
    text = str(value).strip()
    return None if text in MISSING_VALUES else text


def _location(row: dict[str, Any]) -> str | None:
    """The image's ``Location``, or None when missing or naming no region of the body (``NOT_LOCATIONS``)."""
    location = _value(row, "Location")
    return None if location in NOT_LOCATIONS else location


def _present(mapping: dict[str, str | None]) -> dict[str, str]:
    return {key: value for key, value in mapping.items() if value is not None}


def _splits(folder: Path) -> list[str]:
    names = [path.name[len("descriptions_"): -len(".jsonl")]
             for path in folder.glob(DESCRIPTIONS_GLOB)]
    known = [name for name in SPLIT_ORDER if name in names]
    return known + sorted(set(names) - set(known))


def _image_files(folder: Path) -> dict[str, Path]:
    """Image stem -> file in ``images/``, listed once (preferring .jpg over .png over .jpeg, and a suffix in lower
    case over the same one in another case). Suffixes are matched in any case (``image_suffix``): a folder copied
    from Windows or a camera export holds ``.JPG`` files."""
    images = folder / "images"
    if not images.is_dir():
        raise DataError(images, "image folder not found")
    files: dict[str, Path] = {}
    for path in sorted(images.iterdir(), key=_preference):
        if image_suffix(path) in IMAGE_SUFFIXES:
            files.setdefault(path.stem, path)
    return files


def _preference(path: Path) -> tuple[int, bool, str]:
    """Which of the files of one stem ``_image_files`` keeps: the first by suffix (``IMAGE_SUFFIXES``), then
    written in lower case."""
    suffix = image_suffix(path)
    rank = IMAGE_SUFFIXES.index(suffix) if suffix in IMAGE_SUFFIXES else len(IMAGE_SUFFIXES)
    return rank, path.suffix != suffix, path.name


def _section(row: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested object of a JSON row, or an empty one when absent or not an object."""
    value = row.get(key)
    return value if isinstance(value, dict) else {}


def _case_report(case: dict[str, Any]) -> str | None:
    parts = [(name, _value(case, name)) for name in REPORT_PARTS]
    text = "\n\n".join(f"{name}: {value}" for name, value in parts if value)
    return text or None


def _cases(folder: Path, split: str) -> dict[str, dict[str, str]]:
    """Case id -> meta from the split's case file (empty when the file is absent)."""
    path = folder / f"data_{split}.jsonl"
    if not path.is_file():
        log.info("%s: no case file, records of split %r have no case report", path, split)
        return {}
    cases = {}
    for _, row in read_jsonl(path):
        case = _section(row, "Case")
        cases[str(row.get("U_id"))] = _present({
            "case_report": _case_report(case),
            "case_diagnosis": _value(case, "Case Diagnosis"),
        })
    return cases


def _record(row: dict[str, Any], split: str, image: Path,
            cases: dict[str, dict[str, str]]) -> Record:
    description = _section(row, "Description")
    case_id = _value(row, "U_id")
    labels = {
        "modality": _value(row, "Type"),
        "plane": _value(description, "Plane"),
        "location_category": _value(row, "Location Category"),
        "location": _location(row),
    }
    meta = {
        "case_id": case_id,
        "age": _value(description, "Age"),
        "sex": _value(description, "Sex"),
        "modality_detail": _value(description, "Modality"),
        "acr_codes": _value(description, "ACR Codes"),
        "figure_part": _value(description, "Figure Part"),
    }
    return Record(
        id=image.stem,
        images=[image],
        text=_value(description, "Caption"),
        labels=_present(labels),
        meta={**_present(meta), **cases.get(case_id or "", {})},
        split=split,
    )


def _split_records(folder: Path, split: str, files: dict[str, Path], missing: list[str],
                   images: list[tuple[str, Path]]) -> list[Record]:
    path = folder / f"descriptions_{split}.jsonl"
    cases = _cases(folder, split)
    records = []
    for line, row in read_jsonl(path):
        stem = _value(row, "image")
        if not stem:
            raise DataError(path, f"line {line}: no 'image' value")
        if stem not in files:
            missing.append(f"{path.name} line {line}: images/{stem}.jpg")
            continue
        images.append((f"{path.name} line {line}", files[stem]))
        records.append(_record(row, split, files[stem], cases))
    return records


def load_medpix(folder: str | Path, allow_outside_root: bool = False) -> Dataset:
    """Load a MedPix 2.0 folder (see the module docstring for records, labels, meta and paths)."""
    folder = Path(folder)
    if not is_medpix_folder(folder):
        raise DataError(folder, f"not a MedPix 2.0 folder (no {DESCRIPTIONS_GLOB} files)")
    files = _image_files(folder)
    records: list[Record] = []
    missing: list[str] = []
    images: list[tuple[str, Path]] = []
    splits = _splits(folder)
    check_reserved_split_name(folder, {split: f"descriptions_{split}.jsonl" for split in splits})
    for split in splits:
        records += _split_records(folder, split, files, missing, images)
    check_inside_root(folder, folder, images, allow_outside_root, what="images")
    if missing:
        raise DataError(folder, f"{len(missing)} image files not found; first: {missing[0]}")
    if not records:
        raise DataError(folder, "no records in the descriptions files")
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise DataError(folder, f"duplicate image {record.id!r} (listed twice)")
        seen.add(record.id)
    dataset = Dataset(records, source=str(folder), label_names=LABEL_NAMES)
    return dataset
