"""The distillation training loop: objective module, teacher cache, checkpoints, DDP."""

from __future__ import annotations

import copy
import hashlib
import io
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from edge_ssl.compress.distill_config import (
    AUTO_CPU_CACHE_VIEWS,
    CACHE_NAME,
    CHECKPOINT_NAME,
    DistillConfig,
    DistillProgress,
    DistillResult,
)
from edge_ssl.compress.losses import FeatureRegressionLoss, SEEDLoss, distill_head
from torch import nn

from edge_ssl.bundle import atomic_write_bytes
from edge_ssl.config import config_to_dict
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import CheckpointError, ConfigError, TrainingError
from edge_ssl.tensors import images_to_tensor, normalize


class DistillObjective(nn.Module):
    """Student + projection head + the selected losses; ``forward(views, teacher) -> (loss, logs)``.

    ``views``: list of normalized (N, 3, H, W) views; ``teacher``: (V * N, D_t) teacher
    embeddings of the same views in the same order. With the ``ssl`` objective the student's
    SSL method runs on the views and its encoder output is reused for distillation (one
    student forward, captured with a hook).
    """

    def __init__(self, student: nn.Module, teacher_dim: int, config: DistillConfig) -> None:
        super().__init__()
        self.student = student
        self.config = config
        self.head = distill_head(student.spec.embed_dim, teacher_dim, config.head_hidden_dim)
        self.feature = FeatureRegressionLoss()
        self.seed_loss = (
            SEEDLoss(teacher_dim, config.queue_size, config.student_temperature, config.teacher_temperature)
            if "seed" in config.objectives
            else None
        )
        self.ssl: nn.Module | None = None
        if "ssl" in config.objectives:
            from edge_ssl.train.methods import create_method

            self.ssl = create_method(config.ssl_method, student, **config.ssl_kwargs)

    def forward(self, views: Sequence[torch.Tensor], teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logs: dict[str, torch.Tensor] = {}
        loss = teacher.new_zeros(())
        if self.ssl is not None:
            features, ssl_loss = self._ssl_forward(views)
            loss = loss + self.config.weight("ssl") * ssl_loss
            logs["ssl"] = ssl_loss.detach()
        else:
            features = self.student(torch.cat(list(views)))
        projected = self.head(features)
        if "feature" in self.config.objectives:
            term = self.feature(projected, teacher)
            loss = loss + self.config.weight("feature") * term
            logs["feature"] = term.detach()
        if self.seed_loss is not None:
            term = self.seed_loss(projected, teacher)
            loss = loss + self.config.weight("seed") * term
            logs["seed"] = term.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def _ssl_forward(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.student.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            ssl_loss, _ = self.ssl(list(views))
        finally:
            handle.remove()
        total = sum(v.shape[0] for v in views)
        features = torch.cat(captured) if captured else None
        if features is None or features.shape[0] != total:
            # A method that encodes views in another order: one more forward, still correct.
            features = self.student(torch.cat(list(views)))
        return features, ssl_loss


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and norm parameters (as the SSL methods do)."""
    decay, no_decay, seen = [], [], set()
    for name, param in module.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def data_fingerprint(data: ImageDataset) -> str:
    images = data.images
    sample = images[:: max(1, len(images) // 64)]
    return hashlib.sha256(sample.tobytes() + str(images.shape).encode()).hexdigest()[:16]


@dataclass
class TeacherCache:
    """N fixed views of every image (uint8 NHWC, view 0 = the image) and their teacher embeddings."""

    views: np.ndarray  # (K, N, H, W, 3) uint8
    embeddings: torch.Tensor  # (K, N, D) float32, CPU

    @property
    def num_views(self) -> int:
        return int(self.views.shape[0])


def build_teacher_cache(teacher: nn.Module, data: ImageDataset, student_spec: Any, num_views: int,
                        *, seed: int, view_preset: str, device: torch.device,
                        batch_size: int = 256) -> TeacherCache:
    """Draw ``num_views - 1`` augmented views per image (seeded) and embed all with the teacher."""
    from edge_ssl.data.views import ViewAugment
    from edge_ssl.data.views import view_preset as make_preset

    spec = student_spec.input
    generator = torch.Generator().manual_seed(seed)
    augment = ViewAugment(make_preset(view_preset, spec.image_size), spec, generator=generator).to(device)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    views = np.empty((num_views, *data.images.shape), dtype=np.uint8)
    views[0] = data.images
    embeddings = []
    for k in range(num_views):
        chunks = []
        for start in range(0, len(data), batch_size):
            batch = images_to_tensor(data.images[start : start + batch_size], device)
            if k > 0:
                pixels = augment(batch)[0] * std + mean
                as_uint8 = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
                views[k, start : start + len(batch)] = as_uint8.permute(0, 2, 3, 1).cpu().numpy()
                batch = as_uint8.float() / 255.0
            chunks.append(teacher_embed(teacher, normalize(batch, spec), student_spec).cpu())
        embeddings.append(torch.cat(chunks))
    return TeacherCache(views, torch.stack(embeddings))


class DistillSession:
    """One distillation run's state: objective, optimizer, data order, cache, checkpoints."""

    def __init__(self, **state: Any) -> None:
        self.__dict__.update(state)

    @classmethod
    def build(cls, student: nn.Module, teacher: nn.Module, data: ImageDataset, config: DistillConfig,
              device: torch.device, dist_info: Any, ckpt_dir: Path | None,
              identity: Mapping[str, Any] | None) -> DistillSession:
        from edge_ssl.data.views import ViewAugment, view_preset
        from edge_ssl.train.distributed import wrap_ddp
        from edge_ssl.train.optim import cosine_with_warmup, scaled_lr  # noqa: F401

        objective = DistillObjective(student, teacher.spec.embed_dim, config).to(device)
        global_batch = config.batch_size * dist_info.world_size
        steps = len(data) // global_batch
        if steps == 0:
            from edge_ssl.errors import DataError

            raise DataError(
                f"{len(data)} images are fewer than one global batch of {global_batch}; lower --batch-size."
            )
        if config.steps_per_epoch is not None:
            steps = min(steps, config.steps_per_epoch)
        cache_views = config.cache_views
        if cache_views is None:
            cache_views = AUTO_CPU_CACHE_VIEWS if device.type == "cpu" else 0
        base_lr = scaled_lr(config.lr, global_batch)
        optimizer = torch.optim.AdamW(_param_groups(objective, config.weight_decay), lr=base_lr)
        model = wrap_ddp(objective, device, sync_batchnorm=True) if dist_info.enabled else objective
        augment = ViewAugment(view_preset(config.views, student.spec.input.image_size), student.spec.input).to(device)
        settings = config_to_dict(config) | {
            "world_size": dist_info.world_size, "cache_views_resolved": cache_views,
            "num_images": len(data), **dict(identity or {}),
        }
        return cls(
            objective=objective, model=model, teacher=teacher, data=data, config=config,
            device=device, dist=dist_info, ckpt_dir=ckpt_dir, optimizer=optimizer, augment=augment,
            steps_per_epoch=steps, global_batch=global_batch, base_lr=base_lr,
            cache_views=cache_views, cache=None, settings=settings, start_epoch=0, history=[],
            fingerprint=data_fingerprint(data),
        )

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_path(self) -> Path | None:
        return None if self.ckpt_dir is None else Path(self.ckpt_dir) / CHECKPOINT_NAME

    def load_checkpoint(self) -> None:
        path = self._ckpt_path()
        if path is None or not path.is_file():
            raise CheckpointError(f"--resume given but no checkpoint at {path}; start without --resume.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt ({type(exc).__name__}); remove it.") from None
        saved = {k: v for k, v in state.get("settings", {}).items() if k != "epochs"}
        now = {k: v for k, v in self.settings.items() if k != "epochs"}
        if saved != now or state.get("fingerprint") != self.fingerprint:
            diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k)) or ["the data"]
            raise CheckpointError(
                f"cannot resume from {path}: it was started with different settings ({', '.join(diff)}). "
                "Resume with the same command (only --epochs may grow) or use a new --out."
            )
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.history = int(state["epoch"]), list(state["history"])
        if self.start_epoch >= self.config.epochs:
            raise ConfigError(
                f"the checkpoint already finished {self.start_epoch} epochs; pass --epochs > {self.start_epoch}."
            )

    def _save_checkpoint(self, epoch: int) -> None:
        path = self._ckpt_path()
        if path is None or not self.dist.is_main:
            return
        state = {
            "objective": self.objective.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": epoch, "history": self.history, "settings": self.settings,
            "fingerprint": self.fingerprint,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:
            raise TrainingError(f"could not write checkpoint {path}: {exc}; the previous one is kept.") from exc

    # ------------------------------------------------------------------ teacher cache
    def _cache_key(self) -> str:
        parts = [self.fingerprint, str(self.cache_views), str(self.config.seed), self.config.views,
                 str(self.settings.get("teacher", "")), str(self.teacher.spec.embed_dim)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def ensure_cache(self) -> None:
        if self.cache_views == 0 or self.cache is not None:
            return
        path = None if self.ckpt_dir is None else Path(self.ckpt_dir) / CACHE_NAME
        key = self._cache_key()
        if path is not None and path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("key") == key:
                self.cache = TeacherCache(state["views"].numpy(), state["embeddings"])
                return
        self.cache = build_teacher_cache(
            self.teacher, self.data, self.objective.student.spec, self.cache_views,
            seed=self.config.seed, view_preset=self.config.views, device=self.device,
        )
        if path is not None and self.dist.is_main:
            buffer = io.BytesIO()
            torch.save({"key": key, "views": torch.from_numpy(self.cache.views),
                        "embeddings": self.cache.embeddings}, buffer)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())

    # ------------------------------------------------------------------ batches
    def _batch(self, epoch: int, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(views, teacher embeddings) for this rank's share of ``step``; seeded, so resumable."""
        order = np.random.default_rng(self.config.seed + epoch).permutation(len(self.data))
        start = step * self.global_batch + self.dist.rank * self.config.batch_size
        index = np.sort(order[start : start + self.config.batch_size])
        spec = self.objective.student.spec.input
        if self.cache is None:
            batch = images_to_tensor(self.data.images[index], self.device)
            views = self.augment(batch)[:2]
            teacher = teacher_embed(self.teacher, torch.cat(views), self.objective.student.spec)
            return views, teacher
        rng = np.random.default_rng([self.config.seed, epoch, step, self.dist.rank])
        picks = rng.choice(self.cache.num_views, 2, replace=False) if self.cache.num_views > 1 else [0, 0]
        views, targets = [], []
        for k in picks:
            pixels = images_to_tensor(self.cache.views[k][index], self.device)
            views.append(normalize(pixels, spec))
            targets.append(self.cache.embeddings[k][torch.from_numpy(index)])
        return views, torch.cat(targets).to(self.device)

    # ------------------------------------------------------------------ loop
    def run(self, progress: Callable[[DistillProgress], None] | None) -> DistillResult:
        from edge_ssl.train.distributed import broadcast_buffers, mean_over_ranks

        self.ensure_cache()
        started, images, last = time.perf_counter(), 0, float("nan")
        for epoch in range(self.start_epoch, self.config.epochs):
            self.model.train()
            torch.manual_seed(self.config.seed + 1000 * epoch + self.dist.rank)
            epoch_start, losses = time.perf_counter(), []
            for step in range(self.steps_per_epoch):
                lr = self._set_lr(epoch * self.steps_per_epoch + step)
                views, teacher = self._batch(epoch, step)
                loss, _logs = self.model(views, teacher)
                last = float(mean_over_ranks(loss.detach()))
                if not np.isfinite(last):
                    raise TrainingError(
                        f"distillation loss became {last} at epoch {epoch + 1}, step {step + 1}; stopped. "
                        "Lower --lr; the last good checkpoint is kept."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                losses.append(last)
                if progress is not None and self.dist.is_main:
                    elapsed = max(time.perf_counter() - epoch_start, 1e-9)
                    progress(DistillProgress(epoch + 1, self.config.epochs, step + 1, self.steps_per_epoch,
                                             last, lr, (step + 1) * self.global_batch / elapsed))
            seconds = time.perf_counter() - epoch_start
            images += self.steps_per_epoch * self.global_batch
            self.history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": seconds})
            self._save_checkpoint(epoch + 1)
        broadcast_buffers(self.objective)
        total = time.perf_counter() - started
        student = copy.deepcopy(self.objective.student).cpu().eval()
        return DistillResult(student, self.history, last, images / total if total else 0.0, total,
                             rank=self.dist.rank)

    def _set_lr(self, global_step: int) -> float:
        from edge_ssl.train.optim import cosine_with_warmup

        total = self.steps_per_epoch * self.config.epochs
        warmup = int(round(self.config.warmup_epochs * self.steps_per_epoch))
        lr = cosine_with_warmup(global_step, total, warmup, self.base_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def teacher_embed(teacher: Any, views: Any, student_spec: Any) -> Any:
    """Teacher embeddings (float32) of views normalized for the student: re-normalized for the teacher."""
    s_mean = views.new_tensor(student_spec.input.mean).view(1, -1, 1, 1)
    s_std = views.new_tensor(student_spec.input.std).view(1, -1, 1, 1)
    t_mean = views.new_tensor(teacher.spec.input.mean).view(1, -1, 1, 1)
    t_std = views.new_tensor(teacher.spec.input.std).view(1, -1, 1, 1)
    pixels = views * s_std + s_mean
    dtype = getattr(teacher, "compute_dtype", torch.float32)
    # no_grad, not inference_mode: the embeddings are loss targets, saved for the backward.
    with torch.no_grad(), torch.autocast(
        views.device.type, dtype=dtype, enabled=dtype != torch.float32
    ):
        return teacher((pixels - t_mean) / t_std).float()
