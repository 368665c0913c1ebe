"""Low-rank adapters (LoRA, Hu et al. 2021) for Conv2d and Linear layers, merged back on export."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_ssl.errors import ConfigError


class LoRAConv2d(nn.Module):
    """``conv(x) + scale * up(down(x))``: ``down`` is a rank-r conv with the layer's kernel and
    stride, ``up`` a 1x1 conv initialised at zero, so the wrapped layer starts unchanged.

    Shapes as the wrapped ``nn.Conv2d`` (groups must be 1). The base conv is frozen.
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__()
        if base.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions is not supported (groups={base.groups}).")
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.down = nn.Conv2d(
            base.in_channels, rank, base.kernel_size, base.stride, base.padding,
            base.dilation, bias=False,
        ).to(base.weight.device, base.weight.dtype)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False).to(
            base.weight.device, base.weight.dtype
        )
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        base.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))

    def delta_weight(self) -> torch.Tensor:
        """The update as a full kernel: (out, in, kh, kw) = up (out, r) @ down (r, in*kh*kw)."""
        up = self.up.weight.flatten(1)
        down = self.down.weight.flatten(1)
        return (self.scale * up @ down).view_as(self.base.weight)


class LoRALinear(nn.Module):
    """``linear(x) + scale * x A^T B^T`` with B initialised at zero (Hu et al. 2021, Eq. 3)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.down = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        base.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.down), self.up)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.up @ self.down


LORA_TYPES = (LoRAConv2d, LoRALinear)


def add_lora(module: nn.Module, *, rank: int = 4, alpha: float | None = None) -> list[str]:
    """Wrap every Conv2d/Linear inside ``module`` (in place) with an adapter; returns their names.

    ``alpha`` defaults to ``rank`` (scale 1). Grouped convs and 1x1 convs narrower than
    ``rank`` are skipped: an adapter would not be low rank there.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA rank must be an integer >= 1; got {rank!r}.")
    scale_alpha = float(rank if alpha is None else alpha)
    wrapped = []
    for name, child in list(module.named_modules()):
        for attr, layer in list(child.named_children()):
            adapter = _adapter_for(layer, rank, scale_alpha)
            if adapter is not None:
                setattr(child, attr, adapter)
                wrapped.append(f"{name}.{attr}" if name else attr)
    return wrapped


def _adapter_for(layer: nn.Module, rank: int, alpha: float) -> nn.Module | None:
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        if min(layer.in_channels, layer.out_channels) > rank:
            return LoRAConv2d(layer, rank, alpha)
    if isinstance(layer, nn.Linear) and min(layer.in_features, layer.out_features) > rank:
        return LoRALinear(layer, rank, alpha)
    return None


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every adapter into its base layer and put the plain layer back (in place).

    Afterwards the module has exactly its original structure and state-dict keys, so
    the bundle keeps its encoder spec. Returns how many adapters were merged.
    """
    merged = 0
    for child in list(module.modules()):
        for attr, layer in list(child.named_children()):
            if isinstance(layer, LORA_TYPES):
                layer.base.weight.add_(layer.delta_weight().to(layer.base.weight.dtype))
                setattr(child, attr, layer.base)
                merged += 1
    return merged
