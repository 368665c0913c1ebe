"""TensorRT: engine names bound to GPU and version, build (TRT 10/11), refit, and the runner."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from edge_ssl.runtime.cuda_buffers import (
    DeviceBuffers,
    GpuIdentity,
    cuda_device_reason,
    gpu_identity,
)
from edge_ssl.runtime.errors import EngineError, RunnerError
from edge_ssl.runtime.runner import Runner, TensorSpec

from edge_ssl.lazy import require
from edge_ssl.spec import InputSpec

__all__ = [
    "BuildSettings", "EngineBuild", "EngineName", "TensorRTRunner", "build_engine",
    "cuda_device_reason", "engine_file_name", "find_engine", "fold_batchnorm", "parse_engine_name",
    "refit_engine", "tensorrt_version",
]

ENGINE_DIR = "engines"
ENGINE_PRECISIONS = ("fp32", "fp16", "int8", "best")
_NAME = re.compile(
    r"^(?P<device>[a-z0-9-]+)_sm(?P<sm>\d+)_trt(?P<trt>\d+(?:\.\d+)*)_(?P<precision>[a-z0-9]+)"
    r"(?:_dla(?P<dla>\d+))?\.plan$"
)


# ---------------------------------------------------------------- names and compatibility
@dataclass(frozen=True)
class EngineName:
    """What an engine file name records: device, compute capability, TensorRT version, precision."""

    device: str
    sm: int
    trt: str
    precision: str
    dla_core: int | None = None

    def file_name(self) -> str:
        dla = f"_dla{self.dla_core}" if self.dla_core is not None else ""
        return f"{self.device}_sm{self.sm}_trt{self.trt}_{self.precision}{dla}.plan"

    def mismatch(self, here: GpuIdentity, trt: str) -> str | None:
        """Why this engine cannot run on ``here`` with TensorRT ``trt`` (None when it can)."""
        problems = []
        if self.sm != here.sm:
            problems.append(f"GPU compute capability sm{self.sm}, this GPU is sm{here.sm}")
        elif self.device != here.device:
            problems.append(f"GPU {self.device!r}, this GPU is {here.device!r}")
        if _trt_key(self.trt) != _trt_key(trt):
            problems.append(f"TensorRT {self.trt}, this machine has TensorRT {trt}")
        return "; ".join(problems) or None


def _trt_key(version: str) -> tuple[str, ...]:
    # Plans are tied to major.minor.patch; the build number (4th field) does not matter.
    return tuple(version.split(".")[:3])


def engine_file_name(device: str, sm: int, trt: str, precision: str,
                     dla_core: int | None = None) -> str:
    """``engines/<device>_sm<cc>_trt<version>_<precision>[_dla<N>].plan`` (bundle-relative)."""
    from edge_ssl.runtime.cuda_buffers import device_slug

    if precision not in (*ENGINE_PRECISIONS, "mixed"):
        raise EngineError(f"engine precision must be one of {', '.join(ENGINE_PRECISIONS)}; got {precision!r}.")
    name = EngineName(device_slug(device), int(sm), _short_version(trt), precision, dla_core)
    return f"{ENGINE_DIR}/{name.file_name()}"


def _short_version(version: str) -> str:
    return ".".join(str(version).split(".")[:3])


def parse_engine_name(path: str | os.PathLike) -> EngineName:
    """EngineName from a file name; EngineError for a name edge-ssl did not write."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise EngineError(
            f"{Path(path).name!r} is not an edge-ssl engine name (<device>_sm<cc>_trt<version>_"
            "<precision>.plan); its GPU and TensorRT version are unknown, so it is not opened. "
            "Build it with `edge-ssl build`."
        )
    dla = match["dla"]
    return EngineName(match["device"], int(match["sm"]), match["trt"], match["precision"],
                      int(dla) if dla is not None else None)


