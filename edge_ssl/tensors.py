"""Turn uint8 NHWC image arrays into normalized float NCHW tensors for an encoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_ssl.errors import DataError
from edge_ssl.spec import InputSpec

if TYPE_CHECKING:
    import torch


def images_to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in 0..1 on ``device``."""
    import torch

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"expected uint8 images shaped (N, H, W, 3); got {images.dtype} {tuple(images.shape)}."
        )
    batch = to_device(torch.from_numpy(np.ascontiguousarray(images)), device)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """``tensor.to(device)`` without making the host wait for the GPU.

    A copy from pageable host memory to a GPU waits for every kernel already queued on the
    stream; staged in pinned memory and copied with ``non_blocking``, it does not (torch's
    caching host allocator keeps the pinned buffer alive until the copy is done).
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def normalize(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """(x - mean) / std per channel, for a float batch in 0..1."""
    mean = batch.new_tensor(spec.mean).view(1, -1, 1, 1)
    std = batch.new_tensor(spec.std).view(1, -1, 1, 1)
    return (batch - mean) / std


def preprocess(
    images: np.ndarray, spec: InputSpec, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Deterministic eval transform of uint8 images: resize to the spec's size (antialiased)
    and normalize."""
    return eval_transform(images_to_tensor(images, device), spec)


def eval_transform(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """:func:`preprocess` for a float (N, 3, H, W) batch in 0..1 already on its device; new tensor."""
    import torch.nn.functional as F

    height, width = spec.shape[1], spec.shape[2]
    if batch.shape[-2:] != (height, width):
        batch = F.interpolate(
            batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    return normalize(batch, spec)
