"""Lineage parents found by their manifest sha256, never by a stored path alone."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from edge_ssl.bundle import MANIFEST_NAME, WEIGHTS_NAME, Bundle, LineageEntry
from edge_ssl.errors import BundleError

#: Extra folders (os.pathsep-separated) searched for lineage parents, e.g. where stage
#: bundles were copied: each folder, its ``*.stages/`` subfolders and bundles inside.
SEARCH_PATH_ENV = "EDGE_SSL_BUNDLE_PATH"
STAGES_SUFFIX = ".stages"


class MissingParentError(BundleError):
    """A lineage parent (by manifest sha256) is nowhere it could be looked for."""


def search_folders(bundle: Bundle) -> list[Path]:
    """Where ``bundle``'s parents are looked for, in order: beside the bundle, the stages
    folders beside it, and every folder of $EDGE_SSL_BUNDLE_PATH (with its stages folders)."""
    roots = [bundle.path.resolve().parent]
    roots += [Path(p) for p in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep) if p]
    folders: list[Path] = []
    for root in roots:
        for folder in (root, *_stages_folders(root)):
            if folder not in folders:
                folders.append(folder)
    return folders


def _stages_folders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.name.endswith(STAGES_SUFFIX) and p.is_dir())
    except OSError:
        return []


def _manifest_sha256(folder: Path) -> str | None:
    try:
        return hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
    except OSError:
        return None


def _candidates(entry: LineageEntry, folders: list[Path]) -> Iterator[Path]:
    if entry.parent_path:
        yield Path(entry.parent_path)
    for folder in folders:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            continue
        yield from children


def find_parent(bundle: Bundle, entry: LineageEntry | None = None) -> Bundle:
    """The parent named by ``entry`` (default: ``bundle``'s last lineage entry), found by its
    manifest sha256 at the recorded path or in :func:`search_folders`; verified on open.

    MissingParentError names the parent and every place looked when it is nowhere.
    """
    entry = entry or (bundle.manifest.lineage[-1] if bundle.manifest.lineage else None)
    if entry is None or not entry.parent:
        raise BundleError(f"{bundle.path} has no lineage parent (it is a root bundle).")
    folders = search_folders(bundle)
    for path in _candidates(entry, folders):
        if _manifest_sha256(path) == entry.parent:
            return Bundle.open(path, verify=True)
    raise MissingParentError(
        f"the parent of {bundle.path} ({entry.parent_name!r}, manifest sha256 "
        f"{entry.parent[:16]}..., made by stage {entry.stage!r}'s input) is not at its recorded "
        f"path {entry.parent_path} nor in {', '.join(str(f) for f in folders)}. Copy that "
        f"bundle (or its {STAGES_SUFFIX}/ folder) beside this one, or name the folder that "
        f"holds it in ${SEARCH_PATH_ENV}."
    )


def find_float_ancestor(bundle: Bundle) -> Bundle | None:
    """``bundle`` if it holds float weights (``model.pt``), else the nearest ancestor that
    does, walking parent by parent; None only when the lineage ends without float weights.

    A parent that cannot be found by its hash stops the walk with MissingParentError: an
    older ancestor (say the teacher) is never taken in its place.
    """
    current = bundle
    while not current.has(WEIGHTS_NAME):
        if not current.manifest.lineage or not current.manifest.lineage[-1].parent:
            return None
        try:
            current = find_parent(current)
        except MissingParentError as exc:
            raise MissingParentError(
                f"{bundle.path} has no float weights ({WEIGHTS_NAME}) of its own, so they come "
                f"from its lineage, and {exc}"
            ) from None
    return current


def own_or_float_parent_file(bundle: Bundle, name: str, weights: Bundle | None = None) -> Path | None:
    """``bundle``'s file ``name`` or, when it has none (a quantized bundle), its float
    ancestor's (``weights`` when the caller already found it; looked up only when needed)."""
    if bundle.has(name):
        return bundle.file(name)
    holder = weights or find_float_ancestor(bundle)
    return holder.file(name) if holder is not None and holder.has(name) else None


def require_float_weights(bundle: Bundle, stage: str) -> Bundle:
    """``bundle`` or its float ancestor; BundleError saying what to do when there is none."""
    found = find_float_ancestor(bundle)
    if found is None:
        raise BundleError(
            f"{stage} needs float weights ({WEIGHTS_NAME}), but {bundle.path} is a "
            f"{bundle.manifest.precision} bundle with files {sorted(bundle.manifest.files)} and "
            "no ancestor with float weights. Pass the float bundle it was made from (see "
            "`edge-ssl inspect` for its lineage)."
        )
    return found
