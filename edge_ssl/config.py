"""Settings: frozen dataclass configs built from dicts, and the one set of validators."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from edge_ssl.errors import ConfigError
from edge_ssl.registry import did_you_mean

C = TypeVar("C")

# owner -> label template, e.g. {"PretrainConfig": "--{flag}"}; set by the CLI (see cli_labels).
_LABELS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("labels", default=None)


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


# --------------------------------------------------------------------------- labels


@contextlib.contextmanager
def cli_labels(templates: Mapping[str, str]) -> Iterator[None]:
    """Inside this block, errors about ``owner.name`` say what the user typed instead.

    ``templates`` maps a config class name to a format string with ``{flag}`` (the name
    with dashes) and ``{name}``: ``{"PretrainConfig": "--{flag}"}`` turns
    ``PretrainConfig.epochs`` into ``--epochs``; ``{"SimCLRConfig": "--method-opt {name}"}``.
    """
    token = _LABELS.set({**(_LABELS.get() or {}), **templates})
    try:
        yield
    finally:
        _LABELS.reset(token)


def setting_label(owner: str, name: str) -> str:
    """How an error names setting ``name`` of ``owner`` (``Owner.name`` or a CLI flag)."""
    template = (_LABELS.get() or {}).get(owner)
    if template is None:
        return f"{owner}.{name}" if owner else name
    return template.format(flag=name.replace("_", "-"), name=name)


# --------------------------------------------------------------------------- validators


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def check_number(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float in the interval, or ConfigError naming the setting."""
    label = setting_label(owner, name)
    interval = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{label} must be a number in {interval}; got {value!r} ({type(value).__name__})."
        )
    number = float(value)
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if math.isnan(number) or too_low or too_high:
        raise ConfigError(f"{label} must be in {interval}; got {value!r}.")
    return number


def check_int(
    owner: str, name: str, value: Any, minimum: int | None = 1, maximum: int | None = None
) -> int:
    """``value`` as an int in [minimum, maximum], or ConfigError naming the setting."""
    label = setting_label(owner, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{label} must be an integer; got {value!r} ({type(value).__name__}).")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = _interval(minimum, maximum, False, False)
        raise ConfigError(f"{label} must be an integer in {bounds}; got {value!r}.")
    return int(value)


def check_flag(owner: str, name: str, value: Any) -> bool:
    """``value`` as a bool; a truthy string such as 'false' is refused."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if isinstance(value, bool) or numpy_bool:  # numpy 1 names its bool "bool_", numpy 2 "bool"
        return bool(value)
    raise ConfigError(f"{setting_label(owner, name)} must be true or false; got {value!r}.")


def check_positive(owner: str, **values: Any) -> None:
    """Raise ConfigError naming the first value that is not a number > 0."""
    for name, value in values.items():
        check_number(owner, name, value, low=0, low_open=True)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else ConfigError with a "did you mean" hint."""
    if value not in choices:
        raise ConfigError(
            f"{setting_label(owner, name)} must be one of {', '.join(choices)}; got {value!r}."
            f"{did_you_mean(str(value), tuple(choices))}"
        )
    return value


# --------------------------------------------------------------------------- fields with bounds


def positive(default: float) -> Any:
    """A dataclass field for a float setting in (0, inf): temperatures, epsilons."""
    return dataclasses.field(default=default, metadata={"bounds": (0.0, None, True)})


def non_negative(default: float) -> Any:
    """A dataclass field for a setting in [0, inf): loss weights, counts that may be 0."""
    return dataclasses.field(default=default, metadata={"bounds": (0.0, None, False)})


def unit_interval(default: float) -> Any:
    """A dataclass field for a float setting in [0, 1]: momenta, fractions of training."""
    return dataclasses.field(default=default, metadata={"bounds": (0.0, 1.0, False)})


def check_fields(config: Any) -> None:
    """Check every field of frozen dataclass ``config`` by its annotation; store the result.

    ``bool`` fields must be booleans; ``int`` fields integers >= 1 and ``float`` fields
    real numbers, each in the interval of its field helper (:func:`positive`,
    :func:`non_negative`, :func:`unit_interval`) when it has one. Call it from
    ``__post_init__``; numbers are stored as the annotated type.
    """
    owner = type(config).__name__
    for field in dataclasses.fields(config):
        value = _checked_field(owner, field, getattr(config, field.name))
        object.__setattr__(config, field.name, value)


def _checked_field(owner: str, field: dataclasses.Field[Any], value: Any) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    low, high, low_open = field.metadata.get("bounds", (None, None, False))
    if kind == "bool":
        return check_flag(owner, field.name, value)
    if kind == "int":
        minimum = 1 if low is None else math.floor(low) + int(low_open)
        return check_int(owner, field.name, value, minimum, None if high is None else math.floor(high))
    if kind == "float":
        return check_number(owner, field.name, value, low, high, low_open=low_open)
    raise ConfigError(
        f"{owner}.{field.name} is annotated {kind!r}; check_fields knows int, float and bool. "
        "Check that field in __post_init__ with a validator above instead."
    )
