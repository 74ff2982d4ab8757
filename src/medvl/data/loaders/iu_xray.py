"""Open-i / Indiana University chest X-ray report loader (``NLMCXR_reports.tgz``).

The archive holds one XML file per report (``ecgen-radiology/<n>.xml``, 3,955 in the shared copy).
It is read in place as a stream, member by member: nothing is extracted to disk and only one XML
file is in memory at a time. XML is untrusted input: it is parsed with ``defusedxml``, so a
document declaring entities (the "billion laughs" expansion bomb) or external references is a
``DataError``; so is malformed XML, naming the archive and the member. Members that are not
``.xml`` files (a README, an image, macOS ``._`` files) are skipped and counted in a warning.
Gzip bombs: one member over ``MAX_MEMBER_BYTES`` (2 MB; a report is ~5 KB) is refused before it
is read, and an archive that decompresses to more than ``MAX_ARCHIVE_BYTES`` (128 MiB; the real
one is 24 MB) is refused as soon as the stream passes that size; so is an image metadata table over
``MAX_VIEWS_BYTES`` (32 MiB; the real one is 5 MB). Nothing is decompressed without bound.

What a report gives (``IUReport``, from ``iter_iu_reports``):

- ``uid``: the ``<uId id=...>`` value, e.g. ``CXR1`` (the file stem if it is missing);
- ``sections``: ``COMPARISON`` / ``INDICATION`` / ``FINDINGS`` / ``IMPRESSION`` texts, cleaned
  (whitespace collapsed, anonymisation placeholders handled as below); an empty section is absent;
- ``mesh_major``: the manually indexed MeSH-style terms, e.g. ``Cardiomegaly/mild``,
  ``Pleural Effusion/bilateral/small``, or the single term ``normal``; ``mesh_automatic``: the
  automatically extracted terms (MTI), e.g. ``Atelectasis``;
- ``images``: the ``<parentImage id=...>`` ids, e.g. ``CXR1_1_IM-0001-3001`` (0-5 per report; the
  images themselves are not in the shared data), with the DICOM ``View Position`` (``PA``,
  ``AP``, ``LL``, ``LATERAL``...) when ``nlmcxr_dicom_metadata.csv.gz`` sits beside the archive (report
  ``CXR1``'s ``CXR1_1_IM-...`` ids are the table's ``CXR1_IM-...``; one image id of the shared archive,
  ``CXR1000_IM-0003-1001``, is not in the table and has no view). Only the image id and view position
  columns of that table are read; its other columns (names, dates) are never kept.

Anonymisation placeholders: the source replaced words it took for personal data by ``XXXX``. A
run of placeholders (``XXXX``, ``XXXX XXXX``, ``XXXX, XXXX``, ``XXXX/XXXX``) becomes one
``redaction`` token, ``[redacted]`` by default, so sentences still read ("There are no
[redacted] of a pleural effusion", "[redacted]-year-old male"); ``redaction=""`` drops the runs
instead and tidies the spaces and punctuation around them. One case is restored rather than
masked: ``x-XXXX`` is always "x-ray" (the anonymiser removed "ray" as a first name), so it reads
``x-ray``. No ``XXXX`` is left in any text or section.

Records (``load_iu_xray``): one per report with text; ``id`` = ``uid``; ``images = []`` (a
text-only corpus for the Python API: its texts and labels, report labelling; image commands refuse
it naming the archive, ``Dataset.require_images``, and ``Record.image`` raises ``InputError``);
``text`` = the chosen sections (default FINDINGS then IMPRESSION) joined by a space; a report whose
chosen sections are all empty is skipped and counted in the log (28 of 3,955 with the default
sections); ``split`` = ``train`` / ``val`` / ``test`` (80/10/10) from a hash of the id
(``medvl.data.record.hash_split``).

Labels, from ``mesh_major`` (values are strings; a missing label is absent):

- ``status``: ``normal`` when the only major term is ``normal``, else ``abnormal``;
- one binary column per common finding in ``FINDING_TERMS`` (``cardiomegaly``,
  ``pleural_effusion``, ``atelectasis``, ``opacity``, ...): ``"1"`` when a major term's head
  (the part before the first ``/``) is one of the finding's terms, else ``"0"``. A ``"0"`` means
  "not indexed as a major finding", which is what the source says, not a read of the report.
- A report indexed only ``No Indexing`` and/or ``Technical Quality of Image Unsatisfactory``
  (no clinical term) has no labels at all.

Meta (strings; lists joined by ``"; "``): ``comparison``, ``indication``, ``findings``,
``impression`` (each when not empty), ``mesh_major``, ``mesh_automatic``, ``image_ids``,
``views`` (distinct view positions in image order) and ``member`` (the XML file in the archive).
Report text is patient data: logs give counts and ids only.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from ...errors import DataError, InputError
from ..record import Dataset, Record, hash_split

log = logging.getLogger(__name__)

SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
DEFAULT_TEXT_SECTIONS = ("FINDINGS", "IMPRESSION")
REDACTED = "[redacted]"
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")
METADATA_NAME = "nlmcxr_dicom_metadata.csv.gz"
MAX_MEMBER_BYTES = 2_000_000  # a report is ~5 KB; a larger member is refused as a likely bomb
MAX_ARCHIVE_BYTES = 128 << 20  # decompressed tar stream; the real archive is 24 MB
MAX_VIEWS_BYTES = 32 << 20  # decompressed image metadata table; the real one is 5 MB
STATUS_COLUMN = "status"
NORMAL_TERM = "normal"
NON_CLINICAL_TERMS = {"no indexing", "technical quality of image unsatisfactory"}

# finding column -> MeSH major-term heads (lower case) that mark it; names follow the phantom's
FINDING_TERMS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": ("cardiomegaly",),
    "pleural_effusion": ("pleural effusion",),
    "atelectasis": ("pulmonary atelectasis",),
    "opacity": ("opacity",),
    "consolidation": ("consolidation",),
    "pneumonia": ("pneumonia",),
    "infiltrate": ("infiltrate",),
    "edema": ("pulmonary edema",),
    "emphysema": ("emphysema", "pulmonary emphysema"),
    "fibrosis": ("fibrosis", "pulmonary fibrosis"),
    "nodule": ("nodule",),
    "mass": ("mass",),
    "granuloma": ("calcified granuloma", "granuloma", "granulomatous disease"),
    "scarring": ("cicatrix",),
    "pneumothorax": ("pneumothorax",),
    "fracture": ("fractures, bone",),
    "hernia": ("hernia, hiatal", "hernia, diaphragmatic"),
}
LABEL_NAMES = [STATUS_COLUMN, *FINDING_TERMS]

_X_RAY = re.compile(r"\b([xX])-X{4,}")
_PLACEHOLDER_RUN = re.compile(r"X{4,}(?:[ ,/]+X{4,})*")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([.,;:])")
_REPEATED_PUNCT = re.compile(r"([.,;:])(?: *[.,;:])+")
# Open-i names report CXR1's images CXR1_1_IM-0001-3001, where its metadata table (as every other report's images)
# writes CXR1_IM-0001-3001: an id of that form not in the table is looked up without the inner number
_NUMBERED_IMAGE_ID = re.compile(r"(CXR\d+)_\d+_(IM-.+)")
_ORPHAN_HYPHEN = re.compile(r"(?<!\S)-(?=\w)")  # "-year-old" once the placeholder before it is dropped


@dataclass
class IUImage:
    """One image of a report: its Open-i id and, when known, the DICOM view position."""

    id: str  # e.g. CXR1_1_IM-0001-3001
    view: str | None = None  # DICOM View Position as written: PA, AP, LL, LATERAL, RL...


@dataclass
class IUReport:
    """One parsed report (see the module docstring for each field)."""

    uid: str
    member: str  # the XML file's path inside the archive
    sections: dict[str, str] = field(default_factory=dict, repr=False)  # patient data: not in repr
    mesh_major: list[str] = field(default_factory=list)
    mesh_automatic: list[str] = field(default_factory=list)
    images: list[IUImage] = field(default_factory=list)

    def text(self, sections: Sequence[str] = DEFAULT_TEXT_SECTIONS) -> str | None:
        """The given sections, in that order, joined by a space; None if all are empty."""
        return " ".join(self.sections[name] for name in sections if name in self.sections) or None


# ---------------------------------------------------------------- text


def clean_report_text(text: str, redaction: str = REDACTED) -> str:
    """Collapse whitespace and replace ``XXXX`` placeholder runs (see the module docstring)."""
    text = _X_RAY.sub(r"\1-ray", _SPACES.sub(" ", text))
    text = _PLACEHOLDER_RUN.sub(redaction, text)
    if not redaction:
        text = _ORPHAN_HYPHEN.sub("", _SPACES.sub(" ", text))
        text = _REPEATED_PUNCT.sub(r"\1", _SPACE_BEFORE_PUNCT.sub(r"\1", text))
        text = text.lstrip(" .,;:")
    return text.strip()


# ---------------------------------------------------------------- one XML file


def _parse_xml(archive: Path, member: str, raw: bytes) -> Element:
    try:
        return fromstring(raw)
    except DefusedXmlException as error:
        raise DataError(archive, f"member {member}: refused unsafe XML ({type(error).__name__}: entity "
                                 "declarations, DTDs with entities and external references are not allowed)") \
            from None
    except ParseError as error:
        line, column = error.position
        raise DataError(archive, f"member {member}: not well-formed XML (line {line}, column {column})") \
            from None


def _element_text(element: Element) -> str:
    return "".join(element.itertext())


def parse_report(archive: Path, member: str, raw: bytes, redaction: str = REDACTED) -> IUReport:
    """Parse one report XML file (``archive`` and ``member`` name it in errors)."""
    root = _parse_xml(archive, member, raw)
    uid_element = root.find("uId")
    uid = (uid_element.get("id") or "").strip() if uid_element is not None else ""
    sections = {}
    for element in root.iter("AbstractText"):
        label = (element.get("Label") or "").strip().upper()
        text = clean_report_text(_element_text(element), redaction)
        if label in SECTIONS and text:
            sections[label] = text
    mesh = root.find("MeSH")
    terms = list(mesh) if mesh is not None else []
    return IUReport(
        uid=uid or PurePosixPath(member).stem,
        member=member,
        sections=sections,
        mesh_major=[term for e in terms if e.tag == "major" and (term := _element_text(e).strip())],
        mesh_automatic=[term for e in terms if e.tag == "automatic" and (term := _element_text(e).strip())],
        images=[IUImage(image_id) for e in root.iter("parentImage") if (image_id := (e.get("id") or "").strip())],
    )


# ---------------------------------------------------------------- the archive


def is_report_archive(path: Path) -> bool:
    """True for a file named like a (gzipped) tar archive; the content is checked on load."""
    name = path.name.lower()
    return path.is_file() and name.endswith(ARCHIVE_SUFFIXES)


IMAGE_ARCHIVE_WORDS = ("png", "dcm", "dicom", "image")  # Open-i's image archives: NLMCXR_png.tgz, NLMCXR_dcm.tgz


def find_report_archive(folder: Path) -> Path | None:
    """The tar archive of a folder whose name says it holds reports, or None; any other archive must be
    passed as a file. A name with "report" in it (``NLMCXR_reports.tgz``) comes first; else one with
    "nlmcxr" that does not name an image archive (``NLMCXR_png.tgz`` and ``NLMCXR_dcm.tgz`` hold the images,
    and may sit beside the reports). Two such archives are a ``DataError`` naming them."""
    archives = [path for path in sorted(folder.iterdir()) if is_report_archive(path)]
    reports = [path for path in archives if "report" in path.name.lower()] or \
        [path for path in archives if "nlmcxr" in path.name.lower()
         and not any(word in path.name.lower() for word in IMAGE_ARCHIVE_WORDS)]
    if len(reports) > 1:
        raise DataError(folder, f"{len(reports)} report archives ({', '.join(path.name for path in reports)}): "
                                "pass one as the path")
    return reports[0] if reports else None


def _read_member(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_MEMBER_BYTES:
        raise DataError(archive, f"member {member.name}: {member.size:,} bytes, over the "
                                 f"{MAX_MEMBER_BYTES:,}-byte limit for one report")
    handle: IO[bytes] | None = tar.extractfile(member)
    if handle is None:
        raise DataError(archive, f"member {member.name}: cannot be read")
    with handle:
        return handle.read(MAX_MEMBER_BYTES + 1)


def _is_report_member(member: tarfile.TarInfo) -> bool:
    name = PurePosixPath(member.name).name
    return name.lower().endswith(".xml") and not name.startswith(".")


class _BoundedStream(io.RawIOBase):
    """A read-only stream that raises ``DataError`` once more than ``limit`` bytes came out of it."""

    def __init__(self, stream: io.BufferedIOBase, path: Path, limit: int, what: str):
        super().__init__()
        self.stream, self.path, self.limit, self.what, self.count = stream, path, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        self.count += len(data)
        if self.count > self.limit:
            raise DataError(self.path, f"decompresses to over {self.limit:,} bytes ({self.what}); refused as a "
                                       "likely decompression bomb")
        buffer[: len(data)] = data
        return len(data)


@contextmanager
def _open_stream(path: Path) -> Iterator[tuple[tarfile.TarFile, _BoundedStream]]:
    """A tar stream over the file, decompressing gzip through ``gzip`` so that a truncated archive
    fails (``tarfile`` alone takes a tar cut at a member boundary for a complete one), and never
    more than ``MAX_ARCHIVE_BYTES``."""
    with path.open("rb") as file:
        gzipped = file.read(2) == b"\x1f\x8b"
        file.seek(0)
        raw: io.BufferedIOBase = gzip.GzipFile(fileobj=file, mode="rb") if gzipped else file
        bounded = _BoundedStream(raw, path, MAX_ARCHIVE_BYTES, "a report archive is ~24 MB")
        with raw, tarfile.open(fileobj=bounded, mode="r|") as tar:
            yield tar, bounded


def iter_iu_reports(path: str | Path, redaction: str = REDACTED) -> Iterator[IUReport]:
    """Stream the reports of an Open-i archive (``.tgz``, ``.tar.gz`` or ``.tar``), one at a time.

    Views are not attached here (see ``load_iu_xray``). Raises ``DataError`` for an unreadable
    archive, unsafe or malformed XML, or an oversized member; non-XML members are skipped and
    counted in a warning at the end.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "report archive not found")
    skipped: list[str] = []
    try:
        with _open_stream(path) as (tar, raw):
            for member in tar:
                if not member.isfile():
                    continue
                if not _is_report_member(member):
                    skipped.append(member.name)
                    continue
                yield parse_report(path, member.name, _read_member(path, tar, member), redaction)
            while raw.read(1 << 16):  # read to the end: gzip checks its length and CRC there
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise DataError(path, f"not a readable tar archive ({error})") from None
    if skipped:
        log.warning("%s: skipped %d non-XML members (first: %s)", path, len(skipped), skipped[0])


