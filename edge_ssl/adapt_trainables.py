"""Which encoder parameters adaptation trains: AdaBN stats, norm affine, biases, last stage, LoRA, full."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from edge_ssl.errors import ConfigError
from edge_ssl.lora import add_lora

#: Trainable subsets, cheapest first. ``bn-stats`` takes no gradient step at all.
TRAINABLES = ("bn-stats", "bias", "norm", "lora", "last-stage", "full")
#: ``auto`` tries these in order and takes the first whose step fits the memory budget.
AUTO_ORDER = ("lora", "norm", "last-stage", "bias", "bn-stats")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class TrainablePlan:
    """What one trainable subset sets free: parameter names and their element count."""

    kind: str
    names: tuple[str, ...]
    numel: int
    lora_layers: tuple[str, ...] = ()

    @property
    def takes_gradient_steps(self) -> bool:
        return bool(self.names)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "tensors": len(self.names), "params": self.numel,
                "lora_layers": len(self.lora_layers)}


def batch_norms(module: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer with running statistics (the ones AdaBN re-estimates)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            yield layer


def last_stage_name(backbone: nn.Module) -> str:
    """The backbone's last feature stage (timm ``feature_info``: 'layer4', 'blocks.11', ...)."""
    info = getattr(backbone, "feature_info", None)
    names = [entry.get("module") for entry in info or [] if isinstance(entry, dict)]
    names = [name for name in names if name]
    if not names:
        raise ConfigError(
            f"cannot find the last stage of {type(backbone).__name__} (it has no timm "
            "feature_info); use --trainable norm, bias, lora or full."
        )
    return names[-1]


def apply_trainables(encoder: nn.Module, kind: str, *, lora_rank: int = 4) -> TrainablePlan:
    """Freeze ``encoder`` except subset ``kind`` (in place; LoRA adds adapters to the last stage).

    Frozen parameters get ``requires_grad=False``: autograd then keeps no activations for
    a frozen prefix (no op before the first trainable tensor builds a graph).
    """
    if kind not in TRAINABLES:
        raise ConfigError(f"unknown trainable subset {kind!r}; choose one of auto, {', '.join(TRAINABLES)}.")
    encoder.requires_grad_(False)
    backbone = getattr(encoder, "backbone", encoder)
    lora_layers: list[str] = []
    if kind == "lora":
        stage = last_stage_name(backbone)
        lora_layers = [f"{stage}.{n}" for n in add_lora(backbone.get_submodule(stage), rank=lora_rank)]
    for name, param in encoder.named_parameters():
        param.requires_grad_(_is_trainable(encoder, name, kind, backbone))
    names = tuple(n for n, p in encoder.named_parameters() if p.requires_grad)
    numel = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    return TrainablePlan(kind=kind, names=names, numel=numel, lora_layers=tuple(lora_layers))


def _is_trainable(encoder: nn.Module, name: str, kind: str, backbone: nn.Module) -> bool:
    if kind == "full":
        return True
    if kind == "bn-stats":
        return False
    if kind == "lora":
        return name.endswith((".down.weight", ".up.weight", ".down", ".up"))
    owner_name, _, leaf = name.rpartition(".")
    owner = encoder.get_submodule(owner_name) if owner_name else encoder
    if kind == "norm":
        return isinstance(owner, _NORM_TYPES)
    if kind == "bias":
        return leaf == "bias"
    prefix = "backbone." if backbone is not encoder else ""
    return name.startswith(f"{prefix}{last_stage_name(backbone)}.")


def set_norm_mode(encoder: nn.Module, *, use_batch_stats: bool) -> None:
    """BatchNorm layers in train mode (batch statistics, running stats update) or eval mode."""
    for layer in batch_norms(encoder):
        layer.train(use_batch_stats)


def bn_statistics(encoder: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of every BN layer's (running_mean, running_var), in ``batch_norms`` order."""
    return [(bn.running_mean.detach().clone(), bn.running_var.detach().clone()) for bn in batch_norms(encoder)]


@torch.no_grad()
def reestimate_bn_stats(
    encoder: nn.Module, batches: Iterator[torch.Tensor], *, prior: float = 0.0,
    source: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> int:
    """AdaBN (Li et al. 2016): recompute every BN's running mean/var on ``batches``.

    ``prior`` in [0, 1) keeps that weight on the source statistics (Schneider et al. 2020,
    "Improving robustness against common corruptions by covariate shift adaptation"):
    ``stat = prior * source + (1 - prior) * target``. ``source`` defaults to the current
    statistics; pass the deployed model's (``bn_statistics``) when re-estimating again, or
    the prior would compound. Returns the number of images seen. Only BN buffers change;
    the train/eval flag of every module is restored.
    """
    layers = list(batch_norms(encoder))
    if not layers:
        return 0
    current = bn_statistics(encoder)
    if source is not None and [m.shape for m, _ in source] != [m.shape for m, _ in current]:
        raise ValueError("source BN statistics do not match the encoder's BatchNorm layers.")
    mix = source if source is not None else current
    momenta = [bn.momentum for bn in layers]
    modes = [(m, m.training) for m in encoder.modules()]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
        bn.train()
    seen = 0
    try:
        for batch in batches:
            encoder(batch)
            seen += len(batch)
    finally:
        for bn, momentum, (mean, var), (prior_mean, prior_var) in zip(
                layers, momenta, current, mix, strict=True):
            bn.momentum = momentum
            if seen == 0:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            else:
                bn.running_mean.mul_(1 - prior).add_(prior_mean, alpha=prior)
                bn.running_var.mul_(1 - prior).add_(prior_var, alpha=prior)
        for module, training in modes:
            module.training = training
    return seen
