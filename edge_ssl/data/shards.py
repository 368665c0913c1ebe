"""A compact index of image samples in folders and WebDataset .tar shards, read without decoding."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.data.sources import (
    IMAGE_EXTENSIONS,
    describe_skipped,
    detect_format,
    list_image_files,
    split_mask,
)
from edge_ssl.errors import DataError

SHARD_SUFFIX = ".tar"
#: Extensions a WebDataset sample may carry its image under (``key.jpg``, ``key.png``...).
SHARD_IMAGE_EXTENSIONS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
LABEL_EXTENSION = "cls"
_STREAMABLE = (
    "Streamable: image folders (class subfolders or flat), WebDataset .tar shards "
    "(key.jpg/key.png + optional key.cls), folders of .tar shards, or a list of these."
)


@dataclass(frozen=True, eq=False)
class SampleIndex:
    """Where every sample's encoded bytes live: file, byte offset and size (-1: the whole file).

    Arrays instead of Python objects: an index of millions of samples is shared with
    DataLoader workers by fork without copy-on-write growth (about 30 bytes per sample
    plus the file names).
    """

    files: np.ndarray  # bytes paths, dtype "S"
    file_ids: np.ndarray  # int32 per sample
    offsets: np.ndarray  # int64 per sample
    sizes: np.ndarray  # int64 per sample; -1 = read the whole file
    labels: np.ndarray | None  # int64 per sample, or None when unlabeled
    class_names: tuple[str, ...] | None
    description: str
    skipped_files: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return int(self.file_ids.shape[0])

    def name(self, i: int) -> str:
        """A readable name of sample ``i`` (its file, or shard:offset)."""
        path = os.fsdecode(self.files[self.file_ids[i]])
        return path if self.sizes[i] < 0 else f"{path}@{int(self.offsets[i])}"

    def read(self, i: int) -> bytes:
        """The encoded image bytes of sample ``i``."""
        path = os.fsdecode(self.files[self.file_ids[i]])
        with open(path, "rb") as handle:
            if self.sizes[i] < 0:
                return handle.read()
            handle.seek(int(self.offsets[i]))
            return handle.read(int(self.sizes[i]))

    def subset(self, indices: np.ndarray, description: str) -> SampleIndex:
        """The samples at ``indices`` (ints or a boolean mask), same files."""
        return SampleIndex(
            files=self.files,
            file_ids=self.file_ids[indices],
            offsets=self.offsets[indices],
            sizes=self.sizes[indices],
            labels=None if self.labels is None else self.labels[indices],
            class_names=self.class_names,
            description=description,
            skipped_files=self.skipped_files,
        )

    def split(self, test_fraction: float, seed: int) -> tuple[SampleIndex, SampleIndex]:
        """(train, test) exactly as :func:`edge_ssl.data.sources.split_dataset` splits, by labels when labeled."""
        is_test = split_mask(len(self), self.labels, test_fraction, seed)
        return (
            self.subset(~is_test, f"{self.description}, train part ({int((~is_test).sum())} images)"),
            self.subset(is_test, f"{self.description}, test part ({int(is_test.sum())} images)"),
        )

    def fingerprint(self) -> str:
        """Identity of the listing (names, offsets, sizes, labels): cheap, no image is read."""
        digest = hashlib.sha256()
        digest.update(b"\0".join(self.files))
        for array in (self.file_ids, self.offsets, self.sizes):
            digest.update(np.ascontiguousarray(array).tobytes())
        if self.labels is not None:
            digest.update(np.ascontiguousarray(self.labels).tobytes())
        return digest.hexdigest()[:16]


def is_shard_source(path: str | os.PathLike) -> bool:
    """True for a .tar file or a folder whose data is .tar shards."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == SHARD_SUFFIX
    return path.is_dir() and bool(_shards_in(path))


