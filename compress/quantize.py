"""Post-training quantization: INT8 QDQ with onnxruntime (per target), accuracy-aware fallback, FP16."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.bundle import Bundle, BundleWriter, carried_files
from edge_ssl.config import check_choice, check_int, check_number, config_from_dict, config_to_dict
from edge_ssl.errors import ConfigError, DataError, EdgeSSLError
from edge_ssl.lazy import require
from edge_ssl.outputs import check_bundle_out
from edge_ssl.stage import StageResult, open_float_parent

PRECISIONS = ("int8", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


class QuantizeError(EdgeSSLError, ValueError):
    """A quantization input or setting is not usable, or its result misses what was asked.

    ``report``: the QuantizeReport of the best graph found, when quantization ran.
    """

    def __init__(self, message: str, report: Any | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class QuantTarget:
    """How a deployment target wants its INT8 graph (a typed preset)."""

    name: str
    activation_type: str  # "uint8" | "int8"
    weight_type: str
    per_channel: bool
    activation_symmetric: bool
    op_types: tuple[str, ...] | None  # None = every op onnxruntime can quantize
    extra_options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    #: 7-bit weights: "auto" = only on x86 CPUs without VNNI, where U8S8 products saturate
    #: int16 accumulators (measured here on an AVX2 CPU: teacher embedding cosine vs FP32
    #: 0.946 mean / 0.465 min without it, 0.9993 / 0.998 with it); "never" for TensorRT.
    reduce_range: str = "never"


#: onnxruntime CPU: U8S8 (uint8 asymmetric activations, int8 symmetric per-channel weights).
#: On AVX-512 VNNI CPUs this is the combination MLAS runs fastest; S8S8 gives no speed-up.
ORT_CPU = QuantTarget(
    "ort-cpu", "uint8", "int8", per_channel=True, activation_symmetric=False, op_types=None,
    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    description="onnxruntime CPU EP: U8S8, per-channel weights",
    reduce_range="auto",
)
#: TensorRT: symmetric S8S8 per-channel; Q/DQ on both inputs of residual Adds so TensorRT
#: fuses Conv + Add (+ ReLU) in INT8, and on Conv/Gemm/MatMul inputs; zero points are 0.
TENSORRT = QuantTarget(
    "tensorrt", "int8", "int8", per_channel=True, activation_symmetric=True,
    op_types=("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "GlobalAveragePool"),
    extra_options={"WeightSymmetric": True, "ActivationSymmetric": True,
                   "QDQKeepRemovableActivations": False, "DedicatedQDQPair": False},
    description="TensorRT explicit quantization: S8S8 symmetric, per-channel, Q/DQ on residual adds",
)
TARGETS: dict[str, QuantTarget] = {t.name: t for t in (ORT_CPU, TENSORRT)}


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one quantization.

    - ``precision``: ``int8`` (post-training static, calibrated) or ``fp16`` (FP16 graph for
      TensorRT strongly typed networks; no calibration).
    - ``target``: ``ort-cpu`` or ``tensorrt`` (see ORT_CPU / TENSORRT).
    - ``calibration``: ``minmax``, ``entropy`` or ``percentile``; ``calibration_images`` are
      taken from the unlabeled data.
    - Accuracy-aware fallback: with ``min_cosine`` (embedding cosine vs FP32 on the
      calibration images, mean over images) and/or ``max_knn_drop`` (kNN top-1 points, needs
      labeled eval data), the most sensitive layers stay float, one at a time, until both hold
      or ``max_fallback`` layers fell back.
    The Intel Neural Compressor path (a PyTorch model, not an ONNX graph) is
    ``edge_ssl.compress.inc.quantize_inc``.
    """

    precision: str = "int8"
    target: str = "ort-cpu"
    calibration: str = "minmax"
    calibration_images: int = 256
    min_cosine: float | None = None
    max_knn_drop: float | None = None
    max_fallback: int = 16
    sensitivity_images: int = 32
    opset: int = 17
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("QuantizeConfig", "precision", self.precision, PRECISIONS)
        check_choice("QuantizeConfig", "target", self.target, tuple(TARGETS))
        check_choice("QuantizeConfig", "calibration", self.calibration, CALIBRATION_METHODS)
        owner = "QuantizeConfig"
        for name in ("calibration_images", "sensitivity_images", "opset"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "max_fallback", self.max_fallback, minimum=0)
        if self.min_cosine is not None:
            check_number(owner, "min_cosine", self.min_cosine, 0, 1, low_open=True)
        if self.max_knn_drop is not None:
            check_number(owner, "max_knn_drop", self.max_knn_drop, 0)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QuantizeConfig:
        return config_from_dict(cls, values)

    @property
    def preset(self) -> QuantTarget:
        return TARGETS[self.target]


