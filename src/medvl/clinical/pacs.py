"""A DICOMweb client: QIDO-RS search and WADO-RS pull from a PACS, de-identifying on the way in.

``DicomWebClient(url, username=..., password=... | token=..., timeout=...)`` speaks DICOMweb
(DICOM PS3.18) over HTTP(S) with ``requests``:

- ``search_studies(filters)``, ``search_series(study_uid, filters)``, ``search_instances(...)``:
  QIDO-RS queries; ``filters`` maps DICOM keywords to match values (``{"PatientID": "123",
  "ModalitiesInStudy": "CT", "StudyDate": "20200101-20201231"}``; ``*`` / ``?`` wildcards as the
  server supports them). Results are plain dicts keyword -> value (person names as their
  alphabetic text, one value as itself, several as a list). They hold patient identifiers: show
  them to the user, never log or store them;
- ``retrieve_series`` / ``retrieve_instance``: WADO-RS retrieval as ``multipart/related;
  type="application/dicom"``, asking for the stored transfer syntax (``transfer-syntax=*``, so the
  server does not transcode), parsed as a stream: each instance is spooled (in memory up to 64 MiB,
  then an unnamed temporary file) and handed over one at a time.

``pull_study(url_or_client, study_uids, out, ...)`` copies whole studies into a folder:
``OUT/study-<hash>/series-<hash>/<hash>.dcm`` (short SHA-256 hashes of the de-identified UIDs)
plus ``pull-report.json`` (server, counts, series with modality and number, the de-identification
summary: attribute names only; no UIDs, names, IDs or dates). Every instance is de-identified
before it is written (``medvl.clinical.deid``: the PS3.15 basic profile via dicognito, one
anonymizer per pull so the studies, series and patients stay linked) and written atomically
(temporary file + rename). ``keep_identifiers=True`` writes the instances as received instead, with
a warning.

A pull is resumable: ``OUT/.medvl-pull-state.json`` records which instances are done (by a hash of
their original SOP Instance UID) and, for a de-identified pull without ``seed``, the random
de-identification seed, so a rerun of the same command after an interruption (or after
``limit``) fetches only the missing instances and maps UIDs and dates exactly as the first run did.
The state file is deleted when the pull completes, taking the seed with it: the seed would
reveal the date shift. Keep an unfinished folder private; finish it (rerun) or delete it.

Errors are ``DataError`` naming the server URL without credentials: connection refused, timeout,
401 / 403, an unknown study, a response that is not DICOM JSON or not multipart DICOM, a part that
is not a DICOM file, a transfer cut short.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ..errors import DataError, InputError
from ..io import atomic_write_bytes, write_json
from ..progress import progress_bar
from .readers import INSTALL_HINT

log = logging.getLogger(__name__)

STATE_NAME = ".medvl-pull-state.json"
REPORT_NAME = "pull-report.json"
DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
WADO_ACCEPT_FALLBACK = 'multipart/related; type="application/dicom"'  # servers that refuse "*" (HTTP 406)
SPOOL_BYTES = 64 << 20  # an instance larger than this is spooled to an unnamed temporary file
CHUNK_BYTES = 1 << 16
PAGE_SIZE = 1000  # QIDO-RS results asked for per request
STATE_SAVE_SECONDS = 1.0  # the pull state is saved at most this often (and at the end)
STATE_FORMAT = 1
STUDY_FIELDS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy",
                "StudyDescription", "AccessionNumber", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined",
                 "NumberOfSeriesRelatedInstances")


# -------------------------------------------------------------------------------- the client


def _require_requests():
    try:
        import requests
    except ImportError:
        raise DataError(None, f"the DICOMweb client needs requests: {INSTALL_HINT}") from None
    return requests


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without user / password (safe to show), and the user and password it held."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"not an http(s) URL: {redact(url)!r} (expected e.g. http://pacs:8042/dicom-web)")
    if parts.query or parts.fragment:
        raise InputError(f"give the DICOMweb root without ?query or #fragment: {redact(url)!r}")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    clean = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    user = unquote(parts.username) if parts.username else None
    return clean, user, unquote(parts.password) if parts.password is not None else None


def redact(url: str) -> str:
    """The URL with any ``user:password@`` removed (for messages about a URL not yet checked)."""
    scheme, sep, rest = url.partition("://")
    host_part, slash, path = rest.partition("/")
    return f"{scheme}{sep}{host_part.rpartition('@')[2]}{slash}{path}" if sep else url


def short_hash(value: str, length: int = 16) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:length]


class DicomWebClient:
    """QIDO-RS / WADO-RS client for one DICOMweb service (conventions in the module docstring).

    ``url``: the service root, e.g. ``http://localhost:8042/dicom-web`` (credentials in the URL
    are taken out and used as basic auth). ``username`` / ``password``: HTTP basic auth;
    ``token``: a bearer token (not both). ``timeout``: seconds to connect and between bytes read.
    """

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 token: str | None = None, timeout: float = 60.0):
        requests = _require_requests()
        self.url, url_user, url_password = split_credentials(url)
        username, password = username or url_user, password if password is not None else url_password
        if token and username:
            raise InputError("give either a user and password (basic auth) or a bearer token, not both")
        if password is not None and not username:
            raise InputError("a password needs a user name (--user)")
        if timeout <= 0:
            raise InputError(f"timeout must be positive seconds, got {timeout}")
        self.timeout = timeout
        self.session = requests.Session()
        if username:
            self.session.auth = (username, password or "")
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["User-Agent"] = "medvl-dicomweb"

    def __repr__(self) -> str:
        return f"DicomWebClient({self.url!r})"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ HTTP plumbing

    def _get(self, path: str, what: str, accept: str, params: Mapping[str, Any] | None = None, stream: bool = False):
        """GET ``path`` below the service root; HTTP failures become ``DataError`` naming the URL."""
        requests = _require_requests()
        try:
            response = self.session.get(self.url + path, params=params, headers={"Accept": accept},
                                        timeout=self.timeout, stream=stream)
        except requests.exceptions.SSLError:
            raise DataError(self.url, "TLS/SSL error (certificate not trusted, or not an https server)") from None
        except requests.exceptions.Timeout:
            raise DataError(self.url, f"no answer within {self.timeout:g} s (timeout)") from None
        except requests.exceptions.ConnectionError as error:
            raise DataError(self.url, f"cannot connect: {_connection_reason(error)}") from None
        except requests.exceptions.RequestException as error:
            raise DataError(self.url, f"request failed ({type(error).__name__})") from None
        if response.status_code >= 400:
            response.close()
            raise DataError(self.url, _status_problem(response.status_code, response.reason, what))
        return response

    def _query(self, path: str, what: str, filters: Mapping[str, Any] | None, fields: Iterable[str],
               limit: int | None, offset: int | None) -> list[dict[str, Any]]:
        params: list[tuple[str, str]] = [(keyword_or_tag(k), str(v)) for k, v in (filters or {}).items()
                                         if v is not None and str(v) != ""]
        params += [("includefield", keyword_or_tag(f)) for f in fields]
        if limit is not None:
            params.append(("limit", str(int(limit))))
        if offset:
            params.append(("offset", str(int(offset))))
        response = self._get(path, what, DICOM_JSON, params=params)
        if response.status_code == 204 or not response.content.strip():
            return []
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind not in (DICOM_JSON, "application/json"):
            raise DataError(self.url, f"{what}: expected {DICOM_JSON}, the server sent {kind or 'no content type'} "
                                      "(is the URL the DICOMweb root, e.g. .../dicom-web?)")
        try:
            items = json.loads(response.content)
        except ValueError:
            raise DataError(self.url, f"{what}: the response is not valid JSON") from None
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise DataError(self.url, f"{what}: expected a JSON list of DICOM datasets")
        return [from_dicom_json(item) for item in items]

    # ----------------------------------------------------------------------------- QIDO-RS

    def search_studies(self, filters: Mapping[str, Any] | None = None, *, fields: Iterable[str] = STUDY_FIELDS,
                       limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies``: matching studies as keyword -> value dicts (identifiers included)."""
        return self._query("/studies", "study search", filters, fields, limit, offset)

    def search_series(self, study_uid: str | None = None, filters: Mapping[str, Any] | None = None, *,
                      fields: Iterable[str] = SERIES_FIELDS, limit: int | None = None,
                      offset: int | None = None) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies/{study}/series`` (or ``/series`` across studies)."""
        path = f"/studies/{_segment(study_uid)}/series" if study_uid else "/series"
        return self._query(path, "series search", filters, fields, limit, offset)

    def search_instances(self, study_uid: str, series_uid: str | None = None,
                         filters: Mapping[str, Any] | None = None, *, fields: Iterable[str] = (),
                         limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies/{study}[/series/{series}]/instances``."""
        path = f"/studies/{_segment(study_uid)}"
        if series_uid:
            path += f"/series/{_segment(series_uid)}"
        return self._query(path + "/instances", "instance search", filters, fields, limit, offset)

    # ----------------------------------------------------------------------------- WADO-RS

    def retrieve_series(self, study_uid: str, series_uid: str) -> Iterator[IO[bytes]]:
        """WADO-RS one series: each instance as a readable binary stream (valid until the next)."""
        return self._retrieve(f"/studies/{_segment(study_uid)}/series/{_segment(series_uid)}", "series retrieval")

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Iterator[IO[bytes]]:
        """WADO-RS one instance (a multipart response with one part)."""
        path = f"/studies/{_segment(study_uid)}/series/{_segment(series_uid)}/instances/{_segment(sop_uid)}"
        return self._retrieve(path, "instance retrieval")

    def retrieve_study(self, study_uid: str) -> Iterator[IO[bytes]]:
        """WADO-RS a whole study in one response."""
        return self._retrieve(f"/studies/{_segment(study_uid)}", "study retrieval")

    def _retrieve(self, path: str, what: str) -> Iterator[IO[bytes]]:
        try:
            response = self._get(path, what, WADO_ACCEPT, stream=True)
        except DataError as error:
            if "HTTP 406" not in str(error):
                raise
            response = self._get(path, what, WADO_ACCEPT_FALLBACK, stream=True)
        with response:
            boundary = _multipart_boundary(self.url, what, response.headers.get("Content-Type", ""))
            chunks = _checked_chunks(self.url, what, response)
            for headers, body in iter_multipart(chunks, boundary, f"{self.url} ({what})"):
                with body:
                    kind = headers.get("content-type", DICOM).split(";")[0].strip().lower()
                    if kind != DICOM:
                        raise DataError(self.url, f"{what}: a part of the response is {kind}, not {DICOM}")
                    yield body


