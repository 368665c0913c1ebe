"""The compression recipe: distill -> prune -> quantize, measured per stage, aimed at a target."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.bundle import Bundle, read_results, record_results, results_path, sha256_file
from edge_ssl.config import check_choice, config_from_dict, config_to_dict
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import ConfigError, DataError, EdgeSSLError
from edge_ssl.lineage import require_float_weights

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


#: The three kinds of latency, never mixed (DESIGN.md "Latency on a board you do not have").
MEASURED_HOST, MEASURED_ON_BOARD, PREDICTED_FOR_BOARD = "measured-host", "measured-on-board", "predicted-for-board"


@dataclass
class StageRow:
    """One row of the per-stage table.

    ``latency_ms`` is ALWAYS this host's onnxruntime-CPU p50 (``latency_kind``
    measured-host). ``board_ms`` is the latency on ``board`` (``board_kind``
    predicted-for-board, with ``board_interval_ms``). ``budget_kind`` says which of the two
    the budget is checked on: the board's for a board, the host's only for ort-cpu.
    """

    name: str
    bundle: str
    params: int | None
    macs: int | None
    bytes: int
    knn_top1: float | None
    latency_ms: float | None
    latency_source: str
    precision: str
    latency_kind: str = MEASURED_HOST
    board: str | None = None
    board_ms: float | None = None
    board_interval_ms: list[float] | None = None
    board_kind: str | None = None
    board_precision: str | None = None
    #: measured on the --on device (measured-on-board) with the agent's backend
    device: str | None = None
    device_ms: float | None = None
    device_backend: str | None = None
    launch_bound_share: float | None = None
    budget_kind: str | None = MEASURED_HOST
    #: the ONNX graph the row was measured on, and whether it is the bundle's own model.onnx
    graph_sha256: str | None = None
    graph_shipped: bool = False

    def budget_ms(self) -> float | None:
        """The latency the budget is checked on (None: none that may be, e.g. tensorrt, no board)."""
        if self.budget_kind == MEASURED_HOST:
            return self.latency_ms
        if self.budget_kind == MEASURED_ON_BOARD:
            return self.device_ms
        return self.board_ms if self.budget_kind == self.board_kind else None

    def latencies(self) -> list[dict[str, Any]]:
        """Every latency of the row with its kind and where it holds."""
        found = []
        if self.latency_ms is not None:
            found.append({"kind": self.latency_kind, "ms": self.latency_ms, "interval_ms": None,
                          "on": "this host (onnxruntime CPU)", "precision": self.precision})
        if self.board_ms is not None:
            found.append({"kind": self.board_kind, "ms": self.board_ms, "interval_ms": self.board_interval_ms,
                          "on": self.board, "precision": self.board_precision})
        if self.device_ms is not None:
            found.append({"kind": MEASURED_ON_BOARD, "ms": self.device_ms, "interval_ms": None,
                          "on": f"{self.device} ({self.device_backend})", "precision": self.precision})
        return found

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "latencies": self.latencies()}


@dataclass
class CompressResult:
    rows: list[StageRow]
    chosen: str
    met: bool
    message: str
    bundle: Bundle | None = None
    reused: list[str] = field(default_factory=list)  # stages taken over from an earlier run
    ran: list[str] = field(default_factory=list)  # stages run (or redone) by this run
    search: Any | None = None  # compress.search.SearchResult when a board budget was searched

    def to_dict(self) -> dict[str, Any]:
        search = None if self.search is None else self.search.to_dict()
        return {"stages": [r.to_dict() for r in self.rows], "chosen": self.chosen, "met": self.met,
                "message": self.message, "bundle": None if self.bundle is None else str(self.bundle.path),
                "manifest_sha256": None if self.bundle is None else self.bundle.manifest_sha256,
                "reused": list(self.reused), "ran": list(self.ran),
                "candidates": None if search is None else search["candidates"], "search": search}


def stages_dir(out: str | os.PathLike) -> Path:
    """Where the recipe keeps every stage's bundle: ``NAME.edge`` -> ``NAME.edge.stages/``."""
    out = Path(out)
    return out.with_name(out.name + ".stages")


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a run writes its stages until it finishes: ``NAME.edge.stages.partial/``.

    Only a finished run swaps it in for ``stages_dir(out)`` (and its chosen stage for
    ``out``), so a failed or interrupted run leaves the previous result untouched.
    """
    stages = stages_dir(out)
    return stages.with_name(stages.name + ".partial")


#: Folder name of each stage's bundle inside the stages folder.
STAGE_DIRS = {"distill": "1-distill.edge", "prune": "2-prune.edge", "quantize": "3-quantize.edge"}


class CompressInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``compress``: which stage was running and which finished bundles were kept."""

    def __init__(self, stage: str, kept: list[Path], folder: Path) -> None:
        super().__init__(stage)
        self.stage, self.kept, self.folder = stage, kept, folder


