"""CIFAR-10-C style image corruptions (Hendrycks & Dietterich 2019) in numpy and Pillow."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

from edge_ssl.errors import ConfigError, DataError
from edge_ssl.registry import did_you_mean

#: Per-severity parameters of the CIFAR-10-C generator (``make_cifar_c.py`` of
#: Hendrycks & Dietterich, ICLR 2019), which are already the 32x32 values; for larger
#: images the blur radius scales with the image side (see :func:`_defocus_kernel`).
SEVERITY_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std of N(0, c) on 0..1 pixels
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),  # radius, alias sigma
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the per-channel mean
    "jpeg_compression": (80, 65, 58, 50, 40),  # Pillow JPEG quality
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
}
CORRUPTIONS = tuple(SEVERITY_PARAMS)
_CIFAR_SIDE = 32


def corrupt(images: np.ndarray, name: str, severity: int = 5, *, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 (N, H, W, 3) RGB images with ``name`` at ``severity`` 1..5; new array.

    Deterministic for a given ``seed`` (only the noise draws random numbers).
    """
    images = _check_images(images)
    if name not in SEVERITY_PARAMS:
        raise ConfigError(
            f"unknown corruption {name!r}.{did_you_mean(name, CORRUPTIONS)} "
            f"Valid corruptions: {', '.join(CORRUPTIONS)}."
        )
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ConfigError(f"corruption severity must be an integer 1..5; got {severity!r}.")
    if len(images) == 0:
        return images.copy()
    param = SEVERITY_PARAMS[name][severity - 1]
    return _FUNCTIONS[name](images, param, np.random.default_rng(seed))


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"corruptions expect uint8 RGB images shaped (N, H, W, 3); got {images.dtype} "
            f"{tuple(images.shape)}. Load images through edge_ssl.data, which yields that layout."
        )
    return images


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _gaussian_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    return _to_uint8(x + rng.normal(0.0, std, size=x.shape).astype(np.float32))


def _contrast(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return _to_uint8((x - means) * factor + means)


def _brightness(images: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    """HSV value + ``shift`` (clipped), hue and saturation kept: RGB scales by v'/v."""
    x = images.astype(np.float32) / 255.0
    value = x.max(axis=-1, keepdims=True)
    new_value = np.minimum(value + shift, 1.0)
    scale = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    out = np.where(value > 0, x * scale, new_value)  # black pixels have no hue: they turn grey
    return _to_uint8(out)


def _jpeg(images: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def _gaussian_kernel_1d(sigma: float, size: int = 3) -> np.ndarray:
    half = size // 2
    grid = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-(grid**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _defocus_kernel(radius: float, alias_sigma: float, side: int) -> np.ndarray:
    """An aliased disk of ``radius`` (scaled from 32 px to ``side``) smoothed by a 3x3 Gaussian."""
    radius = radius * side / _CIFAR_SIDE
    reach = max(1, int(np.ceil(radius)))
    grid = np.arange(-reach - 1, reach + 2)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gaussian_kernel_1d(alias_sigma)
    smooth = np.outer(g, g)
    kernel = _convolve2d(disk, smooth)
    keep = np.argwhere(kernel > 1e-12)
    (top, left), (bottom, right) = keep.min(axis=0), keep.max(axis=0) + 1
    kernel = kernel[top:bottom, left:right]
    return kernel / kernel.sum()


def _convolve2d(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'Same' 2-D correlation of (H, W[, ...]) with reflect-101 borders (OpenCV's default)."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    pad = [(ph, kh - 1 - ph), (pw, kw - 1 - pw)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode="reflect")
    out = np.zeros(image.shape, dtype=np.float64)
    height, width = image.shape[:2]
    for i in range(kh):
        for j in range(kw):
            if kernel[i, j] != 0:
                out += kernel[i, j] * padded[i : i + height, j : j + width]
    return out


def _defocus_blur(images: np.ndarray, param: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    radius, alias_sigma = param
    kernel = _defocus_kernel(radius, alias_sigma, images.shape[1])
    x = np.moveaxis(images.astype(np.float64) / 255.0, 0, 2)  # (H, W, N, 3): one pass for all
    return _to_uint8(np.moveaxis(_convolve2d(x, kernel), 2, 0))


_FUNCTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "jpeg_compression": _jpeg,
    "brightness": _brightness,
}