def _segment(uid: str | None) -> str:
    text = str(uid or "").strip()
    if not text:
        raise InputError("a UID is required")
    return quote(text, safe="")


def keyword_or_tag(name: str) -> str:
    """A DICOM keyword (``PatientID``) or tag (``00100020``) as QIDO accepts it; InputError if neither."""
    from pydicom.datadict import tag_for_keyword

    text = str(name).strip()
    if tag_for_keyword(text) is not None or text in ("limit", "offset", "fuzzymatching", "includefield"):
        return text
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.upper()
    raise InputError(f"unknown DICOM attribute {text!r} for a search filter (use a keyword such as PatientID, "
                     "or an 8-digit hex tag)")


def _connection_reason(error: BaseException) -> str:
    text = str(error).lower()
    for needle, reason in (("refused", "connection refused (is the server running on that port?)"),
                           ("name or service not known", "host name not found"),
                           ("nodename nor servname", "host name not found"),
                           ("no route", "no route to host"),
                           ("reset", "connection reset by the server"),
                           ("timed out", "connection timed out")):
        if needle in text:
            return reason
    return "connection failed"


def _status_problem(status: int, reason: str | None, what: str) -> str:
    if status == 401:
        return f"{what}: authentication failed (HTTP 401); check the user and password, or the token"
    if status == 403:
        return f"{what}: access denied (HTTP 403) for these credentials"
    if status == 404:
        return f"{what}: not found on the server (HTTP 404): unknown study / series, or not a DICOMweb URL"
    return f"{what}: the server answered HTTP {status} {reason or ''}".rstrip()