def tensorrt_version() -> str | None:
    """The installed TensorRT version from package metadata (TensorRT itself is not imported)."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs", "tensorrt-libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_engine_compatible(path: str | os.PathLike, here: GpuIdentity | None = None,
                            trt: str | None = None) -> EngineName:
    """Refuse an engine built for another GPU or TensorRT version, before TensorRT sees it."""
    name = parse_engine_name(path)
    here = here or gpu_identity()
    trt = trt or tensorrt_version() or _imported_trt_version()
    why = name.mismatch(here, trt)
    if why:
        raise EngineError(
            f"engine {Path(path).name} was built for {why}. TensorRT plans are not portable "
            "across GPUs or TensorRT versions; rebuild it here with `edge-ssl build` "
            "(or `edge-ssl deploy`, which builds on the device)."
        )
    return name


def _imported_trt_version() -> str:
    return str(require("tensorrt", "TensorRT engines").__version__)


def find_engine(bundle: Any, precision: str | None = None, here: GpuIdentity | None = None,
                trt: str | None = None) -> Path:
    """The bundle's engine that runs on this GPU and TensorRT; EngineError listing the others."""
    engines = sorted(n for n in bundle.manifest.files if n.startswith(f"{ENGINE_DIR}/") and n.endswith(".plan"))
    if not engines:
        raise EngineError(f"bundle {bundle.path} has no TensorRT engine; build one with `edge-ssl build`.")
    if trt is None:
        trt = tensorrt_version()
        if trt is None:
            raise EngineError("TensorRT is not installed here (see `edge-ssl backends`).")
    here = here or gpu_identity()
    reasons = []
    for rel in engines:
        try:
            name = parse_engine_name(rel)
        except EngineError as exc:
            reasons.append(str(exc))
            continue
        why = name.mismatch(here, trt)
        if why is None and precision not in (None, name.precision):
            why = f"precision {name.precision}, asked for {precision}"
        if why is None:
            return bundle.file(rel)
        reasons.append(f"{rel}: built for {why}")
    raise EngineError(
        f"no engine in {bundle.path} runs on {here.describe()} with TensorRT {trt}: "
        + "; ".join(reasons) + ". Rebuild here with `edge-ssl build`."
    )


# ---------------------------------------------------------------- build
@dataclass(frozen=True)
class BuildSettings:
    """How to build an engine (validated before TensorRT is touched)."""

    precision: str = "fp16"
    workspace_mb: int | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    refit: bool = False
    optimization_level: int = 3
    batch: tuple[int, int, int] = (1, 8, 32)  # min, opt, max of the dynamic batch axis
    graph_precision: str = "fp32"  # what the ONNX graph holds: fp32, fp16 or int8 (QDQ)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch", tuple(int(b) for b in self.batch))
        if self.precision not in ENGINE_PRECISIONS:
            raise EngineError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}; got {self.precision!r}.")
        if self.graph_precision not in ("fp32", "fp16", "int8", "mixed"):
            raise EngineError(f"graph_precision must be fp32, fp16, int8 or mixed; got {self.graph_precision!r}.")
        if not 0 <= self.optimization_level <= 5:
            raise EngineError(f"builder optimization level must be 0..5 (default 3); got {self.optimization_level}.")
        if len(self.batch) != 3 or not 1 <= self.batch[0] <= self.batch[1] <= self.batch[2]:
            raise EngineError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max; got {self.batch}.")
        if self.workspace_mb is not None and self.workspace_mb < 1:
            raise EngineError(f"workspace must be >= 1 MiB; got {self.workspace_mb}.")
        if self.dla_core is not None and self.dla_core < 0:
            raise EngineError(f"DLA core must be >= 0; got {self.dla_core}.")
        if self.dla_core is not None and self.precision == "fp32":
            raise EngineError("DLA runs FP16 or INT8 only; build with --precision fp16 or int8.")
        if self.precision == "int8" and self.graph_precision != "int8":
            raise EngineError(
                "INT8 engines are built from explicitly quantized (QDQ) graphs; this graph is "
                f"{self.graph_precision}. Quantize first (`edge-ssl quantize`), or use --precision fp16."
            )


