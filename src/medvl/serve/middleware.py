"""The service's outer layer (plain ASGI): request id, token check, rate limit, body limit, UTF-8 form
text, one log line.

Checks that need no body run before the body is read, so an unauthenticated or rate-limited client
cannot make the server take in an upload: ``/v1/*`` routes other than ``/v1/health`` need a valid
bearer token (401) within its rate (429); a declared ``Content-Length`` above the upload limit is
refused at once (413) and a streamed (chunked) body is counted and cut off there (413). A route
taking several files (``files_per_route``: ``/v1/vqa``) may carry that many uploads' bytes. A form
text field that is not UTF-8 is refused (422) as the body streams in, and a multipart body that ends before its
closing boundary (400: Starlette would drop its last part) when it ends (``form_text_checked``); a multipart
boundary longer than the parser takes (400, ``boundary_refusal``), a form declaring a charset other than UTF-8
(415, ``charset_refusal``) and a POST body that is not a form, JSON say (415, ``form_kind_refusal``) are refused
before the body is read.

Bodies are held in memory, so the bytes of all bodies in flight are bounded (``BodyBudget``): a request
whose ``Content-Length`` would take them over the budget is refused at once (503 with ``Retry-After``),
and a chunked body is counted as it streams in (503 once it would). A body must arrive within
``body_timeout`` seconds plus one per ``min_body_rate`` bytes received, else 408 and the connection is
closed (a client trickling a body in would otherwise hold its share of the budget for ever).
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, QuerystringParser, parse_options_header
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from .auth import TokenAuth, retry_after_header
from .logs import CURRENT_REQUEST
from .settings import FORM_OVERHEAD, MIB
from .uploads import too_large_text

log = logging.getLogger("medvl.serve.requests")

PUBLIC_PATHS = {"/v1/health"}
# on every answer: no MIME sniffing, no referrer, never inside another site's frame (clickjacking)
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
BUSY_RETRY_AFTER_S = 2  # when a client refused for the bodies in flight may try again
INTERNAL_ERROR = "internal error; the request id (X-Request-ID) names it in the service log"


def needs_token(method: str, path: str) -> bool:
    """Every ``/v1/`` route but the public ones; not a CORS preflight (``OPTIONS`` carries no token)."""
    return method != "OPTIONS" and path.startswith("/v1/") and path not in PUBLIC_PATHS


class ServiceMiddleware:
    """Request id, auth, rate limit and body limit around the app; logs every request as JSON."""

    def __init__(self, app, auth: TokenAuth | None, max_upload_bytes: int, routes: frozenset[str] = frozenset(),
                 files_per_route: dict[str, int] | None = None, inflight_bytes: int | None = None,
                 body_timeout: float | None = None, min_body_rate: int = 64 * 1024):
        # request ids: 16 hex digits, a random prefix per process and a counter (unique without a system
        # call per request; they name log lines, they are no secret)
        prefix = secrets.token_hex(4)
        self._ids = (f"{prefix}{n & 0xFFFFFFFF:08x}" for n in itertools.count())
        self.app = app
        self.auth = auth
        self.max_upload_bytes = max_upload_bytes
        self.files_per_route = files_per_route if files_per_route is not None else {}  # the app may update it
        self.routes = routes  # the app's route paths: a log names one of these, never another path
        self.budget = BodyBudget(inflight_bytes)  # None: no bound
        self.body_timeout, self.min_body_rate = body_timeout, min_body_rate  # None: no body deadline

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = next(self._ids)
        timings: dict = {}
        scope.setdefault("state", {}).update(request_id=request_id, timings=timings)
        CURRENT_REQUEST.set((request_id, timings))  # for the log records of the request's work (logs.RequestRecords)
        started, status, answering = time.perf_counter(), [500], [False]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0], answering[0] = message["status"], True
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if scope["path"].startswith("/v1/"):  # answers hold patient data: never kept by a cache
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        held = self.budget.hold()
        try:
            refusal = self._refusal(scope, timings) or self._busy(scope, held, timings)
            if refusal is not None:
                await _reply(send_with_id, *refusal)
            else:
                counted = self._counting(receive, self._body_limit(scope["path"]), scope["path"], held)
                await self.app(scope, form_text_checked(counted, Headers(scope=scope).get("content-type")),
                               send_with_id)
        except Exception as error:
            if answering[0]:  # the answer was under way: nothing else can be sent
                raise
            # answered here, not by Starlette's outermost handler: the 500 gets the request id and the headers
            # of every answer, and the connection is kept (Starlette re-raises, and uvicorn closes it)
            timings["error"] = type(error).__name__
            log.error("unexpected error", extra={"request_id": request_id, "error": type(error).__name__})
            await _reply(send_with_id, 500, INTERNAL_ERROR, {})
        finally:
            held.release()
            self._log(scope, request_id, status[0], started, timings)

    def _refusal(self, scope, timings: dict) -> tuple[int, str, dict[str, str]] | None:
        """(status, reason, headers) when the request is refused before its body is read."""
        headers = Headers(scope=scope)
        if self.auth is not None and needs_token(scope["method"], scope["path"]):
            client = self.auth.client(headers.get("authorization"))
            if client is None:
                address = (scope.get("client") or ("unknown",))[0]
                wait = self.auth.failure_retry_after(str(address))
                if wait > 0:
                    timings["error"] = "auth_rate_limited"
                    return 429, f"too many requests without a valid API token from this address; retry in " \
                        f"{retry_after_header(wait)} s", {"Retry-After": retry_after_header(wait)}
                timings["error"] = "unauthorized"
                return 401, "missing or invalid API token (send 'Authorization: Bearer <token>')", \
                    {"WWW-Authenticate": "Bearer"}
            timings["client"] = client[:8]
            wait = self.auth.retry_after(client)
            if wait > 0:
                timings["error"] = "rate_limited"
                return 429, f"rate limit of this token exceeded; retry in {retry_after_header(wait)} s", \
                    {"Retry-After": retry_after_header(wait)}
        boundary_problem = boundary_refusal(headers.get("content-type"))
        if boundary_problem is not None:
            timings["error"] = "invalid_boundary"
            return 400, boundary_problem, {}
        charset_problem = charset_refusal(headers.get("content-type"))
        if charset_problem is not None:
            timings["error"] = "form_charset"
            return 415, charset_problem, {}
        length, limit = headers.get("content-length"), self._body_limit(scope["path"])
        if length is not None and (not length.isdigit() or int(length) > limit):
            timings["error"] = "too_large"
            return 413, self._too_large(scope["path"]), {"Connection": "close"}
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        kind_problem = form_kind_refusal(scope["method"], scope["path"], headers.get("content-type"), has_body)
        if kind_problem is not None:
            timings["error"] = "not_a_form"
            return 415, kind_problem, {}
        return None

    def _body_limit(self, path: str) -> int:
        """Bytes a request body may hold: one upload and the form around it, or several on a route taking several."""
        return self.max_upload_bytes * self.files_per_route.get(path, 1) + FORM_OVERHEAD

    def _too_large(self, path: str) -> str:
        """The refusal names the configured upload limit (as a file over it is refused), not the body limit
        with the form's allowance added."""
        return too_large_text(self.max_upload_bytes, self.files_per_route.get(path, 1))

    def _busy(self, scope, held: BodyHold, timings: dict) -> tuple[int, str, dict[str, str]] | None:
        """503 when the declared body does not fit in what is left of the in-flight budget; else it is held."""
        length = Headers(scope=scope).get("content-length")  # digits: _refusal refused any other value
        if length is None or held.take(int(length)):
            return None
        timings["error"] = "uploads_in_flight"
        return 503, self._busy_text(), {"Retry-After": str(BUSY_RETRY_AFTER_S)}

    def _busy_text(self) -> str:
        limit = (self.budget.limit or 0) / MIB
        return f"too many uploads in flight (the service takes in {limit:.1f} MiB of request bodies at once); " \
               f"retry in {BUSY_RETRY_AFTER_S} s"

    def _counting(self, receive, limit: int, path: str, held: BodyHold):
        """``receive`` that refuses a body growing past the limit, whatever its headers said (413), a chunked body
        growing past what is left of the in-flight budget (503), and a body arriving too slowly (408)."""
        received, started, complete = [0], time.monotonic(), [False]

        async def counted():
            if complete[0] or self.body_timeout is None:
                message = await receive()
            else:  # the body's deadline moves on by a second per min_body_rate bytes received
                allowed = self.body_timeout + received[0] / self.min_body_rate - (time.monotonic() - started)
                try:
                    message = await asyncio.wait_for(receive(), timeout=max(allowed, 0.0))
                except TimeoutError:
                    raise HTTPException(408, f"the request body did not arrive in time (it gets "
                                             f"{self.body_timeout:g} s and one more per "
                                             f"{self.min_body_rate // 1024} KiB received)",
                                        headers={"Connection": "close"}) from None
            if message["type"] != "http.request":
                complete[0] = True
                return message
            received[0] += len(message.get("body", b""))
            complete[0] = not message.get("more_body", False)
            if received[0] > limit:
                raise HTTPException(413, self._too_large(path))
            if not held.take(received[0] - held.bytes):  # a chunked body: counted as it arrives
                raise HTTPException(503, self._busy_text(), headers={"Retry-After": str(BUSY_RETRY_AFTER_S),
                                                                    "Connection": "close"})
            return message

        return counted

    def _log(self, scope, request_id: str, status: int, started: float, timings: dict) -> None:
        template = getattr(scope.get("route"), "path", None)  # the matched route's template, never the ids in it
        route = template if template in self.routes else scope["path"] if scope["path"] in self.routes else "unknown"
        extra = {"request_id": request_id, "method": scope["method"], "route": route,
                 "status": status, "ms": round((time.perf_counter() - started) * 1000, 2), **timings}
        log.info("request", extra=extra)


