"""Tests for edge_ssl.data.sources: every source format, the embedded default, splits and bad inputs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_ssl.data.sources import (
    EMBEDDED_DEFAULT_NAME,
    MIXED_SIZE_DEFAULT,
    ImageDataset,
    detect_format,
    embedded_default,
    load_images,
    split_dataset,
)
from edge_ssl.errors import ConfigError, DataError

REAL_CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"
CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _rgb(n: int, height: int = 8, width: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def _write_png(path: Path, size: tuple[int, int] = (12, 12), colour: tuple[int, int, int] = (200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _write_cifar(root: Path, per_batch: int = 4, test_size: int = 3) -> Path:
    """A cifar-10-batches-py folder in the real format: pickled dicts with bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": per_batch for i in range(1, 6)} | {"test_batch": test_size}
    for name, n in batches.items():
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    meta = {b"label_names": [name.encode() for name in CIFAR_NAMES], b"num_cases_per_batch": per_batch}
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump(meta, handle)
    return folder


class _RunsShellCommand:
    """Unpickling this would run a shell command (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- npz ---------------------------------------------------------------------------------------


def test_npz_labeled_loads_with_class_names(tmp_path: Path) -> None:
    x = _rgb(6)
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=np.array([0, 1, 2, 0, 1, 2], np.uint8), class_names=np.array(["a", "b", "c"]))
    ds = load_images(path)
    assert len(ds) == 6 and ds.image_size == (8, 8)
    np.testing.assert_array_equal(ds.images, x)
    assert ds.images.flags.c_contiguous
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.class_names == ("a", "b", "c") and ds.num_classes == 3
    assert "npz" in ds.source and "set.npz" in ds.source and "labeled" in ds.source


def test_npz_grayscale_becomes_rgb_and_unlabeled(tmp_path: Path) -> None:
    gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    path = tmp_path / "gray.npz"
    np.savez_compressed(path, x=gray)
    ds = load_images(path)
    assert ds.images.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(ds.images[..., 1], gray)
    assert ds.labels is None and ds.class_names is None and ds.num_classes is None


def test_npz_split_other_than_all_returns_everything(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, x=_rgb(5))
    assert len(load_images(path, split="test")) == 5


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"images": _rgb(2)}, "no key 'x'"),
        ({"x": _rgb(2).astype(np.float32)}, "uint8"),
        ({"x": _rgb(2).transpose(0, 3, 1, 2)}, "channels-first"),
        ({"x": _rgb(2)[..., :2]}, "(N,H,W,3)"),
        ({"x": _rgb(3), "y": np.array([0, 1])}, "2 labels for 3 images"),
        ({"x": _rgb(2), "y": np.array([0.0, 1.0])}, "integer"),
        ({"x": _rgb(2), "y": np.array([0, 1]), "class_names": np.array(["a", None], dtype=object)}, "dtype=str"),
    ],
    ids=["missing-x", "float-x", "chw", "two-channels", "label-length", "float-y", "object-class-names"],
)
def test_npz_bad_contents_raise_data_error_naming_the_file(tmp_path: Path, arrays: dict, expected: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="bad.npz") as info:
        load_images(path)
    assert expected in str(info.value)


def test_truncated_npz_raises_data_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.npz"
    np.savez(path, x=_rgb(20, 16, 16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.npz"):
        load_images(path)


# -- CIFAR-10 python ---------------------------------------------------------------------------


def test_cifar_python_splits_and_pixel_layout(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    train = load_images(folder, split="train")
    test = load_images(folder, split="test")
    both = load_images(tmp_path, split="all")  # the parent that contains cifar-10-batches-py
    assert (len(train), len(test), len(both)) == (20, 3, 23)
    assert train.class_names == CIFAR_NAMES and train.images.shape == (20, 32, 32, 3)
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle)
    row = raw[b"data"][0]
    # Each row is 1024 red, 1024 green then 1024 blue values, row-major 32x32 planes.
    assert tuple(test.images[0, 0, 0]) == (row[0], row[1024], row[2048])
    assert tuple(test.images[0, 1, 2]) == (row[34], row[1024 + 34], row[2048 + 34])
    assert test.labels.tolist() == raw[b"labels"]
    assert "cifar10-python" in test.source and "split test" in test.source
    assert len(load_images(folder, split="train", limit=6)) == 6


def test_cifar_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": _RunsShellCommand(marker), b"labels": [0]}, handle)
    with pytest.raises(DataError, match="refusing to load .*test_batch.*system"):
        load_images(folder, split="test")
    assert not marker.exists()


def test_cifar_truncated_batch_raises_data_error(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path)
    data = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(data[:100])
    with pytest.raises(DataError, match="data_batch_2"):
        load_images(folder, split="train")


# -- image folders -----------------------------------------------------------------------------


def test_class_subfolders_are_labeled_and_non_images_are_skipped(tmp_path: Path) -> None:
    _write_png(tmp_path / "dog" / "a.png", colour=(0, 0, 255))
    _write_png(tmp_path / "dog" / "b.PNG", colour=(0, 0, 255))
    _write_png(tmp_path / "cat" / "c.png", colour=(255, 0, 0))
    Image.new("L", (12, 12), 128).save(tmp_path / "cat" / "d.jpg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    assert detect_format(tmp_path) == "image-folder"
    ds = load_images(tmp_path)
    assert ds.class_names == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.skipped == 2 and "2 skipped" in ds.source
    assert ds.images.shape == (4, 12, 12, 3)  # one native size: kept
    assert tuple(ds.images[0, 0, 0]) == (255, 0, 0) and tuple(ds.images[1, 0, 0]) == (128, 128, 128)


def test_corrupt_images_are_named_with_why_then_counted(tmp_path: Path) -> None:
    _write_png(tmp_path / "cat" / "good.png")
    _write_png(tmp_path / "dog" / "good.png")
    for i in range(4):
        (tmp_path / "dog" / f"broken{i}.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "dog" / "empty.png").write_bytes(b"")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_images(tmp_path)
    assert len(ds) == 2 and ds.skipped == 6
    reasons = dict(ds.skipped_files)
    assert reasons[str(Path("cat") / "notes.txt")] == "not an image: .txt file"
    assert reasons[str(Path("dog") / "broken0.png")].startswith("corrupt image: cannot identify")
    assert "empty (0 bytes)" in reasons[str(Path("dog") / "empty.png")]
    summary = ds.skipped_summary()
    assert summary.startswith("skipped 6 files: cat/notes.txt (not an image: .txt file), dog/broken0.png (corrupt")
    assert summary.endswith("and 3 more") and "non-image" not in summary
    (tmp_path / "cat" / "notes.txt").unlink()
    assert load_images(tmp_path / "cat").skipped_summary() == ""
    only_broken = tmp_path / "only"
    (only_broken / "x").mkdir(parents=True)
    (only_broken / "x" / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"no readable images.*x/bad.png \(corrupt image"):
        load_images(only_broken)


def test_empty_npz_says_it_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="empty.npz: .npz file is empty: 'x' holds 0 images") as info:
        load_images(path)
    assert "batch" not in str(info.value)


def test_flat_folder_is_unlabeled_and_mixed_sizes_become_default_square(tmp_path: Path) -> None:
    _write_png(tmp_path / "wide.png", size=(40, 20))
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "small.bmp")
    Image.new("RGBA", (30, 30), (0, 255, 0, 128)).save(tmp_path / "alpha.webp")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    assert detect_format(tmp_path) == "image-flat"
    ds = load_images(tmp_path)
    assert ds.labels is None and ds.class_names is None and ds.skipped == 1
    assert ds.image_size == (MIXED_SIZE_DEFAULT, MIXED_SIZE_DEFAULT) and len(ds) == 3


def test_image_size_resizes_shorter_side_then_centre_crops(tmp_path: Path) -> None:
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # the centre square is white, the sides black
    Image.fromarray(image).save(tmp_path / "wide.png")
    ds = load_images(tmp_path, image_size=10)
    assert ds.image_size == (10, 10)
    assert ds.images[0, :, 1:-1].min() == 255  # only the border pixels blend with the black sides


def test_limit_keeps_the_first_images(tmp_path: Path) -> None:
    for i in range(5):
        _write_png(tmp_path / "images" / f"{i}.png", colour=(i, i, i))
    ds = load_images(tmp_path / "images", limit=2)
    assert len(ds) == 2 and ds.images[:, 0, 0, 0].tolist() == [0, 1]
    npz = tmp_path / "limited.npz"
    np.savez(npz, x=_rgb(9), y=np.arange(9))
    assert load_images(npz, limit=4).labels.tolist() == [0, 1, 2, 3]


# -- format detection and bad inputs ------------------------------------------------------------


def test_detect_format_names_each_kind(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=_rgb(1))
    _write_cifar(tmp_path / "cifar")
    _write_png(tmp_path / "flat" / "x.jpeg")
    _write_png(tmp_path / "classes" / "one" / "x.gif")
    assert detect_format(tmp_path / "a.npz") == "npz"
    assert detect_format(tmp_path / "cifar") == "cifar10-python"
    assert detect_format(tmp_path / "cifar" / "cifar-10-batches-py") == "cifar10-python"
    assert detect_format(tmp_path / "flat") == "image-flat"
    assert detect_format(tmp_path / "classes") == "image-folder"


def _bad_sources(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    (tmp_path / "undecodable").mkdir()
    (tmp_path / "undecodable" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "table.csv").write_text("a,b\n")
    _write_png(tmp_path / "mixed" / "loose.png")
    _write_png(tmp_path / "mixed" / "cls" / "x.png")
    _write_png(tmp_path / "withnpz" / "x.png")
    np.savez(tmp_path / "withnpz" / "d.npz", x=_rgb(1))
    return {
        "missing": (tmp_path / "nope", "does not exist"),
        "empty": (tmp_path / "empty", "no images .*it is empty"),
        "only-text": (tmp_path / "texts", "no images .*1 .txt"),
        "undecodable": (tmp_path / "undecodable", "no readable images"),
        "txt-file": (tmp_path / "notes.txt", r"unsupported data source .*\.txt file"),
        "csv-file": (tmp_path / "table.csv", r"unsupported data source .*\.csv file"),
        "images-and-classes": (tmp_path / "mixed", "ambiguous"),
        "images-and-npz": (tmp_path / "withnpz", "ambiguous"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "only-text", "undecodable", "txt-file", "csv-file", "images-and-classes", "images-and-npz"],
)
def test_bad_sources_raise_one_line_data_error(tmp_path: Path, case: str) -> None:
    path, pattern = _bad_sources(tmp_path)[case]
    with pytest.raises(DataError, match=pattern) as info:
        load_images(path)
    message = str(info.value)
    assert "\n" not in message and str(path.name) in message
    if case in ("missing", "empty", "only-text", "txt-file", "csv-file"):
        assert "Accepted:" in message


def test_bad_split_and_arguments() -> None:
    with pytest.raises(DataError, match="split must be one of all, train, test; got 'val'"):
        load_images(None, split="val")
    with pytest.raises(DataError, match="split"):
        embedded_default("validation")
    with pytest.raises(ConfigError, match="limit"):
        load_images(None, limit=0)
    with pytest.raises(ConfigError, match="image_size"):
        load_images(None, image_size="32")
    with pytest.raises(DataError, match="empty list"):
        load_images([])


# -- several sources ---------------------------------------------------------------------------


def test_sources_concatenate_and_keep_labels_only_when_compatible(tmp_path: Path) -> None:
    names = np.array(["a", "b"])
    np.savez(tmp_path / "one.npz", x=_rgb(2, seed=1), y=np.array([0, 1]), class_names=names)
    np.savez(tmp_path / "two.npz", x=_rgb(3, seed=2), y=np.array([1, 1, 0]), class_names=names)
    np.savez(tmp_path / "bare.npz", x=_rgb(1, seed=3))
    both = load_images([tmp_path / "one.npz", str(tmp_path / "two.npz")])
    assert len(both) == 5 and both.labels.tolist() == [0, 1, 1, 1, 0] and both.class_names == ("a", "b")
    assert "one.npz" in both.source and "two.npz" in both.source
    mixed = load_images([tmp_path / "one.npz", tmp_path / "bare.npz"])
    assert len(mixed) == 3 and mixed.labels is None and mixed.class_names is None
    assert len(load_images([tmp_path / "one.npz", tmp_path / "two.npz"], limit=3)) == 3


def test_sources_of_different_sizes_need_image_size(tmp_path: Path) -> None:
    np.savez(tmp_path / "small.npz", x=_rgb(2, 8, 8))
    np.savez(tmp_path / "big.npz", x=_rgb(2, 16, 16))
    sources = [tmp_path / "small.npz", tmp_path / "big.npz"]
    with pytest.raises(DataError, match="different image sizes .*pass --image-size N"):
        load_images(sources)
    assert load_images(sources, image_size=12).images.shape == (4, 12, 12, 3)


# -- embedded default and splitting ------------------------------------------------------------


def test_embedded_default_is_the_real_digits_at_32px() -> None:
    ds = load_images(None)
    assert EMBEDDED_DEFAULT_NAME == "digits" and EMBEDDED_DEFAULT_NAME in ds.source
    assert ds.images.shape == (1797, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.class_names == tuple(str(i) for i in range(10)) and ds.num_classes == 10
    assert ds.images.max() == 255 and ds.images.min() == 0
    np.testing.assert_array_equal(ds.images[..., 0], ds.images[..., 2])  # grey in RGB
    train, test = embedded_default("train"), embedded_default("test")
    assert (len(train), len(test)) == (1437, 360)
    full = np.bincount(ds.labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10) + np.bincount(test.labels), full)
    assert np.abs(np.bincount(test.labels, minlength=10) - 0.2 * full).max() <= 1  # stratified
    np.testing.assert_array_equal(embedded_default("test").images, test.images)  # fixed split


def test_split_dataset_is_deterministic_and_stratified() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 30])
    ds = ImageDataset(_rgb(60, 2, 2), labels, ("a", "b", "c"), "synthetic")
    train, test = split_dataset(ds, test_fraction=0.25, seed=3)
    assert (len(train), len(test)) == (45, 15)
    # ceil(0.25 * 60) = 15 shared as 2.5 / 5 / 7.5: the half goes to the first class by remainder.
    assert np.bincount(test.labels).tolist() == [3, 5, 7]
    again, _ = split_dataset(ds, test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(again.images, train.images)
    other, _ = split_dataset(ds, test_fraction=0.25, seed=4)
    assert not np.array_equal(other.images, train.images)
    unlabeled = ImageDataset(_rgb(10, 2, 2), None, None, "u")
    assert [len(part) for part in split_dataset(unlabeled, 0.3)] == [7, 3]
    with pytest.raises(ConfigError, match="test_fraction"):
        split_dataset(ds, test_fraction=1.0)
    with pytest.raises(DataError, match="cannot split 1"):
        split_dataset(ds.subset([0]))


# -- the dataset container ---------------------------------------------------------------------


def test_image_dataset_validates_and_subsets() -> None:
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(np.zeros((2, 4, 4, 3), np.float32), None, None, "floats")
    with pytest.raises(DataError, match=r"\(N, H, W, 3\)"):
        ImageDataset(np.zeros((2, 4, 4), np.uint8), None, None, "gray")
    with pytest.raises(DataError, match="3 labels for 2 images"):
        ImageDataset(_rgb(2), np.zeros(3, np.int64), None, "lengths")
    with pytest.raises(DataError, match="no class name"):
        ImageDataset(_rgb(2), np.array([0, 5]), ("a", "b"), "names")
    ds = ImageDataset(_rgb(4), np.array([3, 2, 1, 0]), None, "four")
    part = ds.subset([2, 0])
    assert part.labels.tolist() == [1, 3] and ds.num_classes == 4
    np.testing.assert_array_equal(part.images, ds.images[[2, 0]])


def test_importing_data_does_not_import_torch_or_sklearn() -> None:
    code = "import sys, edge_ssl.data.sources; print(sorted(m for m in ('torch', 'sklearn', 'kornia') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- real data ---------------------------------------------------------------------------------


def test_real_cifar_subset_is_balanced() -> None:
    path = REAL_CIFAR / "cifar10_test.npz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {REAL_CIFAR.resolve()} (../shared/data/cifar10)")
    ds = load_images(path, limit=500)
    assert ds.images.shape == (500, 32, 32, 3)
    assert ds.class_names == CIFAR_NAMES
    assert np.bincount(ds.labels, minlength=10).tolist() == [50] * 10
    assert 90 < ds.images.mean() < 150  # natural photos, not noise or zeros
