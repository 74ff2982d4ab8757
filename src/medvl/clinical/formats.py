"""What the clinical modules share about DICOM and NIfTI files, with nothing to import but the
standard library: file suffixes, the DICOM Part 10 marker, the install hint for the ``[clinical]``
extra, and the one hash that stands for a DICOM UID wherever medvl must name a study, series or
instance without showing its UID (record ids, pulled file names, listings)."""

from __future__ import annotations

import hashlib
from pathlib import Path

DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
INSTALL_HINT = "pip install 'medvl[clinical]'"


def has_dicom_preamble(path: str | Path) -> bool:
    """True if the file carries the DICOM Part 10 marker: 128 bytes of preamble, then ``DICM``."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def uid_hash(uid: str, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of a UID (or other identifier): tells UIDs apart
    without showing them (their digits often hold the acquisition date and time)."""
    return hashlib.sha256(str(uid).encode("utf-8")).hexdigest()[:length]
