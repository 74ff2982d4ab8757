"""DICOM de-identification following the DICOM PS3.15 Basic Application Level Confidentiality
Profile (Annex E), built on the ``dicognito`` library's Python API.

``deidentify(in_path, out_path, seed=None) -> report`` works on one file or a folder. For every
DICOM file, in this order:

1. dicognito (one ``Anonymizer`` per run) replaces every person name (PN), the patient and
   request identifiers (Patient ID, Other Patient IDs, Accession Number, Study ID, ...), the
   patient's address, institution and station names with dummy values, and every UID except
   class and transfer syntax UIDs. The same input UID gives the same output UID within a run, so
   studies, series and references between files stay linked; with the same ``seed`` a later run
   gives the same UIDs and dummies (without it, runs cannot be linked). All dates and date-times
   move back by one offset per run (62 to 730 days), keeping intervals (the profile's "Retain
   Longitudinal Temporal Information with Modified Dates" option).
2. The attributes the profile removes (action X) and dicognito keeps are deleted:
   ``PROFILE_REMOVED`` (free-text comments and descriptions, patient characteristics, device
   serial numbers, request details, SR content...), overlays and curves.
3. Private tags are removed; the 128-byte preamble is zeroed.
4. A safety net removes any remaining text element that still contains the input's patient name
   (or a name part of 3+ characters), patient ID or one of its dates, then checks the encoded
   header: if an identifier is still there, the run fails and nothing is written.
5. Patient Identity Removed = YES (unless Burned In Annotation is YES: the pixels are never
   changed, so such files are flagged in the report), De-identification Method and its code
   sequence (DCM 113100, 113107) are set.

Output: a file for a file; for a folder, ``study_NNN/series_NNN/image_NNNN.dcm`` (numbered in
input order: input paths may hold names or IDs) plus ``deid-report.json``. Everything is written to
a staging folder next to the output and renamed into place at the end, so a failure (a truncated
or unreadable DICOM, a leak caught by the check) leaves nothing behind. Files that are not DICOM,
and DICOMDIR files (their paths would be wrong), are skipped and counted.

The report lists which attributes were replaced or removed, per file and in total, never their
values, and neither the seed nor the date offset.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, InputError
from ..io import atomic_write_bytes
from .dicom import MEDIA_STORAGE_DIRECTORY, is_dicom_candidate, quiet_pydicom, read_dataset, transfer_syntax
from .readers import INSTALL_HINT

log = logging.getLogger(__name__)

REPORT_NAME = "deid-report.json"
METHOD = "medvl PS3.15 basic profile"  # added to De-identification Method (LO: 64 characters at most)
PROFILE = "DICOM PS3.15 Basic Application Level Confidentiality Profile"

# Basic profile attributes with action X (remove) that dicognito does not replace or remove.
PROFILE_REMOVED = (
    "AcquisitionComments", "AcquisitionDeviceProcessingDescription", "AcquisitionProtocolDescription",
    "ActualHumanPerformersSequence", "AdditionalPatientHistory", "AdmissionID", "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription", "Allergies", "Arbitrary", "AuthorObserverSequence",
    "CommentsOnThePerformedProcedureStep", "ConfidentialityConstraintOnPatientDataDescription",
    "ContentCreatorIdentificationCodeSequence", "ContentSequence", "ContributionDescription",
    "CustodialOrganizationSequence", "DataSetTrailingPadding", "DerivationDescription", "DeviceSerialNumber",
    "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName", "EthnicGroup",
    "FrameComments", "GantryID", "HumanPerformerOrganization", "IconImageSequence",
    "IdentifyingComments", "ImageComments", "ImagePresentationComments", "ImagingServiceRequestComments",
    "Impressions", "InsurancePlanIdentification", "IntendedRecipientsOfResultsIdentificationSequence",
    "InterpretationApproverSequence", "InterpretationAuthor", "InterpretationDiagnosisDescription",
    "InterpretationIDIssuer", "InterpretationRecorder", "InterpretationText", "InterpretationTranscriber",
    "IssuerOfAdmissionID", "IssuerOfPatientID", "IssuerOfServiceEpisodeID", "MedicalAlerts",
    "ModifiedAttributesSequence", "NamesOfIntendedRecipientsOfResults", "OrderCallbackPhoneNumber",
    "OrderEnteredBy", "OrderEntererLocation", "OriginalAttributesSequence", "OtherPatientIDsSequence",
    "PatientAge", "PatientBirthTime", "PatientComments", "PatientPrimaryLanguageCodeSequence",
    "PatientSexNeutered", "PatientSize", "PatientState", "PatientWeight", "PerformedLocation",
    "PerformedProcedureStepDescription", "PerformingPhysicianIdentificationSequence", "PersonAddress",
    "PersonTelephoneNumbers", "PhysicianApprovingInterpretation", "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence", "PreMedication", "ProtocolName", "ReasonForStudy",
    "ReasonForTheImagingServiceRequest", "ReasonForTheRequestedProcedure", "ReferencedPatientAliasSequence",
    "ReferencedPatientSequence", "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers", "RequestAttributesSequence", "RequestedContrastAgent",
    "RequestedProcedureComments", "RequestedProcedureDescription", "RequestedProcedureLocation",
    "RequestingPhysician", "ResultsComments", "ResultsDistributionListSequence", "ResultsIDIssuer",
    "ScheduledPatientInstitutionResidence", "ScheduledProcedureStepDescription", "SeriesDescription",
    "ServiceEpisodeDescription", "ServiceEpisodeID", "SmokingStatus", "SpecialNeeds", "StudyComments",
    "StudyDescription", "StudyIDIssuer", "TextComments", "TextString", "TopicAuthor", "TopicKeywords",
    "TopicSubject", "TopicTitle", "VisitComments",
)
PROFILE_EMPTIED = ("PatientSex",)  # action Z: kept, value emptied
_REPEATING_GROUPS = ((0x5000, None), (0x6000, None))  # curves, overlay planes (data, comments and their layout)
_TEXT_VRS = {"LO", "LT", "SH", "ST", "UT", "UC", "PN", "AE", "DA", "DT"}  # where the safety net looks
_DEID_CODES = (("113100", "Basic Application Confidentiality Profile"),
               ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))


def _require_dicognito():
    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        raise DataError(None, f"DICOM de-identification needs dicognito: {INSTALL_HINT}") from None
    return Anonymizer


# ------------------------------------------------------------------------ what to look for


@dataclass
class Identifiers:
    """The input's patient name, ID and dates: what must not survive (kept in memory only)."""

    names: set[str] = field(default_factory=set)  # the full name and its parts of 3+ characters
    ids: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)  # YYYYMMDD and YYYY.MM.DD

    def strong(self) -> list[bytes]:
        """Values long enough to search encoded bytes for without chance matches."""
        values = {v for v in self.names | self.ids if len(v) >= 4} | self.dates
        return sorted(v.encode("utf-8", "ignore") for v in values)

    def found_in(self, text: str) -> bool:
        upper = text.upper()
        return any(value.upper() in upper for value in self.names | self.ids | self.dates)