class StageMeter:
    """Measures a bundle the same way for every stage: params, MACs, ONNX bytes, kNN, latency."""

    def __init__(self, recipe: RecipeConfig, knn: Any | None, workdir: Path, device: Any = None) -> None:
        self.recipe, self.knn, self.workdir, self.device = recipe, knn, workdir, device

    def measure(self, name: str, bundle: Bundle, *, record: bool = True) -> StageRow:
        """Measure ``bundle``; ``record`` stores the row beside it (never for an input bundle:
        the teacher's folder may be read-only or shared)."""
        from edge_ssl.compress.measure import model_metrics
        from edge_ssl.compress.quantize import onnx_embed

        from edge_ssl.models import load_encoder

        spec = bundle.manifest.input
        if bundle.has("model.pt"):
            encoder = load_encoder(bundle)
            sizes = model_metrics(encoder)
        else:
            sizes = {k: bundle.manifest.metrics.get(k) for k in ("params", "macs")}
        graph = _shipped_graph(bundle) or self._export(encoder, name)
        top1 = None
        if self.knn is not None:
            top1 = self.knn.top1(lambda images: onnx_embed(graph, images, spec))
        latency = self._latency(graph, spec)
        row = StageRow(name, str(bundle.path), sizes["params"], sizes["macs"], graph.stat().st_size, top1,
                       latency, "measured-host: onnxruntime CPU on this machine", bundle.manifest.precision,
                       budget_kind=MEASURED_HOST if self.recipe.target == "ort-cpu" else None,
                       graph_sha256=sha256_file(graph), graph_shipped=bundle.has("model.onnx"))
        if self.recipe.profile is not None:
            prediction = self._board(row, graph)
            if record:
                _record_prediction(bundle, prediction)
        if self.device is not None:
            self._on_device(row, name, bundle, record)
        if record:
            record_results(bundle, "compress_stage", row.to_dict())
        return row

    def _on_device(self, row: StageRow, name: str, bundle: Bundle, record: bool) -> None:
        """Fill ``row``'s MEASURED latency on the --on device; the budget is checked on it."""
        measured = self.device.measure(name, bundle, record=record)
        row.device, row.device_ms, row.device_backend = measured.target, measured.ms, measured.backend
        row.budget_kind = MEASURED_ON_BOARD

    def _board(self, row: StageRow, graph: Path) -> Any:
        """Fill ``row``'s board latency: PREDICTED for the recipe's profile (float stages run
        in FP16 there, a quantized one in its own precision)."""
        from edge_ssl.devices.predict import predict_onnx

        precision = row.precision if row.precision in ("int8", "fp16") else "fp16"
        prediction = predict_onnx(graph, self.recipe.profile, precision=precision,
                                  batch=self.recipe.latency_batch)
        row.board, row.board_kind, row.budget_kind = prediction.device, PREDICTED_FOR_BOARD, PREDICTED_FOR_BOARD
        row.board_ms, row.board_interval_ms = prediction.predicted_ms, list(prediction.interval_ms)
        row.board_precision, row.launch_bound_share = precision, prediction.launch_bound_share
        return prediction

    def _export(self, encoder: Any, name: str) -> Path:
        from edge_ssl.runtime.export import export_encoder_onnx

        return export_encoder_onnx(encoder, self.workdir / f"{name}.onnx", dynamic_batch=True)

    def _latency(self, graph: Path, spec: Any) -> float:
        from edge_ssl.compress.measure import ort_latency_ms

        return ort_latency_ms(graph, spec, self.recipe.latency_batch, seconds=self.recipe.bench_seconds,
                              threads=self.recipe.threads)


