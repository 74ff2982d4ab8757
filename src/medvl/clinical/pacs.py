"""A DICOMweb client: QIDO-RS search and WADO-RS pull from a PACS, de-identifying on the way in.

``DicomWebClient(url, username=..., password=... | token=..., timeout=...)`` speaks DICOMweb
(DICOM PS3.18) over HTTP(S) with ``httpx``:

- ``search_studies(filters)``, ``search_series(study_uid, filters)``, ``search_instances(...)``:
  QIDO-RS queries; ``filters`` maps DICOM keywords to match values (``{"PatientID": "123",
  "ModalitiesInStudy": "CT", "StudyDate": "20200101-20201231"}``; ``*`` / ``?`` wildcards,
  ``FAMILY^GIVEN`` names, lists of UIDs or other values separated by ``,`` or ``\\``), checked by
  ``search_filters`` before anything is sent, as ``DimseClient`` checks them (a list is sent with
  ``,`` here, with ``\\`` over C-FIND); ``limit`` at least 1 (``check_paging``). The DICOM
  matching characters ``*``, ``?``, ``,`` and ``^`` go into the URL as themselves, everything else
  percent-encoded as UTF-8 (``query_string``): PS3.18 allows ``*``, ``?`` and ``,`` unencoded, and Orthanc (1.10 with
  DICOMweb 1.7) matches ``%2A`` or ``%5E`` literally, so encoded wildcards or name separators find
  nothing there (``requests`` cannot send a bare ``^``: hence ``httpx``). A server refusing a bare
  ``^`` (HTTP 400; RFC 3986 wants it encoded) is asked again with ``%5E``. That Orthanc decodes no
  ``%XX`` at all: a value with a space or a non-ASCII letter finds nothing there (put ``?`` or
  ``*`` in place of a space, ``*`` in place of a non-ASCII letter: it is several bytes, ``?`` matches
  one; C-FIND has no such limit), and a search that finds nothing says so in a warning. Results
  are plain dicts keyword -> value (person names as their alphabetic text, one value as itself,
  several as a list). They hold patient identifiers: show them to the user, never
  log or store them;
- ``retrieve_series`` / ``retrieve_instance``: WADO-RS retrieval as ``multipart/related;
  type="application/dicom"``, asking for the stored transfer syntax (``transfer-syntax=*``, so the
  server does not transcode), parsed as a stream: each instance is spooled (in memory up to 64 MiB,
  then an unnamed temporary file) and handed over one at a time.

``pull_study(url_or_client, study_uids, out, ...)`` copies whole studies into a folder through
``medvl.clinical.pull.run_pull`` (the client is a ``PullSource``: ``plan_series`` lists the series
and instances with QIDO-RS, ``fetch_series`` retrieves them with WADO-RS): every instance
de-identified before it is written, atomic writes, a resumable state, ``pull-report.json``
without identifiers. ``medvl.clinical.dimse.DimseClient`` does the same over DIMSE.

Errors are ``DataError`` naming the server URL without credentials: connection refused, timeout,
401 / 403, an unknown study, a response that is not DICOM JSON or not multipart DICOM, a part that
is not a DICOM file, a transfer cut short.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import ssl
import tempfile
from collections.abc import Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ..checks import check_number
from ..errors import ConnectionFailure, DataError, InputError
from ..io import loads_json
from .formats import INSTALL_HINT
from .pull import REPORT_NAME as REPORT_NAME
from .pull import STATE_NAME as STATE_NAME
from .pull import SeriesPlan, as_int, check_pull_arguments, instance_count, run_pull, series_order
from .pull import read_report as read_report

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
WADO_ACCEPT_FALLBACK = 'multipart/related; type="application/dicom"'  # servers that refuse "*" (HTTP 406)
SPOOL_BYTES = 64 << 20  # an instance larger than this is spooled to an unnamed temporary file
CHUNK_BYTES = 1 << 16
PAGE_SIZE = 1000  # QIDO-RS results asked for per request (servers may send fewer: see _all_pages)
MAX_TIMEOUT_S = 86_400  # a day: a timeout of inf or NaN seconds failed in the socket layer with a traceback
LIST_SEPARATOR = re.compile(r"[,\\]")  # between the values of a list filter (search_filters)
QUERY_SAFE = "*?,^"  # DICOM matching characters sent unencoded in QIDO-RS values (see query_string)
STRICT_SAFE = "*?,"  # the same as RFC 3986 allows them in a query (for a server refusing a bare "^")
QIDO_PARAMETERS = ("limit", "offset", "fuzzymatching", "includefield")  # a search's arguments, never filters
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})  # no value matching (PS3.4 C.2.2.2)
# characters a value of these VRs holds at most (PS3.5 table 6.2-1; PN: per component group)
TEXT_LENGTHS = {"AE": 16, "AS": 4, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "UI": 64, "ST": 1024, "LT": 10240}
INTEGER_RANGES = {"US": (0, 2**16 - 1), "SS": (-(2**15), 2**15 - 1), "UL": (0, 2**32 - 1),
                  "SL": (-(2**31), 2**31 - 1), "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1)}
STUDY_FIELDS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "ModalitiesInStudy",
                "StudyDescription", "AccessionNumber", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances")
# Attributes of a series (General Series, General Equipment modules; PS3.4 C.6.2.1.2): a study search does not
# match them (Orthanc finds no study, even with "*"), a series search does (search_series, --study UID)
SERIES_KEYS = frozenset({
    "Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "ProtocolName", "Laterality", "SeriesType", "SequenceName", "OperatorsName",
    "PerformingPhysicianName", "PerformedProcedureStepID", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepDescription", "Manufacturer",
    "ManufacturerModelName", "StationName", "InstitutionalDepartmentName", "ContrastBolusAgent",
    "AcquisitionDeviceProcessingDescription", "NumberOfSeriesRelatedInstances"})
SERIES_FIELDS = ("SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription", "BodyPartExamined",
                 "NumberOfSeriesRelatedInstances")


# -------------------------------------------------------------------------------- the client


def _require_httpx():
    try:
        import httpx
    except ImportError:
        raise DataError(None, f"the DICOMweb client needs httpx: {INSTALL_HINT}") from None
    return httpx


def _verify() -> ssl.SSLContext | bool:
    """TLS verification: the system's CAs, or the bundle ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE``
    names (as this client honoured when it used requests; httpx itself reads ``SSL_CERT_FILE``)."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if not bundle:
        return True
    try:
        if os.path.isdir(bundle):
            return ssl.create_default_context(capath=bundle)
        return ssl.create_default_context(cafile=bundle)
    except (OSError, ssl.SSLError):
        raise InputError(f"cannot read the CA bundle {bundle!r} (REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE)") from None


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


