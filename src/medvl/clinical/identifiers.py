"""The patient identifiers a DICOM file holds, and the final scan that proves none survived.

``collect_identifiers(ds)`` reads, before de-identification, what must not be in the output:

- names: every part of 2+ characters of the patient's names (Patient Name, Other Patient Names,
  Patient's Birth Name, Patient's Mother's Birth Name, at the top level and in every sequence item:
  a referenced image's patient in a Source Image Sequence item, for instance; every component group,
  alphabetic, ideographic and phonetic), i.e. family, given and middle names split at ``^``, spaces,
  hyphens, dots, commas and apostrophes, and every two parts glued together in either order
  (``LIWU``, ``WULI``). Within one name component, every run of two or more consecutive parts is
  also searched glued, one-letter parts included, as records systems write names without their
  apostrophes, spaces and hyphens (``O'BRIEN`` -> ``OBRIEN``, ``VAN DER BERG`` -> ``VANDERBERG``,
  ``DERBERG``, ``DE LA CRUZ`` -> ``DELACRUZ``), and a whole component glued counts as one part for
  the two-part gluings (``OBRIENMAEVE``); a glued form of fewer than ``GLUED_MIN`` letters
  (initials: ``J P``) is not searched. Name prefixes and suffixes (PN components 4 and 5: MR, DR,
  JR, III...) identify no one and would match modality codes such as MR, so they are left out, as
  are placeholder words that test and phantom files use as names (``PLACEHOLDER_NAMES``: TEST,
  ANONYMOUS, PHANTOM...) and parts that are DICOM modality codes (a pseudonym such as
  ``CQ500-CT-310`` holds ``CT``, which every CT file holds in Modality; no one is named CT).
  ``collect_identifiers(ds, common_words)`` also leaves out parts that are common technical words
  (de-identification passes the Clean Descriptors allow list): test files name patients ``OB`` or
  ``Perfusion^MCA Stroke``, words a technical element holds anyway, so finding them proves nothing;
  a real name that is also such a word (``Long``) is still searched glued to the other parts
  (``LONGWEI``), and alone in the free text people type (descriptions, protocol names, comments:
  ``find_leak``'s ``typed``; a word the patient is called is no technical word there), and the other
  parts are searched on their own;
- IDs of 2+ characters: Patient ID and Other Patient IDs at any depth (in Other Patient IDs
  Sequence items too), as written, and the longest run of digits of an ID that has letters too when
  it has ``DIGIT_RUN_MIN`` (6) or more digits (``99887766`` of ``MRN99887766``). Those of
  ``SPACED_ID_MIN`` (6) or more letters and digits are also searched with their own separators
  ignored and one space, ``.``, ``/`` or ``-`` allowed between any two characters (``MRN99887766``
  is found as ``MRN 99887766``, ``A-77123`` as ``A77123``, ``99887766`` as ``99-887-766``), but not
  with a ``.`` between two digits (``10.0.0.85`` is a version, ``1.2.840.10008.5.1`` a UID);
- request IDs, in the same forms as IDs and reported as ``request ID``: Accession Number, Study ID,
  Requested Procedure ID, Scheduled / Performed Procedure Step ID and the Placer / Filler Order
  Numbers (``REQUEST_ID_KEYWORDS``) at any depth, when they have ``REQUEST_ID_MIN`` (6) or more
  letters and digits (shorter ones are mostly counters such as Study ID ``1`` or ``4MR1``);
- dates: every DA value and the date part of every DT value, in the file meta, the data set and
  its sequences, each spelled ``YYYYMMDD`` (alone or followed by the time digits of a date-time,
  ``YYYYMMDDHH``, ``YYYYMMDDHHMM``, ``YYYYMMDDHHMMSS``), ``YYYY-MM-DD`` / ``YYYY.MM.DD`` / ``YYYY/MM/DD``,
  ``DD/MM/YYYY``, ``MM/DD/YYYY``, ``DD.MM.YYYY``, ``DD-MM-YYYY`` (day and month with or without
  the leading zero), ``DDMMYYYY``, ``MMDDYYYY``, and with English month names or abbreviations
  (``January 31, 1950``, ``31 Jan 1950``, ``31-JAN-1950``). Two-digit years are not searched;
- UIDs: every UI value of ``UID_MIN`` (10) or more characters that de-identification replaces (all
  but class UIDs, the transfer syntax and the standard's own ``1.2.840.10008.`` UIDs), at any depth
  and in the file meta, as written and not inside a longer UID (``1.2.3.45`` is not ``1.2.3.4``):
  a Retrieve URL or a WADO query naming the original study would link the output back to it (a
  value the input also holds as a class UID, such as its Implementation Class UID, is kept). The
  date-like components of UIDs (a timestamp, ``...20040119072730.12322``) are not searched as dates:
  a device's implementation root may hold one (``...9125.0.19950720``), kept in its class UIDs.

Matching ignores case and accents (``fold``: ``Ł``, ``Ø``, ``Æ``... as ``L``, ``O``, ``AE``; name parts also
in their other ASCII spellings, ``Đorđević`` as ``Djordjevic``), and a value only matches where it is
not glued to more of the same kind of character: a name part must not touch another letter (``LI`` is
found in ``LI WU``, ``Li^Wu`` and ``DR-LI``, not in ``CLINIC``), a number must not touch another digit (``19500131``
is found in ``DOB19500131``, not inside a longer number such as ``2.25.1195001310``; the time
digits of a date-time are the one exception: ``19500131123000`` is the date). Name parts of fewer than
four letters must not touch a digit either (``WU`` is not found in a random Study ID ``7WU3``;
longer parts are: ``SMITH`` in ``SMITH1950``). Scripts written without spaces between words
(Chinese, Japanese, Korean, Thai, Lao, Khmer, Myanmar: ``UNSPACED_SCRIPTS``) are the exception: a
name part in them is found anywhere, as a substring (``山田太郎`` in ``山田太郎様の装置``).

``find_leak(ds)`` scans every element after de-identification: the file meta, the data set and
every sequence item. Character VRs (AE AS CS DA DT LO LT PN SH ST UC UR UT) are searched for every
identifier, the original UIDs included, but for names in coded values (``is_code``): a Code String (CS,
"a controlled concept" in PS3.5: Pixel Intensity Relationship ``LIN``, Filter Material ``COPPER``...; but
not the CS descriptors people type, Body Part Examined, in ``typed``) and the value of an attribute of
another VR that is one of its defined terms (``DEFINED_TERMS``: Rescale Type ``HU``, ``US``, ``OD``) spell a
name part by chance: a patient called Hu, Lin or Copper has them in files that hold no name. Names are
searched there only glued (``HUJUN``) or as two different parts of the name in one element (``LI WU``): a
name typed into a code string; IDs, dates and UIDs as anywhere. UIDs (UI) are searched for IDs of 6+
characters, dates and the original UIDs (shorter IDs would match UID components); numbers and times
(IS DS TM) for dates only (a numeric ID cannot be told from a number there); byte VRs that may
hold text (OB UN, never the pixel data) for identifiers of 4+ characters and UIDs, their bytes read
as latin-1, UTF-8 and UTF-16 of either byte order (``byte_text``). It returns the element's path and
the kind of identifier, never the value. The identifiers only live in memory while a file is
processed; they are never logged.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName")
ID_KEYWORDS = ("PatientID", "OtherPatientIDs")
# The request identifiers the profile replaces: they link a study to the order and so to the patient.
REQUEST_ID_KEYWORDS = (
    "AccessionNumber", "StudyID", "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "PlacerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequestRetired",
    "PlacerOrderNumberProcedure", "FillerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequestRetired", "FillerOrderNumberProcedure")
# Request IDs with fewer letters and digits are not searched: Study IDs are often counters (1, 10, S1,
# 4MR1, 1234) that technical values hold by chance (a kernel B10f, a version V1234).
REQUEST_ID_MIN = 6
CHARACTER_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
NUMBER_VRS = frozenset({"IS", "DS", "TM"})
BYTE_VRS = frozenset({"OB", "UN"})
PIXEL_KEYWORDS = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData"})
# Kinds of identifier: names, IDs as written, IDs with separators (``SPACED_ID_MIN``), dates. UIDs
# (digits and dots) are searched for IDs as written only. Request IDs are searched as IDs are.
ALL_KINDS = frozenset({"name", "id", "spaced_id", "date", "uid"})
# What is searched in each kind of VR: (shortest identifier, kinds of identifier)
SCAN_RULES: dict[str, tuple[int, frozenset[str]]] = {
    "character": (2, ALL_KINDS), "uid": (6, frozenset({"id", "date", "uid"})), "number": (8, frozenset({"date"})),
    "bytes": (4, ALL_KINDS)}
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
PLACEHOLDER_NAMES = frozenset({"test", "anonymous", "anon", "anonymized", "anonymised", "deidentified", "patient",
                               "unknown", "phantom", "none", "nobody", "demo", "sample", "dummy", "qa", "qc"})
MODALITY_CODES = frozenset(code.casefold() for code in (
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS "
    "MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE "
    "RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC").split())
_NAME_SEPARATORS = re.compile(r"[\s,.'\-\u2018\u2019`]+")  # apostrophes: ' ‘ ’ `
# Name parts this short must not touch a digit either: generated identifiers (de-identified Study IDs,
# accession numbers) are random letters and digits and hold two- or three-letter runs such as 7WU3.
SHORT_NAME = 4
# Glued forms (one-letter parts included) shorter than this are initials, not searched alone.
GLUED_MIN = 4
# IDs with at least this many letters and digits are also searched with separators between them;
# shorter ones would match chance runs (an ID X1 in "2 x 1 mm").
SPACED_ID_MIN = 6
DIGIT_RUN_MIN = 6  # the longest digit run of an alphanumeric ID is searched when at least this long
_ID_SEPARATOR = r"[\s./-]?"
_DIGIT_SEPARATOR = r"[\s/-]?"
_LETTER = r"[^\W\d_]"
# Scripts written without spaces between words, as ``fold`` leaves them (Hangul as conjoining jamo,
# kana without voicing marks, half-width katakana as full-width): Thai, Lao, Myanmar, Hangul, Khmer,
# kana, CJK ideographs. A name part in them is searched as a substring: in 山田太郎様の装置 the name
# 山田太郎 touches the letters of the next word.
UNSPACED_SCRIPTS = ("\u0e00-\u0eff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u3040-\u30ff\u3130-\u318f"
                    "\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
                    "\U00020000-\U0003134f")
_UNSPACED = re.compile(f"[{UNSPACED_SCRIPTS}]")


KIND_NAMES = {"name": "name", "common_name": "name", "glued": "name", "part": "name", "id": "ID", "spaced_id": "ID",
              "request_id": "request ID", "spaced_request_id": "request ID", "date": "date", "uid": "UID"}
# Kinds searched only when asked for by name (``find_leak``'s coded values): the glued forms of the names, and
# every single name part (common words included), counted apart (``Identifiers.name_in_code``).
GLUED, PART = "glued", "part"
CODE_VRS = frozenset({"CS"})  # a Code String holds codes ("a controlled concept", PS3.5 Table 6.2-1)
# Attributes of another VR whose values are mostly the standard's defined terms: such a value is a code. PS3.3
# C.11.1.1.2 (Modality LUT and Rescale Type; both LO): thousands of optical density, Hounsfield units, unspecified,
# mg/ml, effective atomic number, electron density (and normalised to water), modified HU, percentage.
_RESCALE_TYPES = frozenset({"od", "hu", "us", "mgml", "z_eff", "ed", "edw", "hu_mod", "pct"})
DEFINED_TERMS: dict[str, frozenset[str]] = {"RescaleType": _RESCALE_TYPES, "ModalityLUTType": _RESCALE_TYPES}
# The kind searched, besides a VR's own, in the free text people type (``find_leak``'s ``typed``): the
# patient's name parts that are common technical words (``Identifiers.common_names``), alone.
COMMON_NAME = "common_name"
# UIDs shorter than this are not searched (test files' 1.2.3.4 would match a version number).
UID_MIN = 10
STANDARD_UID_ROOT = "1.2.840.10008."  # the standard's own UIDs (classes, transfer syntaxes, coding schemes)


# Latin letters Unicode does not decompose into a base letter and an accent, as systems that drop
# diacritics write them (``Łukasz`` -> ``Lukasz``, ``Æbelø`` -> ``Aebelo``); ß -> ss is casefold's.
UNDECOMPOSED = str.maketrans({
    "Ł": "L", "ł": "l", "Ø": "O", "ø": "o", "Æ": "AE", "æ": "ae", "Œ": "OE", "œ": "oe", "Đ": "D", "đ": "d",
    "Ð": "D", "ð": "d", "Þ": "TH", "þ": "th", "ı": "i", "Ħ": "H", "ħ": "h", "Ŧ": "T", "ŧ": "t", "ĸ": "k",
    "Ŋ": "NG", "ŋ": "ng", "Ɨ": "I", "ɨ": "i", "Ƀ": "B", "ƀ": "b", "Ɖ": "D", "ɖ": "d", "Ɓ": "B", "ɓ": "b",
    "ẞ": "SS", "ſ": "s", "Ĳ": "IJ", "ĳ": "ij"})
# Other spellings of letters in names written in ASCII (``Đorđević`` as ``Djordjevic``, ``Müller`` as
# ``Mueller``, ``Ørsted`` as ``Oersted``, ``Åse`` as ``Aase``): name parts are searched in these too.
TRANSLITERATIONS = str.maketrans({
    "Đ": "Dj", "đ": "dj", "Ø": "Oe", "ø": "oe", "Å": "Aa", "å": "aa", "Ä": "Ae", "ä": "ae", "Ö": "Oe", "ö": "oe",
    "Ü": "Ue", "ü": "ue"})


def fold(text: str) -> str:
    """Case- and accent-insensitive form used for every comparison (``Müller`` -> ``muller``); the
    Latin letters without a decomposition become their usual ASCII letters (``UNDECOMPOSED``:
    ``Łukasz`` -> ``lukasz``, ``Æbelø`` -> ``aebelo``), on both sides of every comparison."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(char for char in decomposed if not unicodedata.combining(char))
    return bare.translate(UNDECOMPOSED).casefold()


