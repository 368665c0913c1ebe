"""The edge-ssl error hierarchy: one root, each subclass also a matching builtin."""

from __future__ import annotations


class EdgeSSLError(Exception):
    """Root of every error edge-ssl raises on purpose.

    Messages say what failed, what was received, what is allowed and how to fix it.
    """


class ConfigError(EdgeSSLError, ValueError):
    """A setting, name or argument is not valid."""


class MissingDependencyError(EdgeSSLError, ImportError):
    """An optional package is needed for this feature and is not installed."""


class BundleError(EdgeSSLError, ValueError):
    """A bundle cannot be read or written."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, truncated or does not match its recorded sha256."""


class DataError(EdgeSSLError, ValueError):
    """A data source is missing, empty or in a format edge-ssl cannot read."""


class CheckpointError(EdgeSSLError, ValueError):
    """A checkpoint is corrupt, unsafe to load, or does not fit the architecture."""


class TrainingError(EdgeSSLError, RuntimeError):
    """Training cannot go on (for example the loss became NaN or inf)."""


class OutputExistsError(ConfigError, BundleError):
    """An output location is taken (a bundle without --overwrite, or something that is not one)."""
