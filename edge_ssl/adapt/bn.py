"""BatchNorm statistics for adaptation: AdaBN re-estimation with a prior and a depth, and
carrying what the gradient steps changed into statistics the local data did not set."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def batch_norms(module: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer with running statistics (the ones AdaBN re-estimates)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            yield layer


def bn_statistics(encoder: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of every BN layer's (running_mean, running_var), in ``batch_norms`` order."""
    return [(bn.running_mean.detach().clone(), bn.running_var.detach().clone()) for bn in batch_norms(encoder)]


def shallow_count(total: int, depth: float) -> int:
    """How many of ``total`` BN layers, counted from the input, a ``depth`` share covers (>= 1)."""
    return max(1, min(total, round(depth * total))) if total else 0


def kept_batch_norms(encoder: nn.Module, depth: float | None) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BN layers that keep the deployed statistics: those past ``depth`` (see
    :func:`reestimate_bn_stats`), or every one when no statistics pass runs (``None``)."""
    layers = list(batch_norms(encoder))
    return layers if depth is None else layers[shallow_count(len(layers), depth):]


@torch.no_grad()
def reestimate_bn_stats(
    encoder: nn.Module, batches: Iterator[torch.Tensor], *, prior: float = 0.0,
    source: list[tuple[torch.Tensor, torch.Tensor]] | None = None, depth: float = 1.0,
) -> int:
    """AdaBN (Li et al. 2016): recompute BN running mean/var on ``batches``.

    ``prior`` in [0, 1) keeps that weight on the source statistics (Schneider et al. 2020,
    "Improving robustness against common corruptions by covariate shift adaptation"):
    ``stat = prior * source + (1 - prior) * target``. ``source`` defaults to the current
    statistics; pass the deployed model's (``bn_statistics``) when re-estimating again, or
    the prior would compound. ``depth`` in (0, 1] re-estimates only that share of the BN
    layers, counted from the input in module order; deeper layers get the source statistics
    (corruptions shift low-level statistics; deep ones carry what the kNN bank was built
    with). Returns the number of images seen. Only BN buffers change; the train/eval flag
    of every module is restored.
    """
    layers = list(batch_norms(encoder))
    if not layers:
        return 0
    current = bn_statistics(encoder)
    if source is not None and [m.shape for m, _ in source] != [m.shape for m, _ in current]:
        raise ValueError("source BN statistics do not match the encoder's BatchNorm layers.")
    mix = source if source is not None else current
    shallow = shallow_count(len(layers), depth)
    momenta = [bn.momentum for bn in layers]
    modes = [(m, m.training) for m in encoder.modules()]
    for index, bn in enumerate(layers):
        if index < shallow:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over all batches
            bn.train()
        else:  # deeper layers normalize with the source statistics during the pass too
            bn.running_mean.copy_(mix[index][0])
            bn.running_var.copy_(mix[index][1])
            bn.eval()
    seen = 0
    try:
        for batch in batches:
            encoder(batch)
            seen += len(batch)
    finally:
        for bn, momentum, (mean, var), (prior_mean, prior_var) in zip(
                layers[:shallow], momenta, current, mix, strict=False):
            bn.momentum = momentum
            if seen == 0:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            else:
                bn.running_mean.mul_(1 - prior).add_(prior_mean, alpha=prior)
                bn.running_var.mul_(1 - prior).add_(prior_var, alpha=prior)
        if seen == 0:
            for bn, (mean, var) in zip(layers[shallow:], current[shallow:], strict=True):
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
        for module, training in modes:
            module.training = training
    return seen


@torch.no_grad()
def blend_bn_statistics(
    encoder: nn.Module, measured: list[tuple[torch.Tensor, torch.Tensor]],
    source: list[tuple[torch.Tensor, torch.Tensor]], *, depth: float, prior: float,
) -> None:
    """Set the statistics :func:`reestimate_bn_stats` would give at ``prior`` and ``depth`` from
    ``measured``, the statistics of a pass at prior 0 and the same depth: a prior only mixes
    the measured statistics with ``source`` afterwards, so one pass serves every prior."""
    layers = list(batch_norms(encoder))
    shallow = shallow_count(len(layers), depth)
    for index, bn in enumerate(layers):
        (mean, var), (src_mean, src_var) = measured[index], source[index]
        if index < shallow:
            bn.running_mean.copy_(mean).mul_(1 - prior).add_(src_mean, alpha=prior)
            bn.running_var.copy_(var).mul_(1 - prior).add_(src_var, alpha=prior)
        else:
            bn.running_mean.copy_(src_mean)
            bn.running_var.copy_(src_var)


@torch.no_grad()
def bn_input_statistics(encoder: nn.Module, batches: Iterator[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, variance) of every BN layer's input over ``batches``, with the model
    as it is (eval mode: each BN normalizes with its running statistics). Changes nothing."""
    layers = list(batch_norms(encoder))
    sums: list[list[torch.Tensor | float]] = [[0.0, 0.0, 0.0] for _ in layers]

    def record(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().transpose(0, 1).reshape(args[0].shape[1], -1).double()
            totals = sums[index]
            totals[0] = totals[0] + x.sum(dim=1)
            totals[1] = totals[1] + (x * x).sum(dim=1)
            totals[2] = totals[2] + x.shape[1]
        return hook

    handles = [bn.register_forward_pre_hook(record(i)) for i, bn in enumerate(layers)]
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        for batch in batches:
            encoder(batch)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    stats = []
    for bn, (total, squares, count) in zip(layers, sums, strict=True):
        if not count:
            raise ValueError("bn_input_statistics needs at least one batch.")
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        stats.append((mean.to(bn.running_mean), var.to(bn.running_var)))
    return stats


@torch.no_grad()
def carry_step_change(encoder: nn.Module, source: list[tuple[torch.Tensor, torch.Tensor]],
                      before: list[tuple[torch.Tensor, torch.Tensor]],
                      after: list[tuple[torch.Tensor, torch.Tensor]], *, depth: float) -> None:
    """Give the BN layers deeper than ``depth`` the source statistics moved by what the
    gradient steps changed in their inputs on the local images: ``mean = source + (after -
    before)``, ``var = source x after / before``. Gradient steps shift what a layer sees; the
    deployed statistics alone would no longer normalize it, and local statistics would undo
    what ``depth`` keeps. Layers the steps did not reach have ``after == before``: unchanged."""
    layers = list(batch_norms(encoder))
    shallow = shallow_count(len(layers), depth)
    for bn, (mean, var), (mean0, var0), (mean1, var1) in zip(
            layers[shallow:], source[shallow:], before[shallow:], after[shallow:], strict=True):
        eps = bn.eps
        bn.running_mean.copy_(mean + (mean1 - mean0))
        bn.running_var.copy_(var * (var1 + eps) / (var0 + eps))