def _shipped_graph(bundle: Bundle) -> Path | None:
    """The graph ``bundle`` ships when it is the one to measure: a quantized bundle's, or a
    float bundle's own default export (a compress stage's); else None (export one)."""
    from edge_ssl.runtime.export import EXPORT_DEFAULTS, shipped_graph

    if not bundle.has("model.pt"):
        return bundle.file("model.onnx")
    return shipped_graph(bundle, dict(EXPORT_DEFAULTS))


def _record_prediction(bundle: Bundle, prediction: Any) -> None:
    """The stage's board prediction beside it (under 'predict', where `predict` and the report look)."""
    from edge_ssl.devices.predict import record_prediction

    from edge_ssl.errors import BundleError

    try:
        record_prediction(bundle.path, prediction)
    except BundleError:
        pass  # the row in the compress record still has it


def check_compress_inputs(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset, out: Path,
                          knn: Any | None, overwrite: bool, resume: bool = False) -> None:
    """Every setting of every stage, checked before the first stage runs (seconds, no training)."""
    check_compress_out(out, overwrite=overwrite, resume=resume)
    source = require_float_weights(teacher, "compress")
    check_knn_settings(source, recipe, knn)
    check_student(source, recipe, data)
    check_prune_settings(recipe, data)
    check_quantize_settings(recipe, data)


def check_compress_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    """OUT can be written, and no earlier run's stages are replaced without --resume/--overwrite."""
    from edge_ssl.outputs import check_bundle_out

    check_bundle_out(out, overwrite=overwrite)
    stages, partial = stages_dir(out), partial_dir(out)
    if partial.exists() and not (resume or overwrite):
        kept = ", ".join(p.name for p in finished_stages(partial)) or "no finished stage"
        raise ConfigError(
            f"{partial} holds an interrupted run ({kept}); pass --resume to reuse its finished "
            "stages or --overwrite to start over."
        )
    if stages.exists() and not (resume or overwrite):
        raise ConfigError(
            f"{stages} already exists (stages of an earlier run); pass --resume to reuse the "
            "stages that match, or --overwrite to replace them."
        )


def check_knn_settings(teacher: Bundle, recipe: RecipeConfig, knn: Any | None) -> None:
    """kNN targets need labeled eval images, and those must be the teacher's image size."""
    quantize = recipe.quantize_config()
    wanted = [name for name, value in (
        ("max_knn_drop", recipe.max_knn_drop),
        ("quantize_options.max_knn_drop", None if quantize is None else quantize.max_knn_drop),
    ) if value is not None]
    if wanted and knn is None:
        raise ConfigError(
            f"{' and '.join(wanted)} needs labeled images to measure kNN top-1: pass --eval-data "
            "(the bank, e.g. cifar10_train_3.npz) and --eval-test (the queries, e.g. "
            "cifar10_test.npz), or remove the target from the recipe."
        )
    if knn is None:
        return
    size = tuple(teacher.manifest.input.shape[1:])
    for flag, images in (("--eval-data", knn.bank_images), ("--eval-test", knn.test_images)):
        if tuple(images.shape[1:3]) != size:
            raise DataError(
                f"{flag} images are {images.shape[1]}x{images.shape[2]} but the teacher reads "
                f"{size[0]}x{size[1]}; load them at the teacher's size (the compress command does)."
            )


