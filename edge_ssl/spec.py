"""Encoder and input specs: the metadata that travels with the weights (no torch import)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_ssl.config import check_choice
from edge_ssl.errors import ConfigError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What the encoder expects: float32 NCHW, pixels scaled to 0..1, then (x - mean) / std."""

    shape: tuple[int, int, int]  # (channels, height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.shape) != 3 or min(self.shape) <= 0:
            raise ConfigError(f"InputSpec.shape must be (C, H, W) > 0, got {self.shape}.")
        channels = self.shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(
                f"InputSpec mean/std need {channels} values (one per channel); "
                f"got mean={self.mean}, std={self.std}."
            )
        if min(self.std) <= 0:
            raise ConfigError(f"InputSpec.std must be > 0, got {self.std}.")
        check_choice("InputSpec", "layout", self.layout, ("NCHW",))
        check_choice("InputSpec", "dtype", self.dtype, ("float32", "float16", "uint8"))

    @property
    def image_size(self) -> int:
        return self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        return cls(
            shape=tuple(data["shape"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            layout=data.get("layout", "NCHW"),
            dtype=data.get("dtype", "float32"),
        )


@dataclass(frozen=True)
class EncoderSpec:
    """How to rebuild an encoder without pickles: ``create_encoder(arch, **kwargs)``."""

    arch: str
    input: InputSpec
    embed_dim: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    factory: str = "edge_ssl.models.create_encoder"

    def __post_init__(self) -> None:
        if self.embed_dim <= 0:
            raise ConfigError(f"EncoderSpec.embed_dim must be > 0, got {self.embed_dim}.")
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    def to_dict(self) -> dict[str, Any]:
        return {
            "factory": self.factory,
            "arch": self.arch,
            "kwargs": dict(self.kwargs),
            "input": self.input.to_dict(),
            "embed_dim": self.embed_dim,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderSpec:
        return cls(
            arch=data["arch"],
            input=InputSpec.from_dict(data["input"]),
            embed_dim=int(data["embed_dim"]),
            kwargs=dict(data.get("kwargs", {})),
            factory=data.get("factory", "edge_ssl.models.create_encoder"),
        )