# ---------------------------------------------------------------- views and labels


def read_views(path: Path) -> dict[str, str]:
    """Image id -> DICOM View Position from ``nlmcxr_dicom_metadata.csv.gz`` (only these two
    columns are read); an empty view is left out. Decompressed, the table may not exceed
    ``MAX_VIEWS_BYTES`` (32 MiB; the real one is 5 MB)."""
    try:
        with gzip.open(path, "rb") as raw, io.TextIOWrapper(io.BufferedReader(
                _BoundedStream(raw, path, MAX_VIEWS_BYTES, "the real table is 5 MB")), encoding="utf-8",
                newline="") as text:
            reader = csv.DictReader(text)
            if not {"imageid", "View Position"} <= set(reader.fieldnames or []):
                raise DataError(path, "expected the columns 'imageid' and 'View Position'")
            return {row["imageid"]: view for row in reader if (view := (row["View Position"] or "").strip())}
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(path, f"cannot read the image metadata table ({error})") from None


def report_labels(mesh_major: Sequence[str]) -> dict[str, str]:
    """``status`` and the binary finding columns from the major MeSH terms (module docstring)."""
    heads = {term.split("/")[0].strip().lower() for term in mesh_major}
    clinical = heads - NON_CLINICAL_TERMS
    if not clinical:
        return {}
    labels = {STATUS_COLUMN: "normal" if clinical == {NORMAL_TERM} else "abnormal"}
    for column, terms in FINDING_TERMS.items():
        labels[column] = "1" if heads.intersection(terms) else "0"
    return labels


