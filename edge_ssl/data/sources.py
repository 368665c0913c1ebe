"""Image data sources (.npz, CIFAR-10 python batches, image folders, the embedded digits) as uint8 arrays."""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.errors import ConfigError, DataError

EMBEDDED_DEFAULT_NAME = "digits"
SPLITS = ("all", "train", "test")
FORMATS = ("npz", "cifar10-python", "image-folder", "image-flat")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
#: Square size for image folders whose images do not all share one size.
MIXED_SIZE_DEFAULT = 64
CIFAR_DIR_NAME = "cifar-10-batches-py"

_EMBEDDED_SIZE = 32
_ACCEPTED = (
    "Accepted: a .npz file (key 'x' uint8 (N,H,W,3) or (N,H,W), optional 'y' and 'class_names'), "
    f"a CIFAR-10 python folder ({CIFAR_DIR_NAME} or its parent), a folder of class subfolders of "
    f"images, a flat folder of images ({' '.join(sorted(IMAGE_EXTENSIONS))}), a list of these, "
    f"or nothing for the embedded {EMBEDDED_DEFAULT_NAME!r} set."
)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images in memory: uint8 (N, H, W, 3) RGB with optional int64 labels.

    ``eq=False`` keeps identity equality and hashing: comparing arrays field by field
    would be ambiguous.
    """

    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None
    source: str
    skipped: int = 0
    #: (file, why it was skipped) for every skipped file, in the order they were met.
    skipped_files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = f"{images.dtype} array" if isinstance(images, np.ndarray) else type(images).__name__
            raise DataError(f"{self.source}: images must be a uint8 array (N, H, W, 3); got {got}.")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(
                f"{self.source}: images must be shaped (N, H, W, 3) RGB; got {tuple(images.shape)}."
            )
        object.__setattr__(self, "images", np.ascontiguousarray(images))
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(
                    f"{self.source}: labels must be a 1-D integer array; "
                    f"got {labels.dtype} {tuple(labels.shape)}."
                )
            if len(labels) != len(images):
                raise DataError(
                    f"{self.source}: {len(labels)} labels for {len(images)} images; "
                    "they must have the same length."
                )
            if len(labels) and labels.min() < 0:
                raise DataError(f"{self.source}: labels must be >= 0; found {int(labels.min())}.")
            object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        if self.class_names is not None:
            names = tuple(str(name) for name in self.class_names)
            if len(set(names)) != len(names):
                raise DataError(f"{self.source}: class_names must be unique; got {names}.")
            if self.labels is not None and len(self.labels) and self.labels.max() >= len(names):
                raise DataError(
                    f"{self.source}: label {int(self.labels.max())} has no class name "
                    f"({len(names)} class_names given)."
                )
            object.__setattr__(self, "class_names", names)
        if self.skipped < 0:
            raise DataError(f"{self.source}: skipped must be >= 0, got {self.skipped}.")
        object.__setattr__(self, "skipped_files", tuple((str(f), str(r)) for f, r in self.skipped_files))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int | None:
        """Number of classes from class_names, else from the largest label; None when unlabeled."""
        if self.labels is None:
            return None
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def skipped_summary(self, shown: int = 3) -> str:
        """'' when nothing was skipped, else the first ``shown`` skipped files with why, then a count."""
        return describe_skipped(self.skipped_files, total=self.skipped, shown=shown)

    def subset(self, indices: Any) -> ImageDataset:
        """A new dataset with the images (and labels) at ``indices`` (ints or a boolean mask)."""
        index = np.asarray(indices)
        if index.dtype != bool and not np.issubdtype(index.dtype, np.integer):
            if index.size:
                raise DataError(f"subset indices must be integers or a boolean mask; got {index.dtype}.")
            index = index.astype(np.int64)
        images = self.images[index]
        labels = None if self.labels is None else self.labels[index]
        return ImageDataset(
            images=images,
            labels=labels,
            class_names=self.class_names,
            source=f"{self.source} [subset of {len(images)}]",
            skipped=self.skipped,
            skipped_files=self.skipped_files,
        )


def load_images(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None,
    *,
    split: str = "all",
    image_size: int | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """Load images from ``source`` (see :func:`detect_format`) into an :class:`ImageDataset`.

    - ``None``: the embedded default (:func:`embedded_default`), no download needed.
    - a list/tuple of sources: each loaded, then concatenated. Labels are kept only when every
      source is labeled with the same class_names. Sources of different image sizes need
      ``image_size``.
    - ``split``: "all", "train" or "test". Only CIFAR-10 python folders (data_batch_* vs
      test_batch) and the embedded default have a natural split; every other source returns
      all its images for any split (use :func:`split_dataset` to hold out a test set).
    - ``image_size``: resize every image, shorter side to ``image_size`` then centre crop to
      a square. Default: keep the native size; an image folder whose images differ in size
      becomes 64x64 (``MIXED_SIZE_DEFAULT``).
    - ``limit``: keep the first ``limit`` images (after the split).
    """
    _check_split(split)
    _check_count("image_size", image_size)
    _check_count("limit", limit)
    if source is None:
        dataset = embedded_default(split)
        if image_size is not None and dataset.image_size != (image_size, image_size):
            dataset = _resized(dataset, image_size)
        return _limited(dataset, limit)
    if isinstance(source, (str, os.PathLike)):
        return _load_one(Path(source), split, image_size, limit)
    if isinstance(source, Sequence):
        return _load_many(list(source), split, image_size, limit)
    raise DataError(f"data source must be a path, a list of paths or None; got {type(source).__name__}. "
                    f"{_ACCEPTED}")


def detect_format(path: str | os.PathLike) -> str:
    """One of FORMATS for ``path``, or DataError saying what was found and what is accepted.

    "npz": a .npz file; "cifar10-python": a folder with batches.meta and data/test batches (or
    its parent holding ``cifar-10-batches-py``); "image-folder": class subfolders of images
    (labeled, classes sorted by name); "image-flat": images directly in the folder (unlabeled).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist. {_ACCEPTED}")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        kind = f"a {path.suffix} file" if path.suffix else "a file without extension"
        hint = " To use one image, put it in a folder and pass the folder." if _is_image_name(
            path.name) else ""
        raise DataError(f"unsupported data source {str(path)!r} ({kind}).{hint} {_ACCEPTED}")
    if not path.is_dir():
        raise DataError(f"data source {str(path)!r} is neither a file nor a folder. {_ACCEPTED}")
    if _cifar_dir(path) is not None:
        return "cifar10-python"
    top_images, top_other, subdirs = _scan_folder(path)
    class_dirs = [d for d in subdirs if _has_image(d)]
    if top_images and class_dirs:
        raise DataError(
            f"folder {str(path)!r} holds both images ({len(top_images)}) and subfolders with images "
            f"({', '.join(d.name for d in class_dirs[:5])}); it is ambiguous whether it is labeled. "
            "Move the loose images into a class subfolder, or pass a folder with only one kind."
        )
    npz_files = [os.path.basename(p) for p in top_other if p.lower().endswith(".npz")]
    if npz_files and (top_images or class_dirs):
        raise DataError(
            f"folder {str(path)!r} holds .npz data files ({', '.join(npz_files[:3])}) next to images; "
            "it is ambiguous which to load. Pass the .npz files themselves (a list loads them all), "
            "or a folder with only images."
        )
    if top_images:
        return "image-flat"
    if class_dirs:
        return "image-folder"
    found = _describe_files(top_other)
    hint = ""
    if npz_files:
        hint = " To load .npz files, pass the files themselves (a list of them loads them all)."
    raise DataError(f"folder {str(path)!r} has no images ({found}).{hint} {_ACCEPTED}")


