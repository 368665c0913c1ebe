"""Optimizers and schedules for SSL pretraining: LARS, AdamW, SGD and cosine LR with warm-up."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from edge_ssl.config import check_choice
from edge_ssl.errors import ConfigError

OPTIMIZERS = ("lars", "adamw", "sgd")


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, base: float, final: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base`` over ``warmup_steps``, then cosine decay to ``final``.

    As in DINO's ``cosine_scheduler`` but evaluated per step instead of precomputed:
    a resumed run gets exactly the value it would have had.
    """
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be > 0, got {total_steps}.")
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr = base_lr * batch / 256."""
    return base_lr * batch_size / 256


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017, arXiv:1708.03888) as used by SimCLR, BYOL and Barlow Twins.

    SGD with momentum where each weight's update is scaled by the trust ratio
    ``eta * ||w|| / ||grad + wd * w||``. Param groups with ``lars_exclude=True``
    (biases, norm layers: ``parameter_groups`` in the methods) get neither weight
    decay adaptation nor the trust ratio, as in the papers.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.02,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ConfigError(
                f"LARS needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0; got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}."
            )
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    param_norm = torch.linalg.vector_norm(p)
                    update_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, param_groups: list[dict[str, Any]], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Create ``name`` ('lars', 'adamw', 'sgd') over param groups from ``parameter_groups``.

    Groups that carry ``weight_decay=0`` (biases, norms) keep it; others get ``weight_decay``.
    """
    check_choice("PretrainConfig", "optimizer", name, OPTIMIZERS)
    groups = []
    for group in param_groups:
        group = dict(group)
        no_decay = group.get("weight_decay", weight_decay) == 0.0
        group["weight_decay"] = 0.0 if no_decay else weight_decay
        if name == "lars":
            group["lars_exclude"] = no_decay
        else:
            group.pop("lars_exclude", None)
        groups.append(group)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
