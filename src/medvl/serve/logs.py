"""Structured JSON logs for the service: one JSON object per line on stderr.

A request's line holds its id, method, route (the route template, never a query string), status,
client (first 8 hex digits of the token's digest) and timings in milliseconds (total, decode,
queue, model) with the batch size it ran in. Never pixel data, report or note text, identifiers,
or uploaded files' names: the service only passes these fields, and messages are fixed strings. Any other
record logged while a request is answered carries its id; those of the libraries that read uploads are not
written, but counted in the request's line (``RequestRecords``).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time

# Fields a request log line may carry (``extra=``); anything else on a record is not written.
FIELDS = ("request_id", "method", "route", "status", "client", "ms", "decode_ms", "queue_ms", "model_ms",
          "batch_size", "upload_kind", "upload_bytes", "error", "host", "port", "model", "batching",
          "max_batch", "max_wait_ms", "backend", "http", "loop", "torch_threads", "trusted_proxies", "drained",
          "detail", "connections", "library_messages")
# (request id, timings) of the request being answered: set by ``ServiceMiddleware``, carried to the threads that
# do its work (``run_with_request``)
CURRENT_REQUEST: contextvars.ContextVar[tuple[str, dict] | None] = contextvars.ContextVar("medvl_request",
                                                                                           default=None)
# libraries that read uploads: their messages quote an upload's header values or body bytes
# (nibabel: "vox offset -1e+30 too low ..."; python_multipart: "Expected boundary character 45, got 120 ...")
UPLOAD_READERS = ("nibabel", "python_multipart", "multipart")


async def run_with_request(executor, function, *args):
    """``function(*args)`` on one of ``executor``'s threads in the calling request's context: the records logged
    there carry its id and its upload libraries' messages are counted (``RequestRecords``); ``run_in_executor``
    alone would run it without them (``asyncio.to_thread`` carries the context, but not to a chosen thread)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(executor, context.run, function, *args)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message and the allowed fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        for name in FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__  # the type only: messages may quote values
        return json.dumps(entry, default=str)


class RequestRecords(logging.Filter):
    """A record logged while a request is answered gets its request id (a medvl warning about the upload names its
    request); a record of a library that reads uploads (``UPLOAD_READERS``) is not written, but counted in the
    request's line (``library_messages``): it is about a client's upload, not the server, and it quotes the upload."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = CURRENT_REQUEST.get()
        if record.name.split(".")[0] in UPLOAD_READERS:
            if current is not None:
                current[1]["library_messages"] = current[1].get("library_messages", 0) + 1
            return False
        if current is not None and not hasattr(record, "request_id"):
            record.request_id = current[0]
        return True


def setup_json_logging(level: int = logging.INFO) -> None:
    """Send every log record to stderr as JSON lines; uvicorn's access log is replaced by ours."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestRecords())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("transformers", "httpx", "urllib3", "matplotlib", "PIL", "multipart", "python_multipart", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # nibabel adds a plain-text stderr handler when imported: import it now to take that handler away
        import nibabel  # noqa: F401
    except ImportError:
        pass
    for name in ("uvicorn", "uvicorn.error", "nibabel.global"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