def build_index(
    sources: str | os.PathLike | Sequence[str | os.PathLike], *, limit: int | None = None
) -> SampleIndex:
    """Index every sample of ``sources`` (folders and .tar shards) without decoding an image."""
    paths = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not paths:
        raise DataError(f"got an empty list of data sources to stream. {_STREAMABLE}")
    parts = [_index_one(Path(p)) for p in paths]
    index = _concatenate(parts) if len(parts) > 1 else parts[0]
    if len(index) == 0:
        skipped = describe_skipped(index.skipped_files)
        raise DataError(f"{index.description} holds no images{'; ' + skipped if skipped else ''}. {_STREAMABLE}")
    if limit is not None and limit < len(index):
        index = index.subset(np.arange(limit), f"{index.description}, first {limit}")
    return index


def _index_one(path: Path) -> SampleIndex:
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist. {_STREAMABLE}")
    if path.is_file() and path.suffix.lower() == SHARD_SUFFIX:
        return _index_shards([path], f"shard {path}")
    if path.is_dir():
        shards = _shards_in(path)
        if shards:
            return _index_shards(shards, f"{len(shards)} shards in {path}")
    fmt = detect_format(path)
    if fmt in ("npz", "cifar10-python"):
        raise DataError(
            f"{path} is a {fmt} source, which holds decoded arrays and is loaded in memory; "
            f"use --stream auto or off for it. {_STREAMABLE}"
        )
    entries, class_names, skipped = list_image_files(path, labeled=fmt == "image-folder")
    files = np.array([os.fsencode(file) for file, _ in entries] or [b""], dtype=np.bytes_)
    count = len(entries)
    labels = np.array([label for _, label in entries], dtype=np.int64) if class_names is not None else None
    what = f"{len(class_names)} classes" if class_names is not None else "unlabeled"
    return SampleIndex(
        files=files if count else files[:0],
        file_ids=np.arange(count, dtype=np.int32),
        offsets=np.zeros(count, dtype=np.int64),
        sizes=np.full(count, -1, dtype=np.int64),
        labels=labels,
        class_names=class_names,
        description=f"{fmt} {path} ({count} images, {what})",
        skipped_files=tuple(skipped),
    )


def _shards_in(folder: Path) -> list[Path]:
    # The suffix test comes first: a flat folder of a million images costs no stat calls.
    try:
        with os.scandir(folder) as entries:
            return sorted(
                Path(e.path) for e in entries if e.name.lower().endswith(SHARD_SUFFIX) and e.is_file()
            )
    except OSError as exc:
        raise DataError(f"cannot list folder {str(folder)!r}: {exc}.") from exc


def _index_shards(shards: list[Path], description: str) -> SampleIndex:
    file_ids, offsets, sizes, labels = [], [], [], []
    skipped: list[tuple[str, str]] = []
    for shard_id, shard in enumerate(shards):
        for offset, size, label in _scan_shard(shard, skipped):
            file_ids.append(shard_id)
            offsets.append(offset)
            sizes.append(size)
            labels.append(label)
    labeled = bool(labels) and all(label >= 0 for label in labels)
    count = len(file_ids)
    return SampleIndex(
        files=np.array([os.fsencode(s) for s in shards], dtype=np.bytes_),
        file_ids=np.array(file_ids, dtype=np.int32),
        offsets=np.array(offsets, dtype=np.int64),
        sizes=np.array(sizes, dtype=np.int64),
        labels=np.array(labels, dtype=np.int64) if labeled else None,
        class_names=None,
        description=f"webdataset {description} ({count} images, {'labeled' if labeled else 'unlabeled'})",
        skipped_files=tuple(skipped),
    )


