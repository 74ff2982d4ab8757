"""The lane for heavy requests (explanations, VQA): one at a time on their own thread, a bounded wait.

An explanation runs a gradient pass per heatmap method and a VQA model (or a transformers VLM
generating text) is far slower than an embedding, so these requests never go through the
micro-batcher nor the model thread: zero-shot, embed and search answers keep flowing while one
runs. The lane computes one request at a time (``max_workers=1``); at most ``max_waiting`` more
wait for it, beyond that the answer is 503 (``ServiceBusy``) at once instead of a queue that
grows without bound. ``close`` lets the running and waiting requests finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .batching import ServiceBusy
from .logs import run_with_request

T = TypeVar("T")


class HeavyLane:
    """One worker thread for heavy requests and a cap on how many may wait for it."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvl-heavy")
        self.pending = 0  # requests computing or waiting on the lane
        self.done = 0  # requests the lane has finished
        self._closing = False

    def check(self) -> None:
        """``ServiceBusy`` when the lane takes no more requests (asked before an upload is decoded)."""
        if self._closing:
            raise ServiceBusy("the service is shutting down; retry on another instance")
        if self.pending > self.max_waiting:  # one computing plus max_waiting waiting
            raise ServiceBusy(f"too many explanation / VQA requests waiting ({self.max_waiting}); retry shortly")

    async def run(self, function: Callable[..., T], *args, timings: dict[str, Any] | None = None) -> T:
        """``function(*args)`` on the lane's thread, or ``ServiceBusy`` when too many wait already;
        ``timings`` gets ``queue_ms`` (waiting for the lane) and ``model_ms`` (computing)."""
        self.check()
        self.pending += 1
        queued = time.perf_counter()
        started = [queued]

        def timed() -> T:
            started[0] = time.perf_counter()
            return function(*args)

        try:
            return await run_with_request(self.thread, timed)  # its log records name the request
        finally:
            self.pending -= 1
            self.done += 1
            if timings is not None:
                timings.update(queue_ms=round((started[0] - queued) * 1000, 2),
                               model_ms=round((time.perf_counter() - started[0]) * 1000, 2))

    def close(self) -> None:
        """Refuse new requests and wait for the running and waiting ones."""
        self._closing = True
        self.thread.shutdown(wait=True)
