"""Embedding a large dataset on a Ray cluster (or a local Ray): ``medvl index build --ray``.

``RayEmbedder`` is an ``embedder`` for ``medvl.index.build_index``: Ray Data spreads the records
still to do over ``workers`` actors (one CPU each), each of which loads the model once from its
folder, decodes its batch of images, hashes the pixels and embeds images and report texts. The
streaming executor keeps only a bounded number of batches in flight (Ray Data's backpressure: a
worker does not run ahead of what the driver has consumed), and the results come back in record
order, so the driver appends them to the staged index exactly as a single-process build does:
duplicate images are skipped in the same order, and every appended batch is a checkpoint, so an
interrupted build resumes from the last one when rerun (``build_index``'s contract).

The workers read images themselves: on a cluster, the data path must be readable from every node
(a shared file system), as must the model folder. The driver makes the model folder and the records' image
paths absolute before shipping them (``absolute_paths``): a cluster's workers run in the folder its head was
started from, not the driver's.

Each record is shipped with its batch, not the dataset with each worker. A worker that dies is not
restarted (``max_restarts=0``): the build stops with a ``DataError`` saying so (Ray Data's own error lines go
to the session's log file) and resumes from its last batch when rerun (see ``RayEmbedder._embed``). Ray's
notice that a local Ray uses token authentication is dropped.

Errors: a worker's own medvl error (a corrupt image: ``DataError`` naming the file; a model folder it
cannot load: ``ModelError``) or ``OSError`` is sent back with its batch and raised by the driver as itself
when it reaches that batch (the batches before it are appended, as in a single-process build), not wrapped
in Ray's task or actor error, so ``medvl`` prints its one line. A worker loads the model from its folder
again, after the driver: if it is not the model the driver loaded (its fingerprint, which the index
records), the folder changed in between, and the worker sends back a ``ModelError`` instead of vectors.

A cluster address of the form ``host:port`` (or ``ray://host:port``) is checked with a TCP connection
when the embedder is made (``RAY_CONNECT_TIMEOUT_S``), before any work: Ray itself keeps retrying an
unreachable address for many minutes. Without an address, Ray's own ``RAY_ADDRESS`` variable (set on a
cluster's nodes and in a Ray Job) is the address, as ``ray.init`` takes it, with the same check and
messages naming the variable; the address ``local`` starts a local Ray even when it is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import signal
import socket
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.loading import usable_cores
from ..data.record import Dataset, Record
from ..errors import DataError, InputError, MedvlError, ModelError
from .onnx import _Dropping

log = logging.getLogger(__name__)

RAY_CONNECT_TIMEOUT_S = 10  # the TCP check of a host:port cluster address
# Ray's attempts to reach the cluster's GCS (RAY_gcs_server_port_wait_time_s, unless set): each takes about 40 s
# against a port that answers but is not a Ray head; Ray's own default is 20 attempts
RAY_CONNECT_ATTEMPTS = 3
DEFAULT_WORKERS = 2  # embedding actors when --ray-workers is not given (a local Ray: at most its cores)


@dataclass
class RayEmbedder:
    """Embed with ``workers`` Ray actors; ``address`` None (and no ``RAY_ADDRESS``) or ``local`` starts a local
    Ray (stopped afterwards), else joins that cluster (e.g. ``ray://head:10001`` or ``auto``)."""

    model_dir: Path
    workers: int | None = None  # None: DEFAULT_WORKERS, or fewer on a local Ray with fewer cores
    address: str | None = None  # None: RAY_ADDRESS if set (as ray.init reads it), else a local Ray
    backend: str = "torch"  # the inference backend each worker loads (medvl.load_model)
    address_from: str = dataclasses.field(default="--address", init=False)  # what messages name it by

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--ray-workers must be at least 1, got {self.workers}")
        self.model_dir = Path(self.model_dir).absolute()  # the workers' working folder is not the driver's
        if self.address is None and os.environ.get("RAY_ADDRESS", "").strip():
            self.address, self.address_from = os.environ["RAY_ADDRESS"].strip(), "RAY_ADDRESS"
            log.info("--ray: joining the Ray cluster at %s, which RAY_ADDRESS names (--address local for a local "
                     "Ray)", self.address)
        if self.address not in (None, "local"):
            check_reachable(self.address, name=self.address_from)
            self.workers = DEFAULT_WORKERS if self.workers is None else self.workers
            return
        # a local Ray: each worker takes a core of this machine (more would only queue for the cores, as
        # --workers' reading processes would, and Ray would be told it has CPUs the machine has not)
        cores = usable_cores()
        if self.workers is None:
            self.workers = min(DEFAULT_WORKERS, cores)
        elif self.workers > cores:
            raise InputError(f"--ray-workers must be <= {cores}, the CPU cores this process may use, for a local "
                             f"Ray (a cluster's workers run on its nodes: --address), got {self.workers}")

    def __call__(self, dataset: Dataset, records: Sequence[Record], batch_size: int, fingerprint: dict[str, Any]
                 ) -> Iterator[tuple[list[Record], list[str], np.ndarray, np.ndarray]]:
        """Yield (records, pixel hashes, image vectors, text vectors) batch by batch, in record order;
        text vectors of records without text are zero rows. ``fingerprint``: the model the index records
        (``model_fingerprint`` of the model the driver loaded); a worker whose model from the folder is another
        (the folder changed since) sends back a ModelError instead of vectors."""
        if not records:
            return
        ray = _import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            assert self.workers is not None  # set by __post_init__
            _init_ray(ray, self.address, self.workers, self.address_from)
        try:
            yield from self._embed(ray, dataset, records, batch_size, fingerprint)
        finally:
            if started_here:
                ray.shutdown()

    def _embed(self, ray, dataset: Dataset, records: Sequence[Record], batch_size: int, fingerprint: dict[str, Any]):
        position = {record.id: i for i, record in enumerate(dataset.records)}  # ids are unique (checked)
        positions = [position[record.id] for record in records]
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # results in record order: deterministic dedup
        context.enable_progress_bars = False  # medvl's own bar counts the records
        _quiet_ray_data()
        shipped = absolute_paths(dataset).records
        # each record travels with its batch (pickled), not the whole dataset with each worker
        items = ray.data.from_items([{"position": p, "record": pickle.dumps(shipped[p])} for p in positions],
                                    override_num_blocks=max(1, math.ceil(len(positions) / batch_size)))
        # max_restarts=0: a worker that dies ends the build at its batch (rerun: it resumes from the last batch
        # appended) rather than being restarted and its batch retried without end (Ray Data's default, whose
        # restarts Ray itself warns, at error level on every run, may fail: ray-project/ray#53727). Ray Data has no
        # named parameter for it (2.40 to 2.60, the latest): it is a remote arg, which Ray Data 2.60 warns is
        # deprecated for removal in 2.64, hence pyproject's ray[data]<2.64. That one warning is spent here: the
        # setting is deliberate, and a -q build prints medvl's table only (docs/scaling.md)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
            embedded = items.map_batches(_EmbedWorker, fn_constructor_kwargs={
                "model_dir": str(self.model_dir), "backend": self.backend, "fingerprint": fingerprint},
                batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=self.workers), num_cpus=1,
                max_restarts=0, batch_format="numpy")
        done = 0
        try:
            with _ray_data_errors_to_log_file():
                for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
                    failed = [error for error in batch["error"] if error]
                    if failed:  # at this batch, as a build in one process raises it
                        raise pickle.loads(bytes.fromhex(failed[0]))
                    batch_records = [dataset.records[int(p)] for p in batch["position"]]
                    yield batch_records, [str(d) for d in batch["digest"]], batch["image"], batch["text"]
                    done += len(batch_records)
        except _worker_deaths(ray) as error:  # not restarted (max_restarts=0): the build stops at this batch
            raise DataError(None, f"the index build on Ray stopped: a Ray worker died while embedding "
                                  f"({type(error).__name__}: killed for lack of memory, or a crash in a decoder?) "
                                  f"after {done} of its {len(records)} records, which are kept: rerun the same "
                                  "command to resume (with fewer --ray-workers or a smaller --batch-size if memory "
                                  "ran out)") from None