def _scan_shard(shard: Path, skipped: list[tuple[str, str]]) -> list[tuple[int, int, int]]:
    """(data offset, size, label or -1) per sample of a WebDataset shard, in shard order.

    Only the 512-byte headers are read (the data is seeked over), plus the tiny .cls members.
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with open(shard, "rb") as handle:
            try:
                members = _plain_members(handle)
            except _NeedsTarfile:
                members = _tarfile_members(shard)
            for name, offset, size in members:
                key, _, ext = _split_key(name)
                samples.setdefault(key, {})[ext.lower()] = (offset, size)
            return [
                item
                for key, found in samples.items()
                if (item := _sample_entry(handle, shard, key, found, skipped)) is not None
            ]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot read shard {shard}: {exc} (a truncated, corrupt or compressed tar? "
            "shards must be uncompressed .tar so samples can be read by offset)."
        ) from exc


class _NeedsTarfile(Exception):
    """The shard uses a tar feature the plain header reader leaves to the tarfile module."""


def _plain_members(handle: Any) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a ustar/GNU tar, from its headers only.

    About 20x faster than iterating tarfile's TarInfo objects, which matters at a million
    samples. Long names (GNU 'L', pax 'x'/'g' records) and bad checksums go to tarfile.
    """
    end = os.fstat(handle.fileno()).st_size
    members, position = [], 0
    while position + 512 <= end:
        handle.seek(position)
        header = handle.read(512)
        if header == b"\0" * 512:
            return members
        if _checksum(header) != _octal(header[148:156]):
            raise _NeedsTarfile
        kind, size = header[156:157], _octal(header[124:136])
        if kind in (b"L", b"K", b"x", b"g"):
            raise _NeedsTarfile
        if position + 512 + size > end:
            raise tarfile.ReadError(f"member at byte {position} runs past the end of the file")
        if kind in (b"0", b"\0"):
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            members.append((os.fsdecode(prefix + b"/" + name if prefix else name), position + 512, size))
        position += 512 + (size + 511) // 512 * 512
    raise _NeedsTarfile  # no end-of-archive marker: let tarfile decide whether it is truncated


def _checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:])


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        raise _NeedsTarfile
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise _NeedsTarfile from None


def _tarfile_members(shard: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(shard, "r:") as archive:
        return [(m.name, m.offset_data, m.size) for m in archive if m.isfile()]


def _split_key(name: str) -> tuple[str, str, str]:
    """WebDataset convention: the key is everything before the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, ext


def _sample_entry(
    handle: Any, shard: Path, key: str, members: dict[str, tuple[int, int]],
    skipped: list[tuple[str, str]],
) -> tuple[int, int, int] | None:
    image = next((members[ext] for ext in sorted(members) if ext in SHARD_IMAGE_EXTENSIONS), None)
    if image is None:
        found = ", ".join("." + ext for ext in sorted(members))
        skipped.append((f"{shard.name}:{key}", f"no image in the sample (found {found})"))
        return None
    label = -1
    if LABEL_EXTENSION in members:
        offset, size = members[LABEL_EXTENSION]
        handle.seek(offset)
        text = handle.read(min(size, 64)).decode("utf-8", "replace").strip()
        if not text.isdigit():
            raise DataError(
                f"shard {shard}: sample {key!r} has a .cls of {text[:20]!r}; it must hold one "
                "non-negative integer class id (e.g. '3')."
            )
        label = int(text)
    return image[0], image[1], label


def _concatenate(parts: list[SampleIndex]) -> SampleIndex:
    files, file_ids, start = [], [], 0
    for part in parts:
        files.append(part.files)
        file_ids.append(part.file_ids.astype(np.int64) + start)
        start += len(part.files)
    names = {part.class_names for part in parts}
    labeled = all(part.labels is not None for part in parts) and len(names) == 1
    return SampleIndex(
        files=np.concatenate(files).astype(np.bytes_),
        file_ids=np.concatenate(file_ids).astype(np.int32),
        offsets=np.concatenate([p.offsets for p in parts]),
        sizes=np.concatenate([p.sizes for p in parts]),
        labels=np.concatenate([p.labels for p in parts]) if labeled else None,
        class_names=parts[0].class_names if labeled else None,
        description=" + ".join(p.description for p in parts),
        skipped_files=tuple(item for p in parts for item in p.skipped_files),
    )


def estimate_decoded_bytes(index: SampleIndex, probes: int = 32) -> int:
    """Decoded RGB bytes of the whole index, from the headers of ``probes`` evenly spread images."""
    import io

    from PIL import Image

    count = len(index)
    picks = np.unique(np.linspace(0, count - 1, num=min(probes, count)).astype(np.int64))
    pixels = []
    for i in picks:
        try:
            with Image.open(io.BytesIO(index.read(int(i)))) as image:  # header only, no decode
                pixels.append(image.size[0] * image.size[1])
        except (OSError, ValueError, SyntaxError, EOFError):
            continue
    mean_pixels = float(np.mean(pixels)) if pixels else 0.0
    return int(mean_pixels * 3 * count)
