"""DINO: self-distillation from a momentum teacher with centering and sharpening."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edge_ssl.config import non_negative, positive, unit_interval
from edge_ssl.errors import ConfigError
from edge_ssl.train.distributed import mean_over_ranks
from edge_ssl.train.methods.base import (
    MethodConfig,
    SSLMethod,
    StepOutput,
    check_progress,
    encode_grouped,
    float32_loss,
    follow_online,
    layer_dims,
    mlp_head,
    momentum_copy,
)


class DINOLoss(nn.Module):
    """DINO's cross-entropy between teacher and student (Caron et al., arXiv:2104.14294, Alg. 1).

    Teacher outputs are centered and sharpened, ``P_t = softmax((t - C) / tau_t)``;
    student outputs ``P_s = softmax(s / tau_s)``; the loss is the mean over all
    (teacher view, student view) pairs with different views of
    ``mean_batch(-sum_k P_t log P_s)``. After each call the center moves toward the
    teacher batch mean, ``C = m * C + (1 - m) * mean(t)``, the mean taken over every
    rank when ``torch.distributed`` runs.

    Shapes: ``student_outputs``: V tensors (N, K), global views first;
    ``teacher_outputs``: G tensors (N, K) of the G global views; ``center``: (1, K)
    buffer. Returns a scalar; :meth:`components` also returns ``teacher_entropy``
    (log K when the teacher is uniform, 0 when one-hot: both mean collapse).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def components(
        self,
        student_outputs: Sequence[torch.Tensor],
        teacher_outputs: Sequence[torch.Tensor],
        teacher_temp: float,
        update_center: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``loss`` and ``teacher_entropy``; then moves the center (unless told not to)."""
        if len(teacher_outputs) < 1 or len(student_outputs) < 2:
            raise ConfigError(
                "DINOLoss needs at least 1 teacher and 2 student views; got "
                f"{len(teacher_outputs)} teacher and {len(student_outputs)} student views."
            )
        return self._components(student_outputs, teacher_outputs, teacher_temp, update_center)

    @float32_loss
    def _components(
        self,
        student_outputs: Sequence[torch.Tensor],
        teacher_outputs: Sequence[torch.Tensor],
        teacher_temp: float,
        update_center: bool,
    ) -> dict[str, torch.Tensor]:
        teacher = [t.detach() for t in teacher_outputs]
        center = self.center.to(teacher[0].dtype)
        teacher_probs = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
        student_log_probs = [
            F.log_softmax(s / self.student_temp, dim=-1) for s in student_outputs
        ]
        total = student_log_probs[0].new_zeros(())
        pairs = 0
        for t_index, probs in enumerate(teacher_probs):
            for s_index, log_probs in enumerate(student_log_probs):
                if s_index == t_index:
                    continue
                total = total + torch.sum(-probs * log_probs, dim=-1).mean()
                pairs += 1
        with torch.no_grad():
            entropy = torch.stack(
                [-(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean() for p in teacher_probs]
            ).mean()
        if update_center:
            self.update_center(torch.cat(teacher))
        return {"loss": total / pairs, "teacher_entropy": entropy}

    def forward(
        self,
        student_outputs: Sequence[torch.Tensor],
        teacher_outputs: Sequence[torch.Tensor],
        teacher_temp: float,
    ) -> torch.Tensor:
        return self.components(student_outputs, teacher_outputs, teacher_temp)["loss"]

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's batch mean, (M, K) -> center (1, K)."""
        batch_center = mean_over_ranks(teacher_output.mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(
            batch_center.to(self.center.dtype), alpha=1 - self.center_momentum
        )


class NormalizedLinear(nn.Module):
    """Bias-free linear layer whose weight rows are l2-normalized (DINO's weight-normed last layer).

    With ``learn_scale`` each row gets a trainable norm (weight_norm's ``g``, started
    at 1); without it the norm is fixed to 1 (DINO's ``norm_last_layer``), which the
    paper finds steadier.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.scale = nn.Parameter(torch.ones(out_dim, 1)) if learn_scale else None

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=1)
        if self.scale is not None:
            weight = weight * self.scale
        if frozen:
            # Zero gradients (not None) so DDP and optimizers see the usual parameters;
            # normalized rows make the layer blind to the weight decay it still gets.
            weight = weight.detach() + 0.0 * weight
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP -> l2-normalized bottleneck -> normalized linear to K prototypes: (N, D) -> (N, K)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        num_layers: int,
        use_bn: bool,
        norm_last_layer: bool,
    ) -> None:
        super().__init__()
        self.mlp = mlp_head(
            layer_dims(in_dim, hidden_dim, bottleneck_dim, num_layers),
            batch_norm=use_bn,
            activation=nn.GELU,
            hidden_bias=True,
        )
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, learn_scale=not norm_last_layer)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x, frozen=freeze_last_layer)


@dataclasses.dataclass(frozen=True)
class DINOConfig(MethodConfig):
    """DINO settings.

    - ``out_dim`` 4096 (K prototypes): the paper's 65536 is sized for ImageNet;
      4096 fits CIFAR-scale data and a CPU or one GPU.
    - ``head_hidden_dim`` 2048, ``head_bottleneck_dim`` 256, ``head_layers`` 3,
      GELU, ``use_bn_in_head`` False, ``norm_last_layer`` True: the paper's head.
    - ``student_temp`` 0.1, ``center_momentum`` 0.9: the paper's.
    - ``teacher_temp`` 0.07 after a linear warm-up from ``warmup_teacher_temp`` 0.04
      over the first ``warmup_teacher_temp_fraction`` 0.1 of training (the paper's
      30 of 300 epochs).
    - ``base_momentum`` 0.996 -> 1.0 on a cosine: the paper's.
    - ``freeze_last_layer_fraction`` 0.01: the last layer gets no update for the first
      1% of training (the paper's first epoch of 100), which steadies the start.
    - ``num_local_crops`` 0: only the two global views by default, cheapest for a CPU;
      the paper's multi-crop adds 10 small crops (6 in its cheaper runs) and gains a
      few points. Set it to the number of local crops the view builder makes.
    """

    out_dim: int = 4096
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    student_temp: float = positive(0.1)
    teacher_temp: float = positive(0.07)
    warmup_teacher_temp: float = positive(0.04)
    warmup_teacher_temp_fraction: float = unit_interval(0.1)
    center_momentum: float = unit_interval(0.9)
    base_momentum: float = unit_interval(0.996)
    freeze_last_layer_fraction: float = unit_interval(0.01)
    num_local_crops: int = non_negative(0)

    def teacher_temperature(self, progress: float) -> float:
        """Linear warm-up to ``teacher_temp`` over the warm-up fraction, constant after."""
        warmup = self.warmup_teacher_temp_fraction
        if warmup <= 0.0 or progress >= warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * (
            progress / warmup
        )


class DINO(
    SSLMethod, name="dino", config=DINOConfig, optimizer="adamw", lr=5e-4, weight_decay=0.04
):
    """DINO (Caron et al., arXiv:2104.14294): a student matches an EMA teacher's outputs.

    ``forward(views)`` takes the 2 global views, then ``num_local_crops`` local views
    (student only). The teacher (``teacher_encoder``, ``teacher_head``; no gradients)
    follows the student by EMA in :meth:`momentum_update`, which also records the
    training progress (a buffer, so it resumes from checkpoints) for the teacher
    temperature and last-layer freeze. Optimizer: AdamW, base lr 5e-4 per 256
    images, weight decay 0.04 (the paper raises it to 0.4 on a cosine; a constant
    is used here). Keeps the teacher backbone, which the paper finds better.
    """

    def __init__(self, encoder: nn.Module, config: DINOConfig) -> None:
        super().__init__(encoder, config)
        self.head = DINOHead(
            self.embed_dim,
            config.out_dim,
            config.head_hidden_dim,
            config.head_bottleneck_dim,
            config.head_layers,
            use_bn=config.use_bn_in_head,
            norm_last_layer=config.norm_last_layer,
        )
        self.teacher_encoder = momentum_copy(self.encoder)
        self.teacher_head = momentum_copy(self.head)
        self.criterion = DINOLoss(config.out_dim, config.student_temp, config.center_momentum)
        self.register_buffer("progress", torch.zeros(()))
        self.momentum = config.base_momentum
        # A host copy of ``progress``: reading the buffer every step would stall the GPU.
        # The buffer (for checkpoints) is read once after a state dict is loaded.
        self._progress_host: float | None = 0.0
        self.register_load_state_dict_post_hook(_forget_progress_host)

    @property
    def num_local_views(self) -> int:
        return self.config.num_local_crops

    def step(self, views: Sequence[torch.Tensor]) -> StepOutput:
        if self._progress_host is None:
            self._progress_host = float(self.progress)
        progress = self._progress_host
        batch = views[0].shape[0]
        features = encode_grouped(self.encoder, views)
        frozen = progress < self.config.freeze_last_layer_fraction
        student = self.head(features, freeze_last_layer=frozen).split(batch)
        with torch.no_grad():
            teacher = self.teacher_head(
                encode_grouped(self.teacher_encoder, views[: self.num_views])
            ).split(batch)
        teacher_temp = self.config.teacher_temperature(progress)
        terms = self.criterion.components(student, teacher, teacher_temp)
        return self.output(terms, features[:batch], teacher_temp=teacher_temp)

    def momentum_update(self, progress: float) -> None:
        """EMA of the teacher after a step (momentum base -> 1 on a cosine); records progress."""
        progress = check_progress(progress)
        self.progress.fill_(progress)
        self._progress_host = progress
        self.momentum = follow_online(
            self.config.base_momentum, progress,
            (self.teacher_encoder, self.encoder), (self.teacher_head, self.head),
        )

    def trained_encoder(self) -> nn.Module:
        return self.teacher_encoder


def _forget_progress_host(module: nn.Module, _incompatible: object) -> None:
    module._progress_host = None