class _EmbedWorker:
    """One Ray actor: the model loaded once, one CPU thread, a batch of records (pickled, with their positions)
    in, vectors out.

    The model is loaded from its folder again, later than the driver's (seconds on a local Ray, minutes when
    a cluster restarts an actor): it must be the model ``fingerprint`` describes, the one the index records, or
    the index would hold one model's vectors under another's fingerprint."""

    def __init__(self, model_dir: str, backend: str, fingerprint: dict[str, Any]):
        import torch

        from ..index.base import fingerprint_differs
        from ..models.registry import load_model

        torch.set_num_threads(1)
        self.failed: MedvlError | OSError | None = None
        try:
            self.model = load_model(model_dir, backend=backend)
            what = fingerprint_differs(fingerprint, self.model)
            if what is not None:
                raise ModelError(f"{model_dir}: the model a Ray worker loaded from it is not the one this build "
                                 f"loaded (its {what} {'differ' if what == 'weights' else 'differs'}): the model "
                                 f"folder changed since the build started; rerun once it is final")
        except (MedvlError, OSError) as error:  # kept for the first batch: an actor that dies in its constructor
            self.failed = error  # is reported by Ray as a traceback of its own (and retried)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from ..index.build import embed_batch, read_new_batch

        records = [pickle.loads(record) for record in batch["record"]]
        try:
            if self.failed is not None:
                raise self.failed
            digests, pixels, _ = read_new_batch(self.model.preprocessor, records)  # a new index
            images, texts = embed_batch(self.model, torch.from_numpy(pixels), [r.text for r in records])
        except (MedvlError, OSError) as error:
            # returned, not raised: Ray would wrap it in its task error (the whole traceback as the message,
            # logged too) and drop the original; the driver raises it, so the CLI prints its one line
            width = 1 if self.failed is not None else self.model.config.embed_dim
            zeros = np.zeros((len(records), width), np.float32)
            return {"position": batch["position"], "digest": np.array([""] * len(records)), "image": zeros,
                    "text": zeros, "error": np.array([pickle.dumps(error).hex()] * len(records))}
        return {"position": batch["position"], "digest": np.array(digests), "image": images, "text": texts,
                "error": np.array([""] * len(records))}


