"""The Runner protocol, backend availability and ``open_runner`` (no torch at import)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edge_ssl.runtime.errors import RunnerError

from edge_ssl.errors import BundleError, ConfigError
from edge_ssl.registry import did_you_mean

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


# -- availability ------------------------------------------------------------------------
def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _ort_providers() -> list[str] | str:
    if not _have("onnxruntime"):
        return "onnxruntime is not installed (pip install 'edge-ssl[cpu]' or 'edge-ssl[gpu]')"
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception as exc:  # a broken install must not break the listing
        return f"onnxruntime fails to import: {exc}"


def _ort_reason(provider: str, what: str) -> Callable[[], str | None]:
    def check() -> str | None:
        providers = _ort_providers()
        if isinstance(providers, str):
            return providers
        if provider not in providers:
            return (
                f"this onnxruntime has no {provider} (providers: {', '.join(providers)}); "
                f"{what}"
            )
        return None

    return check


def _torch_reason(cuda: bool) -> str | None:
    if not _have("torch"):
        return "torch is not installed (needed only for the torch backend and export)"
    if not cuda:
        return None
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)"
    return None


def _tensorrt_reason() -> str | None:
    if not _have("tensorrt"):
        return (
            "the tensorrt Python package is not installed (Jetson: it comes with JetPack; "
            "x86: NVIDIA TensorRT 10+); `edge-ssl build --trtexec` works without it"
        )
    if not (_have("cuda") or _have("torch")):
        return "tensorrt needs cuda-python (pip install cuda-python) or torch for GPU buffers"
    from edge_ssl.runtime.tensorrt import cuda_device_reason

    return cuda_device_reason()


_CHECKS: dict[str, Callable[[], str | None]] = {
    "tensorrt": _tensorrt_reason,
    "ort-tensorrt": _ort_reason(
        "TensorrtExecutionProvider", "install onnxruntime-gpu with TensorRT (never with onnxruntime)"
    ),
    "ort-cuda": _ort_reason("CUDAExecutionProvider", "install onnxruntime-gpu (never with onnxruntime)"),
    "ort": _ort_reason("CPUExecutionProvider", "reinstall onnxruntime"),
    "torch-cuda": lambda: _torch_reason(cuda=True),
    "torch": lambda: _torch_reason(cuda=False),
}


def available_backends() -> dict[str, str | None]:
    """Every backend in ``auto`` order -> None when usable here, else why not."""
    return {name: _CHECKS[name]() for name in BACKENDS}


def resolve_backend(name: str) -> str:
    """A qualified backend name from a user's spelling; ConfigError listing valid names."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "auto" or key in BACKENDS:
        return key
    valid = ("auto", *BACKENDS, *ALIASES)
    raise ConfigError(
        f"unknown backend {name!r}.{did_you_mean(name, list(valid))} Valid: {', '.join(valid)}."
    )