@dataclass
class QuantizeReport:
    """What quantization did and how close the result is to FP32."""

    precision: str
    target: str
    mean_cosine: float
    min_cosine: float
    fallback_layers: list[str]
    sensitivity: list[dict[str, Any]]
    quantized_nodes: int
    met: bool
    knn_top1: float | None = None
    knn_top1_fp32: float | None = None
    message: str = ""
    trials: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------- ONNX steps


def preprocess_onnx(src: Path, dst: Path) -> Path:
    """onnxruntime's quantization pre-processing: symbolic shape inference + graph optimization."""
    shape_inference = require("onnxruntime.quantization.shape_inference", "INT8 quantization")
    shape_inference.quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    return dst


def quantizable_nodes(onnx_path: Path, op_types: tuple[str, ...] | None) -> list[str]:
    """Names of the nodes the target quantizes (the candidates for float fallback)."""
    onnx = require("onnx", "INT8 quantization")
    default = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "GlobalAveragePool",
               "AveragePool", "MaxPool", "Concat", "Relu", "Clip", "Sigmoid", "HardSigmoid")
    wanted = set(op_types or default)
    model = onnx.load(str(onnx_path), load_external_data=False)
    return [node.name for node in model.graph.node if node.op_type in wanted and node.name]


def cpu_has_vnni(cpuinfo: str | None = None) -> bool:
    """True when this x86 CPU has VNNI (AVX-512 VNNI or AVX-VNNI) or AMX; False otherwise."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return True  # unknown: keep full 8-bit weights
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def uses_reduce_range(target: QuantTarget, cpuinfo: str | None = None) -> bool:
    """Whether ``target`` quantizes weights to 7 bits on this machine (see QuantTarget)."""
    import platform

    if target.reduce_range != "auto":
        return target.reduce_range == "always"
    return platform.machine() in ("x86_64", "AMD64") and not cpu_has_vnni(cpuinfo)


def quantize_onnx(src: Path, dst: Path, reader: Any, target: QuantTarget, calibration: str, *,
                  exclude: tuple[str, ...] = (), include: tuple[str, ...] | None = None,
                  cache: Path | None = None) -> Path:
    """Static QDQ quantization of ``src`` with the target's types; ranges cached in ``cache``."""
    q = require("onnxruntime.quantization", "INT8 quantization")
    types = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}
    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[calibration]
    reader.rewind()
    q.quantize_static(
        str(src), str(dst), reader, quant_format=q.QuantFormat.QDQ,
        op_types_to_quantize=list(target.op_types) if target.op_types else None,
        per_channel=target.per_channel, reduce_range=uses_reduce_range(target),
        activation_type=types[target.activation_type], weight_type=types[target.weight_type],
        nodes_to_quantize=list(include) if include is not None else None,
        nodes_to_exclude=list(exclude), calibrate_method=method,
        extra_options=dict(target.extra_options),
        calibration_cache_path=str(cache) if cache is not None else None,
    )
    return dst


def onnx_embed(onnx_path: Path, images: np.ndarray, input_spec: Any) -> np.ndarray:
    """Embeddings through onnxruntime's CPU provider (how INT8/FP16 graphs are evaluated)."""
    from edge_ssl.runtime.embed import embed_with_runner
    from edge_ssl.runtime.ort import OrtRunner

    return embed_with_runner(OrtRunner(onnx_path, input_spec=input_spec), images, input_spec, batch_size=64)