def absolute_paths(dataset: Dataset) -> Dataset:
    """``dataset`` with every image file path absolute (``Path.absolute``: relative ones are taken from this
    process's working folder), DICOM series' files included, for processes working in another folder."""
    from ..data.loaders.dicom import DicomVolume

    def absolute(image: Any) -> Any:
        if isinstance(image, Path):
            return image.absolute()
        if isinstance(image, DicomVolume):
            series = dataclasses.replace(image.series, files=[path.absolute() for path in image.series.files])
            return DicomVolume(series, image.key)
        return image  # an array

    return dataset.subset([dataclasses.replace(record, images=[absolute(image) for image in record.images])
                           for record in dataset.records])


def _quiet_ray_data() -> None:
    """Ray Data's console lines at WARNING and above unless medvl logs at DEBUG (``-v``): its INFO lines
    (execution plans, timings) still go to the session's log file. Its warning that progress bars are off
    is said once per process, so it is spent here: medvl shows its own bar."""
    from ray.util.debug import log_once

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, logging.WARNING))
    log_once("ray_data_progress_manager_disabled")


def _worker_deaths(ray) -> tuple[type[BaseException], ...]:
    """Ray's errors for a worker process that is gone (killed by the kernel or Ray's memory monitor, crashed):
    the actor's calls fail (``RayActorError``, e.g. ``ActorDiedError``), or the process running a task died."""
    return ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError


@contextlib.contextmanager
def _ray_data_errors_to_log_file() -> Iterator[None]:
    """While the build iterates, Ray Data's ERROR records (a dead worker: its internal-error notice and two
    tracebacks, 150 lines) go to the session's log file only, unless medvl logs at DEBUG (``-v``): the build
    raises medvl's own error for them, in one line."""
    console = [handler for handler in logging.getLogger("ray.data").handlers
               if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]
    below_error = _BelowError()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for handler in console:
            handler.addFilter(below_error)
    try:
        yield
    finally:
        for handler in console:
            handler.removeFilter(below_error)


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise InputError("--ray needs Ray Data: pip install 'medvl[scale]' (or pip install 'ray[data]')") from err
    return ray


def _init_ray(ray, address: str | None, workers: int, name: str = "--address") -> None:
    """A local Ray with ``workers`` CPUs (plus one for the driver's reads) for ``address`` None or ``local``, or
    join ``address`` (``name``: the option or variable it came from, for messages)."""
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    local = address in (None, "local")
    if local:  # "local", not None: ray.init would read RAY_ADDRESS and refuse num_cpus for a cluster
        options.update(address="local", num_cpus=workers + 1)
    else:
        options["address"] = address
    token_notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    no_token_notice = _Dropping("Token authentication is enabled for this Ray cluster")  # docs/scaling.md
    token_notice.addFilter(no_token_notice)
    # ray.init replaces the process's SIGTERM handling with its own (its core worker then dumps a C stack and
    # aborts: exit 134); the handler in place before (medvl's: `terminated`, exit 143) is put back
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        with _connect_attempts(None if local else RAY_CONNECT_ATTEMPTS):
            ray.init(**options)
    except ConnectionError as err:
        raise InputError(f"cannot reach the Ray cluster at {address}{_named(name)}: {err}") from None
    except ValueError as err:  # an address Ray cannot use (a ray:// address without the ray[client] package)
        raise InputError(f"{name} {address}: {err}") from None
    finally:
        token_notice.removeFilter(no_token_notice)
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def _named(name: str) -> str:
    """`` (RAY_ADDRESS)`` after an address that came from that variable, nothing after one given as --address."""
    return "" if name == "--address" else f" ({name})"


@contextlib.contextmanager
def _connect_attempts(attempts: int | None) -> Iterator[None]:
    """Bound Ray's attempts to reach a cluster's GCS while ``ray.init`` runs (its ``RAY_gcs_server_port_wait_time_s``,
    read when the driver connects), unless the environment sets them. Not its reconnect timeout: when that runs out,
    Ray ends the whole process."""
    name = "RAY_gcs_server_port_wait_time_s"
    if attempts is None or name in os.environ:
        yield
        return
    os.environ[name] = str(attempts)
    try:
        yield
    finally:
        os.environ.pop(name, None)


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S, name: str = "--address") -> None:
    """InputError unless a ``host:port`` (or ``ray://host:port``) cluster address accepts a TCP connection within
    ``timeout`` seconds; other forms (``auto``) are left to Ray, which answers them at once. ``name``: the option
    or variable the address came from, for messages. An ``http://`` address (the dashboard's, which ``ray job submit``
    takes, often exported as RAY_ADDRESS) is refused saying which address to give instead."""
    if address.lower().startswith(("http://", "https://")):
        raise InputError(f"{name} {address} is an HTTP address (the Ray dashboard's, for ray job submit): give the "
                         "cluster's ray://host:10001 (Ray Client) or host:port (its GCS, e.g. host:6379) address")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    if not 0 < int(port) < 65536:
        raise InputError(f"{name} {address}: port {port} is not a TCP port (1-65535)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise InputError(f"cannot reach the Ray cluster at {address}{_named(name)}: {err.strerror or err}") from None
