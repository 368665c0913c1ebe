"""CIFAR-10-C style image corruptions (Hendrycks & Dietterich 2019) in numpy and Pillow.

Twelve of the benchmark's fifteen corruptions plus three of its four extra ones, with the
CIFAR-10-C parameters. Not here: motion blur and snow (they need ImageMagick's motion
blur), frost (it blends in photographs of frost) and spatter (OpenCV edge and distance
transforms); a look-alike of any of them would not be CIFAR-10-C.
"""

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
    "shot_noise": (500, 250, 100, 75, 50),  # Poisson rate per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values set to 0 or 1
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, rounds
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # zooms 1, 1.01, ... below this, averaged
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1.0, 2), (1.5, 1.75)),  # strength, fractal decay
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                          (0.1, 0.03, 0.03)),  # alpha, sigma, affine reach (fractions of the side)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # box-downscale factor
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),  # std of the multiplicative noise
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation * a + b
}
CORRUPTIONS = tuple(SEVERITY_PARAMS)
#: The five of issue 9's adaptation benchmark contract (``benchmarks/adapt.py``'s default).
BENCHMARK_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression", "brightness")
#: The CIFAR-10-C benchmark corruptions implemented here (12 of its 15).
CIFAR10C_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                        "zoom_blur", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                        "jpeg_compression")
#: CIFAR-10-C's held-out corruptions, published for choosing settings without looking at the
#: benchmark ones (3 of its 4: spatter is not implemented).
VALIDATION_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "saturate")
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
            f"{tuple(images.shape)}. Load images through edge_ssl.data.sources, which yields that layout."
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


def _shot_noise(images: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float64) / 255.0
    return _to_uint8(rng.poisson(x * rate) / rate)


def _impulse_noise(images: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on each value (channels independently), half salt, as skimage's 's&p'."""
    x = images.astype(np.float64) / 255.0
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return _to_uint8(np.where(hit, salt.astype(np.float64), x))


def _speckle_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float64) / 255.0
    return _to_uint8(x + x * rng.normal(0.0, std, size=x.shape))


def _gaussian_filter(x: np.ndarray, sigma: float, mode: str = "edge", truncate: float = 4.0) -> np.ndarray:
    """Separable Gaussian over axes 1 and 2 of (N, H, W[, C]), as scipy.ndimage.gaussian_filter.

    ``mode`` is numpy's padding name: 'edge' is scipy's 'nearest' (skimage's default),
    'symmetric' is scipy's 'reflect'.
    """
    radius = int(truncate * sigma + 0.5)
    weights = _gaussian_kernel_1d(sigma, 2 * radius + 1)
    for axis in (1, 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode=mode)
        length = x.shape[axis]
        x = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(weights))
    return x


