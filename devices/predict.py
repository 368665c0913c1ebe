"""PREDICTED TensorRT latency: a per-layer roofline over the ONNX graph, fitted on published results."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from edge_ssl.devices.profiles import DeviceProfile, architecture, get_profile, load_toml

from edge_ssl.errors import ConfigError

CALIBRATION_FILE = Path(__file__).with_name("predict_calibration.toml")
#: Where `edge-ssl predict --calibrate` keeps a user's own measurements (overridable).
LOCAL_CALIBRATION_ENV = "EDGE_SSL_PREDICT_CALIBRATION"
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "int8": 1}
GENERATIONS = ("maxwell", "pascal", "volta", "ampere", "blackwell")
#: Generations without tensor cores (FP16 on CUDA cores) and with them: a generation no
#: published result calibrates borrows the constants of its own family.
FAMILY = {"maxwell": "cuda-core", "pascal": "cuda-core", "volta": "tensor-core", "ampere": "tensor-core",
          "blackwell": "tensor-core"}
#: Kernel kinds. 'conv' (dense KxK, K > 1) is the reference whose efficiency is the
#: generation's scale; every other kind carries its own efficiency relative to it.
OP_KINDS = ("conv", "conv1x1", "stem", "dwconv", "grouped", "gemm", "pool", "se", "eltwise")
#: Channel counts are padded up to the MMA tile the kernels use: half2 on Maxwell/Pascal CUDA
#: cores, 8 for FP16 tensor cores (Volta/Ampere), 16 (Volta) / 32 (Ampere+) for INT8 IMMA.
TILE = {("maxwell", "fp16"): 2, ("pascal", "fp16"): 2, ("volta", "fp16"): 8, ("volta", "int8"): 16,
        ("ampere", "fp16"): 8, ("ampere", "int8"): 32, ("blackwell", "fp16"): 8, ("blackwell", "int8"): 32}
#: Ops that launch nothing: shape bookkeeping, or copies TensorRT elides (concatenation is
#: written in place, a split read in place by its consumers, Q/DQ folded into the kernels).
FREE_OPS = {
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Shape", "Gather", "Constant",
    "Cast", "QuantizeLinear", "DequantizeLinear", "Transpose", "Split", "Slice", "Dropout",
}
#: One-input or residual pointwise ops TensorRT folds into the epilogue of the conv or GEMM
#: that produced their input, when nothing else reads that output.
EPILOGUE_OPS = {"Relu", "Clip", "BatchNormalization", "Add", "Sum", "LeakyRelu", "PRelu", "Sigmoid", "Tanh"}
#: Every other pointwise op: a chain of them is one pointwise kernel of its own (TensorRT's
#: pointwise fusion), streaming the activation through DRAM: swish (x * sigmoid(x)), hard-swish,
#: the scale of a squeeze-excitation block.
POINTWISE_OPS = EPILOGUE_OPS | {"Mul", "Sub", "Div", "HardSigmoid", "HardSwish", "Erf", "Softmax", "Pow",
                                "Sqrt", "Exp", "Neg", "Reciprocal", "Max", "Min"}
#: CUDA cores per SM (the SM count of a board is its CUDA cores over this): Maxwell GM20B,
#: Pascal GP10B and Ampere GA10B have 128, Volta GV10B 64 (NVIDIA architecture whitepapers).
CORES_PER_SM = {"maxwell": 128, "pascal": 128, "volta": 64, "ampere": 128, "blackwell": 128}
#: Kinds TensorRT runs on CUDA cores whatever the generation (no MMA form): their peak is
#: CUDA cores x 4 FP16 ops per clock (half2 FMA), not the tensor-core peak.
CUDA_CORE_KINDS = frozenset({"dwconv", "pool", "se", "eltwise"})
#: Output tile (rows = batch x output pixels, columns = output channels) one thread block of an
#: implicit-GEMM kernel computes: a layer with fewer tiles than the board has SMs leaves SMs idle
#: (wave quantization), which is what makes small late layers slow on a board with many SMs.
CTA_TILE = (64, 64)
#: Half-width (log ratio) of the interval of a group no published result calibrates: x/÷ 3.
UNCALIBRATED_LOG_INTERVAL = math.log(3.0)
#: Share of the time in per-kernel overhead above which the text says "launch-bound".
LAUNCH_BOUND_SHARE = 0.5


@dataclass(frozen=True)
class LayerCost:
    """FLOPs (multiply-add = 2, channels padded to the tile) and DRAM bytes of one kernel."""

    name: str
    op_type: str
    kind: str
    flops: float
    bytes: float
    rows: int = 0   # implicit-GEMM rows (batch x output pixels); 0 where no MMA tiles apply
    cols: int = 0   # implicit-GEMM columns (output channels)


@dataclass(frozen=True)
class LatencyModel:
    """The fitted constants: op-kind efficiencies, per-generation scale and launch floor."""

    op_efficiency: dict[str, float]
    scale: dict[str, float]          # share of the dense FP16 peak a 3x3 conv reaches, per generation
    launch_kcycles: dict[str, float]  # per-kernel floor in 1000s of GPU clocks: the same at every precision
    int8_ratio: dict[str, float] = field(default_factory=dict)  # INT8 scale / FP16 scale, per generation
    memory_efficiency: float = 0.7   # share of peak DRAM bandwidth a streaming kernel reaches
    host_overhead_ms: float = 0.0    # copies + runtime calls of an end-to-end figure (not predicted)
    graph_launch_share: float = 1.0  # the floor left when the engine is replayed as a CUDA graph

    def efficiency(self, arch: str, precision: str) -> float:
        ratio = _borrow(self.int8_ratio, arch) if precision == "int8" and self.int8_ratio else 1.0
        return _borrow(self.scale, arch) * ratio

    def launch(self, arch: str, gpu_mhz: float) -> float:
        """Per-kernel floor in ms: prologue, tail and sync cost clocks, so a slower clock pays more."""
        return _borrow(self.launch_kcycles, arch) / gpu_mhz


def _borrow(table: dict[str, float], arch: str) -> float:
    """``table[arch]``, else the geometric mean over its family (else over all generations)."""
    if arch in table:
        return table[arch]
    family = [v for g, v in table.items() if FAMILY.get(g) == FAMILY.get(arch)]
    return _geomean(family or table.values())


DEFAULT_MODEL = LatencyModel(
    op_efficiency={"conv": 1.0, "conv1x1": 0.8, "stem": 0.5, "dwconv": 0.05, "grouped": 0.3,
                   "gemm": 0.5, "pool": 1.0, "se": 0.2, "eltwise": 1.0},
    scale={g: 0.5 for g in GENERATIONS[:4]}, launch_kcycles={g: 10.0 for g in GENERATIONS[:4]},
)


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
    calibration: Any                 # 'fitted: GROUP (N anchors)', 'local: ...' or 'uncalibrated'
    interval_ms: list[float] = field(default_factory=list)
    launch_bound_share: float = 0.0
    calibration_group: str = ""
    calibration_detail: dict[str, Any] = field(default_factory=dict)
    top_layers: list[dict[str, Any]] = field(default_factory=list)
    refined_ms: float | None = None  # scaled by measurements of this bundle on this device
    refined_by: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kind: str = "predicted"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        mode = self.power_mode if self.power_mode is not None else "max"
        low, high = self.interval_ms or (self.predicted_ms, self.predicted_ms)
        lines = [
            f"PREDICTED (roofline, not measured): {self.predicted_ms:.3f} ms per batch of "
            f"{self.batch}",
            f"  on {self.device} ({self.precision}, nvpmodel {mode}); "
            f"interval {low:.3f} - {high:.3f} ms",
            f"  calibration: {self.calibration}",
            f"  {self.layers} kernels ({self.compute_bound_layers} compute-bound, "
            f"{self.memory_bound_layers} memory-bound), {self.gflops:.2f} GFLOP",
        ]
        share = round(100 * self.launch_bound_share)
        if self.launch_bound_share >= LAUNCH_BOUND_SHARE:
            lines.append(f"  this model is launch-bound on this board: {share}% of the time is "
                         "per-kernel overhead")
            lines.append("  (fewer layers help here; fewer channels or INT8 barely do)")
        else:
            lines.append(f"  per-kernel overhead: {share}% of the time")
        if self.refined_ms is not None:
            lines.append(f"  refined by {len(self.refined_by)} measurement(s) of this bundle on "
                         f"this device: {self.refined_ms:.3f} ms (predicted)")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _geomean(values: Any) -> float:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else 1.0


# ---------------------------------------------------------------- the ONNX graph
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


def _pad(channels: int, tile: int) -> int:
    return -(-channels // tile) * tile


def _conv_kind(x: list[int], w: list[int], y: list[int], groups: int) -> str:
    if groups > 1 and groups == x[1]:
        return "dwconv"
    if groups > 1:
        return "grouped"
    if w[1] <= 4:
        return "stem"
    if len(y) > 2 and math.prod(y[2:]) == 1:
        return "se"  # a 1x1-spatial conv: squeeze-excitation or a conv head
    return "conv1x1" if math.prod(w[2:]) == 1 else "conv"


def _conv(node: Any, shapes: dict[str, list[int]], bpe: int, tile: int) -> LayerCost | None:
    x, w, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
    if not (x and w and y):
        return None
    groups = _attr(node, "group", 1)
    kind = _conv_kind(x, w, y, groups)
    if kind == "dwconv":
        flops = 2.0 * _size(y) * math.prod(w[2:])
    else:
        out = y[0] * _pad(y[1], tile) * math.prod(y[2:])
        flops = 2.0 * out * _pad(w[1], tile) * math.prod(w[2:])
    rows, cols = (0, 0) if kind in CUDA_CORE_KINDS else (y[0] * math.prod(y[2:]), y[1])
    return LayerCost(node.name, node.op_type, kind, flops, float((_size(x) + _size(w) + _size(y)) * bpe),
                     rows, cols)


def _gemm(node: Any, shapes: dict[str, list[int]], bpe: int, tile: int) -> LayerCost | None:
    a, b, y = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
    if not (a and b and y):
        return None
    k = a[-1] if node.op_type == "MatMul" or not _attr(node, "transA", 0) else a[0]
    rows = _size(y) // y[-1]
    flops = 2.0 * rows * _pad(y[-1], tile) * _pad(k, tile)
    return LayerCost(node.name, node.op_type, "gemm", flops, float((_size(a) + _size(b) + _size(y)) * bpe),
                     rows, y[-1])


def _consumers(graph: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _fuse_pointwise(node: Any, owner: dict[str, tuple[str, int]], readers: dict[str, int],
                    costs: list[LayerCost], moved: int, bpe: int) -> None:
    """Fold a pointwise ``node`` into the kernel that made its input, or start a pointwise kernel."""
    sources = [owner.get(n) for n in node.input if n in owner]
    single = [owner[n] for n in node.input if n in owner and readers.get(n, 0) == 1]
    if node.op_type in EPILOGUE_OPS and any(src[0] == "mma" for src in single):
        target = next(src for src in single if src[0] == "mma")
    elif any(src[0] == "pointwise" for src in sources):
        target = next(src for src in sources if src[0] == "pointwise")
        cost = costs[target[1]]  # a chain is one kernel: it streams what the added op reads and writes
        costs[target[1]] = dataclasses.replace(cost, flops=cost.flops + moved, bytes=cost.bytes + moved * bpe)
    else:
        target = ("pointwise", len(costs))
        costs.append(LayerCost(node.name, node.op_type, "eltwise", float(moved), float(moved * bpe)))
    for name in node.output:
        owner[name] = target


def graph_costs(path: str | os.PathLike, batch: int = 1, precision: str = "fp16",
                tile: int = 1) -> list[LayerCost]:
    """One LayerCost per kernel TensorRT would launch (epilogues and pointwise chains fused)."""
    bpe = BYTES_PER_ELEMENT[precision]
    model = _load_with_batch(path, batch)
    shapes = _shapes(model)
    weights = {i.name for i in model.graph.initializer}
    readers = _consumers(model.graph)
    costs: list[LayerCost] = []
    owner: dict[str, tuple[str, int]] = {}
    for node in model.graph.node:
        moved = sum(_size(shapes.get(n)) for n in [*node.input, *node.output] if n and n not in weights)
        if node.op_type in FREE_OPS:
            continue
        if node.op_type in POINTWISE_OPS:
            _fuse_pointwise(node, owner, readers, costs, moved, bpe)
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            cost, unit = _conv(node, shapes, bpe, tile), "mma"
        elif node.op_type in ("Gemm", "MatMul"):
            cost, unit = _gemm(node, shapes, bpe, tile), "mma"
        else:
            cost, unit = LayerCost(node.name, node.op_type, "pool", float(moved), float(moved * bpe)), "other"
        if cost is not None:
            owner.update({name: (unit, len(costs)) for name in node.output})
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


def tile_for(arch: str, precision: str) -> int:
    return TILE.get((arch, precision), 1)


def calibration_group(profile: DeviceProfile, precision: str) -> str:
    return f"{profile.arch}-{precision}"


# ---------------------------------------------------------------- the model
@dataclass(frozen=True)
class Board:
    """What the latency model needs of a board at one precision and GPU clock."""

    arch: str
    precision: str
    mma_peak: float      # ops/s of the dense kernels (tensor cores, or half2 CUDA cores before Volta)
    cuda_peak: float     # ops/s of CUDA-core kernels: 4 FP16 ops per core per clock
    bandwidth_gbs: float
    gpu_mhz: float
    sms: int


def board_for(profile: DeviceProfile, precision: str, gpu_mhz: float | None = None) -> Board:
    """The profile's published SM count, clock, peaks and bandwidth at ``precision``."""
    mhz = gpu_mhz or profile.gpu_max_mhz
    peak = peak_ops(profile, precision, mhz)
    cores = profile.cuda_cores or 0
    cuda_peak = min(peak, cores * 4 * mhz * 1e6) if cores else peak
    sms = max(1, cores // CORES_PER_SM.get(profile.arch, 128))
    return Board(profile.arch, precision, peak, cuda_peak, profile.memory_bandwidth_gbs or 1.0, mhz, sms)


def wave_utilization(cost: LayerCost, sms: int) -> float:
    """Share of the SMs busy over a layer's waves of CTA_TILE output tiles (1.0 without tiles)."""
    if not cost.rows or not cost.cols:
        return 1.0
    tiles = -(-cost.rows // CTA_TILE[0]) * -(-cost.cols // CTA_TILE[1])
    return tiles / (-(-tiles // sms) * sms)


@dataclass(frozen=True)
class KernelTerms:
    """Per kernel, what does not depend on the fitted constants (arrays over the kernels)."""

    board: Board
    kinds: np.ndarray      # index into OP_KINDS
    mma: np.ndarray        # True where the kernel is a dense (MMA) kernel, False on CUDA cores
    compute_s: np.ndarray  # seconds at the unit's full peak, wave quantization included
    memory_s: np.ndarray   # seconds at the board's full DRAM bandwidth


def kernel_terms(costs: list[LayerCost], board: Board) -> KernelTerms:
    mma = np.array([c.kind not in CUDA_CORE_KINDS for c in costs])
    peaks = np.where(mma, board.mma_peak, board.cuda_peak)
    utilization = np.array([wave_utilization(c, board.sms) for c in costs])
    return KernelTerms(board, np.array([OP_KINDS.index(c.kind) for c in costs]), mma,
                       np.array([c.flops for c in costs]) / (peaks * utilization),
                       np.array([c.bytes for c in costs]) / (board.bandwidth_gbs * 1e9))


def kernel_ms(terms: KernelTerms, model: LatencyModel) -> tuple[np.ndarray, np.ndarray, float]:
    """(ms per kernel with its launch floor, compute-bound mask, launch floor ms per kernel).

    Dense kernels reach the generation's share of the peak times their kind's efficiency
    (times the INT8/FP16 ratio in INT8); CUDA-core kernels reach their kind's efficiency alone,
    which is what lets one fit hold across generations with and without tensor cores.
    """
    board = terms.board
    kind_eff = np.array([model.op_efficiency.get(k, DEFAULT_MODEL.op_efficiency[k]) for k in OP_KINDS])
    mma_eff = model.efficiency(board.arch, board.precision)
    efficiency = kind_eff[terms.kinds] * np.where(terms.mma, mma_eff, 1.0)
    compute = terms.compute_s / efficiency
    memory = terms.memory_s / model.memory_efficiency
    launch = model.launch(board.arch, board.gpu_mhz)
    return 1000.0 * np.maximum(compute, memory) + launch, compute >= memory, launch


@lru_cache(maxsize=1)
def calibration_table() -> dict[str, Any]:
    """The shipped fit (devices/predict_calibration.toml): model constants and group errors."""
    if not CALIBRATION_FILE.is_file():
        return {}
    return load_toml(CALIBRATION_FILE)


def fitted_model() -> LatencyModel:
    data = calibration_table().get("model")
    if not data:
        return DEFAULT_MODEL
    generations = data.get("generations", {})
    return LatencyModel(
        op_efficiency={**DEFAULT_MODEL.op_efficiency, **data.get("op_efficiency", {})},
        scale={g: v["scale"] for g, v in generations.items()},
        launch_kcycles={g: v["launch_kcycles"] for g, v in generations.items()},
        int8_ratio=dict(data.get("int8_ratio", {})), memory_efficiency=data.get("memory_efficiency", 0.7),
        host_overhead_ms=data.get("host_overhead_ms", 0.0),
    )


def group_calibration(group: str) -> dict[str, Any]:
    """What the shipped fit knows of ``group``: anchors and cross-validated interval (or none)."""
    entry = calibration_table().get("groups", {}).get(group)
    if not entry or not entry.get("anchors"):
        return {"label": "uncalibrated", "log_interval": UNCALIBRATED_LOG_INTERVAL,
                "source": f"no published {group} result; defaults shared from other generations"}
    return {"label": f"fitted: {group} ({entry['anchors']} published anchors)",
            "log_interval": float(entry["log_interval"]), "source": entry.get("source", "")}


# ---------------------------------------------------------------- predicting
def predict_onnx(onnx_path: str | os.PathLike, device: str | DeviceProfile, *, precision: str = "fp16",
                 power_mode: int | None = None, batch: int = 1,
                 model: LatencyModel | None = None, use_local: bool = True) -> Prediction:
    """Predict TensorRT GPU time of an ONNX graph on a device profile (labelled 'predicted')."""
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
    gpu_mhz = (mode.gpu_max_mhz if mode else None) or profile.gpu_max_mhz
    board = board_for(profile, precision, gpu_mhz)
    model = model or fitted_model()
    costs = graph_costs(onnx_path, batch, precision, tile_for(profile.arch, precision))
    times, bound, floor = kernel_ms(kernel_terms(costs, board), model)
    rows = [(c, float(ms), bool(b)) for c, ms, b in zip(costs, times, bound, strict=True)]
    total = float(times.sum())
    launch = len(rows) * floor
    group = calibration_group(profile, precision)
    calib = group_calibration(group)
    if calib["label"] == "uncalibrated":
        warnings.append(f"UNCALIBRATED: {calib['source']}; treat the number as a rough bound.")
    top = sorted(rows, key=lambda r: -r[1])[:5]
    prediction = Prediction(
        device=profile.key, precision=precision, power_mode=power_mode, batch=batch, predicted_ms=total,
        compute_bound_layers=sum(1 for *_, c in rows if c), memory_bound_layers=sum(1 for *_, c in rows if not c),
        layers=len(rows), gflops=sum(c.flops for c in costs) / 1e9, calibration=calib["label"],
        launch_bound_share=round(launch / total, 4), calibration_group=group,
        calibration_detail={"source": calib["source"], "log_interval": calib["log_interval"]},
        top_layers=[{"name": c.name, "kind": c.kind, "ms": ms, "compute_bound": cb} for c, ms, cb in top],
        warnings=warnings,
    )
    _set_interval(prediction, calib["log_interval"])
    if use_local:
        _apply_local(prediction)
    return prediction


def _set_interval(prediction: Prediction, log_interval: float) -> None:
    ms = prediction.predicted_ms
    prediction.interval_ms = [round(ms * math.exp(-log_interval), 6), round(ms * math.exp(log_interval), 6)]
    prediction.calibration_detail["log_interval"] = log_interval


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


def predict_encoder(encoder: Any, profile: str | DeviceProfile, precision: str = "fp16", batch: int = 1, *,
                    input_shape: tuple[int, int, int] = (3, 224, 224), power_mode: int | None = None,
                    use_local: bool = True) -> Prediction:
    """Predict an encoder's TensorRT latency on a profile without training or weights.

    ``encoder`` is a torch module (exported here as a graph without parameters: only shapes
    matter) or the path of an ONNX file. Cheap enough to call for every candidate of a search.
    """
    if isinstance(encoder, (str, os.PathLike)):
        return predict_onnx(encoder, profile, precision=precision, power_mode=power_mode, batch=batch,
                            use_local=use_local)
    from edge_ssl.lazy import require

    torch = require("torch", "predicting an encoder's latency")
    was_training = encoder.training
    with tempfile.TemporaryDirectory(prefix="edge-ssl-predict-") as folder:
        path = Path(folder) / "encoder.onnx"
        try:
            encoder.eval()
            with torch.no_grad():
                torch.onnx.export(encoder, torch.zeros(1, *input_shape), str(path), export_params=False,
                                  input_names=["images"], dynamic_axes={"images": {0: "batch"}},
                                  opset_version=17, dynamo=False)
        finally:
            encoder.train(was_training)
        return predict_onnx(path, profile, precision=precision, power_mode=power_mode, batch=batch,
                            use_local=use_local)


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


def _trtexec_means(measured: dict[str, Any], profile: str, batch: int) -> list[tuple[str, float]]:
    """(target, mean ms) of TensorRT runs in a bundle's device_bench results on ``profile``."""
    found = []
    for target, report in measured.items():
        env = report.get("environment", {})
        record = report.get("batches", {}).get(str(batch))
        if env.get("profile") == profile and report.get("backend") == "trtexec" and record:
            found.append((target, float(record["mean"])))
    return found


def _refine(prediction: Prediction, measured: dict[str, Any]) -> None:
    """Scale by measured/predicted from TensorRT runs of this bundle on the same device profile."""
    ratios = []
    for target, mean in _trtexec_means(measured, prediction.device, prediction.batch):
        ratios.append(mean / prediction.predicted_ms)
        prediction.refined_by.append(target)
    if ratios:
        prediction.refined_ms = prediction.predicted_ms * math.exp(sum(map(math.log, ratios)) / len(ratios))


# ---------------------------------------------------------------- a user's own measurements
def local_calibration_path() -> Path:
    """$EDGE_SSL_PREDICT_CALIBRATION, else $XDG_CONFIG_HOME/edge-ssl/predict_calibration.toml."""
    override = os.environ.get(LOCAL_CALIBRATION_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edge-ssl" / "predict_calibration.toml"


def local_measurements() -> list[dict[str, Any]]:
    path = local_calibration_path()
    if not path.is_file():
        return []
    try:
        return list(load_toml(path).get("measurement", []))
    except Exception as exc:  # a broken user file must not stop predictions: say so instead
        raise ConfigError(f"cannot read the local calibration {path}: {exc}. Fix or delete the file "
                          f"(it is rewritten by `edge-ssl predict --calibrate`).") from exc


def _local_fit(entries: list[dict[str, Any]]) -> tuple[float, float | None]:
    """(factor, log interval or None when one measurement cannot show a spread)."""
    logs = [math.log(e["measured_ms"] / e["predicted_ms"]) for e in entries]
    mean = sum(logs) / len(logs)
    spread = max(abs(v - mean) for v in logs) if len(logs) > 1 else None
    return math.exp(mean), (max(0.05, spread) if spread is not None else None)


def _apply_local(prediction: Prediction) -> None:
    entries = [e for e in local_measurements()
               if e.get("profile") == prediction.device and e.get("precision") == prediction.precision]
    if not entries:
        return
    factor, spread = _local_fit(entries)
    prediction.predicted_ms *= factor
    models = sorted({e.get("model", "?") for e in entries})
    prediction.calibration = (f"local: {len(entries)} measurement(s) of {len(models)} model(s) on "
                              f"this board ({local_calibration_path()})")
    prediction.calibration_detail["local"] = {"factor": round(factor, 4), "measurements": len(entries),
                                              "models": models}
    _set_interval(prediction, spread if spread is not None
                  else prediction.calibration_detail["log_interval"])


def _measurements_in(path: Path, precision: str | None) -> list[dict[str, Any]]:
    """(onnx, profile, precision, batch, measured_ms, model) records found in ``path``."""
    import json

    if path.suffix == ".json" and not path.name.endswith(".results.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data if isinstance(data, list) else [data]
        needed = {"onnx", "profile", "precision", "mean_ms"}
        for record in records:
            if not isinstance(record, dict) or not needed <= set(record):
                raise ConfigError(f"{path}: a measurement needs the keys {', '.join(sorted(needed))} "
                                  f"(and optionally batch); got {record!r:.120}.")
        return [{"onnx": str((path.parent / r["onnx"]).resolve()), "profile": r["profile"],
                 "precision": r["precision"], "batch": int(r.get("batch", 1)),
                 "measured_ms": float(r["mean_ms"]), "model": Path(r["onnx"]).name} for r in records]
    from edge_ssl.bundle import Bundle, read_results

    bundle_path = path.with_name(path.name[: -len(".results.json")]) if path.name.endswith(".results.json") else path
    bundle = Bundle.open(bundle_path, verify=True)
    measured = read_results(bundle).get("device_bench", {})
    found = []
    for target, report in measured.items():
        profile = report.get("environment", {}).get("profile")
        for batch, record in (report.get("batches") or {}).items():
            if report.get("backend") == "trtexec" and profile and record.get("mean"):
                found.append({"onnx": str(bundle.file("model.onnx")), "profile": profile,
                              "precision": precision or report.get("precision") or bundle.manifest.precision,
                              "batch": int(batch), "measured_ms": float(record["mean"]),
                              "model": bundle.path.name, "target": target})
    return found


def calibrate(paths: list[str | os.PathLike], precision: str | None = None) -> dict[str, Any]:
    """Fold TensorRT measurements (bundles measured with `bench --on`, their results files, or
    measurement JSONs) into the local calibration file; returns what was added, per board."""
    added = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ConfigError(f"no file or bundle at {path}; pass bundles measured with "
                              "`edge-ssl bench B.edge --on ssh://... --backend tensorrt` or measurement JSONs.")
        records = _measurements_in(path, precision)
        if not records:
            raise ConfigError(f"{path} holds no TensorRT (trtexec) measurement on a known board; measure it "
                              "with `edge-ssl bench B.edge --on ssh://... --backend tensorrt` first.")
        for record in records:
            predicted = predict_onnx(record["onnx"], record["profile"], precision=record["precision"],
                                     batch=record["batch"], use_local=False)
            added.append({**record, "predicted_ms": round(predicted.predicted_ms, 6), "source": str(path)})
    keep = [e for e in local_measurements()
            if (e.get("model"), e.get("profile"), e.get("precision"), e.get("batch"))
            not in {(a["model"], a["profile"], a["precision"], a["batch"]) for a in added}]
    target = _write_local([*keep, *added])
    boards: dict[str, Any] = {}
    for entry in [*keep, *added]:
        boards.setdefault(f"{entry['profile']} {entry['precision']}", []).append(entry)
    summary = {key: {"measurements": len(v), "factor": round(_local_fit(v)[0], 4)} for key, v in boards.items()}
    return {"written": str(target), "added": len(added), "boards": summary}


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _write_local(entries: list[dict[str, Any]]) -> Path:
    from edge_ssl.bundle import atomic_write_bytes

    lines = ["# Written by `edge-ssl predict --calibrate`: your own TensorRT measurements.",
             "# predicted_ms is the shipped model's prediction when the measurement was added;",
             "# predictions for a board and precision listed here are scaled by measured/predicted.", ""]
    fields = ("profile", "precision", "batch", "model", "measured_ms", "predicted_ms", "target", "source")
    for entry in entries:
        lines.append("[[measurement]]")
        lines += [f"{key} = {_toml_value(entry[key])}" for key in fields if entry.get(key) is not None]
        lines.append("")
    path = local_calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


def architecture_constants(profile: DeviceProfile) -> dict[str, float]:
    """The per-clock constants behind the profile's [DERIVED] peaks (for reports)."""
    return architecture(profile.arch)
