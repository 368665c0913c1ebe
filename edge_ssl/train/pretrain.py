"""SSL pretraining: one loop for every method, on CPU or CUDA, single process or DDP."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.bundle import Bundle, atomic_write_bytes, lineage_entry
from edge_ssl.config import (
    check_choice,
    check_flag,
    check_int,
    check_number,
    config_from_dict,
    config_to_dict,
)
from edge_ssl.errors import CheckpointError, ConfigError, DataError, TrainingError
from edge_ssl.output_check import write_stage_bundle
from edge_ssl.outputs import checkpoint_dir
from edge_ssl.stage import StageResult

AMP_MODES = ("auto", "off", "fp16", "bf16")
CHECKPOINT_NAME = "last.pt"
#: Settings that may differ on --resume: they change speed or logging, not what is learned.
RUNTIME_SETTINGS = frozenset({"epochs", "data", "channels_last", "compile", "cuda_graphs", "log_every"})
#: Steps between host syncs on CUDA (loss read-out, NaN check, progress); CPU syncs every step.
CUDA_LOG_EVERY = 50


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run.

    ``lr`` is the base rate for a batch of 256 (scaled linearly with the global batch);
    leave ``optimizer``, ``lr`` and ``weight_decay`` unset to use the method's paper
    defaults. Small CPU runs train best with ``warmup_epochs`` around 10% of ``epochs``.
    ``log_every``: optimizer steps between reading the loss back to the host (progress and
    the NaN check happen there); None = every step on CPU, 50 on CUDA.
    """

    method: str = "byol"
    arch: str = "resnet18_cifar"
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 256  # per process
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    final_lr_ratio: float = 0.0
    grad_clip: float | None = None
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    steps_per_epoch: int | None = None  # cap, for smoke runs; None = a full pass over the data
    sync_batchnorm: bool = True  # under DDP
    channels_last: bool = True  # CUDA only: NHWC convolutions (tensor cores)
    compile: bool = False  # torch.compile the method's forward (encoder + loss)
    cuda_graphs: bool = False  # compile with mode="reduce-overhead" (CUDA graphs; small models)
    log_every: int | None = None

    def __post_init__(self) -> None:
        from edge_ssl.device import parse_device_name

        owner = "PretrainConfig"
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))
        object.__setattr__(self, "method_kwargs", dict(self.method_kwargs))
        check_int(owner, "epochs", self.epochs)
        check_int(owner, "batch_size", self.batch_size, 2)  # SSL losses need pairs
        check_int(owner, "seed", self.seed, None)
        if self.lr is not None:
            check_number(owner, "lr", self.lr, 0, low_open=True)
        if self.weight_decay is not None:
            check_number(owner, "weight_decay", self.weight_decay, 0)
        check_number(owner, "warmup_epochs", self.warmup_epochs, 0, self.epochs)
        check_number(owner, "final_lr_ratio", self.final_lr_ratio, 0, 1)
        if self.grad_clip is not None:
            check_number(owner, "grad_clip", self.grad_clip, 0, low_open=True)
        for name in ("steps_per_epoch", "log_every"):
            if getattr(self, name) is not None:
                check_int(owner, name, getattr(self, name))
        for name in ("sync_batchnorm", "channels_last", "compile", "cuda_graphs"):
            check_flag(owner, name, getattr(self, name))
        check_choice(owner, "amp", self.amp, AMP_MODES)
        parse_device_name(self.device)
        if self.optimizer is not None:
            from edge_ssl.train.optim import OPTIMIZERS

            check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainConfig:
        return config_from_dict(cls, values)

    def check_names(self) -> None:
        """Fail fast on an unknown method, encoder or method setting, before any data is loaded."""
        from edge_ssl.models import ENCODERS
        from edge_ssl.train.methods import METHODS

        config_from_dict(METHODS.get(self.method).config_class, self.method_kwargs)
        ENCODERS.get(self.arch)