def check_student(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset) -> None:
    """The student pairs with the teacher and the data, and is smaller than the teacher."""
    from edge_ssl.compress.distill import check_data, check_pairing, config_names
    from edge_ssl.compress.measure import model_metrics

    from edge_ssl.models import create_encoder, load_encoder

    distill = recipe.distill_config()
    if distill is None:
        check_data(data, teacher.manifest.encoder, 2)
        return
    config_names(distill)
    student = create_encoder(distill.student, **distill.student_kwargs)
    check_pairing(teacher.manifest.encoder, student.spec)
    if len(data) < distill.batch_size:
        raise DataError(
            f"{len(data)} unlabeled images are fewer than one distillation batch of "
            f"{distill.batch_size}; pass --set distill.batch_size={_floor_pow2(len(data))} (or "
            "set it in the recipe), or more images with --data / a larger --limit."
        )
    check_data(data, student.spec, distill.batch_size)
    check_smaller(model_metrics(load_encoder(teacher)), model_metrics(student), distill)


def check_smaller(teacher: Mapping[str, int], student: Mapping[str, int], distill: Any) -> None:
    """Refuse a 'student' with more params or MACs than its teacher: never what compressing wants."""
    if student["params"] <= teacher["params"] and student["macs"] <= teacher["macs"]:
        return
    kwargs = ", ".join(f"{k}={v}" for k, v in distill.student_kwargs.items())
    raise ConfigError(
        f"the student {distill.student}({kwargs}) is larger than the teacher: "
        f"{student['params'] / 1e6:.2f}M params vs {teacher['params'] / 1e6:.2f}M, "
        f"{student['macs'] / 1e6:.1f}M MACs vs {teacher['macs'] / 1e6:.1f}M. Choose a smaller "
        "width (e.g. --arch-opt width=0.25; --arch-opt keys merge over the recipe's "
        "student_kwargs) or a smaller --student (see `edge-ssl encoders`)."
    )


def check_prune_settings(recipe: RecipeConfig, data: ImageDataset) -> None:
    """Pruning's data needs and its recovery distillation settings."""
    from edge_ssl.compress.distill import DistillConfig

    config = recipe.prune_config()
    if config is None or not (config.recovery_epochs or config.importance == "taylor"):
        return
    if len(data) < 2:
        raise DataError(f"pruning with {config.importance!r} importance / recovery needs at least "
                        f"2 unlabeled images; got {len(data)}. Pass more with --data.")
    if config.recovery_epochs:
        settings = {"objectives": ("feature",), "epochs": config.recovery_epochs,
                    "batch_size": min(config.batch_size, len(data)), "warmup_epochs": 0.0}
        try:
            DistillConfig.from_dict(settings | dict(config.recovery))
        except ConfigError as exc:
            raise ConfigError(f"prune_options.recovery: {exc}") from None


def check_quantize_settings(recipe: RecipeConfig, data: ImageDataset) -> None:
    """The quantize stage's calibration sizes (its own check), and no more calibration
    images asked for than are loaded: compress names the shortfall instead of using fewer."""
    from edge_ssl.compress.quantize import check_calibration_settings

    config = recipe.quantize_config()
    if config is None:
        return
    wanted, have = config.calibration_images, len(data)
    if config.precision == "int8" and wanted > have:
        raise ConfigError(
            f"quantize_options.calibration_images is {wanted} but only {have} unlabeled images are "
            f"loaded; pass --set quantize_options.calibration_images={have} (or fewer), or more "
            "images with --data / a larger --limit."
        )
    check_calibration_settings(config, have)


def _floor_pow2(n: int) -> int:
    return 1 << max(1, n.bit_length() - 1)


