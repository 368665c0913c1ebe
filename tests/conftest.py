"""Shared fixtures: tolerances in one place, the real CIFAR subset, tiny specs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, EncoderSpec, InputSpec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = Path(os.environ.get("EDGE_SSL_CIFAR_DIR", PROJECT_ROOT.parent / "shared" / "data" / "cifar10"))

#: Tolerances used across the suite (one place, as STYLE.md asks).
ATOL = 1e-5
RTOL = 1e-4
COSINE_MIN = 0.999


@pytest.fixture
def cifar_dir() -> Path:
    if not (CIFAR_DIR / "cifar10_test.npz").is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {CIFAR_DIR} (see ../shared/data/README.md)")
    return CIFAR_DIR


@pytest.fixture
def tiny_spec() -> EncoderSpec:
    return EncoderSpec(
        arch="resnet18_cifar",
        kwargs={"width": 0.25},
        input=InputSpec(shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD),
        embed_dim=128,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip hardware-marked tests with a reason that says exactly what is missing."""
    from edge_ssl.devices.detect import detect_jetson

    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="gpu: torch.cuda.is_available() is False on this machine")
        for item in gpu_items:
            item.add_marker(skip)
    jetson_items = [item for item in items if "jetson" in item.keywords]
    if jetson_items and detect_jetson() is None and not os.environ.get("EDGE_SSL_JETSON"):
        skip = pytest.mark.skip(
            reason="jetson: not an NVIDIA Jetson (/proc/device-tree/model and /etc/nv_tegra_release)"
        )
        for item in jetson_items:
            item.add_marker(skip)
