"""Tests for edge_ssl.data.views: presets, view shapes, normalization, randomness and reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ssl.data.sources import load_images
from edge_ssl.data.views import VIEW_PRESETS, ViewAugment, ViewConfig, view_preset
from edge_ssl.errors import ConfigError, DataError
from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, InputSpec
from edge_ssl.tensors import images_to_tensor

REAL_CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"
SPEC32 = InputSpec((3, 32, 32), CIFAR_MEAN, CIFAR_STD)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Sixteen real images (the embedded digits), float (16, 3, 32, 32) in 0..1."""
    return images_to_tensor(load_images(None, limit=16).images)


def _spec_from(batch: torch.Tensor) -> InputSpec:
    mean = batch.mean(dim=(0, 2, 3)).tolist()
    std = batch.std(dim=(0, 2, 3)).tolist()
    return InputSpec((3, batch.shape[2], batch.shape[3]), mean, std)


@pytest.mark.parametrize("method", VIEW_PRESETS)
def test_each_preset_gives_two_normalized_views_of_the_right_shape(method: str, digits: torch.Tensor) -> None:
    batch = digits[:4]
    views = ViewAugment(view_preset(method, 32), SPEC32)(batch)
    assert len(views) == 2
    for view in views:
        assert view.shape == (4, 3, 32, 32) and view.dtype == torch.float32
        assert torch.isfinite(view).all() and not view.requires_grad
    assert not torch.equal(views[0], views[1])


def test_views_are_resized_to_the_configured_size(digits: torch.Tensor) -> None:
    views = ViewAugment(view_preset("simclr", 24), SPEC32)(digits[:2])
    assert [tuple(v.shape) for v in views] == [(2, 3, 24, 24)] * 2


def test_views_are_normalized_around_zero(digits: torch.Tensor) -> None:
    spec = _spec_from(digits)
    neutral = ViewConfig(
        size=32, crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0,
        blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0),
    )
    for view in ViewAugment(neutral, spec)(digits):
        assert abs(view.mean().item()) < 0.1 and 0.85 < view.std().item() < 1.15
    torch.manual_seed(0)
    for view in ViewAugment(view_preset("byol", 32), spec)(digits):
        assert abs(view.mean().item()) < 0.35


def test_real_cifar_views_are_roughly_standardized() -> None:
    path = REAL_CIFAR / "cifar10_test.npz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {REAL_CIFAR.resolve()} (../shared/data/cifar10)")
    batch = images_to_tensor(load_images(path, limit=64).images)
    torch.manual_seed(0)
    for view in ViewAugment(view_preset("simclr", 32), SPEC32)(batch):
        channel_means = view.mean(dim=(0, 2, 3))
        assert channel_means.abs().max().item() < 0.3 and 0.6 < view.std().item() < 1.4


