"""The compression recipe: distill -> prune -> quantize, measured per stage, aimed at a target."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.bundle import Bundle, record_results, require_float_weights
from edge_ssl.config import check_choice, config_from_dict, config_to_dict
from edge_ssl.data import ImageDataset
from edge_ssl.errors import BundleError, ConfigError

QUANTIZE_CHOICES = ("int8", "fp16", "none")


@dataclass(frozen=True)
class RecipeConfig:
    """A compression recipe (also the YAML format of ``edge-ssl compress --recipe FILE``).

    ``student`` None skips distillation (the teacher itself is pruned/quantized);
    ``prune`` None skips pruning; ``quantize`` "none" skips quantization. ``distill``,
    ``prune_options`` and ``quantize_options`` hold DistillConfig / PruneConfig /
    QuantizeConfig settings. ``max_latency_ms`` is checked on ``target``'s latency at batch
    ``latency_batch`` (onnxruntime CPU, measured; for ``tensorrt`` the ORT-CPU number is
    a stand-in and labelled so); ``max_knn_drop`` in kNN top-1 points vs the teacher.
    """

    student: str | None = None
    student_kwargs: Mapping[str, Any] = field(default_factory=dict)
    distill: Mapping[str, Any] = field(default_factory=dict)
    prune: float | None = None
    prune_options: Mapping[str, Any] = field(default_factory=dict)
    quantize: str = "int8"
    quantize_options: Mapping[str, Any] = field(default_factory=dict)
    target: str = "ort-cpu"
    max_latency_ms: float | None = None
    max_knn_drop: float | None = None
    latency_batch: int = 1
    bench_seconds: float = 3.0
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("student_kwargs", "distill", "prune_options", "quantize_options"):
            object.__setattr__(self, name, dict(getattr(self, name) or {}))
        check_choice("RecipeConfig", "quantize", self.quantize, QUANTIZE_CHOICES)
        from edge_ssl.compress.quantize import TARGETS

        check_choice("RecipeConfig", "target", self.target, tuple(TARGETS))
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ConfigError(f"max_latency_ms must be > 0; got {self.max_latency_ms}.")
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
        return config_from_dict(cls, values)

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
        return PruneConfig.from_dict({**self.prune_options, "ratio": self.prune})

    def quantize_config(self) -> Any:
        from edge_ssl.compress.quantize import QuantizeConfig

        if self.quantize == "none":
            return None
        return QuantizeConfig.from_dict({**self.quantize_options, "precision": self.quantize,
                                         "target": self.target})


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
        values.update(loaded or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return RecipeConfig.from_dict(values)


@dataclass
class StageRow:
    """One row of the per-stage table."""

    name: str
    bundle: str
    params: int | None
    macs: int | None
    bytes: int
    knn_top1: float | None
    latency_ms: float | None
    latency_source: str
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CompressResult:
    rows: list[StageRow]
    chosen: str
    met: bool
    message: str
    bundle: Bundle | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [r.to_dict() for r in self.rows], "chosen": self.chosen, "met": self.met,
                "message": self.message, "bundle": None if self.bundle is None else str(self.bundle.path),
                "manifest_sha256": None if self.bundle is None else self.bundle.manifest_sha256}


def stages_dir(out: str | os.PathLike) -> Path:
    """Where the recipe keeps every stage's bundle: ``NAME.edge`` -> ``NAME.edge.stages/``."""
    out = Path(out)
    return out.with_name(out.name + ".stages")


class StageMeter:
    """Measures a bundle the same way for every stage: params, MACs, ONNX bytes, kNN, latency."""

    def __init__(self, recipe: RecipeConfig, knn: Any | None, workdir: Path) -> None:
        self.recipe, self.knn, self.workdir = recipe, knn, workdir

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
            graph = self._export(encoder, name)
        else:
            graph = bundle.file("model.onnx")
            sizes = {k: bundle.manifest.metrics.get(k) for k in ("params", "macs")}
        top1 = None
        if self.knn is not None:
            top1 = self.knn.top1(lambda images: onnx_embed(graph, images, spec))
        latency = self._latency(graph, spec)
        source = "ort-cpu measured" if self.recipe.target == "ort-cpu" else (
            "ort-cpu measured (stand-in: no TensorRT device here)")
        row = StageRow(name, str(bundle.path), sizes["params"], sizes["macs"], graph.stat().st_size, top1,
                       latency, source, bundle.manifest.precision)
        if record:
            record_results(bundle, "compress_stage", row.to_dict())
        return row

    def _export(self, encoder: Any, name: str) -> Path:
        from edge_ssl.runtime.export import export_encoder_onnx

        return export_encoder_onnx(encoder, self.workdir / f"{name}.onnx", dynamic_batch=True)

    def _latency(self, graph: Path, spec: Any) -> float:
        from edge_ssl.compress.measure import ort_latency_ms

        return ort_latency_ms(graph, spec, self.recipe.latency_batch, seconds=self.recipe.bench_seconds,
                              threads=self.recipe.threads)


def check_compress_inputs(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset, out: Path,
                          knn: Any | None, overwrite: bool) -> None:
    """Everything that can be checked before the first training step."""
    from edge_ssl.compress.distill import check_data, check_pairing, config_names

    from edge_ssl.models import create_encoder

    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite.")
    if stages_dir(out).exists() and not overwrite:
        raise ConfigError(f"{stages_dir(out)} already exists (stages of an earlier run); pass --overwrite.")
    require_float_weights(teacher, "compress")
    if recipe.max_knn_drop is not None and knn is None:
        raise ConfigError("--max-knn-drop needs labeled evaluation images: pass --eval-data and --eval-test.")
    distill = recipe.distill_config()
    if distill is not None:
        config_names(distill)
        student = create_encoder(distill.student, **distill.student_kwargs)
        check_pairing(teacher.manifest.encoder, student.spec)
        check_data(data, student.spec, distill.batch_size)
    else:
        check_data(data, teacher.manifest.encoder, 2)


def compress(
    teacher: str | os.PathLike | Bundle,
    recipe: RecipeConfig,
    data: ImageDataset,
    out: str | os.PathLike,
    *,
    knn: Any | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    progress: Callable[[Any], None] | None = None,
) -> CompressResult:
    """Run the recipe's stages; every stage's bundle lands in ``stages_dir(out)`` and the best
    one (meeting the targets, else the closest) is copied to ``out``."""
    from edge_ssl.compress.distill import distill
    from edge_ssl.compress.prune import prune
    from edge_ssl.compress.quantize import quantize

    say = log or (lambda _m: None)
    out = Path(out)
    teacher_bundle = teacher if isinstance(teacher, Bundle) else Bundle.open(teacher, verify=True)
    check_compress_inputs(teacher_bundle, recipe, data, out, knn, overwrite)
    stages = stages_dir(out)
    if stages.exists():
        shutil.rmtree(stages)
    stages.mkdir(parents=True)
    rows: list[StageRow] = []
    with tempfile.TemporaryDirectory(prefix="edge-ssl-compress-") as tmp:
        meter = StageMeter(recipe, knn, Path(tmp))
        current = teacher_bundle
        rows.append(meter.measure("teacher", current, record=False))
        say(_row_text(rows[-1]))
        if recipe.student is not None:
            say(f"distill -> {recipe.student}")
            current = distill(current, recipe.distill_config(), data, stages / "1-distill.edge",
                              progress=progress).bundle
            rows.append(meter.measure("distill", current))
            say(_row_text(rows[-1]))
        if recipe.prune is not None:
            say(f"prune {recipe.prune:.0%}")
            current = prune(current, recipe.prune_config(), data, stages / "2-prune.edge").bundle
            rows.append(meter.measure("prune", current))
            say(_row_text(rows[-1]))
        if recipe.quantize != "none":
            say(f"quantize {recipe.quantize} for {recipe.target}")
            current, _report = quantize(current, recipe.quantize_config(), data.images,
                                        stages / "3-quantize.edge", log=say)
            rows.append(meter.measure("quantize", current))
            say(_row_text(rows[-1]))
    chosen, met, message = choose_stage(rows, recipe)
    bundle = _materialize(Bundle.open(next(r.bundle for r in rows if r.name == chosen)), out, overwrite)
    result = CompressResult(rows, chosen, met, message, bundle)
    record_results(bundle, "compress", result.to_dict())
    return result


def choose_stage(rows: list[StageRow], recipe: RecipeConfig) -> tuple[str, bool, str]:
    """The last stage that meets both targets; else the closest (fewest violated ms/points)."""
    teacher = rows[0]
    candidates = rows[1:] or rows

    def misses(row: StageRow) -> tuple[float, float]:
        latency = 0.0
        if recipe.max_latency_ms is not None and row.latency_ms is not None:
            latency = max(0.0, row.latency_ms - recipe.max_latency_ms)
        drop = 0.0
        if recipe.max_knn_drop is not None and row.knn_top1 is not None and teacher.knn_top1 is not None:
            drop = max(0.0, 100 * (teacher.knn_top1 - row.knn_top1) - recipe.max_knn_drop)
        return latency, drop

    meeting = [r for r in candidates if misses(r) == (0.0, 0.0)]
    if meeting:
        return meeting[-1].name, True, f"all targets met by stage {meeting[-1].name!r}"
    best = min(candidates, key=lambda r: (misses(r)[1] > 0, sum(misses(r))))
    late, drop = misses(best)
    parts = []
    if late:
        parts.append(f"latency {best.latency_ms:.2f} ms is {late:.2f} ms over --max-latency-ms {recipe.max_latency_ms}")
    if drop:
        parts.append(f"kNN drop is {drop:.2f} pts over --max-knn-drop {recipe.max_knn_drop}")
    return best.name, False, (f"target not met; kept the closest stage {best.name!r}: " + "; ".join(parts)
                              + ". Try a smaller student, a higher --prune ratio, or longer distillation.")


def _materialize(bundle: Bundle, out: Path, overwrite: bool) -> Bundle:
    """Copy a stage bundle to ``out`` atomically (same manifest, so the same identity)."""
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass --overwrite.")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(bundle.path, tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return Bundle.open(out, verify=True)


def _row_text(row: StageRow) -> str:
    knn = "-" if row.knn_top1 is None else f"{100 * row.knn_top1:.2f}%"
    latency = "-" if row.latency_ms is None else f"{row.latency_ms:.2f} ms"
    params = "-" if row.params is None else f"{row.params / 1e6:.2f}M"
    macs = "-" if row.macs is None else f"{row.macs / 1e6:.1f}M"
    return (f"{row.name:9s} params {params:>8s}  MACs {macs:>9s}  bytes {row.bytes / 1e6:6.2f} MB  "
            f"kNN {knn:>7s}  latency {latency} ({row.latency_source})")


def recipe_settings(recipe: RecipeConfig) -> dict[str, Any]:
    return config_to_dict(recipe)
