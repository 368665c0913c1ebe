"""`edge-ssl doctor`: what this machine offers edge-ssl (each check isolated, never raising)."""

from __future__ import annotations

import importlib
import platform
from collections.abc import Callable
from typing import Any


def _torch() -> str:
    import torch

    cuda = (
        f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
        + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available()
        else "no CUDA GPU visible"
    )
    return f"{torch.__version__} ({cuda})"


def _onnxruntime() -> str:
    import onnxruntime

    return f"{onnxruntime.__version__}, providers: {', '.join(onnxruntime.get_available_providers())}"


def _tensorrt() -> str:
    import tensorrt

    return str(tensorrt.__version__)


def _module_version(name: str) -> Callable[[], str]:
    def check() -> str:
        return str(importlib.import_module(name).__version__)

    return check


def _jetson() -> str:
    from edge_ssl.devices.detect import detect_jetson

    info = detect_jetson()
    if info is None:
        return "not a Jetson"
    return f"{info.model}, L4T {info.l4t or '?'}, JetPack {info.jetpack or '?'}"


CHECKS: dict[str, Callable[[], str]] = {
    "python": platform.python_version,
    "torch": _torch,
    "torchvision": _module_version("torchvision"),
    "timm": _module_version("timm"),
    "kornia": _module_version("kornia"),
    "onnx": _module_version("onnx"),
    "onnxruntime": _onnxruntime,
    "tensorrt": _tensorrt,
    "jetson": _jetson,
}


def run_checks() -> dict[str, Any]:
    """Each component's version/status, or why it is unavailable."""
    results: dict[str, Any] = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check()
        except ImportError as exc:
            results[name] = f"not installed ({exc.name or exc})"
        except Exception as exc:  # a broken driver is a finding, not a crash
            results[name] = f"error: {type(exc).__name__}: {exc}"
    return results
