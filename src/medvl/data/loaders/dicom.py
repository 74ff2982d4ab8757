"""DICOM folder loader: a folder of DICOM files (a PACS pull, a ``medvl deid`` output, a hospital
export) as a dataset, ``load_dicom_folder(folder)``; ``load_dataset`` picks it for a folder with no
manifest that holds DICOM files (``.dcm`` / ``.dicom``, or any file with the ``DICM`` marker).

Files are grouped into series by ``medvl.clinical.dicom.read_dicom_series``. One record per:

- 3D series (``meta["kind"] == "volume"``): two or more single-frame slices that all carry Image
  Position / Orientation (Patient), share one orientation, size and pixel spacing, and sit at distinct positions
  with no slice missing (a gap of 1.5 slice steps or more, or of about 2, 3... times the smallest gap, is a
  ``DataError`` naming the series:
  ``medvl.clinical.dicom.missing_slices``) and none off the line the others' centres follow (more than half a pixel
  off it: a ``DataError``, ``off_axis_slice``); or one enhanced multi-frame CT / MR / PET file with
  per-frame positions, its frames all in one plane orientation and one pixel spacing. The image is a
  ``DicomVolume``, read on demand by ``read_image`` into a ``DxHxW`` ``float32`` volume (modality
  values, HU for CT) in RAS orientation, as a NIfTI file is read (``medvl.clinical.dicom.load_volume``);
- 2D image (``kind == "image"``): every other single-frame file; the image is the file path
  (``read_image``: the header's window applied, like an exported PNG).

Skipped, with a logged count: multi-frame files that are not a volume (cine loops, time series, frames in
several planes such as a localizer, or of different pixel spacings)
and segmentation objects (SEG: labels, not images). A folder holding both kinds feeds each model
the records of its kind: training, indexing and evaluation leave out the others with a counted
warning (``Dataset.for_spatial_dims``).

Record ids are short SHA-256 hashes of UIDs (``img-`` + the SOP Instance UID's, ``vol-`` + the
Series Instance UID's), never names or patient IDs; a repeated SOP Instance UID gets ``-2``,
``-3``... Metadata is an allow-list of acquisition facts, written as strings: ``kind``,
``modality``, ``body_part`` and ``series_description`` (Body Part Examined and Series Description,
kept only when plain by the Clean Descriptors rule, ``medvl.clinical.descriptors.is_plain``:
allow-listed technical, anatomical and vendor words and numbers of at most 3 digits, and free of the
file's patient name, ID and dates; otherwise left out, with a warning giving the count, never the
value), ``view_position``, ``laterality``, ``rows``, ``columns``, ``slices``, spacing in mm
(``row_spacing_mm``, ``column_spacing_mm``, ``slice_spacing_mm``, ``slice_thickness_mm``), ``study``
and ``series`` (12-character hashes of the UIDs, to group records of one study or series) and
``deidentified`` (``yes`` when the file says Patient Identity Removed). No names, IDs, dates, times,
institutions or raw UIDs. File paths are used as they are: de-identify (``medvl deid`` or
``medvl pacs pull``) a folder whose paths or pixels may hold identifiers before sharing anything built from
it. A file under the folder that is a symbolic link resolving outside it is refused before any file
is read (one ``DataError`` with the count; no path is shown) unless ``allow_outside_root=True`` (see
``medvl.data.loaders.roots``).

Labels come from an optional ``labels.csv`` in the folder (or ``labels=``): one key column,
``id`` (the record id), ``SOPInstanceUID``, ``SeriesInstanceUID`` or ``StudyInstanceUID``
(matched case-insensitively, the first of these present; a study row labels every record of the
study), an optional ``split`` and ``text`` (or ``report``) column, every other column a label (empty
cell, or one spelled ``NaN`` / ``NA`` / ``N/A`` / ``null`` in any case, = missing; ``None`` is a class; a 0.0 / 1.0
or true / false column read as 0 / 1, as in a manifest: ``manifest.clean_label_cells``) except identifier columns,
which are ignored with a warning naming them: the other
key columns, and any column named as a DICOM attribute holding a UID, a person's name, a date or a
time (VR UI, PN, DA, DT, TM: ``SOPClassUID``, ``PatientName``, ``StudyDate``...), a patient or
request identifier (``medvl.clinical.profile.DICOGNITO_IDS``: ``PatientID``, ``AccessionNumber``...)
or an institution (``InstitutionName``...) (``identifier_columns``). A label, split or text cell
holding one of its record's own UIDs is a ``DataError`` naming the line and column. The
sidecar's UIDs must be those in the files (after de-identification: the new ones). Records without
a row keep no labels and split ``all``; a row's split cell may be empty, or ``all``, only when no row names
another split (as in a manifest). The file is read as strictly as a CSV manifest
(``manifest.read_csv_table``): a row of more or fewer cells than the header, a quoted cell never closed, a
column named twice or bytes that are not UTF-8 are a ``DataError`` naming the file and the line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ...clinical.formats import uid_hash
from ...errors import DataError
from ..record import ALL_SPLITS, Dataset, Record
from .manifest import check_reserved_split, clean_label_cells, read_csv_table
from .roots import OPT_IN, outside_root

log = logging.getLogger(__name__)

LABELS_NAME = "labels.csv"
KEY_COLUMNS = ("id", "sopinstanceuid", "seriesinstanceuid", "studyinstanceuid")  # lower case, by priority
TEXT_COLUMNS = ("text", "report")
SPLIT_COLUMN = "split"
IDENTIFIER_VRS = frozenset({"UI", "PN", "DA", "DT", "TM"})  # UIDs, person names, dates, times: never labels
VOLUME_MULTIFRAME_MODALITIES = ("CT", "MR", "PT")
SKIPPED_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "SR", "KO", "PR")
SCAN_LIMIT = 10_000  # files looked at when deciding whether a folder holds DICOM
PULL_STATE_NAME = ".medvl-pull-state.json"  # medvl.clinical.pacs.STATE_NAME: an unfinished pull


def has_dicom_files(folder: str | Path) -> bool:
    """True if a file under ``folder`` is DICOM (by suffix, or the ``DICM`` marker); hidden files are not looked
    at (``medvl.clinical.dicom.is_hidden``), as ``read_dicom_series`` skips them."""
    from ...clinical.dicom import is_dicom_candidate, is_hidden

    folder = Path(folder)
    for seen, path in enumerate(folder.rglob("*")):
        if seen >= SCAN_LIMIT:
            return False
        if path.is_file() and not is_hidden(path, folder) and is_dicom_candidate(path):
            return True
    return False


class DicomVolume:
    """A DICOM series read as one ``DxHxW`` volume when needed (``load``; ``read_image`` calls it)."""

    def __init__(self, series, key: str):
        self.series = series  # medvl.clinical.dicom.DicomSeries
        self.key = key  # the record id: a hash, safe to show

    def load(self) -> np.ndarray:
        from ...clinical.dicom import load_volume

        return load_volume(self.series)[0]

    def __repr__(self) -> str:  # error messages show this: no path, no UID
        return f"DicomVolume({self.key}, {len(self.series.files)} slices)"

    __str__ = __repr__


@dataclass
class _Header:
    """What the loader keeps of one file's header (no identifiers leave this module)."""

    path: Path
    ds: Any  # the pydicom dataset without pixel data
    frames: int
    position: np.ndarray | None
    orientation: np.ndarray | None


