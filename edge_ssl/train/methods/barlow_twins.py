"""Barlow Twins: drive the cross-correlation of two views' embeddings to the identity."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from edge_ssl.config import non_negative
from edge_ssl.train.distributed import gather_batch
from edge_ssl.train.methods.base import ProjectionConfig, SSLMethod, float32_loss, off_diagonal


class BarlowTwinsLoss(nn.Module):
    """Redundancy-reduction loss (Zbontar et al., Barlow Twins, arXiv:2103.03230, Eq. 1-2).

    Each embedding dimension is standardized over the batch (mean 0, biased variance
    1 plus ``eps``, as the parameter-free BatchNorm in the authors' code), then
    ``C = Z1n.T @ Z2n / N`` (D, D) and
    ``loss = sum_i (1 - C_ii)**2 + lambda * sum_{i != j} C_ij**2``.

    With ``torch.distributed`` running, the statistics and ``C`` use the batch
    gathered from every rank (the authors all-reduce ``C`` with a synced BN; the
    result is the same). Shapes: ``z1``, ``z2``: (N, D); returns a scalar;
    :meth:`components` also returns the ``on_diagonal`` and ``off_diagonal`` sums.
    """

    def __init__(self, redundancy_weight: float = 0.0051, eps: float = 1e-5) -> None:
        super().__init__()
        self.redundancy_weight = redundancy_weight
        self.eps = eps

    @float32_loss
    def cross_correlation(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """(N, D), (N, D) -> (D, D) cross-correlation over the (gathered) batch."""
        a = self._standardize(gather_batch(z1))
        b = self._standardize(gather_batch(z2))
        return a.T @ b / a.shape[0]

    def components(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss``, ``on_diagonal`` and ``off_diagonal`` for (N, D) ``z1``, ``z2``."""
        corr = self.cross_correlation(z1, z2)
        on_diagonal = (torch.diagonal(corr) - 1).pow(2).sum()
        off = off_diagonal(corr).pow(2).sum()
        return {
            "loss": on_diagonal + self.redundancy_weight * off,
            "on_diagonal": on_diagonal,
            "off_diagonal": off,
        }

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return self.components(z1, z2)["loss"]

    def _standardize(self, z: torch.Tensor) -> torch.Tensor:
        mean = z.mean(dim=0)
        var = z.var(dim=0, unbiased=False)
        return (z - mean) / torch.sqrt(var + self.eps)


@dataclasses.dataclass(frozen=True)
class BarlowTwinsConfig(ProjectionConfig):
    """Barlow Twins settings.

    - ``projection_hidden_dim`` 2048, ``projection_dim`` 2048, ``projection_layers`` 3:
      the paper's projector is 8192-8192-8192; 2048 suits CIFAR-scale encoders on a
      CPU or one GPU (the paper's projector-size ablation shows accuracy still rising
      past 2048, so raise it when memory allows).
    - ``redundancy_weight`` 0.0051 (lambda): the paper's value.
    """

    redundancy_weight: float = non_negative(0.0051)


class BarlowTwins(
    SSLMethod, name="barlow_twins", config=BarlowTwinsConfig, optimizer="lars", lr=0.2,
    weight_decay=1.5e-6,
):
    """Barlow Twins (Zbontar et al., arXiv:2103.03230): encoder -> projector -> loss.

    The projector is Linear-BN-ReLU for each hidden layer and a plain Linear output,
    as in the paper. Optimizer: LARS, base lr 0.2 per 256 images, weight decay
    1.5e-6 (as the paper; it uses lr 0.0048 for biases and BN, left to the trainer).
    Keeps the online encoder.
    """

    def __init__(self, encoder: nn.Module, config: BarlowTwinsConfig) -> None:
        super().__init__(encoder, config)
        self.projector = self.projection_head(last_bias=False)
        self.criterion = BarlowTwinsLoss(config.redundancy_weight)
