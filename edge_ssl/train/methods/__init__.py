"""SSL methods (SimCLR, BYOL, DINO, SimSiam, VICReg, Barlow Twins): a registry and a factory."""

from __future__ import annotations

from typing import Any

from torch import nn

from edge_ssl.config import config_from_dict
from edge_ssl.train.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig, BarlowTwinsLoss
from edge_ssl.train.methods.base import METHODS, MethodConfig, SSLMethod
from edge_ssl.train.methods.byol import BYOL, BYOLConfig, BYOLLoss
from edge_ssl.train.methods.dino import DINO, DINOConfig, DINOLoss
from edge_ssl.train.methods.simclr import NTXentLoss, SimCLR, SimCLRConfig
from edge_ssl.train.methods.simsiam import NegativeCosineLoss, SimSiam, SimSiamConfig
from edge_ssl.train.methods.vicreg import VICReg, VICRegConfig, VICRegLoss

__all__ = [
    "METHODS",
    "BYOL",
    "DINO",
    "BarlowTwins",
    "BarlowTwinsConfig",
    "BarlowTwinsLoss",
    "BYOLConfig",
    "BYOLLoss",
    "DINOConfig",
    "DINOLoss",
    "MethodConfig",
    "NTXentLoss",
    "NegativeCosineLoss",
    "SSLMethod",
    "SimCLR",
    "SimCLRConfig",
    "SimSiam",
    "SimSiamConfig",
    "VICReg",
    "VICRegConfig",
    "VICRegLoss",
    "create_method",
    "method_names",
]


def create_method(name: str, encoder: nn.Module, **kwargs: Any) -> SSLMethod:
    """Build SSL method ``name`` around ``encoder``; ``kwargs`` are its config settings.

    Unknown names and settings raise ConfigError with the nearest valid one.

    >>> method = create_method("byol", encoder, base_momentum=0.996)  # doctest: +SKIP
    """
    method_class = METHODS.get(name)
    config = config_from_dict(method_class.config_class, kwargs)
    return method_class(encoder, config)


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return METHODS.names()
