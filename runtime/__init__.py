"""edge_ssl.runtime: ONNX export, runners (torch, onnxruntime, TensorRT) and latency measurement.

Importing this package loads nothing heavy (no torch, onnx, onnxruntime or tensorrt):
submodules import them inside the functions that need them. The common names resolve
lazily, e.g. ``from edge_ssl.runtime import open_runner``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "preprocess_images": "preprocess",
    "latency_summary": "stats",
    "Runner": "runner",
    "TensorSpec": "runner",
    "open_runner": "backends",
    "available_backends": "backends",
    "RunnerError": "errors",
    "ParityError": "errors",
    "EngineError": "errors",
    "OrtRunner": "ort",
    "TorchRunner": "torch_runner",
    "TensorRTRunner": "tensorrt",
    "embed_with_runner": "embed",
    "benchmark": "bench",
    "bench_bundle": "bench",
    "BenchReport": "bench",
    "compare_runners": "compare",
    "Comparison": "compare",
    "export_encoder_onnx": "export",
    "export_bundle": "export",
    "check_parity": "export",
    "ParityReport": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_ssl.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edge_ssl.runtime.{module}"), name)