def compress(
    teacher: str | os.PathLike | Bundle,
    recipe: RecipeConfig,
    data: ImageDataset,
    out: str | os.PathLike,
    *,
    knn: Any | None = None,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[Any], None] | None = None,
    device_settings: Any = None,
) -> CompressResult:
    """Run the recipe's stages and keep the best one (meeting the targets, else the closest).

    Stages are written to ``partial_dir(out)``; only when all are done does that folder
    become ``stages_dir(out)`` and the chosen stage ``out``, so a failure or Ctrl-C
    (``CompressInterrupted``) leaves an earlier result as it was. ``resume`` reuses finished
    stages (of the interrupted or the last run) whose parent, settings and data match.
    """
    say = log or (lambda _m: None)
    out = Path(out)
    teacher_bundle = teacher if isinstance(teacher, Bundle) else Bundle.open(teacher, verify=True)
    check_compress_inputs(teacher_bundle, recipe, data, out, knn, overwrite, resume)
    recipe, found = aim_at_board(teacher_bundle, recipe, data, say)
    if found is not None and found.teacher_fits and not recipe.force:
        return CompressResult([], "teacher", True, teacher_fits_text(found), None, search=found)
    run = StageRun(work=_fresh_partial(out, resume), previous=stages_dir(out), resume=resume,
                   fingerprints=_fingerprints(data, knn), say=say, name=out.name.removesuffix(".edge"),
                   device_settings=device_settings)
    rows = _run_stages(teacher_bundle, recipe, data, knn, run, progress)
    chosen, met, message = choose_stage(rows, recipe)
    bundle = _publish(rows, chosen, out, run.work)
    result = CompressResult(rows, chosen, met, message, bundle, reused=run.reused, ran=run.ran, search=found)
    record_results(bundle, "compress", result.to_dict())
    from edge_ssl.compress.adapt_ready import make_adapt_ready  # adapt settings + replay images

    make_adapt_ready(result, knn, say)
    return result


def aim_at_board(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset,
                 say: Callable[[str], None]) -> tuple[RecipeConfig, Any]:
    """With a board and a budget: search the candidates (no training) and return the recipe
    with the chosen student and prune ratio, and the search. Refuses a budget under the
    launch floor or one no candidate meets, before any training."""
    from dataclasses import replace

    from edge_ssl.compress.prune import board_round_to
    from edge_ssl.compress.search import (
        LatencyBudgetError,
        candidate_specs,
        candidates_table,
        search,
    )

    if recipe.profile is None or recipe.max_latency_ms is None or not recipe.search:
        return recipe, None
    source = require_float_weights(teacher, "compress")
    same_arch = recipe.distill_config() is not None and recipe.distill_config().init == "teacher"
    specs = candidate_specs(source.manifest.encoder, recipe.student, recipe.student_kwargs,
                            same_arch_only=same_arch)
    ratios = sorted({0.3, 0.5} | ({recipe.prune} if recipe.prune else set()))
    say(f"search: {len(specs)} students x prune ratios {', '.join(f'{r:.0%}' for r in ratios)}, "
        f"predicted on {recipe.profile} (no training)")
    found = search(source.manifest.encoder, specs, recipe.profile, recipe.board_precision,
                   recipe.max_latency_ms, round_to=board_round_to(recipe.profile, recipe.board_precision),
                   prune_ratios=ratios, stop_if_teacher_fits=not recipe.force, log=say)
    for line in [*candidates_table(found), *found.notes]:
        say(line)
    if found.teacher_fits and not recipe.force:
        return recipe, found
    if found.chosen is None:
        raise LatencyBudgetError(f"{found.notes[-1]}. Raise --max-latency-ms, or pick another --precision "
                                 "or board; nothing was trained.")
    spec = found.chosen.spec
    chosen = replace(recipe, student=spec.student if recipe.student else None,
                     student_kwargs=dict(spec.kwargs) if recipe.student else recipe.student_kwargs,
                     prune=spec.prune)
    check_student(source, chosen, data)
    return chosen, found


def teacher_fits_text(found: Any) -> str:
    return (f"{found.notes[0]}. Not compressed (pass --force to compress anyway); to run it on "
            f"the board, quantize it alone: `edge-ssl quantize TEACHER --precision {found.precision} "
            "--target tensorrt --out Q.edge`.")


def _run_stages(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset, knn: Any | None,
                run: StageRun, progress: Callable[[Any], None] | None) -> list[StageRow]:
    rows: list[StageRow] = []
    try:
        with tempfile.TemporaryDirectory(prefix="edge-ssl-compress-") as tmp, \
                _device_meter(recipe, run) as device:
            meter = StageMeter(recipe, knn, Path(tmp), device)
            rows.append(meter.measure("teacher", teacher, record=False))
            run.say(_row_text(rows[-1]))
            current = teacher
            for name, config, runner in _stage_plan(recipe, data, knn, progress, run.say):
                run.current = name
                current = run.stage(name, config, current, runner)
                rows.append(meter.measure(name, current))
                run.say(_row_text(rows[-1]))
    except CompressInterrupted:
        raise
    except KeyboardInterrupt as exc:
        raise CompressInterrupted(run.current, finished_stages(run.work), run.work) from exc
    return rows


