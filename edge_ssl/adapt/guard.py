"""The adaptation guard: stop on collapse or drift from the deployed model, keep the last good weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_ssl.config import check_number
from edge_ssl.evaluate import EmbeddingHealth, embedding_health


@dataclass(frozen=True)
class GuardConfig:
    """Thresholds of the guard, checked on a held-back slice of the local images.

    - ``min_agreement`` 0.5: mean cosine between the adapted and the deployed model's
      embeddings of the same images. Adapting to a shifted domain moves embeddings on
      purpose (0.7-0.9 is typical after AdaBN on CIFAR-10-C severity 5); below 0.5 the
      embedding space no longer matches the one the deployed index was built with.
    - ``min_rank_ratio`` 0.5: effective rank may not fall below half of the deployed
      model's on the same images (a partial collapse shows there first).
    - a collapse by :func:`edge_ssl.evaluate.embedding_health` always stops.
    """

    min_agreement: float = 0.5
    min_rank_ratio: float = 0.5

    def __post_init__(self) -> None:
        for name in ("min_agreement", "min_rank_ratio"):
            check_number("GuardConfig", name, getattr(self, name), -1, 1)


@dataclass(frozen=True)
class GuardReport:
    """One check: health of the adapted embeddings and agreement with the deployed ones."""

    step: int
    health: EmbeddingHealth
    agreement: float
    ok: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        """The guard log entry: the check's outcome with the health numbers it judged."""
        health = self.health
        return {"step": self.step, "agreement": round(self.agreement, 5),
                "effective_rank": round(health.effective_rank, 3),
                "dim_std_mean": round(health.dim_std_mean, 6), "collapsed": health.collapsed,
                "ok": self.ok, "reason": self.reason}


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i) for two (N, D) arrays."""
    from edge_ssl.runtime.compare import row_cosines

    return float(row_cosines(a, b).mean())


def check_embeddings(
    step: int,
    adapted: np.ndarray,
    deployed: np.ndarray,
    baseline: EmbeddingHealth,
    config: GuardConfig,
) -> GuardReport:
    """Judge the adapted embeddings of the held-back slice against the deployed model's."""
    if not np.isfinite(adapted).all():  # a diverged step: roll back, never crash the run
        return GuardReport(step=step, health=baseline, agreement=float("nan"), ok=False,
                           reason="embeddings are not finite (the steps diverged; lower --lr)")
    health = embedding_health(adapted)
    agreement = mean_cosine(adapted, deployed)
    reason = ""
    if health.collapsed and not baseline.collapsed:  # judge a weak deployed model relatively
        reason = (
            f"embeddings collapsed (effective rank {health.effective_rank:.1f}, per-dim std "
            f"{health.dim_std_mean:.4f} vs {health.uniform_std:.4f} for a spread embedding)"
        )
    elif health.effective_rank < config.min_rank_ratio * baseline.effective_rank:
        reason = (
            f"effective rank fell to {health.effective_rank:.1f}, below {config.min_rank_ratio} x "
            f"the deployed model's {baseline.effective_rank:.1f}"
        )
    elif agreement < config.min_agreement:
        reason = (
            f"agreement with the deployed model fell to {agreement:.3f} (mean cosine), below "
            f"min_agreement {config.min_agreement}"
        )
    return GuardReport(step=step, health=health, agreement=agreement, ok=not reason, reason=reason)
