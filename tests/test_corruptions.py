"""CIFAR-10-C style corruptions: each one degrades the image the way its name says, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ssl.corruptions import CORRUPTIONS, corrupt
from edge_ssl.errors import ConfigError, DataError


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(40, 215, (6, 32, 32, 3), dtype=np.uint8)
    return base


def _sharpness(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_changes_images_and_keeps_their_layout(images, name):
    out = corrupt(images, name, 5)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - images.astype(int)).mean() > 1.0
    np.testing.assert_array_equal(out, corrupt(images, name, 5))  # reproducible


def test_higher_severity_means_more_noise(images):
    diffs = [np.abs(corrupt(images, "gaussian_noise", s).astype(int) - images).mean() for s in (1, 3, 5)]
    assert diffs[0] < diffs[1] < diffs[2]


def test_contrast_shrinks_spread_and_brightness_lifts_pixels(images):
    assert corrupt(images, "contrast", 5).std() < 0.3 * images.std()
    assert corrupt(images, "brightness", 5).mean() > images.mean() + 30


def test_blur_and_jpeg_remove_fine_detail(images):
    assert _sharpness(corrupt(images, "defocus_blur", 5)) < 0.6 * _sharpness(images)
    assert _sharpness(corrupt(images, "jpeg_compression", 5)) < _sharpness(images)


def test_defocus_blur_works_on_larger_images():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    assert _sharpness(corrupt(big, "defocus_blur", 5)) < _sharpness(big)


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="gaussian_noise"):
        corrupt(np.zeros((1, 8, 8, 3), np.uint8), "gausian_noise")
    with pytest.raises(ConfigError, match="severity"):
        corrupt(np.zeros((1, 8, 8, 3), np.uint8), "contrast", 6)
    with pytest.raises(DataError, match="uint8"):
        corrupt(np.zeros((1, 8, 8, 3), np.float32), "contrast")
