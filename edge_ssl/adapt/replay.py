"""Replay images for adaptation: a few clean images a bundle carries to the device, so the
gradient steps can keep the deployed model's embeddings of clean images (``replay_weight``).

``edge-ssl adapt-tune`` draws them from its labeled clean images (never the probe it scores)
and writes them as ``adapt_replay.npz``; ``adapt`` reads them from the bundle, or from the
float parent of a quantized bundle.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_ssl.adapt.config import MIN_BATCH
from edge_ssl.bundle import Bundle
from edge_ssl.errors import BundleError, DataError
from edge_ssl.lineage import own_or_float_parent_file

REPLAY_FILE = "adapt_replay.npz"
#: The step settings a bundle with replay images records (``adapt_settings.json``): on the
#: held-out validation corruptions, alignment with replay recovered 0.67 of the significant
#: shifts at a 0.57-point clean drop, against 0.58 at 0.20 for AdaBN alone and 0.71 at 1.77
#: for alignment without replay (docs/adapt.md, "Replay").
REPLAY_STEP_SETTINGS = {"align_weight": 1.0, "replay_weight": 1.0}


def check_replay_images(images: object, source: str) -> np.ndarray:
    """``images`` as uint8 (N, H, W, 3) with N >= MIN_BATCH (one step's smallest batch), else DataError."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        kind = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(f"replay images ({source}) must be uint8 (N, H, W, 3); got {kind}.")
    if len(images) < MIN_BATCH:
        raise DataError(f"replay needs at least {MIN_BATCH} images; {source} has {len(images)}.")
    return images


def sample_replay(images: np.ndarray, labels: np.ndarray | None, count: int, seed: int) -> np.ndarray:
    """``count`` images spread evenly over the classes (or at random without labels), sorted."""
    return images[replay_indices(len(images), labels, count, seed)]


def replay_indices(total: int, labels: np.ndarray | None, count: int, seed: int) -> np.ndarray:
    """Sorted indices of ``count`` of ``total`` images, spread evenly over ``labels``' classes."""
    if count >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.choice(total, count, replace=False))
    order = rng.permutation(total)
    rank = np.empty(total, np.int64)  # position of each image within its class, in `order`
    for value in np.unique(labels):
        members = order[labels[order] == value]
        rank[members] = np.arange(len(members))
    return np.sort(order[np.argsort(rank[order], kind="stable")[:count]])


def choose_replay(images: np.ndarray, pool: np.ndarray, labels: np.ndarray | None, count: int,
                  max_mb: float, seed: int, say: Callable[[str], None]) -> np.ndarray | None:
    """Up to ``count`` images of ``images[pool]`` (class-balanced by ``labels``, one per pool
    entry) within ``max_mb`` MiB; None, said, when fewer than MIN_BATCH fit."""
    picked = choose_replay_indices(images, pool, labels, count, max_mb, seed, say)
    return None if picked is None else images[picked]


def choose_replay_indices(images: np.ndarray, pool: np.ndarray, labels: np.ndarray | None,
                          count: int, max_mb: float, seed: int,
                          say: Callable[[str], None]) -> np.ndarray | None:
    """The indices into ``images`` that :func:`choose_replay` takes (None when none fit)."""
    per_image = images[0].nbytes
    fits = min(count, int(max_mb * (1 << 20) // per_image))
    if fits < MIN_BATCH:
        say(f"replay: one image is {per_image / (1 << 20):.1f} MiB, so {max_mb:g} MiB holds fewer "
            f"than {MIN_BATCH}; none shipped")
        return None
    return pool[replay_indices(len(pool), labels, fits, seed)]


def replay_bytes(images: np.ndarray, labels: np.ndarray | None = None) -> bytes:
    """The ``adapt_replay.npz`` payload (uncompressed: the images are small); ``labels`` (y)
    make the replay images the device's labeled bank for keeping the best weights."""
    buffer = io.BytesIO()
    arrays = {"x": check_replay_images(images, "adapt-tune")}
    if labels is not None:
        arrays["y"] = np.asarray(labels).astype(np.int64)
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def replay_file(bundle: Bundle, weights: Bundle | None = None) -> Path | None:
    """``adapt_replay.npz`` of ``bundle`` or, for a quantized bundle, of its float parent."""
    return own_or_float_parent_file(bundle, REPLAY_FILE, weights)


def load_replay(bundle: Bundle, weights: Bundle | None = None) -> np.ndarray | None:
    """The bundle's replay images, or None when it has none; never unpickles."""
    found = load_replay_bank(bundle, weights)
    return None if found is None else found[0]


def load_replay_bank(bundle: Bundle, weights: Bundle | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(replay images, their labels or None) of the bundle, or None; never unpickles."""
    path = replay_file(bundle, weights)
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["x"]
            labels = archive["y"] if "y" in archive.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path} is not a readable replay file ({type(exc).__name__}: {exc}); "
                          "re-run edge-ssl adapt-tune, or adapt with replay_weight=0.") from exc
    try:
        images = check_replay_images(images, str(path))
    except DataError as exc:
        raise BundleError(str(exc)) from exc
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise BundleError(f"{path}: labels y must be integers, one per image; got {labels.dtype} "
                          f"{labels.shape}. Re-run edge-ssl adapt-tune.")
    return images, labels
