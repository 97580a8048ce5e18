"""torch.distributed helpers that are no-ops in one process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the processes (every process calls it, even with zeros),
    on the device of ``tensor``; NCCL (GPU) process groups reduce on this process's GPU."""
    if world()[1] == 1:
        return tensor
    device = tensor.device
    if dist.get_backend() == "nccl":
        reduced = tensor.to(torch.device("cuda", torch.cuda.current_device()), copy=True)
    else:
        reduced = tensor.clone()
    dist.all_reduce(reduced)
    return reduced.to(device)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """:func:`all_reduce_sum` in place when the process group can reduce on the tensor's
    device (gloo on the CPU, NCCL on this process's GPU; no copy of a large G), else through
    a copy; returns the summed tensor."""
    if world()[1] == 1:
        return tensor
    if (dist.get_backend() == "nccl") == (tensor.device.type == "cuda"):
        dist.all_reduce(tensor)
        return tensor
    return all_reduce_sum(tensor)


def is_main_process() -> bool:
    """True on global rank 0 (the process that writes files and logs)."""
    return world()[0] == 0


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world size, ... of ``size`` items, read when iteration starts (so
    it works in processes that join torch.distributed later). Unlike ``DistributedSampler``
    it pads nothing: the shards together hold every item exactly once, so sums over them
    equal those of one process."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __iter__(self) -> Iterator[int]:
        rank, size = world()
        return iter(range(rank, self.size, size))

    def __len__(self) -> int:
        rank, size = world()
        return len(range(rank, self.size, size))


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every process, in rank order, on every process (``[value]`` in one
    process). Picklable values; every process must call it, also one with nothing to give
    (an empty shard gives an empty list, and the gather still completes)."""
    size = world()[1]
    if size == 1:
        return [value]
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered
