"""Two-view (and DINO multi-crop) SSL augmentation of whole batches on the model's device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from edge_ssl.config import check_int, check_number
from edge_ssl.data import view_ops
from edge_ssl.errors import ConfigError, DataError
from edge_ssl.registry import did_you_mean
from edge_ssl.spec import InputSpec
from edge_ssl.tensors import to_device

#: Up to this image size the CIFAR recipes apply: no Gaussian blur (it wipes out 32px
#: images), crop scale (0.2, 1.0), SimCLR colour strength s = 0.5.
SMALL_IMAGE_MAX = 64
#: DINO's local crops are 96 px for 224 px global crops; other sizes keep the ratio.
LOCAL_SIZE_RATIO = 96 / 224
#: Blur sigma range in pixels (SimCLR, BYOL, DINO); kernel about 10% of the view size.
BLUR_SIGMA = (0.1, 2.0)
#: Random resized crop aspect ratio range (torchvision's default, used by every paper here).
CROP_RATIO = (3 / 4, 4 / 3)
SOLARIZE_THRESHOLD = 0.5


@dataclass(frozen=True)
class ViewConfig:
    """How to turn one image into SSL views; ``*_p`` values are per-sample probabilities.

    Two global views of ``size`` px: random resized crop (area fraction ``crop_scale``),
    horizontal flip, colour jitter (torchvision's ColorJitter factors), grayscale, Gaussian
    blur and solarization. ``blur_p`` and ``solarize_p`` hold one probability per global view
    (BYOL's asymmetric views). ``local_crops`` extra views of ``local_size`` px with area
    ``local_scale`` give DINO's multi-crop; they blur with p=0.5 when the global views blur
    at all, and never solarize (as in DINO).
    """

    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    local_crops: int = 0
    local_size: int = 0
    local_scale: tuple[float, float] = (0.05, 0.4)

    def __post_init__(self) -> None:
        owner = "ViewConfig"
        for name in ("crop_scale", "blur_p", "solarize_p", "local_scale"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ConfigError(f"ViewConfig.{name} must be a pair of numbers; got {value!r}.")
            object.__setattr__(self, name, tuple(check_number(owner, name, v) for v in value))
        check_int(owner, "size", self.size)
        check_int(owner, "local_crops", self.local_crops, minimum=0)
        check_int(owner, "local_size", self.local_size, minimum=1 if self.local_crops else 0)
        for name in ("crop_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ConfigError(
                    f"ViewConfig.{name} must be (min, max) with 0 < min <= max <= 1 (fractions of "
                    f"the image area); got {(low, high)}."
                )
        for name in ("flip_p", "jitter_p", "gray_p"):
            check_number(owner, name, getattr(self, name), 0.0, 1.0)
        for name in ("blur_p", "solarize_p"):
            for index, p in enumerate(getattr(self, name)):
                check_number(owner, f"{name}[{index}]", p, 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation"):
            check_number(owner, name, getattr(self, name), 0.0)
        check_number(owner, "hue", self.hue, 0.0, 0.5)


# Colour settings per method for large images: (brightness, contrast, saturation, hue).
_SIMCLR_S1 = (0.8, 0.8, 0.8, 0.2)  # SimCLR colour strength s = 1 (ImageNet): 0.8s, 0.8s, 0.8s, 0.2s
_SIMCLR_S05 = (0.4, 0.4, 0.4, 0.1)  # s = 0.5 (SimCLR on CIFAR-10); SimSiam's setting everywhere
_BYOL = (0.4, 0.4, 0.2, 0.1)  # BYOL Table 6; reused by DINO, VICReg and Barlow Twins

VIEW_PRESETS = ("simclr", "byol", "dino", "simsiam", "vicreg", "barlow_twins")


def view_preset(method: str, image_size: int, **overrides: Any) -> ViewConfig:
    """The augmentation of ``method``'s paper for ``image_size`` px views, then ``overrides``.

    Large images (> 64 px, ImageNet recipes):

    - simclr: crop (0.08, 1), jitter 0.8 with s=1 (0.8, 0.8, 0.8, 0.2), gray 0.2, blur 0.5 on
      both views, no solarization (Chen et al. 2020, appendix A).
    - simsiam: crop (0.2, 1), jitter 0.8 (0.4, 0.4, 0.4, 0.1), gray 0.2, blur 0.5 both (Chen &
      He 2021).
    - byol, vicreg, barlow_twins: crop (0.08, 1), jitter 0.8 (0.4, 0.4, 0.2, 0.1), gray 0.2,
      blur (1.0, 0.1), solarize (0.0, 0.2) (Grill et al. 2020; VICReg and Barlow Twins reuse it).
    - dino: BYOL's colour, blur and solarization on two global crops of scale (0.4, 1) plus 8
      local crops of scale (0.05, 0.4) at 96/224 of the size (Caron et al. 2021 defaults).

    Small images (<= 64 px, the CIFAR recipes): Gaussian blur off (as the CIFAR experiments of
    SimCLR, SimSiam and solo-learn's CIFAR configs do), crop scale (0.2, 1.0), SimCLR colour
    strength s = 0.5, and no DINO local crops (a 14 px crop of a 32 px image carries little;
    pass ``local_crops=N`` to turn them on).

    ``overrides`` replace any ViewConfig field; when ``local_crops`` is set without
    ``local_size``, local crops are ``round(image_size * 96 / 224)`` px.
    """
    key = method.lower().replace("-", "_")
    if key not in VIEW_PRESETS:
        raise ConfigError(
            f"unknown view preset {method!r}.{did_you_mean(key, VIEW_PRESETS)} "
            f"Valid presets: {', '.join(VIEW_PRESETS)}."
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"image_size must be a positive integer; got {image_size!r}.")
    fields = [f.name for f in dataclasses.fields(ViewConfig)]
    for name in overrides:
        if name not in fields:
            raise ConfigError(
                f"unknown ViewConfig setting {name!r}.{did_you_mean(name, fields)} "
                f"Valid settings: {', '.join(fields)}."
            )
    small = image_size <= SMALL_IMAGE_MAX
    local_size = max(1, round(image_size * LOCAL_SIZE_RATIO))
    settings: dict[str, Any] = {"size": image_size, "jitter_p": 0.8, "gray_p": 0.2, "flip_p": 0.5}
    if key in ("simclr", "simsiam"):
        colour = _SIMCLR_S05 if small or key == "simsiam" else _SIMCLR_S1
        settings.update(
            crop_scale=(0.2, 1.0) if small or key == "simsiam" else (0.08, 1.0),
            blur_p=(0.5, 0.5), solarize_p=(0.0, 0.0),
        )
    else:
        colour = _BYOL
        settings.update(crop_scale=(0.08, 1.0), blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
        if key == "dino":
            settings.update(crop_scale=(0.4, 1.0), local_crops=8, local_size=local_size,
                            local_scale=(0.05, 0.4))
    settings.update(zip(("brightness", "contrast", "saturation", "hue"), colour, strict=True))
    if small:
        settings.update(crop_scale=(0.2, 1.0), blur_p=(0.0, 0.0), local_crops=0, local_size=0)
    settings.update(overrides)
    if settings.get("local_crops", 0) > 0 and not settings.get("local_size"):
        settings["local_size"] = local_size
    return ViewConfig(**settings)


@dataclass(frozen=True)
class _Pipeline:
    """One kind of view: output size, crop area range, blur and solarize probabilities."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


_JITTER_STEPS = (view_ops.adjust_brightness, view_ops.adjust_contrast, view_ops.adjust_saturation,
                 view_ops.adjust_hue)


def _blur_kernel(size: int) -> int:
    """Odd kernel about 10% of the view size (SimCLR; 23 px at 224), at least 3."""
    kernel = max(3, int(round(0.1 * size)))
    return kernel if kernel % 2 else kernel + 1


class ViewAugment(torch.nn.Module):
    """Random SSL views of a batch: ``[global_1, global_2, *local]``, each normalized with ``spec``.

    Input: float (N, 3, H, W) in 0..1 on any device (see ``edge_ssl.tensors.images_to_tensor``).
    Output: two (N, 3, size, size) views, then ``local_crops`` (N, 3, local_size, local_size)
    views, on the input's device. Every sample draws its own parameters; the colour jitter
    steps run in one random order per view of a batch. Random numbers come from torch's
    CPU generator, so ``torch.manual_seed`` reproduces the views on CPU and GPU alike; pass
    ``generator`` to draw from a private stream instead (the global state is then left
    untouched). Each view is a fixed handful of batched kernels (``edge_ssl.data.view_ops``),
    whatever the batch size, and nothing waits for the GPU: the per-sample parameters go
    over in one pinned, non-blocking copy (move the module with ``.to(device)`` so the
    normalization constants live there too).
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
        self.pipelines = [_Pipeline(config.size, config.crop_scale, config.blur_p[i], config.solarize_p[i])
                          for i in range(2)]
        if config.local_crops > 0:
            local_blur = 0.5 if max(config.blur_p) > 0 else 0.0
            local = _Pipeline(config.local_size, config.local_scale, local_blur, 0.0)
            self.pipelines += [local] * config.local_crops
        # Normalization constants as buffers: ``.to(device)`` moves them once, instead of a
        # host copy (which waits for the GPU) in every call.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def _view(self, images: torch.Tensor, pipe: _Pipeline) -> torch.Tensor:
        cfg, gen, n = self.config, self.generator, len(images)
        device = images.device
        boxes = view_ops.sample_crop_boxes(n, images.shape[-2], images.shape[-1], pipe.scale,
                                           CROP_RATIO, gen)
        flip = torch.rand(n, generator=gen) < cfg.flip_p
        jitter = torch.rand(n, generator=gen) < cfg.jitter_p
        spans = torch.tensor([cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue])
        # torchvision's ranges: factors in [max(0, 1 - s), 1 + s] multiply; hue in [-h, h] shifts.
        low = torch.cat([(1 - spans[:3]).clamp(min=0), -spans[3:]])
        high = torch.cat([1 + spans[:3], spans[3:]])
        factors = low + torch.rand(n, 4, generator=gen) * (high - low)
        factors = torch.where(jitter.unsqueeze(1), factors, torch.tensor([1.0, 1.0, 1.0, 0.0]))
        order = torch.randperm(4, generator=gen).tolist()
        gray = torch.rand(n, generator=gen) < cfg.gray_p
        sigma = torch.empty(n).uniform_(*BLUR_SIGMA, generator=gen)
        sigma = torch.where(torch.rand(n, generator=gen) < pipe.blur_p, sigma, torch.zeros(()))
        solarize = torch.rand(n, generator=gen) < pipe.solarize_p
        params = to_device(torch.cat([boxes, flip[:, None], factors, gray[:, None], sigma[:, None],
                                      solarize[:, None]], dim=1), device)
        x = view_ops.resized_crop(images, params[:, :4], params[:, 4] > 0, pipe.size)
        if bool(jitter.any()):
            for step in order:
                if spans[step] > 0:
                    x = _JITTER_STEPS[step](x, params[:, 5 + step].to(x.dtype))
        if bool(gray.any()):
            x = view_ops.grayscale_where(x, params[:, 9] > 0)
        if bool((sigma > 0).any()):
            x = view_ops.gaussian_blur(x, params[:, 10], _blur_kernel(pipe.size))
        if bool(solarize.any()):
            x = view_ops.solarize_where(x, params[:, 11] > 0, SOLARIZE_THRESHOLD)
        return x

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
        images = images.float()
        mean, std = self.mean.to(images.device), self.std.to(images.device)  # no-ops once moved
        return [(self._view(images, pipe) - mean) / std for pipe in self.pipelines]

    def extra_repr(self) -> str:
        cfg = self.config
        return f"size={cfg.size}, local_crops={cfg.local_crops}, local_size={cfg.local_size}"
