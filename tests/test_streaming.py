"""Tests for streamed data: folder and .tar shard indexes, rank shares, worker/GPU decoding, bounded memory."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_ssl.data.batches import BatchSource, InMemoryBatches
from edge_ssl.data.shards import build_index, estimate_decoded_bytes
from edge_ssl.data.sources import load_images
from edge_ssl.data.streaming import (
    StreamingSource,
    _streaming_plan,
    choose_source,
    crop_box,
    embed_source,
    evaluate_streamed,
    sample_rng,
    stream_eval_sources,
)
from edge_ssl.errors import ConfigError, DataError
from tests.conftest import PROJECT_ROOT


def _textured(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random RGB image: texture a crop can tell apart, compressible to write fast."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def _solid(i: int) -> np.ndarray:
    """Image i is one flat colour whose red channel encodes i (survives any crop)."""
    return np.full((24, 40, 3), (10 * i, 255 - 10 * i, 50), np.uint8)


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _class_folder(root: Path, per_class: int = 6, classes: int = 2, size: tuple[int, int] = (40, 48)) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
            pixels = _textured(100 * c + i, *size)
            (root / f"class{c}" / f"{i:03d}.{ext}").write_bytes(_encode(pixels, fmt))
    return root


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def _decoded_ids(batch: torch.Tensor) -> list[int]:
    return [round(float(v) * 255 / 10) for v in batch[:, 0, 0, 0]]


# -- rank shares and the BatchSource contract ---------------------------------------------------


def test_ranks_read_disjoint_shares_fixed_by_epoch_and_seed(tmp_path: Path) -> None:
    for i in range(22):
        Image.fromarray(_solid(i)).save(tmp_path / f"{i:02d}.png")
    source = StreamingSource(tmp_path, 16, workers=0)
    assert isinstance(source, BatchSource) and source.num_images == 22
    steps = source.steps_per_epoch(batch_size=3, world_size=2)
    assert steps == 3  # 22 // (3 x 2): the incomplete last global batch is dropped, as in memory

    def shares(epoch: int, seed: int) -> list[list[int]]:
        return [
            [i for batch in source.epoch_batches(epoch, 3, rank=r, world_size=2, seed=seed, device="cpu")
             for i in _decoded_ids(batch)]
            for r in range(2)
        ]

    rank0, rank1 = shares(epoch=4, seed=7)
    assert len(rank0) == len(rank1) == steps * 3 and not set(rank0) & set(rank1)
    planned = source.rank_indices(4, 3, rank=0, world_size=2, seed=7)
    assert rank0 == planned.ravel().tolist()  # the images decoded are the ones planned (files sorted)
    assert shares(epoch=4, seed=7) == [rank0, rank1]
    assert shares(epoch=5, seed=7) != [rank0, rank1] and shares(epoch=4, seed=8) != [rank0, rank1]
    with pytest.raises(ConfigError, match="rank must be in"):
        source.rank_indices(0, 3, rank=2, world_size=2, seed=0)


def test_ranks_that_list_different_data_are_refused(tmp_path: Path, monkeypatch) -> None:
    import edge_ssl.train.distributed as distributed

    for i in range(8):
        Image.fromarray(_solid(i)).save(tmp_path / f"{i}.png")
    source = StreamingSource(tmp_path, 8, workers=0)
    other_node = torch.tensor([[123, 7]])  # rank 1 found 7 images with another listing
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "gather_batch", lambda mine: torch.cat([mine, other_node]))
    with pytest.raises(DataError, match="processes see different data .*rank 0: 8, rank 1: 7"):
        next(source.epoch_batches(0, 2, rank=0, world_size=2, seed=0, device="cpu"))
    monkeypatch.setattr(distributed, "gather_batch", lambda mine: torch.cat([mine, mine]))
    assert len(list(source.epoch_batches(0, 2, rank=0, world_size=2, seed=0, device="cpu"))) == 2


def test_worker_batches_are_the_same_as_in_process_and_float_nchw(tmp_path: Path) -> None:
    source = StreamingSource(_class_folder(tmp_path), 24, workers=0)
    in_process = list(source.epoch_batches(1, 4, rank=0, world_size=1, seed=3, device="cpu"))
    with_workers = StreamingSource(tmp_path, 24, workers=2)
    from_workers = list(with_workers.epoch_batches(1, 4, rank=0, world_size=1, seed=3, device="cpu"))
    assert len(in_process) == source.steps_per_epoch(4, 1) == 3
    for a, b in zip(in_process, from_workers, strict=True):
        assert a.shape == (4, 3, 24, 24) and a.dtype == torch.float32
        assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    again = list(source.epoch_batches(1, 4, rank=0, world_size=1, seed=3, device="cpu"))
    torch.testing.assert_close(torch.stack(again), torch.stack(in_process), rtol=0, atol=0)


def test_crop_box_stays_inside_and_covers_the_scale_range() -> None:
    areas = []
    for index in range(300):
        top, left, h, w = crop_box(60, 90, sample_rng(0, 0, index), scale=(0.5, 1.0))
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
        areas.append(h * w / (60 * 90))
    assert 0.45 < min(areas) < 0.6 and max(areas) > 0.8  # a 4:3 crop of 3:2 covers 8/9 at most
    assert crop_box(60, 90, sample_rng(1, 2, 3)) == crop_box(60, 90, sample_rng(1, 2, 3))


def test_gpu_decode_path_logic_matches_worker_decoding_on_cpu(tmp_path: Path) -> None:
    """decode_device='cuda' hands raw JPEGs to torchvision's batched decoder; run it on CPU."""
    _class_folder(tmp_path, per_class=4, size=(64, 80))
    cpu = StreamingSource(tmp_path, 32, workers=0)
    gpu_logic = StreamingSource(tmp_path, 32, workers=0, decode_device="cuda")
    for a, b in zip(
        cpu.epoch_batches(0, 4, rank=0, world_size=1, seed=1, device="cpu"),
        gpu_logic.epoch_batches(0, 4, rank=0, world_size=1, seed=1, device="cpu"),
        strict=True,
    ):
        assert b.shape == a.shape and b.dtype == torch.float32
        # Same crop boxes; only the JPEG decoder and resize filter differ (PIL vs torchvision).
        assert float((a - b).abs().mean()) < 4 / 255
    with pytest.raises(ConfigError, match="decode_device"):
        StreamingSource(tmp_path, 32, decode_device="tpu")


