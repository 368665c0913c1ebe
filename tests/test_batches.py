"""The BatchSource protocol and the in-memory source pretraining reads from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ssl.data.batches import BatchSource, InMemoryBatches, as_batch_source
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import ConfigError


def _dataset(n: int = 20) -> ImageDataset:
    # Image i is filled with the value i, so a batch tells which images it holds.
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 3)).copy()
    return ImageDataset(images=images, labels=None, class_names=None, source="ids")


def _ids(batch: torch.Tensor) -> list[int]:
    return [round(float(v) * 255) for v in batch[:, 0, 0, 0]]


def test_an_epoch_is_exact_full_batches_of_float_images_in_0_1():
    source = InMemoryBatches(_dataset(20))
    assert isinstance(source, BatchSource)
    batches = list(source.epoch_batches(0, 4, rank=0, world_size=2, seed=0, device="cpu"))
    assert len(batches) == source.steps_per_epoch(4, 2) == 2  # 20 // (4 * 2), the rest dropped
    for batch in batches:
        assert batch.shape == (4, 3, 4, 4) and batch.dtype == torch.float32
        assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0


def test_ranks_get_disjoint_shares_and_epochs_reshuffle():
    source = InMemoryBatches(_dataset(20))

    def seen(epoch: int, rank: int) -> list[int]:
        return [i for b in source.epoch_batches(epoch, 5, rank=rank, world_size=2, seed=3, device="cpu")
                for i in _ids(b)]

    rank0, rank1 = seen(0, 0), seen(0, 1)
    assert not set(rank0) & set(rank1) and len(set(rank0) | set(rank1)) == 20
    assert seen(0, 0) == rank0, "the same epoch must give the same batches (resume relies on it)"
    assert seen(1, 0) != rank0


def test_fingerprint_follows_the_pixels():
    a, b = _dataset(20), _dataset(20)
    assert InMemoryBatches(a).fingerprint() == InMemoryBatches(b).fingerprint()
    b.images[0] += 1
    assert InMemoryBatches(a).fingerprint() != InMemoryBatches(b).fingerprint()


def test_as_batch_source_wraps_datasets_passes_sources_and_names_what_it_needs():
    dataset = _dataset()
    assert isinstance(as_batch_source(dataset), InMemoryBatches)
    source = InMemoryBatches(dataset)
    assert as_batch_source(source) is source
    with pytest.raises(ConfigError, match="ImageDataset or a BatchSource"):
        as_batch_source(np.zeros((4, 8, 8, 3), np.uint8))
