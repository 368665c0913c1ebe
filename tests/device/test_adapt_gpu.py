"""Adaptation on a real GPU: the CPU byte model against CUDA's own count, and a CUDA run end to end."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ssl.adapt.api import AdaptConfig, adapt
from edge_ssl.adapt.plan import measure_configuration
from edge_ssl.bundle import write_encoder_bundle
from edge_ssl.data.sources import ImageDataset
from edge_ssl.models import create_encoder

pytestmark = pytest.mark.gpu


def _images(n: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("trainable", ["full", "norm", "lora", "last-stage"])
def test_byte_model_tracks_cuda_max_allocated(trainable):
    """The CPU planner's byte model and CUDA's measured peak agree within a factor of 1.6."""
    encoder = create_encoder("resnet18_cifar", width=0.5).cuda().eval()
    images = _images(16)
    targets = np.zeros((16, encoder.spec.embed_dim), np.float32)
    memory = measure_configuration(encoder, trainable, images, targets, AdaptConfig(), batch=16)
    assert memory.cuda_peak_bytes is not None
    ratio = memory.cuda_peak_bytes / memory.model_bytes
    assert 1 / 1.6 < ratio < 1.6, memory.to_dict()


@pytest.mark.parametrize("align_weight, replay_weight", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
def test_cuda_adaptation_writes_a_bundle_and_records_measured_peak(tmp_path, align_weight, replay_weight):
    encoder = create_encoder("resnet18_cifar", width=0.25)
    parent = write_encoder_bundle(tmp_path / "p.edge", encoder, lineage=())
    data = ImageDataset(_images(), None, None, "random")
    replay = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    result = adapt(parent, data, tmp_path / "a.edge",
                   AdaptConfig(trainable="lora", steps=3, batch_size=8, device="cuda",
                               align_weight=align_weight, replay_weight=replay_weight), replay=replay)
    adapt_metrics = result.bundle.manifest.metrics["adapt"]
    assert adapt_metrics["memory_measure"] == "cuda max_memory_allocated"
    assert adapt_metrics["peak_step_mb"] > 0 and result.steps_done == 3
    assert all(("align" in log) == bool(align_weight) for log in result.history)
    assert all(("replay" in log) == bool(replay_weight) for log in result.history)


def test_cuda_tuning_matches_the_cpu_choice_grid():
    """adapt-tune on CUDA scores the same grid as on CPU, to within kNN ties (forward passes only)."""
    from edge_ssl.adapt.tune import TuneConfig, tune_bn_settings
    from edge_ssl.data.sources import embedded_default

    encoder = create_encoder("resnet18_cifar", width=0.25)
    small = {"corruptions": ("gaussian_noise",), "depths": (0.5, 1.0), "priors": (0.5, 0.9),
             "probe_images": 200, "bank_images": 600}
    on_gpu = tune_bn_settings(encoder, embedded_default(), TuneConfig(device="cuda", **small))
    on_cpu = tune_bn_settings(encoder, embedded_default(), TuneConfig(device="cpu", **small))
    assert on_gpu.clean == pytest.approx(on_cpu.clean, abs=0.02)
    for gpu_row, cpu_row in zip(on_gpu.grid, on_cpu.grid, strict=True):
        assert gpu_row["clean_drop_pts"] == pytest.approx(cpu_row["clean_drop_pts"], abs=2.0)