def _header(path: Path) -> _Header:
    from ...clinical.dicom import _frame_count, plane_geometry, read_dataset

    ds = read_dataset(path, header_only=True)
    return _Header(path, ds, _frame_count(ds), *plane_geometry(ds))


def _stackable(series, headers: list[_Header]) -> float | None:
    """The median slice spacing (mm) if these single-frame slices form a volume, else None
    (duplicates or mixed acquisitions, slices of different orientations, sizes or pixel spacings (``distinct_spacings``:
    different fields of view) are images, not a volume). A volume missing a slice
    (``medvl.clinical.dicom.missing_slices``) or with a slice off the line the others follow (``off_axis_slice``) is a
    DataError naming the series (its number and the record id it
    would have had), as a truncated slice file is: never stacked with the gap closed."""
    from ...clinical.dicom import distinct_spacings, pixel_spacing, placed, same_plane, slice_stack, volume_hole

    if len(headers) < 2 or any(h.frames != 1 for h in headers):
        return None
    positions, orientations = [], []
    for header in headers:
        if header.position is None or header.orientation is None:
            return None
        position, orientation = placed(header.path, header.position, header.orientation)
        positions.append(position)
        orientations.append(orientation)
    size = (headers[0].ds.get("Rows"), headers[0].ds.get("Columns"))
    if any(not same_plane(orientation, orientations[0]) for orientation in orientations) or \
            any((h.ds.get("Rows"), h.ds.get("Columns")) != size for h in headers) or \
            len(distinct_spacings(pixel_spacing(h.ds)[0] for h in headers)) > 1:
        return None
    stack = slice_stack(orientations[0], positions)
    spacing = stack[2]
    pixel = pixel_spacing(headers[0].ds)[0]
    hole = None if spacing is None else volume_hole(orientations[0], positions, stack, min(pixel) if pixel else 1.0)
    if hole is not None:
        raise DataError(headers[0].path.parent, f"{series.describe()}, record vol-{uid_hash(series.series_uid)}: "
                                                f"{hole}")
    return spacing