def test_gpu_decode_path_replaces_a_jpeg_no_decoder_reads(tmp_path: Path, caplog) -> None:
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(_encode(_solid(i), "JPEG"))
    good = (tmp_path / "2.jpg").read_bytes()
    (tmp_path / "2.jpg").write_bytes(good[:300] + b"\x00" * 50)  # header intact, scan data broken
    source = StreamingSource(tmp_path, 8, workers=0, decode_device="cuda")
    with caplog.at_level(logging.WARNING, logger="edge_ssl.data.streaming"):
        (batch,) = source.epoch_batches(0, 4, rank=0, world_size=1, seed=0, device="cpu")
    assert batch.shape == (4, 3, 8, 8) and len(set(_decoded_ids(batch))) == 3
    assert str(tmp_path / "2.jpg") in source.skipped and "2.jpg (corrupt image" in caplog.text


# -- .tar shards ---------------------------------------------------------------------------------


def test_webdataset_shards_are_indexed_by_key_with_labels(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        samples = [
            (f"s{s}/{i:04d}", {"jpg" if i % 2 else "png": _encode(_textured(10 * s + i, 30, 30), "JPEG" if i % 2 else "PNG"),
                               "cls": str(i % 3).encode()})
            for i in range(5)
        ]
        samples.append((f"s{s}/meta", {"json": b"{}"}))
        _write_shard(shards / f"train-{s:05d}.tar", samples)
    source = StreamingSource(shards, 16, workers=0)
    assert source.num_images == 10 and "2 shards" in source.source and "labeled" in source.source
    assert source.labels.tolist() == [0, 1, 2, 0, 1] * 2
    assert source.skipped["train-00000.tar:s0/meta"] == "no image in the sample (found .json)"
    single = build_index(shards / "train-00001.tar")
    decoded = np.asarray(Image.open(io.BytesIO(single.read(4))))
    np.testing.assert_array_equal(decoded, _textured(14, 30, 30))  # the right bytes, by offset
    batches = list(source.epoch_batches(0, 5, rank=1, world_size=2, seed=0, device="cpu"))
    assert len(batches) == 1 and batches[0].shape == (5, 3, 16, 16)
    arrays, labels = zip(*source.iter_labeled_arrays(4), strict=True)
    assert np.concatenate(labels).tolist() == source.labels.tolist()


def test_shards_with_long_member_names_index_the_same(tmp_path: Path) -> None:
    folder = "deep/" + "x" * 120  # past the 100-byte ustar name: tar writes extra pax/GNU records
    samples = [(f"{folder}/{i}", {"png": _encode(_solid(i), "PNG"), "cls": str(i).encode()}) for i in range(3)]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"long-{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as archive:
            for key, members in samples:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        index = build_index(path)
        assert index.labels.tolist() == [0, 1, 2]
        assert np.asarray(Image.open(io.BytesIO(index.read(2))))[0, 0, 0] == 20


def test_bad_shards_name_the_problem(tmp_path: Path) -> None:
    _write_shard(tmp_path / "bad-cls.tar", [("a", {"jpg": _encode(_solid(1), "JPEG"), "cls": b"cat"})])
    with pytest.raises(DataError, match=r"bad-cls.tar: sample 'a' has a .cls of 'cat'.*integer"):
        build_index(tmp_path / "bad-cls.tar")
    whole = (tmp_path / "bad-cls.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:700])
    with pytest.raises(DataError, match="cannot read shard .*cut.tar"):
        build_index(tmp_path / "cut.tar")
    _write_shard(tmp_path / "nothing.tar", [("a", {"txt": b"hi"})])
    with pytest.raises(DataError, match=r"holds no images; skipped 1 file: nothing.tar:a \(no image"):
        build_index(tmp_path / "nothing.tar")


# -- corrupt images while streaming --------------------------------------------------------------


def test_a_corrupt_image_is_named_and_replaced_while_streaming(tmp_path: Path, caplog) -> None:
    for i in range(8):
        Image.fromarray(_solid(i)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"\x89PNG garbage")
    source = StreamingSource(tmp_path, 8, workers=0)
    with caplog.at_level(logging.WARNING, logger="edge_ssl.data.streaming"):
        ids = [i for b in source.epoch_batches(0, 4, rank=0, world_size=1, seed=0, device="cpu")
               for i in _decoded_ids(b)]
    assert len(ids) == 8 and 3 not in ids and ids.count(4) == 2  # 3.png -> the next sample, 4.png
    assert source.skipped[str(tmp_path / "3.png")].startswith("corrupt image: cannot identify")
    assert "3.png (corrupt image" in caplog.text


# -- choosing the path --------------------------------------------------------------------------


def test_choose_source_picks_by_format_size_and_flag(tmp_path: Path) -> None:
    folder = _class_folder(tmp_path / "folder", per_class=3)
    np.savez(tmp_path / "small.npz", x=np.zeros((4, 8, 8, 3), np.uint8))
    _write_shard(tmp_path / "one.tar", [("a", {"png": _encode(_solid(1), "PNG")})])
    assert isinstance(choose_source(folder, 32), InMemoryBatches)
    big = choose_source(folder, 32, memory_budget_mb=0.001)
    assert isinstance(big, StreamingSource) and "decoded > memory budget" in big.source
    assert isinstance(choose_source(tmp_path / "one.tar", 32), StreamingSource)  # shards always stream
    assert isinstance(choose_source(tmp_path / "small.npz", 32, memory_budget_mb=0), InMemoryBatches)
    assert _streaming_plan(None, "auto", 0, None) is None  # the embedded digits stay in memory
    assert isinstance(choose_source(folder, 32, stream="on"), StreamingSource)
    assert isinstance(choose_source(folder, 32, stream="off", memory_budget_mb=0), InMemoryBatches)
    limited = choose_source(folder, 32, stream="on", limit=2, load_size=20)
    assert limited.num_images == 2 and limited.image_size == 20  # --image-size holds when streaming too
    with pytest.raises(ConfigError, match="--stream must be one of auto, on, off; got 'yes'"):
        choose_source(folder, 32, stream="yes")
    with pytest.raises(DataError, match="--stream on needs --data"):
        choose_source(None, 32, stream="on")
    with pytest.raises(DataError, match="npz source.*--stream auto or off"):
        choose_source(tmp_path / "small.npz", 32, stream="on")


def test_streaming_modules_import_without_torch() -> None:
    code = "import sys, edge_ssl.data.streaming, edge_ssl.data.shards; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_fingerprint_follows_the_listing(tmp_path: Path) -> None:
    folder = _class_folder(tmp_path, per_class=2)
    before = StreamingSource(folder, 16, workers=0).fingerprint()
    assert StreamingSource(folder, 16, workers=0).fingerprint() == before
    (folder / "class1" / "extra.png").write_bytes(_encode(_solid(2), "PNG"))
    assert StreamingSource(folder, 16, workers=0).fingerprint() != before


# -- evaluation ----------------------------------------------------------------------------------


def test_streamed_eval_sees_what_the_in_memory_path_sees(tmp_path: Path, tiny_spec) -> None:
    from edge_ssl.evaluate import EvalConfig, embed
    from edge_ssl.models import build_from_spec

    folder = _class_folder(tmp_path, per_class=5, size=(36, 44))
    source = StreamingSource(folder, 32, workers=0)
    arrays, labels = zip(*source.iter_labeled_arrays(4), strict=True)
    in_memory = load_images(folder, image_size=32)
    np.testing.assert_array_equal(np.concatenate(arrays), in_memory.images)  # same eval transform
    np.testing.assert_array_equal(np.concatenate(labels), in_memory.labels)

    torch.manual_seed(0)
    encoder = build_from_spec(tiny_spec)
    train, test = stream_eval_sources(folder, None, 32, stream="on", workers=0)
    assert (train.num_images, test.num_images) == (8, 2) and sorted(test.labels.tolist()) == [0, 1]
    emb, emb_labels = embed_source(encoder, train, batch_size=3, device="cpu")
    reference = embed(encoder, in_memory.images, batch_size=3, device="cpu")
    train_rows = _train_mask(in_memory)  # the in-memory split of the same folder
    np.testing.assert_allclose(emb, reference[train_rows], rtol=1e-4, atol=1e-5)
    assert emb_labels.tolist() == in_memory.labels[train_rows].tolist()
    result = evaluate_streamed(encoder, train, test, EvalConfig(knn_k=(3,), probe=False, device="cpu"))
    assert (result.num_train, result.num_test, result.num_classes) == (8, 2, 2)
    assert 0.0 <= result.knn_top1[3] <= 1.0
    assert stream_eval_sources(folder, None, 32, stream="auto") is None  # small: in memory


def _train_mask(dataset) -> np.ndarray:
    from edge_ssl.data.sources import split_mask

    return ~split_mask(len(dataset), dataset.labels, 0.2, 0)


# -- bounded memory ------------------------------------------------------------------------------

_MEMORY_PROBE = """
import json, os, sys
import torch
torch.set_num_threads(1)
from edge_ssl.data import streaming

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

folder, notes = sys.argv[1], sys.argv[2]
plain_getitem = streaming._Samples.__getitem__
worker_base = {}

def measured_getitem(self, i):
    # In each forked worker: peak RSS growth since its first sample, written where the parent reads it.
    if os.getpid() not in worker_base:
        open("/proc/self/clear_refs", "w").write("5")
        worker_base[os.getpid()] = status("VmRSS")
    item = plain_getitem(self, i)
    with open(os.path.join(notes, str(os.getpid())), "w") as handle:
        handle.write(str(status("VmHWM") - worker_base[os.getpid()]))
    return item

report = {}
for workers in (0, 2):
    source = streaming.StreamingSource(folder, 32, workers=workers)
    if workers:
        streaming._Samples.__getitem__ = measured_getitem
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    base = status("VmRSS")
    count = 0
    for batch in source.epoch_batches(0, 16, rank=0, world_size=1, seed=0, device="cpu"):
        count += len(batch)
    for images, labels in source.iter_labeled_arrays(16):
        count += len(images)
    report[workers] = {"growth": status("VmHWM") - base, "count": count}
growths = [int(open(os.path.join(notes, name)).read()) for name in os.listdir(notes)]
report[2]["workers_seen"], report[2]["worker_growth"] = len(growths), max(growths)
print(json.dumps(report))
"""


def test_streaming_peak_memory_is_bounded_by_batch_and_workers_not_data(tmp_path: Path) -> None:
    folder, notes = tmp_path / "big", tmp_path / "notes"
    folder.mkdir()
    notes.mkdir()
    encoded = [_encode(_textured(i, 640, 640), "JPEG") for i in range(4)]
    for i in range(72):  # 72 x 640x640 RGB = 84 MiB decoded
        (folder / f"{i:03d}.jpg").write_bytes(encoded[i % 4])
    bound = 32 * 2**20
    assert estimate_decoded_bytes(build_index(folder)) > 2.5 * bound  # what in-memory decoding needs
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(folder), str(notes)],
        capture_output=True, text=True, check=True, cwd=PROJECT_ROOT, timeout=120,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for workers in ("0", "2"):
        assert report[workers]["count"] == 64 + 72  # 4 full training batches of 16, then every image
        assert report[workers]["growth"] < bound, report  # the main process
    assert report["2"]["workers_seen"] >= 2 and report["2"]["worker_growth"] < bound, report


# -- the command line ----------------------------------------------------------------------------


def _cli(args: list[str]) -> None:
    from edge_ssl.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code in (0, None)


def test_streamed_pretraining_and_eval_from_the_command_line(tmp_path: Path, capsys) -> None:
    from edge_ssl.bundle import Bundle

    folder = _class_folder(tmp_path / "images", per_class=6, size=(40, 48))
    (folder / "class0" / "broken.png").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "streamed.edge"
    _cli(["pretrain", "--data", str(folder), "--stream", "on", "--workers", "1", "--method", "simclr",
          "--arch", "resnet18_cifar", "--arch-opt", "width=0.25", "--epochs", "1", "--batch-size", "4",
          "--steps-per-epoch", "2", "--device", "cpu", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert "streamed at 32x32 (1 workers" in captured.err
    assert Path(json.loads(captured.out)["bundle"]) == out
    lineage = Bundle.open(out).manifest.lineage[-1]
    assert "streamed" in lineage.settings["data"] and lineage.settings["num_images"] == 13

    _cli(["eval", str(out), "--data", str(folder), "--stream", "on", "--workers", "0", "--k", "3",
          "--no-probe", "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["num_train"] + report["num_test"] == 13  # the corrupt file counts until decoded
    assert "streamed" in json.loads(Path(report["results_file"]).read_text())[
        Bundle.open(out).manifest_sha256]["eval"]["train_data"]


def test_in_memory_pretraining_names_the_skipped_files(tmp_path: Path, capsys) -> None:
    from edge_ssl.cli import main

    folder = _class_folder(tmp_path / "images", per_class=2, size=(32, 32))
    (folder / "class1" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(SystemExit) as info:  # stops after the data note: too few images for a batch
        main(["pretrain", "--data", str(folder), "--stream", "off", "--batch-size", "8",
              "--device", "cpu", "--out", str(tmp_path / "x.edge")])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert "skipped 1 file: class1/broken.png (corrupt image: cannot identify image file)" in err
    assert "non-image" not in err


def test_sources_of_different_sizes_name_the_real_image_size_flag(tmp_path: Path, capsys) -> None:
    from edge_ssl.cli import main

    np.savez(tmp_path / "small.npz", x=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "big.npz", x=np.zeros((2, 16, 16, 3), np.uint8))
    args = ["pretrain", "--data", str(tmp_path / "small.npz"), "--data", str(tmp_path / "big.npz"),
            "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "x.edge")]
    with pytest.raises(SystemExit):
        main(args)
    assert "pass --image-size N" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the flag exists: the sources now combine, and 4 images < a batch of 8
        main([*args, "--image-size", "12"])
    assert "4 images are fewer than one global batch of 8" in capsys.readouterr().err