def _view(view_of: dict[str, str], image_id: str) -> str | None:
    """The view position of an image id in the metadata table (``read_views``); an id the table writes without
    Open-i's inner image number (``CXR1_1_IM-0001-3001`` as ``CXR1_IM-0001-3001``) found so too."""
    view = view_of.get(image_id)
    if view is None and (numbered := _NUMBERED_IMAGE_ID.fullmatch(image_id)):
        view = view_of.get(f"{numbered[1]}_{numbered[2]}")
    return view


def _record(report: IUReport, text: str) -> Record:
    meta: dict[str, Any] = {name.lower(): value for name, value in report.sections.items()}
    meta.update({
        "mesh_major": "; ".join(report.mesh_major),
        "mesh_automatic": "; ".join(report.mesh_automatic),
        "image_ids": "; ".join(image.id for image in report.images),
        "views": "; ".join(dict.fromkeys(image.view for image in report.images if image.view)),
        "member": report.member,
    })
    return Record(id=report.uid, images=[], text=text, labels=report_labels(report.mesh_major),
                  meta={key: value for key, value in meta.items() if value}, split=hash_split(report.uid))


def _check_sections(sections: Sequence[str]) -> list[str]:
    chosen = [name.upper() for name in sections]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown or not chosen:
        raise InputError(f"report sections must be some of {', '.join(SECTIONS)}; got {list(sections)}")
    return chosen