class BodyBudget:
    """The bytes of request bodies in flight, all requests together, kept within ``limit`` (None: no bound)."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.used = 0

    def hold(self) -> BodyHold:
        """One request's share, empty at first; released when the request ends."""
        return BodyHold(self)


class BodyHold:
    """What one request holds of a ``BodyBudget``."""

    def __init__(self, budget: BodyBudget):
        self.budget = budget
        self.bytes = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes if they fit in the budget (a size of 0 or less always fits)."""
        if size <= 0:
            return True
        if self.budget.limit is not None and self.budget.used + size > self.budget.limit:
            return False
        self.budget.used += size
        self.bytes += size
        return True

    def release(self) -> None:
        self.budget.used -= self.bytes
        self.bytes = 0


def form_text_checked(receive, content_type: str | None):
    """``receive`` that refuses (422) a form whose text fields are not UTF-8, naming the field, (413) one with a
    text field over ``TEXT_PART_LIMIT`` (Starlette's own refusal of it is a 400) and (400) a multipart body that
    ends before its closing boundary (Starlette drops its last part, so a filter or a count sent last vanished).
    A boundary the parser refuses, and a charset other than UTF-8, were refused before (``boundary_refusal``,
    ``charset_refusal``).

    Starlette reads such a field as Latin-1 without a word (``labels`` of bytes ``ff fe`` become "ÿþ"), so
    the body is followed as it streams in: the text parts of a ``multipart/form-data`` body (file parts
    are passed over; only their boundaries are looked for) and the percent-decoded values of an
    ``application/x-www-form-urlencoded`` one. Starlette reads the bytes of an urlencoded body that are not ASCII
    as Latin-1 too (``curl -d text=é`` sends them unescaped), but its percent escapes as UTF-8: they are escaped
    (``percent_escaped``) before the follower and the app see them, so the app reads the UTF-8 text the follower
    checked. A body the follower cannot parse is left to the app, whose own parser reports it."""
    if content_type is None:
        return receive
    kind, options = parse_options_header(content_type)
    if kind == b"multipart/form-data" and options.get(b"boundary"):
        follower: _MultipartText | _UrlencodedText = _MultipartText(options[b"boundary"])  # checked: boundary_refusal
        given: Callable[[bytes], bytes] = bytes  # the body as it came
    elif kind == b"application/x-www-form-urlencoded":
        follower, given = _UrlencodedText(), percent_escaped
    else:
        return receive

    async def checked():
        message = await receive()
        if message["type"] == "http.request":
            body = given(message.get("body", b""))
            follower.write(body)
            if not message.get("more_body", False):
                follower.finish()
            if follower.bad is not None:
                raise HTTPException(422, f"form field {follower.bad[:64]!r} is not UTF-8 text")
            if follower.too_large is not None:  # Starlette would answer 400 for it
                raise HTTPException(413, f"form field {follower.too_large[:64]!r} is over {TEXT_PART_LIMIT:,} bytes: "
                                         "a text field (labels, a question, a report) is short")
            if getattr(follower, "truncated", False):  # Starlette would drop the last part without a word
                raise HTTPException(400, "the multipart body ends before its closing boundary (truncated)")
            message = {**message, "body": body}
        return message

    return checked


_NOT_ASCII = re.compile(rb"[\x80-\xff]")


def percent_escaped(body: bytes) -> bytes:
    """An urlencoded body with each byte that is not ASCII written as its percent escape (the bytes c3 a9 of "é"
    as ``%C3%A9``, as a browser sends them): the same fields, which Starlette then reads as UTF-8. Byte by byte, so a
    body cut anywhere into chunks is escaped chunk by chunk."""
    return _NOT_ASCII.sub(lambda byte: b"%%%02X" % byte[0][0], body)


def boundary_refusal(content_type: str | None) -> str | None:
    """Why the multipart parser refuses the boundary of ``content_type`` (python-multipart takes at most 256 bytes;
    RFC 2046 allows 70), or None. Refused (400) before the body is read: the form's text follower builds a parser
    on it too, and its error was answered 500."""
    if content_type is None:
        return None
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        return None
    try:
        MultipartParser(options[b"boundary"])
    except FormParserError as error:
        return f"invalid multipart boundary ({error})"
    return None


FORM_KINDS = (b"multipart/form-data", b"application/x-www-form-urlencoded")


def form_kind_refusal(method: str, path: str, content_type: str | None, has_body: bool = False) -> str | None:
    """Why a ``POST`` to a ``/v1/`` route is refused (415) for a body that is not a form, or None: every one takes
    a form, and Starlette reads another body (JSON), or a body without a Content-Type (``has_body``: a
    Content-Length above 0 or a Transfer-Encoding; ``requests.post(url, data=json.dumps(...))`` sends one), as an
    empty form, answered with a 422 about a missing field ("give exactly one query") that says nothing of the
    body's kind. A request without a Content-Type or a body is left to the route (its missing fields are named)."""
    if method != "POST" or not path.startswith("/v1/") or (content_type is None and not has_body):
        return None
    kind = parse_options_header(content_type)[0] if content_type is not None else None
    if kind in FORM_KINDS:
        return None
    shown = repr(kind.decode("latin-1")[:60]) if kind else "an empty one" if kind is not None else "none"
    return (f"the body must be a form (Content-Type multipart/form-data, or application/x-www-form-urlencoded for "
            f"a request without files), not {shown}: the routes take no JSON")


def charset_refusal(content_type: str | None) -> str | None:
    """Why a form declaring a charset other than UTF-8 is refused (415), or None: Starlette decodes a multipart
    body's text fields and field names with that charset (UTF-8 checked, then read as Latin-1, or ``text`` as the
    UTF-16 "整瑸"), so form text is UTF-8, declared or not."""
    if content_type is None:
        return None
    kind, options = parse_options_header(content_type)
    charset = options.get(b"charset")
    if kind not in FORM_KINDS or charset is None:
        return None
    name = charset.decode("latin-1")
    try:
        if codecs.lookup(name).name == "utf-8":
            return None
    except LookupError:
        pass
    return f"form text must be UTF-8: the Content-Type declares charset {name[:40]!r}"


TEXT_PART_LIMIT = 1024 * 1024  # starlette refuses a text part over 1 MiB; no more of one is kept here


class _MultipartText:
    """The text parts of a multipart body, checked for UTF-8 as each ends (``bad``: the first failing field)."""

    def __init__(self, boundary: bytes):
        self.bad: str | None = None
        self.too_large: str | None = None  # the first text field over TEXT_PART_LIMIT
        self.truncated = False  # the body ended before its closing boundary
        self._broken = False
        self._written = False
        self._header = [bytearray(), bytearray()]  # the header being read: name, value
        self._disposition = b""
        self._field: str | None = None  # the text field being read; None in a file part
        self._data: bytearray | None = bytearray()  # None once a part is over TEXT_PART_LIMIT
        self._parser = MultipartParser(boundary, callbacks={
            "on_header_field": lambda data, start, end: self._header[0].extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header[1].extend(data[start:end]),
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data, "on_part_end": self._part_end})

    def write(self, chunk: bytes) -> None:
        if self._broken or self.bad is not None or not chunk:
            return
        self._written = True
        try:
            self._parser.write(chunk)
        except Exception:  # noqa: BLE001 - a malformed body is the app's parser's to report
            self._broken = True

    def finish(self) -> None:
        """Every part was checked as it ended; the body must have reached its closing boundary (an empty body is
        left to the app: it sent no field that could be dropped)."""
        self.truncated = self._written and not self._broken and self.bad is None \
            and self._parser.state != MultipartState.END

    def _header_end(self) -> None:
        if bytes(self._header[0]).lower() == b"content-disposition":
            self._disposition = bytes(self._header[1])
        self._header = [bytearray(), bytearray()]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._field = None if b"filename" in options else options.get(b"name", b"").decode("latin-1")
        self._disposition, self._data = b"", bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._field is not None and self._data is not None:
            self._data.extend(data[start:end])
            if len(self._data) > TEXT_PART_LIMIT:  # refused (413); a cut would misread it
                self._data = None
                self.too_large = self.too_large or self._field

    def _part_end(self) -> None:
        if self._field is not None and self._data is not None and self.bad is None and not _is_utf8(bytes(self._data)):
            self.bad = self._field
        self._field, self._data = None, bytearray()


class _UrlencodedText:
    """The fields of a (percent-escaped) urlencoded body, read by the parser Starlette reads them with: each field's
    name and value counted together as they stream in, as Starlette counts them (``too_large``: the first over
    TEXT_PART_LIMIT), and percent-decoded and checked for UTF-8 as each ends (``bad``: the first failing field)."""

    def __init__(self):
        self.bad: str | None = None
        self.too_large: str | None = None
        self._field = [bytearray(), bytearray()]  # the field being read: name, value (as sent, percent escapes)
        self._parser = QuerystringParser(callbacks={
            "on_field_start": self._field_start,
            "on_field_name": lambda data, start, end: self._extend(0, data[start:end]),
            "on_field_data": lambda data, start, end: self._extend(1, data[start:end]),
            "on_field_end": self._field_end})

    def write(self, chunk: bytes) -> None:
        if self.bad is None and self.too_large is None and chunk:
            self._parser.write(chunk)

    def finish(self) -> None:
        if self.bad is None and self.too_large is None:
            self._parser.finalize()

    def _field_start(self) -> None:
        self._field = [bytearray(), bytearray()]

    def _extend(self, part: int, data: bytes) -> None:
        if self.too_large is not None:
            return
        if len(self._field[0]) + len(self._field[1]) + len(data) > TEXT_PART_LIMIT:  # refused (413); no more kept
            self.too_large = _decoded(self._field[0]).decode("utf-8", "replace")
            return
        self._field[part].extend(data)

    def _field_end(self) -> None:
        name, value = (_decoded(raw) for raw in self._field)
        if self.too_large is None and self.bad is None and not (_is_utf8(name) and _is_utf8(value)):
            self.bad = name.decode("latin-1")


def _decoded(raw: bytes | bytearray) -> bytes:
    """A name or value of an urlencoded body, percent-decoded (``+`` is a space)."""
    return unquote_to_bytes(bytes(raw).replace(b"+", b" "))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _reply(send, status: int, reason: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": reason}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
