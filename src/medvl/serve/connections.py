"""The uvicorn server of ``medvl serve``: its HTTP protocol closes a connection whose request headers are not
complete within ``ServeSettings.header_timeout`` seconds.

uvicorn has no such deadline of its own: a client sending half of its headers kept its connection for as long
as it liked, and a thousand of them (one client's work) used up the process's file descriptors, so that nobody
else could connect. The token check and the rate limits run once the headers are complete, and never saw them.
The deadline runs from the connection's opening and again from the end of each answer (the next request's
headers, on a kept-alive connection) until a request's headers are complete. A request's body has its own
deadline (``middleware.ServiceMiddleware``: 408).

Closed connections are logged as one WARNING line (``connections``: how many since the previous line, at most
one line every ``LOG_EVERY_S`` seconds), never with the client's address or anything it sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib.util import find_spec
from typing import Any

import uvicorn

log = logging.getLogger("medvl.serve.connections")

LOG_EVERY_S = 10.0  # a flood of slow connections gives one line per this many seconds, not one per connection


class TimeoutCount:
    """Connections closed for slow headers, logged in one line at most every ``LOG_EVERY_S`` seconds."""

    def __init__(self):
        self.pending = 0  # closed since the last line
        self.last_line = -LOG_EVERY_S
        self.flush_scheduled = False

    def add(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pending += 1
        wait = self.last_line + LOG_EVERY_S - time.monotonic()
        if wait <= 0:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            loop.call_later(wait, self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.pending:
            log.warning("connections closed: request headers not complete in time",
                        extra={"connections": self.pending})
            self.pending, self.last_line = 0, time.monotonic()


class HeaderDeadline:
    """Mixed into uvicorn's HTTP protocol (httptools or h11): a timer runs from the connection's opening, and
    from the end of each answer, until a request's headers are complete (uvicorn then starts a new request
    cycle); when it fires, the connection is closed. It reads ``header_timeout`` and ``timeouts`` from the
    server's config (``ServerConfig``)."""

    config: Any  # a ServerConfig
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any  # uvicorn's request cycle; None before the first request

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not cycle:  # a request's headers are complete: its cycle has begun
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        cycle = self.cycle
        # waiting for the next request, unless a pipelined one (headers complete) has just been started
        if not self.transport.is_closing() and (cycle is None or getattr(cycle, "response_complete", True)):
            self._start_header_timer()

    def _start_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.config.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()
            self.config.timeouts.add(self.loop)


def http_protocol(parser: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with the header deadline; ``parser`` ``auto`` is uvicorn's own choice: httptools
    when installed (``medvl[serve]`` installs it), else h11."""
    if parser == "httptools" or (parser == "auto" and find_spec("httptools")):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        class HttpToolsWithDeadline(HeaderDeadline, HttpToolsProtocol):
            pass

        return HttpToolsWithDeadline
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11WithDeadline(HeaderDeadline, H11Protocol):
        pass

    return H11WithDeadline


class ServerConfig(uvicorn.Config):
    """``uvicorn.Config`` with the header deadline: ``header_timeout`` seconds (``ServeSettings.header_timeout``)."""

    def __init__(self, app, header_timeout: float, http: type[asyncio.Protocol] | None = None, **options):
        super().__init__(app, http=http or http_protocol(), **options)
        self.header_timeout = header_timeout
        self.timeouts = TimeoutCount()


def server_config(app, **options) -> ServerConfig:
    """The uvicorn config serving ``app`` (from ``create_app``) with its settings' header timeout; ``options`` are
    uvicorn's (host, port, log_config, ...)."""
    return ServerConfig(app, header_timeout=app.state.settings.header_timeout, **options)
