"""Errors, registry, configs and lazy imports."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge_ssl.config import check_choice, config_from_dict, config_to_dict
from edge_ssl.errors import (
    BundleIntegrityError,
    ConfigError,
    DataError,
    EdgeSSLError,
    MissingDependencyError,
)
from edge_ssl.lazy import require
from edge_ssl.registry import Registry, did_you_mean
from edge_ssl.spec import InputSpec


def test_errors_inherit_root_and_builtin():
    assert issubclass(ConfigError, EdgeSSLError) and issubclass(ConfigError, ValueError)
    assert issubclass(MissingDependencyError, ImportError)
    assert issubclass(BundleIntegrityError, EdgeSSLError)
    assert issubclass(DataError, ValueError)


def test_registry_registers_and_suggests_nearest():
    reg: Registry[int] = Registry("encoder")
    reg.register("resnet18")(1)
    reg.register("resnet50")(2)
    assert reg.get("resnet50") == 2
    assert reg.names() == ["resnet18", "resnet50"]
    with pytest.raises(ConfigError, match=r"Did you mean 'resnet18'\?.*Valid names: resnet18, resnet50"):
        reg.get("resnt18")


def test_registry_rejects_duplicates():
    reg: Registry[int] = Registry("method")
    reg.register("byol")(1)
    with pytest.raises(ConfigError, match="registered twice"):
        reg.register("byol")(2)


def test_did_you_mean_is_empty_when_nothing_is_close():
    assert did_you_mean("zzzz", ["byol", "dino"]) == ""


@dataclass(frozen=True)
class _Cfg:
    epochs: int = 1
    lr: float = 0.1
    crop: tuple[float, float] = (0.2, 1.0)


def test_config_from_dict_rejects_unknown_key_with_hint():
    assert config_from_dict(_Cfg, {"epochs": 3}).epochs == 3
    with pytest.raises(ConfigError, match=r"unknown _Cfg setting 'epoch'\. Did you mean 'epochs'\?"):
        config_from_dict(_Cfg, {"epoch": 3})


def test_config_to_dict_is_json_friendly():
    assert config_to_dict(_Cfg()) == {"epochs": 1, "lr": 0.1, "crop": [0.2, 1.0]}


def test_check_choice_message_names_allowed_values():
    with pytest.raises(ConfigError, match="must be one of lars, adamw, sgd; got 'adam'"):
        check_choice("PretrainConfig", "optimizer", "adam", ("lars", "adamw", "sgd"))


def test_require_names_install_hint():
    with pytest.raises(MissingDependencyError, match="JetPack"):
        require("tensorrt", "building engines")
    assert require("json").dumps([1]) == "[1]"


def test_input_spec_validates():
    with pytest.raises(ConfigError, match="one per channel"):
        InputSpec(shape=(3, 32, 32), mean=(0.5,), std=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="std must be > 0"):
        InputSpec(shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.5, 0.0, 0.5))
    spec = InputSpec(shape=[3, 32, 32], mean=[0.5] * 3, std=[0.25] * 3)
    assert InputSpec.from_dict(spec.to_dict()) == spec