@dataclass
class EngineBuild:
    """The result of a build: where, which TensorRT, which settings, DLA fallbacks, timing."""

    path: Path
    trt_version: str
    gpu: dict[str, Any]
    settings: dict[str, Any]
    strongly_typed: bool
    flags: list[str]
    dla_fallback_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tool: str = "python"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _precision_flags(trt: Any, settings: BuildSettings) -> tuple[bool, list[str]]:
    """(strongly_typed, builder flag names) for this TensorRT and these settings.

    TensorRT 11 removed the weak-typing flags: the graph carries the precision, so the
    network is strongly typed and the requested precision must match the graph's.
    TensorRT 10 uses FP16/INT8 flags, or strong typing for an FP16 graph.
    """
    has_flags = hasattr(trt.BuilderFlag, "FP16") and _major(trt) < 11
    if not has_flags:
        wanted = {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}.get(settings.precision)
        if wanted is not None and wanted != settings.graph_precision:
            raise EngineError(
                f"TensorRT {trt.__version__} builds strongly typed networks: the precision comes from "
                f"the graph, which is {settings.graph_precision}, not {settings.precision}. Export with "
                "--fp16 for FP16, quantize for INT8, or use --precision best to take the graph as is."
            )
        return True, []
    if settings.graph_precision == "fp16":
        if settings.precision not in ("fp16", "best"):
            raise EngineError(
                f"the graph was exported in FP16 (strongly typed); build it with --precision fp16 "
                f"or best, not {settings.precision}, or export without --fp16."
            )
        return True, []
    flags = {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"], "best": ["FP16", "INT8"]}
    return False, flags[settings.precision]


def _network(trt: Any, builder: Any, strongly_typed: bool) -> Any:
    """Explicit batch (a flag before TensorRT 10, the default after); strong typing is
    a flag in TensorRT 10 and always on in 11."""
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    major = _major(trt)
    if major < 10:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed and major < 11 and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return builder.create_network(flags)


def _parse_onnx(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(
            f"TensorRT's ONNX parser rejected {onnx_path}: " + " | ".join(errors or ["no details"])
            + ". Re-export with the default opset 17, or check the op is supported by this TensorRT."
        )


def _configure(trt: Any, builder: Any, network: Any, settings: BuildSettings,
               flags: list[str]) -> tuple[Any, list[str]]:
    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if settings.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if settings.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if hasattr(config, "builder_optimization_level"):  # TensorRT >= 8.6
        config.builder_optimization_level = settings.optimization_level
    _add_profile(builder, network, config, settings.batch)
    fallback: list[str] = []
    if settings.dla_core is not None:
        fallback = _configure_dla(trt, builder, network, config, settings)
    return config, fallback


def _add_profile(builder: Any, network: Any, config: Any, batch: tuple[int, int, int]) -> None:
    tensor = network.get_input(0)
    shape = tuple(tensor.shape)
    if shape and shape[0] == -1:
        profile = builder.create_optimization_profile()
        dims = [tuple([b, *shape[1:]]) for b in batch]
        profile.set_shape(tensor.name, *dims)
        config.add_optimization_profile(profile)


def _configure_dla(trt: Any, builder: Any, network: Any, config: Any, settings: BuildSettings) -> list[str]:
    cores = int(getattr(builder, "num_DLA_cores", 0))
    if settings.dla_core >= cores:
        raise EngineError(
            f"DLA core {settings.dla_core} requested but this device has {cores} DLA core(s) "
            "(Orin Nano has none; AGX Orin/Xavier have 2). Leave --dla out to build for the GPU."
        )
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = settings.dla_core
    if settings.gpu_fallback:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    fallback = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not config.can_run_on_DLA(layer):
            fallback.append(layer.name)
    if fallback and not settings.gpu_fallback:
        raise EngineError(
            f"{len(fallback)} layer(s) cannot run on the DLA ({', '.join(fallback[:5])}...) and GPU "
            "fallback is off; allow it or build for the GPU."
        )
    return fallback


def _timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    from edge_ssl.bundle import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, bytes(config.get_timing_cache().serialize()))


def build_engine(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: BuildSettings | None = None,
    *,
    timing_cache: str | os.PathLike | None = None,
    verbose: bool = False,
) -> EngineBuild:
    """Build an engine from ONNX with the TensorRT Python API into ``out_dir``.

    The file is named by :func:`engine_file_name` (``out_dir/engines/...plan``); a persistent
    ``timing_cache`` file is read and updated. Works on TensorRT 10 and 11.
    """
    settings = settings or BuildSettings()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise EngineError(f"ONNX file {onnx_path} does not exist.")
    trt = require("tensorrt", "building TensorRT engines")
    here = gpu_identity()
    strongly_typed, flags = _precision_flags(trt, settings)
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _network(trt, builder, strongly_typed)
    _parse_onnx(trt, network, logger, onnx_path)
    config, fallback = _configure(trt, builder, network, settings, flags)
    cache_path = Path(timing_cache) if timing_cache else None
    _timing_cache(config, cache_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            f"TensorRT {trt.__version__} failed to build {onnx_path} ({settings}); rerun with "
            "--verbose for the builder log (a too small --workspace is a common cause)."
        )
    _save_timing_cache(config, cache_path)
    rel = engine_file_name(here.device, here.sm, str(trt.__version__), settings.precision, settings.dla_core)
    target = out_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    from edge_ssl.bundle import atomic_write_bytes

    atomic_write_bytes(target, bytes(serialized))
    return EngineBuild(
        path=target, trt_version=str(trt.__version__), gpu=asdict(here), settings=asdict(settings),
        strongly_typed=strongly_typed, flags=flags + (["REFIT"] if settings.refit else []),
        dla_fallback_layers=fallback, seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------- refit
def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, mean: np.ndarray, var: np.ndarray,
                   gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight/bias with a following BatchNorm folded in, as the engine holds them.

    w' = w * gamma / sqrt(var + eps) (per output channel); b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    """
    scale = (np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps))
    w = np.asarray(weight, np.float64)
    if w.shape[0] != scale.shape[0]:
        raise EngineError(f"BatchNorm has {scale.shape[0]} channels, the conv has {w.shape[0]} outputs.")
    b = np.zeros_like(scale) if bias is None else np.asarray(bias, np.float64)
    folded_w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    folded_b = (b - np.asarray(mean, np.float64)) * scale + np.asarray(beta, np.float64)
    return folded_w.astype(np.float32), folded_b.astype(np.float32)


@dataclass(frozen=True)
class RefitReport:
    path: Path
    refitted: int
    source: str
    seconds: float


def refit_engine(
    engine_path: str | os.PathLike,
    new_weights: Mapping[str, np.ndarray] | str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
) -> RefitReport:
    """Update a REFIT engine's weights without a rebuild; write it to ``out`` (default: in place, atomically).

    ``new_weights``: an ONNX file exported like the engine's (same graph, new weights; BN
    folded by export) or ``{weight name: array}`` with names from the engine (BN already
    folded, see :func:`fold_batchnorm`).
    """
    engine_path = Path(engine_path)
    check_engine_compatible(engine_path)
    trt = require("tensorrt", "refitting TensorRT engines")
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = _deserialize(trt, logger, engine_path)
    if not getattr(engine, "refittable", False):
        raise EngineError(f"{engine_path.name} was built without REFIT; rebuild it with `edge-ssl build --refit`.")
    refitter = trt.Refitter(engine, logger)
    if isinstance(new_weights, Mapping):
        count, source = _set_named_weights(trt, refitter, new_weights), "named weights"
    else:
        count, source = _refit_from_onnx(trt, refitter, logger, Path(new_weights)), str(new_weights)
    missing = list(refitter.get_missing_weights())
    if missing:
        raise EngineError(
            f"refit of {engine_path.name} needs these weights too: {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}. Pass every weight of the changed layers."
        )
    if not refitter.refit_cuda_engine():
        raise EngineError(f"TensorRT refused to refit {engine_path.name}; the new weights do not fit.")
    from edge_ssl.bundle import atomic_write_bytes

    target = Path(out) if out else engine_path
    atomic_write_bytes(target, bytes(engine.serialize()))
    return RefitReport(target, count, source, time.perf_counter() - start)


def _set_named_weights(trt: Any, refitter: Any, weights: Mapping[str, np.ndarray]) -> int:
    known = set(refitter.get_all_weights())
    unknown = sorted(set(weights) - known)
    if unknown:
        raise EngineError(
            f"the engine has no refittable weights named {', '.join(unknown[:5])}; it has "
            f"{len(known)} (e.g. {', '.join(sorted(known)[:5])})."
        )
    for name, array in weights.items():
        data = np.ascontiguousarray(array, dtype=np.float32)
        if not refitter.set_named_weights(name, trt.Weights(data)):
            raise EngineError(f"TensorRT rejected weights {name!r} with shape {data.shape}.")
    return len(weights)


def _refit_from_onnx(trt: Any, refitter: Any, logger: Any, onnx_path: Path) -> int:
    if not onnx_path.is_file():
        raise EngineError(f"ONNX file {onnx_path} with the new weights does not exist.")
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = [str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
        raise EngineError(f"cannot refit from {onnx_path}: {' | '.join(errors) or 'no details'}.")
    return len(list(refitter.get_all_weights()))


def _deserialize(trt: Any, logger: Any, path: Path, dla_core: int | None = None) -> Any:
    runtime = trt.Runtime(logger)
    if dla_core is not None:
        runtime.DLA_core = dla_core
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineError(
            f"TensorRT could not deserialize {path} ({path.stat().st_size} bytes): the file is "
            "truncated or corrupt. Rebuild it with `edge-ssl build`."
        )
    return engine


# ---------------------------------------------------------------- runner
class TensorRTRunner(Runner):
    """Runs a serialized engine with the TensorRT Python API (execute_async_v3).

    The engine's name is checked against this GPU and TensorRT version before TensorRT
    loads it. Buffers come from cuda-python (or torch) and are sized for the profile's max batch.
    """

    backend = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, *, input_spec: InputSpec | None = None,
                 check_compatibility: bool = True) -> None:
        self.path = Path(engine_path)
        super().__init__(f"tensorrt[{self.path.stem}]")
        self.input_spec = input_spec
        self.check_compatibility = check_compatibility

    def _activate(self) -> None:
        if not self.path.is_file():
            raise EngineError(f"engine {self.path} does not exist; build it with `edge-ssl build`.")
        name = check_engine_compatible(self.path) if self.check_compatibility else parse_engine_name(self.path)
        trt = require("tensorrt", "running TensorRT engines")
        self.buffers = DeviceBuffers.create()
        self.engine = _deserialize(trt, trt.Logger(trt.Logger.WARNING), self.path, name.dla_core)
        self.context = self.engine.create_execution_context()
        self._bind_io(trt)
        self._info.update({
            "path": str(self.path), "precision": name.precision, "providers": ["tensorrt"],
            "device": f"{name.device} sm{name.sm}" + (f" DLA{name.dla_core}" if name.dla_core is not None else ""),
            "normalization": "outside", "versions": {"tensorrt": str(trt.__version__)},
            "buffers": self.buffers.backend,
        })

    def _bind_io(self, trt: Any) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or not outputs:
            raise EngineError(f"{self.path.name}: expected one input and an output; got inputs {inputs}, outputs {outputs}.")
        self._in_name, self._out_name = inputs[0], outputs[0]
        shape = tuple(self.engine.get_tensor_shape(self._in_name))
        dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self._in_name)))
        self._specs = (TensorSpec(self._in_name, tuple(d if d > 0 else None for d in shape), dtype.name),)
        max_batch = shape[0] if shape[0] > 0 else int(self.engine.get_tensor_profile_shape(self._in_name, 0)[2][0])
        self.batch_limit = max_batch
        out_shape = tuple(self.engine.get_tensor_shape(self._out_name))
        self._out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self._out_name)))
        per_sample_out = int(np.prod([d for d in out_shape[1:]]))
        self._in_ptr = self.buffers.alloc(max_batch * int(np.prod(shape[1:])) * dtype.itemsize)
        self._out_ptr = self.buffers.alloc(max_batch * per_sample_out * self._out_dtype.itemsize)
        self._out_trailing = out_shape[1:]
        self._io_bytes = max_batch * (int(np.prod(shape[1:])) * dtype.itemsize + per_sample_out * self._out_dtype.itemsize)
        self.context.set_tensor_address(self._in_name, self._in_ptr)
        self.context.set_tensor_address(self._out_name, self._out_ptr)

    def device_memory_mb(self) -> float | None:
        if not self.is_active:
            return None
        size = getattr(self.engine, "device_memory_size_v2", None) or getattr(self.engine, "device_memory_size", 0)
        return round((int(size) + self._io_bytes) / 2**20, 1)

    def _deactivate(self) -> None:
        self.context = None
        self.engine = None
        self.buffers.free()

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self.batch_limit is not None and n > self.batch_limit:
            raise RunnerError(
                f"{self.name}: batch {n} exceeds the engine's max batch {self.batch_limit}; split the "
                "batch or rebuild with a larger --max-batch."
            )
        if not self.context.set_input_shape(self._in_name, batch.shape):
            raise RunnerError(f"{self.name}: TensorRT rejected input shape {batch.shape}.")
        out = np.empty((n, *self._out_trailing), dtype=self._out_dtype)
        self.buffers.to_device(self._in_ptr, np.ascontiguousarray(batch))
        self.buffers.mark_start()
        if not self.context.execute_async_v3(self.buffers.stream_handle()):
            raise RunnerError(f"{self.name}: execute_async_v3 failed (see the TensorRT log).")
        self.buffers.mark_stop()
        self.buffers.to_host(out, self._out_ptr)
        self.last_compute_ms = self.buffers.synchronize()
        return out if out.dtype == np.float32 else out.astype(np.float32)
