"""Real-GPU checks (run where CUDA is present; skipped elsewhere by the `gpu` marker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ssl.bundle import Bundle
from edge_ssl.data.sources import ImageDataset
from edge_ssl.models import load_encoder
from edge_ssl.train.pretrain import PretrainConfig, pretrain
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


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_default_device_names_train_on_the_gpu(tmp_path, device):
    """Issue 5: --device auto|cuda stopped with 'Expected a torch.device with a specified index'."""
    config = PretrainConfig(method="simclr", arch_kwargs={"width": 0.125}, epochs=1, batch_size=8,
                            steps_per_epoch=2, warmup_epochs=0.0, device=device)
    result = pretrain(config, _data(), tmp_path / "d.edge")
    assert np.isfinite(result.final_loss)
    assert result.bundle.manifest.lineage[-1].settings["device"] == device


def test_cli_pretrain_with_default_flags(tmp_path, capsys):
    from edge_ssl.cli import main

    data = tmp_path / "d.npz"
    np.savez(data, x=_data(64).images)
    try:
        main(["pretrain", "--out", str(tmp_path / "c.edge"), "--data", str(data), "--epochs", "1",
              "--batch-size", "16", "--steps-per-epoch", "2", "--arch-opt", "width=0.125", "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    assert (tmp_path / "c.edge" / "manifest.json").is_file()


def test_auto_precision_is_bf16_on_ampere_and_newer():
    from edge_ssl.device import resolve_device
    from edge_ssl.train.pretrain import amp_dtype

    device = resolve_device("cuda")
    expected = torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    assert amp_dtype("auto", device) == expected


@pytest.mark.parametrize("knobs", [{"channels_last": False, "log_every": 1}, {"compile": True}, {"cuda_graphs": True}])
def test_fast_paths_learn_the_same_as_the_plain_loop(tmp_path, knobs):
    base = dict(method="simclr", arch_kwargs={"width": 0.25}, epochs=1, batch_size=32, steps_per_epoch=6,
                warmup_epochs=0.0, device="cuda", amp="off", log_every=3)
    reference = pretrain(PretrainConfig(**base), _data(256), tmp_path / "a.edge")
    other = pretrain(PretrainConfig(**(base | knobs)), _data(256), tmp_path / "b.edge")
    assert other.history[0]["loss"] == pytest.approx(reference.history[0]["loss"], rel=0.02)


@pytest.mark.parametrize("method", ["simclr", "byol", "dino"])
def test_training_step_never_syncs_with_the_host(tmp_path, monkeypatch, method):
    """CUDA's own check (torch.cuda.set_sync_debug_mode) around every step after the first
    (the first creates cuBLAS/cuDNN handles); the CPU version is tests/test_host_syncs.py."""
    import edge_ssl.train.pretrain as pretrain_module

    real, calls = pretrain_module._train_step, []

    def checked(run, batch, step):
        calls.append(step)
        if len(calls) == 1:
            return real(run, batch, step)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(run, batch, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(pretrain_module, "_train_step", checked)
    # fp16 loss scaling reads its inf check back by design (torch's GradScaler): bf16 or fp32 here.
    amp = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "off"
    config = PretrainConfig(method=method, arch_kwargs={"width": 0.25}, epochs=1, batch_size=16,
                            steps_per_epoch=4, warmup_epochs=0.0, device="cuda", amp=amp, log_every=4)
    result = pretrain(config, _data(), tmp_path / "s.edge")
    assert len(calls) == 4 and np.isfinite(result.final_loss)
