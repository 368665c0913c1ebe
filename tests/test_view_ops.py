"""edge_ssl.data.view_ops: each batched op equals torchvision's per-image function, sample by sample."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from edge_ssl.data import view_ops

IMAGES = torch.rand(6, 3, 20, 24, generator=torch.Generator().manual_seed(0))


def _per_image(fn, values) -> torch.Tensor:
    return torch.stack([fn(image, float(value)) for image, value in zip(IMAGES, values, strict=True)])


@pytest.mark.parametrize(("ours", "reference"), [
    (view_ops.adjust_brightness, TF.adjust_brightness),
    (view_ops.adjust_contrast, TF.adjust_contrast),
    (view_ops.adjust_saturation, TF.adjust_saturation),
])
def test_colour_factors_match_torchvision_per_sample(ours, reference) -> None:
    factors = torch.tensor([0.0, 0.6, 1.0, 1.4, 0.9, 2.0])
    torch.testing.assert_close(ours(IMAGES.clone(), factors), _per_image(reference, factors),
                               atol=1e-6, rtol=0)


def test_hue_matches_torchvision_per_sample() -> None:
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.2, 0.5])
    torch.testing.assert_close(view_ops.adjust_hue(IMAGES, shifts), _per_image(TF.adjust_hue, shifts),
                               atol=1e-5, rtol=0)


def test_blur_matches_torchvision_and_sigma_zero_leaves_the_sample() -> None:
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.3, 0.0])
    reference = torch.stack([TF.gaussian_blur(image, [5, 5], [float(s)] * 2) for image, s in
                             zip(IMAGES[:5], sigma[:5], strict=True)])
    blurred = view_ops.gaussian_blur(IMAGES, sigma, 5)
    torch.testing.assert_close(blurred[:5], reference, atol=1e-6, rtol=0)
    assert torch.equal(blurred[5], IMAGES[5])


def test_grayscale_and_solarize_only_touch_masked_samples() -> None:
    mask = torch.tensor([True, False, True, False, False, True])
    gray = view_ops.grayscale_where(IMAGES, mask)
    torch.testing.assert_close(gray[mask], TF.rgb_to_grayscale(IMAGES[mask], 3), atol=1e-6, rtol=0)
    assert torch.equal(gray[~mask], IMAGES[~mask])
    solar = view_ops.solarize_where(IMAGES, mask, 0.5)
    assert torch.equal(solar[mask], TF.solarize(IMAGES[mask], 0.5))
    assert torch.equal(solar[~mask], IMAGES[~mask])


def test_crop_boxes_fit_the_image_and_follow_scale_and_ratio() -> None:
    boxes = view_ops.sample_crop_boxes(20_000, 32, 40, (0.2, 0.6), (3 / 4, 4 / 3),
                                       torch.Generator().manual_seed(0))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 40).all() and (y0 + h <= 32).all()
    area = w * h / (32 * 40)
    assert area.min() > 0.18 and area.max() < 0.63  # rounding to whole pixels
    assert (w / h).min() > 0.68 and (w / h).max() < 1.45  # rounding to whole pixels
    assert x0.max() > 20 and y0.max() > 10  # offsets spread over the image
    # No draw can fit: the centred crop of the whole image, clamped to the ratio.
    wide = view_ops.sample_crop_boxes(5, 10, 100, (1.0, 1.0), (3 / 4, 4 / 3))
    assert wide[0].tolist() == [43.0, 0.0, 13.0, 10.0]


def test_resized_crop_is_an_exact_crop_and_mirror_at_the_same_size() -> None:
    images = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[4.0, 2.0, 8.0, 8.0], [0.0, 0.0, 16.0, 16.0]])
    out = view_ops.resized_crop(images, boxes[:1].expand(2, 4), torch.tensor([False, True]), 8)
    torch.testing.assert_close(out[0], images[0, :, 2:10, 4:12], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], images[1, :, 2:10, 4:12].flip(-1), atol=1e-6, rtol=0)
    resized = view_ops.resized_crop(images, boxes[1:].expand(2, 4), torch.tensor([False, False]), 8)
    reference = torch.nn.functional.interpolate(images, size=8, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, reference, atol=1e-6, rtol=0)
