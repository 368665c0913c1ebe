"""Pretraining: a bundle that rebuilds the model, resume after a stop, NaN stops cleanly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ssl.bundle import Bundle
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import CheckpointError, ConfigError, DataError, TrainingError
from edge_ssl.models import load_encoder
from edge_ssl.train.pretrain import PretrainConfig, checkpoint_dir, pretrain

TINY = {"arch": "resnet18_cifar", "arch_kwargs": {"width": 0.125}, "batch_size": 8, "warmup_epochs": 0.0}


def _data(n: int = 32) -> ImageDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    return ImageDataset(images=images, labels=None, class_names=None, source="random")


def _embed(encoder, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return encoder.eval()(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_pretrain_writes_a_bundle_that_rebuilds_the_encoder(tmp_path, method):
    config = PretrainConfig(method=method, epochs=1, steps_per_epoch=2, **TINY)
    events = []
    result = pretrain(config, _data(), tmp_path / "t.edge", progress=events.append)
    assert [e.step for e in events] == [1, 2] and all(np.isfinite(e.loss) for e in events)
    bundle = Bundle.open(tmp_path / "t.edge")
    assert result.bundle.manifest_sha256 == bundle.manifest_sha256
    entry = bundle.manifest.lineage[-1]
    assert entry.stage == "pretrain" and entry.settings["method"] == method
    assert bundle.manifest.metrics["params"] > 0
    rebuilt = load_encoder(bundle)
    torch.testing.assert_close(_embed(rebuilt), _embed(result.encoder))


def test_resume_after_a_stop_continues_where_it_left(tmp_path):
    out = tmp_path / "t.edge"
    config = PretrainConfig(method="simclr", epochs=2, steps_per_epoch=2, **TINY)

    def stop_in_epoch_two(event):
        if event.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(config, _data(), out, progress=stop_in_epoch_two)
    assert not out.exists(), "no bundle before the run finishes"
    assert (checkpoint_dir(out) / "last.pt").is_file()
    resumed = pretrain(config, _data(), out, resume=True)
    assert resumed.epochs_run == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    assert Bundle.open(out).manifest.lineage[-1].settings["epochs"] == 2
    uninterrupted = pretrain(config, _data(), tmp_path / "straight.edge")
    torch.testing.assert_close(_embed(resumed.encoder), _embed(uninterrupted.encoder))


def test_resume_refuses_other_settings_or_data(tmp_path):
    out = tmp_path / "t.edge"
    pretrain(PretrainConfig(method="simclr", epochs=1, steps_per_epoch=1, **TINY), _data(), out)
    other = PretrainConfig(method="byol", epochs=2, steps_per_epoch=1, **TINY)
    with pytest.raises(CheckpointError, match="different settings.*method"):
        pretrain(other, _data(), out, resume=True)
    same = PretrainConfig(method="simclr", epochs=2, steps_per_epoch=1, **TINY)
    with pytest.raises(CheckpointError, match="different settings"):
        pretrain(same, _data(48), out, resume=True)
    with pytest.raises(ConfigError, match="already finished 1 epochs"):
        pretrain(PretrainConfig(method="simclr", epochs=1, steps_per_epoch=1, **TINY), _data(), out, resume=True)


def test_resume_without_checkpoint_and_corrupt_checkpoint(tmp_path):
    config = PretrainConfig(method="simclr", epochs=1, steps_per_epoch=1, **TINY)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(config, _data(), tmp_path / "t.edge", resume=True)
    ckpt = checkpoint_dir(tmp_path / "t.edge") / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        pretrain(config, _data(), tmp_path / "t.edge", resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import edge_ssl.train.methods as methods

    real_create = methods.create_method
    calls = {"n": 0}

    def poisoned(name, encoder, **kwargs):
        method = real_create(name, encoder, **kwargs)
        forward = method.forward

        def nan_in_epoch_two(views):
            loss, logs = forward(views)
            calls["n"] += 1
            return (loss * float("nan") if calls["n"] > 2 else loss), logs

        method.forward = nan_in_epoch_two
        return method

    monkeypatch.setattr(methods, "create_method", poisoned)
    out = tmp_path / "t.edge"
    config = PretrainConfig(method="simclr", epochs=3, steps_per_epoch=2, **TINY)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 1.*last good checkpoint"):
        pretrain(config, _data(), out)
    state = torch.load(checkpoint_dir(out) / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert not out.exists()


def test_too_little_data_and_bad_config(tmp_path):
    with pytest.raises(DataError, match="fewer than one global batch"):
        pretrain(PretrainConfig(method="simclr", epochs=1, **TINY), _data(4), tmp_path / "t.edge")
    with pytest.raises(ConfigError, match="warmup_epochs"):
        PretrainConfig(epochs=2, warmup_epochs=5)
    with pytest.raises(ConfigError, match="Did you mean 'lars'"):
        PretrainConfig(optimizer="lasr")
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        PretrainConfig.from_dict({"epoch": 1})


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "t.edge"
    config = PretrainConfig(method="simclr", epochs=1, steps_per_epoch=1, **TINY)
    pretrain(config, _data(), out)
    before = Bundle.open(out).manifest_sha256
    with pytest.raises(ConfigError, match="already exists"):
        pretrain(config, _data(), out)
    assert Bundle.open(out).manifest_sha256 == before


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    """A real kill -9 mid-run: the atomic checkpoint survives and --resume finishes the run."""
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "d.npz"
    np.savez(data, x=_data(32).images)
    out = tmp_path / "k.edge"
    common = ["--method", "simclr", "--arch", "resnet18_cifar", "--arch-opt", "width=0.125",
              "--batch-size", "8", "--warmup-epochs", "0", "--data", str(data), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "edge_ssl", "pretrain", "--epochs", "1000", *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = checkpoint_dir(out) / "last.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    assert not out.exists()
    done = int(torch.load(ckpt, weights_only=True)["epoch"])
    resumed = subprocess.run(
        [sys.executable, "-m", "edge_ssl", "pretrain", "--epochs", str(done + 1), "--resume", "--json", *common],
        capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    settings = Bundle.open(out).manifest.lineage[-1].settings
    assert settings["epochs"] == done + 1
    state = torch.load(ckpt, weights_only=True)
    assert [h["epoch"] for h in state["history"]] == list(range(1, done + 2))


# --------------------------------------------------------------------------- GPU-path logic on CPU


@pytest.mark.parametrize(
    ("mode", "device", "capability", "expected"),
    [
        ("auto", "cuda", (9, 0), "bf16"),  # H100/H200
        ("auto", "cuda", (8, 0), "bf16"),  # A100
        ("auto", "cuda", (7, 0), "fp16"),  # V100: no fast bf16
        ("fp16", "cuda", (9, 0), "fp16"),
        ("off", "cuda", (9, 0), None),
        ("auto", "cpu", None, None),
        ("bf16", "cpu", None, None),
    ],
)
def test_autocast_defaults_to_bf16_on_ampere_and_newer(mode, device, capability, expected):
    from edge_ssl.train.pretrain import autocast_dtype_name

    assert autocast_dtype_name(mode, device, capability) == expected


def test_loss_is_read_back_every_log_every_steps_not_every_step(tmp_path, monkeypatch):
    """The GPU path syncs only at read-outs: count them, and check the window means."""
    import edge_ssl.train.pretrain as pretrain_module

    reads = []
    real = pretrain_module._read_loss
    monkeypatch.setattr(pretrain_module, "_read_loss", lambda run, *a: reads.append(a[-2:]) or real(run, *a))
    config = PretrainConfig(method="simclr", epochs=1, steps_per_epoch=3, log_every=2, **TINY)
    events = []
    result = pretrain(config, _data(), tmp_path / "t.edge", progress=events.append)
    assert reads == [(1, 2), (3, 3)]  # one full window and the epoch's tail
    assert [e.step for e in events] == [2, 3]
    assert result.history[0]["loss"] == pytest.approx((2 * events[0].loss + events[1].loss) / 3)

    per_step = pretrain(PretrainConfig(method="simclr", epochs=1, steps_per_epoch=3, log_every=1, **TINY),
                        _data(), tmp_path / "u.edge")
    torch.testing.assert_close(_embed(per_step.encoder), _embed(result.encoder))  # same training


def test_nan_found_at_a_read_out_names_the_window(tmp_path, monkeypatch):
    import edge_ssl.train.methods as methods

    real_create = methods.create_method

    def poisoned(name, encoder, **kwargs):
        method = real_create(name, encoder, **kwargs)
        forward = method.forward
        method.forward = lambda views: (forward(views)[0] * float("nan"), {})
        return method

    monkeypatch.setattr(methods, "create_method", poisoned)
    config = PretrainConfig(method="simclr", epochs=1, steps_per_epoch=3, log_every=3, **TINY)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, steps 1-3.*\(none yet\)"):
        pretrain(config, _data(), tmp_path / "t.edge")


class _CountingSource:
    """A BatchSource that is not an ImageDataset (as a streaming source would be)."""

    def __init__(self):
        from edge_ssl.data.batches import InMemoryBatches

        self.inner = InMemoryBatches(_data(32))
        self.source, self.num_images, self.epochs = "counting", 32, []

    def fingerprint(self):
        return "fixed"

    def steps_per_epoch(self, batch_size, world_size):
        return self.inner.steps_per_epoch(batch_size, world_size)

    def epoch_batches(self, epoch, batch_size, **kwargs):
        self.epochs.append(epoch)
        return self.inner.epoch_batches(epoch, batch_size, **kwargs)


def test_pretrain_reads_any_batch_source(tmp_path):
    source = _CountingSource()
    config = PretrainConfig(method="byol", epochs=2, steps_per_epoch=1, **TINY)
    result = pretrain(config, source, tmp_path / "t.edge")
    assert source.epochs == [0, 1] and result.epochs_run == 2
    assert Bundle.open(tmp_path / "t.edge").manifest.lineage[-1].settings["data"] == "counting"


def test_output_checks_come_before_the_data_is_touched(tmp_path):
    class Untouchable(_CountingSource):
        def epoch_batches(self, *args, **kwargs):
            raise AssertionError("data was read before the output check")

    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = PretrainConfig(method="simclr", epochs=1, steps_per_epoch=1, **TINY)
    with pytest.raises(ConfigError, match="cannot write to"):
        pretrain(config, Untouchable(), blocker / "t.edge")
    with pytest.raises(Exception, match="not a bundle"):
        pretrain(config, Untouchable(), blocker, overwrite=True)


@pytest.mark.slow
def test_compile_flag_wraps_the_forward_and_keeps_clean_checkpoints(tmp_path, monkeypatch):
    """--compile's wiring on CPU (dynamo with the eager backend: no C++ toolchain, seconds)."""
    real_compile = torch.compile
    modes = []

    def eager_compile(model, mode=None):
        modes.append(mode)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    config = PretrainConfig(method="simclr", epochs=1, steps_per_epoch=2, compile=True, **TINY)
    result = pretrain(config, _data(), tmp_path / "t.edge")
    assert modes == [None] and np.isfinite(result.final_loss)
    state = torch.load(checkpoint_dir(tmp_path / "t.edge") / "last.pt", weights_only=True)
    assert not any("_orig_mod" in key for key in state["method"]), "checkpoint keys must not depend on --compile"
    torch.testing.assert_close(_embed(load_encoder(Bundle.open(tmp_path / "t.edge"))), _embed(result.encoder))


def test_a_failed_setup_destroys_the_process_group_it_made(tmp_path, monkeypatch):
    """Under torchrun a setup error (here: fewer images than one global batch) must not leak the group."""
    import edge_ssl.train.distributed as distributed

    closed = []
    monkeypatch.setattr(distributed, "init_distributed",
                        lambda kind, environ=None: distributed.DistInfo(0, 2, 0, owns_group=True))
    monkeypatch.setattr(distributed, "shutdown", closed.append)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    config = PretrainConfig(arch="resnet18_cifar", arch_kwargs={"width": 0.125}, epochs=1, batch_size=4, device="cpu")
    with pytest.raises(DataError, match="global batch"):
        pretrain(config, ImageDataset(images, None, None, "six"), tmp_path / "out.edge")
    assert [info.world_size for info in closed] == [2]
