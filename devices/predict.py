"""PREDICTED TensorRT latency: a per-layer roofline over the ONNX graph, calibrated on published results."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge_ssl.devices.profiles import DeviceProfile, architecture, get_profile, load_toml

from edge_ssl.errors import ConfigError

CALIBRATION_FILE = Path(__file__).with_name("predict_calibration.toml")
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}
#: Fraction of peak DRAM bandwidth a well-tuned kernel streams on Jetson (not fitted).
MEMORY_EFFICIENCY = 0.7
#: Relative compute efficiency per layer kind (TensorRT tactics on tensor cores). Small-channel
#: stems waste most of a tensor-core tile; depthwise convolutions are bandwidth bound.
OP_EFFICIENCY = {"conv": 1.0, "conv1x1": 0.8, "stem": 0.25, "dwconv": 0.05, "gemm": 0.5, "pool": 1.0}
#: Ops TensorRT fuses into the preceding kernel (cost nothing on their own) or removes.
FUSED_OPS = {
    "Relu", "Clip", "BatchNormalization", "Add", "Sum", "Mul", "Sub", "Div", "Sigmoid", "HardSigmoid",
    "HardSwish", "LeakyRelu", "PRelu", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    "Concat", "Shape", "Gather", "Constant", "Cast", "QuantizeLinear", "DequantizeLinear", "Transpose",
}
DEFAULT_CALIBRATION = {"efficiency": 0.5, "overhead_ms": 0.01}


@dataclass(frozen=True)
class LayerCost:
    """FLOPs (multiply-add = 2) and DRAM bytes of one kernel TensorRT would run."""

    name: str
    op_type: str
    kind: str
    flops: float
    bytes: float


@dataclass
class Prediction:
    """A predicted latency; never a measurement (``kind`` is always 'predicted')."""

    device: str
    precision: str
    power_mode: int | None
    batch: int
    predicted_ms: float
    compute_bound_layers: int
    memory_bound_layers: int
    layers: int
    gflops: float
    calibration: dict[str, Any]
    top_layers: list[dict[str, Any]] = field(default_factory=list)
    refined_ms: float | None = None  # scaled by measurements of this bundle on this device
    refined_by: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kind: str = "predicted"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        lines = [
            f"PREDICTED (roofline, not measured): {self.predicted_ms:.3f} ms per batch of {self.batch} "
            f"on {self.device} ({self.precision}, nvpmodel {self.power_mode if self.power_mode is not None else 'max'})",
            f"  {self.layers} kernels ({self.compute_bound_layers} compute-bound, "
            f"{self.memory_bound_layers} memory-bound), {self.gflops:.2f} GFLOP; calibration: "
            f"{self.calibration.get('source', 'default')}",
        ]
        if self.refined_ms is not None:
            lines.append(f"  refined by {len(self.refined_by)} measurement(s) on this device: {self.refined_ms:.3f} ms (predicted)")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _dims(value_info: Any) -> list[int] | None:
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value_info.type.tensor_type.shape.dim]
    return dims if dims and all(d > 0 for d in dims) else None


def _shapes(model: Any) -> dict[str, list[int]]:
    graph = model.graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = _dims(info)
        if dims:
            shapes[info.name] = dims
    return shapes


def _load_with_batch(path: str | os.PathLike, batch: int) -> Any:
    from edge_ssl.lazy import require

    onnx = require("onnx", "latency prediction")
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    images = [i for i in model.graph.input if i.name not in initializers][:1]  # the image input
    for graph_input in images:
        dims = graph_input.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch
    return onnx.shape_inference.infer_shapes(model)


def _attr(node: Any, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i if attribute.type == 2 else list(attribute.ints)
    return default


def _size(shape: list[int] | None) -> int:
    return math.prod(shape) if shape else 0


def _conv(node: Any, shapes: dict[str, list[int]], bpe: int) -> LayerCost | None:
    x, w, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
    if not (x and w and y):
        return None
    groups = _attr(node, "group", 1)
    per_output = w[1] * math.prod(w[2:])
    flops = 2.0 * _size(y) * per_output
    kind = "conv"
    if groups > 1 and groups == x[1]:
        kind = "dwconv"
    elif w[1] <= 4:
        kind = "stem"
    elif math.prod(w[2:]) == 1:
        kind = "conv1x1"
    return LayerCost(node.name, node.op_type, kind, flops, float((_size(x) + _size(w) + _size(y)) * bpe))


def _gemm(node: Any, shapes: dict[str, list[int]], bpe: int) -> LayerCost | None:
    a, b, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
    if not (a and b and y):
        return None
    k = b[0] if node.op_type == "MatMul" or not _attr(node, "transB", 0) else b[1]
    if node.op_type == "MatMul":
        k = a[-1]
    return LayerCost(node.name, node.op_type, "gemm", 2.0 * _size(y) * k, float((_size(a) + _size(b) + _size(y)) * bpe))


def graph_costs(path: str | os.PathLike, batch: int = 1, precision: str = "fp16") -> list[LayerCost]:
    """One LayerCost per kernel TensorRT would launch (pointwise ops fused away)."""
    bpe = BYTES_PER_ELEMENT[precision]
    model = _load_with_batch(path, batch)
    shapes = _shapes(model)
    costs = []
    for node in model.graph.node:
        if node.op_type in FUSED_OPS:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            cost = _conv(node, shapes, bpe)
        elif node.op_type in ("Gemm", "MatMul"):
            cost = _gemm(node, shapes, bpe)
        else:
            moved = sum(_size(shapes.get(n)) for n in [*node.input, *node.output] if n)
            cost = LayerCost(node.name, node.op_type, "pool", float(moved), float(moved * bpe))
        if cost is not None:
            costs.append(cost)
    if not costs:
        raise ConfigError(f"{path} has no layers whose shapes could be inferred; is it a valid ONNX model?")
    return costs


def peak_ops(profile: DeviceProfile, precision: str, gpu_mhz: float | None = None) -> float:
    """Dense GPU peak (ops/s) at ``precision``, scaled to ``gpu_mhz`` when given."""
    if precision not in profile.precisions:
        raise ConfigError(
            f"{profile.name} does not support {precision}; it supports {', '.join(profile.precisions)}."
        )
    if precision == "fp16":
        peak = profile.peak_fp16_tflops_dense
    elif precision == "int8":
        peak = profile.peak_int8_tops_dense
    else:  # fp32 on CUDA cores: one FMA per core per clock
        peak = (profile.cuda_cores or 0) * 2 * (profile.gpu_max_mhz or 0) / 1e6 or None
    if peak is None or profile.memory_bandwidth_gbs is None or profile.gpu_max_mhz is None:
        raise ConfigError(
            f"{profile.name} has no cited {precision} peak or bandwidth in profiles.toml, so no "
            "roofline can be drawn; add the figure with its source to predict for it."
        )
    scale = (gpu_mhz / profile.gpu_max_mhz) if gpu_mhz else 1.0
    return peak * 1e12 * scale


@lru_cache(maxsize=1)
def calibration_table() -> dict[str, Any]:
    if not CALIBRATION_FILE.is_file():
        return {}
    return load_toml(CALIBRATION_FILE).get("calibration", {})


def calibration_for(profile: DeviceProfile, precision: str) -> dict[str, Any]:
    """Fitted efficiency and per-kernel overhead for the profile's architecture and precision."""
    table = calibration_table()
    entry = table.get(f"{profile.arch}-{precision}")
    if entry:
        return {**entry, "source": f"fitted on published {profile.arch} {precision} results"}
    return {**DEFAULT_CALIBRATION, "source": f"UNCALIBRATED default (no published {profile.arch} {precision} anchor)"}