def fold_spellings(text: str) -> set[str]:
    """``fold(text)``, and the fold of ``text`` spelled with ``TRANSLITERATIONS`` when it holds one of
    their letters (``Đorđević`` -> ``dordevic``, ``djordjevic``)."""
    return {fold(text), fold(unicodedata.normalize("NFC", text).translate(TRANSLITERATIONS))}


def _edge(char: str, word: str) -> str | None:
    """What may not stand next to ``char`` at the edge of a match (a regex class), or ``None``."""
    if _UNSPACED.match(char):
        return None  # no word spaces in this script: the neighbouring letters belong to other words
    return word if char.isalpha() else r"\d" if char.isdigit() else None


def _edges(value: str, alphanumeric: bool = False) -> str:
    """``value`` as a regex that does not match inside a longer word (letters) or number (digits);
    ``alphanumeric``: nor next to a letter or digit (short name parts, see ``SHORT_NAME``). A value
    that starts or ends in a script written without word spaces (``UNSPACED_SCRIPTS``) matches as a
    substring at that end."""
    return _edged(value, re.escape(value), alphanumeric)


def _edged(value: str, body: str, alphanumeric: bool = False) -> str:
    """``body`` (a regex spelling ``value``) with ``_edges``' rules at the ends of ``value``."""
    word = r"[^\W_]" if alphanumeric else _LETTER
    first, last = _edge(value[0], word), _edge(value[-1], word)
    before = f"(?<!{first})" if first else ""
    after = f"(?!{last})" if last else ""
    return before + body + after


