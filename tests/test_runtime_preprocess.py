"""NumPy preprocessing gives what the torch eval transform gives, without torch."""

from __future__ import annotations

import numpy as np
import pytest
from edge_ssl.runtime.preprocess import preprocess_images

from edge_ssl.errors import DataError
from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, InputSpec
from edge_ssl.tensors import preprocess


def _spec(size: int) -> InputSpec:
    return InputSpec(shape=(3, size, size), mean=CIFAR_MEAN, std=CIFAR_STD)


@pytest.mark.parametrize(("height", "width", "size"), [(32, 32, 32), (64, 48, 32), (20, 27, 32), (37, 37, 24)])
def test_matches_the_torch_transform_same_size_down_and_up(height, width, size):
    images = np.random.default_rng(0).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    ours = preprocess_images(images, _spec(size))
    reference = preprocess(images, _spec(size)).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, 3, size, size)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_without_normalization_pixels_stay_in_0_1_and_manifest_dicts_work():
    images = np.full((1, 32, 32, 3), 255, dtype=np.uint8)
    raw = preprocess_images(images, _spec(32).to_dict(), normalize=False)
    assert raw.min() == raw.max() == 1.0


@pytest.mark.parametrize(
    "images",
    [np.zeros((2, 32, 32, 3), np.float32), np.zeros((32, 32, 3), np.uint8), np.zeros((2, 32, 32, 1), np.uint8)],
)
def test_wrong_images_name_the_expected_layout(images):
    with pytest.raises(DataError, match=r"uint8 images shaped \(N, H, W, 3\)"):
        preprocess_images(images, _spec(32))