def collect_identifiers(ds) -> Identifiers:
    """Patient Name (whole and parts), Patient ID / Other Patient IDs and every DA / DT date."""
    found = Identifiers()
    name = str(ds.get("PatientName") or "").strip()
    if name:
        found.names.add(name)
        found.names.update(part for part in re.split(r"[\^=\s]+", name) if len(part) >= 3)
    for keyword in ("PatientID", "OtherPatientIDs"):
        value = ds.get(keyword)
        for item in value if isinstance(value, list | tuple) or _multi(value) else [value]:
            text = str(item or "").strip()
            if len(text) >= 2:
                found.ids.add(text)

    def visit(dataset, element) -> None:
        if element.VR in ("DA", "DT") and element.value:
            for value in element.value if _multi(element.value) else [element.value]:
                digits = re.sub(r"\D", "", str(value))[:8]
                if len(digits) == 8:
                    found.dates.update({digits, f"{digits[:4]}.{digits[4:6]}.{digits[6:]}"})

    ds.walk(visit)
    return found


def _multi(value) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, MultiValue)


# ------------------------------------------------------------------------- change tracking


def _snapshot(ds, prefix: str = "") -> dict[str, Any]:
    """Element path -> comparable value (bulk data by length): what changed is reported by path."""
    from pydicom.datadict import keyword_for_tag

    values: dict[str, Any] = {}
    for element in ds:
        name = prefix + (element.keyword or keyword_for_tag(element.tag)
                         or f"({element.tag.group:04X},{element.tag.element:04X})")
        if element.VR == "SQ":
            values[name] = len(element.value or [])
            for index, item in enumerate(element.value or []):
                values.update(_snapshot(item, f"{name}[{index}]>"))
        elif element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            values[name] = ("bytes", len(element.value or b""))
        else:
            values[name] = str(element.value)
    return values


def _plain(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path)