def embedded_default(split: str = "all") -> ImageDataset:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 scans as 32x32 RGB uint8, labels 0..9.

    Pixel values 0..16 are scaled to 0..255 and upsampled bilinearly: nearest-neighbour would
    turn each pixel into a hard-edged 4x4 block, a grid that random crops and the encoder would
    pick up as a cue; bilinear keeps the same information as smooth strokes. Grey is repeated
    over the three channels. ``split`` "train"/"test" is a fixed stratified 80/20 split
    (:func:`split_dataset` with seed 0: 1,437 / 360 images); "all" is everything.
    """
    _check_split(split)
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255)
    up = _upsample_bilinear(gray, _EMBEDDED_SIZE)
    images = np.repeat(np.rint(up).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    description = (
        f"embedded {EMBEDDED_DEFAULT_NAME} (scikit-learn load_digits, 8x8 upsampled to "
        f"{_EMBEDDED_SIZE}x{_EMBEDDED_SIZE})"
    )
    dataset = ImageDataset(
        images=images,
        labels=digits.target.astype(np.int64),
        class_names=tuple(str(i) for i in range(10)),
        source=description,
    )
    if split != "all":
        train, test = split_dataset(dataset, test_fraction=0.2, seed=0)
        dataset = train if split == "train" else test
    return replace(dataset, source=f"{description}, split {split} ({len(dataset)} images, labeled)")


def split_dataset(
    ds: ImageDataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic (train, test) split, stratified by label when labeled.

    The test set has ceil(test_fraction * N) images (as scikit-learn's train_test_split),
    shared out over classes in proportion to their size (largest remainder), so class
    balance is kept. Both parts keep the original order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1 (exclusive); got {test_fraction!r}.")
    n = len(ds)
    if n < 2:
        raise DataError(f"{ds.source}: cannot split {n} image(s) into train and test; need >= 2.")
    is_test = split_mask(n, ds.labels, test_fraction, seed)
    train, test = ds.subset(~is_test), ds.subset(is_test)
    return (
        replace(train, source=f"{ds.source}, train part ({len(train)} images)"),
        replace(test, source=f"{ds.source}, test part ({len(test)} images)"),
    )


def split_mask(n: int, labels: np.ndarray | None, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the test part of :func:`split_dataset` for ``n`` items (labels or None).

    Shared by in-memory and streamed sources, so both split a folder the same way.
    """
    n_test = min(n - 1, max(1, math.ceil(round(test_fraction * n, 9))))
    rng = np.random.default_rng(seed)
    if labels is None:
        test_idx = rng.permutation(n)[:n_test]
    else:
        classes, counts = np.unique(labels, return_counts=True)
        quotas = counts * (n_test / n)
        per_class = np.floor(quotas).astype(np.int64)
        short = n_test - int(per_class.sum())
        per_class[np.argsort(-(quotas - per_class), kind="stable")[:short]] += 1
        picks = [
            rng.permutation(np.flatnonzero(labels == label))[:take]
            for label, take in zip(classes, per_class, strict=True)
        ]
        test_idx = np.concatenate(picks)
    is_test = np.zeros(n, dtype=bool)
    is_test[test_idx] = True
    return is_test


def describe_skipped(files: Sequence[tuple[str, str]], *, total: int | None = None, shown: int = 3) -> str:
    """'skipped 5 files: a.png (why), b.txt (why), c.png (why) and 2 more' ('' for none)."""
    total = len(files) if total is None else total
    if total <= 0:
        return ""
    named = ", ".join(f"{name} ({why})" for name, why in files[:shown])
    rest = total - min(shown, len(files))
    more = f" and {rest} more" if rest > 0 and named else ""
    return f"skipped {total} file{'s' if total != 1 else ''}" + (f": {named}{more}" if named else "")


# -- single sources ---------------------------------------------------------------------------


def _load_one(path: Path, split: str, image_size: int | None, limit: int | None) -> ImageDataset:
    fmt = detect_format(path)
    if fmt == "npz":
        dataset = _load_npz(path, limit)
    elif fmt == "cifar10-python":
        dataset = _load_cifar(path, split, limit)
    else:
        return _load_folder(path, labeled=fmt == "image-folder", image_size=image_size, limit=limit)
    if image_size is not None and dataset.image_size != (image_size, image_size):
        dataset = _resized(dataset, image_size)
    return _limited(dataset, limit)


def _load_many(
    sources: list[str | os.PathLike], split: str, image_size: int | None, limit: int | None
) -> ImageDataset:
    if not sources:
        raise DataError(f"got an empty list of data sources. {_ACCEPTED}")
    parts: list[ImageDataset] = []
    remaining = limit
    for item in sources:
        if not isinstance(item, (str, os.PathLike)):
            raise DataError(f"each data source in a list must be a path; got {type(item).__name__}.")
        part = _load_one(Path(item), split, image_size, remaining)
        parts.append(part)
        if remaining is not None:
            remaining -= len(part)
            if remaining <= 0:
                break
    sizes = {part.image_size for part in parts}
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w} from {part.source}" for part in parts for h, w in [part.image_size])
        raise DataError(
            f"data sources have different image sizes ({listed}); pass --image-size N "
            "(image_size=N in Python) to resize them all to NxN."
        )
    names = {part.class_names for part in parts}
    labeled = all(part.labels is not None for part in parts) and len(names) == 1
    return ImageDataset(
        images=np.concatenate([part.images for part in parts]),
        labels=np.concatenate([part.labels for part in parts]) if labeled else None,
        class_names=parts[0].class_names if labeled else None,
        source=" + ".join(part.source for part in parts),
        skipped=sum(part.skipped for part in parts),
        skipped_files=tuple(item for part in parts for item in part.skipped_files),
    )


