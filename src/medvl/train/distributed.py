"""Data-parallel training across processes (``torchrun``): one process group, global batches, global negatives.

``medvl train`` runs unchanged under ``torchrun --nproc-per-node N``: ``init_from_env`` joins the
process group torchrun describes in the environment (gloo on CPU, NCCL when CUDA is available).

How the work is split, so that N processes compute what one process would on the same global
batch: every rank draws the same global batch (the same seeded permutation: a distributed sampler
that keeps batch identity), the same augmentation and the same caption choices, then encodes only
its contiguous shard (``shard``). Embeddings are gathered from all ranks *with* gradients
(``gather_with_grad``, as open_clip's ``gather_with_grad``), so every rank computes the contrastive
loss over the global batch: the negatives are global. Gradients are then averaged across ranks
(``average_gradients``, what DDP's reducer does) after backward. Sums over samples (supervised
heads) are divided by (global batch / world size) (``sample_divisor``), so the average is the
global mean; the logged loss terms are averaged over the ranks the same way (``mean_over_ranks``).
Batch norm keeps per-rank statistics (no SyncBatchNorm on CPU), as DDP does by default.

Only rank 0 writes files (config, metrics, checkpoints, the model) and shows progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from ..errors import InputError, PeerLostError

log = logging.getLogger(__name__)
_joined_rank: int | None = None  # this process's rank in the group init_from_env joined (kept once it is left)


def init_from_env() -> bool:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1); True if training is distributed.

    Whoever joins leaves: pair it with ``shutdown`` when the work is done.
    """
    if initialized():
        return dist.get_world_size() > 1
    processes = _whole_env("WORLD_SIZE", 1)
    if processes <= 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE is {processes} but {', '.join(missing)} are not set "
                         "(start distributed training with torchrun)")
    if not 0 <= _whole_env("RANK", 0) < processes:
        raise InputError(f"RANK must be 0 to {processes - 1} (WORLD_SIZE is {processes}), got "
                         f"{os.environ['RANK']!r} (start distributed training with torchrun)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    global _joined_rank
    _joined_rank = dist.get_rank()
    log.info("distributed training: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def requested_world_size() -> int:
    """How many processes this run is one of: the joined group's size, else torchrun's ``WORLD_SIZE`` (1 without
    it); known before the group is joined."""
    if initialized():
        return dist.get_world_size()
    processes = _env_int("WORLD_SIZE", 1)
    return 1 if processes is None else processes


def _env_int(name: str, default: int) -> int | None:
    """A whole-number variable torchrun sets (``WORLD_SIZE``, ``RANK``): ``default`` when it is unset, None when it
    is set but empty or not a whole number (an ``export WORLD_SIZE=`` left in a job script)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        return None


def _whole_env(name: str, default: int) -> int:
    """``_env_int``, an InputError naming the variable when it is set but not a whole number: ``init_from_env``
    must not guess whether the run is distributed."""
    value = _env_int(name, default)
    if value is None:
        raise InputError(f"{name} must be a whole number, got {os.environ[name][:40]!r} (torchrun sets it; unset "
                         "it to train in one process)")
    return value


def check_single_process() -> None:
    """InputError under torchrun (``WORLD_SIZE`` above 1), before anything is written: for work that trains and then
    scores or writes on every rank (a benchmark, the demo), which only ``medvl train`` keeps to rank 0."""
    processes = requested_world_size()
    if processes > 1:
        raise InputError(f"only medvl train runs data-parallel: each of the {processes} processes would train, "
                         "score and write on its own; start this command in one process (without torchrun)")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, checkpoints and saves."""
    return rank() == 0


def ran_as_main() -> bool:
    """``is_main``, also after the group ``init_from_env`` joined was left (``fit`` leaves it when training ends):
    what a command says of the run's result, only rank 0 says."""
    return is_main() if initialized() or _joined_rank is None else _joined_rank == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def initialized() -> bool:
    """True if this process is in a process group (ours or one the caller set up)."""
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group: call it once communication is over, before the process exits.

    Call it on success only: a rank that failed must not wait for ranks still in a collective.
    """
    if initialized():
        dist.destroy_process_group()


def joined() -> bool:
    """True if ``init_from_env`` joined a process group in this process (whether or not it was left since)."""
    return _joined_rank is not None


@contextlib.contextmanager
def peers_watched() -> Iterator[None]:
    """Turn a collective's failure because another rank went away into ``PeerLostError`` (one line at the CLI).

    A rank that stops on its own error (a full disk while writing a checkpoint) or is killed (out of memory) leaves
    the others waiting in a collective, which gloo ends with a ``RuntimeError`` ("Connection closed by peer",
    "Connection reset by peer"): a traceback of some 100 lines that buried the first rank's one-line reason.
    """
    try:
        yield
    except RuntimeError as error:
        if not joined() or not _lost_peer(error):
            raise
        raise PeerLostError(f"rank {_joined_rank}: another process of the training group stopped while this one "
                            "waited for it (its own output says why); this process stops too. The last checkpoint, "
                            "if one was written, is kept: run the same command with --resume") from None


def _lost_peer(error: RuntimeError) -> bool:
    """A collective that failed because a peer's connection went away (gloo's transport or torch's c10d errors)."""
    text = str(error).lower()
    return isinstance(error, dist.DistNetworkError) or any(
        sign in text for sign in ("connection closed by peer", "connection reset by peer", "broken pipe"))


def exit_process(code: int) -> NoReturn:
    """End a process that took part in a gloo group: flush, then exit without the interpreter's teardown.

    Under torchrun a gloo rank occasionally aborts *after* its work is done and its files are written:
    SIGABRT, "terminate called without an active exception", during interpreter finalization (no
    Python frame left; 5 of 221 runs of the 2-process test here, some of them after
    ``destroy_process_group``). A C++ thread still joinable when its owner is destroyed gives that
    message; PyTorch's own discussion of it points at gloo objects torn down during finalization.
    torchrun then reports the whole job as failed (an elastic run would restart it). Skipping the
    teardown (``os._exit``) after flushing the output streams and the log handlers keeps the exit code
    the work earned.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def shard_bounds(count: int, world: int | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, end) of each rank's share of ``count`` global-batch rows (sizes differ by at most 1)."""
    world = world or world_size()
    return [(count * r // world, count * (r + 1) // world) for r in range(world)]


def shard(count: int) -> slice:
    """This rank's rows of a global batch of ``count``."""
    start, end = shard_bounds(count)[rank()]
    return slice(start, end)


def sample_divisor(global_count: int) -> float:
    """Divide a *sum* over this rank's samples by this to get, after ``average_gradients``, the
    gradient of the mean over the global batch (the batch size itself in a single process)."""
    return global_count / world_size()


def gather_with_grad(local: torch.Tensor, global_count: int) -> torch.Tensor:
    """Concatenate every rank's rows (in rank order) into the global batch, keeping gradients.

    Shards may differ in size by one row: they are padded to the largest for the collective and
    trimmed after. The backward pass sums the gradients of every rank's copy into each shard (a
    reduce-scatter). The collective is torch's functional ``all_gather_single``, the replacement its
    deprecation of ``torch.distributed.nn.functional.all_gather`` names (same values and gradients, checked on
    gloo; the old one warned once per process on every run).
    """
    if world_size() == 1:
        return local
    from torch.distributed._functional_collectives import all_gather_single

    bounds = shard_bounds(global_count)
    largest = max(end - start for start, end in bounds)
    padded = torch.cat([local, local.new_zeros(largest - len(local), *local.shape[1:])]) if len(local) < largest \
        else local
    group = dist.group.WORLD
    assert group is not None  # in a group: world_size() > 1
    # a plain tensor in (MONAI's MetaTensor cannot hold the collective's AsyncCollectiveTensor result); slicing the
    # result waits for the collective
    plain = padded.as_subclass(torch.Tensor).contiguous()  # (still in the autograd graph)
    parts = all_gather_single(plain, 0, group).chunk(len(bounds))
    return torch.cat([part[:end - start] for part, (start, end) in zip(parts, bounds, strict=True)])


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce and average the gradients of every trainable parameter. A gradient missing on one rank
    counts as 0; a parameter that has none on any rank (e.g. the text tower in a self-supervised phase) keeps
    none, so AdamW leaves it alone (no weight decay) as it does in a single process."""
    world = world_size()
    if world == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    has_grad = torch.tensor([float(p.grad is not None) for p in params])
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    params = [p for p, has in zip(params, has_grad.tolist(), strict=True) if has]
    if not params:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for param in params:
        assert param.grad is not None
        size = param.grad.numel()
        param.grad.copy_(flat[offset:offset + size].view_as(param.grad))
        offset += size


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (every rank calls it, with the same names). A supervised term is this
    rank's sum over its shard divided by ``sample_divisor``: its mean over the ranks is the global-batch mean,
    the figure a single process logs; terms computed on gathered embeddings are equal on every rank already."""
    world = world_size()
    if world == 1:
        return values
    names = list(values)
    flat = torch.tensor([values[name] for name in names], dtype=torch.float64)
    dist.all_reduce(flat)
    return dict(zip(names, (flat / world).tolist(), strict=True))


def all_finite(value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank (so all ranks stop together, none waits forever)."""
    finite = torch.tensor(float(bool(torch.isfinite(value.detach()).all())))
    if world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())
