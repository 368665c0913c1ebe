"""One adaptation step: SSL heads, the loss (SSL + distillation), sample selection, checkpointed blocks."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from edge_ssl.adapt.bn import kept_batch_norms
from edge_ssl.adapt.config import AdaptConfig
from edge_ssl.errors import ConfigError
from edge_ssl.tensors import eval_transform, images_to_tensor, preprocess
from edge_ssl.train.methods import SSLMethod, create_method


def build_method(encoder: nn.Module, config: AdaptConfig) -> SSLMethod:
    """SimSiam or BYOL heads sized for a small on-device step (``head_dim`` wide)."""
    dim = config.head_dim
    if config.method == "simsiam":
        return create_method("simsiam", encoder, projection_hidden_dim=dim, projection_dim=dim,
                             prediction_hidden_dim=max(8, dim // 4))
    return create_method("byol", encoder, projection_hidden_dim=dim, projection_dim=max(8, dim // 2),
                         prediction_hidden_dim=dim)


def ssl_terms(
    method: SSLMethod, x1: torch.Tensor, x2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(SSL loss, h1, h2): the method's own heads and loss, keeping the embeddings for distillation."""
    h1, h2 = method.encoder(x1), method.encoder(x2)
    if method.name == "simsiam":
        z1, z2 = method.projector(h1), method.projector(h2)
        p1, p2 = method.predictor(z1), method.predictor(z2)
        return method.criterion(p1, p2, z1, z2), h1, h2
    p1 = method.predictor(method.projector(h1))
    p2 = method.predictor(method.projector(h2))
    with torch.no_grad():
        z1 = method.target_projector(method.target_encoder(x1))
        z2 = method.target_projector(method.target_encoder(x2))
    return method.criterion(p1, p2, z1, z2), h1, h2


def distill_term(h1: torch.Tensor, h2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cos) of both views' embeddings to the deployed model's embedding (N, D)."""
    target = target.to(h1.dtype)
    cos1 = F.cosine_similarity(h1, target, dim=1)
    cos2 = F.cosine_similarity(h2, target, dim=1)
    return 1.0 - (cos1.mean() + cos2.mean()) / 2


def aligned_norms(encoder: nn.Module, config: AdaptConfig) -> list[nn.Module]:
    """The BN layers that keep the deployed statistics in this run (what ``align_weight`` targets)."""
    return kept_batch_norms(encoder, config.bn_depth if config.bn_stats else None)


def check_alignment(encoder: nn.Module, config: AdaptConfig) -> None:
    """Refuse ``align_weight`` for an encoder with no BN layer to align (ViTs, for example)."""
    if config.align_weight > 0 and not aligned_norms(encoder, config):
        raise ConfigError("align_weight needs BatchNorm layers that keep the deployed statistics; "
                          "this encoder has none. Use align_weight=0.")


def alignment_term(encoder: nn.Module, layers: list[nn.Module], batch: torch.Tensor) -> torch.Tensor:
    """Mean over ``layers`` and channels of how far the batch statistics of each layer's input
    are from its running (deployed) statistics: ``(mean - mu)^2 / var_ref + (std / std_ref - 1)^2``
    (both scale-free). Runs ``encoder`` on ``batch`` once; the encoder stays in eval mode."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [layer.register_forward_pre_hook(lambda module, args: seen.append((module, args[0])))
               for layer in layers]
    try:
        encoder(batch)
    finally:
        for handle in handles:
            handle.remove()
    terms = []
    for bn, x in seen:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).float()
        mean, var = flat.mean(dim=1), flat.var(dim=1, unbiased=False)
        ref_var = bn.running_var + bn.eps
        shift = (mean - bn.running_mean) ** 2 / ref_var
        scale = ((var + bn.eps) / ref_var).sqrt() - 1
        terms.append((shift + scale * scale).mean())
    return torch.stack(terms).mean()