def roofline_ms(costs: list[LayerCost], peak: float, bandwidth_gbs: float, efficiency: float,
                overhead_ms: float) -> tuple[float, list[tuple[LayerCost, float, bool]]]:
    """Total ms and per-layer (cost, ms, compute_bound)."""
    rows = []
    for cost in costs:
        compute = cost.flops / (peak * efficiency * OP_EFFICIENCY.get(cost.kind, 0.5))
        memory = cost.bytes / (bandwidth_gbs * 1e9 * MEMORY_EFFICIENCY)
        rows.append((cost, 1000.0 * max(compute, memory) + overhead_ms, compute >= memory))
    return sum(ms for _, ms, _ in rows), rows


def predict_onnx(onnx_path: str | os.PathLike, device: str | DeviceProfile, *, precision: str = "fp16",
                 power_mode: int | None = None, batch: int = 1,
                 calibration: dict[str, Any] | None = None) -> Prediction:
    """Predict TensorRT latency of an ONNX graph on a device profile (labelled 'predicted')."""
    if precision not in BYTES_PER_ELEMENT:
        raise ConfigError(f"precision must be one of {', '.join(BYTES_PER_ELEMENT)}; got {precision!r}.")
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}.")
    profile = device if isinstance(device, DeviceProfile) else get_profile(device)
    mode = profile.power_mode(power_mode)
    warnings = []
    if mode is not None and mode.gpu_max_mhz is None:
        warnings.append(f"the GPU clock cap of nvpmodel mode {mode.mode_id} ({mode.name}) is not recorded; "
                        "predicting at the maximum clock, so this is optimistic.")
    peak = peak_ops(profile, precision, mode.gpu_max_mhz if mode else None)
    calib = calibration or calibration_for(profile, precision)
    if calib["source"].startswith("UNCALIBRATED"):
        warnings.append(calib["source"] + ": treat the number as a rough bound.")
    costs = graph_costs(onnx_path, batch, precision)
    total, rows = roofline_ms(costs, peak, profile.memory_bandwidth_gbs or 1.0, calib["efficiency"], calib["overhead_ms"])
    top = sorted(rows, key=lambda r: -r[1])[:5]
    return Prediction(
        device=profile.key, precision=precision, power_mode=power_mode, batch=batch, predicted_ms=total,
        compute_bound_layers=sum(1 for *_, c in rows if c), memory_bound_layers=sum(1 for *_, c in rows if not c),
        layers=len(rows), gflops=sum(c.flops for c in costs) / 1e9, calibration=calib,
        top_layers=[{"name": c.name, "kind": c.kind, "ms": ms, "compute_bound": cb} for c, ms, cb in top],
        warnings=warnings,
    )


