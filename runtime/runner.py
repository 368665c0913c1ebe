"""The Runner protocol: what every backend implements (no torch at import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from edge_ssl.runtime.errors import RunnerError

#: Backends in the order ``auto`` tries them (fastest first, as DESIGN.md says).
BACKENDS = ("tensorrt", "ort-tensorrt", "ort-cuda", "ort", "torch-cuda", "torch")
#: Short names accepted by ``open_runner`` besides the qualified ones above.
ALIASES = {"onnxruntime": "ort", "ort-cpu": "ort", "trt": "tensorrt", "torch-cpu": "torch"}
ONNX_NAME = "model.onnx"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (None for a dynamic axis) and numpy dtype name of a runner input."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    def describe(self) -> str:
        dims = ", ".join("N" if d is None and i == 0 else ("?" if d is None else str(d))
                         for i, d in enumerate(self.shape))
        return f"{self.name}: {self.dtype} ({dims})"


class Runner:
    """Base of every backend: a context manager with an activate/deactivate lifecycle.

    ``infer(batch)`` takes a float32 NCHW batch shaped like ``input_specs()`` (normalized,
    unless ``info["normalization"] == "baked"``) and returns float32 (N, D) embeddings.
    Subclasses implement ``_activate``, ``_deactivate``, ``_infer`` and set ``_specs``.
    """

    backend = "base"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.backend
        self.is_active = False
        self.last_compute_ms: float | None = None
        self._specs: tuple[TensorSpec, ...] = ()
        self._info: dict[str, Any] = {"backend": self.backend, "name": self.name}
        self._trailing: tuple[int | None, ...] = ()
        self._dtype = np.dtype(np.float32)
        self._fixed_batch: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load the model and allocate what inference needs (idempotent errors are clear)."""
        if self.is_active:
            raise RunnerError(f"runner {self.name!r} is already active; deactivate() it first.")
        self._activate()
        if len(self._specs) != 1:
            self._deactivate()
            found = ", ".join(s.describe() for s in self._specs) or "none"
            raise RunnerError(
                f"{self.name}: an encoder graph has exactly one input; this one has {found}."
            )
        spec = self._specs[0]
        self._trailing = tuple(spec.shape[1:])
        self._dtype = np.dtype(spec.dtype)
        self._fixed_batch = spec.shape[0]
        self.is_active = True

    def deactivate(self) -> None:
        """Free the model and buffers; a no-op when not active."""
        if self.is_active:
            self.is_active = False
            self._deactivate()

    close = deactivate

    # -- inference -------------------------------------------------------------------------
    def input_specs(self) -> dict[str, TensorSpec]:
        self._require_active("input_specs")
        return {spec.name: spec for spec in self._specs}

    @property
    def info(self) -> dict[str, Any]:
        """backend, name, providers, precision, versions, normalization (a copy)."""
        return dict(self._info)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings for one batch; validates shape and dtype against the input spec."""
        if not self.is_active:
            self._require_active("infer")
        if type(batch) is not np.ndarray or (batch.dtype is not self._dtype and batch.dtype != self._dtype):
            self._bad_input(batch)
        shape = batch.shape
        # Fast path: static image dims equal and no fixed batch; anything else takes _fits.
        if (shape[1:] != self._trailing or self._fixed_batch is not None or not shape[0]) and (
            len(shape) != len(self._trailing) + 1 or not self._fits(shape)
        ):
            self._bad_input(batch)
        return self._infer(batch)

    __call__ = infer

    def _fits(self, shape: tuple[int, ...]) -> bool:
        if shape[0] < 1 or (self._fixed_batch is not None and shape[0] != self._fixed_batch):
            return False
        return all(want is None or want == got for want, got in zip(self._trailing, shape[1:], strict=False))

    def _bad_input(self, batch: Any) -> None:
        spec = self._specs[0]
        if not isinstance(batch, np.ndarray):
            found = type(batch).__name__
        else:
            found = f"{batch.dtype} {tuple(batch.shape)}"
        raise RunnerError(
            f"{self.name}: input {spec.name!r} expects {spec.describe()} (N = batch size"
            f"{'' if self._fixed_batch is None else f' fixed at {self._fixed_batch}'}); got "
            f"{found}. Preprocess uint8 NHWC images with "
            "edge_ssl.runtime.preprocess.preprocess_images(images, input_spec)."
        )

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise RunnerError(
                f"{self.name}: {what}() needs an active runner; use `with runner:` or call "
                "runner.activate() first."
            )

    # -- for subclasses --------------------------------------------------------------------
    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def max_batch_size(self) -> int | None:
        """The only batch size a static graph accepts, None when the batch axis is dynamic."""
        return self._fixed_batch

    def device_memory_mb(self) -> float | None:
        """Peak accelerator memory this runner used, in MiB (None when not known)."""
        return None

    #: Largest batch a dynamic graph accepts (a TensorRT profile's max); None: no limit.
    batch_limit: int | None = None
