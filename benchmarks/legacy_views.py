"""The kornia view pipeline that pretraining used before issue 5, kept only as the throughput
benchmark's ``old-default`` baseline (``pip install kornia``). edge-ssl itself uses
``edge_ssl.data.views.ViewAugment`` (batched torch ops, no kornia)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from edge_ssl.data.views import (
    BLUR_SIGMA,
    CROP_RATIO,
    SOLARIZE_THRESHOLD,
    ViewAugment,
    ViewConfig,
    _blur_kernel,
)
from edge_ssl.lazy import require
from edge_ssl.spec import InputSpec


class KorniaViewAugment(ViewAugment):
    """The old kornia views: ViewAugment's interface, config and checks, kornia's ops.

    Every sample draws its own parameters from torch's global CPU generator (or a stream
    seeded from ``generator``); kornia draws one order of the jitter steps per batch.
    """

    def __init__(
        self, config: ViewConfig, spec: InputSpec, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(config, spec, generator=generator)
        self._index = {p: str(i) for i, p in enumerate(dict.fromkeys(self.pipelines))}
        self.kornia_views = torch.nn.ModuleDict(
            {key: self._pipeline(p.size, p.scale, p.blur_p, p.solarize_p) for p, key in self._index.items()})

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

    def _view(self, images: torch.Tensor, pipe: Any) -> torch.Tensor:
        return self.kornia_views[self._index[pipe]](images)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with self._random_stream():
            return super().forward(images)