@dataclass(frozen=True)
class ProgressEvent:
    """Reported at every loss read-out (rank 0 only): each step on CPU, every ``log_every`` on CUDA.

    ``loss`` is the mean over the steps since the previous event.
    """

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    lr: float
    images_per_second: float


@dataclass
class PretrainResult(StageResult):
    """What a run produced; ``bundle`` is None on ranks other than 0."""

    encoder: Any  # the trained encoder (torch module, on CPU)
    final_loss: float
    epochs_run: int
    images_per_second: float
    history: list[dict[str, float]]


# --------------------------------------------------------------------------- checks before work


def check_outputs(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse unusable output locations before any data is loaded; returns the checkpoint path.

    ``out`` must be a new bundle path (or an existing bundle with ``overwrite``/``resume``),
    in a writable folder; an existing checkpoint folder ``OUT.ckpt/`` must be writable.
    """
    from edge_ssl.outputs import check_bundle_out, require_writable_dir

    ckpt_path = checkpoint_dir(out) / CHECKPOINT_NAME
    check_bundle_out(out, overwrite=overwrite or resume)
    if resume and not ckpt_path.is_file():
        raise CheckpointError(f"--resume given but no checkpoint at {ckpt_path}; start without --resume.")
    if ckpt_path.parent.is_dir():
        require_writable_dir(ckpt_path.parent, "--out")
    return ckpt_path


# --------------------------------------------------------------------------- precision


def autocast_dtype_name(mode: str, device_type: str, capability: tuple[int, int] | None) -> str | None:
    """'bf16', 'fp16' or None (full precision) for ``--amp mode`` on a device.

    'auto' is bf16 on Ampere (sm_80) and newer (as fast as fp16, no loss scaling) and
    fp16 on older GPUs. CPU autocast is slower than fp32 on most CPUs: always off there.
    """
    check_choice("PretrainConfig", "amp", mode, AMP_MODES)
    if device_type != "cuda" or mode == "off":
        return None
    if mode != "auto":
        return mode
    return "bf16" if capability is not None and tuple(capability) >= (8, 0) else "fp16"


def amp_dtype(mode: str, device: Any) -> Any:
    """The autocast torch dtype for ``mode`` on ``device``, or None for full precision."""
    import torch

    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    name = autocast_dtype_name(mode, device.type, capability)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[name]


# --------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """Everything one training run holds (built by ``_setup``)."""

    config: PretrainConfig
    source: Any  # BatchSource
    dist: Any  # DistInfo
    device: Any
    method: Any  # the SSLMethod (state dicts, momentum updates)
    model: Any  # what is called for the loss: method, DDP(method) and/or torch.compile of it
    optimizer: Any
    scaler: Any
    views: Any
    autocast: Any  # torch dtype or None
    steps_per_epoch: int
    warmup_steps: int
    base_lr: float
    settings: dict[str, Any]
    ckpt_path: Path
    log_every: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.dist.world_size


def _count_steps(config: PretrainConfig, source: Any, world_size: int) -> int:
    """Optimizer steps per epoch, or DataError when the data cannot fill one global batch."""
    global_batch = config.batch_size * world_size
    steps = source.steps_per_epoch(config.batch_size, world_size)
    if steps == 0:
        raise DataError(
            f"{source.source}: {source.num_images} images are fewer than one global batch of "
            f"{global_batch} (--batch-size {config.batch_size} x {world_size} processes); "
            "lower --batch-size or add images with --data."
        )
    return min(steps, config.steps_per_epoch) if config.steps_per_epoch else steps


def _setup(config: PretrainConfig, source: Any, ckpt_path: Path) -> _Run:
    """Device, process group, method, optimizer, views and the model the step calls."""
    from edge_ssl.device import device_kind
    from edge_ssl.train.distributed import init_distributed, shutdown

    dist = init_distributed(device_kind(config.device))
    try:
        return _build_run(config, source, ckpt_path, dist)
    except BaseException:
        shutdown(dist)  # a failed setup (bad device, too few images, OOM) must not leak the group
        raise


def _build_run(config: PretrainConfig, source: Any, ckpt_path: Path, dist: Any) -> _Run:
    """Everything ``_setup`` does once the process group (if any) exists."""
    import torch

    from edge_ssl.data.views import ViewAugment, view_preset
    from edge_ssl.device import activate_device, resolve_device
    from edge_ssl.models import create_encoder
    from edge_ssl.train.distributed import wrap_ddp
    from edge_ssl.train.methods import create_method
    from edge_ssl.train.optim import build_optimizer, scaled_lr

    device = resolve_device(config.device, local_rank=dist.local_rank if dist.enabled else None)
    activate_device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest conv kernels once
    steps = _count_steps(config, source, dist.world_size)
    torch.manual_seed(config.seed)  # same initial weights on every rank
    method = create_method(config.method, create_encoder(config.arch, **config.arch_kwargs), **config.method_kwargs)
    if device.type == "cuda" and config.channels_last:
        method = method.to(memory_format=torch.channels_last)
    method = method.to(device)
    global_batch = config.batch_size * dist.world_size
    optimizer_name = config.optimizer or method.default_optimizer
    base_lr = scaled_lr(config.lr if config.lr is not None else method.default_lr, global_batch)
    weight_decay = config.weight_decay if config.weight_decay is not None else method.default_weight_decay
    optimizer = build_optimizer(
        optimizer_name, method.parameter_groups(weight_decay), base_lr, weight_decay, device_type=device.type
    )
    autocast = amp_dtype(config.amp, device)
    model = wrap_ddp(method, device, sync_batchnorm=config.sync_batchnorm) if dist.enabled else method
    if config.compile or config.cuda_graphs:
        model = torch.compile(model, mode="reduce-overhead" if config.cuda_graphs else None)
    spec = method.encoder.spec
    views = ViewAugment(view_preset(method.view_preset, spec.input.image_size, local_crops=method.num_local_views), spec.input)
    settings = config_to_dict(config) | {
        "optimizer_resolved": optimizer_name,
        "lr_resolved": base_lr,
        "weight_decay_resolved": weight_decay,
        "world_size": dist.world_size,
        "global_batch": global_batch,
        "data": source.source,
        "num_images": source.num_images,
    }
    return _Run(
        config=config, source=source, dist=dist, device=device, method=method, model=model,
        optimizer=optimizer, scaler=torch.amp.GradScaler("cuda", enabled=autocast == torch.float16),
        views=views.to(device), autocast=autocast, steps_per_epoch=steps,
        warmup_steps=int(round(config.warmup_epochs * steps)), base_lr=base_lr, settings=settings,
        ckpt_path=ckpt_path, log_every=config.log_every or (CUDA_LOG_EVERY if device.type == "cuda" else 1),
    )


def _restore(run: _Run) -> tuple[int, list[dict[str, float]]]:
    """Load the checkpoint into the run after checking it was started the same way."""
    state = _load_checkpoint(run.ckpt_path)
    saved = {k: v for k, v in state["settings"].items() if k not in RUNTIME_SETTINGS}
    now = {k: v for k, v in run.settings.items() if k not in RUNTIME_SETTINGS}
    if saved != now or state["data_fingerprint"] != run.source.fingerprint():
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise CheckpointError(
            f"cannot resume from {run.ckpt_path}: it was started with different settings "
            f"({', '.join(diff) if diff else 'the training data'}). "
            "Resume with the same command (only --epochs may grow) or start a new --out."
        )
    start_epoch = int(state["epoch"])
    if start_epoch >= run.config.epochs:
        raise ConfigError(
            f"the checkpoint already finished {start_epoch} epochs; pass --epochs > {start_epoch} to train more."
        )
    run.method.load_state_dict(state["method"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    return start_epoch, list(state["history"])


def _train_step(run: _Run, batch: Any, global_step: int) -> Any:
    """One optimizer step on a (N, 3, H, W) 0..1 batch; returns the detached loss ON THE DEVICE.

    Nothing here waits for the GPU (no ``.item()``): the loss is read back in
    ``_train_epoch`` every ``log_every`` steps.
    """
    import torch

    from edge_ssl.train.optim import cosine_with_warmup

    config = run.config
    lr = cosine_with_warmup(
        global_step, run.total_steps, run.warmup_steps, run.base_lr, run.base_lr * config.final_lr_ratio
    )
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if config.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new training step: earlier outputs may be reused
    views = run.views(batch)
    if run.device.type == "cuda" and config.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    mixed = contextlib.nullcontext() if run.autocast is None else torch.autocast(run.device.type, run.autocast)
    with mixed:
        loss, _logs = run.model(views)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if config.grad_clip is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.method.parameters(), config.grad_clip, foreach=True)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.method.momentum_update((global_step + 1) / run.total_steps)
    # A copy: with CUDA graphs the loss lives in graph memory that the next replay overwrites.
    return loss.detach().float().clone()


def _read_loss(run: _Run, total: Any, count: int, epoch: int, first_step: int, last_step: int) -> float:
    """Mean loss of the steps since the last read-out (over ranks): the one host sync point.

    A NaN/inf raises here, so it is found at most ``log_every`` steps late; the checkpoint
    is written only after an epoch read out finite, so the last good one is kept.
    """
    import math

    from edge_ssl.train.distributed import mean_over_ranks

    value = float(mean_over_ranks(total / count))
    if not math.isfinite(value):
        where = f"step {first_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
        kept = run.ckpt_path if run.ckpt_path.exists() else "(none yet)"
        raise TrainingError(
            f"loss became {value} at epoch {epoch + 1}, {where}; stopped. The last good checkpoint "
            f"is kept at {kept}. Lower --lr, add --grad-clip, or use --amp off."
        )
    return value


def _train_epoch(run: _Run, epoch: int, progress: Callable[[ProgressEvent], None] | None) -> dict[str, float]:
    """Train one epoch; returns its history entry (mean loss, seconds, images/s)."""
    import torch

    config, dist = run.config, run.dist
    run.model.train()
    # Seeded per epoch (and per rank for the views), so a resumed run draws exactly
    # the batches and augmentations the uninterrupted run would have.
    torch.manual_seed(config.seed + 1000 * epoch + dist.rank)
    batches = run.source.epoch_batches(
        epoch, config.batch_size, rank=dist.rank, world_size=dist.world_size, seed=config.seed, device=run.device
    )
    start = time.perf_counter()
    window, window_start, losses = None, 0, []
    for step, batch in zip(range(run.steps_per_epoch), batches, strict=False):
        loss = _train_step(run, batch, epoch * run.steps_per_epoch + step)
        window = loss if window is None else window + loss
        if (step + 1) % run.log_every and step + 1 != run.steps_per_epoch:
            continue
        count = step + 1 - window_start
        value = _read_loss(run, window, count, epoch, window_start + 1, step + 1)
        losses.append((value, count))
        window, window_start = None, step + 1
        if progress is not None and dist.is_main:
            progress(ProgressEvent(
                epoch=epoch + 1, epochs=config.epochs, step=step + 1, steps_per_epoch=run.steps_per_epoch,
                loss=value, lr=run.optimizer.param_groups[0]["lr"],
                images_per_second=(step + 1) * run.global_batch / max(time.perf_counter() - start, 1e-9),
            ))
    _close(batches)
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch + 1,
        "loss": sum(v * n for v, n in losses) / sum(n for _, n in losses),
        "seconds": seconds,
        "images_per_second": run.steps_per_epoch * run.global_batch / seconds,
    }


def _close(batches: Iterator[Any]) -> None:
    close = getattr(batches, "close", None)  # stop a generator (and its workers) early
    if close is not None:
        close()


def pretrain(
    config: PretrainConfig,
    data: Any,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> PretrainResult:
    """Train ``config.method`` on ``data`` and write the encoder bundle to ``out``.

    ``data`` is an :class:`~edge_ssl.data.sources.ImageDataset` or any
    :class:`~edge_ssl.data.batches.BatchSource` (e.g. a streaming source). Output locations
    are checked before anything is loaded. A checkpoint is written after every epoch to
    ``checkpoint_dir(out)``; with ``resume`` the run continues from it. A NaN/inf loss
    raises TrainingError and keeps the last good checkpoint. Under ``torchrun`` every
    process trains its shard with DistributedDataParallel and rank 0 writes the bundle.
    """
    from edge_ssl.data.batches import as_batch_source
    from edge_ssl.train.distributed import barrier, broadcast_buffers, shutdown

    out = Path(out)
    ckpt_path = check_outputs(out, resume=resume, overwrite=overwrite)
    source = as_batch_source(data)
    run = _setup(config, source, ckpt_path)
    try:
        start_epoch, history = _restore(run) if resume else (0, [])
        for epoch in range(start_epoch, config.epochs):
            history.append(_train_epoch(run, epoch, progress))
            if run.dist.is_main:
                _save_checkpoint(run, epoch + 1, history)
            barrier()
        broadcast_buffers(run.method)
        trained = _cpu_copy(run.method.trained_encoder())
        seconds = sum(h["seconds"] for h in history[start_epoch:])
        images_per_second = (config.epochs - start_epoch) * run.steps_per_epoch * run.global_batch / seconds
        bundle = None
        if run.dist.is_main:
            bundle = _write_bundle(out, trained, run.settings, history, images_per_second, overwrite or resume)
        barrier()
    finally:
        shutdown(run.dist)
    result = PretrainResult(
        encoder=trained,
        final_loss=history[-1]["loss"],
        epochs_run=config.epochs - start_epoch,
        images_per_second=images_per_second,
        history=history,
    )
    result.wrote(bundle)
    return result


# --------------------------------------------------------------------------- files


def _cpu_copy(encoder: Any) -> Any:
    import copy

    import torch

    clone = copy.deepcopy(encoder).cpu().to(memory_format=torch.contiguous_format)
    clone.eval()
    return clone


def _save_checkpoint(run: _Run, epochs_done: int, history: list[dict[str, float]]) -> None:
    import io

    import torch

    state = {
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": epochs_done,
        "history": history,
        "settings": run.settings,
        "data_fingerprint": run.source.fingerprint(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        run.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run.ckpt_path, buffer.getvalue())
    except OSError as exc:
        raise TrainingError(
            f"could not write checkpoint {run.ckpt_path}: {exc.strerror or exc} (is the disk full?); "
            "the previous checkpoint is kept."
        ) from exc


def _load_checkpoint(path: Path) -> dict[str, Any]:
    from edge_ssl.torchio import load_torch_file

    try:
        state = load_torch_file(path)
    except CheckpointError:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated; remove it and start without --resume."
        ) from None
    required = ("method", "optimizer", "scaler", "epoch", "history", "settings", "data_fingerprint")
    if not isinstance(state, dict) or any(key not in state for key in required):
        raise CheckpointError(f"{path} is not an edge-ssl pretraining checkpoint.")
    return state


def _write_bundle(
    out: Path,
    encoder: Any,
    settings: dict[str, Any],
    history: list[dict[str, float]],
    images_per_second: float,
    overwrite: bool,
) -> Bundle:
    from edge_ssl.models import count_parameters

    metrics = {
        "params": count_parameters(encoder),
        "pretrain": {
            "final_epoch_loss": history[-1]["loss"] if history else None,
            "epochs": len(history),
            "images_per_second": images_per_second,
        },
    }
    return write_stage_bundle(
        out, encoder, stage="pretrain", lineage=(lineage_entry("pretrain", settings),),
        metrics=metrics, overwrite=overwrite,
    )
