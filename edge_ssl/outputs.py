"""Check output locations before the expensive work: bundle paths and writable folders."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from edge_ssl.errors import ConfigError, OutputExistsError


def require_writable_dir(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, or raise ConfigError."""
    folder = Path(folder)
    probe = folder / f".edge-ssl-write-test-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {folder} ({exc.strerror or exc}); pick a writable location with {flag}."
        ) from None
    return folder


def check_bundle_out(out: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse a bundle destination that cannot be written, before any work (every stage and
    BundleWriter use this one check).

    ``out`` must not exist (or be a bundle and ``overwrite`` given); a file or a folder
    that is not a bundle is never replaced. Its parent folder must be writable.
    """
    out = Path(out)
    is_bundle = out.is_dir() and (out / "manifest.json").is_file()
    if out.exists() and not is_bundle:
        raise OutputExistsError(
            f"{flag} {out} already exists and is not a bundle; refusing to replace it (even with "
            f"--overwrite). Choose another {flag}."
        )
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another {flag} or pass --overwrite.")
    require_writable_dir(out.parent, flag)
    return out
