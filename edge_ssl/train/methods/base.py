"""The SSLMethod base class and what methods share: configs, MLP heads, EMA, loss helpers."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from edge_ssl.config import check_fields, check_number
from edge_ssl.errors import ConfigError
from edge_ssl.registry import Registry

R = TypeVar("R")

#: ``(loss, logs)``: what a method returns for one batch of views.
StepOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]

# ---------------------------------------------------------------------------
# Configs


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of the per-method frozen configs: each field is checked by its annotation and
    its field helper (:func:`edge_ssl.config.positive` and the like), through
    :func:`edge_ssl.config.check_fields`, the one set of validators."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclasses.dataclass(frozen=True)
class ProjectionConfig(MethodConfig):
    """The projector settings the methods share (SimCLR, SimSiam, VICReg, Barlow Twins):
    ``projection_layers`` linear layers ``projection_hidden_dim`` wide, out to
    ``projection_dim``. Subclasses change the defaults and add their own fields."""

    projection_hidden_dim: int = 2048
    projection_dim: int = 2048
    projection_layers: int = 3


# ---------------------------------------------------------------------------
# Heads


def mlp_head(
    dims: Sequence[int],
    *,
    batch_norm: bool = True,
    activation: type[nn.Module] = nn.ReLU,
    hidden_bias: bool | None = None,
    last_bias: bool = True,
    last_batch_norm: bool = False,
    last_affine: bool = True,
) -> nn.Sequential:
    """Linear [-> BN] -> act for each hidden layer, then Linear [-> BN] for the output.

    ``dims`` is ``(in, hidden..., out)``. Hidden linears drop their bias when a
    BatchNorm follows (the BN shift makes it redundant) unless ``hidden_bias`` says
    otherwise; the output linear drops it when ``last_batch_norm`` is set.
    """
    dims = [int(d) for d in dims]
    if len(dims) < 2 or min(dims) < 1:
        raise ConfigError(f"mlp_head needs (in, ..., out) dims >= 1; got {dims}.")
    bias = (not batch_norm) if hidden_bias is None else hidden_bias
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1], strict=True):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(activation())
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias and not last_batch_norm))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_affine))
    return nn.Sequential(*layers)


def layer_dims(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> list[int]:
    """(in, hidden, ..., hidden, out) for an MLP with ``num_layers`` linear layers."""
    return [in_dim, *([hidden_dim] * (num_layers - 1)), out_dim]


# ---------------------------------------------------------------------------
# Momentum networks and schedules


def check_progress(progress: float) -> float:
    """Training progress (step / total_steps) as a float in [0, 1]."""
    return check_number("", "progress (optimizer steps done / planned total)", progress, 0.0, 1.0)


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` at progress 0 to ``end`` at progress 1.

    BYOL (arXiv:2006.07733, Sec. 3.2) and DINO (arXiv:2104.14294, Sec. 3.1) raise the
    EMA momentum with ``1 - (1 - base) * (cos(pi * progress) + 1) / 2``, which is
    ``cosine_schedule(base, 1.0, progress)``.
    """
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with gradients off: the start of a target/teacher network."""
    target = copy.deepcopy(module)
    for param in target.parameters():
        param.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for every parameter.

    Buffers (BatchNorm running statistics) are not averaged: the target keeps its
    own, updated by its forward passes in train mode, as in the papers' code.
    """
    if momentum >= 1.0:
        return
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if len(target_params) != len(online_params):
        raise ConfigError(
            f"momentum network has {len(target_params)} parameters but the online network "
            f"has {len(online_params)}; they must have the same structure."
        )
    torch._foreach_lerp_(target_params, [p.detach() for p in online_params], 1.0 - momentum)


def follow_online(
    base_momentum: float, progress: float, *pairs: tuple[nn.Module, nn.Module]
) -> float:
    """EMA of each ``(target, online)`` pair after an optimizer step, the momentum raised
    from ``base_momentum`` to 1 on a cosine over training (BYOL, DINO); returns it."""
    momentum = cosine_schedule(base_momentum, 1.0, check_progress(progress))
    for target, online in pairs:
        ema_update(target, online, momentum)
    return momentum


# ---------------------------------------------------------------------------
# Small tensor helpers