def _spaced(value: str) -> str:
    """``value`` (letters and digits) as a regex allowing one separator between its characters; a
    dot between two digits is a decimal point or a version (``10.0.0.85``), not a separator."""
    body = re.escape(value[0])
    for previous, char in zip(value, value[1:], strict=False):
        body += (_DIGIT_SEPARATOR if previous.isdigit() and char.isdigit() else _ID_SEPARATOR) + re.escape(char)
    return _edged(value, body)


def alphanumeric(value: str) -> str:
    """``value`` without anything but letters and digits (``a-77123`` -> ``a77123``)."""
    return re.sub(r"[\W_]+", "", value)


# The time digits a DICOM date-time (DT) puts right after its YYYYMMDD: HH, HHMM or HHMMSS (a fraction or a
# UTC offset that follows is no digit, so the match may end before it). Only a valid hour, minute and
# second: 19500131 + 99 is a longer number, not a date-time.
DT_TIME = r"(?:(?:[01]\d|2[0-3])(?:[0-5]\d(?:[0-5]\d|60)?)?)?"


def date_patterns(date: str) -> list[str]:
    """Regexes (for folded text) of the common spellings of a ``YYYYMMDD`` date; ``YYYYMMDD`` may be
    followed by the time digits of a DICOM date-time (``DT_TIME``: ``19500131123000``)."""
    year, month, day = date[:4], date[4:6], date[6:8]
    m, d = rf"0?{int(month)}", rf"0?{int(day)}"
    sep = r"[-./ ]"
    numeric = [rf"{year}{sep}{m}{sep}{d}", rf"{d}{sep}{m}{sep}{year}", rf"{m}{sep}{d}{sep}{year}",
               f"{year}{month}{day}{DT_TIME}", f"{day}{month}{year}", f"{month}{day}{year}"]
    name = MONTHS[int(month) - 1]
    month_word = rf"(?:{name}|{name[:3]})\.?"
    day_word = rf"{d}(?:st|nd|rd|th)?"
    gap = r"[\s,./-]*"
    words = [rf"{month_word}{gap}{day_word}{gap}{year}", rf"{day_word}{gap}(?:of\s+)?{month_word}{gap}{year}",
             rf"{year}{gap}{month_word}{gap}{day_word}"]
    return [rf"(?<!\d)(?:{pattern})(?!\d)" for pattern in numeric + words]