def _multiframe_volume(header: _Header) -> bool:
    """An enhanced CT / MR / PET file whose frames are placed in space in one plane orientation, each at its own
    position (``read_image`` stacks the same files into a volume: ``medvl.clinical.dicom.multiframe_to_ras``). Not
    one whose frames repeat a position: a cine (every frame at one position, which ``read_image`` reads as stored
    frames) or a 4D file (several positions, some repeated, which it refuses); as a volume record every read of
    either fails (``repeated_frames``), so they are skipped with the other multi-frame files that are not a volume."""
    from ...clinical.dicom import (
        distinct_spacings,
        frame_pixel_spacings,
        frame_placement,
        one_plane,
        position_counts,
    )

    ds = header.ds
    if header.frames < 2 or str(ds.get("Modality") or "") not in VOLUME_MULTIFRAME_MODALITIES:
        return False
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or len(per_frame) < header.frames:
        return False
    placement = frame_placement(ds, header.frames)
    if placement is None or not one_plane(placement[0]):
        return False
    repeated = max(position_counts(placement[0][0], placement[1])) > 1  # a cine or a 4D file: not a volume
    return not repeated and len(distinct_spacings(frame_pixel_spacings(ds, header.frames))) <= 1


def _text(value: Any) -> str | None:
    text = str(value).strip() if value not in (None, "") else ""
    return text or None


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:.6g}"


# the free-text descriptors kept in a record's meta when plain: meta key -> (keyword, VR)
DESCRIPTORS = {"body_part": ("BodyPartExamined", "CS"), "series_description": ("SeriesDescription", "LO")}


def _descriptors(ds, dropped: Counter) -> dict[str, str | None]:
    """Each of ``DESCRIPTORS`` when plain by the Clean Descriptors rule (``medvl.clinical.descriptors.is_plain``:
    allow-listed technical words, short numbers) and free of the file's patient name, ID and dates (read
    once, and only when a descriptor is plain); otherwise ``None``, counted in ``dropped[key]``."""
    from ...clinical.descriptors import is_plain
    from ...clinical.identifiers import collect_identifiers

    texts = {key: _text(ds.get(keyword)) for key, (keyword, _) in DESCRIPTORS.items()}
    plain = {key for key, text in texts.items() if text is not None and is_plain(text, DESCRIPTORS[key][1])}
    identifiers = collect_identifiers(ds) if plain else None
    kept: dict[str, str | None] = {}
    for key, text in texts.items():
        if text is not None and key in plain and identifiers is not None and not identifiers.found_in(text):
            kept[key] = text
        else:
            kept[key] = None
            if text is not None:
                dropped[key] += 1
    return kept


