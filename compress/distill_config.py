"""Distillation settings and result: the types the stage and its training loop share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_ssl.config import check_choice, check_positive, config_from_dict
from edge_ssl.errors import ConfigError, EdgeSSLError
from edge_ssl.stage import StageResult
from edge_ssl.train.pretrain import ProgressEvent

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
class DistillResult(StageResult):
    """The trained student (CPU, eval mode), its history; ``bundle`` when one was written."""

    encoder: Any
    history: list[dict[str, float]]
    final_loss: float
    images_per_second: float
    seconds: float
    rank: int = 0  # this process's rank under torchrun; only rank 0 writes the bundle
