"""Everything that knows about torch.distributed process groups; single process: no calls."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; ``owns_group``: we created the group, we tear it down."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device_kind: str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device_kind == "cuda" else "gloo"


def init_distributed(device_kind: str, environ: Any = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK).

    With WORLD_SIZE unset or 1 nothing is initialised. A group that already exists
    (the caller made it) is used as is and left for the caller to destroy.
    """
    environ = os.environ if environ is None else environ
    size = int(environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return DistInfo()
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend=backend_for(device_kind))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns_group)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group; 0 when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


@torch.no_grad()
def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks, still on its device (no host sync, no gradient)."""
    size = world_size()
    if size == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / size


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm statistics; DDP syncs them only before forward)."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


class _GatherWithGradient(torch.autograd.Function):
    """all_gather forward; backward sums each slice's gradient over ranks and keeps ours.

    Written out (as in the VICReg authors' code) rather than taken from
    ``torch.distributed.nn.functional.all_gather``, which torch 2.14 deprecates;
    it needs only ``all_gather`` and ``all_reduce``, which every backend has.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor)
        ctx.batch = tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """(N, ...) on each rank -> (world_size * N, ...) in rank order, gradients kept.

    The backward sums the gradients every rank sends back to its slice, so with
    DDP's averaging of parameter gradients a loss computed on the gathered batch
    gets the gradient of the global-batch loss. Every rank must use the same N
    (drop the last incomplete batch).
    """
    if world_size() == 1:
        return tensor
    return _GatherWithGradient.apply(tensor)


def wrap_ddp(module: torch.nn.Module, device: torch.device, *, sync_batchnorm: bool) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` (SyncBatchNorm on GPU: it has no CPU kernel)."""
    if sync_batchnorm and device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )
