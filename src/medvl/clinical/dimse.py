"""A DIMSE client: C-ECHO, C-FIND and C-GET / C-MOVE pulls from a PACS with pynetdicom.

For a PACS without DICOMweb. ``DimseClient(host, port, called_aet=..., calling_aet="MEDVL",
retrieve="get" | "move", move_port=..., timeout=...)``, or ``DimseClient.from_url("dicom://
PACS-AET@host:104")``, speaks classic DICOM networking (PS3.7 / PS3.8) with the Study Root
query/retrieve information model:

- ``echo()``: C-ECHO (verification);
- ``search_studies(filters)``, ``search_series(study_uid, filters)``, ``search_instances(...)``:
  C-FIND at STUDY / SERIES / IMAGE level, with the same filters (DICOM keyword -> match value,
  ``*`` / ``?`` wildcards, ``YYYYMMDD-YYYYMMDD`` date ranges, checked before the query by
  ``medvl.clinical.pacs.search_filters``; a value that is not ASCII is sent in UTF-8, the identifier's
  Specific Character Set ``ISO_IR 192``) and the same plain keyword -> value results as
  ``DicomWebClient``; they hold patient identifiers: show them, never log or store them. DIMSE has
  no paging: ``limit`` (at least 1) keeps the first results;
- ``plan_series`` / ``fetch_series``: a ``medvl.clinical.pull.PullSource``, so ``run_pull(client,
  study_uids, out)`` (or ``pull_study``) writes the same de-identified, resumable folder with the
  same ``pull-report.json`` as a DICOMweb pull. Instances are retrieved a series at a time (only the
  missing instances when resuming) with

  - C-GET (default): the PACS sends the instances back over the same association, so nothing
    listens for inbound connections. Each SOP class of the series (from C-FIND) is proposed once
    per transfer syntax, so the PACS sends each instance in its stored transfer syntax rather than
    transcoding it (Orthanc cannot transcode JPEG 2000, for one);
  - C-MOVE: medvl runs a storage SCP on ``move_port`` (all interfaces, or ``move_bind``) from the
    first retrieval until ``close()`` (use the client in a ``with`` block) and asks the PACS to send
    the instances to its own AE title (``calling_aet``): the PACS must know that AE title with this
    host and port. The SCP accepts every storage SOP class (``storage_sop_classes``: retired ones
    included) and the classes C-FIND lists for the series (a private one), in every transfer syntax.

  Instances received that were not asked for are refused (status 0xC001). Received instances
  wait in a bounded queue (``INBOX_SIZE``), each in memory up to 64 MiB and in an unnamed
  temporary file beyond, so a slow disk holds the PACS back instead of filling memory.

Errors are ``DataError`` naming ``dicom://AET@host:port``: connection refused, host not found,
association rejected (with the PACS's reason: usually a wrong called AE title, or a calling AE
title / host the PACS does not know), no answer within ``timeout`` seconds, a failed query or
retrieval status (naming the series by number and modality, and its SOP classes), an unknown study,
an unknown C-MOVE destination. pynetdicom's own log (which
dumps whole datasets at debug level) is silenced unless its logger level was set deliberately.
"""

from __future__ import annotations

import logging
import queue
import socket
import tempfile
import threading
import warnings
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

from ..errors import ConnectionFailure, DataError, InputError
from .dicom import quiet_pydicom
from .formats import INSTALL_HINT
from .pacs import (
    INTEGER_RANGES,
    SERIES_FIELDS,
    STUDY_FIELDS,
    check_paging,
    check_timeout,
    filter_vr,
    keyword_or_tag,
    search_filters,
    study_search_filters,
)
from .pull import SeriesPlan, as_int, instance_count, series_order

log = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "MEDVL"
RETRIEVE_METHODS = ("get", "move")
INBOX_SIZE = 8  # received instances waiting to be written; the PACS waits beyond this
SPOOL_BYTES = 64 << 20  # a received instance larger than this is spooled to an unnamed temporary file
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8)
PENDING = (0xFF00, 0xFF01)
NOT_ASKED_FOR = 0xC001  # C-STORE status for an instance this retrieval did not request
OUT_OF_RESOURCES = 0xA700
NOT_STORED = ("Storage Commitment", "Media Storage Directory")  # SOP classes named "Storage" that store nothing
UTF8 = "ISO_IR 192"  # the Specific Character Set of a C-FIND identifier holding a value that is not ASCII
RESPONSE_ONLY = {"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet", "InstanceAvailability"}


