"""The training run's torch.distributed process group: the launcher's (torchrun), or a 1-process one made here
(nccl on CUDA, gloo on CPU), so that every run, single-process or not, goes through the same collectives."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")

_OWN_GROUP: dict = {}  # what init_distributed set up for a 1-process group: the LOCAL_RANK it set


def init_distributed(device_type: str = "cpu") -> bool:
    """Join the launcher's process group (torchrun sets RANK/WORLD_SIZE), or create a 1-process one (with
    LOCAL_RANK=0 when unset: DeepSpeed reads it). Returns True when this call created the group (the caller
    destroys it: `close_distributed`)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        # an in-memory store: a file store would stay behind in the temp folder of every killed run
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP.update(set_local_rank="LOCAL_RANK" not in os.environ)
        os.environ.setdefault("LOCAL_RANK", "0")
    return True


def close_distributed() -> None:
    """Destroy the group init_distributed created and remove the LOCAL_RANK it set."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        # through DeepSpeed, which then drops the groups it cloned from this one: a later DeepSpeed run in this
        # process would reach them, destroyed ("Group ... is not registered")
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    if _OWN_GROUP.pop("set_local_rank", False):
        os.environ.pop("LOCAL_RANK", None)


@contextlib.contextmanager
def process_group(device_type: str = "cpu"):
    """`init_distributed` for the duration of a block; destroys the group only if it created it."""
    created = init_distributed(device_type)
    try:
        yield
    finally:
        if created:
            close_distributed()


class OtherRankFailed(RuntimeError):
    """Raised on the ranks that did not fail where another did (its error is in that rank's output): the
    command-line tools report it in one line, as a bad setting (fastfair.cli.user_errors)."""


def on_every_rank(world: int, what: str, step: Callable[[], T]) -> T:
    """``step()`` on this rank; with ``world`` > 1 processes, if it raised on any rank, every rank raises: the
    failing ones their own error, the others an OtherRankFailed naming the first failing rank (``what`` says what
    it could not do) and its error. A rank raising alone left the others waiting in their next collective,
    forever, wherever the launcher does not stop the group when one process fails (several nodes, srun per
    rank). A collective (one all_gather_object): every rank calls it at the same point."""
    failure, result = None, None
    try:
        result = step()
    except Exception as error:  # any failure: re-raised below, on this rank as it was
        if world == 1:
            raise
        failure = error
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        failed = next(((rank, said) for rank, said in enumerate(every) if said is not None), None)
        if failed is not None:
            raise OtherRankFailed(f"rank {failed[0]} {what}, so no rank goes on: {failed[1]}")
    return result