def _common_meta(ds, study_uid: str, series_uid: str, dropped: Counter) -> dict[str, str | None]:
    from ...clinical.dicom import pixel_spacing

    spacing, _ = pixel_spacing(ds)
    return {
        "modality": _text(ds.get("Modality")),
        **_descriptors(ds, dropped),
        "rows": _text(ds.get("Rows")),
        "columns": _text(ds.get("Columns")),
        "row_spacing_mm": _number(spacing[0]) if spacing else None,
        "column_spacing_mm": _number(spacing[1]) if spacing else None,
        "slice_thickness_mm": _number(_first_float(ds.get("SliceThickness"))),
        "study": uid_hash(study_uid, 12),
        "series": uid_hash(series_uid, 12),
        "deidentified": "yes" if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" else "no",
    }


def _first_float(value: Any) -> float | None:
    from ...clinical.dicom import _floats

    values = _floats(value)
    return values[0] if values else None


def _present(meta: dict[str, str | None]) -> dict[str, str]:
    return {key: value for key, value in meta.items() if value is not None}


def _volume_record(series, headers: list[_Header], spacing: float | None,
                   dropped: Counter) -> tuple[Record, dict[str, str]]:
    ds = headers[0].ds
    key = f"vol-{uid_hash(series.series_uid)}"
    slices = headers[0].frames if len(headers) == 1 else len(headers)
    meta = _common_meta(ds, series.study_uid, series.series_uid, dropped)
    meta.update(kind="volume", slices=str(slices), slice_spacing_mm=_number(spacing))
    keys = {"id": key, "seriesinstanceuid": series.series_uid, "studyinstanceuid": series.study_uid}
    return Record(id=key, images=[DicomVolume(series, key)], meta=_present(meta)), keys


def _image_record(series, header: _Header, dropped: Counter) -> tuple[Record, dict[str, str]]:
    ds = header.ds
    sop_uid = str(ds.get("SOPInstanceUID") or header.path.name)
    key = f"img-{uid_hash(sop_uid)}"
    meta = _common_meta(ds, series.study_uid, series.series_uid, dropped)
    meta.update(kind="image", view_position=_text(ds.get("ViewPosition")),
                laterality=_text(ds.get("ImageLaterality") or ds.get("Laterality")))
    keys = {"id": key, "sopinstanceuid": sop_uid, "seriesinstanceuid": series.series_uid,
            "studyinstanceuid": series.study_uid}
    return Record(id=key, images=[header.path], meta=_present(meta)), keys


def _series_records(series, skipped: Counter, dropped: Counter) -> list[tuple[Record, dict[str, str]]]:
    headers = [_header(path) for path in series.files]
    modality = str(headers[0].ds.get("Modality") or "")
    if modality in SKIPPED_MODALITIES:
        skipped[f"{modality} objects (not images)"] += len(headers)
        return []
    spacing = _stackable(series, headers)
    if spacing is not None:
        return [_volume_record(series, headers, spacing, dropped)]
    if len(headers) == 1 and _multiframe_volume(headers[0]):
        return [_volume_record(series, headers, None, dropped)]
    records = []
    for header in headers:
        if header.frames > 1:
            skipped["multi-frame files that are not a volume (cine, time series, several planes or spacings)"] += 1
        else:
            records.append(_image_record(series, header, dropped))
    return records


def _unique_ids(records: list[tuple[Record, dict[str, str]]]) -> None:
    seen: Counter = Counter()
    for record, keys in records:
        seen[record.id] += 1
        if seen[record.id] > 1:
            record.id = f"{record.id}-{seen[record.id]}"
            keys["id"] = record.id
    repeated = sum(count - 1 for count in seen.values())
    if repeated:
        log.warning("%d DICOM file(s) repeat another file's SOP Instance UID (the same image twice, e.g. in two "
                    "transfer syntaxes); their ids get a -2, -3... suffix", repeated)


# ------------------------------------------------------------------------------ labels.csv


@dataclass
class _Labels:
    key: str  # one of KEY_COLUMNS
    columns: list[str]  # label columns in file order
    rows: dict[str, dict[str, str]]  # key value -> column -> value (non-empty cells of label, split, text columns)
    lines: dict[str, int]  # key value -> its line in the file
    path: Path
    split_column: str | None = None  # the split column's name as written, if the file has one


