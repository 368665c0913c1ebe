"""SSL pretraining: one loop for every method, on CPU or CUDA, single process or DDP."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.bundle import Bundle, BundleWriter, atomic_write_bytes, lineage_entry
from edge_ssl.config import check_choice, check_positive, config_from_dict, config_to_dict
from edge_ssl.data import ImageDataset
from edge_ssl.errors import CheckpointError, ConfigError, DataError, TrainingError

AMP_MODES = ("auto", "off", "fp16", "bf16")
CHECKPOINT_NAME = "last.pt"


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one pretraining run.

    ``lr`` is the base rate for a batch of 256 (scaled linearly with the global batch);
    leave ``optimizer``, ``lr`` and ``weight_decay`` unset to use the method's paper
    defaults. Small CPU runs train best with ``warmup_epochs`` around 10% of ``epochs``.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch_kwargs", dict(self.arch_kwargs))
        object.__setattr__(self, "method_kwargs", dict(self.method_kwargs))
        check_positive("PretrainConfig", epochs=self.epochs, batch_size=self.batch_size)
        if self.batch_size < 2:
            raise ConfigError(f"PretrainConfig.batch_size must be >= 2 for SSL, got {self.batch_size}.")
        if self.lr is not None:
            check_positive("PretrainConfig", lr=self.lr)
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"PretrainConfig.weight_decay must be >= 0, got {self.weight_decay}.")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"PretrainConfig.warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}."
            )
        if not 0 <= self.final_lr_ratio <= 1:
            raise ConfigError(f"PretrainConfig.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}.")
        if self.grad_clip is not None:
            check_positive("PretrainConfig", grad_clip=self.grad_clip)
        if self.steps_per_epoch is not None:
            check_positive("PretrainConfig", steps_per_epoch=self.steps_per_epoch)
        check_choice("PretrainConfig", "amp", self.amp, AMP_MODES)
        if self.optimizer is not None:
            from edge_ssl.optim import OPTIMIZERS

            check_choice("PretrainConfig", "optimizer", self.optimizer, OPTIMIZERS)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainConfig:
        return config_from_dict(cls, values)

    def check_names(self) -> None:
        """Fail fast on an unknown method or encoder, before any data is loaded."""
        from edge_ssl.methods import METHODS
        from edge_ssl.models import ENCODERS

        METHODS.get(self.method)
        ENCODERS.get(self.arch)


@dataclass(frozen=True)
class ProgressEvent:
    """Reported after every optimizer step (rank 0 only)."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    lr: float
    images_per_second: float


@dataclass
class PretrainResult:
    """What a run produced; ``bundle`` is None on ranks other than 0."""

    bundle: Bundle | None
    encoder: Any  # the trained encoder (torch module, on CPU)
    final_loss: float
    epochs_run: int
    images_per_second: float
    history: list[dict[str, float]]


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where a run keeps its resumable checkpoint: ``NAME.edge`` -> ``NAME.edge.ckpt/``."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> _Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Dist()
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns_group)


def _resolve_device(requested: str, dist: _Dist) -> Any:
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {requested!r} requested but torch sees no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu."
            )
        if dist.enabled:
            requested = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(torch.device(requested))
    elif requested != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {requested!r}.")
    return torch.device(requested)


