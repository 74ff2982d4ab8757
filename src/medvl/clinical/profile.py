"""The DICOM PS3.15 Basic Application Level Confidentiality Profile as data, and the rules that apply it.

``confidentiality_profile.tsv`` (next to this module) is Table E.1-1 of PS3.15 (2024b): every attribute
the profile lists, by tag and keyword, with its basic-profile action (X remove, Z empty, D dummy, U new
UID, or a combination such as ``X/Z/D``). ``apply_profile(ds, dummy, cleaned)`` applies it to a data set
that dicognito has already processed (``medvl.clinical.deid``), in the data set and in every sequence
item at any depth. medvl does not know which attributes an IOD requires (the Type that decides between
the actions of a combination), so it takes the first action of each combination, the one that removes
most, with these exceptions:

- UIDs (U, and the U* of ``X/Z/U*``: Referenced Image Sequence, Source Image Sequence): kept, dicognito
  having replaced every UID consistently within the run, so references between the files stay linked
  (dicognito keeps class UIDs: the table's one U class UID, Manufacturer's Device Class UID, gets a
  ``2.25`` UID made from the run's pseudonym of its value);
- dates and times the profile's Retain Longitudinal Temporal Information with Modified Dates option
  covers (every DA and DT, and a TM whose date is in the same data set: dicognito shifts a time only
  with its date): kept, shifted by dicognito. The patient's birth date and time are not covered: Z / X;
- Z and D on values dicognito already replaced with dummies (person names, and the patient and request
  identifiers of ``DICOGNITO_IDS``): the dummy is kept (both actions allow one);
- Clean Descriptors: the short descriptors ``cleaned`` names (``descriptors.SHORT_DESCRIPTORS`` when the
  option is on) are left to that option (kept when plain, blanked otherwise);
- ``STRICTER``: Content Sequence (D) is removed: SR content is not cleaned item by item.

Z empties the value (a sequence loses its items). D replaces a text value with ``dummy(value)`` (the
run's pseudonym of that value: the same value gives the same dummy within a run), a number with 0,
bytes with two zero bytes; a sequence keeps its items, the table applied inside and every remaining
text value (LO LT SH ST UC UT AE) replaced by its pseudonym (coded items such as a Person Identification
Code Sequence keep no real code or meaning).

Beyond the table, ``EXTRA_REMOVED`` (attributes naming the patient's site, calendar-specific birth and
death dates, a trial's URL) and, in the file meta, ``FILE_META_REMOVED`` (the sending site's AE titles,
private information) are removed, as are every element of VR UR (``REMOVED_VRS``: URLs and URIs at any
depth, the file meta's presentation addresses included), every curve (50xx) and overlay (60xx) element
and, in ``medvl.clinical.deid``, every private attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TABLE_FILE = Path(__file__).with_name("confidentiality_profile.tsv")
ACTIONS = frozenset({"X", "Z", "D", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"})
# Not in Table E.1-1, but naming the patient's site or the patient: removed (X) as well.
EXTRA_REMOVED = ("IssuerOfAccessionNumberSequence", "IssuerOfPatientIDQualifiersSequence",
                 "RequestingServiceCodeSequence", "StorageMediaFileSetID", "EthnicGroupCodeSequence",
                 "PatientAlternativeCalendar", "PatientBirthDateInAlternativeCalendar",
                 "PatientDeathDateInAlternativeCalendar", "UniformResourceLocatorTrial")
# Every URL / URI (Retrieve URL, Retrieve URI, Pixel Data Provider URL, Storage URL, Contact URI, the file
# meta's presentation addresses...): an address names the site's host and often holds the original study,
# series and instance UIDs (DICOMweb and WADO paths), which dicognito does not look into. Removed.
REMOVED_VRS = frozenset({"UR"})
# File meta (PS3.10) elements naming the application entities of the sending site, or its private data.
FILE_META_REMOVED = ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                     "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation")
STRICTER = {"ContentSequence": "X"}  # D in the table; SR content is removed rather than cleaned
# The identifiers dicognito 0.19 replaces with dummies (its IDAnonymizer list), beyond every PN, UI, DA, DT.
DICOGNITO_IDS = frozenset({
    "AccessionNumber", "OtherPatientIDs", "FillerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequestRetired", "FillerOrderNumberProcedure", "PatientID",
    "PerformedProcedureStepID", "PlacerOrderNumberImagingServiceRequest",
    "PlacerOrderNumberImagingServiceRequestRetired", "PlacerOrderNumberProcedure", "RequestedProcedureID",
    "ScheduledProcedureStepID", "StationName", "StudyID"})
NOT_RETAINED_DATES = frozenset({"PatientBirthDate", "PatientBirthTime"})  # outside the Modified Dates option
DUMMY_TEXT_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UT"})  # replaced inside a D sequence
_TEXT_VRS = DUMMY_TEXT_VRS | {"CS", "UR"}
_NUMBER_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_BYTE_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_FIXED_DUMMIES = {"AS": "000D", "DA": "19000101", "DT": "19000101", "TM": "000000"}
_REPEATING_GROUPS = (0x5000, 0x6000)  # curves, overlay planes: every element of groups 50xx / 60xx

KEEP, REMOVE, EMPTY, DUMMY = "keep", "remove", "empty", "dummy"


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1."""

    tag: int  # (group << 16) | element
    keyword: str  # the DICOM keyword (PS3.6)
    action: str  # basic-profile action: one of ACTIONS
    name: str  # the attribute's name as the standard prints it


@lru_cache(maxsize=1)
def profile_table() -> dict[int, ProfileRow]:
    """Table E.1-1 by tag, read from ``TABLE_FILE``."""
    rows: dict[int, ProfileRow] = {}
    for line in TABLE_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            tag, keyword, action, name = line.split("\t")
            number = int(tag.strip("()").replace(",", ""), 16)
            rows[number] = ProfileRow(number, keyword, action, name)
    return rows


@lru_cache(maxsize=1)
def _actions_by_tag() -> dict[int, str]:
    from pydicom.datadict import tag_for_keyword

    actions = {tag: STRICTER.get(row.keyword, row.action) for tag, row in profile_table().items()}
    for keyword in EXTRA_REMOVED + FILE_META_REMOVED:
        tag = tag_for_keyword(keyword)
        if tag is not None:
            actions[tag] = "X"
    return actions


def _retained_date(element, dataset) -> bool:
    """A date or time that dicognito shifted and the Modified Dates option keeps."""
    if element.keyword in NOT_RETAINED_DATES:
        return False
    if element.VR in ("DA", "DT"):
        return True
    return element.VR == "TM" and element.keyword.replace("Time", "Date") in dataset


def resolve(action: str, element, dataset, cleaned: frozenset[str] = frozenset()) -> str:
    """What medvl does with an element the profile lists: ``keep``, ``remove``, ``empty`` or ``dummy``
    (see the module docstring for the rules)."""
    if action == "U" and element.keyword.endswith("ClassUID"):
        return DUMMY  # dicognito keeps every *ClassUID (SOP classes); Manufacturer's Device Class UID is U
    if element.keyword in cleaned or action == "U" or action.endswith("U*") or _retained_date(element, dataset):
        return KEEP
    first = action.split("/")[0]
    if first == "X":
        return REMOVE
    if element.VR == "PN" or element.keyword in DICOGNITO_IDS:
        return KEEP
    return EMPTY if first == "Z" else DUMMY


def _values(value: Any) -> list[Any]:
    from pydicom.multival import MultiValue

    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _dummy_value(element, dummy: Callable[[str], str]) -> Any:
    """A non-empty value of the element's VR that tells nothing about the original."""
    if element.VR in _TEXT_VRS:
        values = [dummy(str(v)) for v in _values(element.value)]
        return values if len(values) > 1 else values[0]
    if element.VR == "UI":  # a UID under the 2.25 root (PS3.5 B.2) from the pseudonym's 8 letters and digits
        return f"2.25.{int(dummy(str(element.value))[4:], 36)}"
    if element.VR in _NUMBER_VRS:
        return 0
    if element.VR in _BYTE_VRS:
        return b"\x00\x00"
    return _FIXED_DUMMIES.get(element.VR, dummy(str(element.value)))


def _dummy_text(dataset, dummy: Callable[[str], str]) -> None:
    """Replace every text value left in a D sequence's items (any depth) with its pseudonym."""
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value or []:
                _dummy_text(item, dummy)
        elif element.VR in DUMMY_TEXT_VRS and element.value not in (None, ""):
            element.value = _dummy_value(element, dummy)


def _apply(element, dataset, what: str, dummy: Callable[[str], str], cleaned: frozenset[str]) -> None:
    if what == REMOVE:
        del dataset[element.tag]
    elif what == EMPTY:
        element.value = [] if element.VR == "SQ" else ("" if element.VR in _TEXT_VRS | {"PN"} else None)
    elif element.VR == "SQ":
        for item in element.value or []:
            apply_profile(item, dummy, cleaned)
            if what == DUMMY:
                _dummy_text(item, dummy)
    elif what == DUMMY and element.value not in (None, "", b""):
        element.value = _dummy_value(element, dummy)


def _in_repeating_group(tag) -> bool:
    return any(base <= tag.group <= base + 0x1E and tag.group % 2 == 0 for base in _REPEATING_GROUPS)


def apply_profile(ds, dummy: Callable[[str], str], cleaned: frozenset[str] = frozenset()) -> None:
    """Apply Table E.1-1 (and ``EXTRA_REMOVED``, ``REMOVED_VRS``, curves and overlays) to ``ds`` and every
    sequence item in it, in place. ``dummy(value)``: the run's pseudonym of a text value; ``cleaned``: keywords left
    to the Clean Descriptors option. The file meta is ``apply_to_file_meta``'s."""
    actions = _actions_by_tag()
    for element in list(ds):
        if _in_repeating_group(element.tag) or element.VR in REMOVED_VRS:
            del ds[element.tag]
            continue
        action = actions.get(int(element.tag))
        what = KEEP if action is None else resolve(action, element, ds, cleaned)
        _apply(element, ds, what, dummy, cleaned)


def apply_to_file_meta(meta) -> None:
    """Remove ``FILE_META_REMOVED`` and the ``REMOVED_VRS`` elements (the presentation addresses) from the file
    meta, if any (its UIDs are set when the file is written)."""
    if meta is None:
        return
    for keyword in FILE_META_REMOVED:
        if keyword in meta:
            del meta[keyword]
    for element in list(meta):
        if element.VR in REMOVED_VRS:
            del meta[element.tag]