@lru_cache(maxsize=1)
def _identifier_keywords() -> frozenset[str]:
    """Lower-case DICOM keywords of the attributes that identify a patient, a study or a site: VR UI, PN, DA, DT
    or TM, a patient or request identifier de-identification replaces, or an institution."""
    from pydicom.datadict import DicomDictionary

    from ...clinical.profile import DICOGNITO_IDS

    keywords = {entry[4] for entry in DicomDictionary.values()
                if entry[4] and (entry[0] in IDENTIFIER_VRS or entry[4].startswith("Institution"))}
    return frozenset(keyword.lower() for keyword in keywords | DICOGNITO_IDS)


def identifier_columns(header: Sequence[str], key: str) -> list[str]:
    """The columns of a ``labels.csv`` header, other than the key column ``key`` (lower case), that identify
    rather than label: the other key columns, and DICOM attributes holding UIDs, names, IDs, dates, times or
    institutions (``_identifier_keywords``). They never become labels (the loader stores no identifier)."""
    return [name for name in header if name.lower() != key
            and (name.lower() in KEY_COLUMNS or name.lower() in _identifier_keywords())]


def _read_labels(path: Path) -> _Labels:
    """``labels.csv`` read as strictly as a CSV manifest (``manifest.read_csv_table``): a row of more or fewer
    cells than the header, a quote never closed or a repeated column name is a ``DataError`` naming the file and
    the line, never labels in the wrong columns. Identifier columns are ignored with a warning."""
    if path.stat().st_size == 0:
        raise DataError(path, "empty labels file")
    header, table = read_csv_table(path)
    if not header:
        raise DataError(path, "empty labels file")
    by_lower = {name.lower(): name for name in header}
    key = next((k for k in KEY_COLUMNS if k in by_lower), None)
    if key is None:
        raise DataError(path, f"needs a key column: id, SOPInstanceUID, SeriesInstanceUID or StudyInstanceUID; "
                              f"found {', '.join(header) or 'none'}")
    key_name = by_lower[key]
    ignored = identifier_columns(header, key)
    if ignored:
        log.warning("%s: ignoring identifier column(s) %s (a record key, UID, name, ID, date, time or institution: "
                    "never a label; the rows are keyed by %s)", path, ", ".join(ignored), key_name)
    kept = [name for name in header if name != key_name and name not in ignored]
    columns = [name for name in kept if name.lower() not in (SPLIT_COLUMN, *TEXT_COLUMNS)]
    clean_label_cells(path, table, columns)  # 'NaN' / 'NA' cells missing, a 0.0 / 1.0 or boolean column 0 / 1
    rows: dict[str, dict[str, str]] = {}
    lines: dict[str, int] = {}
    for line, cells in table:
        value = cells.get(key_name, "")
        if not value:
            raise DataError(path, f"line {line}: empty {key_name}")
        if value in rows:
            raise DataError(path, f"line {line}: {key_name} repeats an earlier row")
        rows[value] = {name: cells[name] for name in kept if cells.get(name)}
        lines[value] = line
    split_column = next((name for name in kept if name.lower() == SPLIT_COLUMN), None)
    return _Labels(key, columns, rows, lines, path, split_column)


def _apply_labels(records: list[tuple[Record, dict[str, str]]], labels: _Labels) -> None:
    used: set[str] = set()
    for record, keys in records:
        value = keys.get(labels.key)
        row = labels.rows.get(value) if value is not None else None
        if value is None or row is None:
            continue
        used.add(value)
        uids = {uid for name, uid in keys.items() if name != "id"}
        for name, cell in row.items():
            if cell in uids:  # a raw UID would be stored with the record (labels reach indexes and models)
                raise DataError(labels.path, f"line {labels.lines[value]}: column {name!r} holds a DICOM UID of its "
                                             "record; medvl stores no raw UID: drop the column (or key the rows "
                                             "by it)")
            low = name.lower()
            if low == SPLIT_COLUMN:
                record.split = cell
            elif low in TEXT_COLUMNS:
                record.text = cell
            else:
                record.labels[name] = cell
    _check_splits(records, labels, used)
    unmatched = len(labels.rows) - len(used)
    if unmatched:
        log.warning("%s: %d of %d rows match no record (after de-identification, key the rows by the new "
                    "UIDs or by record id)", labels.path, unmatched, len(labels.rows))


