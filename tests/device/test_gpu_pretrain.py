"""Real-GPU checks (run where CUDA is present; skipped elsewhere by the `gpu` marker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ssl.bundle import Bundle
from edge_ssl.data import ImageDataset
from edge_ssl.models import load_encoder
from edge_ssl.pretrain import PretrainConfig, pretrain
from tests.conftest import COSINE_MIN

pytestmark = pytest.mark.gpu


def _data(n: int = 64) -> ImageDataset:
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageDataset(images=images, labels=None, class_names=None, source="random")


@pytest.mark.parametrize("amp", ["off", "auto", "fp16"])
@pytest.mark.parametrize("method", ["simclr", "byol", "dino"])
def test_cuda_pretrain_with_mixed_precision(tmp_path, method, amp):
    config = PretrainConfig(
        method=method, arch="resnet18_cifar", arch_kwargs={"width": 0.25}, epochs=1,
        batch_size=16, steps_per_epoch=3, warmup_epochs=0.0, device="cuda", amp=amp,
    )
    result = pretrain(config, _data(), tmp_path / "g.edge")
    assert np.isfinite(result.final_loss)
    rebuilt = load_encoder(Bundle.open(tmp_path / "g.edge"))
    batch = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        cpu = rebuilt(batch)
        gpu = result.encoder.cuda().eval()(batch.cuda()).cpu()
    cosine = torch.nn.functional.cosine_similarity(cpu, gpu, dim=1)
    assert cosine.min() > COSINE_MIN
