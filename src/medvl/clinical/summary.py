"""Studies and series of a DICOM file or folder, or a NIfTI file, as plain rows without identifiers
(what ``medvl dicom-info`` and the service show): study and series as short UID hashes, modality,
file and frame counts, size and pixel spacing; for one DICOM file, its SOP class and transfer syntax. A series (or
an enhanced multi-frame file) whose slices or frames state different pixel spacings has ``pixel_spacing_mm`` None
and each of them in ``pixel_spacings_mm`` (every row has it: the one spacing, or none): it is not one volume.
A truncated DICOM file, or a DICOMDIR given as the file to summarise, is a ``DataError``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from .formats import NIFTI_SUFFIXES, uid_hash

SHORT_UID = 8  # hex digits standing for a study or series UID in a listing


def series_summaries(path: str | Path) -> list[dict[str, Any]]:
    """One row per series of a DICOM folder, or one row for a DICOM or NIfTI file."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "not found")
    if path.is_dir():
        return _folder_rows(path)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _nifti_rows(path)
    return _dicom_file_rows(path)


def _short(uid: str | None) -> str:
    return uid_hash(uid, SHORT_UID) if uid else "-"


def _size(rows: int | None, columns: int | None) -> str:
    return f"{rows} x {columns}" if rows and columns else "-"


def _folder_rows(folder: Path) -> list[dict[str, Any]]:
    from .dicom import read_dicom_series

    return [{"study": _short(s.study_uid), "series": _short(s.series_uid), "number": s.series_number,
             "modality": s.modality, "files": len(s.files), "frames": s.frames,
             "size": _size(s.rows, s.columns), **_spacings(s.pixel_spacing_mm, s.pixel_spacings_mm)}
            for s in read_dicom_series(folder)]


def _spacings(first: list[float] | None, spacings: list[list[float]]) -> dict[str, Any]:
    """The pixel spacing, or None when the slices or frames state several (then each is in ``pixel_spacings_mm``)."""
    return {"pixel_spacing_mm": first if len(spacings) <= 1 else None, "pixel_spacings_mm": spacings}


def _nifti_rows(path: Path) -> list[dict[str, Any]]:
    from .nifti import read_nifti

    volume, spacing = read_nifti(path)
    return [{"study": "-", "series": "-", "number": None, "modality": "NIfTI (RAS)", "files": 1,
             "frames": volume.shape[0], "size": " x ".join(map(str, volume.shape)),
             "pixel_spacing_mm": list(spacing), "pixel_spacings_mm": [list(spacing)]}]


def _dicom_file_rows(path: Path) -> list[dict[str, Any]]:
    """One DICOM file's row; a DICOMDIR (it indexes other files, it is no series) and a truncated
    file (``check_image_header``) are ``DataError``s."""
    from .dicom import (
        check_image_header,
        distinct_spacings,
        frame_pixel_spacings,
        object_kind,
        quiet_pydicom,
        read_header,
        safe_meta,
    )

    with quiet_pydicom(path):
        ds, has_pixels = read_header(path)
        if object_kind(ds).startswith("DICOMDIR"):
            raise DataError(path, "a DICOMDIR (media directory): it lists the files of a DICOM medium and holds "
                                  f"no image; give the folder that holds it ({path.parent}) instead")
        check_image_header(path, ds, has_pixels)
        meta = safe_meta(ds)
        spacings = distinct_spacings(frame_pixel_spacings(ds, meta["frames"]))
    return [{"study": _short(meta["study_uid"]), "series": _short(meta["series_uid"]),
             "number": meta["series_number"], "modality": meta["modality"], "files": 1, "frames": meta["frames"],
             "size": _size(meta["rows"], meta["columns"]), **_spacings(meta["pixel_spacing_mm"], spacings),
             "transfer_syntax": meta["transfer_syntax"], "sop_class": meta["sop_class"]}]