def _load_npz(path: Path, limit: int | None) -> ImageDataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if "x" not in keys:
                raise DataError(
                    f"{path}: .npz has no key 'x' (keys found: {', '.join(keys) or 'none'}); "
                    "save the images as x=uint8 (N,H,W,3), optional y=labels, class_names=strings."
                )
            x = archive["x"]
            y = archive["y"] if "y" in keys else None
            names = archive["class_names"] if "class_names" in keys and y is not None else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        if "allow_pickle" in str(exc):
            raise DataError(
                f"cannot read .npz file {path}: it holds object arrays, which are not loaded "
                "because unpickling can run code. Save labels as integers and class_names as "
                "np.array(names, dtype=str)."
            ) from exc
        raise DataError(f"cannot read .npz file {path}: {exc} (truncated or corrupt?).") from exc
    x = _npz_images(path, x)
    if len(x) == 0:
        raise DataError(
            f"{path}: .npz file is empty: 'x' holds 0 images (shape {tuple(x.shape)}). "
            "Save at least one image in 'x', or pass another --data source."
        )
    labels = None
    if y is not None:
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: 'y' must be 1-D integer labels; got {y.dtype} {tuple(y.shape)}.")
        if len(y) != len(x):
            raise DataError(f"{path}: 'y' has {len(y)} labels for {len(x)} images in 'x'.")
        labels = y
    class_names = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(
                f"{path}: 'class_names' must be a 1-D array of strings; got {names.dtype} "
                f"{tuple(names.shape)}."
            )
        class_names = tuple(_text(name) for name in names.tolist())
    if limit is not None:
        x = x[:limit]
        labels = None if labels is None else labels[:limit]
    kind = "labeled" if labels is not None else "unlabeled"
    return ImageDataset(
        images=x, labels=labels, class_names=class_names,
        source=f"npz {path} ({len(x)} images, {kind})",
    )


def _npz_images(path: Path, x: np.ndarray) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(
            f"{path}: 'x' must be uint8 pixels 0..255; got {x.dtype}. Convert floats in 0..1 with "
            "(x * 255).round().astype(np.uint8)."
        )
    if x.ndim == 3:
        return np.repeat(x[..., None], 3, axis=-1)
    if x.ndim == 4 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    if x.ndim == 4 and x.shape[-1] == 3:
        return x
    hint = ""
    if x.ndim == 4 and x.shape[1] in (1, 3):
        hint = " It looks channels-first; save x.transpose(0, 2, 3, 1)."
    raise DataError(
        f"{path}: 'x' must be shaped (N,H,W,3) RGB or (N,H,W) grayscale; got {tuple(x.shape)}.{hint}"
    )


# -- CIFAR-10 python batches ------------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # The functions numpy itself names when it pickles arrays, taken from numpy's own
    # __reduce__ so that old "numpy.core" names map to them without importing the shim.
    reconstruct = np.ndarray.__reduce__(np.zeros(1, np.uint8))[0]
    frombuffer = np.zeros(1, np.uint8).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists of numbers, bytes and numpy arrays; refuses every other global."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        target = self._allowed.get((module, name))
        if target is None:
            raise DataError(
                f"refusing to load {self._path}: its pickle asks for {module}.{name}, but a CIFAR-10 "
                "batch holds only numbers, bytes and numpy arrays (allowed globals: numpy ndarray/"
                "dtype reconstruction). The file is not a genuine CIFAR-10 batch; do not trust it."
            )
        return target


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as handle:
            obj = _NumpyOnlyUnpickler(handle, path).load()
    except DataError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc!r} (truncated or corrupt?).") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: a CIFAR-10 batch is a pickled dict; got {type(obj).__name__}.")
    return obj


def _entry(batch: dict[Any, Any], key: str, path: Path) -> Any:
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    found = ", ".join(sorted(_text(k) for k in batch))
    raise DataError(f"{path}: CIFAR-10 batch has no {key!r} entry (found: {found or 'none'}).")


def _cifar_dir(path: Path) -> Path | None:
    for candidate in (path, path / CIFAR_DIR_NAME):
        if (candidate / "batches.meta").is_file() and (
            (candidate / "test_batch").is_file() or any(candidate.glob("data_batch_*"))
        ):
            return candidate
    return None


