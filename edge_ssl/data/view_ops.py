"""Batched image operations behind ``edge_ssl.data.views``: one call per batch, no per-sample loops.

Every function takes float (N, 3, H, W) images in 0..1 and per-sample parameters as tensors
on the images' device, and launches a fixed, small number of kernels whatever N is (the GPU
pretraining loop calls them between the encoder's steps, so host overhead matters more than
arithmetic). Colour semantics follow torchvision's tensor functions (ITU-R 601 luma, HSV hue,
clamping after each step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
LUMA = (0.2989, 0.587, 0.114)


def sample_crop_boxes(
    count: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    generator: torch.Generator | None = None, attempts: int = 10,
) -> torch.Tensor:
    """Random-resized-crop boxes (x0, y0, w, h) in pixels, (count, 4) float32 on the CPU.

    torchvision's sampler, vectorized: ``attempts`` draws of area fraction in ``scale`` and
    log-uniform aspect ``ratio`` per sample, the first that fits wins; when none fits, the
    centred crop of the whole image clamped to ``ratio``.
    """
    area = height * width * torch.empty(count, attempts).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(count, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                      generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    fallback_w, fallback_h = _centre_crop_size(height, width, ratio)
    w = torch.where(found, w, torch.tensor(float(fallback_w)))
    h = torch.where(found, h, torch.tensor(float(fallback_h)))
    offsets = torch.rand(count, 2, generator=generator)
    x0 = torch.where(found, torch.floor(offsets[:, 0] * (width - w + 1)), (width - w) // 2)
    y0 = torch.where(found, torch.floor(offsets[:, 1] * (height - h + 1)), (height - h) // 2)
    return torch.stack([x0, y0, w, h], dim=1)


def _centre_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, int(round(width / ratio[0]))
    if in_ratio > ratio[1]:
        return int(round(height * ratio[1])), height
    return width, height


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (N, 4: x0, y0, w, h pixels), mirror where ``flip``, resize to ``size``.

    One affine grid and one bilinear ``grid_sample`` for the whole batch. Output pixel
    centres map onto the box exactly as a crop followed by a half-pixel-centred resize.
    """
    n, _, height, width = images.shape
    x0, y0, w, h = boxes.unbind(1)
    sign = 1.0 - 2.0 * flip.to(boxes.dtype)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = (w / width * sign).to(images.dtype)
    theta[:, 0, 2] = ((2 * x0 + w) / width - 1).to(images.dtype)
    theta[:, 1, 1] = (h / height).to(images.dtype)
    theta[:, 1, 2] = ((2 * y0 + h) / height - 1).to(images.dtype)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grayscale with the LUMA weights."""
    r, g, b = images.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards each image's mean luma."""
    mean = luma(images).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean, images, _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend towards each pixel's luma."""
    return torch.lerp(luma(images), images, _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn, in [-0.5, 0.5])."""
    hue, saturation, value = _rgb_to_hsv(images)
    hue = torch.remainder(hue + _per_sample(shift), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


def _rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = images.unbind(1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = maxc - minc
    saturation = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue_r = torch.remainder((g - b) / safe, 6.0)
    hue_g = (b - r) / safe + 2.0
    hue_b = (r - g) / safe + 4.0
    hue = torch.where(maxc == r, hue_r, torch.where(maxc == g, hue_g, hue_b))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    return hue.unsqueeze(1), saturation.unsqueeze(1), maxc.unsqueeze(1)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # f(k) = v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n + 6h) mod 6 for n = 5, 3, 1 (R, G, B).
    # n = 5, 3, 1 made on the device (torch.tensor(..., device=cuda) would wait for the GPU).
    n = torch.arange(5.0, 0.0, -2.0, dtype=hue.dtype, device=hue.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return value - value * saturation * ramp


def grayscale_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Three-channel grayscale for samples where ``mask`` is True, unchanged elsewhere."""
    return torch.where(_per_sample(mask), luma(images).expand_as(images), images)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per sample (0: unchanged), reflect padding."""
    n, channels, height, width = images.shape
    radius = kernel // 2
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    sigma = sigma.to(images.dtype).clamp_min(1e-6).view(-1, 1)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, n * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"),
                    weights.view(-1, 1, 1, kernel), groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"),
                    weights.view(-1, 1, kernel, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


def solarize_where(images: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` for samples where ``mask`` is True."""
    flip = _per_sample(mask) & (images >= threshold)
    return torch.where(flip, 1.0 - images, images)
