"""SSL distillation: train a student encoder to match a frozen SSL teacher on unlabeled images."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.bundle import Bundle
from edge_ssl.config import check_choice, check_positive, config_from_dict, config_to_dict
from edge_ssl.data import ImageDataset
from edge_ssl.errors import ConfigError, DataError, EdgeSSLError
from edge_ssl.lineage import require_float_weights
from edge_ssl.output_check import write_stage_bundle
from edge_ssl.pretrain import ProgressEvent

OBJECTIVES = ("feature", "seed", "ssl")
TEACHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INITS = ("random", "teacher")
CHECKPOINT_NAME = "last.pt"
CACHE_NAME = "teacher_cache.pt"
#: Fixed views per image cached on CPU when ``cache_views`` is left to auto.
AUTO_CPU_CACHE_VIEWS = 4


class DistillError(EdgeSSLError, ValueError):
    """Teacher and student cannot be paired, or a distillation input is not usable."""


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run.

    - ``objectives``: any of ``feature`` (cosine regression, CompRess/DisCo), ``seed``
      (relational, SEED) and ``ssl`` (the student's own SSL loss, ``ssl_method``),
      summed with ``weights`` (default 1 each).
    - ``cache_views``: None = auto (4 fixed views per image on CPU, none on GPU). With N > 0
      the teacher embeds N fixed views of every image once (view 0 is the plain image)
      and the student trains on those views, so CPU runs are not bound by the teacher.
    - ``lr`` is the AdamW rate for a batch of 256 (scaled linearly with the global batch).
    - ``init``: ``random``, or ``teacher`` to start a student that is the teacher's
      architecture at a smaller width from evenly spaced teacher channels (weight selection).
    """

    student: str = "resnet18_cifar"
    student_kwargs: Mapping[str, Any] = field(default_factory=dict)
    objectives: tuple[str, ...] = ("feature", "seed")
    weights: Mapping[str, float] = field(default_factory=dict)
    ssl_method: str = "simclr"
    ssl_kwargs: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    head_hidden_dim: int = 512
    queue_size: int = 4096
    student_temperature: float = 0.2
    teacher_temperature: float = 0.05
    views: str = "simclr"
    cache_views: int | None = None
    teacher_precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    steps_per_epoch: int | None = None
    init: str = "random"

    def __post_init__(self) -> None:
        for name in ("student_kwargs", "weights", "ssl_kwargs"):
            object.__setattr__(self, name, dict(getattr(self, name)))
        objectives = (self.objectives,) if isinstance(self.objectives, str) else self.objectives
        object.__setattr__(self, "objectives", tuple(objectives))
        if not self.objectives:
            raise ConfigError(f"DistillConfig.objectives needs at least one of {', '.join(OBJECTIVES)}.")
        for name in self.objectives:
            check_choice("DistillConfig", "objectives", name, OBJECTIVES)
        for name, weight in self.weights.items():
            check_choice("DistillConfig", "weights key", name, OBJECTIVES)
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"DistillConfig.weights[{name!r}] must be a number >= 0; got {weight!r}.")
        check_positive("DistillConfig", epochs=self.epochs, lr=self.lr, queue_size=self.queue_size,
                       head_hidden_dim=self.head_hidden_dim,
                       student_temperature=self.student_temperature,
                       teacher_temperature=self.teacher_temperature)
        if self.batch_size < 2:
            raise ConfigError(f"DistillConfig.batch_size must be >= 2, got {self.batch_size}.")
        if self.weight_decay < 0 or not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(
                f"DistillConfig needs weight_decay >= 0 and 0 <= warmup_epochs <= epochs; got "
                f"weight_decay={self.weight_decay}, warmup_epochs={self.warmup_epochs}."
            )
        if self.cache_views is not None and self.cache_views < 0:
            raise ConfigError(f"DistillConfig.cache_views must be >= 0 or None (auto); got {self.cache_views}.")
        if "ssl" in self.objectives and self.cache_views == 1:
            raise ConfigError("the 'ssl' objective needs two views per image: use cache_views >= 2 or 0.")
        if self.steps_per_epoch is not None:
            check_positive("DistillConfig", steps_per_epoch=self.steps_per_epoch)
        check_choice("DistillConfig", "teacher_precision", self.teacher_precision, TEACHER_PRECISIONS)
        check_choice("DistillConfig", "init", self.init, INITS)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DistillConfig:
        return config_from_dict(cls, values)

    def weight(self, objective: str) -> float:
        return float(self.weights.get(objective, 1.0)) if objective in self.objectives else 0.0


#: Progress events are pretraining's: the CLI shows both with one progress bar.
DistillProgress = ProgressEvent


@dataclass
class DistillResult:
    """The trained student (CPU, eval mode), its history; ``bundle`` when one was written."""

    encoder: Any
    history: list[dict[str, float]]
    final_loss: float
    images_per_second: float
    seconds: float
    bundle: Bundle | None = None
    rank: int = 0  # this process's rank under torchrun; only rank 0 writes the bundle


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """``NAME.edge`` -> ``NAME.edge.ckpt/``: the resumable checkpoint and teacher cache."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def check_pairing(teacher_spec: Any, student_spec: Any) -> None:
    """Teacher and student must read the same image size (the views are shared)."""
    if tuple(teacher_spec.input.shape) != tuple(student_spec.input.shape):
        raise DistillError(
            f"teacher and student cannot be paired: the teacher reads {tuple(teacher_spec.input.shape)} "
            f"images, the student {tuple(student_spec.input.shape)}. Build the student for the "
            f"teacher's size, e.g. --arch-opt image_size={teacher_spec.input.shape[1]}."
        )


def load_teacher(path: str | os.PathLike | Bundle, stage: str = "distill") -> tuple[Bundle, Any]:
    """(float bundle, encoder) for a teacher; a quantized bundle is traced to its float parent."""
    from edge_ssl.models import load_encoder

    bundle = path if isinstance(path, Bundle) else Bundle.open(path, verify=True)
    source = require_float_weights(bundle, stage)
    return source, load_encoder(source)


def distill(
    teacher: str | os.PathLike | Bundle,
    config: DistillConfig,
    data: ImageDataset,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[DistillProgress], None] | None = None,
) -> DistillResult:
    """Distill ``teacher`` into a new ``config.student`` encoder and write it to ``out``.

    Checks the output, the pairing and the data before training; checkpoints every epoch
    to ``checkpoint_dir(out)``; with ``resume`` continues from there. Under torchrun every
    rank trains its shard and rank 0 writes the bundle.
    """
    from edge_ssl.models import create_encoder

    out = Path(out)
    if out.exists() and not (overwrite or resume):
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
    teacher_bundle, teacher_encoder = load_teacher(teacher)
    config_names(config)
    import torch

    torch.manual_seed(config.seed)  # the student's initial weights follow the seed too
    student = create_encoder(config.student, **config.student_kwargs)
    check_pairing(teacher_encoder.spec, student.spec)
    check_data(data, teacher_encoder.spec, config.batch_size)
    init = {"method": "random"}
    if config.init == "teacher":
        from edge_ssl.compress.weight_selection import inherit_teacher_weights

        init = inherit_teacher_weights(student, teacher_encoder)
    result = train_student(
        student, teacher_encoder, data, config,
        ckpt_dir=checkpoint_dir(out), resume=resume, progress=progress,
        identity={"teacher": teacher_bundle.manifest_sha256},
    )
    if result.rank == 0:
        settings = config_to_dict(config) | {
            "teacher": teacher_bundle.manifest.name,
            "teacher_sha256": teacher_bundle.manifest_sha256,
            "data": data.source,
            "num_images": len(data),
            "student_init": init,
        }
        metrics = {
            "params": _params(result.encoder),
            "distill": {
                "final_loss": result.final_loss,
                "epochs": len(result.history),
                "images_per_second": result.images_per_second,
                "seconds": result.seconds,
                "objectives": list(config.objectives),
            },
        }
        result.bundle = write_stage_bundle(
            out, result.encoder, stage="distill", parent=teacher_encoder, images=data.images,
            lineage=teacher_bundle.child_lineage("distill", settings),
            metrics=metrics, overwrite=overwrite or resume,
        )
    return result


def config_names(config: DistillConfig) -> None:
    """Fail fast on an unknown student or SSL method name."""
    from edge_ssl.methods import METHODS
    from edge_ssl.models import ENCODERS

    ENCODERS.get(config.student)
    if "ssl" in config.objectives:
        METHODS.get(config.ssl_method)


def check_data(data: ImageDataset, spec: Any, batch_size: int) -> None:
    """Unlabeled images of the encoder's size, at least one batch of them."""
    if not isinstance(data, ImageDataset):
        raise DataError(f"distillation data must be an edge_ssl.data.ImageDataset; got {type(data).__name__}.")
    size = tuple(spec.input.shape[1:])
    if data.image_size != size:
        raise DataError(
            f"{data.source}: images are {data.image_size[0]}x{data.image_size[1]} but the encoder "
            f"reads {size[0]}x{size[1]}; load them with image_size={size[0]} (edge_ssl.data.load_images)."
        )
    if len(data) < batch_size:
        raise DataError(
            f"{data.source}: {len(data)} images are fewer than one batch of {batch_size}; "
            "lower --batch-size or add images."
        )


def _params(encoder: Any) -> int:
    from edge_ssl.models import count_parameters

    return count_parameters(encoder)


def train_student(
    student: Any,
    teacher: Any,
    data: ImageDataset,
    config: DistillConfig,
    *,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    progress: Callable[[DistillProgress], None] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> DistillResult:
    """Train ``student`` (a copy; the argument is not modified) against a frozen ``teacher``.

    The core loop shared by ``distill`` and pruning's recovery distillation.
    """
    import copy

    import torch

    from edge_ssl.device import activate_device, device_kind, resolve_device
    from edge_ssl.distributed import init_distributed, shutdown

    check_pairing(teacher.spec, student.spec)
    dist_info = init_distributed(device_kind(config.device))
    try:
        device = resolve_device(config.device, local_rank=dist_info.local_rank if dist_info.enabled else None)
        activate_device(device)
        torch.manual_seed(config.seed)
        student = copy.deepcopy(student).to(device).train()
        frozen = _frozen_teacher(teacher, device, config.teacher_precision)
        from edge_ssl.compress.training import DistillSession

        session = DistillSession.build(student, frozen, data, config, device, dist_info, ckpt_dir, identity)
        if resume:
            session.load_checkpoint()
        return session.run(progress)
    finally:
        shutdown(dist_info)


def _frozen_teacher(teacher: Any, device: Any, precision: str) -> Any:
    """A frozen eval-mode copy of the teacher; half precision on GPU (bf16 when supported)."""
    import copy

    import torch

    frozen = copy.deepcopy(teacher).to(device).eval()
    for param in frozen.parameters():
        param.requires_grad_(False)
    dtype = torch.float32
    if device.type == "cuda" and precision != "fp32":
        bf16 = torch.cuda.is_bf16_supported()
        dtype = torch.float16 if precision == "fp16" or (precision == "auto" and not bf16) else torch.bfloat16
    frozen.compute_dtype = dtype
    return frozen


def teacher_embed(teacher: Any, views: Any, student_spec: Any) -> Any:
    """Teacher embeddings (float32) of views normalized for the student: re-normalized for the teacher."""
    import torch

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