def _load_cifar(path: Path, split: str, limit: int | None) -> ImageDataset:
    root = _cifar_dir(path)
    if root is None:
        raise DataError(f"{path} is not a CIFAR-10 python folder (batches.meta and data_batch_* "
                        "or test_batch).")
    train = sorted(
        (p for p in root.glob("data_batch_*") if p.name.removeprefix("data_batch_").isdigit()),
        key=lambda p: int(p.name.removeprefix("data_batch_")),
    )
    test = [root / "test_batch"] if (root / "test_batch").is_file() else []
    files = {"train": train, "test": test, "all": train + test}[split]
    if not files:
        wanted = "data_batch_1..5" if split == "train" else "test_batch"
        raise DataError(f"{root}: split {split!r} needs {wanted}, which is not there.")
    meta = _unpickle(root / "batches.meta")
    class_names = tuple(_text(name) for name in _entry(meta, "label_names", root / "batches.meta"))
    images, labels = [], []
    count = 0
    for file in files:
        batch = _unpickle(file)
        data = _entry(batch, "data", file)
        batch_labels = np.asarray(_entry(batch, "labels", file))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or (
            data.shape[1] != 3 * 32 * 32
        ):
            got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, np.ndarray) else type(
                data).__name__
            raise DataError(f"{file}: CIFAR-10 'data' must be uint8 (N, 3072); got {got}.")
        if batch_labels.ndim != 1 or len(batch_labels) != len(data) or not np.issubdtype(
            batch_labels.dtype, np.integer
        ):
            raise DataError(f"{file}: CIFAR-10 'labels' must be {len(data)} integers; got "
                            f"{batch_labels.dtype} {tuple(batch_labels.shape)}.")
        # Rows are 1024 red, 1024 green, 1024 blue values, each plane 32x32 row-major.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
        count += len(data)
        if limit is not None and count >= limit:
            break
    x = np.concatenate(images)
    y = np.concatenate(labels)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return ImageDataset(
        images=x, labels=y, class_names=class_names,
        source=f"cifar10-python {root} split {split} ({len(x)} images, labeled)",
    )


# -- image folders ----------------------------------------------------------------------------


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_folder(path: Path) -> tuple[list[str], list[str], list[Path]]:
    """(image files, other files, non-hidden subfolders) directly in ``path``, sorted.

    Files are plain strings: a flat folder of a million images is listed in seconds.
    """
    images, other, subdirs = [], [], []
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list folder {str(path)!r}: {exc}.") from exc
    for entry in entries:
        if entry.is_dir():
            if not entry.name.startswith("."):
                subdirs.append(Path(entry.path))
        elif entry.is_file():
            (images if _is_image_name(entry.name) else other).append(entry.path)
    return images, other, subdirs


def _walk_files(folder: Path) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, name) for name in sorted(names))
    return files


def _has_image(folder: Path) -> bool:
    for _root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(_is_image_name(name) for name in names):
            return True
    return False


def _describe_files(files: list[str]) -> str:
    if not files:
        return "it is empty"
    counts: dict[str, int] = {}
    for file in files:
        suffix = os.path.splitext(file)[1].lower() or "no extension"
        counts[suffix] = counts.get(suffix, 0) + 1
    listed = ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items()))
    return f"found {len(files)} other file(s): {listed}"


def _load_folder(path: Path, *, labeled: bool, image_size: int | None, limit: int | None) -> ImageDataset:
    from PIL import Image

    entries, class_names, skipped_files = list_image_files(path, labeled=labeled)
    target = image_size
    native: tuple[int, int] | None = None
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for file, label in entries:
        image, why = decode_image_file(file)
        if image is None:
            skipped_files.append((_relative(file, path), why))
            continue
        if target is None:
            native = native or image.size
            if image.size != native:
                # Sizes differ: fall back to one square size and bring earlier images to it.
                target = MIXED_SIZE_DEFAULT
                arrays = [np.asarray(fit_square(Image.fromarray(a), target)) for a in arrays]
        if target is not None:
            image = fit_square(image, target)
        arrays.append(np.asarray(image, dtype=np.uint8))
        labels.append(label)
        if limit is not None and len(arrays) >= limit:
            break
    skipped = len(skipped_files)
    if not arrays:
        raise DataError(
            f"folder {str(path)!r} has no readable images: {len(entries)} file(s) with an image "
            f"extension failed to decode; {describe_skipped(skipped_files)}. {_ACCEPTED}"
        )
    kind = "image-folder" if labeled else "image-flat"
    what = f"{len(class_names)} classes" if class_names is not None else "unlabeled"
    return ImageDataset(
        images=np.stack(arrays),
        labels=np.asarray(labels, dtype=np.int64) if labeled else None,
        class_names=class_names,
        source=f"{kind} {path} ({len(arrays)} images, {what}, {skipped} skipped)",
        skipped=skipped,
        skipped_files=tuple(skipped_files),
    )