def _require_pynetdicom():
    try:
        import pynetdicom
    except ImportError:
        raise DataError(None, f"DIMSE (dicom://) needs pynetdicom: {INSTALL_HINT}") from None
    quiet = logging.getLogger("pynetdicom")
    if quiet.level == logging.NOTSET:  # its INFO / DEBUG lines dump datasets; its errors repeat ours
        quiet.setLevel(logging.CRITICAL)
    return pynetdicom


def check_ae_title(title: str, what: str) -> str:
    """An AE title: 1 to 16 characters, no backslash or control characters (PS3.5 VR AE)."""
    text = str(title).strip()
    if not 1 <= len(text) <= 16 or "\\" in text or any(ord(c) < 32 or ord(c) > 126 for c in text):
        raise InputError(f"{what} must be 1 to 16 printable ASCII characters without a backslash, got {title!r}")
    return text


def parse_dicom_url(url: str) -> tuple[str, str, int]:
    """``dicom://AET@host:port`` as (called AE title, host, port)."""
    scheme, sep, rest = url.strip().partition("://")
    aet, at, address = rest.rpartition("@")
    host, colon, port = address.rpartition(":")
    host = host.strip("[]")
    if scheme.lower() != "dicom" or not sep or not at or not colon or not host or not port.isdigit():
        raise InputError(f"not a DIMSE address: {url!r} (expected dicom://AET@host:port, e.g. "
                         "dicom://ORTHANC@localhost:4242)")
    if not 0 < int(port) < 65536:
        raise InputError(f"port must be 1 to 65535, got {port} in {url!r}")
    return check_ae_title(aet, "the called AE title"), host, int(port)


def is_dicom_url(url: str) -> bool:
    return url.strip().lower().startswith("dicom://")


class DimseClient:
    """C-ECHO / C-FIND / C-GET / C-MOVE client for one PACS (conventions in the module docstring).

    ``host``, ``port``: the PACS's DICOM port. ``called_aet``: the PACS's AE title;
    ``calling_aet``: ours, as the PACS knows it (also the C-MOVE destination). ``retrieve``:
    ``"get"`` or ``"move"``; ``move_port``: where the C-MOVE storage SCP listens (the port the PACS
    has for ``calling_aet``); ``move_bind``: its address (default: all interfaces). ``timeout``:
    seconds to connect, to negotiate and between messages.
    """

    def __init__(self, host: str, port: int, *, called_aet: str, calling_aet: str = DEFAULT_CALLING_AET,
                 retrieve: str = "get", move_port: int | None = None, move_bind: str = "",
                 timeout: float = 30.0):
        _require_pynetdicom()
        self.host, self.port = str(host).strip(), int(port)
        if not self.host or not 0 < self.port < 65536:
            raise InputError(f"a DICOM host and a port from 1 to 65535 are needed, got {host!r}:{port}")
        self.called_aet = check_ae_title(called_aet, "the called AE title")
        self.calling_aet = check_ae_title(calling_aet, "the calling AE title")
        if retrieve not in RETRIEVE_METHODS:
            raise InputError(f"retrieve must be one of {', '.join(RETRIEVE_METHODS)}, got {retrieve!r}")
        if retrieve == "move" and move_port is None:
            raise InputError("C-MOVE needs the port medvl listens on (move_port / --move-port), as the PACS "
                             f"knows it for AE title {self.calling_aet}")
        if move_port is not None and not 0 < int(move_port) < 65536:
            raise InputError(f"move port must be 1 to 65535, got {move_port}")
        check_timeout(timeout)
        self.retrieve, self.move_port, self.move_bind, self.timeout = retrieve, move_port, move_bind, float(timeout)
        self.url = f"dicom://{self.called_aet}@{self.host}:{self.port}"
        self._storage_server = None  # the C-MOVE storage SCP while the client is open
        self._inbox: _Inbox | None = None  # where the storage SCP puts what arrives, during a C-MOVE

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DimseClient:
        """A client for ``dicom://AET@host:port``; ``options`` as for the constructor."""
        called_aet, host, port = parse_dicom_url(url)
        return cls(host, port, called_aet=called_aet, **options)

    def __repr__(self) -> str:
        return f"DimseClient({self.url!r}, calling_aet={self.calling_aet!r}, retrieve={self.retrieve!r})"

    def close(self) -> None:
        """Stop the C-MOVE storage SCP, if one was started (every operation has its own association)."""
        server, self._storage_server = self._storage_server, None
        if server is not None:
            for active in list(server.active_associations):
                active.abort()
            server.shutdown()

    def __enter__(self) -> DimseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ associations

    def _application_entity(self):
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        return ae

    @contextmanager
    def _association(self, contexts: Iterable[tuple[str, list[str] | None]], what: str, roles=None, handlers=None):
        """An established association proposing ``contexts`` (abstract syntax, transfer syntaxes);
        released at the end, aborted when the block fails."""
        ae = self._application_entity()
        for abstract_syntax, syntaxes in contexts:
            ae.add_requested_context(abstract_syntax, syntaxes) if syntaxes else ae.add_requested_context(
                abstract_syntax)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet, ext_neg=roles, evt_handlers=handlers)
        if not assoc.is_established:
            raise ConnectionFailure(self.url, f"{what}: {self._association_problem(assoc)}")
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            raise
        else:
            assoc.release()

    def _association_problem(self, assoc) -> str:
        if assoc.is_rejected:
            primitive = getattr(assoc.acceptor, "primitive", None)
            reason = getattr(primitive, "reason_str", None) or "no reason given"
            return (f"association rejected by the PACS ({reason}); check the called AE title {self.called_aet!r} "
                    f"and that the PACS knows the calling AE title {self.calling_aet!r} from this host")
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout):
                pass
        except ConnectionRefusedError:
            return "cannot connect: connection refused (is the PACS's DICOM port right?)"
        except TimeoutError:
            return f"cannot connect: no answer within {self.timeout:g} s (timeout)"
        except socket.gaierror:
            return "cannot connect: host name not found"
        except OSError as error:
            return f"cannot connect: {error.strerror or type(error).__name__}"
        return (f"no answer to the association request within {self.timeout:g} s (timeout), or the PACS aborted "
                f"it (is this its DICOM port, is its AE title {self.called_aet!r}, and does it know the calling AE "
                f"title {self.calling_aet!r}?)")

    def _status(self, status, what: str) -> int:
        """The status code of a response; ``DataError`` for none (timeout / abort) or a failure."""
        if status is None or "Status" not in status:
            raise ConnectionFailure(self.url, f"{what}: no answer within {self.timeout:g} s (timeout), or the PACS "
                                      "aborted the association")
        code = int(status.Status)
        if code == 0x0000 or code in PENDING or code == 0xB000:
            return code
        raise DataError(self.url, f"{what}: the PACS answered with status 0x{code:04X} ({_status_text(code)})")

    # ----------------------------------------------------------------------------- C-ECHO

    def echo(self) -> None:
        """C-ECHO: ``DataError`` unless the PACS answers with success."""
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import time

        with self._association([(Verification, None)], "C-ECHO") as assoc:
            self._status(assoc.send_c_echo(), "C-ECHO")

    # ----------------------------------------------------------------------------- C-FIND

    def search_studies(self, filters: Mapping[str, Any] | None = None, *, fields: Iterable[str] = STUDY_FIELDS,
                       limit: int | None = None) -> list[dict[str, Any]]:
        """C-FIND at STUDY level: matching studies as keyword -> value dicts (identifiers included); a
        series attribute as a filter is refused (``study_search_filters``)."""
        return self._find("STUDY", {}, study_search_filters(filters), fields, limit, "study search")

    def search_series(self, study_uid: str, filters: Mapping[str, Any] | None = None, *,
                      fields: Iterable[str] = SERIES_FIELDS, limit: int | None = None) -> list[dict[str, Any]]:
        """C-FIND at SERIES level within one study (Study Root needs the study UID)."""
        keys = {"StudyInstanceUID": _uid(study_uid)}
        return self._find("SERIES", keys, filters, fields, limit, "series search")

    def search_instances(self, study_uid: str, series_uid: str, filters: Mapping[str, Any] | None = None, *,
                         fields: Iterable[str] = ("SOPInstanceUID", "SOPClassUID"),
                         limit: int | None = None) -> list[dict[str, Any]]:
        """C-FIND at IMAGE level within one series."""
        keys = {"StudyInstanceUID": _uid(study_uid), "SeriesInstanceUID": _uid(series_uid)}
        return self._find("IMAGE", keys, filters, fields, limit, "instance search")

    def _find(self, level: str, keys: dict[str, str], filters: Mapping[str, Any] | None, fields: Iterable[str],
              limit: int | None, what: str, assoc=None) -> list[dict[str, Any]]:
        check_paging(limit)
        query = _identifier(level, keys, filters, fields)
        if assoc is None:
            with self._find_association(what) as opened:
                return self._find(level, keys, filters, fields, limit, what, opened)
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import time

        rows = []
        with quiet_pydicom(self.url):  # pydicom's complaints about a value quote it: a UID, a name, an ID
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if self._status(status, what) in PENDING and identifier is not None:
                    rows.append(plain_values(identifier))
        return rows[:limit] if limit is not None else rows

    def _find_association(self, what: str):
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import time

        return self._association([(StudyRootQueryRetrieveInformationModelFind, None)], what)

    # ------------------------------------------------------------- pull source (medvl.clinical.pull)

    def plan_series(self, study_uids: list[str]) -> list[SeriesPlan]:
        """Every series of the studies with the SOP Instance and Class UIDs in each and the number of
        instances the PACS counts in it (C-FIND)."""
        plans = []
        with self._find_association("study listing") as assoc:
            for number, study_uid in enumerate(study_uids, 1):
                series = self._find("SERIES", {"StudyInstanceUID": _uid(study_uid)}, None,
                                    ("SeriesInstanceUID", "SeriesNumber", "Modality", "NumberOfSeriesRelatedInstances"),
                                    None, "series search", assoc)
                if not series:  # the UID is not repeated: UIDs can embed dates
                    given = f"study {number} of {len(study_uids)} given" if len(study_uids) > 1 else "the study given"
                    raise DataError(self.url, f"{given} is not on the server (C-FIND lists no series for its UID)")
                for item in sorted((s for s in series if s.get("SeriesInstanceUID")), key=series_order):
                    series_uid = str(item["SeriesInstanceUID"])
                    instances = self._find("IMAGE", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid},
                                           None, ("SOPInstanceUID", "SOPClassUID"), None, "instance search", assoc)
                    plans.append(SeriesPlan(
                        study_uid, series_uid, item.get("Modality"), as_int(item.get("SeriesNumber")),
                        list(dict.fromkeys(str(i["SOPInstanceUID"]) for i in instances if i.get("SOPInstanceUID"))),
                        sop_classes={str(i["SOPClassUID"]) for i in instances if i.get("SOPClassUID")},
                        expected=instance_count(item.get("NumberOfSeriesRelatedInstances"))))
        return plans

    def fetch_series(self, plan: SeriesPlan, missing: list[str]) -> Generator[IO[bytes], None, None]:
        """The whole series (none of it here yet) or only the missing instances, by C-GET or C-MOVE."""
        keys = {"StudyInstanceUID": plan.study_uid, "SeriesInstanceUID": plan.series_uid}
        if len(missing) == len(plan.instances):
            identifiers = [_identifier("SERIES", keys, None, ())]
        else:
            identifiers = [_identifier("IMAGE", {**keys, "SOPInstanceUID": sop}, None, ()) for sop in missing]
        inbox = _Inbox(set(missing))
        # pydicom complains, quoting it, about a UID outside its VR's rules while pynetdicom encodes the
        # requests (worker thread) and decodes the C-STORE requests (its own threads): its logger level and
        # Python's warning filters are process-wide, so this covers every thread of the retrieval
        with quiet_pydicom(self.url):
            if self.retrieve == "get":
                yield from self._get(identifiers, plan.sop_classes, inbox, _retrieval_name("C-GET", plan))
            else:
                yield from self._move(identifiers, plan.sop_classes, inbox, _retrieval_name("C-MOVE", plan))

    # ------------------------------------------------------------------------ C-GET / C-MOVE

    def _get(self, identifiers: list, sop_classes: set[str], inbox: _Inbox, what: str) -> Iterator[IO[bytes]]:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import time

        contexts = _storage_contexts(sop_classes)
        roles = [build_role(uid, scp_role=True) for uid in dict.fromkeys(uid for uid, _ in contexts)]
        with self._association([(Get, None), *contexts], "C-GET", roles,
                               [(evt.EVT_C_STORE, inbox.on_store)]) as assoc:
            requests = (assoc.send_c_get(identifier, Get) for identifier in identifiers)
            yield from self._run(assoc, requests, inbox, what)

    def _move(self, identifiers: list, sop_classes: set[str], inbox: _Inbox, what: str) -> Iterator[IO[bytes]]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as Move  # type: ignore[attr-defined]  # pynetdicom creates its SOP classes at import time

        self._start_storage_server()
        self._accept_sop_classes(sop_classes)
        self._inbox = inbox
        try:
            with self._association([(Move, None)], "C-MOVE") as assoc:
                requests = (assoc.send_c_move(identifier, self.calling_aet, Move) for identifier in identifiers)
                yield from self._run(assoc, requests, inbox, what)
        finally:
            self._inbox = None

    def _accept_sop_classes(self, sop_classes: set[str]) -> None:
        """Add to the running storage SCP the SOP classes C-FIND listed for a series that it does not
        accept yet (a private class): each new association the PACS opens to store reads the list."""
        from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context

        server = self._storage_server
        if server is None:
            return
        new = sorted(sop_classes - {str(context.abstract_syntax) for context in server.contexts})
        _register_storage(new)
        server.contexts.extend(build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in new)

    def _start_storage_server(self) -> None:
        """The C-MOVE storage SCP, started on first use and kept until ``close()``: it accepts every
        storage SOP class (``storage_sop_classes``) in every transfer syntax."""
        if self._storage_server is not None:
            return
        if self.move_port is None:  # __init__ refuses retrieve="move" without a port
            raise InputError("C-MOVE needs the port medvl listens on (move_port / --move-port)")
        from pynetdicom import evt

        ae = self._application_entity()
        ae.require_called_aet = True  # the PACS must address the stores to us
        for context in _accepted_storage_contexts():
            ae.add_supported_context(context.abstract_syntax, context.transfer_syntax)
        try:
            self._storage_server = ae.start_server((self.move_bind, int(self.move_port)), block=False,
                                                   evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        except OSError as error:
            raise DataError(self.url, f"C-MOVE: cannot listen on port {self.move_port} for the instances "
                                      f"({error.strerror or type(error).__name__})") from None

    def _on_store(self, event) -> int:
        inbox = self._inbox
        return inbox.on_store(event) if inbox is not None else NOT_ASKED_FOR

    def _run(self, assoc, requests: Iterator, inbox: _Inbox, what: str) -> Iterator[IO[bytes]]:
        """Send the retrieve requests on a worker thread while this one hands over what arrives."""
        worker = threading.Thread(target=self._send_all, args=(requests, inbox, what), daemon=True,
                                  name=f"medvl-{what}")
        worker.start()
        try:
            yield from inbox.received(worker)
            if inbox.error is not None:
                raise inbox.error
            if inbox.refused:
                log.warning("%s: refused %d instance(s) the PACS sent without being asked for", self.url,
                            inbox.refused)
        finally:
            inbox.close()
            if worker.is_alive():  # stopped early (limit, error): end the retrieval; the worker then
                assoc.abort()      # stops on its own (it may sit out its DIMSE timeout: do not wait)

    def _send_all(self, requests: Iterator, inbox: _Inbox, what: str) -> None:
        try:
            for responses in requests:
                final = None
                for status, _ in responses:
                    if self._status(status, what) not in PENDING:
                        final = status
                self._check_final(final, what)
                if inbox.closed.is_set():
                    return
        except DataError as error:
            inbox.error = error
        except Exception as error:  # noqa: BLE001 - reported in the pulling thread
            inbox.error = DataError(self.url, f"{what} failed ({type(error).__name__})")
        finally:
            inbox.finish()

    def _check_final(self, status, what: str) -> None:
        code = int(status.Status) if status is not None and "Status" in status else None
        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0) if status is not None else 0
        if code == 0xA801:
            raise DataError(self.url, f"{what}: the PACS does not know the move destination {self.calling_aet!r} "
                                      f"(register AE title {self.calling_aet} with this host and port "
                                      f"{self.move_port} on the PACS)")
        if code == 0xB000 or failed:
            raise DataError(self.url, f"{what}: the PACS could not send {failed or 'some'} instance(s) (status "
                                      f"0x{code or 0:04X}); rerun to retry the missing ones")


