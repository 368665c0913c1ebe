"""Which backends work here, and ``open_runner``: a bundle or .onnx file to a Runner."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_ssl.runtime.errors import RunnerError
from edge_ssl.runtime.runner import ALIASES, BACKENDS, ONNX_NAME, Runner

from edge_ssl.errors import BundleError, ConfigError
from edge_ssl.registry import did_you_mean


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