def _gaussian_blur(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return _to_uint8(_gaussian_filter(images.astype(np.float64) / 255.0, sigma))


def _glass_blur(images: np.ndarray, param: tuple[float, int, int], rng: np.random.Generator) -> np.ndarray:
    """Blur, move pixels locally (bottom-right to top-left), blur again.

    Each pixel takes the value of a random neighbour: the reference code's tuple swap of two
    numpy views copies one way, and that is what CIFAR-10-C's images show.
    """
    sigma, delta, rounds = param
    x = (np.clip(_gaussian_filter(images.astype(np.float64) / 255.0, sigma), 0, 1) * 255).astype(np.uint8)
    n, height, width = x.shape[:3]
    every = np.arange(n)
    for _ in range(rounds):
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                dx, dy = rng.integers(-delta, delta, size=(2, n))  # high exclusive, as np.random.randint
                x[every, h, w] = x[every, h + dy, w + dx]
    return _to_uint8(_gaussian_filter(x / 255.0, sigma))


def _zoom_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, C) -> (N, height, width, C), corner-aligned bilinear (scipy.ndimage.zoom, order 1)."""

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        coords = np.arange(size_out) * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
        low = np.floor(coords).astype(int)
        return low, np.minimum(low + 1, size_in - 1), coords - low

    low, high, frac = axis(x.shape[1], height)
    frac = frac[None, :, None, None]
    rows = x[:, low] * (1 - frac) + x[:, high] * frac
    low, high, frac = axis(x.shape[2], width)
    frac = frac[None, None, :, None]
    return rows[:, :, low] * (1 - frac) + rows[:, :, high] * frac


def _zoom_blur(images: np.ndarray, top_zoom: float, rng: np.random.Generator) -> np.ndarray:
    """Average of the image and centre zooms 1, 1.01, ... < ``top_zoom`` of it."""
    x = images.astype(np.float64) / 255.0
    height, width = x.shape[1:3]
    out = np.zeros_like(x)
    zooms = np.arange(1, top_zoom, 0.01)
    for zoom in zooms:
        crop_h, crop_w = int(np.ceil(height / zoom)), int(np.ceil(width / zoom))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        zoomed = _zoom_bilinear(x[:, top : top + crop_h, left : left + crop_w],
                                int(round(crop_h * zoom)), int(round(crop_w * zoom)))
        top, left = (zoomed.shape[1] - height) // 2, (zoomed.shape[2] - width) // 2
        out += zoomed[:, top : top + height, left : left + width]
    return _to_uint8((x + out) / (len(zooms) + 1))


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in 0..1 of a power-of-two ``size`` (CIFAR-10-C's fog layer)."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def wibbled(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square += np.roll(square, -1, axis=1)
        grid[half:size:step, half:size:step] = wibbled(square)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        grid[0:size:step, half:size:step] = wibbled(
            centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1))
        grid[half:size:step, 0:size:step] = wibbled(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0))
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def _fog(images: np.ndarray, param: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    strength, decay = param
    x = images.astype(np.float64) / 255.0
    n, height, width = x.shape[:3]
    size = 1 << (max(height, width, 2) - 1).bit_length()  # the next power of two
    out = np.empty_like(x)
    for i in range(n):
        top = x[i].max()
        fogged = x[i] + strength * _plasma_fractal(size, decay, rng)[:height, :width, None]
        out[i] = fogged * top / (top + strength)
    return _to_uint8(out)


def _sample_bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, about_edge_pixel: bool = False
                     ) -> np.ndarray:
    """(H, W, C) image at fractional (rows, cols), mirrored past the edges.

    The mirror lies half a pixel outside the image (scipy's 'reflect'), or on the edge
    pixels with ``about_edge_pixel`` (OpenCV's BORDER_REFLECT_101).
    """
    height, width = image.shape[:2]

    def mirror(t: np.ndarray, n: int) -> np.ndarray:
        if about_edge_pixel:
            period = max(2 * (n - 1), 1)
            t = np.mod(t, period)
            return np.clip(np.where(t > n - 1, period - t, t), 0, n - 1)
        t = np.mod(t + 0.5, 2 * n) - 0.5
        return np.clip(np.where(t > n - 0.5, 2 * n - 1 - t, t), 0, n - 1)

    rows, cols = mirror(rows, height), mirror(cols, width)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, height - 1), np.minimum(c0 + 1, width - 1)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    top = image[r0, c0] * (1 - fc) + image[r0, c1] * fc
    bottom = image[r1, c0] * (1 - fc) + image[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def _elastic_transform(images: np.ndarray, param: tuple[float, float, float],
                       rng: np.random.Generator) -> np.ndarray:
    """A random affine warp of three points around the centre, then a smooth random displacement."""
    x = images.astype(np.float64) / 255.0
    n, height, width = x.shape[:3]
    side = min(height, width)
    alpha, sigma, reach = (value * side for value in param)
    centre, square = np.array([width, height], np.float64) // 2, side // 3
    source = np.array([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty_like(x)
    for i in range(n):
        target = source + rng.uniform(-reach, reach, size=source.shape)
        # The affine map from the moved points back to the originals: where each output pixel reads.
        back = np.linalg.solve(np.c_[target, np.ones(3)], source)  # (3, 2): [x, y, 1] @ back
        read_x = cols * back[0, 0] + rows * back[1, 0] + back[2, 0]
        read_y = cols * back[0, 1] + rows * back[1, 1] + back[2, 1]
        warped = _sample_bilinear(x[i], read_y, read_x, about_edge_pixel=True)
        shift = [_gaussian_filter(rng.uniform(-1, 1, size=(1, height, width)), sigma, "symmetric", 3.0)[0]
                 * alpha if sigma > 0 else np.zeros((height, width)) for _ in range(2)]
        out[i] = _sample_bilinear(warped, rows + shift[1], cols + shift[0])
    return _to_uint8(out)


def _pixelate(images: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    height, width = images.shape[1:3]
    small = (max(1, int(width * factor)), max(1, int(height * factor)))
    out = np.empty_like(images)
    for i, image in enumerate(images):
        tiny = Image.fromarray(image).resize(small, Image.Resampling.BOX)
        out[i] = np.asarray(tiny.resize((width, height), Image.Resampling.BOX))
    return out


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    value = x.max(axis=-1)
    delta = value - x.min(axis=-1)
    saturation = np.divide(delta, value, out=np.zeros_like(value), where=value > 0)
    safe = np.where(delta > 0, delta, 1.0)
    r, g, b = np.moveaxis(x, -1, 0)
    hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = np.where(delta > 0, np.mod(hue / 6.0, 1.0), 0.0)
    return np.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    hue, saturation, value = np.moveaxis(hsv, -1, 0)
    k = np.mod(np.array([5.0, 3.0, 1.0]) + 6.0 * hue[..., None], 6.0)
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return value[..., None] - value[..., None] * saturation[..., None] * ramp


def _saturate(images: np.ndarray, param: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    scale, shift = param
    hsv = _rgb_to_hsv(images.astype(np.float64) / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * scale + shift, 0.0, 1.0)
    return _to_uint8(_hsv_to_rgb(hsv))


_FUNCTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "defocus_blur": _defocus_blur,
    "contrast": _contrast,
    "jpeg_compression": _jpeg,
    "brightness": _brightness,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "glass_blur": _glass_blur,
    "zoom_blur": _zoom_blur,
    "fog": _fog,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "saturate": _saturate,
}