class _Inbox:
    """Instances stored by the PACS (a C-STORE handler on pynetdicom's thread), handed one at a time
    to the pulling thread through a bounded queue; ``None`` in the queue marks the end."""

    def __init__(self, expected: set[str]):
        self.expected = expected
        self.queue: queue.Queue = queue.Queue(maxsize=INBOX_SIZE)
        self.closed = threading.Event()
        self.error: DataError | None = None
        self.refused = 0

    def on_store(self, event) -> int:
        if str(event.request.AffectedSOPInstanceUID) not in self.expected:
            self.refused += 1
            return NOT_ASKED_FOR
        body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        body.write(event.encoded_dataset())
        body.seek(0)
        return 0x0000 if self._put(body) else OUT_OF_RESOURCES

    def _put(self, item) -> bool:
        while not self.closed.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        if item is not None:
            item.close()
        return False

    def finish(self) -> None:
        self._put(None)

    def received(self, worker: threading.Thread) -> Iterator[IO[bytes]]:
        while True:
            try:
                body = self.queue.get(timeout=0.2)
            except queue.Empty:
                if worker.is_alive():
                    continue
                return
            if body is None:
                return
            with body:
                yield body

    def close(self) -> None:
        self.closed.set()
        while True:
            try:
                body = self.queue.get_nowait()
            except queue.Empty:
                return
            if body is not None:
                body.close()