def from_dicom_json(item: Mapping[str, Any]) -> dict[str, Any]:
    """One DICOM JSON dataset (PS3.18 F.2) as keyword -> plain value (bulk data left out)."""
    from pydicom.datadict import keyword_for_tag

    result: dict[str, Any] = {}
    for tag, element in item.items():
        try:
            name = keyword_for_tag(int(tag, 16)) or tag
        except (TypeError, ValueError):
            name = str(tag)
        if not isinstance(element, dict):
            continue
        values = element.get("Value")
        if values is None:
            result[name] = None
            continue
        if element.get("vr") == "PN":
            values = [v.get("Alphabetic", "") if isinstance(v, dict) else str(v) for v in values]
        elif element.get("vr") == "SQ":
            values = [from_dicom_json(v) for v in values if isinstance(v, dict)]
        result[name] = values[0] if len(values) == 1 and element.get("vr") != "SQ" else values
    return result


# ------------------------------------------------------------------------- multipart parsing


def _multipart_boundary(url: str, what: str, content_type: str) -> bytes:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/related":
        raise DataError(url, f"{what}: expected multipart/related DICOM, the server sent "
                             f"{kind.strip() or 'no content type'} (not a WADO-RS endpoint?)")
    values = {}
    for param in params.split(";"):
        key, _, value = param.partition("=")
        values[key.strip().lower()] = value.strip().strip('"')
    if values.get("type") and values["type"].lower() != DICOM:
        raise DataError(url, f"{what}: the parts are {values['type']}, not {DICOM}")
    if not values.get("boundary"):
        raise DataError(url, f"{what}: multipart response without a boundary")
    return values["boundary"].encode("latin-1")