@contextlib.contextmanager
def _device_meter(recipe: RecipeConfig, run: StageRun) -> Iterator[Any]:
    """The --on device, connected (and asked who it is) before any stage runs; else None."""
    if recipe.on is None:
        yield None
        return
    from edge_ssl.compress.on_device import DeviceMeter

    run.say(f"latency: measured on {recipe.on} through the agent (measured-on-board)")
    with DeviceMeter(recipe.on, run.device_settings, batch=recipe.latency_batch,
                     seconds=recipe.bench_seconds, run=run.name) as meter:
        yield meter


StageRunner = Callable[[Bundle, Path, bool], Bundle]


def _stage_plan(recipe: RecipeConfig, data: ImageDataset, knn: Any | None,
                progress: Callable[[Any], None] | None,
                say: Callable[[str], None]) -> list[tuple[str, Any, StageRunner]]:
    """(name, config, run(parent, out, resume_checkpoint) -> bundle) for each stage of the recipe."""
    from edge_ssl.compress.distill import distill
    from edge_ssl.compress.prune import prune
    from edge_ssl.compress.quantize import quantize

    plan: list[tuple[str, Any, StageRunner]] = []
    if (dconf := recipe.distill_config()) is not None:
        plan.append(("distill", dconf, lambda parent, path, resume: distill(
            parent, dconf, data, path, resume=resume, progress=progress, with_graph=True).bundle))
    if (pconf := recipe.prune_config()) is not None:
        plan.append(("prune", pconf, lambda parent, path, _resume: prune(
            parent, pconf, data, path, with_graph=True).bundle))
    if (qconf := recipe.quantize_config()) is not None:
        plan.append(("quantize", qconf, lambda parent, path, _resume: quantize(
            parent, qconf, data.images, path, knn=knn,
            log=lambda m: say(compress_terms("quantize", m))).bundle))
    return plan


#: Where a stage's reuse key is recorded (the stage bundle's results file, beside it).
RESUME_KEY = "compress_resume"


@dataclass
class StageRun:
    """Runs (or, with ``resume``, reuses) the stages of one compress run inside ``work``."""

    work: Path
    previous: Path
    resume: bool
    fingerprints: Mapping[str, str | None]
    say: Callable[[str], None]
    name: str = "compress"
    device_settings: Any = None  # SSH settings for --on
    reused: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    current: str = "teacher"

    def stage(self, name: str, config: Any, parent: Bundle, runner: StageRunner) -> Bundle:
        path = self.work / STAGE_DIRS[name]
        settings = config_to_dict(config)
        key = stage_key(name, parent.manifest_sha256, settings, self._data(name, config))
        if self.resume and (found := self._reusable(path, key, parent, settings)) is not None:
            self.reused.append(name)
            self.say(f"{name}: reused {found.path.name} (same parent, settings and data)")
            return found
        self.say(_stage_title(name, config))
        _discard(path, keep_checkpoint=self.resume)
        bundle = _in_compress_terms(name, lambda: self._run(runner, parent, path))
        record_results(bundle, RESUME_KEY, {"key": key})
        self.ran.append(name)
        return bundle

    def _run(self, runner: StageRunner, parent: Bundle, path: Path) -> Bundle:
        """A distillation stopped mid-way continues from its epoch checkpoint when it can."""
        from edge_ssl.compress.distill import checkpoint_dir

        from edge_ssl.errors import CheckpointError

        ckpt = checkpoint_dir(path)
        if self.resume and (ckpt / "last.pt").is_file():
            try:
                return runner(parent, path, True)
            except (CheckpointError, ConfigError) as exc:
                self.say(f"cannot continue the checkpoint in {ckpt} ({exc}); starting this stage over")
                shutil.rmtree(ckpt, ignore_errors=True)
        return runner(parent, path, False)

    def _data(self, name: str, config: Any) -> dict[str, str | None]:
        knn = self.fingerprints["knn"] if getattr(config, "max_knn_drop", None) is not None else None
        return {"images": self.fingerprints["images"], "knn": knn}

    def _reusable(self, path: Path, key: str, parent: Bundle, settings: Mapping[str, Any]) -> Bundle | None:
        """The stage's bundle from this run's folder or the last finished run's, if it matches."""
        for candidate in (path, self.previous / path.name):
            bundle = _matching_stage(candidate, key, parent, settings)
            if bundle is None:
                continue
            if candidate != path:
                _discard(path, keep_checkpoint=False)
                shutil.copytree(candidate, path)
                shutil.copyfile(results_path(candidate), results_path(path))
                bundle = Bundle.open(path, verify=True)
            return bundle
        return None


