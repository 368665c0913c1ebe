"""Encoder registry and factory: timm backbones plus CIFAR-size variants, rebuilt from an EncoderSpec."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_ssl.errors import CheckpointError, ConfigError
from edge_ssl.lazy import require
from edge_ssl.registry import Registry, did_you_mean
from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, InputSpec

#: Channel counts are rounded to this multiple: TensorRT picks faster kernels for them.
CHANNEL_DIVISOR = 8
#: The keyword arguments every encoder accepts.
ENCODER_KWARGS = ("width", "image_size")
MAX_WIDTH = 4.0


class Encoder(nn.Module):
    """A timm backbone (``num_classes=0``, globally pooled) and the spec that rebuilds it.

    ``forward``: float (N, 3, H, W), normalized as ``spec.input`` says -> (N, spec.embed_dim).
    State-dict keys are ``"backbone.<timm key>"``.
    """

    def __init__(self, backbone: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        if not isinstance(spec, EncoderSpec):
            raise ConfigError(f"Encoder needs an EncoderSpec, got {type(spec).__name__}.")
        self.backbone = backbone
        self.spec = spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


@dataclass(frozen=True)
class EncoderInfo:
    """One row of ``edge-ssl encoders``."""

    name: str
    timm_name: str
    description: str
    input_size: int
    family: str  # "cnn" | "vit"


@dataclass(frozen=True)
class EncoderEntry:
    """A registered encoder: its info and ``build(width, image_size) -> timm backbone``."""

    info: EncoderInfo
    build: Callable[[float, int], nn.Module]
    cifar: bool
    min_size: int
    patch_size: int = 0  # ViTs: image_size must be a multiple of it


ENCODERS: Registry[EncoderEntry] = Registry("encoder")


def round_channels(channels: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Nearest multiple of ``divisor`` (at least ``divisor``, never more than 10% below)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


# --- ResNet ---------------------------------------------------------------------------------


def _resnet(timm_name: str, width: float, image_size: int, *, cifar: bool) -> nn.Module:
    timm = require("timm", "encoders")
    from timm.models.resnet import make_blocks

    channels = tuple(round_channels(c * width) for c in (64, 128, 256, 512))
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, channels=channels)
    stem = channels[0]
    narrowed = stem != model.conv1.out_channels
    if narrowed:
        # timm's plain stem is always 64 wide; narrow it with the stages so small students stay small.
        block = type(model.layer1[0])
        layers = tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5))
        stages, _ = make_blocks(
            (block,) * 4,
            channels,
            layers,
            stem,
            act_layer=nn.ReLU,
            norm_layer=nn.BatchNorm2d,
        )
        for stage_name, stage in stages:
            setattr(model, stage_name, stage)
        model.bn1 = nn.BatchNorm2d(stem)
    if cifar:
        # The CIFAR ResNet of the SSL literature: 3x3 stride-1 stem, no max-pool (32x32 -> 4x4).
        model.conv1 = nn.Conv2d(3, stem, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        model.feature_info = [
            dict(info, reduction=max(1, info["reduction"] // 4)) for info in model.feature_info
        ]
    elif narrowed:
        model.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.feature_info[0] = dict(model.feature_info[0], num_chs=stem)
    model.init_weights(zero_init_last=True)
    return model


# --- MobileNetV3 / EfficientNet -------------------------------------------------------------


def _stem_stride_one(model: nn.Module) -> nn.Module:
    """Make the 3x3 stride-2 ``conv_stem`` stride 1 (same weights), so 32x32 inputs keep detail."""
    old = model.conv_stem
    new = nn.Conv2d(
        old.in_channels,
        old.out_channels,
        old.kernel_size,
        stride=1,
        padding=1,
        bias=old.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.conv_stem = new
    return model


# timm's public entry points (create_model('mobilenetv3_small_100'), 'efficientnet_b0') fix the
# width multiplier and refuse another one ("multiple values for channel_multiplier"); only the
# generators behind them take it. They are private, so pyproject.toml caps timm to <1.1 and
# test_models checks that every width builds: a timm upgrade is a deliberate, tested step.
def _mobilenetv3(timm_name: str, width: float, image_size: int, *, cifar: bool) -> nn.Module:
    require("timm", "encoders")
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    model = _gen_mobilenet_v3(timm_name, width, pretrained=False, num_classes=0)
    return _stem_stride_one(model) if cifar else model


def _efficientnet(timm_name: str, width: float, image_size: int, *, cifar: bool) -> nn.Module:
    require("timm", "encoders")
    from timm.models.efficientnet import _gen_efficientnet

    model = _gen_efficientnet(
        timm_name, channel_multiplier=width, depth_multiplier=1.0, pretrained=False, num_classes=0
    )
    return _stem_stride_one(model) if cifar else model


# --- ConvNeXt V2 / RegNet -------------------------------------------------------------------


def _convnextv2(
    timm_name: str, width: float, image_size: int, *, cifar: bool, dims: tuple[int, ...]
) -> nn.Module:
    timm = require("timm", "encoders")
    scaled = tuple(round_channels(d * width) for d in dims)
    return timm.create_model(timm_name, pretrained=False, num_classes=0, dims=scaled)


def _regnet(
    timm_name: str, width: float, image_size: int, *, cifar: bool, w0: int, wa: float
) -> nn.Module:
    timm = require("timm", "encoders")
    new_w0 = round_channels(w0 * width)
    # Scaling the slope with w0 keeps the per-block width ratios, so the stage layout is unchanged.
    return timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=0,
        w0=new_w0,
        wa=wa * new_w0 / w0,
        stem_width=round_channels(32 * width),
    )


# --- ViT ------------------------------------------------------------------------------------


def _vit(
    timm_name: str,
    width: float,
    image_size: int,
    *,
    cifar: bool,
    embed_dim: int,
    num_heads: int,
    **extra: Any,
) -> nn.Module:
    timm = require("timm", "encoders")
    # Every head keeps the same dim and the total stays a multiple of 8.
    step = math.lcm(CHANNEL_DIVISOR, num_heads)
    dim = max(step, round(embed_dim * width / step) * step)
    return timm.create_model(
        timm_name, pretrained=False, num_classes=0, img_size=image_size, embed_dim=dim, **extra
    )


# --- the registry ---------------------------------------------------------------------------

_RESNET_CIFAR = "with a 3x3 stride-1 stem and no max-pool, for 32x32"

#: name, timm name, description, builder, the builder's keyword arguments. Every builder is
#: called as ``builder(timm_name, width, image_size, cifar=..., **kwargs)``. A ``*_cifar``
#: name has the 32x32 stem (input 32, CIFAR mean/std); a ``patch_size`` makes it a ViT.
ENCODER_TABLE: tuple[tuple[str, str, str, Callable[..., nn.Module], dict[str, Any]], ...] = (
    ("resnet18", "resnet18", "ResNet-18 (11.2M params at width 1), ImageNet stem", _resnet, {}),
    ("resnet34", "resnet34", "ResNet-34 (21.3M params at width 1), ImageNet stem", _resnet, {}),
    ("resnet50", "resnet50", "ResNet-50 (23.5M params at width 1), ImageNet stem", _resnet, {}),
    ("resnet18_cifar", "resnet18", f"ResNet-18 {_RESNET_CIFAR}", _resnet, {}),
    ("resnet34_cifar", "resnet34", f"ResNet-34 {_RESNET_CIFAR}", _resnet, {}),
    ("resnet50_cifar", "resnet50", f"ResNet-50 {_RESNET_CIFAR}", _resnet, {}),
    ("mobilenetv3_small", "mobilenetv3_small_100", "MobileNetV3-Small 1.0 (1024-d head)",
     _mobilenetv3, {}),
    ("mobilenetv3_large", "mobilenetv3_large_100", "MobileNetV3-Large 1.0 (1280-d head)",
     _mobilenetv3, {}),
    ("mobilenetv3_small_cifar", "mobilenetv3_small_100",
     "MobileNetV3-Small with a stride-1 stem, for 32x32", _mobilenetv3, {}),
    ("mobilenetv3_large_cifar", "mobilenetv3_large_100",
     "MobileNetV3-Large with a stride-1 stem, for 32x32", _mobilenetv3, {}),
    ("efficientnet_b0", "efficientnet_b0", "EfficientNet-B0 (1280-d)", _efficientnet, {}),
    ("efficientnet_b0_cifar", "efficientnet_b0",
     "EfficientNet-B0 with a stride-1 stem, for 32x32", _efficientnet, {}),
    ("convnextv2_atto", "convnextv2_atto", "ConvNeXt V2 Atto (3.4M params, 320-d)", _convnextv2,
     {"dims": (40, 80, 160, 320)}),
    ("regnetx_002", "regnetx_002", "RegNetX-200MF (368-d)", _regnet, {"w0": 24, "wa": 36.44}),
    ("regnety_002", "regnety_002", "RegNetY-200MF with squeeze-excite (368-d)", _regnet,
     {"w0": 24, "wa": 36.44}),
    ("vit_tiny", "vit_tiny_patch16_224", "ViT-Ti/16 (192-d, 3 heads); CLS token", _vit,
     {"embed_dim": 192, "num_heads": 3, "patch_size": 16}),
    ("vit_small", "vit_small_patch16_224", "ViT-S/16 (384-d, 6 heads); CLS token", _vit,
     {"embed_dim": 384, "num_heads": 6, "patch_size": 16}),
    ("vit_tiny_cifar", "vit_tiny_patch16_224", "ViT-Ti with 4x4 patches for 32x32 (64 tokens)",
     _vit, {"embed_dim": 192, "num_heads": 3, "patch_size": 4}),
)


def _register(
    name: str, timm_name: str, description: str, builder: Callable[..., nn.Module], kwargs: dict
) -> None:
    cifar = name.endswith("_cifar")
    patch_size = int(kwargs.get("patch_size", 0))
    # ImageNet stems downsample 32x; CIFAR stems keep 32x32 inputs at >= 4x4 at the end.
    min_size = patch_size or (8 if cifar else 32)
    family = "vit" if patch_size else "cnn"
    info = EncoderInfo(name, timm_name, description, 32 if cifar else 224, family)
    build = functools.partial(builder, timm_name, cifar=cifar, **kwargs)
    ENCODERS.register(name)(EncoderEntry(info, build, cifar, min_size, patch_size))


for _row in ENCODER_TABLE:
    _register(*_row)


# --- factory --------------------------------------------------------------------------------


def encoder_names() -> list[str]:
    """Sorted names accepted by :func:`create_encoder`."""
    return ENCODERS.names()


def encoder_info(name: str) -> EncoderInfo:
    """The registry row for ``name``; unknown names raise ConfigError with a hint."""
    return ENCODERS.get(name).info


def _check_kwargs(entry: EncoderEntry, kwargs: Mapping[str, Any]) -> tuple[float, int]:
    name = entry.info.name
    for key in kwargs:
        if key not in ENCODER_KWARGS:
            weights = (
                " edge-ssl never downloads weights; load them with import_checkpoint "
                "(`edge-ssl import`)."
                if key == "pretrained"
                else ""
            )
            raise ConfigError(
                f"encoder {name!r} got an unknown argument {key!r}.{did_you_mean(key, ENCODER_KWARGS)} "
                f"Allowed arguments: {', '.join(ENCODER_KWARGS)}.{weights}"
            )
    width = kwargs.get("width", 1.0)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= MAX_WIDTH:
        raise ConfigError(
            f"encoder {name!r}: width must be a number in (0, {MAX_WIDTH}], got {width!r}. "
            "Use e.g. width=0.5 for a half-width student."
        )
    image_size = kwargs.get("image_size", entry.info.input_size)
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < entry.min_size
    ):
        raise ConfigError(
            f"encoder {name!r}: image_size must be an int >= {entry.min_size}, got {image_size!r}."
        )
    if entry.patch_size and image_size % entry.patch_size:
        lower = image_size // entry.patch_size * entry.patch_size
        raise ConfigError(
            f"encoder {name!r}: image_size must be a multiple of the patch size "
            f"{entry.patch_size}, got {image_size}. Try {lower} or {lower + entry.patch_size}."
        )
    return float(width), image_size


def _input_spec(entry: EncoderEntry, backbone: nn.Module, image_size: int) -> InputSpec:
    if entry.cifar:
        mean, std = CIFAR_MEAN, CIFAR_STD
    else:
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return InputSpec(shape=(3, image_size, image_size), mean=mean, std=std)


def embedding_dim(backbone: nn.Module) -> int:
    """Width of the pooled output of a timm backbone built with ``num_classes=0``."""
    # MobileNetV3 has a conv head after pooling: its output is head_hidden_size, not num_features.
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def create_encoder(name: str, **kwargs: Any) -> Encoder:
    """Build a randomly initialized encoder (never downloads weights).

    ``width`` (float, default 1.0) scales every channel count, rounded to multiples of 8;
    ``image_size`` (int, default 32 for ``*_cifar``, 224 otherwise) fixes the input shape.
    The returned spec records exactly the kwargs given, so ``build_from_spec`` rebuilds it.
    """
    entry = ENCODERS.get(name)
    width, image_size = _check_kwargs(entry, kwargs)
    backbone = entry.build(width, image_size)
    spec = EncoderSpec(
        arch=name,
        input=_input_spec(entry, backbone, image_size),
        embed_dim=embedding_dim(backbone),
        kwargs=dict(kwargs),
    )
    return Encoder(backbone, spec)


#: The default factory; other factories must live inside edge_ssl (a manifest never
#: makes edge-ssl import arbitrary code).
DEFAULT_FACTORY = "edge_ssl.models.create_encoder"


def _factory(spec: EncoderSpec) -> Callable[..., Encoder]:
    if spec.factory == DEFAULT_FACTORY:
        return lambda: create_encoder(spec.arch, **spec.kwargs)
    module_name, _, attr = spec.factory.rpartition(".")
    if not module_name.startswith("edge_ssl."):
        raise ConfigError(
            f"encoder factory {spec.factory!r} is not part of edge-ssl; a manifest may only name "
            f"factories inside edge_ssl (default {DEFAULT_FACTORY!r})."
        )
    import importlib

    try:
        build = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"encoder factory {spec.factory!r} does not exist in this edge-ssl ({exc}); the bundle "
            "was written by a newer edge-ssl. Upgrade edge-ssl to read it."
        ) from None
    return lambda: build(spec)


def build_from_spec(spec: EncoderSpec) -> Encoder:
    """Rebuild the (randomly initialized) encoder a spec describes; the spec's metadata is kept.

    ``spec.factory`` other than the default (e.g. a pruned encoder's, which re-applies the
    recorded channel counts) is called with the whole spec.
    """
    encoder = _factory(spec)()
    built = encoder.spec
    if built.embed_dim != spec.embed_dim or built.input.shape != spec.input.shape:
        raise ConfigError(
            f"encoder spec for {spec.arch!r} with kwargs {dict(spec.kwargs)} says embed_dim="
            f"{spec.embed_dim}, input {spec.input.shape}, but this edge-ssl builds embed_dim="
            f"{built.embed_dim}, input {built.input.shape}. The spec was written by an edge-ssl "
            "or timm version with a different architecture; rebuild it with that version."
        )
    return Encoder(encoder.backbone, spec)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` state dict from ``.pt`` (weights_only) or ``.safetensors``."""
    from edge_ssl.torchio import read_checkpoint

    state = read_checkpoint(path)
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: expected a state_dict (names -> tensors) but entry {key!r} holds a "
                f"{type(value).__name__}. Save model.state_dict() itself, not a training checkpoint; "
                "`edge-ssl import` reads training checkpoints."
            )
    return state