def _check_splits(records: list[tuple[Record, dict[str, str]]], labels: _Labels, used: set[str]) -> None:
    """The rules of a manifest's split column (``manifest.check_reserved_split``) for the rows of a split column
    where some rows name other splits: an empty split cell, or the split ``all`` (the reserved name for every
    record), is a ``DataError``: those records could not be selected alone, and ``--split all`` would take the
    other splits in too. (Records without a row are unlabelled and stay in ``all``, as documented.)"""
    if labels.split_column is None:
        return
    rows = sorted(used, key=labels.lines.__getitem__)
    if all(labels.rows[value].get(labels.split_column, ALL_SPLITS) == ALL_SPLITS for value in rows):
        return
    for value in rows:
        if labels.split_column not in labels.rows[value]:
            raise DataError(labels.path, f"line {labels.lines[value]}: empty {labels.split_column!r} cell")
    check_reserved_split(labels.path, [(labels.lines[value], labels.rows[value]) for value in rows],
                         labels.split_column)


# ----------------------------------------------------------------------------------- loader


def _check_links(folder: Path, allow_outside_root: bool) -> None:
    """Refuse symbolic links under the folder that resolve outside it (counted, never named)."""
    if allow_outside_root or not folder.is_dir():
        return
    links = [("", path) for path in folder.rglob("*") if path.is_symlink()]
    outside = outside_root(folder, links)
    if outside:
        raise DataError(folder, f"{len(outside)} file(s) under the folder are symbolic links to somewhere outside "
                                f"it; {OPT_IN}")


def load_dicom_folder(folder: str | Path, labels: str | Path | None = None,
                      allow_outside_root: bool = False) -> Dataset:
    """Load a folder of DICOM files as records (see the module docstring)."""
    from ...clinical.dicom import quiet_pydicom, read_dicom_series

    folder = Path(folder)
    _check_links(folder, allow_outside_root)
    labels_path = Path(labels) if labels is not None else folder / LABELS_NAME
    if labels is not None and not labels_path.is_file():
        raise DataError(labels_path, "labels file not found")
    skipped: Counter = Counter()
    dropped: Counter = Counter()
    records: list[tuple[Record, dict[str, str]]] = []
    with quiet_pydicom(folder):
        for series in read_dicom_series(folder):
            records += _series_records(series, skipped, dropped)
    for reason, count in sorted(skipped.items()):
        log.warning("%s: skipped %d %s", folder, count, reason)
    for name, count in sorted(dropped.items()):  # counted, never quoted: the value may name someone
        log.warning("%s: left out the %s of %d record(s): not made of plain technical words (Clean Descriptors "
                    "rule)", folder, name, count)
    if not records:
        raise DataError(folder, "no DICOM 2D images or volumes to load")
    _unique_ids(records)
    _warn_identified(folder, records)
    if (folder / PULL_STATE_NAME).is_file():
        log.warning("%s: a PACS pull into this folder is unfinished; rerun `medvl pacs pull` to complete it", folder)
    label_names: Sequence[str] = ()
    if labels_path.is_file():
        table = _read_labels(labels_path)
        _apply_labels(records, table)
        label_names = table.columns
    kept = [record for record, _ in records]
    return Dataset(kept, source=str(folder), label_names=label_names, default_labels=label_names)


def _warn_identified(folder: Path, records: list[tuple[Record, dict[str, str]]]) -> None:
    identified = sum(1 for record, _ in records if record.meta.get("deidentified") != "yes")
    if identified:
        log.warning("%s: %d of %d records come from DICOM files not marked de-identified: medvl keeps only hashed "
                    "UIDs and acquisition metadata from them, but their file paths and pixels are used as they "
                    "are (run `medvl deid` first if those may hold identifiers)", folder, identified, len(records))