class DicomWebClient:
    """QIDO-RS / WADO-RS client for one DICOMweb service (conventions in the module docstring).

    ``url``: the service root, e.g. ``http://localhost:8042/dicom-web`` (credentials in the URL
    are taken out and used as basic auth). ``username`` / ``password``: HTTP basic auth;
    ``token``: a bearer token (not both). ``timeout``: seconds to connect and between bytes read.
    """

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 token: str | None = None, timeout: float = 60.0):
        httpx = _require_httpx()
        self.url, url_user, url_password = split_credentials(url)
        username, password = username or url_user, password if password is not None else url_password
        if token and username:
            raise InputError("give either a user and password (basic auth) or a bearer token, not both")
        if password is not None and not username:
            raise InputError("a password needs a user name (--user)")
        check_timeout(timeout)
        self.timeout = timeout
        headers = {"User-Agent": "medvl-dicomweb", **({"Authorization": f"Bearer {token}"} if token else {})}
        self.session = httpx.Client(auth=httpx.BasicAuth(username, password or "") if username else None,
                                    headers=headers, timeout=timeout, follow_redirects=True, verify=_verify())

    def __repr__(self) -> str:
        return f"DicomWebClient({self.url!r})"

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ HTTP plumbing

    def _get(self, path: str, what: str, accept: str, query: str = "", stream: bool = False):
        """GET ``path`` below the service root with ``query`` as given (already encoded:
        ``query_string``); HTTP failures become ``DataError`` naming the URL."""
        httpx = _require_httpx()
        try:
            request = self.session.build_request("GET", self.url + path + (f"?{query}" if query else ""),
                                                 headers={"Accept": accept})
            response = self.session.send(request, stream=stream)
        except httpx.TimeoutException:
            raise ConnectionFailure(self.url, f"no answer within {self.timeout:g} s (timeout)") from None
        except httpx.ConnectError as error:
            if any(word in str(error).lower() for word in ("ssl", "certificate", "tls")):
                raise ConnectionFailure(self.url, "TLS/SSL error (certificate not trusted, or not an https "
                                                  "server)") from None
            raise ConnectionFailure(self.url, f"cannot connect: {_connection_reason(error)}") from None
        except httpx.HTTPError as error:
            raise ConnectionFailure(self.url, f"request failed ({type(error).__name__})") from None
        if response.status_code >= 400:
            response.close()
            raise DataError(self.url, _status_problem(response.status_code, response.reason_phrase, what))
        return response

    def _query(self, path: str, what: str, filters: Mapping[str, Any] | None, fields: Iterable[str],
               limit: int | None, offset: int | None) -> list[dict[str, Any]]:
        check_paging(limit, offset)
        params = [(name, qido_value(value)) for name, value in search_filters(filters).items()]
        params += [("includefield", keyword_or_tag(f)) for f in fields]
        if limit is not None:
            params.append(("limit", str(int(limit))))
        if offset:
            params.append(("offset", str(int(offset))))
        try:
            response = self._get(path, what, DICOM_JSON, query=query_string(params))
        except DataError as error:
            if "HTTP 400" not in str(error) or not any("^" in value for _, value in params):
                raise
            response = self._get(path, what, DICOM_JSON, query=query_string(params, safe=STRICT_SAFE))
        if response.status_code == 204 or not response.content.strip():
            _hint_encoded(self.url, params)
            return []
        kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind not in (DICOM_JSON, "application/json"):
            raise DataError(self.url, f"{what}: expected {DICOM_JSON}, the server sent {kind or 'no content type'} "
                                      "(is the URL the DICOMweb root, e.g. .../dicom-web?)")
        try:
            items = loads_json(response.content)
        except ValueError:
            raise DataError(self.url, f"{what}: the response is not valid JSON") from None
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise DataError(self.url, f"{what}: expected a JSON list of DICOM datasets")
        if not items:
            _hint_encoded(self.url, params)
        try:
            return [from_dicom_json(item) for item in items]
        except ValueError as error:
            raise DataError(self.url, f"{what}: expected a JSON list of DICOM datasets ({error})") from None

    # ----------------------------------------------------------------------------- QIDO-RS

    def search_studies(self, filters: Mapping[str, Any] | None = None, *, fields: Iterable[str] = STUDY_FIELDS,
                       limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
        """QIDO-RS ``/studies``: matching studies as keyword -> value dicts (identifiers included); a
        series attribute as a filter is refused (``study_search_filters``)."""
        return self._query("/studies", "study search", study_search_filters(filters), fields, limit, offset)

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
        try:
            boundary = _multipart_boundary(self.url, what, response.headers.get("Content-Type", ""))
            chunks = _checked_chunks(self.url, what, response)
            for headers, body in iter_multipart(chunks, boundary, f"{self.url} ({what})"):
                with body:
                    kind = headers.get("content-type", DICOM).split(";")[0].strip().lower()
                    if kind != DICOM:
                        raise DataError(self.url, f"{what}: a part of the response is {kind}, not {DICOM}")
                    yield body
        finally:
            response.close()

    # -------------------------------------------------------------- pull source (medvl.clinical.pull)

    def plan_series(self, study_uids: list[str]) -> list[SeriesPlan]:
        """Every series of the studies, the SOP Instance UIDs in each and the number of instances the
        server counts in it (QIDO-RS; a listing shorter than that count is left to ``run_pull``)."""
        plans = []
        for number, study_uid in enumerate(study_uids, 1):
            series = _all_pages(lambda offset, s=study_uid: self.search_series(
                s, fields=("SeriesInstanceUID", "SeriesNumber", "Modality", "NumberOfSeriesRelatedInstances"),
                limit=PAGE_SIZE, offset=offset), "SeriesInstanceUID")
            if not series:  # the UID is not repeated: UIDs can embed dates
                given = f"study {number} of {len(study_uids)} given" if len(study_uids) > 1 else "the study given"
                raise DataError(self.url, f"{given} is not on the server (QIDO-RS lists no series for its UID)")
            for item in sorted(series, key=series_order):
                series_uid = str(item["SeriesInstanceUID"])
                expected = instance_count(item.get("NumberOfSeriesRelatedInstances"))
                instances = _all_pages(lambda offset, s=study_uid, r=series_uid: self.search_instances(
                    s, r, fields=("SOPInstanceUID",), limit=PAGE_SIZE, offset=offset), "SOPInstanceUID", expected)
                plans.append(SeriesPlan(study_uid, series_uid, item.get("Modality"), as_int(item.get("SeriesNumber")),
                                        [str(i["SOPInstanceUID"]) for i in instances], expected=expected))
        return plans

    def fetch_series(self, plan: SeriesPlan, missing: list[str]) -> Generator[IO[bytes], None, None]:
        """The whole series in one response when none of it is here, else only the missing instances."""
        if len(missing) == len(plan.instances):
            yield from self.retrieve_series(plan.study_uid, plan.series_uid)
            return
        for sop in missing:
            yield from self.retrieve_instance(plan.study_uid, plan.series_uid, sop)


def _segment(uid: str | None) -> str:
    text = str(uid or "").strip()
    if not text:
        raise InputError("a UID is required")
    return quote(text, safe="")


def query_string(params: Iterable[tuple[str, str]], safe: str = QUERY_SAFE) -> str:
    """A QIDO-RS query component: ``key=value`` pairs joined by ``&``, each value percent-encoded
    as UTF-8 except the DICOM matching characters ``safe`` (``QUERY_SAFE``: ``*`` and ``?``
    wildcards, ``,`` between the UIDs of a list, ``^`` between person name components), which reach
    the server as themselves. PS3.18 allows ``*``, ``?`` and ``,`` unencoded in a query; ``^`` too
    is sent as itself because servers that do not decode ``%5E`` (Orthanc 1.10) match it literally."""
    return "&".join(f"{quote(key, safe='')}={quote(value, safe=safe)}" for key, value in params)


def _hint_encoded(url: str, params: Iterable[tuple[str, str]]) -> None:
    """Say why a search that sent percent-encoded characters may have found nothing."""
    encoded = {c for key, value in params if key not in ("limit", "offset", "includefield")
               for c in value if quote(c, safe=QUERY_SAFE) != c}
    if encoded:  # the characters only, never the values (they may be names)
        kinds = {"space" if c == " " else "non-ASCII letters" if not c.isascii() else repr(c) for c in encoded}
        shown = ", ".join(sorted(kinds))
        # a non-ASCII letter is two or more bytes in UTF-8, and ? stands for one: only * replaces it
        advice = "try * in their place" if "non-ASCII letters" in kinds else "try ? or * in their place"
        log.warning("%s: no match; the search values hold characters sent percent-encoded (%s), which some "
                    "servers (Orthanc 1.10) match literally: %s", url, shown, advice)


def keyword_or_tag(name: str) -> str:
    """A DICOM keyword (``PatientID``) or tag (``00100020``) of the DICOM dictionary, as QIDO accepts
    it; InputError for anything else: a QIDO-RS query parameter (``limit``, ``offset``,
    ``includefield``, ``fuzzymatching``: a search's own arguments, never attributes), or a private or
    unknown tag (C-FIND cannot give it a VR, so neither transport searches on it)."""
    from pydicom.datadict import get_entry, tag_for_keyword

    text = str(name).strip()
    if text.lower() in QIDO_PARAMETERS:
        raise InputError(f"{text!r} is a QIDO-RS query parameter, not a DICOM attribute: it cannot be a search "
                         "filter (a search takes limit, offset and fields as its own arguments; --limit)")
    if tag_for_keyword(text) is not None:
        return text
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        try:
            get_entry(int(text, 16))
        except KeyError:
            raise InputError(f"tag {text.upper()} is not in the DICOM dictionary (a private or unknown attribute): "
                             "a search matches standard attributes only") from None
        return text.upper()
    raise InputError(f"unknown DICOM attribute {text!r} for a search filter (use a keyword such as PatientID, "
                     "or an 8-digit hex tag)")


def filter_vr(name: str) -> str:
    """The VR a search sends the match value of ``name`` (a ``keyword_or_tag`` result) with: the
    dictionary's, the first one where it lists several (``US or SS``)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(name)
    return str(dictionary_VR(tag if tag is not None else int(name, 16))).split(" or ")[0]


def search_filters(filters: Mapping[str, Any] | None, option: str = "") -> dict[str, str]:
    """``filters`` checked as both transports send them: keyword or tag (``keyword_or_tag``) -> match
    value as text, empty values left out. InputError, before anything is sent, for a value no search
    can match (``check_match_value``). A list of values (any one matches: UIDs, modalities), written
    with ``,`` as QIDO-RS separates them or ``\\`` as DICOM does, comes back in DICOM's form,
    ``\\``-separated, which C-FIND sends as it is and QIDO-RS with ``,`` (``qido_value``), so a list
    finds the same studies over both. ``option``: how the caller names the filters (``--filter``)."""
    checked: dict[str, str] = {}
    for key, value in (filters or {}).items():
        if value is None or str(value) == "":
            continue
        name = keyword_or_tag(key)
        what = f"{option} {name}".strip()
        checked[name] = match_list(check_match_value(name, str(value), what), name, what)
    return checked


def study_search_filters(filters: Mapping[str, Any] | None) -> dict[str, str]:
    """``search_filters`` for a study search: InputError for a series attribute (``SERIES_KEYS``, by
    keyword or tag), which no study matches: servers answer "no studies", not "not searchable here"."""
    from pydicom.datadict import keyword_for_tag

    checked = search_filters(filters)
    for name in checked:
        keyword = name if not _is_tag(name) else keyword_for_tag(int(name, 16))
        if keyword in SERIES_KEYS:
            raise InputError(f"{name} is a series attribute, which a study search cannot match: search a study's "
                             f"series by it (--study UID)")
    return checked


def _is_tag(name: str) -> bool:
    return len(name) == 8 and _is_hex(name)


def _is_hex(name: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in name)


def match_list(value: str, name: str, what: str) -> str:
    """``value`` with its list separators (``,`` or ``\\``) made DICOM's ``\\``; a UID list's items without
    the spaces around them. InputError naming ``what`` for an empty item (``A,,B``, a trailing ``,``),
    which would match every study on some servers and none on others."""
    items = LIST_SEPARATOR.split(value)
    if len(items) == 1:
        return value
    if filter_vr(name) == "UI":
        items = [item.strip() for item in items]
    if any(not item.strip() for item in items):
        raise InputError(f"{what}: an empty item in its list of values (separate the values with ',')")
    return "\\".join(items)


def qido_value(value: str) -> str:
    """A ``search_filters`` value as QIDO-RS sends it: a list's items separated by ``,`` (PS3.18)."""
    return value.replace("\\", ",")


def check_match_value(name: str, value: str, what: str) -> str:
    """``value`` if a QIDO-RS / C-FIND match on the attribute ``name`` can hold it (PS3.4 C.2.2.2),
    else InputError naming ``what``: sequences and binary values (VR SQ, OB, OW, UN...) match no
    value; numbers (US, SL, FD, IS, DS...) must be numbers in their VR's range (single value matching,
    no wildcards; whole numbers come back as plain digits); dates (DA) ``YYYYMMDD`` or a range
    (``check_date_match``); text no longer than its VR holds, code strings in upper case
    (``check_text_match``)."""
    vr = filter_vr(name)
    if vr == "SQ":
        raise InputError(f"{what}: a sequence cannot be matched with a value (give the attribute inside it "
                         "as its own keyword, if the server matches it at this level)")
    if vr in BINARY_VRS:
        raise InputError(f"{what}: holds binary data (VR {vr}), which a search cannot match")
    if vr in INTEGER_RANGES or vr == "IS":
        low, high = INTEGER_RANGES.get(vr, (-(2**31), 2**31 - 1))
        text = value.strip()
        if not text.lstrip("+-").isdigit() or not low <= int(text) <= high:
            raise InputError(f"{what} expects a whole number from {low} to {high} (VR {vr}), got {value!r}")
        return str(int(text))  # as servers compare it: no sign or leading zeros
    elif vr in ("FL", "FD", "DS"):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise InputError(f"{what} expects a number (VR {vr}), got {value!r}")
    elif vr == "DA":
        check_date_match(value, what)
    elif vr in TEXT_LENGTHS:
        return check_text_match(value, vr, what)
    return value


def check_text_match(value: str, vr: str, what: str) -> str:
    """A text match value as servers compare it: a code string (CS) in upper case, the only case it is
    stored in (Orthanc's QIDO-RS ignores case there, its C-FIND does not). InputError naming ``what``
    (never the value: it may be a name or an ID) when a value is longer than its VR holds
    (``TEXT_LENGTHS``; ``*`` not counted): no stored value can match it, and C-FIND would send it anyway
    to match nothing. Several values (``\\`` or ``,`` between them) are measured one by one."""
    if vr == "CS":
        value = value.upper()
    limit = TEXT_LENGTHS[vr]
    for single in value.replace(",", "\\").split("\\"):
        for part in single.split("=") if vr == "PN" else [single]:
            length = len(part.replace("*", ""))
            if length > limit:
                raise InputError(f"{what}: a value of {length} characters, more than the {limit} a DICOM {vr} value "
                                 "holds (no stored value can match it)")
    return value


def check_date_match(value: str, what: str) -> str:
    """``value`` if it is a DICOM date match: ``YYYYMMDD``, or a range ``YYYYMMDD-YYYYMMDD`` (either end
    may be left out: ``YYYYMMDD-``, ``-YYYYMMDD``) of real calendar dates; else InputError naming ``what``."""
    start, dash, end = value.strip().partition("-")
    ends = [start, end] if dash else [start]
    if not any(ends) or not all(text == "" or _is_date(text) for text in ends):
        raise InputError(f"{what} expects YYYYMMDD or YYYYMMDD-YYYYMMDD, got {value!r}")
    if start and end and end < start:
        raise InputError(f"{what}: the range {value!r} ends before it starts")
    return value


def _is_date(text: str) -> bool:
    if len(text) != 8 or not text.isdigit():
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def check_timeout(timeout: float) -> None:
    """InputError unless ``timeout`` is seconds > 0 and at most ``MAX_TIMEOUT_S``, finite: the socket layer takes
    NaN or an infinity (or 1e10 s) for a ValueError or OverflowError at the first connection."""
    check_number("timeout", timeout, minimum=0, exclusive_minimum=True, maximum=MAX_TIMEOUT_S)


def check_paging(limit: int | None, offset: int | None = None) -> None:
    """InputError unless ``limit`` (results wanted) is None or at least 1 and ``offset`` None or at least 0:
    servers read ``limit=0`` as "no limit" or fail on a negative one, and a C-FIND result cut at -1 loses
    its last row."""
    if limit is not None:
        check_number("limit", limit, integer=True)
        if limit < 1:
            raise InputError(f"limit must be at least 1, got {limit}")
    check_number("offset", offset, minimum=0, integer=True, optional=True)


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
    """One DICOM JSON dataset (PS3.18 F.2) as keyword -> plain value (bulk data left out); ``ValueError``
    naming the element (its tag, never its value) when a ``Value`` is not a list (PS3.18 F.2.4), or for a key
    wider than a tag."""
    from pydicom.datadict import keyword_for_tag

    result: dict[str, Any] = {}
    for tag, element in item.items():
        if isinstance(tag, str) and len(tag) > 8 and _is_hex(tag):
            raise ValueError("an element key is wider than a DICOM tag (8 hex digits)")
        try:
            name = keyword_for_tag(int(tag, 16)) or tag
        except (TypeError, ValueError, OverflowError):
            name = str(tag)
        if not isinstance(element, dict):
            continue
        values = element.get("Value")
        if values is None:
            result[name] = None
            continue
        if not isinstance(values, list):
            raise ValueError(f"element {tag if _is_tag(str(tag)) else '(not a tag)'}: Value is not a list")
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
    httpx = _require_httpx()
    try:
        yield from response.iter_bytes(chunk_size=CHUNK_BYTES)
    except httpx.HTTPError as error:
        raise ConnectionFailure(url, f"{what}: the transfer broke off ({type(error).__name__})") from None


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


def _all_pages(search, key: str, expected: int | None = None) -> list[dict[str, Any]]:
    """Every result of a QIDO-RS query, page by page, deduplicated by ``key``.

    ``search(offset)`` asks for ``PAGE_SIZE`` results from ``offset``. Servers cap their answers below
    the ``limit`` asked for (Orthanc's ``LimitFindInstances`` / ``LimitFindResults``, dcm4chee's
    QIDO max results) without saying so, so a short page is not the last one: ask again from the new
    offset until a page brings nothing new (empty, or the same again from a server that ignores
    ``offset``), or ``expected`` results (the count the server gave) are there: the first page is always asked
    for, whatever the count (a hint that bounds the paging, never a reason to skip it). A server may still
    list fewer than it counts (Orthanc pages within its capped results): the caller compares."""
    found: dict[str, dict[str, Any]] = {}
    while not found or expected is None or len(found) < expected:
        page = search(len(found))
        fresh = {str(item[key]): item for item in page if item.get(key) and str(item[key]) not in found}
        if not fresh:
            break
        found.update(fresh)
        if expected is not None and len(found) > expected:  # a stale count (0 from a lazy table): page to the end
            expected = None
    return list(found.values())



def pull_study(source: str | DicomWebClient, study_uids: str | Iterable[str], out: str | Path, *,
               keep_identifiers: bool = False, seed: int | str | None = None, limit: int | None = None,
               show_progress: bool = True, **client_options: Any) -> dict[str, Any]:
    """Pull whole studies from a DICOMweb server into the folder ``out`` (``medvl.clinical.pull``).

    ``source``: a service URL (``client_options`` such as ``username``, ``password``, ``token``,
    ``timeout`` go to ``DicomWebClient``) or a client. ``seed``: de-identify with this seed (same
    seed, same UIDs and dummies, so separate pulls can be linked; default: a random seed per pull).
    ``limit``: stop after this many new instances (rerun to continue). Returns the pull report
    (also written to ``out/pull-report.json``).
    """
    check_pull_arguments(study_uids, limit, keep_identifiers, seed)
    client = source if isinstance(source, DicomWebClient) else DicomWebClient(source, **client_options)
    return run_pull(client, study_uids, out, keep_identifiers=keep_identifiers, seed=seed, limit=limit,
                    show_progress=show_progress)
