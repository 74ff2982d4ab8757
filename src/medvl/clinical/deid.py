"""DICOM de-identification following the DICOM PS3.15 Basic Application Level Confidentiality
Profile (Annex E) with its Clean Descriptors option, built on the ``dicognito`` library's Python API.

``deidentify(in_path, out_path, seed=None, clean_descriptors=True, refuse_burned_in=False) -> report``
works on one file or a folder. For every DICOM file, in this order:

0. The file must be whole: a value shorter than its declared length, a file cut inside an element
   header or the last delimiter, an element or sequence that cannot be parsed, a missing SOP Class /
   SOP Instance / Study / Series UID or Modality, or an image object without pixel data are errors
   naming the file (``dicom.check_complete``, ``dicom.check_file_end``), never a smaller output; so
   is a transfer syntax the output cannot be written in (``check_writable_syntax``). A whole
   object that lacks only its Study or Series UID gets a new one (``dicom.give_missing_uids``; a warning).
1. dicognito (one ``Anonymizer`` per run, inside ``RunAnonymizer``) replaces every person name (PN),
   the patient and request identifiers (Patient ID, Other Patient IDs, Accession Number, Study ID,
   ...) with dummy values, and every UID except class and transfer syntax UIDs. The same input UID
   gives the same output UID within a run, so studies, series and references between files stay
   linked; with the same ``seed`` a later run gives the same UIDs and dummies (without it, runs
   cannot be linked). All dates and date-times move back by one offset per run, a whole number of
   days (62 to 730, from the seed: ``RunAnonymizer``), so times of day keep their values, intervals are
   kept and one real date gives one pseudo-date whether or not its time is given (the profile's "Retain
   Longitudinal Temporal Information with Modified Dates" option). A dummy name part that equals a part
   of the real name is dropped (``identifiers.drop_name_parts``), and a random dummy ID that holds a
   patient identifier by chance (a patient ID as short as ``X1``) is replaced by the run's keyed
   pseudonym (``reroll_chance_identifiers``).
2. Clean Descriptors (``descriptors``, on unless ``clean_descriptors=False`` / ``--keep-descriptors``):
   short descriptors (Study / Series Description, Protocol Name, Body Part Examined, Manufacturer's
   Model Name, RT labels...) are kept only when made of allow-listed technical words, else blanked;
   prose descriptors (comments, notes, narratives) are removed; every other free-text attribute at
   any depth (VR LT / ST / UT / UC) is emptied, and LO / SH attributes named ...Comment(s), Note(s),
   Description, Label, Title, Explanation, Text or Reason, and a Code Meaning of a non-standard
   coding scheme, are kept when plain, else blanked (``descriptors.free_text_rule``).
3. Every attribute of PS3.15 Table E.1-1 (``profile``: the table as data, 617 attributes) is removed
   (X), emptied (Z) or replaced (D, U) in the data set and every sequence item, dicognito's
   replacements and shifted dates kept where the action allows them (``profile.resolve`` has the
   rules), plus ``profile.EXTRA_REMOVED``, every URL / URI (VR UR: Retrieve URL, Retrieve URI...,
   which name the site and hold the original UIDs), the sending site's AE titles and presentation
   addresses in the file meta, overlays and curves; descriptors being cleaned are left to step 2 when the option is on.
4. Private tags are removed, and public elements held as UN whose tag the DICOM dictionary does not
   know (``remove_unknown_public``: a value the profile can neither shift nor judge); the 128-byte
   preamble is zeroed.
5. Files whose pixels may hold burned-in text (``burned_in_risk``: Burned In Annotation YES, or
   ultrasound, secondary capture, screen capture, photograph, endoscopy or scanned document) are
   flagged in the report, or refused with ``refuse_burned_in``; so are encapsulated documents
   (modality DOC), whose content, not pixels, holds text (the profile replaces it with a dummy).
   Patient Identity Removed is YES (NO when Burned In Annotation is YES: the pixels are never
   changed). De-identification Method and its code sequence (DCM 113100, 113107, and 113105 for
   Clean Descriptors) are set.
6. The final scan (``identifiers.find_leak``) searches every element of the result, file meta and
   sequences included, for the input's patient name parts, IDs, request IDs (accession number, study
   ID...), dates in their common spellings and the UIDs dicognito replaced, then the encoded header
   bytes. A hit refuses the
   file: ``DataError`` naming the file and the element (never the value), and nothing is written.

Output: a file for a file; for a folder, ``study_NNN/series_NNN/image_NNNN.dcm`` (numbered in
input order: input paths may hold names or IDs) plus ``deid-report.json``. Everything is written to
a staging folder next to the output and renamed into place at the end, so a failure (a truncated
or unreadable DICOM, a leak caught by the scan) leaves nothing behind. Files that are not DICOM,
DICOMDIR files (their paths would be wrong) and, with ``refuse_burned_in``, files at risk of
burned-in text are skipped and counted; a ``.dcm`` file that is empty or broken stops the run.

The report lists which attributes were replaced, removed or cleaned, per file and in total, never
their values, and neither the seed nor the date offset.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, InputError
from ..io import atomic_write_bytes, staging_folder, write_errors_named
from .descriptors import ALLOWED_WORDS, SHORT_DESCRIPTORS, typed_keywords
from .descriptors import clean_descriptors as clean_descriptors_in
from .dicom import (
    MEDIA_STORAGE_DIRECTORY,
    PIXEL_KEYWORDS,
    check_complete,
    check_file_end,
    drop_unconvertible_private,
    give_missing_uids,
    is_dicom_candidate,
    is_hidden,
    quiet_pydicom,
    read_dataset,
    transfer_syntax,
)
from .formats import INSTALL_HINT
from .identifiers import (
    CHARACTER_VRS,
    SCAN_RULES,
    Identifiers,
    collect_identifiers,
    drop_name_parts,
    find_leak,
    is_code,
)
from .profile import DICOGNITO_IDS, apply_profile, apply_to_file_meta

log = logging.getLogger(__name__)

REPORT_NAME = "deid-report.json"
METHOD = "medvl PS3.15 basic profile"  # added to De-identification Method (LO: 64 characters at most)
PROFILE = "DICOM PS3.15 Basic Application Level Confidentiality Profile"

_DEID_CODES = (("113100", "Basic Application Confidentiality Profile"),
               ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
CLEAN_DESCRIPTORS_CODE = ("113105", "Clean Descriptors Option")
# The byte search of the encoded header: names of 6+ letters and dates (numeric IDs would match numbers).
HEADER_SCAN = (6, frozenset({"name", "date"}))
# Modalities whose images usually carry text burned into the pixels (patient name, date, site).
BURNED_IN_MODALITIES = {"US": "ultrasound", "SC": "secondary capture", "OT": "other (screen capture)",
                        "XC": "external-camera photograph", "ES": "endoscopy", "DOC": "scanned document"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1 to .4 multi-frame variants
ULTRASOUND_CLASSES = ("1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1")
_DUMMY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SHIFTED = "shifted"  # snapshot mark of a date dicognito moved
OFFSET_DAYS = (62, 730)  # the range of a run's date shift (back), in whole days
# How a run's date shift follows from its seed (``RunAnonymizer._offset_days``), written in reports and pull states
# so that runs with one seed can be compared and a pull is never resumed with another shift. Change it whenever
# a seed would give other dates. medvl before 2026-12-07 wrote none: dicognito's seeded number of hours.
DATE_SHIFT = "whole days from the seed, v1"
_UTC_OFFSET = re.compile(r"[+-]\d{4}$")  # a DT value's &ZZXX suffix


class IdentifierSurvived(DataError):
    """The final scan found an identifier in the de-identified file: ``what`` kind (``the patient's name``...)
    and ``where`` (the element's path, or ``the encoded header``), never the value; nothing was written."""

    def __init__(self, path: str | Path | None, what: str, where: str):
        super().__init__(path, f"{what} survived de-identification in {where}; nothing was written")
        self.what, self.where = what, where

    def __reduce__(self):
        return type(self), (self.path, self.what, self.where)


def _require_dicognito():
    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        raise DataError(None, f"DICOM de-identification needs dicognito: {INSTALL_HINT}") from None
    return Anonymizer


class RunAnonymizer:
    """One run's dicognito ``Anonymizer`` and the pseudonyms of the values the profile replaces with
    a dummy that dicognito leaves as they were (action D: a clinical trial subject ID, a verifying
    organization...): ``ANON`` and 8 letters or digits from a keyed hash of the value, so the same
    value gives the same dummy within a run (and in any run with the same seed), and nothing else."""

    def __init__(self, seed: str | None = None):
        self._dicognito = _require_dicognito()(seed=seed)
        self._key = b"medvl dummy:" + seed.encode("utf-8") if seed is not None else os.urandom(32)
        _shift_whole_days(self._dicognito, self._offset_days())

    def _offset_days(self) -> int:
        """The run's date shift in days, from the run's key (the same seed, the same shift)."""
        digest = hmac.new(b"medvl date offset", self._key, hashlib.sha256).digest()
        return OFFSET_DAYS[0] + int.from_bytes(digest[:8], "big") % (OFFSET_DAYS[1] - OFFSET_DAYS[0] + 1)

    def anonymize(self, ds) -> None:
        blanked = blank_unshiftable_dates(ds)
        if blanked:  # counted, never quoted: a date is an identifier
            log.warning("emptied %d date or time value(s) that are not valid DICOM dates or times (they could "
                        "not be shifted)", blanked)
        self._dicognito.anonymize(ds)

    def dummy(self, value: str) -> str:
        digest = hmac.new(self._key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        number, letters = int.from_bytes(digest[:8], "big"), []
        for _ in range(8):
            number, digit = divmod(number, len(_DUMMY_ALPHABET))
            letters.append(_DUMMY_ALPHABET[digit])
        return "ANON" + "".join(letters)


def _shift_whole_days(anonymizer, days: int) -> None:
    """Make dicognito shift dates back by ``days`` whole days. Its own offset is a random number of hours: a
    date shifted with its time (Study Date with Study Time) and one without (an empty Type 2 Study Time, a
    Content Date alone) start from different hours, so one real date became two pseudo-dates a day apart in
    one run. With whole days every date moves alike and times of day keep their values."""
    from dicognito.datetimeanonymizer import DateTimeAnonymizer

    class WholeDayShift(DateTimeAnonymizer):
        """A DA whose keyword names no date (Selector DA Value) is shifted alone: dicognito pairs a date with
        the time named like it (``StudyDate`` -> ``StudyTime``), here the element itself, and wrote the date's
        own digits back over the shifted date (under a whole-day offset, the original date)."""

        def __call__(self, dataset, data_element) -> bool:
            if data_element.VR == "DA" and data_element.value and "Date" not in data_element.keyword:
                dates = _values(data_element.value)
                data_element.value = [self._shift_datetime(date.replace(".", "")) for date in dates]
                return True
            return super().__call__(dataset, data_element)

        def _shift_datetime(self, datetime_value: str) -> str:
            """dicognito reads a DT by its length as if it had no UTC offset (``20040115+0100`` failed to
            parse): the offset is split off, the date and time shifted, the offset put back unchanged."""
            moment, utc_offset = _split_utc_offset(datetime_value)
            return super()._shift_datetime(moment) + utc_offset

    handlers = getattr(anonymizer, "_element_handlers", [])
    found = [i for i, handler in enumerate(handlers) if type(handler) is DateTimeAnonymizer]
    if len(found) != 1:  # a dicognito whose internals changed: never fall back to its hour offset
        raise DataError(None, f"this dicognito version's date shift cannot be set to whole days: {INSTALL_HINT}")
    handlers[found[0]] = WholeDayShift(-24 * days)


def blank_unshiftable_dates(ds) -> int:
    """Empty every DA / DT value (in the data set and in every sequence item) that dicognito cannot shift, and
    a DA's paired time (``StudyDate`` / ``StudyTime``) with it: "20199999", "ZZ", hour 24. dicognito would raise
    on them halfway through the file (a traceback, HTTP 500); PS3.15 allows such a date to be emptied. Returns
    how many elements were emptied."""
    emptied = [0]

    def visit(dataset, element) -> None:  # pydicom's walk: every element, in every sequence item
        if element.VR not in ("DA", "DT") or not element.value:
            return
        time_element = None
        if element.VR == "DA" and "Date" in element.keyword:  # Selector DA Value is shifted alone
            time_name = element.keyword.replace("Date", "Time")
            time_element = dataset.data_element(time_name) if time_name in dataset else None
        dates = _values(element.value)
        times = _values(time_element.value) if time_element is not None and time_element.value else []
        pairs = [(date.replace(".", ""), (times[i] if i < len(times) else "").replace(":", ""))
                 for i, date in enumerate(dates)] if element.VR == "DA" else [(value, "") for value in dates]
        if not all(_shiftable(date + time) for date, time in pairs):
            element.value = ""
            emptied[0] += 1
            if time_element is not None and time_element.value:
                time_element.value = ""
                emptied[0] += 1

    ds.walk(visit)
    return emptied[0]


def _values(value) -> list[str]:
    return [str(v) for v in value] if _multi(value) else [str(value)]


def _split_utc_offset(value: str) -> tuple[str, str]:
    """A DT value's date and time, and its UTC offset (``&ZZXX``: ``+0100``, or "" when it has none). PS3.5
    makes every component after the year optional, the hour too: ``2004+0100`` and ``20040115+0100`` are valid."""
    match = _UTC_OFFSET.search(value)
    return (value[:match.start()], match.group()) if match else (value, "")


def _shiftable(value: str) -> bool:
    """What the run's date shift parses (``WholeDayShift._shift_datetime``: dicognito's, on the value
    without its UTC offset)."""
    import datetime

    value, _ = _split_utc_offset(value)
    try:
        datetime.datetime.strptime(value[:10], "%Y%m%d%H"[: len(value) - 2])  # noqa: DTZ007
    except ValueError:
        return False
    return True


def _multi(value) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, MultiValue)


def is_encapsulated_document(ds) -> bool:
    """An encapsulated document (PDF, CDA, STL...): Encapsulated Document and no pixel data."""
    return "EncapsulatedDocument" in ds and not any(keyword in ds for keyword in PIXEL_KEYWORDS)


def burned_in_risk(ds) -> str | None:
    """Why the pixels (an encapsulated document's content) may hold identifiers, or ``None``: Burned In
    Annotation is YES, or the modality / SOP class is one whose images usually carry text (ultrasound,
    secondary capture, screen captures, photographs, endoscopy, scanned documents), whatever Burned In
    Annotation says."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "Burned In Annotation is YES"
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality == "DOC" and is_encapsulated_document(ds):
        return "encapsulated documents (modality DOC) carry text in their content"
    if modality in BURNED_IN_MODALITIES:
        return f"{BURNED_IN_MODALITIES[modality]} images (modality {modality}) often carry burned-in text"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == SECONDARY_CAPTURE or sop_class.startswith(SECONDARY_CAPTURE + "."):
        return "secondary capture images often carry burned-in text"
    if sop_class in ULTRASOUND_CLASSES:
        return "ultrasound images often carry burned-in text"
    return None


# ------------------------------------------------------------------------- change tracking


def _snapshot(ds, prefix: str = "") -> dict[str, Any]:
    """Element path -> comparable value (bulk data by length): what changed is reported by path.
    Dates dicognito shifts (DA, DT) are marked ``SHIFTED`` and always reported as replaced; times of
    day (TM) keep their values under the run's whole-day offset and are not reported."""
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
        elif element.value not in (None, "") and element.VR in ("DA", "DT"):
            values[name] = (SHIFTED, str(element.value))
        else:
            values[name] = str(element.value)
    return values


def _plain(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path)


def _changed(before: Any, after: Any) -> bool:
    return before != after or (isinstance(after, tuple) and after[0] == SHIFTED)


def _changes(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    replaced = {_plain(p) for p, v in after.items() if p in before and _changed(before[p], v)}
    removed = {_plain(p) for p in before if p not in after} - replaced
    outermost = {p for p in removed if not any(p.startswith(other + ">") for other in removed)}
    return sorted(replaced), sorted(outermost)


# ------------------------------------------------------------------------------ the steps


def _mark(ds, burned_in: bool, cleaned: bool) -> None:
    """Patient Identity Removed (YES, or NO when Burned In Annotation is YES: the pixels are not
    changed), the method text and codes (basic profile, modified dates, Clean Descriptors when
    applied). Files flagged only by modality keep YES (their headers are clean; the report and the
    command's warning say their pixels need checking)."""
    from pydicom.dataset import Dataset

    ds.PatientIdentityRemoved = "NO" if burned_in else "YES"
    methods = ds.get("DeidentificationMethod") or []
    methods = list(methods) if _multi(methods) or isinstance(methods, list) else [str(methods)]
    ds.DeidentificationMethod = [*methods, METHOD + (" + clean descriptors" if cleaned else "")]
    codes = []
    for value, meaning in _DEID_CODES + ((CLEAN_DESCRIPTORS_CODE,) if cleaned else ()):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes


def check_writable_syntax(path: Path | str, ds) -> None:
    """Refuse, before anything is changed, a file whose transfer syntax the output cannot be written in:
    a private or unknown UID (its encoding, implicit or explicit VR, byte order, is not known), and
    native pixel data under a compressed syntax, which requires it encapsulated (a mislabelled or
    corrupt input, not a failure to write)."""
    syntax = transfer_syntax(ds)
    if syntax is None:
        return  # the file meta lacks it and the encoding read is used (``_encode``)
    if not syntax.is_transfer_syntax:
        known = f"{syntax.name} ({syntax})" if syntax.name != str(syntax) else str(syntax)
        raise DataError(path, f"unsupported transfer syntax {known}: not a DICOM transfer syntax, so its encoding "
                              "is not known and the de-identified file cannot be written")
    if syntax.is_encapsulated and "PixelData" in ds and not ds["PixelData"].is_undefined_length:
        raise DataError(path, f"pixel data not encapsulated as its transfer syntax {syntax.name} ({syntax}) "
                              "requires: the file is mislabelled or corrupt")


def _save(ds, path: Path | str, what: str) -> bytes:
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as error:
        raise DataError(path, f"cannot write the de-identified {what} ({type(error).__name__})") from None
    return buffer.getvalue()


def _encode(ds, path: Path | str) -> bytes:
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
    return _save(ds, path, "file")


def _header_bytes(ds, path: Path | str) -> bytes:
    """The encoded file without its pixel data (pixels are not searched: chance matches) and without its coded
    values (``identifiers.is_code``: a Filter Material ``COPPER`` is no name, whoever the patient is; the element
    scan searched them by its own rule)."""
    header = _without_codes(ds, typed_keywords())
    header.file_meta, header.preamble = ds.file_meta, ds.preamble
    return _save(header, path, "header")


def _without_codes(dataset, typed: frozenset[str]):
    """A copy of ``dataset`` (sequence items too) without pixel data and coded values (Specific Character Set
    kept: the text is encoded as the file encodes it)."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    kept = Dataset()
    for element in dataset:
        if element.keyword in PIXEL_KEYWORDS or (is_code(element, typed) and element.keyword != "SpecificCharacterSet"):
            continue
        if element.VR == "SQ":
            element = DataElement(element.tag, "SQ", [_without_codes(item, typed) for item in element.value or []])
        kept.add(element)
    return kept


def _full_snapshot(ds) -> dict[str, Any]:
    meta = getattr(ds, "file_meta", None)
    meta_values = {f"file_meta:{k}": v for k, v in _snapshot(meta).items()} if meta is not None else {}
    return _snapshot(ds) | meta_values


def _check_nothing_survived(ds, identifiers: Identifiers, path: Path | str) -> None:
    """The final scan (``identifiers.find_leak``) and a byte search of the encoded header; either
    finding refuses the file, naming the element and the kind of identifier, never its value."""
    leak = find_leak(ds, identifiers, typed_keywords())
    if leak is not None:
        element, kind = leak
        what = "an original UID (study, series, instance...)" if kind == "UID" else f"the patient's {kind}"
        raise IdentifierSurvived(path, what, element)
    if identifiers.kind_in(_header_bytes(ds, path).decode("latin-1"), *HEADER_SCAN) is not None:
        raise IdentifierSurvived(path, "a patient identifier", "the encoded header")


def deidentify_dataset(ds, anonymizer, path: Path | str, clean_descriptors: bool = True,
                       refuse_burned_in: bool = False) -> tuple[bytes, dict[str, Any]]:
    """De-identify one parsed dataset in place; its encoded bytes and its report entry.

    ``anonymizer``: the run's ``RunAnonymizer`` (one per run: consistent dummies and UIDs);
    ``clean_descriptors``: apply the Clean Descriptors option (``medvl.clinical.descriptors``);
    ``refuse_burned_in``: raise ``DataError`` for a file whose pixels may hold burned-in text
    (``burned_in_risk``) instead of flagging it. Raises ``DataError`` for a truncated or incomplete
    data set and when an identifier survives (nothing is returned to write).
    """
    given = give_missing_uids(ds)  # a whole object without Study / Series UID: new ones, replaced as every UID
    unreadable_private = drop_unconvertible_private(ds)  # removed below with every private element anyway
    check_complete(path, ds)
    check_writable_syntax(path, ds)
    burned_in, document = burned_in_risk(ds), is_encapsulated_document(ds)
    if burned_in and refuse_burned_in:
        raise DataError(path, f"refused (--refuse-burned-in): {burned_in}")
    identifiers = collect_identifiers(ds, common_words=ALLOWED_WORDS)
    before = _full_snapshot(ds)
    private = unreadable_private + sum(1 for element in _iter_all(ds) if element.tag.is_private)
    anonymizer.anonymize(ds)
    drop_name_parts(ds, identifiers)
    reroll_chance_identifiers(ds, identifiers, anonymizer.dummy)
    patient_words = frozenset(identifiers.names | identifiers.common_names)
    cleaned = clean_descriptors_in(ds, patient_words) if clean_descriptors else []
    apply_profile(ds, anonymizer.dummy, SHORT_DESCRIPTORS if clean_descriptors else frozenset())
    apply_to_file_meta(getattr(ds, "file_meta", None))
    ds.remove_private_tags()
    remove_unknown_public(ds)  # listed in "removed" by tag, as any removed attribute
    _mark(ds, str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES", clean_descriptors)
    data = _encode(ds, path)
    _check_nothing_survived(ds, identifiers, path)
    replaced, removed = _changes(before, _full_snapshot(ds))
    warnings = [_risk_warning(burned_in, document)] if burned_in else []
    warnings += [f"no {keyword} in the input: a new one was given" for keyword in given]
    entry = {"replaced": replaced, "removed": [r for r in removed if not _is_private_path(r)],
             "private_tags_removed": private, "descriptors_cleaned": cleaned, "burned_in_risk": burned_in,
             "warnings": warnings}
    return data, entry


REROLLS = 32  # dummies tried for one value (each holds a patient identifier by chance with p < 0.01)


def reroll_chance_identifiers(ds, identifiers: Identifiers, dummy) -> int:
    """Replace the random IDs dicognito gave (``DICOGNITO_IDS``: Study ID, Accession Number, ...) that hold a
    patient identifier by chance: a patient ID as short as ``X1`` sits in about one study ID of 300 (``7X1B...``),
    and the final scan would refuse the file as if the ID had survived. Such a value becomes ``dummy`` of it
    (the run's keyed pseudonym, ``RunAnonymizer.dummy``) with a counter, the first that holds none: the same
    dicognito value gives the same replacement in every file of a run. Returns how many values changed."""
    changed = 0

    def visit(dataset, element) -> None:
        nonlocal changed
        if element.keyword not in DICOGNITO_IDS or element.VR not in CHARACTER_VRS or not element.value:
            return
        values = [str(v) for v in _values(element.value)]
        rerolled = [_reroll(v, identifiers, dummy, SCAN_RULES["character"]) for v in values]
        if rerolled != values:
            changed += 1
            element.value = rerolled if len(rerolled) > 1 else rerolled[0]

    ds.walk(visit)
    return changed


def _reroll(value: str, identifiers: Identifiers, dummy, rules: tuple) -> str:
    if identifiers.kind_in(value, *rules) is None:
        return value
    for attempt in range(REROLLS):
        candidate = dummy(f"{value}#{attempt}")
        if identifiers.kind_in(candidate, *rules) is None:
            return candidate
    return value  # the final scan refuses the file


def remove_unknown_public(ds) -> int:
    """Remove, at any depth, the public elements held as UN (value representation unknown) whose tag the
    DICOM dictionary does not know (a newer standard attribute that passed an older node); returns how
    many went. Like a private tag's, such a value is opaque to the profile: a date in it cannot be
    shifted, nor a name in it replaced, so it is removed as private tags are (PS3.15 treats what it
    cannot classify conservatively). Public elements the dictionary knows are read with their own VR."""
    from pydicom.datadict import get_entry

    removed = 0

    def visit(dataset, element) -> None:
        nonlocal removed
        if element.VR != "UN" or element.tag.is_private:
            return
        try:
            get_entry(element.tag)
        except KeyError:
            del dataset[element.tag]
            removed += 1

    ds.walk(visit)
    return removed


def _risk_warning(risk: str, document: bool) -> str:
    if document:  # Encapsulated Document is D in Table E.1-1: replaced, so nothing of the content is written
        return f"{risk}: identifiers may be in the document's content, which is replaced by a dummy (not kept)"
    return f"{risk}: identifiers may be burned into the pixels, which are not changed"


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


def _report(entries: list[dict[str, Any]], skipped: Counter, seeded: bool, clean: bool) -> dict[str, Any]:
    from dicognito import __version__ as dicognito_version

    replaced = Counter(name for entry in entries for name in entry["replaced"])
    removed = Counter(name for entry in entries for name in entry["removed"])
    cleaned = Counter(name for entry in entries for name in entry["descriptors_cleaned"])
    return {
        "profile": PROFILE,
        "options": ["Retain Longitudinal Temporal Information with Modified Dates"]
                   + (["Clean Descriptors"] if clean else []),
        "tool": f"dicognito {dicognito_version}",
        "files_written": len(entries),
        "skipped": dict(sorted(skipped.items())),
        "uids": "replaced, consistent within this run" + (" and in any run with the same seed" if seeded else ""),
        "dates": "shifted back by one whole-day offset for the run (62 to 730 days); times of day and "
                 "intervals kept",
        "date_shift": DATE_SHIFT,
        "totals": {
            "replaced": dict(sorted(replaced.items())),
            "removed": dict(sorted(removed.items())),
            "descriptors_cleaned": dict(sorted(cleaned.items())),
            "private_tags_removed": sum(entry["private_tags_removed"] for entry in entries),
            "files_with_burned_in_risk": sum(1 for entry in entries if entry["burned_in_risk"]),
            "files_with_warnings": sum(1 for entry in entries if entry["warnings"]),
        },
        "files": entries,
    }


@dataclass(frozen=True)
class _Run:
    """One run's settings: the anonymizer (one per run: consistent dummies and UIDs) and options."""

    anonymizer: Any
    seeded: bool
    clean_descriptors: bool
    refuse_burned_in: bool

    def one(self, ds, path: Path) -> tuple[bytes, dict[str, Any]]:
        return deidentify_dataset(ds, self.anonymizer, path, self.clean_descriptors, self.refuse_burned_in)


def _skip_reason(ds, run: _Run) -> str | None:
    storage = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if storage == MEDIA_STORAGE_DIRECTORY:
        return "DICOMDIR (rebuild it for the new files)"
    if run.refuse_burned_in and burned_in_risk(ds):
        if is_encapsulated_document(ds):
            return "possible identifying text in an encapsulated document (--refuse-burned-in)"
        return "possible burned-in text in the pixels (--refuse-burned-in)"
    return None


def _deidentify_folder(source: Path, run: _Run, staging: Path, target: Path) -> tuple[list, Counter]:
    entries: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    studies: dict[str, int] = {}
    series: dict[tuple[int, str], int] = {}
    images: Counter = Counter()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if is_hidden(path, source):  # a macOS ._ file, .DS_Store: nothing of it is written
            skipped["hidden file (name starting with '.')"] += 1
            continue
        if not is_dicom_candidate(path):
            skipped["not DICOM"] += 1
            continue
        ds = _read(path)
        reason = _skip_reason(ds, run)
        if reason:
            skipped[reason] += 1
            continue
        data, entry = run.one(ds, path)
        study = studies.setdefault(str(ds.get("StudyInstanceUID", "")), len(studies) + 1)
        key = (study, str(ds.get("SeriesInstanceUID", "")))
        if key not in series:
            series[key] = sum(1 for other in series if other[0] == study) + 1
        images[key] += 1
        relative = f"study_{study:03d}/series_{series[key]:03d}/image_{images[key]:04d}.dcm"
        with write_errors_named(target / relative):  # a full disk names the output, not the staging folder
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_bytes(data)
        entries.append({"output": relative, **entry})
    if not entries:
        raise DataError(source, "no DICOM files to de-identify" + (f" ({sum(skipped.values())} skipped)"
                                                                   if skipped else ""))
    return entries, skipped


def deidentify(in_path: str | Path, out_path: str | Path, seed: int | str | None = None,
               clean_descriptors: bool = True, refuse_burned_in: bool = False) -> dict[str, Any]:
    """De-identify a DICOM file (``out_path``: the new file) or a folder (``out_path``: a new or
    empty folder, with ``deid-report.json``). Returns the report (attribute names, never values).

    ``seed``: same seed, same dummies and UIDs (runs can be linked); ``None``: random per run.
    ``clean_descriptors`` (default on): the PS3.15 Clean Descriptors option; off keeps descriptors
    the basic profile keeps (Body Part Examined, Manufacturer's Model Name...) as they are.
    ``refuse_burned_in``: a file whose pixels may hold burned-in text (``burned_in_risk``) is an
    error for a file input and skipped (counted in the report) in a folder; off, it is flagged.
    Raises ``DataError`` for an unreadable, truncated, incomplete or non-DICOM input file or one in a
    transfer syntax that cannot be written (``check_writable_syntax``), and when an identifier
    survives (nothing is written), and ``InputError`` if the output exists or lies inside the input
    folder.
    """
    source, target = Path(in_path), Path(out_path)
    _require_dicognito()
    _check_paths(source, target)
    run = _Run(RunAnonymizer(None if seed is None else str(seed)), seed is not None, clean_descriptors,
               refuse_burned_in)
    target.parent.mkdir(parents=True, exist_ok=True)
    with quiet_pydicom(source):
        return _run(source, target, run)


def _read(path: Path):
    """The parsed file, refused when truncated anywhere (``read_dataset`` and ``check_file_end``)."""
    ds = read_dataset(path)
    check_file_end(path, ds)
    return ds


def _deidentify_file(source: Path, target: Path, run: _Run) -> dict[str, Any]:
    ds = _read(source)
    storage = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", ""))
    if storage == MEDIA_STORAGE_DIRECTORY:
        raise DataError(source, "a DICOMDIR (media directory): de-identify the folder it indexes instead")
    data, entry = run.one(ds, source)
    atomic_write_bytes(target, data)
    return _report([{"output": target.name, **entry}], Counter(), run.seeded, run.clean_descriptors)


def _run(source: Path, target: Path, run: _Run) -> dict[str, Any]:
    if source.is_file():
        return _deidentify_file(source, target, run)
    staging = staging_folder(target.parent, f".{target.name}.", ".staging")
    try:
        entries, skipped = _deidentify_folder(source, run, staging, target)
        report = _report(entries, skipped, run.seeded, run.clean_descriptors)
        with write_errors_named(target / REPORT_NAME):
            (staging / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("%s: de-identified %d file(s) into %s", source, len(entries), target)
    return report
