"""Reading and preprocessing images in worker processes, ahead of the model.

Decoding a JPEG or DICOM and resizing it costs about as much CPU as a small encoder's forward pass,
so a loop that reads a batch, then embeds it, leaves the model idle half the time. ``map_ahead``
runs the reading in worker processes while the caller's process runs the model, keeping at most
``2 x workers`` batches in flight (backpressure: a slow model never lets decoded batches pile up),
and hands the results back in order. Batches cross the process boundary as float32 arrays, so a
batch read by a worker is bit-identical to one read in-process.

Workers are forked (Linux's default for ``multiprocessing``, as in PyTorch's ``DataLoader``): they
inherit the preprocessor without pickling it; each runs torch on one thread. An error raised while
reading (a corrupt file) reaches the caller with its own type and message; a worker that dies (out
of memory, killed) gives a ``DataError`` naming the batch's first item.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np
import torch

from ..checks import check_number
from ..errors import DataError, InputError
from ..progress import progress_bar

Item = TypeVar("Item")
Result = TypeVar("Result")

AUTO_MIN_IMAGES = 512  # below this, starting worker processes costs more than it saves
# On 2 cores, reading in-process was faster for JPEG datasets (docs/benchmarks.md, "Data loading"): torch
# already spreads both the resizing and the model over both cores, and a worker takes one of them from
# the model; reading that cannot use torch's threads (the phantom renderer, large PNG / DICOM decodes)
# gains from --workers 1 even there. More cores: a share of them read, the model keeps the rest.
AUTO_MIN_CORES = 4
MAX_AUTO_WORKERS = 4

# in a worker: what it was given at start (inherited by fork, not pickled): (function, context)
_WORKER_TASK: tuple[Callable[[Any, Any], Any], Any] | None = None


def resolve_workers(workers: int | None, n_images: int) -> int:
    """The number of reading processes: ``workers`` if given (0 = read in this process); ``None``
    (auto): none for fewer than ``AUTO_MIN_IMAGES`` images or below ``AUTO_MIN_CORES`` cores, else
    a quarter of the cores, at most ``MAX_AUTO_WORKERS`` (the model's process keeps the rest)."""
    check_workers(workers)
    if workers is not None:
        return int(workers)
    cores = usable_cores()
    if n_images < AUTO_MIN_IMAGES or cores < AUTO_MIN_CORES:
        return 0
    return min(MAX_AUTO_WORKERS, cores // 4)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_workers(workers: int | None) -> None:
    """InputError unless ``workers`` is None (auto) or a whole number from 0 to the CPU cores this process may use
    (callers check before any work): each worker is a forked process reading on a core of its own, so more only
    queue for the cores (1000 on 2 cores made an audit 350 times slower)."""
    if workers is None:
        return
    check_number("workers", workers, minimum=0, integer=True)
    cores = usable_cores()
    if workers > cores:
        raise InputError(f"workers must be <= {cores}, the CPU cores this process may use, got {workers}",
                         parameter="workers")


def map_ahead(function: Callable[[Any, Item], Result], items: Iterable[Item], workers: int,
              context: Any = None) -> Iterator[Result]:
    """``function(context, item)`` for each item, in order, computed ``workers`` processes ahead of
    the consumer (``workers=0``: lazily in this process), while the consumer's torch uses the cores the
    workers leave (at least one thread; restored at the end). ``function`` must be a module-level
    function; ``context`` (e.g. a preprocessor) reaches the workers by fork, unpickled. A worker that
    dies is a ``DataError`` naming the first image of the item it was reading."""
    if workers == 0:
        for item in items:
            yield function(context, item)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(function, context))
    pending: deque[tuple[Item, Future]] = deque()
    threads = torch.get_num_threads()
    # the workers take cores of their own: the model's thread pool keeps the rest, as an oversubscribed
    # OpenMP pool (threads waiting at each barrier for one the scheduler parked) is slower than a smaller one
    torch.set_num_threads(max(1, min(threads, usable_cores() - workers)))
    try:
        source = iter(items)
        for item in source:
            pending.append((item, pool.submit(_run_task, item)))
            if len(pending) >= 2 * workers:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    finally:
        torch.set_num_threads(threads)
        for _, future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(function: Callable[[Any, Any], Any], context: Any) -> None:
    global _WORKER_TASK
    _WORKER_TASK = (function, context)
    torch.set_num_threads(1)  # the model's process keeps the cores' threads; also fork-safe for OpenMP
    # a handler that writes through a rich console may have been mid-write on another thread at the
    # fork, its lock copied held: log through a plain stream handler instead
    root = logging.getLogger()
    plain = logging.StreamHandler()
    plain.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers = [plain]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which shuts the pool down


def _run_task(item: Any) -> Any:
    if _WORKER_TASK is None:
        raise RuntimeError("medvl worker started without a task (not forked from map_ahead)")
    function, context = _WORKER_TASK
    return function(context, item)


def _result(item: Any, future: Future) -> Any:
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise DataError(None, f"a worker process reading images died while reading the batch starting at "
                              f"{_first(item)} (out of memory?); rerun with --workers 0 to read in one "
                              "process") from error


def _first(item: Any) -> str:
    if isinstance(item, Sequence) and not isinstance(item, str | bytes) and item:
        item = item[0]
    image = getattr(item, "image", item)
    return f"<array {getattr(image, 'shape', '')}>" if isinstance(image, np.ndarray) else str(image)


def batched(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    """Consecutive slices of ``items`` of ``size`` (the last one shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def pixel_batches(preprocessor, images: Sequence[Any], batch_size: int, workers: int | None = None,
                  sources: Sequence[str | None] | None = None) -> Iterator[torch.Tensor]:
    """Model-ready [0, 1] pixel batches (``preprocessor.load_many``) of ``images`` (paths or arrays),
    in order, read by ``resolve_workers(workers, len(images))`` processes ahead of the caller. ``sources``
    (``image_sources``): what an error names for each array image."""
    count = resolve_workers(workers, len(images))
    named = list(sources) if sources is not None else [None] * len(images)
    pairs = list(zip(images, named, strict=True))
    for array in map_ahead(_load_batch, batched(pairs, batch_size), count, context=preprocessor):
        yield torch.from_numpy(array)


def _load_batch(preprocessor, pairs: Sequence[tuple[Any, str | None]]) -> np.ndarray:
    return preprocessor.load_many([image for image, _ in pairs], [source for _, source in pairs]).numpy()


def image_sources(dataset) -> list[str | None]:
    """What an error names for each record's first image: for an array (an ``.npz`` record has no file of its
    own), the dataset's source and the record's id; None for a file or a loadable image, which name themselves."""
    return [f"{dataset.source} (record {record.id})" if isinstance(record.image, np.ndarray) else None
            for record in dataset.records]


def load_all(preprocessor, images: Sequence[Any], show_progress: bool = True, workers: int | None = None,
             batch_size: int = 64, sources: Sequence[str | None] | None = None) -> torch.Tensor:
    """Every image read and resized once (by ``workers`` processes, None: auto) and kept as one float16
    [0, 1] tensor: a training run reads its images once and reuses them every epoch (at 128 px, 32 KiB
    per grayscale image). ``sources``: as for ``pixel_batches``."""
    loaded = []
    with progress_bar("Loading images", total=len(images), enabled=show_progress) as advance:
        for pixels in pixel_batches(preprocessor, images, batch_size, workers, sources):
            loaded.append(pixels.half())
            advance(len(pixels))
    return torch.cat(loaded) if loaded else torch.empty(0, dtype=torch.float16)
