"""SimSiam: a predictor and a stop-gradient, with no negatives and no momentum encoder."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edge_ssl.train.methods.base import ProjectionConfig, SSLMethod, StepOutput, float32_loss


class NegativeCosineLoss(nn.Module):
    """SimSiam's symmetrized negative cosine (Chen & He, arXiv:2011.10566, Eq. 1-4).

    ``L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2`` with ``D(p, z) = -cos(p, z)`` and
    ``sg`` the stop-gradient, the term that keeps SimSiam from collapsing.
    Range [-1, 1]; -1 when each prediction points along the other view's projection.

    Shapes: ``p1``, ``p2``: (N, D) predictions of views 1 and 2; ``z1``, ``z2``:
    (N, D) projections of views 1 and 2; returns a scalar.
    """

    @float32_loss
    def forward(
        self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
    ) -> torch.Tensor:
        d12 = -F.cosine_similarity(p1, z2.detach(), dim=1).mean()
        d21 = -F.cosine_similarity(p2, z1.detach(), dim=1).mean()
        return d12 / 2 + d21 / 2


@dataclasses.dataclass(frozen=True)
class SimSiamConfig(ProjectionConfig):
    """SimSiam settings.

    - ``projection_hidden_dim`` 2048, ``projection_dim`` 2048: as in the paper.
    - ``projection_layers`` 2: lighter for CIFAR-scale encoders (the paper's CIFAR
      appendix shrinks the projector too); its ImageNet projector has 3 layers.
      Every projector layer has BN, the output one without affine parameters, as
      in the paper's code.
    - ``prediction_hidden_dim`` 512: the paper's bottleneck predictor (2048-512-2048).
    """

    projection_layers: int = 2
    prediction_hidden_dim: int = 512


class SimSiam(
    SSLMethod, name="simsiam", config=SimSiamConfig, optimizer="sgd", lr=0.03, weight_decay=5e-4
):
    """SimSiam (Chen & He, arXiv:2011.10566): encoder -> projector -> predictor.

    Optimizer: SGD (momentum 0.9), base lr 0.03 per 256 images and weight decay
    5e-4: the paper's CIFAR setting (App. D; ImageNet uses 0.05 and 1e-4).
    Keeps the online encoder.
    """

    def __init__(self, encoder: nn.Module, config: SimSiamConfig) -> None:
        super().__init__(encoder, config)
        self.projector = self.projection_head(last_batch_norm=True, last_affine=False)
        self.predictor = self.prediction_head()
        self.criterion = NegativeCosineLoss()

    def step(self, views: Sequence[torch.Tensor]) -> StepOutput:
        h1, h2 = self.encoder(views[0]), self.encoder(views[1])
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = self.criterion(p1, p2, z1, z2)
        return self.output(loss, h1)
