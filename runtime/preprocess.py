"""NumPy image preprocessing: uint8 NHWC -> normalized float32 NCHW (no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from edge_ssl.errors import DataError
from edge_ssl.spec import InputSpec


def as_input_spec(spec: InputSpec | Mapping[str, Any]) -> InputSpec:
    """An InputSpec from itself or from a manifest's ``encoder.input`` dict."""
    if isinstance(spec, InputSpec):
        return spec
    if isinstance(spec, Mapping):
        return InputSpec.from_dict(spec)
    raise DataError(f"expected an InputSpec or its dict; got {type(spec).__name__}.")


def preprocess_images(
    images: np.ndarray, input_spec: InputSpec | Mapping[str, Any], *, normalize: bool = True
) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H', W') resized to the spec and normalized.

    Same math as ``edge_ssl.tensors.preprocess``: scale to 0..1, antialiased bilinear resize
    only when the size differs, then ``(x - mean) / std`` unless ``normalize`` is False
    (for graphs exported with the normalization baked in).
    """
    spec = as_input_spec(input_spec)
    channels, height, width = spec.shape
    _check_images(images, channels)
    batch = images.astype(np.float32) * np.float32(1.0 / 255.0)
    if batch.shape[1:3] != (height, width):
        rows = _resize_weights(batch.shape[1], height)
        cols = _resize_weights(batch.shape[2], width)
        batch = np.einsum("yi,nijc,xj->nyxc", rows, batch, cols, optimize=True)
    batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
    if normalize:
        mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
        batch = (batch - mean) / std
    return batch.astype(np.float32, copy=False)


def _check_images(images: np.ndarray, channels: int) -> None:
    if not isinstance(images, np.ndarray):
        raise DataError(f"expected a numpy uint8 array (N, H, W, C); got {type(images).__name__}.")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
        raise DataError(
            f"expected uint8 images shaped (N, H, W, {channels}); got {images.dtype} "
            f"{tuple(images.shape)}. Stack single images with images[None] and decode to RGB."
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"expected a non-empty image batch; got shape {tuple(images.shape)}.")


@lru_cache(maxsize=32)
def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of torch's antialiased bilinear kernel (align_corners=False).

    A triangle filter stretched by the scale when downsampling (like PIL), the plain
    bilinear triangle when upsampling, each row renormalized at the borders.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi, dtype=np.float64)
        row = np.clip(1.0 - np.abs((taps - center + 0.5) * inv_scale), 0.0, None)
        total = row.sum()
        weights[i, lo:hi] = row / total if total > 0 else 0.0
    weights = weights.astype(np.float32)
    weights.setflags(write=False)  # cached and shared between calls
    return weights
