"""The compression recipe: its settings, read from YAML with flag overrides on top."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.config import check_choice, config_from_dict, config_to_dict
from edge_ssl.errors import ConfigError

QUANTIZE_CHOICES = ("int8", "fp16", "none")


@dataclass(frozen=True)
class RecipeConfig:
    """A compression recipe (also the YAML format of ``edge-ssl compress --recipe FILE``).

    ``student`` None skips distillation (the teacher itself is pruned/quantized);
    ``prune`` None skips pruning; ``quantize`` "none" skips quantization (YAML may say
    ``precision`` for it). ``distill``, ``prune_options`` and ``quantize_options`` hold
    DistillConfig / PruneConfig / QuantizeConfig settings. ``max_knn_drop`` in kNN top-1
    points vs the teacher.

    ``profile`` (YAML ``for``; ``--for``) names the board: ``target`` becomes ``tensorrt``
    and ``max_latency_ms`` is checked on the latency PREDICTED for that board
    (``devices/predict.py``), never on this host's; before any training the search
    (``compress/search.py``) picks the student and prune ratio that fit, unless ``search``
    is false; a teacher that fits already is not compressed unless ``force``. For
    ``ort-cpu`` the budget is this host's onnxruntime-CPU latency at ``latency_batch``.
    ``on`` (``--on``: ``ssh://user@host`` or ``local``) measures every stage on that device
    through the agent, and the budget is checked on that MEASURED latency.
    """

    student: str | None = None
    student_kwargs: Mapping[str, Any] = field(default_factory=dict)
    distill: Mapping[str, Any] = field(default_factory=dict)
    prune: float | None = None
    prune_options: Mapping[str, Any] = field(default_factory=dict)
    quantize: str = "int8"
    quantize_options: Mapping[str, Any] = field(default_factory=dict)
    target: str | None = None  # default: tensorrt with a profile, else ort-cpu
    profile: str | None = None
    max_latency_ms: float | None = None
    max_knn_drop: float | None = None
    latency_batch: int = 1
    bench_seconds: float = 3.0
    threads: int | None = None
    search: bool = True
    force: bool = False
    on: str | None = None

    def __post_init__(self) -> None:
        for name in ("student_kwargs", "distill", "prune_options", "quantize_options"):
            object.__setattr__(self, name, dict(getattr(self, name) or {}))
        check_choice("RecipeConfig", "quantize", self.quantize, QUANTIZE_CHOICES)
        from edge_ssl.compress.quantize import TARGETS

        if self.target is None:
            object.__setattr__(self, "target", "tensorrt" if self.profile else "ort-cpu")
        check_choice("RecipeConfig", "target", self.target, tuple(TARGETS))
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ConfigError(f"max_latency_ms must be > 0; got {self.max_latency_ms}.")
        check_board(self)
        if self.max_knn_drop is not None and self.max_knn_drop < 0:
            raise ConfigError(f"max_knn_drop must be >= 0 (points); got {self.max_knn_drop}.")
        if self.latency_batch < 1 or not self.bench_seconds > 0:
            raise ConfigError("latency_batch must be >= 1 and bench_seconds > 0.")
        # Build the stage configs now: a bad setting fails before any training.
        self.distill_config()
        self.prune_config()
        self.quantize_config()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RecipeConfig:
        return config_from_dict(cls, recipe_aliases(values))

    @property
    def board_precision(self) -> str:
        """What the board runs the final bundle in: the quantized precision, else FP16."""
        return "fp16" if self.quantize == "none" else self.quantize

    def distill_config(self) -> Any:
        from edge_ssl.compress.distill import DistillConfig

        if self.student is None:
            return None
        return DistillConfig.from_dict({**self.distill, "student": self.student,
                                        "student_kwargs": self.student_kwargs})

    def prune_config(self) -> Any:
        from edge_ssl.compress.prune import PruneConfig

        if self.prune is None:
            return None
        board = {}
        if self.profile is not None:  # channels in multiples of the board's tensor-core tile
            from edge_ssl.compress.prune import board_round_to

            board = {"round_to": board_round_to(self.profile, self.board_precision)}
        return PruneConfig.from_dict({**board, **self.prune_options, "ratio": self.prune})

    def quantize_config(self) -> Any:
        from edge_ssl.compress.quantize import QuantizeConfig

        if self.quantize == "none":
            return None
        return QuantizeConfig.from_dict({**self.quantize_options, "precision": self.quantize,
                                         "target": self.target})


#: Other spellings a recipe file may use: ``for`` (as the --for flag) and ``precision``.
RECIPE_ALIASES = {"for": "profile", "precision": "quantize"}


def recipe_aliases(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``for:`` read as ``profile`` and ``precision:`` as ``quantize``."""
    values = dict(values)
    for alias, key in RECIPE_ALIASES.items():
        if alias not in values:
            continue
        value = values.pop(alias)
        if key in values and values[key] != value:
            raise ConfigError(f"the recipe sets both {alias}: {value!r} and {key}: {values[key]!r} "
                              f"({alias} is another name for {key}); keep one.")
        values[key] = value
    return values


def check_board(recipe: RecipeConfig) -> None:
    """A known profile that runs the precision, and no host time standing in for a board's."""
    if recipe.profile is None:
        if recipe.target == "tensorrt" and recipe.max_latency_ms is not None:
            raise ConfigError(
                "max_latency_ms for target tensorrt needs the board: pass --for PROFILE (e.g. "
                "--for orin-nano-8gb; see `edge-ssl devices`) and the budget is checked on the "
                "latency predicted for it. This host's CPU time is not a TensorRT latency."
            )
        return
    from edge_ssl.devices.profiles import get_profile

    board = get_profile(recipe.profile)
    if recipe.target != "tensorrt":
        raise ConfigError(
            f"--for {recipe.profile} names a Jetson board (TensorRT) but target is {recipe.target!r}, "
            "this host's CPU; drop --target (it becomes tensorrt) or drop --for."
        )
    if recipe.board_precision not in board.precisions:
        raise ConfigError(
            f"{board.name} does not run {recipe.board_precision}; it supports "
            f"{', '.join(board.precisions)}. Pass --precision {board.precisions[-1]}."
        )


def load_recipe(path: str | os.PathLike | None, overrides: Mapping[str, Any] | None = None) -> RecipeConfig:
    """A recipe from YAML (``path``), with ``overrides`` (CLI flags that were given) on top."""
    values: dict[str, Any] = {}
    if path is not None:
        yaml = __import__("yaml")
        file = Path(path)
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read recipe {file}: {exc.strerror or exc}.") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {file} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {file} must be a mapping of settings; got {type(loaded).__name__}.")
        values.update(recipe_aliases(loaded or {}))
    return RecipeConfig.from_dict(merge_overrides(values, overrides or {}))


#: Recipe keys whose value is a mapping: a flag names some of its keys, the rest stay.
MERGED_KEYS = ("student_kwargs", "distill", "prune_options", "quantize_options")


def merge_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a recipe file) with the ``overrides`` that were given (not None) on top.

    Mapping keys merge (``--arch-opt image_size=64`` keeps the recipe's ``width``), except
    ``student_kwargs`` when the override names another student: the recipe's kwargs were
    written for its own student.
    """
    merged = dict(values)
    other_student = overrides.get("student") not in (None, values.get("student"))
    for key, value in overrides.items():
        if value is None:
            continue
        keep = isinstance(merged.get(key), Mapping) and not (key == "student_kwargs" and other_student)
        if key in MERGED_KEYS and keep:
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    if other_student and overrides.get("student_kwargs") is None:
        merged.pop("student_kwargs", None)
    return merged


def recipe_settings(recipe: RecipeConfig) -> dict[str, Any]:
    return config_to_dict(recipe)
