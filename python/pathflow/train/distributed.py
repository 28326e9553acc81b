"""torch.distributed helpers: initialisation from ``torchrun`` variables, rank queries that
work without a process group, and a gradient-preserving ``all_gather``.

Example:
    >>> from pathflow.train.distributed import get_rank, get_world_size
    >>> get_rank(), get_world_size()  # no process group: a single process
    (0, 1)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_dist() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_cuda_device(
    requested: torch.device, world_size: int, local_rank: int, current: int
) -> torch.device:
    """The CUDA device of this process: ``LOCAL_RANK``'s under torchrun; in one process the
    one asked for (``cuda:1`` stays ``cuda:1``), or the current device for a bare ``cuda``.

    Example:
        >>> import torch
        >>> pick_cuda_device(torch.device("cuda:1"), 1, 0, current=0)
        device(type='cuda', index=1)
        >>> pick_cuda_device(torch.device("cuda"), 4, 2, current=0)
        device(type='cuda', index=2)
    """
    if world_size > 1:
        return torch.device("cuda", local_rank)
    return torch.device("cuda", requested.index if requested.index is not None else current)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), if any.

    NCCL on CUDA, gloo on CPU. Without those variables (or with ``WORLD_SIZE=1``) nothing
    is initialised and a single-process :class:`DistInfo` is returned. A process group that
    is already initialised (e.g. by a test) is used as it is.
    """
    dev = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    elif world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=30)
        )
    if dev.type == "cuda":
        current = torch.cuda.current_device() if dev.index is None and world_size == 1 else 0
        dev = pick_cuda_device(dev, world_size, local_rank, current)
        if world_size == 1:
            torch.cuda.set_device(dev)
    return DistInfo(rank=get_rank(), world_size=world_size, local_rank=local_rank, device=dev)


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sends each rank the sum over ranks of the gradients
    with respect to its own slice (the losses of every rank depend on it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping gradients flowing back to each
    rank's slice. Identity without a process group.

    With DDP (which averages gradients) a loss that is the mean over local anchors then gets
    exactly the gradient of the single-process loss on the concatenated batch.
    """
    if not is_dist():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place sum over ranks (no-op in one process); returns ``x``."""
    if is_dist():
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if this module's caller created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "pick_cuda_device",
    "resolve_device",
]