def cosine_stats(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(mean, min) row-wise cosine similarity."""
    from edge_ssl.runtime.compare import row_cosines

    cos = row_cosines(reference, other)
    return float(cos.mean()), float(cos.min())


# --------------------------------------------------------------------- fallback


@dataclass
class _Workspace:
    """Paths and data of one quantization run: the pre-processed float graph, the reader, etc."""

    pre: Path
    folder: Path
    reader: Any
    images: np.ndarray
    input_spec: Any
    reference: np.ndarray  # FP32 embeddings of ``images``
    target: QuantTarget
    calibration: str
    cache: Path
    trials: int = 0

    def quantize(self, exclude: tuple[str, ...] = (), include: tuple[str, ...] | None = None) -> Path:
        self.trials += 1
        out = self.folder / f"trial{self.trials}.onnx"
        return quantize_onnx(self.pre, out, self.reader, self.target, self.calibration,
                             exclude=exclude, include=include, cache=self.cache)

    def cosine(self, path: Path, count: int | None = None) -> tuple[float, float]:
        images = self.images if count is None else self.images[:count]
        reference = self.reference if count is None else self.reference[:count]
        return cosine_stats(reference, onnx_embed(path, images, self.input_spec))


def layer_sensitivity(ws: _Workspace, nodes: list[str], count: int) -> list[dict[str, Any]]:
    """Each candidate quantized alone: embedding cosine vs FP32; most sensitive first."""
    rows = []
    for node in nodes:
        path = ws.quantize(include=(node,))
        mean, low = ws.cosine(path, count)
        rows.append({"node": node, "mean_cosine": mean, "min_cosine": low})
        path.unlink(missing_ok=True)
    return sorted(rows, key=lambda r: r["mean_cosine"])


def quantize_with_fallback(ws: _Workspace, config: QuantizeConfig,
                           knn: Any | None = None,
                           log: Callable[[str], None] | None = None) -> tuple[Path, QuantizeReport]:
    """Quantize everything; while ``min_cosine`` / ``max_knn_drop`` fail, keep the next most
    sensitive layer float. Returns the best graph found and a report (``met`` False if short)."""
    knn_fp32 = knn.top1(lambda im: onnx_embed(ws.pre, im, ws.input_spec)) if _needs_knn(config, knn) else None
    nodes = quantizable_nodes(ws.pre, ws.target.op_types)
    excluded: list[str] = []
    sensitivity: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []
    best: tuple[float, Path, dict[str, Any]] | None = None
    while True:
        path = ws.quantize(exclude=tuple(excluded))
        mean, low = ws.cosine(path)
        top1 = knn.top1(lambda im, p=path: onnx_embed(p, im, ws.input_spec)) if knn_fp32 is not None else None
        trial = {"fallback": list(excluded), "mean_cosine": mean, "min_cosine": low, "knn_top1": top1}
        trials.append(trial)
        if log:
            log(f"int8 with {len(excluded)} float layers: cosine mean {mean:.4f} min {low:.4f}"
                + (f", kNN {100 * top1:.2f}% (fp32 {100 * knn_fp32:.2f}%)" if top1 is not None else ""))
        score = mean if top1 is None else top1
        if best is None or score > best[0]:
            best = (score, path, trial)
        met = _meets(config, mean, top1, knn_fp32)
        if met or len(excluded) >= min(config.max_fallback, len(nodes)):
            break
        if not sensitivity:
            sensitivity = layer_sensitivity(ws, nodes, config.sensitivity_images)
        excluded.append(next(r["node"] for r in sensitivity if r["node"] not in excluded))
    _, path, trial = best
    met = _meets(config, trial["mean_cosine"], trial["knn_top1"], knn_fp32)
    report = QuantizeReport(
        precision="int8", target=ws.target.name, mean_cosine=trial["mean_cosine"],
        min_cosine=trial["min_cosine"], fallback_layers=trial["fallback"],
        sensitivity=sensitivity[:10], quantized_nodes=len(nodes) - len(trial["fallback"]), met=met,
        knn_top1=trial["knn_top1"], knn_top1_fp32=knn_fp32, trials=trials,
        message="" if met else _shortfall(config, trial, knn_fp32),
    )
    return path, report


def check_calibration_settings(config: QuantizeConfig, num_images: int) -> int:
    """How many of ``num_images`` unlabeled images ``quantize`` will calibrate (or, for FP16,
    compare) on; DataError/ConfigError when that is too few for ``config``.

    Needs no model and no images, only their count: callers run it before any training.
    Every method takes any count from its minimum up (batches are split evenly, see
    ``calibration.even_batch_size``).
    """
    from edge_ssl.compress.calibration import MIN_CALIBRATION_IMAGES

    minimum = MIN_CALIBRATION_IMAGES if config.precision == "int8" else 1
    what = f"{config.calibration} calibration" if config.precision == "int8" else "the fp16 check"
    if config.calibration_images < minimum:
        raise ConfigError(
            f"calibration_images is {config.calibration_images}; {what} needs at least {minimum} "
            f"images. Pass --calibration-images {max(minimum, min(num_images, 256))} (in a "
            "recipe: quantize_options.calibration_images)."
        )
    if num_images < minimum:
        raise DataError(
            f"{what} needs at least {minimum} images; got {num_images}. Pass more unlabeled "
            "images with --data (a few hundred is typical)."
        )
    return min(config.calibration_images, num_images)


def _needs_knn(config: QuantizeConfig, knn: Any | None) -> bool:
    if config.max_knn_drop is None:
        return False
    if knn is None:
        raise QuantizeError(
            "--max-knn-drop needs labeled evaluation images (--eval-data / --eval-test) to measure "
            "kNN top-1; pass them or use --min-cosine instead."
        )
    return True


def _meets(config: QuantizeConfig, mean: float, top1: float | None, fp32: float | None) -> bool:
    if config.min_cosine is not None and mean < config.min_cosine:
        return False
    if config.max_knn_drop is not None and top1 is not None and fp32 is not None:
        return 100 * (fp32 - top1) <= config.max_knn_drop
    return True


def _shortfall(config: QuantizeConfig, trial: Mapping[str, Any], fp32: float | None) -> str:
    parts = [f"{len(trial['fallback'])} layers kept float"]
    if config.min_cosine is not None:
        parts.append(f"mean cosine {trial['mean_cosine']:.4f} (wanted >= {config.min_cosine})")
    if config.max_knn_drop is not None and trial["knn_top1"] is not None and fp32 is not None:
        parts.append(f"kNN drop {100 * (fp32 - trial['knn_top1']):.2f} pts (wanted <= {config.max_knn_drop})")
    return ("target not met; best found: " + ", ".join(parts)
            + ". Raise --max-fallback, use entropy/percentile calibration, or distill longer.")


# --------------------------------------------------------------------- the stage


def quantize(
    bundle: str | os.PathLike | Bundle,
    config: QuantizeConfig,
    images: np.ndarray,
    out: str | os.PathLike,
    *,
    knn: Any | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    finish: Callable[[Path, QuantizeReport], tuple[Mapping[str, Any], Mapping[str, Path]]] | None = None,
) -> QuantizeResult:
    """Quantize a float bundle's encoder to INT8 (or FP16) and write a new bundle to ``out``.

    ``finish(graph, report)``, when given, returns (lineage settings, extra files) added to the
    bundle before it is written (re-quantization after adaptation records its own measures).
    ``images``: unlabeled uint8 (N, H, W, 3) for calibration (the first
    ``config.calibration_images``); ``knn``: an ``edge_ssl.compress.measure.KnnData`` for
    ``max_knn_drop``. The new bundle holds ``model.onnx`` = the quantized graph and no
    ``model.pt`` (its float parent is found through the lineage).
    """
    from edge_ssl.compress.calibration import ImageCalibrationReader, check_calibration_images

    out = Path(out)
    check_bundle_out(out, overwrite=overwrite)
    parent, source, encoder = open_float_parent(bundle, "quantize")
    spec = encoder.spec.input
    images = check_calibration_images(images, spec, minimum=1)
    images = images[: check_calibration_settings(config, len(images))]
    reader = None
    if config.precision == "int8":
        reader = ImageCalibrationReader(images, spec)
        _needs_knn(config, knn)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as tmp:
        folder = Path(tmp)
        if config.precision == "fp16":
            graph, report = _fp16_graph(encoder, images, config, folder)
        else:
            graph, report = _int8_graph(encoder, reader, images, config, folder, knn, log)
        check = _check_result(graph, report, encoder, images)
        settings = _settings(config, len(images))
        metrics = {key: parent.manifest.metrics[key] for key in ("params", "macs") if key in parent.manifest.metrics}
        metrics |= {"quantize": report.to_dict(), "output_check": check.to_dict()}
        extra, files = finish(graph, report) if finish is not None else ({}, {})
        settings.update(extra)
        with BundleWriter(out, overwrite=overwrite) as writer:
            writer.copy_file("model.onnx", graph)
            for name, path in {**carried_files(source), **files}.items():
                writer.copy_file(name, path)
            written = writer.commit(
                name=out.name.removesuffix(".edge"), encoder=parent.manifest.encoder,
                lineage=parent.child_lineage("quantize", settings),
                precision=config.precision, metrics=metrics,
            )
    result = QuantizeResult(report=report)
    result.wrote(written)
    return result


@dataclass(kw_only=True)
class QuantizeResult(StageResult):
    """The quantized bundle, its metrics and the quantization report (trials, fallback)."""

    report: QuantizeReport


def _settings(config: QuantizeConfig, images_used: int) -> dict[str, Any]:
    settings = config_to_dict(config) | {"calibration_images_used": images_used}
    if config.precision == "int8":
        settings["reduce_range"] = uses_reduce_range(TARGETS[config.target])
    return settings


def _check_result(graph: Path, report: QuantizeReport, encoder: Any, images: np.ndarray) -> Any:
    """QuantizeError (with the numbers) when the requested thresholds were not reached, or
    DegenerateOutputError when the graph's embeddings are unusable: nothing is written."""
    from edge_ssl.output_check import check_graph

    if not report.met:
        raise QuantizeError(f"quantize: {report.message} Nothing was written.", report)
    spec = encoder.spec.input
    return check_graph("quantize", lambda batch: onnx_embed(graph, batch, spec), spec,
                       parent=encoder, images=images)


def _export(encoder: Any, folder: Path, config: QuantizeConfig, *, fp16: bool = False) -> Path:
    from edge_ssl.runtime.export import export_encoder_onnx

    return export_encoder_onnx(encoder, folder / ("fp16.onnx" if fp16 else "fp32.onnx"),
                               opset=config.opset, dynamic_batch=True, fp16=fp16)


def _int8_graph(encoder: Any, reader: Any, images: np.ndarray, config: QuantizeConfig, folder: Path,
                knn: Any | None, log: Callable[[str], None] | None) -> tuple[Path, QuantizeReport]:
    float_graph = _export(encoder, folder, config)
    pre = preprocess_onnx(float_graph, folder / "fp32.pre.onnx")
    spec = encoder.spec.input
    ws = _Workspace(pre=pre, folder=folder, reader=reader, images=images, input_spec=spec,
                    reference=onnx_embed(float_graph, images, spec), target=config.preset,
                    calibration=config.calibration, cache=folder / "calibration.json")
    return quantize_with_fallback(ws, config, knn, log)


def _fp16_graph(encoder: Any, images: np.ndarray, config: QuantizeConfig,
                folder: Path) -> tuple[Path, QuantizeReport]:
    """The runtime's FP16 export (FP16 weights and compute, FP32 I/O and norms), checked by cosine."""
    float_graph = _export(encoder, folder, config)
    half = _export(encoder, folder, config, fp16=True)
    spec = encoder.spec.input
    mean, low = cosine_stats(onnx_embed(float_graph, images, spec), onnx_embed(half, images, spec))
    met = config.min_cosine is None or mean >= config.min_cosine
    report = QuantizeReport(
        precision="fp16", target=config.target, mean_cosine=mean, min_cosine=low, fallback_layers=[],
        sensitivity=[], quantized_nodes=0, met=met,
        message="" if met else f"fp16 mean cosine {mean:.4f} < {config.min_cosine}",
    )
    return half, report
