"""The one place that turns a device name ('auto', 'cpu', 'cuda', 'cuda:N') into a torch.device."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from edge_ssl.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")
_CUDA_NAME = re.compile(r"^cuda(?::(\d+))?$")


def parse_device_name(name: str) -> tuple[str, int | None]:
    """Check a device name without importing torch: -> ('auto'|'cpu'|'cuda', index or None)."""
    if not isinstance(name, str):
        raise ConfigError(f"device must be a string ({', '.join(DEVICE_NAMES)}); got {name!r}.")
    text = name.strip().lower()
    if text in ("auto", "cpu"):
        return text, None
    match = _CUDA_NAME.match(text)
    if match is None:
        raise ConfigError(
            f"unknown device {name!r}; use one of {', '.join(DEVICE_NAMES)} "
            "(for example --device cuda:1)."
        )
    return "cuda", None if match.group(1) is None else int(match.group(1))


def resolve_device(name: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """'auto'|'cpu'|'cuda'|'cuda:N' -> a torch.device; CUDA devices always carry an index.

    'auto' picks CUDA when torch sees a GPU. A CUDA name without an index becomes
    ``cuda:<local_rank>`` (the torchrun LOCAL_RANK under DDP) or the current CUDA device,
    so the result is always safe for ``torch.cuda.set_device`` and ``device_ids=[...]``
    (``torch.device('cuda')`` has no index and torch refuses it there).
    """
    import torch

    kind, index = parse_device_name(name)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was requested but torch {torch.__version__} sees no CUDA GPU "
            f"(built for CUDA {torch.version.cuda}); use --device cpu or auto, or run on a "
            "machine with an NVIDIA GPU and a CUDA build of torch."
        )
    count = int(torch.cuda.device_count())
    if index is None:
        index = local_rank if local_rank is not None else int(torch.cuda.current_device())
    if not 0 <= index < count:
        raise ConfigError(
            f"device 'cuda:{index}' does not exist: torch sees {count} GPU(s), indices "
            f"0..{count - 1}. Pick one of those (or check CUDA_VISIBLE_DEVICES / --nproc-per-node)."
        )
    return torch.device("cuda", index)


def activate_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device (kernels and NCCL go there); no-op on CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)


def device_kind(name: str) -> str:
    """'cuda' or 'cpu': what ``resolve_device(name)`` will give, without checking indices."""
    kind, _ = parse_device_name(name)
    if kind != "auto":
        return kind
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