# -- open_runner -------------------------------------------------------------------------
def open_runner(
    bundle_or_path: Any,
    backend: str = "auto",
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    device: str | None = None,
    precision: str | None = None,
    provider_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Runner:
    """An (inactive) runner for a bundle, a bundle directory or a bare ``.onnx`` file.

    ``backend``: auto (fastest the bundle and this machine support), tensorrt,
    ort-tensorrt, ort-cuda, ort, torch-cuda or torch. ``providers`` overrides the
    onnxruntime providers; ``device`` the torch device; ``precision`` the torch CUDA
    precision (fp16 with CUDA graphs) or which engine to pick.
    """
    key = resolve_backend(backend)
    if _is_onnx_file(bundle_or_path):
        return _open_onnx_file(Path(bundle_or_path), key, threads, providers, provider_options)
    bundle = _as_bundle(bundle_or_path)
    if key == "auto":
        key = _auto_backend(bundle, precision)
    opener = _OPENERS[key.split("-")[0]]
    return opener(bundle, key, threads=threads, providers=providers, device=device,
                  precision=precision, provider_options=provider_options)


def _is_onnx_file(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix == ".onnx"


def _as_bundle(obj: Any) -> Any:
    from edge_ssl.bundle import Bundle

    return obj if isinstance(obj, Bundle) else Bundle.open(obj)


def _open_onnx_file(path: Path, key: str, threads: Any, providers: Any, options: Any) -> Runner:
    from edge_ssl.runtime.ort import OrtRunner, providers_for_backend

    if key == "auto":
        key = next((k for k in ("ort-tensorrt", "ort-cuda", "ort") if _CHECKS[k]() is None), "ort")
    if not key.startswith("ort"):
        raise RunnerError(
            f"{path} is a bare ONNX file: only the onnxruntime backends run it (got {key!r}). "
            "Use backend 'ort', or export a bundle for torch/TensorRT."
        )
    return OrtRunner(path, providers=providers or providers_for_backend(key), threads=threads,
                     provider_options=options)


def _auto_backend(bundle: Any, precision: str | None) -> str:
    """The first backend in BACKENDS that both this machine and the bundle support."""
    reasons = []
    for name in BACKENDS:
        why = _bundle_reason(bundle, name) or _CHECKS[name]()
        if why is None and name == "tensorrt":
            why = _engine_reason(bundle, precision)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise RunnerError(
        f"no backend can run {bundle.path} here:\n  " + "\n  ".join(reasons)
    )


def _engine_reason(bundle: Any, precision: str | None) -> str | None:
    from edge_ssl.runtime.tensorrt import find_engine

    try:
        find_engine(bundle, precision=precision)
    except RunnerError as exc:
        return str(exc)
    return None


def _bundle_reason(bundle: Any, name: str) -> str | None:
    if name == "tensorrt":
        return None if bundle_has_engines(bundle) else "the bundle has no TensorRT engine"
    if name.startswith("ort"):
        return None if bundle.has(ONNX_NAME) else f"the bundle has no {ONNX_NAME}"
    return None if bundle.has("model.pt") else "the bundle has no float weights (model.pt)"


def bundle_has_engines(bundle: Any) -> bool:
    return any(name.startswith("engines/") and name.endswith(".plan") for name in bundle.manifest.files)


def _open_ort(bundle: Any, key: str, *, threads: Any, providers: Any, provider_options: Any,
              **_: Any) -> Runner:
    from edge_ssl.runtime.ort import OrtRunner, providers_for_backend

    if not bundle.has(ONNX_NAME):
        raise BundleError(
            f"backend {key!r} runs {ONNX_NAME}, but {bundle.path} has none (files: "
            f"{', '.join(sorted(bundle.manifest.files))}). Export it first: "
            f"`edge-ssl export {bundle.path} --out EXPORTED.edge`, or use --backend torch."
        )
    return OrtRunner(bundle.file(ONNX_NAME), input_spec=bundle.manifest.input,
                     providers=providers or providers_for_backend(key), threads=threads,
                     provider_options=provider_options, precision=bundle.manifest.precision)


def _open_torch(bundle: Any, key: str, *, threads: Any, device: Any, precision: Any,
                **_: Any) -> Runner:
    from edge_ssl.runtime.torch_runner import TorchRunner

    if device is None:
        device = "cuda" if key == "torch-cuda" else "cpu"
    return TorchRunner(bundle, device=device, precision=precision or "fp32", threads=threads)


def _open_tensorrt(bundle: Any, key: str, *, precision: Any, **_: Any) -> Runner:
    from edge_ssl.runtime.tensorrt import TensorRTRunner, find_engine

    return TensorRTRunner(find_engine(bundle, precision=precision), input_spec=bundle.manifest.input)


_OPENERS: dict[str, Callable[..., Runner]] = {
    "ort": _open_ort,
    "torch": _open_torch,
    "tensorrt": _open_tensorrt,
}
