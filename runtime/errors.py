"""Errors of the runtime: runners, parity checks and TensorRT engines."""

from __future__ import annotations

from edge_ssl.errors import EdgeSSLError


class RunnerError(EdgeSSLError, RuntimeError):
    """A runner cannot be opened or fed (bad input, missing file, unusable backend)."""


class ParityError(EdgeSSLError, ValueError):
    """An exported graph's outputs differ from the torch model's beyond the tolerance."""


class EngineError(RunnerError):
    """A TensorRT engine cannot be built, refit or opened on this device."""


class ProviderFallbackWarning(RuntimeWarning):
    """onnxruntime silently dropped a requested execution provider (usually to CPU)."""
