"""Dynamic micro-batching: concurrent requests' images share one forward pass.

Requests put their preprocessed pixels (a ``(C, ...)`` tensor) on a queue and await a future. One
worker task takes the first waiting item, gathers more until ``max_batch`` items or ``max_wait_ms``
have passed, stacks them, runs one ``encode`` on the model's own thread, and resolves each future
with its row (``encode`` returns a ``(N, ...)`` tensor, or a tuple of them, e.g. embeddings and OOD
scores: then each request gets a tuple of its rows, from the same pass).

When to stop gathering early: when the queue is empty, no other request is being decoded (see
``incoming``) and the batch already holds as many requests as arrived together lately (the largest
batch of the last ``RECENT_S`` seconds; 1 when idle). So a lone request pays no batching delay, and
under steady load a batch waits (at most ``max_wait_ms``) for the clients its last answers went to:
their next requests are still on the wire or in HTTP parsing, where neither count sees them.

``max_batch=1`` is the unbatched service (one forward pass per request, in arrival order).
``close`` stops taking requests and finishes every queued one before returning (graceful
shutdown drains the queue).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MedvlError

log = logging.getLogger(__name__)
RECENT_S = 1.0  # how far back the batcher looks to tell how many requests arrive together


class ServiceBusy(MedvlError):
    """The queue is full or the service is shutting down (HTTP 503, with ``Retry-After``)."""

    status = 503
    retry_after = 1  # seconds a client waits before asking again (the answer's Retry-After header)


@dataclass
class BatchTiming:
    """How one request's forward pass went: time queued, model time, and the batch it ran in."""

    queue_ms: float
    model_ms: float
    batch_size: int


@dataclass
class _Item:
    pixels: torch.Tensor
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


_STOP = object()


class MicroBatcher:
    """Gathers queued images into batches of at most ``max_batch``, waiting at most ``max_wait_ms``."""

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], executor: Executor,
                 max_batch: int = 16, max_wait_ms: float = 10.0, max_queue: int = 256):
        self.encode = encode
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.batches = 0  # forward passes run
        self.items = 0  # images embedded
        self._queue: asyncio.Queue = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._incoming = 0  # requests decoding an image they will queue
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic time, size) of the batches gathered

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Around a request's decoding and preprocessing: a batch waits for it (up to ``max_wait_ms``)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def expected(self) -> int:
        """How many requests arrive together lately: the largest batch gathered in the last ``RECENT_S``
        seconds (1 when there was none)."""
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > RECENT_S:
            self._recent.popleft()
        return max((size for _, size in self._recent), default=1)

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="medvl-batcher")

    async def embed(self, pixels: torch.Tensor) -> tuple[Any, BatchTiming]:
        """``encode``'s row for one preprocessed image (an array, or a tuple of arrays when ``encode``
        returns a tuple), and how its batch went."""
        if self._closing or self._worker is None:
            raise ServiceBusy("the service is shutting down; retry on another instance")
        if self._queue.qsize() >= self.max_queue:
            raise ServiceBusy(f"too many images waiting for the model ({self.max_queue}); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(pixels, future))
        return await future

    async def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        self._queue.put_nowait(_STOP)
        await self._worker
        self._worker = None

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch, stopping = await self._gather(first)
            self._recent.append((time.monotonic(), len(batch)))
            await self._forward(batch)
        log.info("micro-batcher stopped", extra={"drained": self.items})

    async def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        """``first`` and what else arrives within ``max_wait`` (up to ``max_batch``); True if told to stop."""
        batch = [first]
        deadline = asyncio.get_running_loop().time() + self.max_wait
        expected = self.expected()
        while len(batch) < self.max_batch:
            if self._queue.empty() and not self._incoming and len(batch) >= expected:
                break  # nobody else is on the way: waiting would only add latency
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(
                    self._queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    async def _forward(self, batch: list[_Item]) -> None:
        """One forward pass per pixel shape in ``batch`` (one, for a 2D model); futures resolved."""
        live = [item for item in batch if not item.future.done()]  # a client gone away is skipped
        by_shape: dict[tuple, list[_Item]] = {}
        for item in live:
            by_shape.setdefault(tuple(item.pixels.shape), []).append(item)
        for items in by_shape.values():
            await self._forward_group(items)

    async def _forward_group(self, items: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.encode, torch.stack([item.pixels for item in items]))
        except Exception as error:  # noqa: BLE001 - every waiting request hears of it
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        model_ms = (time.perf_counter() - started) * 1000
        self.batches += 1
        self.items += len(items)
        rows: list[Any] = (list(zip(*(output.numpy() for output in outputs), strict=True))
                           if isinstance(outputs, tuple) else list(outputs.numpy()))
        for item, row in zip(items, rows, strict=True):
            if not item.future.done():
                timing = BatchTiming((started - item.queued) * 1000, model_ms, len(items))
                item.future.set_result((row, timing))
