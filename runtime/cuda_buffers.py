"""GPU identity and device buffers for TensorRT: cuda-python first, torch as a fallback."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

import numpy as np
from edge_ssl.runtime.errors import EngineError

from edge_ssl.errors import MissingDependencyError


@dataclass(frozen=True)
class GpuIdentity:
    """What an engine is bound to: the GPU (name slug) and its compute capability."""

    device: str  # slug of the CUDA device name, e.g. "orin", "nvidia-h100-80gb-hbm3"
    sm: int  # compute capability major*10 + minor, e.g. 87

    def describe(self) -> str:
        return f"{self.device} (sm{self.sm})"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (safe inside a file name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "gpu"


def load_cudart() -> Any | None:
    """cuda-python's runtime module (new or old layout), or None when not installed."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, value...)`` tuple; raise EngineError on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA call {what} failed: {getattr(err, 'name', err)} ({int(err)}).")
    return values[0] if len(values) == 1 else (values or None)


def gpu_identity(device: int = 0) -> GpuIdentity:
    """This machine's GPU via cuda-python, torch or nvidia-smi; EngineError when none answers."""
    cudart = load_cudart()
    errors = []
    if cudart is not None:
        try:
            prop = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            return GpuIdentity(device_slug(name.split("\x00")[0]), prop.major * 10 + prop.minor)
        except EngineError as exc:
            errors.append(f"cuda-python: {exc}")
    torch = _optional("torch") if cudart is None else None  # never pull torch in beside cuda-python
    if torch is not None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return GpuIdentity(device_slug(torch.cuda.get_device_name(device)), major * 10 + minor)
    smi = _nvidia_smi(device)
    if smi is not None:
        return smi
    raise EngineError(
        "no CUDA GPU found to build or run a TensorRT engine ("
        + ("; ".join(errors) or "cuda-python not installed, torch sees no GPU, no nvidia-smi")
        + "). Run on the target device, or pass its identity explicitly (--device-name/--sm)."
    )


def cuda_device_reason() -> str | None:
    """None when a GPU answers, else why not (for `edge-ssl backends`)."""
    try:
        gpu_identity()
    except EngineError as exc:
        return str(exc)
    return None


def _optional(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _nvidia_smi(device: int) -> GpuIdentity | None:
    if shutil.which("nvidia-smi") is None:
        return None
    argv = ["nvidia-smi", f"--id={device}", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
        name, cap = (part.strip() for part in out.strip().splitlines()[0].rsplit(",", 1))
        major, minor = cap.split(".")
        return GpuIdentity(device_slug(name), int(major) * 10 + int(minor))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class DeviceBuffers:
    """Input/output device memory, copies, a stream and timing for one TensorRT context."""

    def __init__(self) -> None:
        self.backend = "none"

    @staticmethod
    def create() -> DeviceBuffers:
        cudart = load_cudart()
        if cudart is not None:
            return CudartBuffers(cudart)
        torch = _optional("torch")
        if torch is not None and torch.cuda.is_available():
            return TorchBuffers(torch)
        raise MissingDependencyError(
            "running a TensorRT engine needs GPU buffers from cuda-python (pip install cuda-python; "
            "on Jetson use the wheel matching JetPack's CUDA) or from a CUDA build of torch."
        )


class CudartBuffers(DeviceBuffers):
    """cuda-python runtime: cudaMalloc'd buffers, an own stream, CUDA events for compute time."""

    def __init__(self, cudart: Any) -> None:
        super().__init__()
        self.backend = "cuda-python"
        self.cudart = cudart
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.start = _check(cudart.cudaEventCreate(), "cudaEventCreate")
        self.stop = _check(cudart.cudaEventCreate(), "cudaEventCreate")
        self.pointers: list[Any] = []

    def alloc(self, nbytes: int) -> int:
        ptr = _check(self.cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc")
        self.pointers.append(ptr)
        return int(ptr)

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream),
               "cudaMemcpyAsync(host->device)")

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(self.cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream),
               "cudaMemcpyAsync(device->host)")

    def stream_handle(self) -> int:
        return int(self.stream)

    def mark_start(self) -> None:
        _check(self.cudart.cudaEventRecord(self.start, self.stream), "cudaEventRecord")

    def mark_stop(self) -> None:
        _check(self.cudart.cudaEventRecord(self.stop, self.stream), "cudaEventRecord")

    def synchronize(self) -> float:
        """Wait for the stream; milliseconds between mark_start and mark_stop."""
        _check(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return float(_check(self.cudart.cudaEventElapsedTime(self.start, self.stop), "cudaEventElapsedTime"))

    def free(self) -> None:
        for ptr in self.pointers:
            self.cudart.cudaFree(ptr)
        self.pointers.clear()
        for event in (self.start, self.stop):
            self.cudart.cudaEventDestroy(event)
        self.cudart.cudaStreamDestroy(self.stream)


class TorchBuffers(DeviceBuffers):
    """torch CUDA tensors as raw buffers, on a dedicated torch stream."""

    def __init__(self, torch: Any) -> None:
        super().__init__()
        self.backend = "torch"
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.start = torch.cuda.Event(enable_timing=True)
        self.stop = torch.cuda.Event(enable_timing=True)
        self.tensors: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        tensor = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")
        self.tensors[tensor.data_ptr()] = tensor
        return int(tensor.data_ptr())

    def _view(self, ptr: int, nbytes: int) -> Any:
        return self.tensors[ptr][:nbytes]

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        raw = self.torch.from_numpy(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
        with self.torch.cuda.stream(self.stream):
            self._view(ptr, array.nbytes).copy_(raw, non_blocking=False)

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        with self.torch.cuda.stream(self.stream):
            data = self._view(ptr, array.nbytes).cpu().numpy()
        array.reshape(-1).view(np.uint8)[:] = data

    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def mark_start(self) -> None:
        self.start.record(self.stream)

    def mark_stop(self) -> None:
        self.stop.record(self.stream)

    def synchronize(self) -> float:
        self.stream.synchronize()
        return float(self.start.elapsed_time(self.stop))

    def free(self) -> None:
        self.tensors.clear()
