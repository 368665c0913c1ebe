"""Lazy imports for heavy or hardware-bound optional modules."""

from __future__ import annotations

import importlib
from types import ModuleType

from edge_ssl.errors import MissingDependencyError

#: How to get each optional module; shown in MissingDependencyError.
INSTALL_HINTS: dict[str, str] = {
    "onnxruntime": "pip install 'edge-ssl[cpu]' (or 'edge-ssl[gpu]' for CUDA; never both)",
    "tensorrt": "on Jetson it comes with JetPack; on x86 install NVIDIA TensorRT 10+ for your CUDA",
    "pycuda": "pip install pycuda (on Jetson: JetPack's CUDA toolkit must be on PATH)",
    "cuda": "pip install cuda-python",
    "neural_compressor": "pip install neural-compressor",
    "jtop": "pip install jetson-stats (Jetson only)",
    "torch": "pip install 'torch==2.14.1' 'torchvision==0.29.1'",
    "timm": "pip install timm",
    "onnx": "pip install onnx",
}


def require(module: str, feature: str = "") -> ModuleType:
    """Import ``module`` or raise MissingDependencyError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = INSTALL_HINTS.get(top, f"pip install {top}")
        what = f" for {feature}" if feature else ""
        raise MissingDependencyError(
            f"{module!r} is needed{what} but could not be imported ({exc}). Install it: {hint}."
        ) from exc
