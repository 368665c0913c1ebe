"""Helpers for frozen dataclass configs: build from dicts, reject unknown keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from edge_ssl.errors import ConfigError
from edge_ssl.registry import did_you_mean

C = TypeVar("C")


def config_from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build dataclass ``cls`` from ``values``; unknown keys raise ConfigError with a hint."""
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in values if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown {cls.__name__} setting {key!r}.{did_you_mean(key, fields)} "
            f"Valid settings: {', '.join(fields)}."
        )
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a dataclass config (tuples become lists)."""
    return _jsonable(dataclasses.asdict(config))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def check_positive(owner: str, **values: float) -> None:
    """Raise ConfigError naming the first value that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}.{name} must be > 0, got {value!r}.")


def check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ConfigError when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"{owner}.{name} must be one of {', '.join(choices)}; got {value!r}."
            f"{did_you_mean(value, choices)}"
        )