def _checked_chunks(url: str, what: str, response) -> Iterator[bytes]:
    requests = _require_requests()
    try:
        yield from response.iter_content(chunk_size=CHUNK_BYTES)
    except requests.exceptions.RequestException as error:
        raise DataError(url, f"{what}: the transfer broke off ({type(error).__name__})") from None


class _Buffer:
    """Bytes pulled from a chunk iterator on demand."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks = iter(chunks)
        self.data = bytearray()

    def fill(self) -> bool:
        for chunk in self.chunks:
            if chunk:
                self.data += chunk
                return True
        return False

    def find(self, token: bytes) -> int:
        start = 0
        while True:
            at = self.data.find(token, start)
            if at >= 0:
                return at
            start = max(0, len(self.data) - len(token) + 1)
            if not self.fill():
                return -1

    def take(self, count: int) -> bytes:
        head = bytes(self.data[:count])
        del self.data[:count]
        return head

    def copy_until(self, token: bytes, out: IO[bytes]) -> bool:
        """Move the bytes before ``token`` to ``out`` and drop the token; False at the end of input."""
        keep = len(token) - 1
        while True:
            at = self.data.find(token)
            if at >= 0:
                out.write(self.data[:at])
                del self.data[:at + len(token)]
                return True
            if len(self.data) > keep:
                out.write(self.data[:len(self.data) - keep])
                del self.data[:len(self.data) - keep]
            if not self.fill():
                return False


def _part_headers(raw: bytes) -> dict[str, str]:
    headers = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def iter_multipart(chunks: Iterable[bytes], boundary: bytes, where: str) -> Iterator[tuple[dict[str, str], IO[bytes]]]:
    """Parse a ``multipart/related`` body (RFC 2046) from a stream of chunks: ``(headers, body)``
    per part, headers with lower-case names, the body spooled and rewound. A body ending before
    the closing delimiter is a ``DataError`` (a truncated transfer)."""
    buffer = _Buffer(chunks)
    delimiter = b"--" + boundary
    start = buffer.find(delimiter)
    if start < 0:
        raise DataError(where, "empty multipart response (no part delimiter)")
    buffer.take(start + len(delimiter))
    while True:
        while len(buffer.data) < 2 and buffer.fill():
            pass
        if buffer.data.startswith(b"--"):
            return
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            raise DataError(where, "the response ends inside a part's headers (truncated transfer)")
        headers = _part_headers(buffer.take(end + 4))
        body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        if not buffer.copy_until(b"\r\n" + delimiter, body):
            body.close()
            raise DataError(where, "the response ends inside a DICOM instance (truncated transfer)")
        body.seek(0)
        yield headers, body


# ------------------------------------------------------------------------------------- pull


@dataclass
class _State:
    """What a pull has done so far (``STATE_NAME``); deleted when the pull completes."""

    path: Path
    studies: list[str]  # hashes of the requested study UIDs
    keep_identifiers: bool
    seed: str | None = None  # the generated de-identification seed (None: the caller's own seed)
    seed_check: str | None = None  # hash of the caller's seed, to refuse a resume with another one
    done: dict[str, str] = field(default_factory=dict)  # hash of original SOP Instance UID -> relative path

    def save(self) -> None:
        write_json(self.path, {"format": STATE_FORMAT, "studies": self.studies,
                               "keep_identifiers": self.keep_identifiers, "seed": self.seed,
                               "seed_check": self.seed_check, "done": self.done})


def _open_state(out: Path, study_uids: list[str], keep_identifiers: bool, seed: str | None) -> _State:
    """A new state for an empty / new ``out``, or the saved one of an unfinished pull of the same studies."""
    studies = sorted(short_hash(uid, 64) for uid in study_uids)
    seed_check = short_hash(f"medvl-seed:{seed}", 64) if seed is not None else None
    path = out / STATE_NAME
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: the output must be a folder, this is a file")
    if path.is_file():
        return _resume_state(path, studies, keep_identifiers, seed, seed_check)
    if out.is_dir() and any(out.iterdir()):
        finished = " (it holds a finished pull)" if (out / REPORT_NAME).is_file() else ""
        raise InputError(f"{out}: output folder is not empty{finished}; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    generated = None if keep_identifiers or seed is not None else secrets.token_hex(16)
    state = _State(path, studies, keep_identifiers, seed=generated, seed_check=seed_check)
    state.save()
    return state


def _resume_state(path: Path, studies: list[str], keep_identifiers: bool, seed: str | None,
                  seed_check: str | None) -> _State:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        state = _State(path, list(saved["studies"]), bool(saved["keep_identifiers"]), saved.get("seed"),
                       saved.get("seed_check"), dict(saved.get("done") or {}))
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(path, "unreadable pull state; delete the folder and pull again") from None
    if state.studies != studies:
        raise InputError(f"{path.parent}: holds an unfinished pull of other studies; resume it with the same "
                         "--study values or use a new folder")
    if state.keep_identifiers != keep_identifiers:
        raise InputError(f"{path.parent}: the unfinished pull there was "
                         f"{'not ' if not state.keep_identifiers else ''}run with --keep-identifiers; rerun it the "
                         "same way")
    if state.seed_check != seed_check:
        raise InputError(f"{path.parent}: resume the unfinished pull with the same --seed as before "
                         f"({'one was given' if state.seed_check else 'none was given'})")
    log.info("%s: resuming a pull, %d instance(s) already there", path.parent, len(state.done))
    return state


@dataclass
class _SeriesPlan:
    study_uid: str
    series_uid: str
    modality: str | None
    number: int | None
    instances: list[str]  # original SOP Instance UIDs (QIDO-RS)
    pulled: int = 0
    already: int = 0
    folder: str | None = None  # OUT-relative folder of the written instances


def _plan(client: DicomWebClient, study_uids: list[str]) -> list[_SeriesPlan]:
    """Every series of the studies and the SOP Instance UIDs in each (QIDO-RS)."""
    plans = []
    for number, study_uid in enumerate(study_uids, 1):
        series = _all_pages(lambda offset, s=study_uid: client.search_series(
            s, fields=("SeriesInstanceUID", "SeriesNumber", "Modality"), limit=PAGE_SIZE, offset=offset),
            "SeriesInstanceUID")
        if not series:  # the UID is not repeated: UIDs can embed dates
            given = f"study {number} of {len(study_uids)} given" if len(study_uids) > 1 else "the study given"
            raise DataError(client.url, f"{given} is not on the server (QIDO-RS lists no series for its UID)")
        for item in sorted(series, key=lambda s: (_int(s.get("SeriesNumber")) or 0, str(s["SeriesInstanceUID"]))):
            series_uid = str(item["SeriesInstanceUID"])
            instances = _all_pages(lambda offset, s=study_uid, r=series_uid: client.search_instances(
                s, r, fields=("SOPInstanceUID",), limit=PAGE_SIZE, offset=offset), "SOPInstanceUID")
            plans.append(_SeriesPlan(study_uid, series_uid, item.get("Modality"), _int(item.get("SeriesNumber")),
                                     [str(i["SOPInstanceUID"]) for i in instances]))
    return plans


def _all_pages(search, key: str) -> list[dict[str, Any]]:
    """Every result of a QIDO-RS query, page by page (servers cap result counts), deduplicated by
    ``key``; stops when a page brings nothing new (a server that ignores ``offset``)."""
    found: dict[str, dict[str, Any]] = {}
    while True:
        page = search(len(found))
        fresh = {str(item[key]): item for item in page if item.get(key) and str(item[key]) not in found}
        found.update(fresh)
        if len(page) < PAGE_SIZE or not fresh:
            return list(found.values())


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class _Writer:
    """Parses, de-identifies (unless keeping identifiers) and atomically writes pulled instances."""

    def __init__(self, out: Path, url: str, keep_identifiers: bool, seed: str | None):
        self.out, self.url, self.keep_identifiers = out, url, keep_identifiers
        self.anonymizer = None if keep_identifiers else _anonymizer(seed)
        self.entries: list[dict[str, Any]] = []

    def write(self, body: IO[bytes], where: str) -> tuple[str, str]:
        """Store one instance; returns (hash of its original SOP Instance UID, OUT-relative path)."""
        import pydicom

        from .deid import deidentify_dataset
        from .dicom import quiet_pydicom

        head = body.read(132)
        if len(head) < 132 or head[128:] != b"DICM":
            raise DataError(self.url, f"{where}: a part of the response is not a DICOM file (no DICM marker)")
        body.seek(0)
        with quiet_pydicom(where):
            try:
                ds = pydicom.dcmread(body)
            except Exception as error:  # noqa: BLE001 - any parser failure: a corrupt instance
                raise DataError(self.url, f"{where}: a received instance is not readable DICOM "
                                          f"({type(error).__name__})") from None
            original = str(ds.get("SOPInstanceUID") or "")
            if not original:
                raise DataError(self.url, f"{where}: a received instance has no SOP Instance UID")
            if self.keep_identifiers:
                body.seek(0)
                data = body.read()
            else:
                data, entry = deidentify_dataset(ds, self.anonymizer, where)  # type: ignore[arg-type]
                self.entries.append(entry)
        relative = (f"study-{short_hash(str(ds.get('StudyInstanceUID', '')), 12)}/"
                    f"series-{short_hash(str(ds.get('SeriesInstanceUID', '')), 12)}/"
                    f"{short_hash(str(ds.get('SOPInstanceUID', '')), 20)}.dcm")
        atomic_write_bytes(self.out / relative, data)
        return short_hash(original, 64), relative


def _anonymizer(seed: str | None):
    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        raise DataError(None, f"de-identifying a pull needs dicognito: {INSTALL_HINT}") from None
    return Anonymizer(seed=seed)


def pull_study(source: str | DicomWebClient, study_uids: str | Iterable[str], out: str | Path, *,
               keep_identifiers: bool = False, seed: int | str | None = None, limit: int | None = None,
               show_progress: bool = True, **client_options: Any) -> dict[str, Any]:
    """Pull whole studies from a DICOMweb server into the folder ``out`` (see the module docstring).

    ``source``: a service URL (``client_options`` such as ``username``, ``password``, ``token``,
    ``timeout`` go to ``DicomWebClient``) or a client. ``seed``: de-identify with this seed (same
    seed, same UIDs and dummies, so separate pulls can be linked; default: a random seed per pull).
    ``limit``: stop after this many new instances (rerun to continue). Returns the pull report
    (also written to ``out/pull-report.json``).
    """
    study_uids = [study_uids] if isinstance(study_uids, str) else list(study_uids)
    study_uids = list(dict.fromkeys(str(uid).strip() for uid in study_uids))
    if not study_uids or not all(study_uids):
        raise InputError("give at least one study UID to pull")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be at least 1, got {limit}")
    if keep_identifiers and seed is not None:
        raise InputError("a de-identification seed makes no sense with keep_identifiers")
    client = source if isinstance(source, DicomWebClient) else DicomWebClient(source, **client_options)
    out = Path(out)
    started = time.perf_counter()
    plans = _plan(client, study_uids)
    state = _open_state(out, study_uids, keep_identifiers, None if seed is None else str(seed))
    if keep_identifiers:
        log.warning("keeping patient identifiers: the pulled files in %s hold names, IDs and dates as the PACS "
                    "sent them", out)
    writer = _Writer(out, client.url, keep_identifiers, state.seed if seed is None else str(seed))
    complete = _pull_plans(client, plans, state, writer, limit, show_progress)
    report = _pull_report(client.url, plans, writer, complete, keep_identifiers, time.perf_counter() - started)
    write_json(out / REPORT_NAME, report)
    if complete:
        state.path.unlink(missing_ok=True)  # takes the seed with it
    log.info("pulled %d instance(s) (%d already there) in %d series into %s%s", report["counts"]["pulled"],
             report["counts"]["already_present"], report["counts"]["series"], out,
             "" if complete else " (incomplete: rerun to continue)")
    return report


def _pull_plans(client: DicomWebClient, plans: list[_SeriesPlan], state: _State, writer: _Writer,
                limit: int | None, show_progress: bool) -> bool:
    """Fetch what is missing, series by series; True when every listed instance is there."""
    total = sum(len(plan.instances) for plan in plans)
    budget = limit if limit is not None else total + 1
    saved = time.monotonic()
    try:
        with progress_bar("Pulling DICOM", total=total, enabled=show_progress) as advance:
            for number, plan in enumerate(plans, 1):
                missing = [sop for sop in plan.instances if short_hash(sop, 64) not in state.done]
                plan.already = len(plan.instances) - len(missing)
                plan.folder = next((str(Path(state.done[short_hash(s, 64)]).parent) for s in plan.instances
                                    if short_hash(s, 64) in state.done), None)
                advance(plan.already)
                if not missing or budget <= 0:
                    continue
                with closing(_fetch(client, plan, missing)) as bodies:
                    for body in bodies:
                        key, relative = writer.write(body, f"{client.url} (series {number} of {len(plans)})")
                        if key not in state.done:
                            plan.pulled, budget = plan.pulled + 1, budget - 1
                            advance(1)
                        state.done[key] = relative
                        plan.folder = str(Path(relative).parent)
                        if time.monotonic() - saved > STATE_SAVE_SECONDS:
                            state.save()
                            saved = time.monotonic()
                        if budget <= 0:
                            break
    finally:
        state.save()  # an instance written but not yet recorded is fetched and written again on resume
    return all(short_hash(sop, 64) in state.done for plan in plans for sop in plan.instances)


def _fetch(client: DicomWebClient, plan: _SeriesPlan, missing: list[str]) -> Iterator[IO[bytes]]:
    """The whole series in one response when none of it is here, else only the missing instances."""
    if len(missing) == len(plan.instances):
        yield from client.retrieve_series(plan.study_uid, plan.series_uid)
        return
    for sop in missing:
        yield from client.retrieve_instance(plan.study_uid, plan.series_uid, sop)


def _pull_report(url: str, plans: list[_SeriesPlan], writer: _Writer, complete: bool, keep_identifiers: bool,
                 seconds: float) -> dict[str, Any]:
    series = [{"folder": plan.folder, "modality": plan.modality, "series_number": plan.number,
               "instances": len(plan.instances), "pulled": plan.pulled, "already_present": plan.already}
              for plan in plans]
    counts = {"studies": len({plan.study_uid for plan in plans}), "series": len(plans),
              "instances": sum(len(plan.instances) for plan in plans),
              "pulled": sum(plan.pulled for plan in plans), "already_present": sum(plan.already for plan in plans)}
    report = {"server": url, "complete": complete, "deidentified": not keep_identifiers, "counts": counts,
              "series": series, "seconds": round(seconds, 2)}
    if not keep_identifiers:
        report["deidentification"] = _deid_summary(writer.entries)
    return report


def _deid_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    from dicognito import __version__ as dicognito_version

    from .deid import PROFILE

    replaced = Counter(name for entry in entries for name in entry["replaced"])
    removed = Counter(name for entry in entries for name in entry["removed"])
    warned = sum(1 for entry in entries if entry["warnings"])
    if warned:
        log.warning("%d pulled instance(s) declare burned-in annotation: identifiers may be in their pixels, "
                    "which de-identification does not change", warned)
    return {"profile": PROFILE, "tool": f"dicognito {dicognito_version}",
            "uids": "replaced, consistent within the pull", "dates": "shifted back by one offset per pull",
            "files_this_run": len(entries), "replaced": dict(sorted(replaced.items())),
            "removed": dict(sorted(removed.items())),
            "private_tags_removed": sum(entry["private_tags_removed"] for entry in entries),
            "files_with_burned_in_annotation": warned}


def read_report(folder: str | Path) -> dict[str, Any]:
    """The ``pull-report.json`` of a pulled folder."""
    path = Path(folder) / REPORT_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "no pull report (not a folder written by medvl pacs pull)") from None
    except (OSError, ValueError) as error:
        raise DataError(path, f"unreadable pull report ({type(error).__name__})") from None

