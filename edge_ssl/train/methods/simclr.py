"""SimCLR: contrastive learning with the NT-Xent loss over in-batch negatives."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edge_ssl.config import positive
from edge_ssl.train.distributed import gather_batch, rank
from edge_ssl.train.methods.base import ProjectionConfig, SSLMethod, StepOutput, float32_loss


class NTXentLoss(nn.Module):
    """Normalized temperature-scaled cross entropy (Chen et al., SimCLR, arXiv:2002.05709, Eq. 1).

    For the 2N embeddings of a batch of N pairs, the loss of a positive pair (i, j) is
    ``-log(exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t))`` with cosine
    ``sim``; the result is the mean over all 2N anchors. With ``torch.distributed``
    running, the negatives are the pairs of every rank (gathered with gradients).

    Shapes: ``z1``, ``z2``: (N, D) projections of the two views; returns a scalar.
    The minimum, reached when positives coincide and all 2N - 2 negatives are
    orthogonal, is ``log(1 + (2N - 2) * exp(-1 / t))``, which tends to 0 as t -> 0.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        self.temperature = temperature

    @float32_loss
    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z1 = F.normalize(z1, dim=1)
        z2 = F.normalize(z2, dim=1)
        keys1, keys2 = gather_batch(z1), gather_batch(z2)
        batch = z1.shape[0]
        labels = torch.arange(batch, device=z1.device) + rank() * batch
        is_self = F.one_hot(labels, keys1.shape[0]).bool()
        # Each anchor sees its partner view (the positive, at ``labels``) and, as
        # negatives, the other pairs' embeddings of both views; never itself.
        logits1 = torch.cat(
            [z1 @ keys2.T, (z1 @ keys1.T).masked_fill(is_self, float("-inf"))], dim=1
        )
        logits2 = torch.cat(
            [z2 @ keys1.T, (z2 @ keys2.T).masked_fill(is_self, float("-inf"))], dim=1
        )
        loss1 = F.cross_entropy(logits1 / self.temperature, labels)
        loss2 = F.cross_entropy(logits2 / self.temperature, labels)
        return (loss1 + loss2) / 2


@dataclasses.dataclass(frozen=True)
class SimCLRConfig(ProjectionConfig):
    """SimCLR settings.

    - ``temperature`` 0.5: the paper's CIFAR-10 choice (App. B.9); its ImageNet runs use 0.1.
    - ``projection_hidden_dim`` 2048, ``projection_dim`` 128: as in the paper (hidden =
      ResNet-50 width). The head is Linear-BN-ReLU-Linear: the paper's g(.) is a
      2-layer MLP and its released code puts BatchNorm on the hidden layer.
    - ``projection_layers`` 2 (SimCLR v1; SimCLR v2, arXiv:2006.10029, uses 3).
    """

    projection_dim: int = 128
    projection_layers: int = 2
    temperature: float = positive(0.5)


class SimCLR(
    SSLMethod, name="simclr", config=SimCLRConfig, optimizer="lars", lr=0.3, weight_decay=1e-6
):
    """SimCLR (Chen et al., arXiv:2002.05709): encoder + MLP projector + NT-Xent.

    Both views go through the encoder in one batch so BatchNorm sees all 2N images,
    as the paper's global BN does on one device. Optimizer: LARS, base lr 0.3 per
    256 images, weight decay 1e-6 (paper, Sec. 2.3).
    """

    def __init__(self, encoder: nn.Module, config: SimCLRConfig) -> None:
        super().__init__(encoder, config)
        self.projector = self.projection_head()
        self.criterion = NTXentLoss(config.temperature)

    def step(self, views: Sequence[torch.Tensor]) -> StepOutput:
        features = self.encoder(torch.cat(list(views)))
        z1, z2 = self.projector(features).chunk(2)
        loss = self.criterion(z1, z2)
        h1 = features[: views[0].shape[0]]
        return self.output(loss, h1)