def _matching_stage(path: Path, key: str, parent: Bundle, settings: Mapping[str, Any]) -> Bundle | None:
    """The bundle at ``path`` if its lineage names ``parent`` and ``settings`` and its key matches."""
    if not (path / "manifest.json").is_file():
        return None
    try:
        bundle = Bundle.open(path, verify=True)
        recorded = read_results(bundle).get(RESUME_KEY, {}).get("key")
    except EdgeSSLError:
        return None
    last = bundle.manifest.lineage[-1] if bundle.manifest.lineage else None
    if last is None or last.parent != parent.manifest_sha256 or recorded != key:
        return None
    if any(last.settings.get(k) != v for k, v in settings.items()):
        return None
    return bundle


def stage_key(name: str, parent_sha256: str, settings: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """What a stage's output depends on: its parent bundle, its settings and its images."""
    text = json.dumps({"stage": name, "parent": parent_sha256, "settings": settings, "data": data,
                       "ships": "model.onnx"},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _fingerprints(data: ImageDataset, knn: Any | None) -> dict[str, str | None]:
    def digest(*arrays: Any) -> str:
        h = hashlib.sha256()
        for array in arrays:
            array = np.ascontiguousarray(array)
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(memoryview(array).cast("B"))
        return h.hexdigest()

    knn_digest = None if knn is None else digest(knn.bank_images, knn.bank_labels, knn.test_images,
                                                 knn.test_labels)
    return {"images": digest(data.images), "knn": knn_digest}


def finished_stages(folder: Path) -> list[Path]:
    """The stage bundles a run has finished in ``folder`` (in stage order)."""
    return [folder / name for name in STAGE_DIRS.values() if (folder / name / "manifest.json").is_file()]


def _fresh_partial(out: Path, resume: bool) -> Path:
    work = partial_dir(out)
    if work.exists() and not resume:
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {work} ({exc.strerror or exc}); pick a writable --out.") from None
    return work


def _discard(path: Path, *, keep_checkpoint: bool) -> None:
    from edge_ssl.compress.distill import checkpoint_dir

    shutil.rmtree(path, ignore_errors=True)
    results_path(path).unlink(missing_ok=True)
    if not keep_checkpoint:
        shutil.rmtree(checkpoint_dir(path), ignore_errors=True)


def _stage_title(name: str, config: Any) -> str:
    if name == "distill":
        return f"distill -> {config.student}"
    if name == "prune":
        return f"prune {config.ratio:.0%}"
    return f"quantize {config.precision} for {config.target}"


#: Flags of the single-stage commands that stage messages name, in compress's terms.
COMPRESS_TERMS = {
    "distill": {"--batch-size": "distill.batch_size (recipe key; --set)",
                "--lr": "distill.lr (recipe key; --set)"},
    "prune": {"--ratio": "--prune", "--batch-size": "prune_options.batch_size (recipe key; --set)",
              "--exclude": "prune_options.exclude (recipe key)",
              "--lr": "prune_options.recovery.lr (recipe key)"},
    "quantize": {"--max-fallback": "quantize_options.max_fallback (recipe key; --set)",
                 "--min-cosine": "quantize_options.min_cosine (recipe key; --set)",
                 "--calibration-images": "quantize_options.calibration_images (recipe key; --set)"},
}


def compress_terms(stage: str, message: str) -> str:
    """A stage's message with the flags of its own command replaced by what compress takes."""
    for flag, key in COMPRESS_TERMS.get(stage, {}).items():
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", key, message)
    return message


def _in_compress_terms(stage: str, call: Callable[[], Bundle]) -> Bundle:
    try:
        return call()
    except EdgeSSLError as exc:
        text = compress_terms(stage, str(exc))
        if text == str(exc):
            raise
        try:
            translated = type(exc)(text)
        except Exception:  # an error type with another constructor: keep it as it is
            raise exc from None
        raise translated from exc


def _publish(rows: list[StageRow], chosen: str, out: Path, work: Path) -> Bundle:
    """Swap the finished run in: ``work`` becomes the stages folder and the chosen stage ``out``.

    Both are renames in ``out``'s folder; the earlier ones are removed only afterwards.
    """
    from edge_ssl.outputs import move_into_place

    stages = stages_dir(out)
    source = Path(next(r.bundle for r in rows if r.name == chosen))
    staged = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(source, staged)
    move_into_place({work: stages, staged: out})
    for row in rows:
        if Path(row.bundle).parent == work:
            row.bundle = str(stages / Path(row.bundle).name)
    return Bundle.open(out, verify=True)


def choose_stage(rows: list[StageRow], recipe: RecipeConfig) -> tuple[str, bool, str]:
    """The last stage that meets both targets; else the closest (fewest violated ms/points)."""
    teacher = rows[0]
    candidates = rows[1:] or rows

    def misses(row: StageRow) -> tuple[float, float]:
        latency = 0.0
        if recipe.max_latency_ms is not None and row.budget_ms() is not None:
            latency = max(0.0, row.budget_ms() - recipe.max_latency_ms)
        drop = 0.0
        if recipe.max_knn_drop is not None and row.knn_top1 is not None and teacher.knn_top1 is not None:
            drop = max(0.0, 100 * (teacher.knn_top1 - row.knn_top1) - recipe.max_knn_drop)
        return latency, drop

    meeting = [r for r in candidates if misses(r) == (0.0, 0.0)]
    if meeting:
        return meeting[-1].name, True, f"all targets met by stage {meeting[-1].name!r}"
    best = min(candidates, key=lambda r: (misses(r)[1] > 0, sum(misses(r))))
    late, drop = misses(best)
    parts, hints = [], []
    if late:
        kind = best.budget_kind if best.board is None else f"{best.budget_kind} {best.board}"
        parts.append(f"latency {best.budget_ms():.2f} ms ({kind}) is {late:.2f} ms over --max-latency-ms "
                     f"{recipe.max_latency_ms}")
        hints.append("for latency: a smaller student (--student, --arch-opt width=...) or a higher --prune ratio")
    if drop:
        parts.append(f"kNN drop is {drop:.2f} pts over --max-knn-drop {recipe.max_knn_drop}")
        hints.append("for accuracy: a larger student (--arch-opt width=...), a lower --prune ratio, "
                     "or more distillation (--epochs, more --data images)")
    return best.name, False, (f"target not met; kept the closest stage {best.name!r}: " + "; ".join(parts)
                              + ". Try " + "; ".join(hints) + ".")


def _row_text(row: StageRow) -> str:
    """One stage as one line of at most 80 columns (the latency source is in the table's footer)."""
    knn = "-" if row.knn_top1 is None else f"{100 * row.knn_top1:.2f}%"
    latency = "-" if row.latency_ms is None else f"{row.latency_ms:.2f} ms"
    params = "-" if row.params is None else f"{row.params / 1e6:.2f}M"
    macs = "-" if row.macs is None else f"{row.macs / 1e6:.1f}M"
    return (f"{row.name:8s} {params:>7s} params {macs:>8s} MACs {row.bytes / 1e6:6.2f} MB  "
            f"kNN {knn:>6s}  {latency:>9s}")


def recipe_settings(recipe: RecipeConfig) -> dict[str, Any]:
    return config_to_dict(recipe)
