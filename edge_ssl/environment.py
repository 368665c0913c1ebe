"""Describe the machine and library versions a stage ran on (no heavy imports)."""

from __future__ import annotations

import os
import platform
import socket
import sys
from functools import lru_cache
from importlib import metadata

#: Distributions whose versions go into lineage entries and latency records.
TRACKED_PACKAGES = (
    "edge-ssl",
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (absent packages are left out); reads metadata only."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux) or platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_device_name() -> str | None:
    """The current CUDA device name if torch is already imported and sees a GPU.

    Never imports torch itself: the device-side code must stay torch-free.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(torch.cuda.current_device()))
    except Exception:  # a broken driver must not break a lineage record
        return None
    return None


def describe_environment() -> dict[str, object]:
    """A JSON-friendly record of host, OS, CPU, GPU, thread count and library versions."""
    env: dict[str, object] = {
        "host": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": package_versions(),
    }
    gpu = cuda_device_name()
    if gpu:
        env["gpu"] = gpu
    return env
