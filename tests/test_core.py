"""Errors, registry, configs and lazy imports."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge_ssl.config import (
    check_choice,
    check_flag,
    check_int,
    check_number,
    cli_labels,
    config_from_dict,
    config_to_dict,
)
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


def test_callers_catching_builtins_or_the_root_catch_our_errors():
    """Library users write `except ValueError` / `except ImportError` / `except EdgeSSLError`."""
    with pytest.raises(ValueError):
        check_choice("X", "mode", "fast", ("slow",))
    with pytest.raises(ImportError):
        require("tensorrt", "building engines")
    for error in (ConfigError("x"), DataError("x"), BundleIntegrityError("x")):
        with pytest.raises(EdgeSSLError):
            raise error


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


@pytest.mark.parametrize(
    ("check", "value", "needle"),
    [
        (lambda v: check_number("Cfg", "lr", v, 0, low_open=True), 0, r"Cfg.lr must be in \(0, inf\); got 0"),
        (lambda v: check_number("Cfg", "lr", v, 0, low_open=True), "0.1", r"must be a number .* \(str\)"),
        (lambda v: check_number("Cfg", "ratio", v, 0, 1), float("nan"), r"must be in \[0, 1\]"),
        (lambda v: check_int("Cfg", "epochs", v), 1.5, r"Cfg.epochs must be an integer; got 1.5"),
        (lambda v: check_int("Cfg", "epochs", v), True, r"must be an integer; got True"),
        (lambda v: check_int("Cfg", "seed", v, 0, 9), 10, r"in \[0, 9\]; got 10"),
        (lambda v: check_flag("Cfg", "probe", v), "false", r"Cfg.probe must be true or false; got 'false'"),
    ],
)
def test_validators_name_the_setting_and_what_is_allowed(check, value, needle):
    with pytest.raises(ConfigError, match=needle):
        check(value)


def test_validators_return_normalized_values():
    assert check_number("Cfg", "lr", 1) == 1.0 and isinstance(check_number("Cfg", "lr", 1), float)
    assert check_int("Cfg", "n", 3) == 3 and check_flag("Cfg", "f", False) is False


def test_cli_labels_make_errors_name_flags_only_inside_the_block():
    with cli_labels({"PretrainConfig": "--{flag}", "SimCLRConfig": "--method-opt {name}"}):
        with pytest.raises(ConfigError, match=r"^--warmup-epochs must be"):
            check_number("PretrainConfig", "warmup_epochs", -1, 0)
        with pytest.raises(ConfigError, match=r"^--method-opt temperature must be"):
            check_number("SimCLRConfig", "temperature", 0, 0, low_open=True)
    with pytest.raises(ConfigError, match=r"^PretrainConfig.warmup_epochs must be"):
        check_number("PretrainConfig", "warmup_epochs", -1, 0)