def replay_term(encoder: nn.Module, images: np.ndarray, targets: np.ndarray,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean 1 - cos of the clean replay images' embeddings to the deployed model's, input)."""
    batch = preprocess(images, encoder.spec.input, device)
    target = torch.from_numpy(targets).to(device)
    return 1.0 - F.cosine_similarity(encoder(batch), target.float(), dim=1).mean(), batch


def step_loss(
    method: SSLMethod,
    views: nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    config: AdaptConfig,
    device: torch.device,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """The adaptation loss of one batch of uint8 images; (loss, logs, input tensors).

    ``replay``: (clean replay images, their deployed embeddings), used when ``replay_weight`` > 0.
    """
    batch = images_to_tensor(images, device)
    plain = eval_transform(batch, method.encoder.spec.input) if config.align_weight > 0 else None
    x1, x2 = views(batch)
    ssl, h1, h2 = ssl_terms(method, x1, x2)
    distill = distill_term(h1, h2, torch.from_numpy(targets).to(device))
    loss = config.ssl_weight * ssl + config.distill_weight * distill
    logs = {"ssl": float(ssl.detach()), "distill": float(distill.detach())}
    inputs = [batch, x1, x2]
    if plain is not None:  # the un-augmented batch, from the copy already on the device
        align = alignment_term(method.encoder, aligned_norms(method.encoder, config), plain)
        loss = loss + config.align_weight * align
        logs["align"] = float(align.detach())
        inputs.append(plain)
    if replay is not None and config.replay_weight > 0:
        term, replay_batch = replay_term(method.encoder, *replay, device)
        loss = loss + config.replay_weight * term
        logs["replay"] = float(term.detach())
        inputs.append(replay_batch)
    logs["loss"] = float(loss.detach())
    return loss, logs, inputs


class SampleSelector:
    """EATA-style selection (Niu et al. 2022): skip images redundant with those already used.

    EATA drops samples whose prediction is within cosine ``threshold`` of the moving
    average of earlier ones; without a classifier we use the deployed embedding. The
    moving average (momentum 0.9, as EATA) is part of the checkpoint.
    """

    def __init__(self, threshold: float, state: np.ndarray | None = None) -> None:
        self.threshold = threshold
        self.mean = state

    def select(self, targets: np.ndarray, minimum: int) -> np.ndarray:
        """Indices into ``targets`` to train on (at least ``minimum``, most novel first)."""
        unit = targets / np.maximum(np.linalg.norm(targets, axis=1, keepdims=True), 1e-12)
        if self.mean is None:
            keep = np.arange(len(unit))
        else:
            mean = self.mean / max(float(np.linalg.norm(self.mean)), 1e-12)
            cos = unit @ mean
            keep = np.flatnonzero(cos < self.threshold)
            if len(keep) < minimum:
                keep = np.sort(np.argsort(cos)[:minimum])
        chosen = unit[keep].mean(axis=0)
        self.mean = chosen if self.mean is None else 0.9 * self.mean + 0.1 * chosen
        return keep


def stage_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The blocks of every timm feature stage in execution order (what checkpointing wraps)."""
    blocks: list[nn.Module] = []
    for entry in getattr(backbone, "feature_info", None) or []:
        name = entry.get("module") if isinstance(entry, dict) else None
        if not name:
            continue
        try:
            stage = backbone.get_submodule(name)
        except AttributeError:
            continue
        children = list(stage.children())
        blocks.extend(children if isinstance(stage, nn.Sequential) and children else [stage])
    return blocks


def backward_blocks(backbone: nn.Module) -> list[nn.Module]:
    """Stage blocks the backward pass runs through: from the first one holding a trainable tensor."""
    blocks = stage_blocks(backbone)
    for index, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            return blocks[index:]
    return []


def enable_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of keeping them (in place)."""
    for block in blocks:
        original = block.forward

        def forward(*args: torch.Tensor, _original=original) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False)

        block.forward = forward


def disable_checkpointing(blocks: list[nn.Module]) -> None:
    for block in blocks:
        if "forward" in block.__dict__:
            del block.forward


def iterate_batches(
    images: np.ndarray, batch: int, device: torch.device, spec: object
) -> Iterator[torch.Tensor]:
    """Normalized, resized eval batches of ``images`` (for the BN statistics pass)."""
    for start in range(0, len(images), batch):
        yield preprocess(images[start : start + batch], spec, device)  # type: ignore[arg-type]


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or host allocation failure (the step can be retried with a smaller batch)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if oom and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )
