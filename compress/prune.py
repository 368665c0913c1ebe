"""Structured pruning with Torch-Pruning: channels (CNN) and heads / MLP width (ViT) removed for real."""

from __future__ import annotations

import copy
import fnmatch
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.compress.stage_graph import ship_graph

from edge_ssl.bundle import Bundle
from edge_ssl.config import check_choice, config_from_dict, config_to_dict
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import ConfigError, EdgeSSLError
from edge_ssl.output_check import write_stage_bundle
from edge_ssl.outputs import check_bundle_out
from edge_ssl.spec import EncoderSpec
from edge_ssl.stage import StageResult, open_float_parent

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")
SCOPES = ("global", "uniform")
FACTORY = "edge_ssl.compress.prune.build_pruned_encoder"
#: Spec kwargs that describe the pruned shapes; the rest are the base encoder's kwargs.
PRUNED_KEYS = ("pruned_shapes", "pruned_attrs")
#: Module attributes that follow the tensor shapes (Conv, Linear, norms, timm Attention).
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features",
                "num_features", "normalized_shape", "num_channels", "num_heads", "head_dim",
                "attn_dim", "scale")


class PruneError(EdgeSSLError, ValueError):
    """A pruning setting or result is not usable (for example the pruned model no longer runs)."""


@dataclass(frozen=True)
class PruneConfig:
    """Settings of structured pruning.

    - ``ratio``: fraction of prunable channels to remove, in (0, 1). ``scope="global"``
      ranks channels across layers (layers that matter less lose more); ``uniform`` takes
      the same fraction from every layer.
    - ``importance``: ``l1``/``l2`` weight magnitude, ``bn_scale`` (|gamma| of BatchNorm,
      Network Slimming), ``taylor`` (first-order |w * dL/dw| with a cross-view distillation
      loss against the unpruned model on ``taylor_batches`` unlabeled batches).
    - ``round_to`` keeps channel counts multiples of 8 (TensorRT picks faster kernels);
      ``board_round_to`` gives a board's multiple (32 for INT8 on Ampere).
    - ``exclude``: fnmatch patterns of module names never pruned, e.g. ``backbone.conv1``.
    - ``steps`` > 1 prunes iteratively; with ``recovery_epochs`` > 0 the pruned model is
      distilled from the unpruned one after every step (settings in ``recovery``, a
      DistillConfig dict).
    - ViTs: ``prune_heads`` removes whole heads, otherwise the head dims shrink; MLP width
      is pruned in both cases; the residual width (the embedding) is kept.
    """

    ratio: float = 0.5
    importance: str = "l2"
    scope: str = "global"
    round_to: int = 8
    exclude: tuple[str, ...] = ()
    steps: int = 1
    recovery_epochs: int = 0
    recovery: Mapping[str, Any] = field(default_factory=dict)
    taylor_batches: int = 4
    batch_size: int = 64
    max_layer_ratio: float = 0.9
    prune_heads: bool = False
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple([self.exclude] if isinstance(self.exclude, str) else self.exclude))
        object.__setattr__(self, "recovery", dict(self.recovery))
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ConfigError(
                f"prune ratio must be a number in (0, 1) (the fraction of channels removed); got {ratio!r}. "
                "For example --ratio 0.5 removes half."
            )
        check_choice("PruneConfig", "importance", self.importance, IMPORTANCES)
        check_choice("PruneConfig", "scope", self.scope, SCOPES)
        for name in ("round_to", "steps", "taylor_batches", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"PruneConfig.{name} must be an integer >= 1; got {value!r}.")
        if self.recovery_epochs < 0:
            raise ConfigError(f"PruneConfig.recovery_epochs must be >= 0; got {self.recovery_epochs}.")
        if not 0 < self.max_layer_ratio < 1:
            raise ConfigError(f"PruneConfig.max_layer_ratio must be in (0, 1); got {self.max_layer_ratio}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PruneConfig:
        return config_from_dict(cls, values)


@dataclass
class PruneResult(StageResult):
    """The pruned encoder (CPU, eval), per-step sizes; ``bundle`` when one was written."""

    encoder: Any
    steps: list[dict[str, Any]]


def board_round_to(profile: Any, precision: str) -> int:
    """Channel multiple for ``profile``'s tensor cores at ``precision`` (a DeviceProfile or its name).

    The MMA tile the latency model pads channels to (``devices/predict.py``'s ``tile_for``):
    8 for FP16 tensor cores, 16 (Volta) / 32 (Ampere and later) for INT8; never below 8, the
    multiple TensorRT's FP16 kernels want on every generation.
    """
    from edge_ssl.devices.predict import tile_for
    from edge_ssl.devices.profiles import get_profile

    board = get_profile(profile) if isinstance(profile, str) else profile
    return max(8, tile_for(board.arch, "fp16" if precision in ("none", "fp32") else precision))


# --------------------------------------------------------------------- rebuild from a spec


def base_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    """The encoder factory's own kwargs (no pruned shapes)."""
    return {k: v for k, v in spec.kwargs.items() if k not in PRUNED_KEYS}


def build_pruned_encoder(spec: EncoderSpec) -> Any:
    """Rebuild a pruned encoder from its spec: the base model with the recorded shapes applied.

    The factory named in pruned bundles' manifests (``build_from_spec`` calls it with the
    whole spec); weights are random until ``load_state_dict``.
    """
    from edge_ssl.models import Encoder, create_encoder

    base = create_encoder(spec.arch, **base_kwargs(spec))
    backbone = base.backbone
    shapes = spec.kwargs.get("pruned_shapes", {})
    attrs = spec.kwargs.get("pruned_attrs", {})
    _apply_shapes(base, shapes)
    for module_name, values in attrs.items():
        module = _module(base, module_name)
        for attr, value in values.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    return Encoder(backbone, spec)


def _module(root: Any, name: str) -> Any:
    try:
        return root.get_submodule(name) if name else root
    except AttributeError:
        raise ConfigError(
            f"pruned encoder spec names module {name!r}, which this edge-ssl/timm version does "
            "not have; rebuild the bundle with the version that wrote it."
        ) from None


def _apply_shapes(model: Any, shapes: Mapping[str, Any]) -> None:
    import torch

    for full_name, shape in shapes.items():
        module_name, _, attr = full_name.rpartition(".")
        module = _module(model, module_name)
        current = getattr(module, attr, None)
        if not isinstance(current, torch.Tensor):
            raise ConfigError(f"pruned encoder spec names tensor {full_name!r}, which the base model lacks.")
        empty = torch.zeros(tuple(shape), dtype=current.dtype)
        if isinstance(current, torch.nn.Parameter):
            setattr(module, attr, torch.nn.Parameter(empty, requires_grad=current.requires_grad))
        else:
            module.register_buffer(attr, empty)


def pruned_spec(pruned: Any, base_spec: EncoderSpec) -> EncoderSpec:
    """The spec of ``pruned``: base arch and kwargs plus every tensor shape and module attribute
    that differs from a freshly built base model."""
    from edge_ssl.models import create_encoder

    kwargs = base_kwargs(base_spec)
    base = create_encoder(base_spec.arch, **kwargs)
    base_tensors = {**dict(base.named_parameters()), **dict(base.named_buffers())}
    shapes: dict[str, list[int]] = {}
    for name, tensor in [*pruned.named_parameters(), *pruned.named_buffers()]:
        if name not in base_tensors:
            raise PruneError(f"pruned model has tensor {name!r} that the base model lacks; cannot describe it.")
        if tuple(tensor.shape) != tuple(base_tensors[name].shape):
            shapes[name] = list(tensor.shape)
    base_modules = dict(base.named_modules())
    attrs: dict[str, dict[str, Any]] = {}
    for name, module in pruned.named_modules():
        changed = {
            attr: list(value) if isinstance(value, tuple) else value
            for attr in _SHAPE_ATTRS
            if hasattr(module, attr)
            and isinstance(value := getattr(module, attr), (int, float, tuple))
            and value != getattr(base_modules[name], attr, None)
        }
        if changed:
            attrs[name] = changed
    return EncoderSpec(
        arch=base_spec.arch, input=base_spec.input, embed_dim=base_spec.embed_dim,
        kwargs={**kwargs, "pruned_shapes": shapes, "pruned_attrs": attrs}, factory=FACTORY,
    )


# --------------------------------------------------------------------- pruning


def _output_layers(model: Any, example: Any, embed_dim: int) -> list[Any]:
    """The last layer that writes the embedding: kept whole so the embedding dim stays."""
    import torch
    from torch import nn

    kinds = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: order.append(mod)
                                if isinstance(out, torch.Tensor) and out.ndim >= 2 and
                                (out.shape[1] == embed_dim or out.shape[-1] == embed_dim) else None)
        for m in model.modules() if isinstance(m, kinds)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1:]


def _excluded(model: Any, patterns: tuple[str, ...]) -> list[Any]:
    matched = [m for name, m in model.named_modules() if name and any(fnmatch.fnmatch(name, p) for p in patterns)]
    for pattern in patterns:
        if not any(fnmatch.fnmatch(name, pattern) for name, _ in model.named_modules() if name):
            raise ConfigError(
                f"exclude pattern {pattern!r} matches no module; module names look like "
                f"{', '.join(n for n, _ in list(model.named_modules())[1:4])}."
            )
    return matched


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn_scale":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupTaylorImportance()


def _attention_heads(model: Any) -> dict[Any, int]:
    return {m.qkv: int(m.num_heads) for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}


def _fix_attention(model: Any, num_heads: Mapping[Any, int]) -> None:
    """After head pruning, timm Attention must know its new head count and head dim."""
    for module in model.modules():
        if hasattr(module, "qkv") and hasattr(module, "num_heads"):
            heads = int(num_heads.get(module.qkv, module.num_heads))
            head_dim = module.qkv.out_features // (3 * heads)
            module.num_heads, module.head_dim = heads, head_dim
            module.attn_dim = heads * head_dim
            module.scale = head_dim ** -0.5


def prune_step(model: Any, ratio: float, config: PruneConfig, data: ImageDataset | None,
               reference: Any | None) -> None:
    """Remove ``ratio`` of the prunable channels of ``model`` in place (one Torch-Pruning step)."""
    import torch
    import torch_pruning as tp

    example = torch.zeros(2, *model.spec.input.shape)
    model.eval()
    ignored = _output_layers(model, example, model.spec.embed_dim) + _excluded(model, config.exclude)
    heads = _attention_heads(model)
    if config.importance == "taylor":
        _taylor_gradients(model, config, data, reference)
    with warnings.catch_warnings():
        # ViT cls_token / pos_embed live on the residual width, which is never pruned here.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = _pruner(tp, model, example, config, ratio, ignored, heads)
    pruner.step()
    model.zero_grad(set_to_none=True)
    if heads:
        _fix_attention(model, pruner.num_heads)


def _pruner(tp: Any, model: Any, example: Any, config: PruneConfig, ratio: float, ignored: list[Any],
            heads: dict[Any, int]) -> Any:
    return tp.pruner.BasePruner(
        model, example, _importance(config.importance),
        global_pruning=config.scope == "global", pruning_ratio=ratio,
        max_pruning_ratio=config.max_layer_ratio, ignored_layers=ignored, round_to=config.round_to,
        num_heads=heads, prune_num_heads=config.prune_heads and bool(heads),
        prune_head_dims=not config.prune_heads, head_pruning_ratio=ratio if config.prune_heads else 0.0,
    )


def _taylor_gradients(model: Any, config: PruneConfig, data: ImageDataset | None, reference: Any) -> None:
    """Accumulate dL/dw of a cross-view distillation loss against the unpruned model."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from edge_ssl.compress.training import teacher_embed

    from edge_ssl.data.views import ViewAugment, view_preset
    from edge_ssl.tensors import images_to_tensor

    if data is None or reference is None:
        raise PruneError("taylor importance needs unlabeled images (--data) to compute gradients.")
    spec = model.spec.input
    generator = torch.Generator().manual_seed(config.seed)
    augment = ViewAugment(view_preset("simclr", spec.image_size), spec, generator=generator)
    order = np.random.default_rng(config.seed).permutation(len(data))
    model.zero_grad(set_to_none=True)
    model.train()
    for step in range(config.taylor_batches):
        index = np.sort(order[(step * config.batch_size) % len(data):][: config.batch_size])
        if len(index) < 2:
            break
        v1, v2 = augment(images_to_tensor(data.images[index]))[:2]
        target = teacher_embed(reference, v2, model.spec)
        loss = (1 - F.cosine_similarity(model(v1), target, dim=1)).mean()
        loss.backward()
    model.eval()


def step_ratios(ratio: float, steps: int) -> list[float]:
    """Per-step ratios of the remaining channels so that ``steps`` steps remove ``ratio`` in all
    (linear schedule of the cumulative ratio, as Torch-Pruning's iterative pruning)."""
    cumulative = [ratio * (i + 1) / steps for i in range(steps)]
    previous = [0.0, *cumulative[:-1]]
    return [1 - (1 - c) / (1 - p) for c, p in zip(cumulative, previous, strict=True)]


def prune_encoder(
    encoder: Any,
    config: PruneConfig,
    data: ImageDataset | None = None,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> PruneResult:
    """Prune a copy of ``encoder`` (never modified) and check that the result still runs.

    Between steps, with ``recovery_epochs`` > 0, the pruned model is distilled from the
    unpruned ``encoder`` on ``data``.
    """
    from edge_ssl.compress.measure import model_metrics

    reference = copy.deepcopy(encoder).cpu().eval()
    model = copy.deepcopy(encoder).cpu().eval()
    if config.recovery_epochs and data is None:
        raise PruneError("recovery distillation (recovery_epochs > 0) needs unlabeled images (--data).")
    history = [{"step": 0, **model_metrics(model)}]
    for index, ratio in enumerate(step_ratios(config.ratio, config.steps), start=1):
        prune_step(model, ratio, config, data, reference)
        check_runs(model)
        if config.recovery_epochs:
            model = _recover(model, reference, data, config)
        history.append({"step": index, "step_ratio": ratio, **model_metrics(model)})
        if progress is not None:
            progress(history[-1])
    model.spec = pruned_spec(model, encoder.spec)
    return PruneResult(model.eval(), history)


def _recover(model: Any, reference: Any, data: ImageDataset, config: PruneConfig) -> Any:
    from edge_ssl.compress.distill import DistillConfig, train_student

    settings = {"objectives": ("feature",), "epochs": config.recovery_epochs, "device": config.device,
                "batch_size": min(config.batch_size, len(data)), "seed": config.seed,
                "warmup_epochs": 0.0} | dict(config.recovery)
    recovery = DistillConfig.from_dict(settings)
    return train_student(model, reference, data, recovery).encoder


def check_runs(model: Any) -> None:
    """The pruned model must still map a batch to finite (N, embed_dim) embeddings."""
    import torch

    example = torch.randn(2, *model.spec.input.shape)
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except RuntimeError as exc:
        raise PruneError(
            f"the pruned model no longer runs ({exc}). Exclude the failing layers with --exclude "
            "or lower --ratio."
        ) from exc
    if tuple(out.shape) != (2, model.spec.embed_dim) or not torch.isfinite(out).all():
        raise PruneError(
            f"the pruned model returns {tuple(out.shape)} (finite: {bool(torch.isfinite(out).all())}); "
            f"expected (2, {model.spec.embed_dim}). Lower --ratio or exclude more layers."
        )


def prune(
    bundle: str | os.PathLike | Bundle,
    config: PruneConfig,
    data: ImageDataset | None,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    with_graph: bool = False,
) -> PruneResult:
    """Prune a float bundle's encoder and write the pruned bundle to ``out`` (the input is
    untouched); ``with_graph`` ships its parity-checked ONNX graph too (what compress measures)."""
    from edge_ssl.compress.distill import check_data

    out = Path(out)
    check_bundle_out(out, overwrite=overwrite)
    _, source, encoder = open_float_parent(bundle, "prune")
    if data is not None:
        check_data(data, encoder.spec, min(config.batch_size, 2))
    elif config.importance == "taylor" or config.recovery_epochs:
        raise PruneError(f"importance {config.importance!r} / recovery needs unlabeled images: pass --data.")
    result = prune_encoder(encoder, config, data, progress=progress)
    settings = config_to_dict(config) | {"data": None if data is None else data.source}
    first, last = result.steps[0], result.steps[-1]
    images = None if data is None else data.images
    metrics = {
        "params": last["params"], "macs": last["macs"],
        "prune": {"params_before": first["params"], "macs_before": first["macs"],
                  "params_kept": last["params"] / first["params"], "steps": result.steps},
    }
    result.wrote(write_stage_bundle(
        out, result.encoder, stage="prune", parent=encoder,
        images=images,
        lineage=source.child_lineage("prune", settings), metrics=metrics, overwrite=overwrite,
        attach=ship_graph(result.encoder, images, str(out)) if with_graph else None))
    return result