def _components(value: str) -> Iterator[list[str]]:
    """The family, given and middle name components of a PN value (every component group), each
    as its folded parts, one-letter parts included; a component again in its other spelling
    (``fold_spellings``) when it has one."""
    for group in str(value).split("="):
        for component in group.split("^")[:3]:
            for spelling in sorted(fold_spellings(component)):
                yield [part for part in _NAME_SEPARATORS.split(spelling.strip()) if part]


def _searchable_part(part: str) -> bool:
    return part not in PLACEHOLDER_NAMES and part not in MODALITY_CODES


def name_parts(value: str) -> list[str]:
    """Family, given and middle name parts (2+ characters, folded, placeholders and modality codes
    left out) of a PN value, in order. Characters are counted composed: a one-syllable Hangul name
    (김, three letters once folded) is one character, too short to search alone."""
    return [part for parts in _components(value) for part in parts
            if len(unicodedata.normalize("NFC", part)) >= 2 and _searchable_part(part)]


def glued_runs(value: str) -> tuple[set[str], set[str]]:
    """(every run of 2+ consecutive parts of a component glued, one-letter parts included; each
    component of 2+ parts glued whole) of a PN value: ``VAN DER BERG`` gives ``vander``, ``derberg``
    and ``vanderberg``, whole ``vanderberg``; ``O'BRIEN`` gives ``obrien``."""
    runs: set[str] = set()
    whole: set[str] = set()
    for parts in _components(value):
        if len(parts) < 2:
            continue
        whole.add("".join(parts))
        runs.update("".join(parts[start:end]) for start in range(len(parts))
                    for end in range(start + 2, len(parts) + 1))
    return ({run for run in runs if _searchable_part(run)},
            {glued for glued in whole if _searchable_part(glued)})