def full_precision(tensor: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context that turns autocast off on ``tensor``'s device, for loss arithmetic.

    Under autocast, matmuls run in half precision even on float32 inputs; the
    cross-correlation, covariance and similarity matrices of the losses need float32.
    Devices without autocast (meta, for one) get a context that does nothing.
    """
    if not torch.amp.is_autocast_available(tensor.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def loss_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs go up to float32 (sums and exps overflow in fp16); others stay."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def float32_loss(loss: Callable[..., R]) -> Callable[..., R]:
    """Run the loss method ``loss`` with autocast off and half-precision tensor arguments
    (and sequences of tensors) in float32; see :func:`full_precision` and :func:`loss_dtype`.

    The first tensor argument's device decides the autocast context.
    """

    @functools.wraps(loss)
    def run(self: nn.Module, *args: Any, **kwargs: Any) -> R:
        args = tuple(map(_loss_inputs, args))
        first = next((v for v in args if isinstance(v, torch.Tensor)), None)
        if first is None:
            first = next((v[0] for v in args if isinstance(v, list) and v), None)
        with full_precision(first) if first is not None else contextlib.nullcontext():
            return loss(self, *args, **kwargs)

    return run


def _loss_inputs(value: Any) -> Any:
    """A tensor, or a sequence of tensors (as a list), in its loss dtype; anything else as is."""
    if isinstance(value, torch.Tensor):
        return loss_dtype(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [loss_dtype(v) for v in value]
    return value


def off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square (D, D) matrix as a flat (D * (D - 1),) tensor."""
    size = matrix.shape[0]
    return matrix.flatten()[:-1].view(size - 1, size + 1)[:, 1:].flatten()


@torch.no_grad()
def embedding_std(features: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of l2-normalized (N, D) embeddings, for collapse monitoring.

    About ``1 / sqrt(D)`` for well-spread embeddings; 0 when all samples collapse to
    one point (SimSiam, arXiv:2011.10566, Sec. 4.1).
    """
    normalized = F.normalize(features.detach().float().flatten(1), dim=1)
    return normalized.std(dim=0).mean()


def encode_grouped(encoder: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Encode views, one forward per run of same-sized consecutive views; (V * N, D) out.

    Global crops share a resolution and local crops another, so a multi-crop batch
    costs two forwards instead of one per view (DINO's MultiCropWrapper).
    """
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        chunk = views[start] if end == start + 1 else torch.cat(list(views[start:end]))
        outputs.append(encoder(chunk))
        start = end
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


# ---------------------------------------------------------------------------
# The base class and its registry

#: Name -> SSLMethod subclass; each method's class line registers it (see SSLMethod).
METHODS: Registry[type[SSLMethod]] = Registry("SSL method")


class SSLMethod(nn.Module):
    """An SSL method: the encoder being trained, its heads, target networks and loss.

    ``forward(views)`` checks the views and returns :meth:`step`'s ``(loss, logs)``: a
    scalar loss to backpropagate and a dict of detached scalars (``loss``; ``std``, the
    spread of the l2-normalized encoder embeddings of the first view, to spot
    collapse; method terms).

    A method states what it is in its class line and is registered in :data:`METHODS`
    under ``name`` (also the name of its view preset)::

        class SimCLR(SSLMethod, name="simclr", config=SimCLRConfig,
                     optimizer="lars", lr=0.3, weight_decay=1e-6): ...

    ``lr`` is the base learning rate per 256 images.
    """

    name: ClassVar[str]
    view_preset: ClassVar[str]
    default_optimizer: ClassVar[str]
    default_lr: ClassVar[float]
    default_weight_decay: ClassVar[float]
    config_class: ClassVar[type[MethodConfig]]

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        config: type[MethodConfig] | None = None,
        optimizer: str = "",
        lr: float = 0.0,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:  # a subclass that shares code, not a method of its own
            return
        if config is None or not optimizer or lr <= 0:
            raise ConfigError(
                f"SSL method {name!r} ({cls.__name__}) must name its config class, optimizer "
                f"and lr in its class line; got config={config}, optimizer={optimizer!r}, "
                f"lr={lr}. See SSLMethod's docstring."
            )
        cls.name = cls.view_preset = name
        cls.config_class = config
        cls.default_optimizer, cls.default_lr, cls.default_weight_decay = optimizer, lr, weight_decay
        METHODS.register(name)(cls)

    def __init__(self, encoder: nn.Module, config: MethodConfig) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise ConfigError(
                f"{self.name} needs the encoder as a torch.nn.Module; got {type(encoder).__name__}."
            )
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{self.name} needs a {self.config_class.__name__}; got {type(config).__name__}. "
                f"Build methods with create_method({self.name!r}, encoder, **settings)."
            )
        self.embed_dim = encoder_embed_dim(encoder)
        self.encoder = encoder
        self.config = config
        self.num_views = 2

    @property
    def num_local_views(self) -> int:
        """Extra low-resolution crops ``forward`` expects after the global views."""
        return 0

    def forward(self, views: Sequence[torch.Tensor]) -> StepOutput:
        self._check_views(views)
        return self.step(views)

    def step(self, views: Sequence[torch.Tensor]) -> StepOutput:
        """``(loss, logs)`` for views that passed the checks.

        This default encodes each view apart, projects it with ``self.projector`` and
        scores the two projections with ``self.criterion.components(z1, z2)`` (a dict
        of ``loss`` and its terms, all logged): Barlow Twins and VICReg. Other methods
        override it.
        """
        h1, h2 = self.encoder(views[0]), self.encoder(views[1])
        terms = self.criterion.components(self.projector(h1), self.projector(h2))
        return self.output(terms, h1)

    @staticmethod
    def output(
        terms: torch.Tensor | dict[str, torch.Tensor], embeddings: torch.Tensor, **extra: Any
    ) -> StepOutput:
        """``(loss, logs)`` from the loss (or a dict of ``loss`` and its terms) and the first
        view's encoder embeddings, logged as their spread ``std``; ``extra`` is logged too."""
        terms = terms if isinstance(terms, dict) else {"loss": terms}
        return terms["loss"], detached_logs(**terms, std=embedding_std(embeddings), **extra)

    def projection_head(self, layers: int | None = None, **head_kwargs: Any) -> nn.Module:
        """The MLP from the embedding to the config's ``projection_dim`` through ``layers``
        (default: the config's ``projection_layers``) layers of ``projection_hidden_dim``;
        ``head_kwargs`` go to :func:`mlp_head`."""
        config = self.config
        layers = config.projection_layers if layers is None else layers
        dims = layer_dims(self.embed_dim, config.projection_hidden_dim, config.projection_dim, layers)
        return mlp_head(dims, **head_kwargs)

    def prediction_head(self) -> nn.Module:
        """The predictor ``projection_dim -> prediction_hidden_dim -> projection_dim``
        (BYOL, SimSiam): Linear-BN-ReLU-Linear, as in both papers."""
        config = self.config
        return mlp_head([config.projection_dim, config.prediction_hidden_dim, config.projection_dim])

    def momentum_update(self, progress: float) -> None:
        """Update target networks after an optimizer step; no target network here."""
        check_progress(progress)

    def trained_encoder(self) -> nn.Module:
        """The encoder to keep after training."""
        return self.encoder

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters split for the optimizer: no weight decay on biases and norms.

        As in DINO's ``get_params_groups``: 1-D tensors (biases, norm scales and
        shifts) get ``weight_decay=0``. Frozen parameters (target networks) are left
        out. Empty groups are dropped.
        """
        check_number("", "weight_decay", weight_decay, low=0)
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim <= 1 or name.endswith(".bias"):
                no_decay.append(param)
            else:
                decay.append(param)
        groups = [
            {"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return [group for group in groups if group["params"]]

    def _check_views(self, views: Sequence[torch.Tensor]) -> None:
        expected = self.num_views + self.num_local_views
        if not isinstance(views, (list, tuple)) or len(views) != expected:
            got = (
                f"{len(views)} views" if isinstance(views, (list, tuple)) else type(views).__name__
            )
            local = f" ({self.num_views} global + {self.num_local_views} local)"
            raise ConfigError(
                f"{self.name} expects a list of {expected} views{local if self.num_local_views else ''}"
                f"; got {got}. Build the views with the {self.view_preset!r} preset."
            )
        batch = None
        for index, view in enumerate(views):
            if not isinstance(view, torch.Tensor) or view.ndim != 4:
                shape = tuple(view.shape) if isinstance(view, torch.Tensor) else type(view).__name__
                raise ConfigError(
                    f"{self.name} view {index} must be a float tensor (N, C, H, W); got {shape}."
                )
            batch = view.shape[0] if batch is None else batch
            if view.shape[0] != batch:
                raise ConfigError(
                    f"{self.name} views must share one batch size; view 0 has {batch} images, "
                    f"view {index} has {view.shape[0]}."
                )
        if batch is not None and batch < 2:
            raise ConfigError(
                f"{self.name} needs at least 2 images per view (batch statistics and "
                f"negatives need a batch); got {batch}."
            )


def encoder_embed_dim(encoder: nn.Module) -> int:
    """``encoder.spec.embed_dim``, with an error that says how to get an encoder with a spec."""
    spec = getattr(encoder, "spec", None)
    dim = getattr(spec, "embed_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(
            f"the encoder ({type(encoder).__name__}) needs a .spec attribute with an integer "
            f"embed_dim (an edge_ssl.spec.EncoderSpec); got spec={spec!r}. "
            "Build encoders with edge_ssl.models.create_encoder, or set encoder.spec."
        )
    return dim


def detached_logs(**values: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """Scalar logs as detached 0-d tensors on one device (no sync here; the trainer decides)."""
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
    logs: dict[str, torch.Tensor] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            logs[key] = value.detach().reshape(())
        else:
            # torch.full is a kernel; torch.tensor(..., device=cuda) is a blocking host copy.
            logs[key] = torch.full((), float(value), device=device)
    return logs
