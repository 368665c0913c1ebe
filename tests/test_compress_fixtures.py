"""Shared tiny fixtures and helpers for the compression tests (no tests here; imported by test_compress_*)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TEACHER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "teachers"


def tiny_images(count: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random 32x32 RGB images (blurred noise: closer to photos than white noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 8, 8, 3)).astype(np.float32)
    images = coarse.repeat(4, axis=1).repeat(4, axis=2)
    return np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)


def tiny_dataset(count: int = 32, seed: int = 0, labeled: bool = False):
    from edge_ssl.data.sources import ImageDataset

    labels = np.arange(count) % 4 if labeled else None
    names = tuple("abcd") if labeled else None
    return ImageDataset(tiny_images(count, seed), labels, names, f"tiny{seed}")


def write_tiny_bundle(path: Path, width: float = 0.25, arch: str = "resnet18_cifar", seed: int = 0):
    import torch

    from edge_ssl.bundle import lineage_entry, write_encoder_bundle
    from edge_ssl.models import create_encoder

    torch.manual_seed(seed)
    encoder = create_encoder(arch, width=width).eval()
    with torch.no_grad():  # like a trained net: no zero-initialized residual BN scales
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    return write_encoder_bundle(path, encoder, lineage=(lineage_entry("test", {"seed": seed}),),
                                metrics={"params": sum(p.numel() for p in encoder.parameters())})


@pytest.fixture
def real_teacher() -> Path:
    path = TEACHER_DIR / "simclr_resnet18_cifar.edge"
    if not (path / "manifest.json").is_file():
        pytest.skip(f"real SSL teacher not found at {path} (see ../shared/teachers/README.md)")
    return path
