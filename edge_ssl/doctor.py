"""`edge-ssl doctor`: what this machine offers edge-ssl (pluggable checks, each isolated, never raising)."""

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


CHECKS: dict[str, Callable[[], str]] = {
    "python": platform.python_version,
    "torch": _torch,
    "torchvision": _module_version("torchvision"),
    "timm": _module_version("timm"),
    "onnx": _module_version("onnx"),
    "onnxruntime": _onnxruntime,
    "tensorrt": _tensorrt,
}


def register_check(name: str, check: Callable[[], str]) -> None:
    """Add a check (e.g. the Jetson detection of ``edge_ssl.devices``) to ``run_checks``.

    The core never imports the capabilities; each registers what it can report (the
    CLI registers the Jetson check). ``check`` returns a status line; it may raise.
    """
    CHECKS[name] = check


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