def _changes(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    replaced = {_plain(p) for p, v in after.items() if p in before and before[p] != v}
    removed = {_plain(p) for p in before if p not in after} - replaced
    outermost = {p for p in removed if not any(p.startswith(other + ">") for other in removed)}
    return sorted(replaced), sorted(outermost)


# ------------------------------------------------------------------------------ the steps


def _remove_profile_attributes(ds) -> None:
    for keyword in PROFILE_EMPTIED:
        if ds.get(keyword):
            setattr(ds, keyword, "")
    for keyword in PROFILE_REMOVED:
        if keyword in ds:
            del ds[keyword]
    for element in list(ds):
        group, number = element.tag.group, element.tag.element
        for base, wanted in _REPEATING_GROUPS:
            if base <= group <= base + 0x1E and group % 2 == 0 and wanted in (None, number):
                del ds[element.tag]
                break
        else:
            if element.VR == "SQ" and element.tag in ds:
                for item in element.value or []:
                    _remove_profile_attributes(item)


def _remove_leftovers(ds, identifiers: Identifiers) -> list[str]:
    """Delete text elements still holding an identifier; return their paths (no values)."""
    doomed: list[tuple[Any, Any]] = []

    def visit(dataset, element) -> None:
        if element.VR in _TEXT_VRS and element.value and identifiers.found_in(str(element.value)):
            doomed.append((dataset, element.tag))

    ds.walk(visit)
    for dataset, tag in doomed:
        del dataset[tag]
    return sorted({str(tag) for _, tag in doomed})


def _mark(ds, burned_in: bool) -> None:
    from pydicom.dataset import Dataset

    if not burned_in:
        ds.PatientIdentityRemoved = "YES"
    methods = ds.get("DeidentificationMethod") or []
    methods = list(methods) if _multi(methods) or isinstance(methods, list) else [str(methods)]
    ds.DeidentificationMethod = [*methods, METHOD]
    codes = []
    for value, meaning in _DEID_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes


def _encode(ds, path: Path) -> bytes:
    from pydicom.dataset import FileMetaDataset

    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = transfer_syntax(ds)
    for keyword, source in (("MediaStorageSOPClassUID", "SOPClassUID"),
                            ("MediaStorageSOPInstanceUID", "SOPInstanceUID")):
        if source in ds:
            setattr(ds.file_meta, keyword, ds.get(source))
    ds.preamble = b"\x00" * 128
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as error:
        raise DataError(path, f"cannot write the de-identified file ({type(error).__name__}: {error})") from None
    return buffer.getvalue()


def _header_bytes(ds) -> bytes:
    """The encoded file without its pixel data (pixels are not searched: chance matches)."""
    from pydicom.dataset import Dataset

    header = Dataset()
    for element in ds:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(element)
    header.file_meta, header.preamble = ds.file_meta, ds.preamble
    buffer = io.BytesIO()
    header.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _full_snapshot(ds) -> dict[str, Any]:
    meta = getattr(ds, "file_meta", None)
    meta_values = {f"file_meta:{k}": v for k, v in _snapshot(meta).items()} if meta is not None else {}
    return _snapshot(ds) | meta_values


def deidentify_dataset(ds, anonymizer, path: Path) -> tuple[bytes, dict[str, Any]]:
    """De-identify one parsed dataset in place; its encoded bytes and its report entry."""
    identifiers = collect_identifiers(ds)
    before = _full_snapshot(ds)
    private = sum(1 for element in _iter_all(ds) if element.tag.is_private)
    anonymizer.anonymize(ds)
    _remove_profile_attributes(ds)
    ds.remove_private_tags()
    leftovers = _remove_leftovers(ds, identifiers)
    burned_in = str(ds.get("BurnedInAnnotation", "")).upper() == "YES"
    _mark(ds, burned_in)
    data = _encode(ds, path)
    header = _header_bytes(ds)
    if any(value in header for value in identifiers.strong()):
        raise DataError(path, "a patient identifier survived de-identification; nothing was written")
    replaced, removed = _changes(before, _full_snapshot(ds))
    warnings = ["Burned In Annotation is YES: identifiers may be burned into the pixels, which are not "
                "changed"] if burned_in else []
    entry = {"replaced": replaced, "removed": [r for r in removed if not _is_private_path(r)],
             "private_tags_removed": private, "identifier_leftovers_removed": len(leftovers),
             "warnings": warnings}
    return data, entry


def _iter_all(ds):
    for element in ds:
        yield element
        if element.VR == "SQ":
            for item in element.value or []:
                yield from _iter_all(item)


def _is_private_path(path: str) -> bool:
    last = path.split(">")[-1]
    match = re.fullmatch(r"\(([0-9A-F]{4}),[0-9A-F]{4}\)", last)
    return bool(match and int(match.group(1), 16) % 2 == 1)


# --------------------------------------------------------------------------------- the run


def _check_paths(source: Path, target: Path) -> None:
    if not source.exists():
        raise DataError(source, "input not found")
    if target.exists() and not (source.is_dir() and target.is_dir() and not any(target.iterdir())):
        raise InputError(f"{target}: output already exists; give a new path"
                         + (" (or an empty folder)" if source.is_dir() else ""))
    resolved_source, resolved_target = source.resolve(), target.resolve()
    if source.is_dir() and (resolved_target == resolved_source or resolved_source in resolved_target.parents):
        raise InputError(f"{target}: the output must not be inside the input folder {source}")


def _publish(staging: Path, target: Path) -> None:
    if target.is_dir():
        target.rmdir()  # checked empty before the run
    os.replace(staging, target)


def _report(entries: list[dict[str, Any]], skipped: Counter, seeded: bool) -> dict[str, Any]:
    from dicognito import __version__ as dicognito_version

    replaced = Counter(name for entry in entries for name in entry["replaced"])
    removed = Counter(name for entry in entries for name in entry["removed"])
    return {
        "profile": PROFILE,
        "tool": f"dicognito {dicognito_version}",
        "files_written": len(entries),
        "skipped": dict(sorted(skipped.items())),
        "uids": "replaced, consistent within this run" + (" and in any run with the same seed" if seeded else ""),
        "dates": "shifted back by one offset for the run (62 to 730 days), intervals kept",
        "totals": {
            "replaced": dict(sorted(replaced.items())),
            "removed": dict(sorted(removed.items())),
            "private_tags_removed": sum(entry["private_tags_removed"] for entry in entries),
            "identifier_leftovers_removed": sum(entry["identifier_leftovers_removed"] for entry in entries),
            "files_with_warnings": sum(1 for entry in entries if entry["warnings"]),
        },
        "files": entries,
    }


def _deidentify_folder(source: Path, target: Path, anonymizer, staging: Path) -> tuple[list, Counter]:
    entries: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    studies: dict[str, int] = {}
    series: dict[tuple[int, str], int] = {}
    images: Counter = Counter()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if not is_dicom_candidate(path):
            skipped["not DICOM"] += 1
            continue
        ds = read_dataset(path)
        storage = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
        if storage == MEDIA_STORAGE_DIRECTORY:
            skipped["DICOMDIR (rebuild it for the new files)"] += 1
            continue
        data, entry = deidentify_dataset(ds, anonymizer, path)
        study = studies.setdefault(str(ds.get("StudyInstanceUID", "")), len(studies) + 1)
        key = (study, str(ds.get("SeriesInstanceUID", "")))
        if key not in series:
            series[key] = sum(1 for other in series if other[0] == study) + 1
        images[key] += 1
        relative = f"study_{study:03d}/series_{series[key]:03d}/image_{images[key]:04d}.dcm"
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        (staging / relative).write_bytes(data)
        entries.append({"output": relative, **entry})
    if not entries:
        raise DataError(source, "no DICOM files to de-identify")
    return entries, skipped


def deidentify(in_path: str | Path, out_path: str | Path, seed: int | str | None = None) -> dict[str, Any]:
    """De-identify a DICOM file (``out_path``: the new file) or a folder (``out_path``: a new or
    empty folder, with ``deid-report.json``). Returns the report (attribute names, never values).

    ``seed``: same seed, same dummies and UIDs (runs can be linked); ``None``: random per run.
    Raises ``DataError`` for an unreadable, truncated or non-DICOM input file (nothing is written)
    and ``InputError`` if the output exists or lies inside the input folder.
    """
    source, target = Path(in_path), Path(out_path)
    anonymizer_class = _require_dicognito()
    _check_paths(source, target)
    anonymizer = anonymizer_class(seed=None if seed is None else str(seed))
    target.parent.mkdir(parents=True, exist_ok=True)
    with quiet_pydicom(source):
        return _run(source, target, anonymizer, seed is not None)


def _run(source: Path, target: Path, anonymizer, seeded: bool) -> dict[str, Any]:
    if source.is_file():
        data, entry = deidentify_dataset(read_dataset(source), anonymizer, source)
        atomic_write_bytes(target, data)
        return _report([{"output": target.name, **entry}], Counter(), seeded)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=target.parent))
    try:
        entries, skipped = _deidentify_folder(source, target, anonymizer, staging)
        report = _report(entries, skipped, seeded)
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: de-identified %d file(s) into %s", source, len(entries), target)
    return report
