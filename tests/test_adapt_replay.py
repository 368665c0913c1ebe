"""Replay during adaptation: clean images whose embeddings the steps keep at the deployed model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ssl.adapt.api import AdaptConfig, adapt
from edge_ssl.adapt.inputs import checkpoint_path
from edge_ssl.adapt.plan import measure_configuration
from edge_ssl.adapt.run import load_checkpoint
from edge_ssl.adapt.step import replay_term
from edge_ssl.bundle import Bundle, write_encoder_bundle
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import CheckpointError, ConfigError, DataError
from edge_ssl.evaluate import embed
from edge_ssl.models import create_encoder, load_encoder

FAST = {"steps": 2, "batch_size": 8, "guard_every": 1, "checkpoint_every": 1, "head_dim": 32,
        "device": "cpu", "trainable": "lora",
        "keep_best": False}  # these tests study the steps; keep_best has its own


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Bundle:
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.25)
    return write_encoder_bundle(tmp_path_factory.mktemp("replay") / "deployed.edge", encoder, lineage=())


def _uint8(count: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (count, size, size, 3), dtype=np.uint8)


def _local(count: int = 48) -> ImageDataset:
    return ImageDataset(_uint8(count, 0), None, None, f"random-{count}")


def test_replay_term_is_zero_for_the_deployed_model_on_its_own_embeddings(parent):
    encoder = load_encoder(parent).eval()
    images = _uint8(6, 1)
    targets = embed(encoder, images, batch_size=8, device="cpu")
    with torch.no_grad():
        term, batch = replay_term(encoder, images, targets, torch.device("cpu"))
    assert abs(float(term)) < 1e-5 and batch.shape == (6, 3, 32, 32)
    with torch.no_grad():
        moved, _ = replay_term(encoder, images, -targets, torch.device("cpu"))
    assert float(moved) == pytest.approx(2.0, abs=1e-4)


def test_a_run_with_replay_logs_the_term_and_records_the_images(parent, tmp_path):
    replay = _uint8(12, 2, size=40)  # another size: resized to the bundle's input like local images
    result = adapt(parent, _local(), tmp_path / "a.edge", AdaptConfig(replay_weight=1.0, **FAST),
                   replay=replay)
    assert len(result.history) == 2 and all(log["replay"] >= 0 for log in result.history)
    record = Bundle.open(tmp_path / "a.edge").manifest.lineage[-1].settings["replay"]
    assert record["images"] == 12 and len(record["fingerprint"]) == 16


def test_without_replay_weight_the_images_are_not_used(parent, tmp_path):
    result = adapt(parent, _local(), tmp_path / "a.edge", AdaptConfig(**FAST), replay=_uint8(12, 2))
    assert all("replay" not in log for log in result.history)
    assert Bundle.open(tmp_path / "a.edge").manifest.lineage[-1].settings["replay"] is None


@pytest.mark.parametrize("replay, message", [
    (None, "needs clean replay images"),
    (np.zeros((8, 32, 32, 3), np.float32), "uint8"),
    (np.zeros((2, 32, 32, 3), np.uint8), "at least"),
])
def test_bad_replay_input_is_refused_before_any_work(parent, tmp_path, replay, message):
    with pytest.raises(DataError, match=message):
        adapt(parent, _local(), tmp_path / "a.edge", AdaptConfig(replay_weight=1.0, **FAST), replay=replay)
    assert not (tmp_path / "a.edge").exists() and not checkpoint_path(tmp_path / "a.edge").parent.exists()


def test_negative_replay_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="replay_weight"):
        AdaptConfig(replay_weight=-1.0)


def test_resume_refuses_other_replay_images(parent, tmp_path, monkeypatch):
    import edge_ssl.adapt.run as adapt_run

    config = AdaptConfig(replay_weight=1.0, **{**FAST, "steps": 3})
    replay = _uint8(12, 2)

    def power_cut(run, steps):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapt_run.AdaptRun, "finish", power_cut)  # after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        adapt(parent, _local(), tmp_path / "a.edge", config, replay=replay)
    path = checkpoint_path(tmp_path / "a.edge")
    with pytest.raises(CheckpointError, match="replay images"):
        load_checkpoint(path, config, _local().images, _uint8(12, 3))
    with pytest.raises(CheckpointError, match="replay images"):
        load_checkpoint(path, config, _local().images, None)
    assert load_checkpoint(path, config, _local().images, replay)["step"] == 2


def test_the_plan_measures_the_replay_batch(parent):
    encoder = load_encoder(parent)
    images, targets = _uint8(8, 4), np.zeros((8, encoder.spec.embed_dim), np.float32)
    config = AdaptConfig(replay_weight=1.0, **FAST)
    without = measure_configuration(encoder, "lora", images, targets, config, batch=8)
    with_replay = measure_configuration(encoder, "lora", images, targets, config, batch=8,
                                        replay=(_uint8(8, 5), targets))
    assert with_replay.peak_bytes > without.peak_bytes


def test_sample_replay_spreads_over_the_classes():
    from edge_ssl.adapt.replay import sample_replay

    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(3, axis=3)
    labels = np.repeat(np.arange(4), [70, 10, 10, 10])
    chosen = sample_replay(images, labels, 20, seed=0)
    picked = labels[chosen[:, 0, 0, 0]]
    assert len(chosen) == 20 and np.bincount(picked, minlength=4).tolist() == [5, 5, 5, 5]
    assert len(sample_replay(images, None, 7, seed=0)) == 7
    assert len(sample_replay(images, labels, 500, seed=0)) == 100


def _tuned_with_replay(parent, tmp_path):
    from edge_ssl.adapt.tune import TuneConfig, tune_bn_settings, write_tuned
    from edge_ssl.data.sources import embedded_default

    config = TuneConfig(corruptions=("gaussian_noise",), depths=(0.5,), priors=(0.5,), probe_images=200,
                        bank_images=600, replay_images=40, device="cpu")
    result = tune_bn_settings(load_encoder(parent), embedded_default(), config)
    return result, write_tuned(parent, result, tmp_path / "tuned.edge")


def test_adapt_tune_ships_replay_images_from_outside_the_probe_and_adapt_uses_them(parent, tmp_path):
    from edge_ssl.adapt.replay import REPLAY_FILE, load_replay
    from edge_ssl.adapt.tune import adapt_config_for, probe_split
    from edge_ssl.data.sources import embedded_default

    result, bundle = _tuned_with_replay(parent, tmp_path)
    replay = load_replay(bundle)
    assert replay is not None and replay.shape == (40, *embedded_default().images.shape[1:])
    split = probe_split(embedded_default(), result.config)
    probe = {img.tobytes() for img in np.concatenate([split["adapt_x"], split["eval_x"]])}
    assert not any(img.tobytes() in probe for img in replay)  # never an image the grid scored
    settings = result.settings()
    assert settings["replay_weight"] == 1.0 and settings["align_weight"] in (0.0, 1.0)
    assert result.to_dict()["images"]["replay"] == 40
    config = adapt_config_for(bundle, FAST)
    assert config.replay_weight == 1.0
    adapted = adapt(bundle, _local(), tmp_path / "a.edge", config, export="never")  # no replay= given
    assert all(log["replay"] >= 0 for log in adapted.history)
    record = adapted.bundle.manifest.lineage[-1].settings["replay"]
    assert record["images"] == 40
    assert adapted.bundle.has(REPLAY_FILE)  # carried, with the settings: adapting again replays too
    again = adapt(adapted.bundle, _local(), tmp_path / "b.edge", adapt_config_for(adapted.bundle, FAST),
                  export="never")
    assert again.bundle.manifest.lineage[-1].settings["replay"] == record
    assert adapt_config_for(bundle, {"replay_weight": 0.0}).replay_weight == 0.0  # explicit wins


def test_a_broken_replay_file_is_a_clear_error_and_writes_nothing(parent, tmp_path):
    from edge_ssl.adapt.replay import REPLAY_FILE, load_replay
    from edge_ssl.bundle import BundleWriter
    from edge_ssl.errors import BundleError

    with BundleWriter(tmp_path / "b.edge") as writer:
        writer.copy_file("model.pt", parent.file("model.pt"))
        writer.write_bytes(REPLAY_FILE, b"not an npz")
        broken = writer.commit(name="b", encoder=parent.manifest.encoder, lineage=())
    with pytest.raises(BundleError, match="not a readable replay file"):
        load_replay(broken)
    with pytest.raises(BundleError, match="not a readable replay file"):
        adapt(broken, _local(), tmp_path / "a.edge", AdaptConfig(replay_weight=1.0, **FAST))
    assert not (tmp_path / "a.edge").exists()


def test_cli_takes_replay_data_on_the_host_and_refuses_it_for_device_training(parent, tmp_path):
    from typer.testing import CliRunner

    from edge_ssl.cli import app

    local, clean = tmp_path / "local.npz", tmp_path / "clean.npz"
    np.savez(local, x=_uint8(48, 0))
    np.savez(clean, x=_uint8(16, 9))
    runner = CliRunner()
    common = ["adapt", str(parent.path), "--data", str(local), "--steps", "2", "--device", "cpu",
              "--trainable", "lora", "--export", "never", "--opt", "head_dim=32", "--opt", "replay_weight=1"]
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "a.edge"), "--replay-data", str(clean)])
    assert result.exit_code == 0, result.output
    assert Bundle.open(tmp_path / "a.edge").manifest.lineage[-1].settings["replay"]["images"] == 16
    missing = runner.invoke(app, [*common, "--out", str(tmp_path / "b.edge")])
    assert missing.exit_code != 0 and "needs clean replay images" in str(missing.exception or missing.output)
    device = runner.invoke(app, [*common, "--out", str(tmp_path / "c.edge"), "--replay-data", str(clean),
                                 "--on", "local"])
    assert device.exit_code != 0 and "host runs" in device.output


def test_adapt_tune_caps_the_replay_images_by_size(parent):
    from edge_ssl.adapt.tune import TuneConfig, tune_bn_settings
    from edge_ssl.data.sources import embedded_default

    digits = embedded_default()
    small = {"corruptions": ("gaussian_noise",), "depths": (0.5,), "priors": (0.5,), "probe_images": 200,
             "bank_images": 600, "device": "cpu"}
    per_image = digits.images[0].nbytes
    capped = tune_bn_settings(load_encoder(parent), digits,
                              TuneConfig(replay_max_mb=10 * per_image / (1 << 20), **small))
    assert capped.replay is not None and len(capped.replay) == 10
    assert capped.settings()["replay_weight"] == 1.0
    none = tune_bn_settings(load_encoder(parent), digits,
                            TuneConfig(replay_max_mb=2 * per_image / (1 << 20), **small))
    assert none.replay is None and "replay_weight" not in none.settings()
    with pytest.raises(ConfigError, match="replay_max_mb"):
        TuneConfig(replay_max_mb=0)
    with pytest.raises(ConfigError, match="replay_images"):
        TuneConfig(replay_images=2)
