"""Check output locations before the expensive work: bundle paths and writable folders."""

from __future__ import annotations

import os
import shutil
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


def checkpoint_dir(out: str | os.PathLike) -> Path:
    """Where a stage writing ``out`` keeps what it needs to resume: ``NAME.edge.ckpt/``."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def move_into_place(sources: dict[Path, Path]) -> None:
    """Rename each finished ``source`` to its destination, in the destination's folder.

    Earlier destinations are moved aside first and removed only once every new one is in
    place; if a rename fails, the ones done are undone and the earlier ones put back, so a
    reader sees the old set or the new one, never a mix.
    """
    aside: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for source, dest in sources.items():
            if dest.exists():
                aside[dest] = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(dest, aside[dest])
            os.replace(source, dest)
            done.append(dest)
    except OSError:
        for dest in done:
            shutil.rmtree(dest, ignore_errors=True)
        for dest, old in aside.items():
            os.replace(old, dest)
        raise
    for old in aside.values():
        shutil.rmtree(old, ignore_errors=True)