def test_global_seed_reproduces_views_and_other_seeds_differ(digits: torch.Tensor) -> None:
    augment = ViewAugment(view_preset("byol", 32), SPEC32)
    torch.manual_seed(7)
    first = augment(digits[:4])
    torch.manual_seed(7)
    again = augment(digits[:4])
    torch.manual_seed(8)
    other = augment(digits[:4])
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_private_generator_is_reproducible_and_leaves_global_state(digits: torch.Tensor) -> None:
    config = view_preset("vicreg", 32)
    left = ViewAugment(config, SPEC32, generator=torch.Generator().manual_seed(3))
    right = ViewAugment(config, SPEC32, generator=torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    a = left(digits[:4])
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(123)
    b = right(digits[:4])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(left(digits[:4])[0], a[0])  # the private stream moves on


def test_samples_get_different_augmentations(digits: torch.Tensor) -> None:
    same = digits[:1].repeat(4, 1, 1, 1)
    torch.manual_seed(0)
    view = ViewAugment(view_preset("simclr", 32), SPEC32)(same)[0]
    assert not torch.equal(view[0], view[1])


def test_strong_colour_jitter_keeps_torchvisions_factor_range() -> None:
    # brightness 3 draws factors in [0, 4] (torchvision clips 1 - 3 at 0), never a negative
    # factor that would turn a whole view black.
    config = ViewConfig(size=8, crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=1.0, brightness=3.0,
                        contrast=0.0, saturation=0.0, hue=0.0, gray_p=0.0, blur_p=(0.0, 0.0),
                        solarize_p=(0.0, 0.0))
    spec = InputSpec((3, 8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    views = ViewAugment(config, spec, generator=torch.Generator().manual_seed(0))(torch.full((256, 3, 8, 8), 0.2))
    levels = torch.cat(views).mean(dim=(1, 2, 3))
    assert levels.min() > 0.0 and levels.max() > 0.6  # 0.2 x factor, up to 0.8


def test_dino_local_crops_when_enabled(digits: torch.Tensor) -> None:
    config = view_preset("dino", 32, local_crops=2)
    assert config.local_size == round(32 * 96 / 224)
    views = ViewAugment(config, SPEC32)(digits[:2])
    assert [tuple(v.shape) for v in views] == [(2, 3, 32, 32)] * 2 + [(2, 3, 14, 14)] * 2
    assert view_preset("dino", 32).local_crops == 0
    large = view_preset("dino", 224)
    assert (large.local_crops, large.local_size, large.crop_scale) == (8, 96, (0.4, 1.0))
    custom = view_preset("dino", 96, local_crops=3, local_size=32)
    views = ViewAugment(custom, InputSpec((3, 96, 96), CIFAR_MEAN, CIFAR_STD))(torch.rand(2, 3, 96, 96))
    assert [v.shape[-1] for v in views] == [96, 96, 32, 32, 32]


def _high_frequency(views: torch.Tensor) -> float:
    return float((views[..., 1:] - views[..., :-1]).abs().mean())


def test_blur_is_off_for_small_images_and_follows_the_papers_for_large() -> None:
    for method in VIEW_PRESETS:
        config = view_preset(method, 32)
        assert config.blur_p == (0.0, 0.0) and config.crop_scale == (0.2, 1.0)
    assert view_preset("byol", 224).blur_p == (1.0, 0.1)
    assert view_preset("byol", 224).solarize_p == (0.0, 0.2)
    assert view_preset("simclr", 224).blur_p == (0.5, 0.5)
    assert (view_preset("simclr", 224).brightness, view_preset("simclr", 32).brightness) == (0.8, 0.4)
    checkerboard = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()
    batch = checkerboard.expand(32, 3, 64, 64).contiguous()
    spec = InputSpec((3, 64, 64), (0.5,) * 3, (0.5,) * 3)
    plain = dict(crop_scale=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=0.0, solarize_p=(0.0, 0.0))
    torch.manual_seed(0)
    first, second = ViewAugment(ViewConfig(64, blur_p=(1.0, 0.0), **plain), spec)(batch)
    assert _high_frequency(first) < 0.5 * _high_frequency(second)
    torch.testing.assert_close(second, (batch - 0.5) / 0.5, atol=1e-5, rtol=0)  # p=0: untouched


@pytest.mark.parametrize(
    "bad",
    [
        {"size": 0},
        {"size": 32.0},
        {"crop_scale": (0.5, 0.2)},
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.2, 1.5)},
        {"flip_p": 1.5},
        {"jitter_p": -0.1},
        {"blur_p": (1.0, 2.0)},
        {"blur_p": (1.0,)},
        {"solarize_p": (-0.2, 0.0)},
        {"hue": 0.7},
        {"brightness": -1.0},
        {"local_crops": 2},
        {"local_crops": -1},
        {"local_crops": 2, "local_size": 8, "local_scale": (0.5, 0.1)},
    ],
)
def test_invalid_view_config_raises_config_error(bad: dict) -> None:
    settings = {"size": 32} | bad
    with pytest.raises(ConfigError, match="ViewConfig"):
        ViewConfig(**settings)


def test_unknown_preset_and_setting_get_hints() -> None:
    with pytest.raises(ConfigError, match="unknown view preset 'byl'. Did you mean 'byol'"):
        view_preset("byl", 32)
    with pytest.raises(ConfigError, match="Valid presets: simclr, byol, dino"):
        view_preset("mae", 32)
    with pytest.raises(ConfigError, match="Did you mean 'blur_p'"):
        view_preset("byol", 32, blur=0.5)
    assert view_preset("Barlow-Twins", 32) == view_preset("barlow_twins", 32)
    assert view_preset("simclr", 32, gray_p=0.0).gray_p == 0.0


def test_bad_input_batch_raises_data_error() -> None:
    augment = ViewAugment(view_preset("simsiam", 32), SPEC32)
    with pytest.raises(DataError, match="images_to_tensor"):
        augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"\(N, 3, H, W\)"):
        augment(torch.zeros(2, 32, 32, 3))
    with pytest.raises(ConfigError, match="3-channel"):
        ViewAugment(view_preset("simsiam", 32), InputSpec((1, 32, 32), (0.5,), (0.5,)))


@pytest.mark.gpu
def test_cuda_views_match_cpu_views_for_one_seed(digits: torch.Tensor) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    augment = ViewAugment(view_preset("byol", 32), SPEC32).to("cuda")
    torch.manual_seed(0)
    on_cpu = augment(digits[:8])
    torch.manual_seed(0)
    on_gpu = augment(digits[:8].cuda())
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.device.type == "cuda"
        np.testing.assert_allclose(a.numpy(), b.cpu().numpy(), atol=1e-3)
