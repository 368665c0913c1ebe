"""Peak memory of one training step: a byte model from autograd's saved tensors, and CUDA's count."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from edge_ssl.errors import ConfigError

MIB = 1 << 20
#: Bytes of optimizer state per trainable byte (SGD with momentum: one buffer).
OPTIMIZER_STATE_FACTOR = {"sgd": 1, "adamw": 2}


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step holds at its peak, by part, at batch ``batch``.

    ``model_bytes``: the sum of the parts, measured the same way on CPU and GPU
    (weights + buffers + inputs + tensors autograd saved for the backward + gradients +
    optimizer state). ``cuda_peak_bytes``: ``torch.cuda.max_memory_allocated`` over the
    same step on a GPU (None on CPU), above what was allocated before it, plus the weights:
    it adds the kernels' transient workspace; per-process library workspaces are left out.
    """

    batch: int
    weights: int
    inputs: int
    activations: int
    gradients: int
    optimizer_state: int
    cuda_peak_bytes: int | None = None
    recompute: int = 0  # checkpointed blocks: their inputs + the largest block rebuilt in backward
    largest_block: int = 0  # saved bytes of the largest measured block (to estimate ``recompute``)

    @property
    def model_bytes(self) -> int:
        return (self.weights + self.inputs + self.activations + self.recompute + self.gradients
                + self.optimizer_state)

    @property
    def peak_bytes(self) -> int:
        """The measured CUDA peak when there is one, else the byte model."""
        return self.cuda_peak_bytes if self.cuda_peak_bytes is not None else self.model_bytes

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MIB

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "model_bytes": self.model_bytes, "peak_mb": round(self.peak_mb, 3)}