def predict_bundle(path: str | os.PathLike, device: str, *, precision: str = "fp16",
                   power_mode: int | None = None, batch: int = 1) -> Prediction:
    """Predict for a bundle's model.onnx (or a bare .onnx); refine with this bundle's device measurements."""
    path = Path(path)
    if path.suffix == ".onnx":
        return predict_onnx(path, device, precision=precision, power_mode=power_mode, batch=batch)
    from edge_ssl.bundle import Bundle, read_results

    bundle = Bundle.open(path, verify=True)
    prediction = predict_onnx(bundle.file("model.onnx"), device, precision=precision,
                              power_mode=power_mode, batch=batch)
    _refine(prediction, read_results(bundle).get("device_bench", {}))
    return prediction


def prediction_key(prediction: Prediction) -> str:
    """How a prediction is keyed in a bundle's results: 'orin-nx-16gb int8' (+ batch, power mode)."""
    key = f"{prediction.device} {prediction.precision}"
    if prediction.batch != 1:
        key += f" b{prediction.batch}"
    return key if prediction.power_mode is None else f"{key} mode{prediction.power_mode}"


def record_prediction(path: str | os.PathLike, prediction: Prediction) -> Path:
    """Add ``prediction`` to the bundle's results under 'predict' (other predictions are kept).

    Raises BundleError when the results file beside the bundle cannot be written.
    """
    from edge_ssl.bundle import Bundle, read_results, record_results

    bundle = Bundle.open(path, verify=False)
    recorded = dict(read_results(bundle).get("predict") or {})
    recorded[prediction_key(prediction)] = prediction.to_dict()
    return record_results(bundle, "predict", recorded)


def _refine(prediction: Prediction, measured: dict[str, Any]) -> None:
    """Scale by measured/predicted from TensorRT runs of this bundle on the same device profile."""
    ratios = []
    for target, report in measured.items():
        env = report.get("environment", {})
        batch = report.get("batches", {}).get(str(prediction.batch))
        if env.get("profile") == prediction.device and report.get("backend") == "trtexec" and batch:
            ratios.append(batch["mean"] / prediction.predicted_ms)
            prediction.refined_by.append(target)
    if ratios:
        prediction.refined_ms = prediction.predicted_ms * math.exp(sum(map(math.log, ratios)) / len(ratios))


def fit_calibration(groups: dict[str, list[tuple[list[LayerCost], float, float, float]]]) -> dict[str, dict[str, float]]:
    """Per group: the (efficiency, overhead) minimising the worst |log(predicted/published)|.

    Each anchor is (layer costs, peak ops/s, bandwidth GB/s, published ms). A grid search:
    two parameters, a handful of anchors, no local minima to worry about.
    """
    import numpy as np

    efficiencies = np.arange(0.03, 1.0001, 0.005)
    overheads = np.arange(0.0, 0.0601, 0.0005)
    fitted = {}
    for group, anchors in groups.items():
        worst = np.zeros((efficiencies.size, overheads.size))
        for costs, peak, bandwidth, published in anchors:
            compute = np.array([c.flops / (peak * OP_EFFICIENCY.get(c.kind, 0.5)) for c in costs])
            memory = np.array([c.bytes / (bandwidth * 1e9 * MEMORY_EFFICIENCY) for c in costs])
            body = 1000.0 * np.maximum(compute[None, :] / efficiencies[:, None], memory[None, :]).sum(axis=1)
            total = body[:, None] + len(costs) * overheads[None, :]
            worst = np.maximum(worst, np.abs(np.log(total / published)))
        i, j = np.unravel_index(np.argmin(worst), worst.shape)
        fitted[group] = {"efficiency": round(float(efficiencies[i]), 4), "overhead_ms": round(float(overheads[j]), 5),
                         "anchors": len(anchors), "worst_ratio_error": round(float(np.exp(worst[i, j]) - 1), 4)}
    return fitted


def architecture_constants(profile: DeviceProfile) -> dict[str, float]:
    """The per-clock constants behind the profile's [DERIVED] peaks (for reports)."""
    return architecture(profile.arch)
