"""VICReg: invariance, variance and covariance terms on the embeddings of two views."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from edge_ssl.config import non_negative, positive
from edge_ssl.train.distributed import gather_batch
from edge_ssl.train.methods.base import ProjectionConfig, SSLMethod, float32_loss, off_diagonal


class VICRegLoss(nn.Module):
    """Variance-Invariance-Covariance regularization (Bardes et al., arXiv:2105.04906, Eq. 1-6).

    For embeddings ``Z``, ``Z'`` (N, D) of the two views:

    - invariance ``s = mean((Z - Z')**2)`` over all N * D entries;
    - variance ``v = (v(Z) + v(Z')) / 2``, ``v(Z) = mean_j relu(gamma - sqrt(Var(Z_j) + eps))``
      with the unbiased variance of each dimension j;
    - covariance ``c = c(Z) + c(Z')``, ``c(Z) = sum_{i != j} Cov(Z)_ij**2 / D``;
    - ``loss = lambda * s + mu * v + nu * c``.

    The variance term is the average of the two branches, as in the authors' code,
    which is what the published weights (25, 25, 1) were tuned with. With
    ``torch.distributed`` running, variance and covariance use the batch gathered
    from every rank; invariance stays per-rank (its mean is the same). Returns a
    scalar; :meth:`components` also returns the three terms.
    """

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        variance_target: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.covariance_weight = covariance_weight
        self.variance_target = variance_target
        self.eps = eps

    @float32_loss
    def components(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss``, ``invariance``, ``variance``, ``covariance`` for (N, D) ``z1``, ``z2``."""
        invariance = F.mse_loss(z1, z2)
        variance = (self._variance(gather_batch(z1)) + self._variance(gather_batch(z2))) / 2
        covariance = self._covariance(gather_batch(z1)) + self._covariance(gather_batch(z2))
        loss = (
            self.invariance_weight * invariance
            + self.variance_weight * variance
            + self.covariance_weight * covariance
        )
        return {
            "loss": loss,
            "invariance": invariance,
            "variance": variance,
            "covariance": covariance,
        }

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return self.components(z1, z2)["loss"]

    def _variance(self, z: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(z.var(dim=0) + self.eps)
        return F.relu(self.variance_target - std).mean()

    @staticmethod
    def _covariance(z: torch.Tensor) -> torch.Tensor:
        n, d = z.shape
        centered = z - z.mean(dim=0)
        cov = centered.T @ centered / (n - 1)
        return off_diagonal(cov).pow(2).sum() / d


@dataclasses.dataclass(frozen=True)
class VICRegConfig(ProjectionConfig):
    """VICReg settings.

    - ``projection_hidden_dim`` 2048, ``projection_dim`` 2048, ``projection_layers`` 3:
      the paper's expander is 8192-8192-8192; 2048 keeps the covariance matrix and
      the head small enough for a CPU or one GPU at CIFAR scale.
    - ``invariance_weight`` 25, ``variance_weight`` 25, ``covariance_weight`` 1
      (lambda, mu, nu), ``variance_target`` 1 (gamma), ``variance_eps`` 1e-4: the paper's.
    """

    invariance_weight: float = non_negative(25.0)
    variance_weight: float = non_negative(25.0)
    covariance_weight: float = non_negative(1.0)
    variance_target: float = positive(1.0)
    variance_eps: float = positive(1e-4)


class VICReg(
    SSLMethod, name="vicreg", config=VICRegConfig, optimizer="lars", lr=0.2, weight_decay=1e-6
):
    """VICReg (Bardes, Ponce & LeCun, arXiv:2105.04906): encoder -> expander -> VICReg loss.

    The expander is Linear-BN-ReLU for each hidden layer and a plain Linear output,
    as in the paper. Optimizer: LARS, base lr 0.2 per 256 images, weight decay 1e-6
    (as the paper). Keeps the online encoder.
    """

    def __init__(self, encoder: nn.Module, config: VICRegConfig) -> None:
        super().__init__(encoder, config)
        self.projector = self.projection_head(last_bias=False)
        self.criterion = VICRegLoss(
            invariance_weight=config.invariance_weight,
            variance_weight=config.variance_weight,
            covariance_weight=config.covariance_weight,
            variance_target=config.variance_target,
            eps=config.variance_eps,
        )