@dataclass
class Identifiers:
    """A file's patient names, IDs, request IDs and dates (folded); kept in memory only, never logged or
    reported."""

    names: set[str] = field(default_factory=set)  # name parts, and parts glued (see the module docstring)
    common_names: set[str] = field(default_factory=set)  # name parts that are common words (typed text only)
    glued: set[str] = field(default_factory=set)  # the glued forms of ``names`` alone (searched in coded values)
    parts: set[str] = field(default_factory=set)  # every single name part, common words included (coded values)
    ids: set[str] = field(default_factory=set)  # as written, and the digit runs of alphanumeric IDs
    request_ids: set[str] = field(default_factory=set)  # accession numbers, study IDs...: the same forms
    dates: set[str] = field(default_factory=set)  # YYYYMMDD
    uids: set[str] = field(default_factory=set)  # the UIDs de-identification replaces (``UID_MIN`` or longer)
    _compiled: dict[tuple[int, frozenset[str]], re.Pattern | None] = field(default_factory=dict, repr=False)

    def pattern(self, min_length: int = 2, kinds: frozenset[str] = ALL_KINDS) -> re.Pattern | None:
        """One regex with a named group per kind (``name``, ``common_name``, ``id``, ``request_id``,
        ``spaced_id``, ``spaced_request_id``, ``date``) for values this long; ``kinds`` ``id`` and
        ``spaced_id`` cover request IDs too."""
        key = (min_length, kinds)
        if key not in self._compiled:
            groups = []
            for kind, values in (("name", self.names), (COMMON_NAME, self.common_names), (GLUED, self.glued),
                                 (PART, self.parts), ("id", self.ids), ("request_id", self.request_ids)):
                chosen = sorted((v for v in values if len(v) >= min_length), key=len, reverse=True)
                if chosen and kind.removeprefix("request_") in kinds:
                    named = kind in ("name", COMMON_NAME, GLUED, PART)
                    edged = (_edges(v, alphanumeric=named and len(v) < SHORT_NAME) for v in chosen)
                    groups.append(f"(?P<{kind}>" + "|".join(edged) + ")")
            for kind, values in (("spaced_id", self.ids), ("spaced_request_id", self.request_ids)):
                spaced = sorted({alphanumeric(v) for v in values} - {""}, key=len, reverse=True)
                spaced = [v for v in spaced if len(v) >= max(min_length, SPACED_ID_MIN)]
                if spaced and "spaced_id" in kinds:
                    groups.append(f"(?P<{kind}>" + "|".join(_spaced(v) for v in spaced) + ")")
            if self.dates and "date" in kinds:
                groups.append("(?P<date>" + "|".join(p for d in sorted(self.dates) for p in date_patterns(d)) + ")")
            if self.uids and "uid" in kinds:
                uids = sorted(self.uids, key=len, reverse=True)
                groups.append("(?P<uid>" + "|".join(rf"(?<![\d.]){re.escape(u)}(?!\.?\d)" for u in uids) + ")")
            self._compiled[key] = re.compile("|".join(groups)) if groups else None
        return self._compiled[key]

    def kind_in(self, text: str, min_length: int = 2, kinds: frozenset[str] = ALL_KINDS) -> str | None:
        """``name``, ``ID``, ``request ID``, ``date`` or ``UID`` if ``text`` holds one of the identifiers, else
        ``None``."""
        pattern = self.pattern(min_length, kinds)
        match = pattern.search(fold(text)) if pattern is not None and text else None
        if match is None:
            return None
        return KIND_NAMES[match.lastgroup or "name"]

    def found_in(self, text: str) -> bool:
        return self.kind_in(text) is not None

    def name_in_code(self, text: str, min_length: int = 2) -> bool:
        """Whether a coded value (``is_code``) holds the patient's name: one of its glued forms (``HUJUN``), or
        two different parts of it (``LI WU``). One part alone is a code the name happens to spell (``HU``)."""
        glued = self.pattern(min_length, frozenset({GLUED}))
        folded = fold(text) if text else ""
        if glued is not None and glued.search(folded):
            return True
        parts = self.pattern(min_length, frozenset({PART}))
        return parts is not None and len({match.group() for match in parts.finditer(folded)}) >= 2


