"""Which encoder parameters adaptation trains: AdaBN stats, norm affine, biases, last stage, LoRA, full."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edge_ssl.adapt.bn import batch_norms
from edge_ssl.adapt.lora import add_lora
from edge_ssl.errors import ConfigError

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
