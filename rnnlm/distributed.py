"""Multi-process training through torchrun (DistributedDataParallel).

``torchrun --nproc_per_node N -m rnnlm train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK and a
rendezvous; the trainer then runs one process per device: NCCL on CUDA, gloo on CPU. Each
rank trains on its own contiguous share of the batch columns, so N ranks with
``batch_size`` B compute exactly the gradient one process computes with B columns.
Rank 0 alone writes logs and checkpoints; values that steer the run (validation loss, stop
decisions) are broadcast from rank 0 so every rank takes the same branch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    forced: bool = False  # RNNLM_FORCE_DDP=1: the process group even for one process

    @property
    def enabled(self) -> bool:
        """Whether this run uses a process group: with more than one process, or with one when
        ``RNNLM_FORCE_DDP=1`` asks for it under torchrun (the DDP + NCCL/gloo path of a larger
        job, checkable on a machine with one GPU)."""
        return self.world_size > 1 or self.forced

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Rank information set by torchrun (a single process when unset)."""
    forced = os.environ.get("RNNLM_FORCE_DDP") == "1" and all(
        k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")), forced)


def backend() -> str:
    """The process group's backend ("nccl", "gloo"), or "" without one."""
    return str(dist.get_backend()) if dist.is_initialized() else ""


TIMEOUT_ENV = "RNNLM_DIST_TIMEOUT"


def timeout_from_env() -> timedelta | None:
    """The process group's timeout from ``RNNLM_DIST_TIMEOUT`` (seconds), or None for PyTorch's
    default (10 minutes for NCCL, 30 for gloo). A rank waits that long in a collective for the
    others: raise it when rank 0 gathers and encodes a very large ``data.glob`` folder alone."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def init(info: DistInfo, device_type: str) -> None:
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        timeout = timeout_from_env()
        dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))


def shutdown() -> None:
    """Tear down the process group once every rank is done with it (a rank that left early while
    another still used gloo's threads could abort the process at exit)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_reduce_first_step(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The earliest step number over all ranks, in place; -1 means "none" and loses to any step."""
    if info.enabled:
        none = torch.iinfo(t.dtype).max
        t.copy_(torch.where(t < 0, none, t))
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        t.copy_(torch.where(t == none, -1, t))
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a picklable object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
