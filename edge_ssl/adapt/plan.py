"""Pick the trainable subset, batch size and checkpointing whose measured step fits the memory budget."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edge_ssl.adapt.config import AUTO_ORDER_NOTE, MIN_BATCH, AdaptConfig
from edge_ssl.adapt.memory import (
    MIB,
    OPTIMIZER_STATE_FACTOR,
    MemoryFit,
    StepMemory,
    fit_memory,
    measure_step,
    tensor_bytes,
)
from edge_ssl.adapt.step import (
    backward_blocks,
    build_method,
    disable_checkpointing,
    enable_checkpointing,
    step_loss,
)
from edge_ssl.adapt.trainables import AUTO_ORDER, apply_trainables
from edge_ssl.data.views import ViewAugment, view_preset
from edge_ssl.errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """One measured configuration: subset, checkpointing, and its memory line."""

    trainable: str
    checkpointing: bool
    fit: MemoryFit
    batch: int  # the largest batch that fits (0: none)
    memory: StepMemory  # measured at the larger probe batch

    def to_dict(self) -> dict[str, object]:
        return {"trainable": self.trainable, "checkpointing": self.checkpointing,
                "batch": self.batch, "mb_at_min_batch": round(self.fit.at(MIN_BATCH) / MIB, 2),
                "mb_per_image": round(self.fit.per_image / MIB, 3)}


@dataclass(frozen=True)
class AdaptPlan:
    """What adaptation will train and at which batch, and the step memory it expects."""

    trainable: str
    checkpointing: bool
    batch_size: int
    expected_mb: float
    budget_mb: float
    budget_source: str
    candidates: tuple[Candidate, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        return {"trainable": self.trainable, "checkpointing": self.checkpointing,
                "batch_size": self.batch_size, "expected_step_mb": round(self.expected_mb, 2),
                "budget_mb": round(self.budget_mb, 1), "budget_source": self.budget_source,
                "candidates": [c.to_dict() for c in self.candidates]}


def measure_configuration(
    encoder: nn.Module,
    trainable: str,
    images: np.ndarray,
    targets: np.ndarray,
    config: AdaptConfig,
    *,
    batch: int,
    checkpointing: bool = False,
    block_bytes_per_image: float = 0.0,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> StepMemory:
    """Step memory of ``trainable`` at ``batch`` on a copy of ``encoder`` (the encoder is untouched).

    ``replay``: clean replay images and targets; a step then also runs ``batch`` of them."""
    device = next(encoder.parameters()).device
    work = copy.deepcopy(encoder)
    apply_trainables(work, trainable, lora_rank=config.lora_rank)
    if trainable == "bn-stats":
        return _bn_stats_memory(work, images[:batch], device)
    method = build_method(work, config).to(device)
    method.train()
    work.eval()
    views = ViewAugment(view_preset(config.method, work.spec.input.image_size), work.spec.input).to(device)
    blocks = backward_blocks(getattr(work, "backbone", work))
    if checkpointing:
        enable_checkpointing(blocks)

    def loss_fn(size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sample = None if replay is None else (replay[0][:size], replay[1][:size])
        loss, _, inputs = step_loss(method, views, images[:size], targets[:size], config, device,
                                    sample)
        return loss, inputs

    try:
        return measure_step(loss_fn, [method], batch, optimizer=config.optimizer, blocks=blocks,
                            checkpointed=checkpointing,
                            largest_block=int(block_bytes_per_image * batch))
    finally:
        disable_checkpointing(blocks)


@torch.no_grad()
def _bn_stats_memory(encoder: nn.Module, images: np.ndarray, device: torch.device) -> StepMemory:
    """The statistics pass keeps no activations; its peak is weights + input + one layer's output."""
    from edge_ssl.tensors import preprocess

    batch = preprocess(images, encoder.spec.input, device)
    largest = [0]

    def record(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], 2 * output.numel() * output.element_size())

    leaves = [m for m in encoder.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        encoder.train()
        encoder(batch)
    finally:
        for handle in handles:
            handle.remove()
    weights = tensor_bytes([*encoder.parameters(), *encoder.buffers()])
    return StepMemory(batch=len(images), weights=weights, inputs=tensor_bytes([batch]),
                      activations=largest[0], gradients=0, optimizer_state=0)


def static_bytes(encoder: nn.Module, trainable: str, config: AdaptConfig) -> StepMemory:
    """What a step of ``trainable`` holds before any activation: weights, heads, grads, optimizer."""
    work = copy.deepcopy(encoder)
    apply_trainables(work, trainable, lora_rank=config.lora_rank)
    modules = [work] if trainable == "bn-stats" else [build_method(work, config)]
    weights = tensor_bytes([t for m in modules for t in (*m.parameters(), *m.buffers())])
    grads = sum(p.numel() * p.element_size() for m in modules for p in m.parameters() if p.requires_grad)
    factor = OPTIMIZER_STATE_FACTOR.get(config.optimizer, 2)
    return StepMemory(batch=0, weights=weights, inputs=0, activations=0, gradients=grads,
                      optimizer_state=factor * grads)


def _candidate(
    encoder: nn.Module, trainable: str, images: np.ndarray, targets: np.ndarray,
    config: AdaptConfig, budget_bytes: float, checkpointing: bool, block_bytes_per_image: float = 0.0,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> Candidate:
    fixed = static_bytes(encoder, trainable, config)
    if fixed.model_bytes > budget_bytes:  # no batch can fit: skip the (slow) measurement
        return Candidate(trainable, checkpointing, MemoryFit(fixed.model_bytes, 0.0), 0, fixed)
    small = measure_configuration(encoder, trainable, images, targets, config, batch=MIN_BATCH,
                                  checkpointing=checkpointing,
                                  block_bytes_per_image=block_bytes_per_image, replay=replay)
    large = measure_configuration(encoder, trainable, images, targets, config, batch=2 * MIN_BATCH,
                                  checkpointing=checkpointing,
                                  block_bytes_per_image=block_bytes_per_image, replay=replay)
    fit = fit_memory(small, large)
    return Candidate(trainable, checkpointing, fit, fit.largest_batch(budget_bytes, config.batch_size),
                     large)


def plan_adaptation(
    encoder: nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    config: AdaptConfig,
    *,
    budget_mb: float,
    budget_source: str,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> AdaptPlan:
    """Measure the candidate subsets (``auto``: AUTO_ORDER) and take the first that fits.

    ``replay`` (clean images, deployed embeddings): each step also runs as many of them as
    local images, so the plan measures them too.

    Checkpointing is tried for a subset whose plain step does not fit (``auto``), always
    (``on``) or never (``off``). Raises ConfigError naming the minimum budget when none fits.
    """
    kinds = AUTO_ORDER if config.trainable == "auto" else (config.trainable,)
    budget = budget_mb * MIB
    probe = max(2 * MIN_BATCH, 8)
    images, targets = images[:probe], targets[:probe]
    if replay is not None:
        take = np.arange(probe) % len(replay[0])
        replay = (replay[0][take], replay[1][take])
    tried: list[Candidate] = []
    for kind in kinds:
        plain = _candidate(encoder, kind, images, targets, config, budget, checkpointing=False,
                           replay=replay)
        options = [] if config.checkpointing == "on" and kind != "bn-stats" else [plain]
        needs = config.checkpointing == "on" or (
            config.checkpointing == "auto" and plain.batch < MIN_BATCH and plain.fit.per_image > 0)
        if needs and kind != "bn-stats":
            per_image = plain.memory.largest_block / plain.memory.batch
            options.append(_candidate(encoder, kind, images, targets, config, budget, True,
                                      block_bytes_per_image=per_image, replay=replay))
        tried.extend(options)
        fitting = [c for c in options if c.batch >= MIN_BATCH]
        if fitting:
            best = fitting[0]
            return AdaptPlan(best.trainable, best.checkpointing, best.batch,
                             best.fit.at(best.batch) / MIB, budget_mb, budget_source, tuple(tried))
    smallest = min(tried, key=lambda c: c.fit.at(MIN_BATCH))
    raise ConfigError(
        f"--budget-mb {budget_mb:g} is too small for any adaptation step "
        f"(tried {', '.join(sorted({c.trainable for c in tried}))}). The smallest configuration, "
        f"trainable={smallest.trainable}{' with checkpointing' if smallest.checkpointing else ''} "
        f"at batch {MIN_BATCH}, needs {smallest.fit.at(MIN_BATCH) / MIB:.1f} MB. Raise --budget-mb "
        f"to at least that{AUTO_ORDER_NOTE if config.trainable != 'auto' else ''}."
    )
