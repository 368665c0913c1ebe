"""The kornia view pipeline that pretraining used before issue 5, kept only as the throughput
benchmark's ``old-default`` baseline (``pip install kornia``). edge-ssl itself uses
``edge_ssl.views.ViewAugment`` (batched torch ops, no kornia)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from edge_ssl.errors import ConfigError, DataError
from edge_ssl.lazy import require
from edge_ssl.spec import InputSpec
from edge_ssl.tensors import normalize
from edge_ssl.views import BLUR_SIGMA, CROP_RATIO, SOLARIZE_THRESHOLD, ViewConfig, _blur_kernel


class KorniaViewAugment(torch.nn.Module):
    """The old kornia views (same interface and ViewConfig as edge_ssl.views.ViewAugment).

    Input: float (N, 3, H, W) in 0..1 on any device (see ``edge_ssl.tensors.images_to_tensor``).
    Output: two (N, 3, size, size) views, then ``local_crops`` (N, 3, local_size, local_size)
    views, on the input's device. Every sample draws its own parameters. Random numbers come
    from torch's CPU generator, so ``torch.manual_seed`` reproduces the views on CPU and GPU
    alike; pass ``generator`` to draw from a private stream instead (the global state is then
    left untouched).
    """

    def __init__(
        self, config: ViewConfig, spec: InputSpec, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if spec.shape[0] != 3:
            raise ConfigError(f"ViewAugment needs a 3-channel InputSpec; got shape {spec.shape}.")
        if generator is not None and generator.device.type != "cpu":
            raise ConfigError(
                f"ViewAugment draws its random numbers on the CPU; pass a CPU torch.Generator, "
                f"got one on {generator.device}."
            )
        self.config = config
        self.spec = spec
        self.generator = generator
        self.global_views = torch.nn.ModuleList(
            self._pipeline(config.size, config.crop_scale, config.blur_p[i], config.solarize_p[i])
            for i in range(2)
        )
        self.local_view: torch.nn.Module | None = None
        if config.local_crops > 0:
            local_blur = 0.5 if max(config.blur_p) > 0 else 0.0
            self.local_view = self._pipeline(config.local_size, config.local_scale, local_blur, 0.0)

    def _pipeline(
        self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float
    ) -> torch.nn.Sequential:
        augmentation = require("kornia", "SSL view augmentation").augmentation
        cfg = self.config
        # "resample" crops the whole batch with one warp; "slice" loops over the samples,
        # which is slower on a GPU at training batch sizes.
        steps: list[torch.nn.Module] = [
            augmentation.RandomResizedCrop(
                (size, size), scale=scale, ratio=CROP_RATIO, cropping_mode="resample",
                align_corners=False,
            )
        ]
        if cfg.flip_p > 0:
            steps.append(augmentation.RandomHorizontalFlip(p=cfg.flip_p))
        if cfg.jitter_p > 0 and max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
            # ColorJitter (not ColorJiggle) uses torchvision's factors, which the papers' numbers
            # refer to; kornia draws one order of the four steps per batch, torchvision per image.
            steps.append(
                augmentation.ColorJitter(
                    cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p
                )
            )
        if cfg.gray_p > 0:
            steps.append(augmentation.RandomGrayscale(p=cfg.gray_p))
        if blur_p > 0:
            kernel = _blur_kernel(size)
            steps.append(augmentation.RandomGaussianBlur((kernel, kernel), BLUR_SIGMA, p=blur_p))
        if solarize_p > 0:
            steps.append(
                augmentation.RandomSolarize(
                    thresholds=(SOLARIZE_THRESHOLD, SOLARIZE_THRESHOLD), additions=(0.0, 0.0),
                    p=solarize_p,
                )
            )
        return torch.nn.Sequential(*steps)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> KorniaViewAugment:
        # kornia moves its samplers with .to(device); keep them on the CPU so that one seed
        # gives the same views on every device (the drawn parameters are tiny).
        out = super()._apply(fn, *args, **kwargs)
        for module in self.modules():
            if module is not self and hasattr(module, "set_rng_device_and_dtype"):
                module.set_rng_device_and_dtype(torch.device("cpu"), torch.float32)
        return out

    @contextmanager
    def _random_stream(self) -> Iterator[None]:
        if self.generator is None:
            yield
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or (
            images.ndim != 4 or images.shape[1] != 3
        ):
            got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                   else type(images).__name__)
            raise DataError(
                f"ViewAugment expects float images (N, 3, H, W) in 0..1; got {got}. "
                "Convert uint8 arrays with edge_ssl.tensors.images_to_tensor."
            )
        with self._random_stream():
            views = [pipeline(images) for pipeline in self.global_views]
            if self.local_view is not None:
                views.extend(self.local_view(images) for _ in range(self.config.local_crops))
        return [normalize(view, self.spec) for view in views]

    def extra_repr(self) -> str:
        cfg = self.config
        return f"size={cfg.size}, local_crops={cfg.local_crops}, local_size={cfg.local_size}"