def _values(value: Any) -> list[Any]:
    from pydicom.multival import MultiValue

    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _datasets(ds) -> Iterator[Any]:
    """The file meta (when there is one), then the data set (sequences are walked by callers)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield meta
    yield ds


def _add_names(found: Identifiers, values: list[str], common_words: frozenset[str]) -> None:
    parts = [part for value in values for part in name_parts(value)]
    glued = [glued_runs(value) for value in values]
    runs = {run for value_runs, _ in glued for run in value_runs}
    units = parts + [whole for _, value_wholes in glued for whole in value_wholes]
    found.names.update(part for part in parts if part not in common_words)
    found.common_names.update(part for part in parts if part in common_words)
    found.parts.update(parts)
    found.glued.update(run for run in runs if len(run) >= GLUED_MIN)
    found.glued.update(a + b for a in units for b in units)  # glued, either order (and a part twice)
    found.names.update(found.glued)


def _id_forms(value: str) -> list[str]:
    """An ID as written (folded) and, if it has letters too, its longest run of 6+ digits."""
    text = fold(value).strip()
    digits = max(re.findall(r"\d+", text), key=len, default="")
    run = [digits] if len(digits) >= DIGIT_RUN_MIN and digits != alphanumeric(text) else []
    return [text, *run] if len(text) >= 2 else []


def collect_identifiers(ds, common_words: frozenset[str] = frozenset()) -> Identifiers:
    """The patient's name parts, IDs, request IDs, every DA / DT date and the UIDs de-identification replaces
    of ``ds`` (read before de-identifying), from the file meta, the data set and every
    sequence item at any depth (a Patient's Name or Patient ID in a Source Image Sequence item is
    searched too); name parts in ``common_words`` (folded) are only searched glued to another part, and
    alone in typed free text (``Identifiers.common_names``, ``find_leak``'s ``typed``)."""
    found = Identifiers()
    names: list[str] = []
    uids: set[str] = set()
    class_uids: set[str] = set()  # kept as they are: a value also written as a class UID is not searched

    def visit(dataset, element) -> None:
        if element.keyword in NAME_KEYWORDS and element.value:
            names.extend(str(value or "") for value in _values(element.value))
        elif element.keyword in ID_KEYWORDS and element.value:
            found.ids.update(form for value in _values(element.value) for form in _id_forms(str(value or "")))
        elif element.keyword in REQUEST_ID_KEYWORDS and element.value:
            forms = [_id_forms(str(value or "")) for value in _values(element.value)]
            found.request_ids.update(form for value_forms in forms if value_forms
                                     and len(alphanumeric(value_forms[0])) >= REQUEST_ID_MIN for form in value_forms)
        elif element.VR in ("DA", "DT") and element.value:
            for value in _values(element.value):
                digits = re.sub(r"\D", "", str(value))[:8]
                if len(digits) == 8 and 1 <= int(digits[4:6]) <= 12 and 1 <= int(digits[6:]) <= 31:
                    found.dates.add(digits)
        elif element.VR == "UI" and element.value:
            values = {str(value or "").strip().rstrip("\0") for value in _values(element.value)}
            (uids if replaced_uid(element.keyword) else class_uids).update(values)

    for dataset in _datasets(ds):
        dataset.walk(visit)
    _add_names(found, names, common_words)
    for uid in uids - class_uids:
        _add_uid(found, uid)
    return found


def replaced_uid(keyword: str) -> bool:
    """A UI attribute whose value de-identification replaces: all but class UIDs and the transfer syntax
    (dicognito keeps those)."""
    return not keyword.endswith("ClassUID") and keyword != "TransferSyntaxUID"


def _add_uid(found: Identifiers, uid: str) -> None:
    if len(uid) >= UID_MIN and not uid.startswith(STANDARD_UID_ROOT):
        found.uids.add(uid)


# ----------------------------------------------------------------------------- the scan


def element_name(element) -> str:
    """Keyword, or ``(gggg,eeee)`` for private and unknown tags: never the value."""
    return element.keyword or f"({element.tag.group:04X},{element.tag.element:04X})"


def _searchable(element) -> tuple[str, int, frozenset[str]] | None:
    """(text, shortest identifier, kinds to search) for an element that can hold text; None otherwise."""
    if element.VR == "SQ" or element.value in (None, b"", ""):
        return None
    if element.VR in BYTE_VRS:
        if element.keyword in PIXEL_KEYWORDS or not isinstance(element.value, bytes):
            return None
        return byte_text(element.value), *SCAN_RULES["bytes"]
    kind = ("character" if element.VR in CHARACTER_VRS else "uid" if element.VR == "UI"
            else "number" if element.VR in NUMBER_VRS else None)
    if kind is None:
        return None
    return "\\".join(str(v) for v in _values(element.value)), *SCAN_RULES[kind]


def byte_text(value: bytes) -> str:
    """The text a byte value (OB, UN) may hold, in every encoding the scan reads, one per line: latin-1
    (any single-byte text), UTF-8, and UTF-16 little- and big-endian (vendor blobs often hold
    UTF-16): the UTF-16 decodings start at byte 0 and at byte 1, so either byte order at either
    alignment reads as text. Undecodable bytes are dropped."""
    return "\n".join((value.decode("latin-1"), value.decode("utf-8", errors="ignore"),
                      value.decode("utf-16-le", errors="ignore"), value[1:].decode("utf-16-le", errors="ignore")))


def _walk(dataset, prefix: str) -> Iterator[tuple[str, Any]]:
    for element in dataset:
        path = prefix + element_name(element)
        yield path, element
        if element.VR == "SQ":
            for index, item in enumerate(element.value or []):
                yield from _walk(item, f"{path}[{index}]>")


def is_code(element, typed: frozenset[str] = frozenset()) -> bool:
    """Whether an element holds a coded value: a Code String (CS) other than those people type (``typed``:
    Body Part Examined...), or a value that is one of its attribute's ``DEFINED_TERMS`` (Rescale Type ``HU``)."""
    if element.VR in CODE_VRS:
        return element.keyword not in typed
    terms = DEFINED_TERMS.get(element.keyword)
    values = [fold(str(value or "")).strip() for value in _values(element.value)]
    return terms is not None and all(value in terms for value in values)


def _leak_in(element, identifiers: Identifiers, typed: frozenset[str]) -> str | None:
    """The kind of identifier an element holds, if any (``find_leak``'s rules)."""
    searchable = _searchable(element)
    if searchable is None:
        return None
    text, min_length, kinds = searchable
    coded = "name" in kinds and is_code(element, typed)
    if coded:  # a name part alone in a code is chance (see the module docstring)
        kinds = kinds - {"name"}
    elif element.keyword in typed and "name" in kinds:
        kinds = kinds | {COMMON_NAME}
    kind = identifiers.kind_in(text, min_length, kinds)
    if kind is None and coded and identifiers.name_in_code(text, min_length):
        return "name"
    return kind


def find_leak(ds, identifiers: Identifiers, typed: frozenset[str] = frozenset()) -> tuple[str, str] | None:
    """(element path, kind) of the first element still holding an identifier, else ``None``. In the
    elements named in ``typed`` (keywords of free text people type: descriptions, protocol names,
    comments) the patient's name parts that are common words (``Identifiers.common_names``) are
    searched alone too: a word the patient is called is no technical word in that patient's file. In
    coded values (``is_code``: Code Strings but those in ``typed``, defined terms) names are searched only
    glued or as two parts of the name (``Identifiers.name_in_code``)."""
    for dataset in _datasets(ds):
        prefix = "file meta>" if dataset is not ds else ""
        for path, element in _walk(dataset, prefix):
            kind = _leak_in(element, identifiers, typed)
            if kind is not None:
                return path, kind
    return None


def drop_name_parts(ds, identifiers: Identifiers) -> int:
    """Remove from every PN value the components that equal one of the patient's name parts.

    dicognito draws dummy names from lists of common names, so a dummy can share a part with the
    real name (a patient SMITH^MARY given the dummy JONES^MARY); the part is dropped, the rest of
    the dummy kept. Returns how many values changed."""
    changed = 0

    def visit(dataset, element) -> None:
        nonlocal changed
        if element.VR != "PN" or not element.value:
            return
        values = [_without_parts(str(v), identifiers.names | identifiers.common_names)
                  for v in _values(element.value)]
        if values != [str(v) for v in _values(element.value)]:
            changed += 1
            element.value = values if len(values) > 1 else values[0]

    for dataset in _datasets(ds):
        dataset.walk(visit)
    return changed


def _without_parts(value: str, names: Iterable[str]) -> str:
    names = set(names)
    groups = []
    for group in value.split("="):
        components = group.split("^")
        groups.append("^".join("" if fold(c).strip() in names else c for c in components).rstrip("^"))
    return "=".join(groups)
