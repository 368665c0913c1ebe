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

    ``foreach=True`` (the default) updates a whole group with a handful of
    ``torch._foreach_*`` ops (the trust ratios of all tensors in one vector) instead of
    ~8 launches per tensor; the math is the same
    (``foreach=False`` is the per-tensor reference). Not ``timm.optim.Lars``: it loops over
    tensors in Python (launch-bound on a GPU) and always adapts or never, where the SSL
    papers exclude biases and norms by parameter group.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.02,
        *,
        foreach: bool = True,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ConfigError(
                f"LARS needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0; got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}."
            )
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._group_foreach if self.foreach else self._group_single)(group, params)
        return loss

    def _group_single(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            grad = p.grad
            if not group["lars_exclude"]:
                grad = grad.add(p, alpha=group["weight_decay"])
                grad = grad.mul(_trust_ratio(
                    torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad), group["eta"]
                ))
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.clone(grad).detach()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
            p.add_(state["momentum_buffer"], alpha=-group["lr"])

    def _group_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if not group["lars_exclude"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            # All trust ratios at once: a fixed number of kernels, however many tensors.
            trust = _trust_ratio(torch.stack(torch._foreach_norm(params)),
                                 torch.stack(torch._foreach_norm(grads)), group["eta"])
            torch._foreach_mul_(grads, trust.unbind())
        fresh = [i for i, p in enumerate(params) if "momentum_buffer" not in self.state[p]]
        old = [i for i, p in enumerate(params) if "momentum_buffer" in self.state[p]]
        for i in fresh:
            self.state[params[i]]["momentum_buffer"] = torch.clone(grads[i]).detach()
        if old:
            buffers = [self.state[params[i]]["momentum_buffer"] for i in old]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, [grads[i] for i in old])
        torch._foreach_add_(
            params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"]
        )


def _trust_ratio(param_norm: torch.Tensor, update_norm: torch.Tensor, eta: float) -> torch.Tensor:
    """eta * ||w|| / ||update||, or 1 when either norm is 0 (stays on the device: no sync)."""
    return torch.where(
        (param_norm > 0) & (update_norm > 0),
        eta * param_norm / update_norm,
        torch.ones_like(param_norm),
    )


def build_optimizer(
    name: str,
    param_groups: list[dict[str, Any]],
    lr: float,
    weight_decay: float,
    *,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    """Create ``name`` ('lars', 'adamw', 'sgd') over param groups from ``parameter_groups``.

    Groups that carry ``weight_decay=0`` (biases, norms) keep it; others get ``weight_decay``.
    On CUDA, AdamW and SGD use torch's fused kernels (one launch per step); LARS always
    uses its foreach implementation.
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
    fused = {"fused": True} if device_type == "cuda" else {"foreach": True}
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **fused)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, **fused)
