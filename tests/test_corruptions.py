"""CIFAR-10-C style corruptions: each one degrades the image the way its name says, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ssl.data.corruptions import CORRUPTIONS, corrupt
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


def test_the_contract_five_and_the_cifar10c_set_are_implemented():
    from edge_ssl.data.corruptions import BENCHMARK_CORRUPTIONS, CIFAR10C_CORRUPTIONS

    assert set(BENCHMARK_CORRUPTIONS) <= set(CIFAR10C_CORRUPTIONS) <= set(CORRUPTIONS)
    assert len(CIFAR10C_CORRUPTIONS) == 12


def test_noise_corruptions_add_the_noise_their_names_say(images):
    x = images.astype(np.float64)
    for name in ("shot_noise", "speckle_noise"):
        residual = corrupt(images, name, 5).astype(np.float64) - x
        assert abs(residual.mean()) < 2.0 and residual.std() > 5.0  # zero-mean noise
    impulse = corrupt(images, "impulse_noise", 5)  # fixture pixels are 40..214: 0/255 only from noise
    hit = (impulse == 0) | (impulse == 255)
    assert 0.05 < hit.mean() < 0.09  # amount 0.07 of the values
    assert abs((impulse == 255).mean() - (impulse == 0).mean()) < 0.02  # half salt, half pepper
    speckle = np.abs(corrupt(images, "speckle_noise", 5).astype(np.float64) - x)
    bright, dark = images.mean(axis=-1) > 150, images.mean(axis=-1) < 90
    assert speckle[bright].mean() > speckle[dark].mean()  # multiplicative: grows with intensity


def test_blur_corruptions_remove_fine_detail(images):
    for name in ("glass_blur", "zoom_blur", "gaussian_blur", "pixelate"):
        assert _sharpness(corrupt(images, name, 5)) < 0.8 * _sharpness(images), name


def test_pixelate_makes_blocks_and_keeps_the_colours():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = corrupt(images, "pixelate", 5)  # 32 -> 20 -> 32 px
    repeated = np.mean(out[:, :, 1:] == out[:, :, :-1])
    assert repeated > 0.3
    assert abs(out.astype(float).mean() - images.mean()) < 2.0


def test_fog_and_saturate_change_tone_not_layout(images):
    fog = corrupt(images, "fog", 5).astype(np.float64)
    assert fog.std() < images.std()  # a haze: contrast drops
    from edge_ssl.data.corruptions import _rgb_to_hsv

    saturation = _rgb_to_hsv(images / 255.0)[..., 1]
    assert _rgb_to_hsv(corrupt(images, "saturate", 5) / 255.0)[..., 1].mean() > saturation.mean() + 0.2
    assert _rgb_to_hsv(corrupt(images, "saturate", 2) / 255.0)[..., 1].mean() < 0.5 * saturation.mean()


def test_elastic_transform_moves_pixels_smoothly():
    side = 32
    ramp = np.tile(np.linspace(0, 255, side)[None, :, None], (side, 1, 3)).astype(np.uint8)[None]
    out = corrupt(np.repeat(ramp, 3, axis=0), "elastic_transform", 5)
    assert np.abs(out.astype(int) - ramp).mean() > 1.0
    # A smooth warp of a horizontal ramp stays a ramp: no pixel jumps by more than a few steps.
    assert np.abs(np.diff(out.astype(int), axis=2)).max() < 4 * 255 / (side - 1)


def test_hsv_round_trip_is_exact():
    from edge_ssl.data.corruptions import _hsv_to_rgb, _rgb_to_hsv

    x = np.random.default_rng(0).random((4, 8, 8, 3))
    np.testing.assert_allclose(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-12)


def test_filters_match_the_scipy_calls_of_the_reference_code():
    """make_cifar_c.py uses skimage's gaussian (scipy 'nearest'), scipy zoom (order 1) and
    map_coordinates (order 1, 'reflect'); OpenCV's warpAffine reflects about the edge pixels."""
    ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is only the reference here")
    from edge_ssl.data.corruptions import _gaussian_filter, _sample_bilinear, _zoom_bilinear

    rng = np.random.default_rng(0)
    x = rng.random((2, 32, 32, 3))
    for sigma, mode, scipy_mode, truncate in [(1.0, "edge", "nearest", 4.0), (0.96, "symmetric", "reflect", 3.0)]:
        reference = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode=scipy_mode, truncate=truncate)
        np.testing.assert_allclose(_gaussian_filter(x, sigma, mode, truncate), reference, atol=1e-12)
    crop = x[:, 3:29, 3:29]
    reference = np.stack([ndimage.zoom(c, (1.25, 1.25, 1), order=1) for c in crop])
    np.testing.assert_allclose(_zoom_bilinear(crop, 32, 32), reference, atol=1e-12)
    rows, cols = np.mgrid[0:32, 0:32].astype(np.float64)
    rows, cols = rows + rng.normal(0, 2, rows.shape), cols + rng.normal(0, 2, cols.shape)
    for about_edge, scipy_mode in [(False, "reflect"), (True, "mirror")]:
        reference = np.stack([ndimage.map_coordinates(x[0][..., c], [rows, cols], order=1, mode=scipy_mode)
                              for c in range(3)], axis=-1)
        np.testing.assert_allclose(_sample_bilinear(x[0], rows, cols, about_edge_pixel=about_edge), reference,
                                   atol=1e-12)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_works_on_larger_and_non_square_images(name):
    rng = np.random.default_rng(2)
    out = corrupt(rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8), name, 3)
    assert out.shape == (2, 40, 48, 3) and out.dtype == np.uint8
