"""The service's outer layer (plain ASGI): request id, token check, rate limit, body limit, one log line.

Checks that need no body run before the body is read, so an unauthenticated or rate-limited client
cannot make the server take in an upload: ``/v1/*`` routes other than ``/v1/health`` need a valid
bearer token (401) within its rate (429); a declared ``Content-Length`` above the upload limit is
refused at once (413) and a streamed (chunked) body is counted and cut off there (413). A route
taking several files (``files_per_route``: ``/v1/vqa``) may carry that many uploads' bytes.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException

from .auth import TokenAuth, retry_after_header

log = logging.getLogger("medvl.serve.requests")

PUBLIC_PATHS = {"/v1/health"}
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the option fields beside the file


def needs_token(method: str, path: str) -> bool:
    """Every ``/v1/`` route but the public ones; not a CORS preflight (``OPTIONS`` carries no token)."""
    return method != "OPTIONS" and path.startswith("/v1/") and path not in PUBLIC_PATHS


class ServiceMiddleware:
    """Request id, auth, rate limit and body limit around the app; logs every request as JSON."""

    def __init__(self, app, auth: TokenAuth | None, max_upload_bytes: int, routes: frozenset[str] = frozenset(),
                 files_per_route: dict[str, int] | None = None):
        # request ids: 16 hex digits, a random prefix per process and a counter (unique without a system
        # call per request; they name log lines, they are no secret)
        prefix = secrets.token_hex(4)
        self._ids = (f"{prefix}{n & 0xFFFFFFFF:08x}" for n in itertools.count())
        self.app = app
        self.auth = auth
        self.max_upload_bytes = max_upload_bytes
        self.files_per_route = dict(files_per_route or {})
        self.routes = routes  # the app's route paths: a log names one of these, never another path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = next(self._ids)
        timings: dict = {}
        scope.setdefault("state", {}).update(request_id=request_id, timings=timings)
        started, status = time.perf_counter(), [500]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            refusal = self._refusal(scope, timings)
            if refusal is not None:
                await _reply(send_with_id, *refusal)
            else:
                await self.app(scope, self._counting(receive, self._body_limit(scope["path"])), send_with_id)
        finally:
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
                        f"{wait:.1f} s", {"Retry-After": retry_after_header(wait)}
                timings["error"] = "unauthorized"
                return 401, "missing or invalid API token (send 'Authorization: Bearer <token>')", \
                    {"WWW-Authenticate": "Bearer"}
            timings["client"] = client[:8]
            wait = self.auth.retry_after(client)
            if wait > 0:
                timings["error"] = "rate_limited"
                return 429, f"rate limit of this token exceeded; retry in {wait:.1f} s", \
                    {"Retry-After": retry_after_header(wait)}
        length, limit = headers.get("content-length"), self._body_limit(scope["path"])
        if length is not None and (not length.isdigit() or int(length) > limit):
            timings["error"] = "too_large"
            return 413, f"request too large: over {limit:,} bytes", {"Connection": "close"}
        return None

    def _body_limit(self, path: str) -> int:
        """Bytes a request body may hold: one upload and the form around it, or several on a route taking several."""
        return self.max_upload_bytes * self.files_per_route.get(path, 1) + FORM_OVERHEAD

    def _counting(self, receive, limit: int):
        """``receive`` that refuses (413) a body growing past the limit, whatever its headers said."""
        received = [0]

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise HTTPException(413, f"request too large: over {limit:,} bytes")
            return message

        return counted

    def _log(self, scope, request_id: str, status: int, started: float, timings: dict) -> None:
        template = getattr(scope.get("route"), "path", None)  # the matched route's template, never the ids in it
        route = template if template in self.routes else scope["path"] if scope["path"] in self.routes else "unknown"
        extra = {"request_id": request_id, "method": scope["method"], "route": route,
                 "status": status, "ms": round((time.perf_counter() - started) * 1000, 2), **timings}
        log.info("request", extra=extra)


async def _reply(send, status: int, reason: str, headers: dict[str, str]) -> None:
    body = json.dumps({"detail": reason}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
