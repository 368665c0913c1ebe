"""Streamed data on a real GPU: nvJPEG decoding and pinned non-blocking copies (skipped without CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_ssl.data.streaming import StreamingSource
from edge_ssl.train.pretrain import PretrainConfig, pretrain
from tests.test_streaming import _class_folder

pytestmark = pytest.mark.gpu


def test_nvjpeg_batches_match_worker_decoding(tmp_path: Path) -> None:
    _class_folder(tmp_path, per_class=8, size=(96, 128))
    cpu = StreamingSource(tmp_path, 64, workers=2)
    gpu = StreamingSource(tmp_path, 64, workers=2, decode_device="cuda")
    pairs = zip(
        cpu.epoch_batches(0, 8, rank=0, world_size=1, seed=0, device="cuda"),
        gpu.epoch_batches(0, 8, rank=0, world_size=1, seed=0, device="cuda"),
        strict=True,
    )
    for from_workers, from_nvjpeg in pairs:
        assert from_workers.device.type == from_nvjpeg.device.type == "cuda"
        assert from_nvjpeg.shape == from_workers.shape == (8, 3, 64, 64)
        assert float((from_workers - from_nvjpeg).abs().mean()) < 4 / 255


def test_streamed_pretraining_on_cuda(tmp_path: Path) -> None:
    source = StreamingSource(_class_folder(tmp_path / "images", per_class=16), 32, workers=2)
    config = PretrainConfig(
        method="simclr", arch="resnet18_cifar", arch_kwargs={"width": 0.25}, epochs=1,
        batch_size=8, steps_per_epoch=3, warmup_epochs=0.0, device="cuda",
    )
    result = pretrain(config, source, tmp_path / "s.edge")
    assert result.bundle is not None and torch.isfinite(torch.tensor(result.final_loss))