# ---------------------------------------------------------------------------------- helpers


def _uid(uid: str | None) -> str:
    text = str(uid or "").strip()
    if not text:
        raise InputError("a UID is required")
    return text


def _identifier(level: str, keys: Mapping[str, str], filters: Mapping[str, Any] | None, fields: Iterable[str]):
    """A query / retrieve identifier: the level, unique keys, match values (checked as for QIDO-RS:
    ``medvl.clinical.pacs.search_filters``), empty return keys (a sequence's left out). InputError
    for a value its VR cannot encode."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset

    identifier = Dataset()
    values = {keyword_or_tag(f): "" for f in fields}
    values.update(search_filters(filters))
    values.update(keys)
    if not all(str(value).isascii() for value in values.values()):
        identifier.SpecificCharacterSet = UTF8  # else pydicom sends '?' (a wildcard) for what it cannot encode
    identifier.QueryRetrieveLevel = level
    # pydicom warns, quoting it, about a value outside its VR's rules (a name, an ID): kept out of logs
    with quiet_pydicom("search identifier"):
        for name, value in values.items():
            tag = tag_for_keyword(name)
            tag, vr = (tag if tag is not None else int(name, 16)), filter_vr(name)
            if vr != "SQ":  # a sequence as a return key is left out; as a match key search_filters refused it
                identifier.add_new(tag, vr, _typed(value, vr))
                _check_encodable(identifier[tag], name, identifier.get("SpecificCharacterSet", "ISO_IR 6"))
    return identifier


def _typed(value: str, vr: str) -> Any:
    """A match value as pydicom holds it for its VR: binary numbers as numbers, anything else as text."""
    if value and vr in INTEGER_RANGES:
        return int(value)
    if value and vr in ("FL", "FD"):
        return float(value)
    return value


def _check_encodable(element, name: str, charset: str = "ISO_IR 6") -> None:
    """InputError naming the attribute (never the value) when ``element`` of an identifier cannot be
    encoded in ``charset`` (the identifier's Specific Character Set): C-FIND would fail on the whole
    identifier without saying which, or pydicom would put ``?`` (a wildcard) in place of each letter it
    cannot encode, warning only, and the search would match other patients."""
    from pydicom.charset import convert_encodings
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    encodings = convert_encodings(charset)
    for little_endian, implicit in ((True, True), (True, False)):
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = little_endian, implicit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # "using replacement characters": the value would not go out as given
                write_data_element(buffer, element, encodings)
        except Exception:  # noqa: BLE001 - pydicom raises several types for a value its VR cannot hold
            raise InputError(f"search filter {name}: the value cannot be sent as a DICOM {element.VR} value "
                             f"in character set {charset}") from None


def plain_values(identifier) -> dict[str, Any]:
    """A C-FIND response identifier as keyword -> plain value (as ``from_dicom_json`` gives for DICOMweb)."""
    from pydicom.multival import MultiValue

    result: dict[str, Any] = {}
    for element in identifier:
        name = element.keyword or f"{element.tag:08X}"
        if name in RESPONSE_ONLY or element.VR == "SQ":
            continue
        values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
        values = [_plain(v, element.VR) for v in values if v not in (None, "")]
        result[name] = None if not values else values[0] if len(values) == 1 else values
    return result


def _plain(value: Any, vr: str) -> Any:
    if vr == "IS":
        return as_int(value)
    if vr == "DS":
        return float(value)
    return value if isinstance(value, int | float) else str(value)


def _storage_contexts(sop_classes: set[str]) -> list[tuple[str, list[str]]]:
    """C-GET storage contexts: each SOP class once per transfer syntax (the PACS picks the stored
    one); without SOP classes from C-FIND, pynetdicom's common storage classes (default syntaxes)."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES, StoragePresentationContexts

    room = MAX_CONTEXTS - 1  # one is the C-GET context itself
    if not sop_classes:
        return [(c.abstract_syntax, list(DEFAULT_TRANSFER_SYNTAXES)) for c in StoragePresentationContexts[:room]
                if c.abstract_syntax is not None]
    per_class = min(len(ALL_TRANSFER_SYNTAXES), room // len(sop_classes))
    if per_class < 2:
        raise DataError(None, f"a series with {len(sop_classes)} SOP classes cannot be fetched with C-GET in one "
                              "association; use C-MOVE")
    return [(uid, [syntax]) for uid in sorted(sop_classes) for syntax in ALL_TRANSFER_SYNTAXES[:per_class]]


def _accepted_storage_contexts():
    """What the C-MOVE storage SCP accepts: every storage SOP class in every transfer syntax."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context

    classes = storage_sop_classes()
    _register_storage(classes)
    return [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in classes]


def _register_storage(uids: Iterable[str]) -> None:
    """Have pynetdicom handle a C-STORE of the SOP classes ``uids`` it has no service for (retired and
    private storage classes) with its storage service, through its own ``register_uid``: an SCP
    context alone is not enough, it aborts the association on a C-STORE of a class it does not know."""
    from pynetdicom import register_uid
    from pynetdicom.service_class import ServiceClass, StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    for uid in uids:
        if uid_to_service_class(uid) is ServiceClass:
            register_uid(uid, "MedvlStorage_" + uid.replace(".", "_"), StorageServiceClass)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class UID: pynetdicom's storage classes, and the ones pydicom's UID dictionary
    lists beyond them, retired ones included (Ultrasound Image Storage and Nuclear Medicine Image
    Storage of 1993, which legacy archives still hold: without them the PACS can find no presentation
    context to send such a series, and the C-MOVE fails as a whole). Storage Commitment and the
    DICOMDIR's Media Storage Directory are other services, not instances."""
    from pydicom._uid_dict import UID_dictionary
    from pynetdicom import AllStoragePresentationContexts

    classes = [str(c.abstract_syntax) for c in AllStoragePresentationContexts if c.abstract_syntax is not None]
    classes += [uid for uid, (name, kind, *_) in UID_dictionary.items()
                if kind == "SOP Class" and "Storage" in name and not name.startswith(NOT_STORED)]
    return list(dict.fromkeys(classes))


def _retrieval_name(what: str, plan: SeriesPlan) -> str:
    """``C-MOVE of series 2 (US, Ultrasound Image Storage (retired))``: which series a failed retrieval
    was for, by the series number and modality (never a UID) and the SOP classes C-FIND listed."""
    from pydicom._uid_dict import UID_dictionary

    names = []
    for uid in sorted(plan.sop_classes):
        name, _, _, retired, *_ = UID_dictionary.get(uid, (uid, "", "", "", ""))
        names.append(f"{name} (retired)" if retired else name)
    parts = [plan.modality or "modality not given", *names]
    number = f"series {plan.number}" if plan.number is not None else "a series without a number"
    return f"{what} of {number} ({', '.join(parts)})"


def _status_text(code: int) -> str:
    if code == 0x0122:
        return "SOP class not supported"
    if code == 0xA801:
        return "move destination unknown"
    if 0xA700 <= code <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= code <= 0xA9FF:
        return "identifier does not match SOP class"
    if code == 0xFE00:
        return "cancelled"
    if 0xC000 <= code <= 0xCFFF:
        return "unable to process"
    return "failure"