def load_iu_xray(path: str | Path, sections: Sequence[str] = DEFAULT_TEXT_SECTIONS,
                 redaction: str = REDACTED, views: bool = True) -> Dataset:
    """Load the Open-i report archive, or a folder holding it, as a text-only ``Dataset``.

    ``sections`` chooses the record text; ``redaction`` replaces ``XXXX`` runs (``""`` drops them);
    ``views`` attaches DICOM view positions when the metadata table sits beside the archive.
    """
    path = Path(path)
    archive = find_report_archive(path) if path.is_dir() else path
    if archive is None:
        raise DataError(path, "expected one report archive (.tgz, .tar.gz or .tar) in the folder")
    chosen = _check_sections(sections)
    view_of = read_views(archive.parent / METADATA_NAME) if views and (archive.parent / METADATA_NAME).is_file() \
        else {}
    records: list[Record] = []
    seen: set[str] = set()
    empty = 0
    for report in iter_iu_reports(archive, redaction):
        if report.uid in seen:
            raise DataError(archive, f"duplicate report id {report.uid!r} (member {report.member})")
        seen.add(report.uid)
        for image in report.images:
            image.view = _view(view_of, image.id)
        text = report.text(chosen)
        if text is None:
            empty += 1
            continue
        records.append(_record(report, text))
    if empty:
        log.info("%s: skipped %d of %d reports with no %s text", archive, empty, len(seen), " / ".join(chosen))
    if not records:
        raise DataError(archive, f"no report with {' / '.join(chosen)} text ({len(seen)} reports read)")
    return Dataset(records, source=str(archive), label_names=LABEL_NAMES, default_labels=[STATUS_COLUMN])
