"""Settings of on-device adaptation: a frozen, validated config and the memory budget defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from edge_ssl.config import check_choice, check_flag, check_int, check_number, config_from_dict
from edge_ssl.errors import ConfigError

TRAINABLE_CHOICES = ("auto", "bn-stats", "bias", "norm", "lora", "last-stage", "full")
ADAPT_METHODS = ("simsiam", "byol")
#: Smallest batch a step may run at: the SSL heads' BatchNorm needs a few samples.
MIN_BATCH = 4
#: Images needed at least: a guard slice of MIN_HOLDOUT plus a few batches.
MIN_HOLDOUT = 16
MIN_IMAGES = MIN_HOLDOUT + 4 * MIN_BATCH
AUTO_ORDER_NOTE = ", or use --trainable auto, which falls back to cheaper subsets"
#: Share of the device's memory adaptation may take when a device profile names the
#: memory but no --budget-mb is given: Jetsons share RAM between CPU and GPU, and the
#: OS (~1-1.5 GB) plus the running inference engine need the rest.
PROFILE_BUDGET_SHARE = 0.25
#: Share of MemAvailable (CPU) or free GPU memory used when nothing else says a budget.
LOCAL_BUDGET_SHARE = 0.5


#: AdaptConfig's whole-number settings and their minimum.
_INT_MINIMUMS = {"steps": 1, "guard_every": 1, "checkpoint_every": 1, "lora_rank": 1,
                 "head_dim": 1, "batch_size": MIN_BATCH, "seed": 0}
#: AdaptConfig's real-valued settings and their closed interval (None: unbounded).
_NUMBER_RANGES: dict[str, tuple[float, float | None]] = {
    **dict.fromkeys(("lr", "weight_decay", "ssl_weight", "distill_weight", "align_weight",
                     "replay_weight"), (0.0, None)),
    "bn_prior": (0.0, 0.999), "bn_depth": (0.0, 1.0), "select_threshold": (-1.0, 1.0),
    "holdout_frac": (0.01, 0.5), "keep_margin": (0.0, 1.0),
}


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """How to adapt a deployed encoder on unlabeled local images.

    - ``trainable``: ``auto`` picks the first of lora, norm, last-stage, bias, bn-stats
      whose step fits ``budget_mb``; or name one subset.
    - ``steps`` gradient steps at up to ``batch_size`` images (two views each); the
      batch shrinks to fit the budget and after an out-of-memory error.
    - ``bn_stats``: re-estimate BatchNorm statistics on the local images first (AdaBN),
      keeping ``bn_prior`` of the deployed statistics, in the first ``bn_depth`` share of
      the BN layers (counted from the input; deeper ones keep the deployed statistics, moved
      only by what the gradient steps change in their input). Both were chosen on
      CIFAR-10-C's held-out validation corruptions as the setting that recovers most while
      costing <= 1 point of clean accuracy (docs/adapt.md). BN then stays fixed during the
      gradient steps (SSL views would skew its statistics).
    - ``optimizer``/``lr``: AdamW at 1e-3 (as Tent and LoRA use); SGD at 0.01 moved
      zero-initialized LoRA adapters by ~1e-6 of the weights in 10 steps, i.e. not at all.
    - loss = ``ssl_weight`` x SimSiam/BYOL loss + ``distill_weight`` x (1 - cos) to a frozen
      embedding of the same image: ``distill_to`` ``bn-adapted`` (the deployed weights with the
      re-estimated statistics, taken once after the statistics pass) or ``deployed`` (the
      deployed model as it was; this pulls the steps back towards the shifted embedding that
      the statistics pass just corrected).
    - ``align_weight``: weight of a term that pulls the per-channel mean and variance of the
      inputs of the BN layers that keep the deployed statistics (those past ``bn_depth``;
      all of them without ``bn_stats``), on the un-augmented local images, towards those
      deployed statistics: the source statistics every BN network carries (ActMAD, Mirza et
      al. 2023, without a source pass). With it, those layers keep the deployed statistics
      after the steps instead of carrying the step change (the steps moved the inputs there).
    - ``replay_weight``: weight of a term that keeps the embeddings of a few clean *replay*
      images (shipped with the bundle or given to ``adapt``; never the local images) at the
      deployed model's embeddings of them, under the adapted statistics: experience replay
      against forgetting, as in continual test-time adaptation. Needs replay images; 0 = off.
    - ``select``: EATA-style sample selection: skip images whose deployed embedding is
      within cosine ``select_threshold`` of the running mean of the ones already used.
    - guard: every ``guard_every`` steps on a held-back ``holdout_frac`` of the images;
      stop and keep the last good weights when it fails (see ``edge_ssl.adapt.guard``).
    - ``checkpointing``: activation checkpointing of the trainable blocks: auto (only
      when the step would not fit otherwise), on, off.
    - ``keep_best``: before the result replaces the deployed weights, score the unadapted
      weights, AdaBN alone and the adapted weights on the held-back slice by a label-free
      criterion and keep the best (``edge_ssl.adapt.select``); a more complex candidate must
      beat a simpler one by ``keep_margin`` (0.025: the middle of the margins that kept the
      best of the three by kNN on every ``validation`` corruption; benchmarks/results/adapt.md).
      Off only to study the steps themselves.
    """

    trainable: str = "auto"
    steps: int = 30
    batch_size: int = 32
    budget_mb: float | None = None
    method: str = "simsiam"
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    ssl_weight: float = 1.0
    distill_weight: float = 1.0
    distill_to: str = "bn-adapted"
    align_weight: float = 0.0
    replay_weight: float = 0.0
    bn_stats: bool = True
    bn_prior: float = 0.5
    bn_depth: float = 0.75
    select: bool = False
    select_threshold: float = 0.95
    holdout_frac: float = 0.1
    guard_every: int = 10
    min_agreement: float = 0.5
    min_rank_ratio: float = 0.5
    checkpoint_every: int = 10
    checkpointing: str = "auto"
    lora_rank: int = 4
    head_dim: int = 512
    keep_best: bool = True
    keep_margin: float = 0.025
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "AdaptConfig"
        check_choice(owner, "trainable", self.trainable, TRAINABLE_CHOICES)
        check_choice(owner, "method", self.method, ADAPT_METHODS)
        check_choice(owner, "optimizer", self.optimizer, ("sgd", "adamw"))
        check_choice(owner, "checkpointing", self.checkpointing, ("auto", "on", "off"))
        check_choice(owner, "distill_to", self.distill_to, ("bn-adapted", "deployed"))
        for name, minimum in _INT_MINIMUMS.items():
            check_int(owner, name, getattr(self, name), minimum)
        for name, (low, high) in _NUMBER_RANGES.items():
            check_number(owner, name, getattr(self, name), low, high)
        if self.budget_mb is not None:
            check_number(owner, "budget_mb", self.budget_mb, 0, low_open=True)
        for name in ("bn_stats", "select", "keep_best"):
            check_flag(owner, name, getattr(self, name))
        self._check_objective()

    def _check_objective(self) -> None:
        if self.bn_depth == 0:
            raise ConfigError("AdaptConfig.bn_depth 0 re-estimates no BN layer; use bn_stats=false "
                              "to keep the deployed statistics.")
        if self.align_weight and self.bn_stats and self.bn_depth == 1:
            raise ConfigError("AdaptConfig.align_weight needs BN layers that keep the deployed "
                              "statistics: bn_depth < 1, or bn_stats=false.")
        if (self.ssl_weight == 0 and self.distill_weight == 0 and self.align_weight == 0
                and self.replay_weight == 0 and self.trainable != "bn-stats"):
            raise ConfigError(
                "AdaptConfig: ssl_weight, distill_weight, align_weight and replay_weight are all 0, so gradient steps "
                "have no objective; set one > 0 or use trainable='bn-stats'."
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdaptConfig:
        return config_from_dict(cls, values)


def default_budget_mb(*, profile_memory_gb: float | None, device_type: str) -> tuple[float, str]:
    """The memory budget when --budget-mb is not given, and where it came from."""
    if profile_memory_gb:
        budget = profile_memory_gb * 1024 * PROFILE_BUDGET_SHARE
        return budget, (
            f"{PROFILE_BUDGET_SHARE:.0%} of the device profile's {profile_memory_gb:g} GB "
            "(the rest stays for the OS and the inference engine)"
        )
    if device_type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free / (1 << 20) * LOCAL_BUDGET_SHARE, f"{LOCAL_BUDGET_SHARE:.0%} of free GPU memory"
    from edge_ssl.adapt.memory import available_memory_mb

    available = available_memory_mb() or 2048.0
    return available * LOCAL_BUDGET_SHARE, f"{LOCAL_BUDGET_SHARE:.0%} of MemAvailable"