def load_encoder(bundle: Any) -> Encoder:
    """Rebuild a bundle's encoder from its manifest spec and load its weights (eval mode).

    ``bundle`` is an ``edge_ssl.bundle.Bundle`` or a bundle directory (opened and verified).
    """
    from edge_ssl.bundle import WEIGHTS_NAME, Bundle

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    name = (
        "model.safetensors"
        if not bundle.has(WEIGHTS_NAME) and bundle.has("model.safetensors")
        else WEIGHTS_NAME
    )
    path = bundle.file(name)
    encoder = build_from_spec(bundle.manifest.encoder)
    state = load_state_dict_file(path)
    problem = weights_mismatch(encoder, state)
    if problem:
        spec = bundle.manifest.encoder
        raise CheckpointError(
            f"{path}: the weights do not fit the manifest's encoder {spec.arch!r} "
            f"{dict(spec.kwargs) or ''} ({problem}). The manifest and model.pt disagree: "
            "re-create the bundle from its source (edge-ssl import / pretrain) instead of editing it."
        )
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def weights_mismatch(model: nn.Module, state: Mapping[str, Any], shown: int = 3) -> str | None:
    """A one-line summary of why ``state`` does not load into ``model`` strictly, or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)
    ]
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{len(names)} {label}: {', '.join(names[:shown])}{more}")
    return "; ".join(parts) or None
