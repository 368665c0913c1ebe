"""BYOL: an online network predicts a momentum (EMA) target network's projection."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edge_ssl.config import unit_interval
from edge_ssl.train.methods.base import (
    MethodConfig,
    SSLMethod,
    StepOutput,
    float32_loss,
    follow_online,
    loss_dtype,
    momentum_copy,
)


def normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``: (N, D), (N, D) -> (N,)."""
    cosine = F.cosine_similarity(loss_dtype(prediction), loss_dtype(target), dim=1)
    return 2.0 - 2.0 * cosine


class BYOLLoss(nn.Module):
    """BYOL's symmetrized regression loss (Grill et al., arXiv:2006.07733, Eq. 2).

    ``L = mean(2 - 2 cos(p1, sg(z2))) + mean(2 - 2 cos(p2, sg(z1)))``: the online
    prediction of each view regresses the target projection of the other view,
    with the stop-gradient on the targets. Range [0, 8]; 0 when each prediction
    points along its target.

    Shapes: ``p1``, ``p2``: (N, D) online predictions of views 1 and 2; ``z1``,
    ``z2``: (N, D) target projections of views 1 and 2; returns a scalar.
    """

    @float32_loss
    def forward(
        self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
    ) -> torch.Tensor:
        return normalized_mse(p1, z2.detach()).mean() + normalized_mse(p2, z1.detach()).mean()


@dataclasses.dataclass(frozen=True)
class BYOLConfig(MethodConfig):
    """BYOL settings.

    - ``projection_hidden_dim`` 2048, ``prediction_hidden_dim`` 2048: the paper uses
      4096; halved for CIFAR-scale encoders (512-d or less) and a single GPU or CPU.
    - ``projection_dim`` 256: as in the paper.
    - ``base_momentum`` 0.99: the usual CIFAR setting (short runs need a faster
      target); the paper's ImageNet value is 0.996. Raised to 1.0 with a cosine
      schedule over training, as in the paper.
    """

    projection_hidden_dim: int = 2048
    projection_dim: int = 256
    prediction_hidden_dim: int = 2048
    base_momentum: float = unit_interval(0.99)


class BYOL(
    SSLMethod, name="byol", config=BYOLConfig, optimizer="lars", lr=0.2, weight_decay=1.5e-6
):
    """BYOL (Grill et al., arXiv:2006.07733).

    Online: encoder -> projector -> predictor; target: EMA copies of encoder and
    projector (``target_encoder``, ``target_projector``, no gradients). Projector and
    predictor are Linear-BN-ReLU-Linear as in the paper. Optimizer: LARS, base lr
    0.2 per 256 images, weight decay 1.5e-6 (paper, Sec. 3.3). Keeps the online encoder.
    """

    def __init__(self, encoder: nn.Module, config: BYOLConfig) -> None:
        super().__init__(encoder, config)
        self.projector = self.projection_head(layers=2)
        self.predictor = self.prediction_head()
        self.target_encoder = momentum_copy(self.encoder)
        self.target_projector = momentum_copy(self.projector)
        self.criterion = BYOLLoss()
        self.momentum = config.base_momentum

    def step(self, views: Sequence[torch.Tensor]) -> StepOutput:
        x1, x2 = views
        h1, h2 = self.encoder(x1), self.encoder(x2)
        p1 = self.predictor(self.projector(h1))
        p2 = self.predictor(self.projector(h2))
        with torch.no_grad():
            z1 = self.target_projector(self.target_encoder(x1))
            z2 = self.target_projector(self.target_encoder(x2))
        loss = self.criterion(p1, p2, z1, z2)
        return self.output(loss, h1, momentum=self.momentum)

    def momentum_update(self, progress: float) -> None:
        """EMA of the target after a step; momentum goes base -> 1 along a cosine."""
        self.momentum = follow_online(
            self.config.base_momentum, progress,
            (self.target_encoder, self.encoder), (self.target_projector, self.projector),
        )
