"""onnxruntime backend: CPU, CUDA and TensorRT execution providers behind the Runner protocol."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edge_ssl.runtime.errors import ProviderFallbackWarning, RunnerError
from edge_ssl.runtime.runner import Runner, TensorSpec

from edge_ssl.lazy import require
from edge_ssl.spec import InputSpec

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}
_BACKEND_PROVIDERS = {
    "ort": ("CPUExecutionProvider",),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
              "tensor(int8)": "int8", "tensor(double)": "float64"}
#: Metadata keys export writes into the graph (read back by runners).
META_NORMALIZATION = "edge_ssl.normalization"
META_PRECISION = "edge_ssl.precision"


def providers_for_backend(key: str) -> list[str]:
    """The provider list a backend name stands for (ort, ort-cuda, ort-tensorrt)."""
    return list(_BACKEND_PROVIDERS.get(key, _BACKEND_PROVIDERS["ort"]))


def normalize_providers(providers: Sequence[str] | None) -> list[str]:
    """Full provider names from full names or short aliases (cpu, cuda, tensorrt)."""
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in (providers or ["cpu"])]
    if not names:
        raise RunnerError("provider list is empty; pass at least one, e.g. ['cpu'].")
    return list(dict.fromkeys(names))


class OrtRunner(Runner):
    """Runs an ONNX file with onnxruntime (works on bare quantized graphs too).

    ``threads``/``inter_op_threads`` set the session's thread pools; ``provider_options``
    maps a provider name to its options. When onnxruntime drops a requested provider
    (onnxruntime-gpu does so silently when CUDA/cuDNN/TensorRT libraries are missing) a
    ProviderFallbackWarning is raised as a warning, or a RunnerError with ``strict_providers``.
    """

    backend = "ort"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        *,
        input_spec: InputSpec | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        inter_op_threads: int | None = None,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
        precision: str | None = None,
        strict_providers: bool = False,
        name: str | None = None,
    ) -> None:
        self.requested = normalize_providers(providers)
        super().__init__(name or f"ort[{','.join(p.removesuffix('ExecutionProvider') for p in self.requested)}]")
        self.path = Path(onnx_path)
        self.input_spec = input_spec
        self.threads = _check_threads("threads", threads)
        self.inter_op_threads = _check_threads("inter_op_threads", inter_op_threads)
        self.provider_options = {PROVIDER_ALIASES.get(k.lower(), k): dict(v)
                                 for k, v in (provider_options or {}).items()}
        self.precision = precision
        self.strict_providers = strict_providers
        self.session: Any = None

    def _activate(self) -> None:
        ort = require("onnxruntime", "the onnxruntime backend")
        _check_file(self.path)
        available = list(ort.get_available_providers())
        missing = [p for p in self.requested if p not in available]
        if missing:
            raise RunnerError(
                f"onnxruntime {ort.__version__} has no {', '.join(missing)} (available: "
                f"{', '.join(available)}). For CUDA/TensorRT install onnxruntime-gpu instead of "
                "onnxruntime (never both), or run with --backend ort (CPU)."
            )
        self.session = self._new_session(ort)
        self._check_fallback(self.session.get_providers())
        self._specs = tuple(_spec_of(i) for i in self.session.get_inputs())
        self._check_against_input_spec()
        self._input = self._specs[0].name if self._specs else ""
        self._outputs = [o.name for o in self.session.get_outputs()[:1]]
        self._run = self.session.run
        self._info.update(self._describe(ort))

    def _new_session(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.inter_op_threads:
            options.inter_op_num_threads = self.inter_op_threads
        providers = [(p, self.provider_options.get(p, {})) for p in self.requested]
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped pybind errors
            raise RunnerError(_load_failure(self.path, exc)) from None

    def _check_fallback(self, actual: Sequence[str]) -> None:
        dropped = [p for p in self.requested if p not in actual]
        self._info["providers"] = list(actual)
        self._info["requested_providers"] = list(self.requested)
        self._info["fallback"] = dropped
        if not dropped:
            return
        message = (
            f"onnxruntime DROPPED the requested provider(s) {', '.join(dropped)} for {self.path} "
            f"and runs on {', '.join(actual)} instead. Usually CUDA, cuDNN or TensorRT libraries "
            "are missing or do not match this onnxruntime-gpu build; check `edge-ssl backends` "
            "and LD_LIBRARY_PATH. Latency measured now is NOT the requested provider's."
        )
        if self.strict_providers:
            self.session = None
            raise RunnerError(message)
        warnings.warn(message, ProviderFallbackWarning, stacklevel=3)

    def _check_against_input_spec(self) -> None:
        if self.input_spec is None or len(self._specs) != 1:
            return
        want = tuple(self.input_spec.shape)
        got = self._specs[0].shape[1:]
        if len(got) != 3 or any(g is not None and g != w for g, w in zip(got, want, strict=False)):
            raise RunnerError(
                f"{self.path} does not fit its bundle: the graph input is {self._specs[0].describe()}, "
                f"the manifest says (N, {', '.join(map(str, want))}). The ONNX file belongs to another "
                "model; re-export the bundle with `edge-ssl export`."
            )

    def _describe(self, ort: Any) -> dict[str, Any]:
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        return {
            "path": str(self.path),
            "precision": self.precision or meta.get(META_PRECISION, "fp32"),
            "normalization": meta.get(META_NORMALIZATION, "outside"),
            "threads": self.threads,
            "inter_op_threads": self.inter_op_threads,
            "versions": {"onnxruntime": ort.__version__},
            "device": "cuda" if any(p != "CPUExecutionProvider" for p in self.session.get_providers()) else "cpu",
        }

    def _deactivate(self) -> None:
        self.session = None
        self._run = None

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self._run(self._outputs, {self._input: batch})[0]
        self.last_compute_ms = (time.perf_counter() - start) * 1000.0
        return out if out.dtype == np.float32 else out.astype(np.float32)


def _check_threads(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise RunnerError(f"{name} must be a positive integer or None (onnxruntime default); got {value!r}.")
    return value


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise RunnerError(f"ONNX file {path} does not exist; export the bundle first (`edge-ssl export`).")


def _load_failure(path: Path, exc: BaseException) -> str:
    size = path.stat().st_size if path.exists() else 0
    head = path.read_bytes()[:8] if size else b""
    return (
        f"onnxruntime cannot load {path} ({size} bytes, starts with {head!r}): "
        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. "
        "The file is truncated, not an ONNX model, or uses operators this onnxruntime lacks; "
        "re-export it with `edge-ssl export`."
    )


def _spec_of(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in node.shape)
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        raise RunnerError(f"graph input {node.name!r} has type {node.type}; edge-ssl feeds float tensors.")
    return TensorSpec(node.name, shape, dtype)