def list_image_files(
    path: Path, *, labeled: bool
) -> tuple[list[tuple[str, int]], tuple[str, ...] | None, list[tuple[str, str]]]:
    """(image files with labels (-1 when unlabeled), class names, skipped (file, why)) of a folder.

    Nothing is decoded: the streaming path lists million-image folders with this.
    """
    top_images, top_other, subdirs = _scan_folder(path)
    entries: list[tuple[str, int]] = []
    skipped: list[tuple[str, str]] = []
    class_names: tuple[str, ...] | None = None
    if labeled:
        class_dirs = [d for d in subdirs if _has_image(d)]
        class_names = tuple(d.name for d in class_dirs)
        for label, folder in enumerate(class_dirs):
            for file in _walk_files(folder):
                if _is_image_name(file):
                    entries.append((file, label))
                else:
                    skipped.append((_relative(file, path), _not_image_reason(file)))
    else:
        entries = [(file, -1) for file in top_images]
    skipped.extend((_relative(file, path), _not_image_reason(file)) for file in top_other)
    return entries, class_names, skipped


def _relative(file: str, root: Path) -> str:
    return os.path.relpath(file, root)


def _not_image_reason(file: str) -> str:
    suffix = os.path.splitext(file)[1].lower()
    return f"not an image: {suffix + ' file' if suffix else 'file without extension'}"


def decode_image_file(path: str | os.PathLike) -> tuple[Any, str]:
    """(RGB PIL image, '') for the image at ``path``, or (None, why Pillow could not read it)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"
    return decode_image_bytes(data)


def decode_image_bytes(data: bytes) -> tuple[Any, str]:
    """(RGB PIL image with EXIF orientation applied, '') or (None, why it could not be decoded)."""
    import io

    from PIL import Image, ImageOps

    if not data:
        return None, "corrupt image: the file is empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            try:
                image = ImageOps.exif_transpose(opened)
            except (OSError, ValueError, TypeError, KeyError):
                image = opened.copy()
            return _to_rgb(image), ""
    except Image.DecompressionBombError as exc:
        return None, f"too large to decode safely ({exc})"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return None, f"corrupt image: {_pil_reason(exc)}"


def _pil_reason(exc: Exception) -> str:
    text = str(exc).split(" <_io.BytesIO", 1)[0].strip().rstrip(":")
    return text or type(exc).__name__


def _to_rgb(image: Any) -> Any:
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: keep the top 8 bits instead of Pillow's clipping at 255.
        gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def fit_square(image: Any, size: int) -> Any:
    """Shorter side to ``size`` (bilinear, antialiased when shrinking), then centre crop."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


# -- helpers ----------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")


def _check_count(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer or None; got {value!r}.")


def _limited(dataset: ImageDataset, limit: int | None) -> ImageDataset:
    if limit is None or len(dataset) <= limit:
        return dataset
    return replace(dataset.subset(np.arange(limit)), source=f"{dataset.source}, first {limit}")


def _resized(dataset: ImageDataset, size: int) -> ImageDataset:
    from PIL import Image

    images = np.stack([np.asarray(fit_square(Image.fromarray(a), size)) for a in dataset.images])
    return replace(dataset, images=images, source=f"{dataset.source}, resized to {size}x{size}")


def _upsample_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (half-pixel centres, edges clamped) resize of (N, h, w) to (N, size, size)."""

    def weights(n_in: int) -> np.ndarray:
        pos = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        low = np.floor(pos).astype(np.int64)
        high = np.minimum(low + 1, n_in - 1)
        frac = pos - low
        matrix = np.zeros((size, n_in))
        np.add.at(matrix, (np.arange(size), low), 1.0 - frac)
        np.add.at(matrix, (np.arange(size), high), frac)
        return matrix

    rows, cols = weights(images.shape[1]), weights(images.shape[2])
    return np.einsum("oh,nhw,pw->nop", rows, images, cols)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