def amp_dtype(mode: str, device: Any) -> Any:
    """The autocast dtype for ``mode`` on ``device``, or None for full precision."""
    import torch

    if device.type != "cuda" or mode == "off":
        # CPU autocast is slower than fp32 on most CPUs and changes numerics for no gain.
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _fingerprint(data: ImageDataset) -> str:
    """A cheap identity of the training data, so --resume refuses a different data set."""
    import hashlib

    sample = data.images[:: max(1, len(data) // 64)]
    return hashlib.sha256(sample.tobytes() + str(data.images.shape).encode()).hexdigest()[:16]


def pretrain(
    config: PretrainConfig,
    data: ImageDataset,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[ProgressEvent], None] | None = None,
) -> PretrainResult:
    """Train ``config.method`` on ``data`` and write the encoder bundle to ``out``.

    A checkpoint is written after every epoch to ``checkpoint_dir(out)``; with
    ``resume`` the run continues from it. A NaN/inf loss raises TrainingError and
    keeps the last good checkpoint. Under ``torchrun`` every process trains its shard
    with DistributedDataParallel and rank 0 writes the bundle.
    """
    import torch

    from edge_ssl.methods import create_method
    from edge_ssl.models import create_encoder
    from edge_ssl.optim import build_optimizer, cosine_with_warmup, scaled_lr
    from edge_ssl.tensors import images_to_tensor
    from edge_ssl.views import ViewAugment, view_preset

    out = Path(out)
    if out.exists() and not overwrite and not resume:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
    ckpt_path = checkpoint_dir(out) / CHECKPOINT_NAME
    if resume and not ckpt_path.is_file():
        raise CheckpointError(
            f"--resume given but no checkpoint at {ckpt_path}; start without --resume."
        )

    device_kind = "cuda" if config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    ) else "cpu"
    dist_info = _init_distributed(device_kind)
    device = _resolve_device(config.device, dist_info)
    torch.manual_seed(config.seed)  # same initial weights on every rank

    encoder = create_encoder(config.arch, **config.arch_kwargs)
    method = create_method(config.method, encoder, **config.method_kwargs).to(device)
    spec = encoder.spec
    global_batch = config.batch_size * dist_info.world_size
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise DataError(
            f"{len(data)} images are fewer than one global batch of {global_batch} "
            f"({config.batch_size} x {dist_info.world_size} processes); lower --batch-size."
        )
    if config.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))

    optimizer_name = config.optimizer or method.default_optimizer
    base_lr = scaled_lr(config.lr if config.lr is not None else method.default_lr, global_batch)
    weight_decay = (
        config.weight_decay if config.weight_decay is not None else method.default_weight_decay
    )
    optimizer = build_optimizer(
        optimizer_name, method.parameter_groups(weight_decay), base_lr, weight_decay
    )
    autocast_dtype = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)

    model: torch.nn.Module = method
    if dist_info.enabled:
        if config.sync_batchnorm and device.type == "cuda":  # SyncBatchNorm has no CPU kernel
            method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None
        )

    view_config = view_preset(
        method.view_preset, spec.input.image_size, local_crops=method.num_local_views
    )
    views = ViewAugment(view_config, spec.input).to(device)
    settings = config_to_dict(config) | {
        "optimizer_resolved": optimizer_name,
        "lr_resolved": base_lr,
        "weight_decay_resolved": weight_decay,
        "world_size": dist_info.world_size,
        "global_batch": global_batch,
        "data": data.source,
        "num_images": len(data),
    }
    comparable = {k: v for k, v in settings.items() if k not in ("epochs", "data")}

    start_epoch, history = 0, []
    if resume:
        state = _load_checkpoint(ckpt_path)
        saved = state["settings"]
        saved_cmp = {k: v for k, v in saved.items() if k not in ("epochs", "data")}
        if saved_cmp != comparable or state["data_fingerprint"] != _fingerprint(data):
            diff = sorted(k for k in set(saved_cmp) | set(comparable) if saved_cmp.get(k) != comparable.get(k))
            what = ", ".join(diff) if diff else "the training data"
            raise CheckpointError(
                f"cannot resume from {ckpt_path}: it was started with different settings ({what}). "
                "Resume with the same command (only --epochs may grow) or start a new --out."
            )
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        history = list(state["history"])
        if start_epoch >= config.epochs:
            raise ConfigError(
                f"the checkpoint already finished {start_epoch} epochs; pass --epochs > {start_epoch} to train more."
            )

    images_seen, train_seconds, last_loss = 0, 0.0, float("nan")
    for epoch in range(start_epoch, config.epochs):
        model.train()
        # Seeded per epoch (and per rank for the views), so a resumed run draws exactly
        # the batches and augmentations the uninterrupted run would have.
        torch.manual_seed(config.seed + 1000 * epoch + dist_info.rank)
        order = np.random.default_rng(config.seed + epoch).permutation(len(data))
        epoch_losses = []
        epoch_start = time.perf_counter()
        for step in range(steps_per_epoch):
            global_step = epoch * steps_per_epoch + step
            lr = cosine_with_warmup(
                global_step, total_steps, warmup_steps, base_lr, base_lr * config.final_lr_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = step * global_batch + dist_info.rank * config.batch_size
            index = np.sort(order[start : start + config.batch_size])
            batch = images_to_tensor(data.images[index], device)
            batch_views = views(batch)
            with torch.autocast(
                device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ):
                loss, _logs = model(batch_views)
            loss_value = _global_mean(loss.detach().float(), dist_info)
            if not np.isfinite(loss_value):
                raise TrainingError(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; stopped. "
                    f"The last good checkpoint is kept at {ckpt_path if ckpt_path.exists() else '(none yet)'}. "
                    "Lower --lr, add --grad-clip, or use --amp off."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(method.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            method.momentum_update((global_step + 1) / total_steps)
            epoch_losses.append(loss_value)
            last_loss = loss_value
            elapsed = time.perf_counter() - epoch_start
            if progress is not None and dist_info.is_main:
                progress(
                    ProgressEvent(
                        epoch=epoch + 1,
                        epochs=config.epochs,
                        step=step + 1,
                        steps_per_epoch=steps_per_epoch,
                        loss=loss_value,
                        lr=lr,
                        images_per_second=(step + 1) * global_batch / max(elapsed, 1e-9),
                    )
                )
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        images_seen += steps_per_epoch * global_batch
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(epoch_losses)),
                "seconds": epoch_seconds,
                "images_per_second": steps_per_epoch * global_batch / epoch_seconds,
            }
        )
        if dist_info.is_main:
            _save_checkpoint(
                ckpt_path,
                {
                    "method": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "settings": settings,
                    "data_fingerprint": _fingerprint(data),
                },
            )
        _barrier(dist_info)

    _sync_buffers(method, dist_info)
    trained = method.trained_encoder()
    images_per_second = images_seen / train_seconds if train_seconds else 0.0
    bundle = None
    if dist_info.is_main:
        bundle = _write_bundle(out, trained, settings, history, images_per_second, overwrite or resume)
    _barrier(dist_info)
    if dist_info.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return PretrainResult(
        bundle=bundle,
        encoder=_cpu_copy(trained),
        final_loss=last_loss,
        epochs_run=config.epochs - start_epoch,
        images_per_second=images_per_second,
        history=history,
    )


def _global_mean(value: Any, dist_info: _Dist) -> float:
    """The loss averaged over ranks, so every rank takes the same NaN decision."""
    if dist_info.enabled:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        value /= dist_info.world_size
    return float(value)


def _sync_buffers(module: Any, dist_info: _Dist) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP syncs them only before forward)."""
    if dist_info.enabled:
        import torch.distributed as dist

        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _barrier(dist_info: _Dist) -> None:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def _cpu_copy(encoder: Any) -> Any:
    import copy

    clone = copy.deepcopy(encoder).cpu()
    clone.eval()
    return clone


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import io

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise TrainingError(
            f"could not write checkpoint {path}: {exc.strerror or exc} (is the disk full?); "
            "the previous checkpoint is kept."
        ) from exc


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); "
            "remove it and start without --resume."
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
    name = out.name.removesuffix(".edge")
    with BundleWriter(out, overwrite=overwrite) as writer:
        writer.save_state_dict(encoder.state_dict())
        return writer.commit(
            name=name,
            encoder=encoder.spec,
            lineage=(lineage_entry("pretrain", settings),),
            metrics=metrics,
        )