def tensor_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def count_saved_tensors(
    exclude: list[torch.Tensor], tag: list[object] | None = None
) -> Iterator[dict[str, object]]:
    """Count bytes of the distinct storages autograd saves for backward inside the block.

    Storages of ``exclude`` (weights and buffers, which live anyway) are not counted.
    Yields a dict whose ``"bytes"`` (total) and ``"by_tag"`` (bytes per ``tag[0]`` at the
    time each tensor was saved; e.g. the running block) are filled in when the block ends.
    """
    skip = {(str(t.device), t.untyped_storage().data_ptr()) for t in exclude}
    storages: dict[tuple[str, int], tuple[int, object]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in skip and key not in storages:
            storages[key] = (t.untyped_storage().nbytes(), tag[0] if tag else None)
        return t

    result: dict[str, object] = {"bytes": 0, "by_tag": {}}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    by_tag: dict[object, int] = {}
    for nbytes, owner in storages.values():
        by_tag[owner] = by_tag.get(owner, 0) + nbytes
    result["bytes"] = sum(by_tag.values())
    result["by_tag"] = by_tag


def measure_step(
    loss_fn: Callable[[int], tuple[torch.Tensor, list[torch.Tensor]]],
    modules: list[nn.Module],
    batch: int,
    *,
    optimizer: str = "sgd",
    blocks: list[nn.Module] = (),  # type: ignore[assignment]
    checkpointed: bool = False,
    largest_block: int = 0,
) -> StepMemory:
    """Forward + backward of ``loss_fn(batch)`` once, without an optimizer step (no weight changes).

    ``loss_fn(batch) -> (loss, inputs)`` builds a batch and returns its loss and input
    tensors. Gradients are cleared afterwards; the optimizer state is counted from the
    trainable bytes (it is not allocated until the first real step). Saved bytes are
    attributed to ``blocks``; when those are ``checkpointed`` (their saved tensors are
    invisible here), their inputs plus ``largest_block`` (from an unchecked measurement)
    are counted as ``recompute``.
    """
    params = [p for m in modules for p in m.parameters()]
    buffers = [b for m in modules for b in m.buffers()]
    trainable = [p for p in params if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    cuda = device.type == "cuda"
    before = _cuda_baseline(loss_fn, trainable, batch, device) if cuda else 0
    tag: list[object] = [None]
    block_inputs: dict[object, int] = {}
    handles = _tag_blocks(blocks, tag, block_inputs)
    try:
        with count_saved_tensors(params + buffers, tag) as saved:
            loss, inputs = loss_fn(batch)
        if loss.requires_grad:
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    by_block = {k: v for k, v in saved["by_tag"].items() if k is not None}  # type: ignore[union-attr]
    cuda_peak = None
    weights = tensor_bytes(params + buffers)
    if cuda:
        torch.cuda.synchronize(device)
        cuda_peak = int(torch.cuda.max_memory_allocated(device)) - before + weights
    grads = sum(p.numel() * p.element_size() for p in trainable)
    for p in trainable:
        p.grad = None
    del loss
    factor = OPTIMIZER_STATE_FACTOR.get(optimizer, 2)
    return StepMemory(
        batch=batch,
        weights=weights,
        inputs=tensor_bytes(inputs),
        activations=int(saved["bytes"]),  # type: ignore[call-overload]
        gradients=grads,
        optimizer_state=factor * grads,
        cuda_peak_bytes=None if cuda_peak is None else cuda_peak + factor * grads,
        recompute=sum(block_inputs.values()) + largest_block if checkpointed else 0,
        largest_block=max(by_block.values(), default=0),
    )


def _cuda_baseline(loss_fn: Callable[[int], tuple[torch.Tensor, list[torch.Tensor]]],
                   trainable: list[torch.Tensor], batch: int, device: torch.device) -> int:
    """One unmeasured forward + backward, then the bytes allocated before the measured step.

    The warm-up makes cuBLAS/cuDNN allocate their per-process workspaces (32 MiB and more on
    Hopper) outside the measurement; subtracting what is already allocated leaves out tensors
    that are not part of the step (other models in the process). The step's own weights are
    added back by the caller.
    """
    loss, _ = loss_fn(batch)
    if loss.requires_grad:
        loss.backward()
    for p in trainable:
        p.grad = None
    del loss
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def _tag_blocks(blocks: list[nn.Module], tag: list[object], inputs: dict[object, int]) -> list:
    """Hooks that set ``tag[0]`` to the running block and record each block's input bytes."""
    handles = []
    for index, block in enumerate(blocks):
        def enter(module: nn.Module, args: tuple, index: int = index) -> None:
            call = (index, len(inputs))  # each call apart: the two views run every block twice
            tag[0] = call
            inputs[call] = tensor_bytes([a for a in args if isinstance(a, torch.Tensor)])

        def leave(module: nn.Module, args: tuple, output: object) -> None:
            tag[0] = None

        handles.append(block.register_forward_pre_hook(enter))
        handles.append(block.register_forward_hook(leave))
    return handles


@dataclass(frozen=True)
class MemoryFit:
    """Step memory as ``fixed + per_image * batch`` from two measured batch sizes."""

    fixed: float
    per_image: float

    def at(self, batch: int) -> float:
        return self.fixed + self.per_image * batch

    def largest_batch(self, budget_bytes: float, cap: int) -> int:
        """The largest batch <= ``cap`` whose step fits ``budget_bytes`` (0 when none does)."""
        if self.per_image <= 0:
            return cap if self.fixed <= budget_bytes else 0
        return int(max(0, min(cap, (budget_bytes - self.fixed) // self.per_image)))


def fit_memory(small: StepMemory, large: StepMemory) -> MemoryFit:
    """Linear fit through two measurements at different batch sizes."""
    if small.batch == large.batch:
        raise ConfigError("fit_memory needs two different batch sizes.")
    per_image = max(0.0, (large.peak_bytes - small.peak_bytes) / (large.batch - small.batch))
    return MemoryFit(fixed=small.peak_bytes - per_image * small.batch, per_image=per_image)


def process_peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (VmHWM), in MiB; None off Linux."""
    return _proc_mib("/proc/self/status", "VmHWM")


def available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo in MiB (None where there is no /proc)."""
    return _proc_mib("/proc/meminfo", "MemAvailable")


def _proc_mib(path: str, key: str) -> float | None:
    """The ``key: N kB`` line of a /proc file in MiB; None where the file or line is absent."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return None
