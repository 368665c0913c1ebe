"""`edge-ssl adapt` end to end on a tiny encoder: the bundle it writes, bad input, guard, OOM, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ssl.adapt.api import AdaptConfig, adapt
from edge_ssl.adapt.config import MIN_IMAGES
from edge_ssl.adapt.inputs import checkpoint_path
from edge_ssl.bundle import Bundle, BundleWriter, write_encoder_bundle
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import BundleError, ConfigError, DataError
from edge_ssl.models import create_encoder, load_encoder
from tests.conftest import PROJECT_ROOT

FAST = {"steps": 2, "batch_size": 8, "guard_every": 1, "checkpoint_every": 1, "head_dim": 32,
        "device": "cpu",
        "keep_best": False}  # these tests study the steps; keep_best has its own


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Bundle:
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.25)
    out = tmp_path_factory.mktemp("adapt") / "deployed.edge"
    return write_encoder_bundle(out, encoder, lineage=())


def _images(count: int, size: int = 32, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (count, size, size, 3), dtype=np.uint8)
    return ImageDataset(base, None, None, f"random-{count}")


def _weights(bundle: Bundle | Path) -> dict[str, torch.Tensor]:
    return load_encoder(bundle).state_dict()


@pytest.mark.parametrize("trainable", ["lora", "bn-stats"])
def test_writes_a_plain_encoder_bundle_with_lineage(parent, tmp_path, trainable):
    data = _images(48)
    result = adapt(parent, data, tmp_path / "a.edge", AdaptConfig(trainable=trainable, **FAST))
    bundle = Bundle.open(tmp_path / "a.edge")
    assert bundle.manifest.encoder == parent.manifest.encoder  # same spec: adapters merged
    adapted, original = _weights(bundle), _weights(parent)
    assert set(adapted) == set(original)
    assert any(not torch.equal(adapted[k], original[k]) for k in original)
    entry = bundle.manifest.lineage[-1]
    assert entry.stage == "adapt" and entry.parent == parent.manifest_sha256
    settings = entry.settings
    assert settings["trainable"] == trainable and settings["data"]["images"] == 48
    assert len(settings["data"]["fingerprint"]) == 16
    assert settings["steps_done"] == (2 if trainable == "lora" else 0)
    assert settings["peak_step_mb"] > 0 and "effective_rank" in settings["health_after"]
    assert bundle.manifest.metrics["adapt"]["health_before"]["effective_rank"] > 0
    assert result.steps_done == settings["steps_done"]
    assert not checkpoint_path(tmp_path / "a.edge").parent.exists()  # cleaned up on success


def test_a_shallow_bn_depth_keeps_deep_statistics_except_where_the_steps_changed_the_input(parent, tmp_path):
    from edge_ssl.adapt.bn import batch_norms

    adapt(parent, _images(48), tmp_path / "a.edge",
          AdaptConfig(trainable="lora", bn_depth=0.5, **FAST))
    deployed, adapted = load_encoder(parent), load_encoder(tmp_path / "a.edge")
    names = [n for n, m in deployed.named_modules() if m in set(batch_norms(deployed))]
    half = len(names) // 2
    source, new = deployed.state_dict(), adapted.state_dict()
    changed = [n for n in names if not torch.equal(source[f"{n}.running_mean"], new[f"{n}.running_mean"])]
    assert set(names[:half]) <= set(changed)  # shallow: re-estimated on the local images
    deep_changed = [n for n in changed if n in names[half:]]
    assert deep_changed and all(".layer4." in f".{n}" for n in deep_changed)  # LoRA's stage only


def test_alignment_steps_leave_the_deep_layers_at_the_deployed_statistics(parent, tmp_path):
    from edge_ssl.adapt.bn import batch_norms

    result = adapt(parent, _images(48), tmp_path / "a.edge",
                   AdaptConfig(trainable="lora", bn_depth=0.5, align_weight=1.0, **FAST))
    assert result.history and all(log["align"] > 0 for log in result.history)
    deployed, adapted = load_encoder(parent), load_encoder(tmp_path / "a.edge")
    names = [n for n, m in deployed.named_modules() if m in set(batch_norms(deployed))]
    source, new = deployed.state_dict(), adapted.state_dict()
    for name in names[len(names) // 2:]:  # no step change carried: the steps moved the inputs there
        assert torch.equal(source[f"{name}.running_mean"], new[f"{name}.running_mean"])
        assert torch.equal(source[f"{name}.running_var"], new[f"{name}.running_var"])


@pytest.mark.parametrize("distill_to", ["bn-adapted", "deployed"])
def test_distillation_targets_follow_distill_to_and_are_checkpointed(parent, tmp_path, monkeypatch,
                                                                     distill_to):
    import edge_ssl.adapt.run as adapt_run
    from edge_ssl.evaluate import embed

    seen, states = [], []
    real_loss = adapt_run.step_loss

    def spy(method, views, images, targets, config, device, *rest):
        seen.append(targets.copy())
        return real_loss(method, views, images, targets, config, device, *rest)

    monkeypatch.setattr(adapt_run, "step_loss", spy)
    monkeypatch.setattr(adapt_run.AdaptRun, "save_checkpoint", lambda run: states.append(run.checkpoint_state()))
    data = _images(48)
    adapt(parent, data, tmp_path / "a.edge", AdaptConfig(trainable="lora", distill_to=distill_to, **FAST))
    checkpointed = states[0]["distill_targets"].numpy()  # what --resume continues with
    rows = {row.tobytes() for row in checkpointed}
    assert all(row.tobytes() in rows for batch in seen for row in batch)
    deployed = embed(load_encoder(parent), data.images, batch_size=64, device="cpu")
    assert np.allclose(checkpointed, deployed, atol=1e-5) == (distill_to == "deployed")


def test_images_of_another_size_are_resized(parent, tmp_path):
    result = adapt(parent, _images(40, size=48), tmp_path / "a.edge", AdaptConfig(trainable="bn-stats", **FAST))
    assert result.bundle.manifest.encoder.input.shape == (3, 32, 32)


def test_too_few_images_says_how_many_are_needed(parent, tmp_path):
    with pytest.raises(DataError, match=f"at least {MIN_IMAGES}"):
        adapt(parent, _images(5), tmp_path / "a.edge", AdaptConfig(**FAST))
    assert not (tmp_path / "a.edge").exists()


def test_budget_too_small_names_the_minimum_and_writes_nothing(parent, tmp_path):
    with pytest.raises(ConfigError, match=r"needs [0-9.]+ MB"):
        adapt(parent, _images(40), tmp_path / "a.edge", AdaptConfig(budget_mb=0.5, **FAST))
    assert not (tmp_path / "a.edge").exists()
    assert not checkpoint_path(tmp_path / "a.edge").exists()


def test_existing_output_and_stale_checkpoint_are_refused(parent, tmp_path):
    with pytest.raises(BundleError, match="input bundle"):
        adapt(parent, _images(40), parent.path, AdaptConfig(**FAST))
    (tmp_path / "taken.edge").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        adapt(parent, _images(40), tmp_path / "taken.edge", AdaptConfig(**FAST))
    ckpt = checkpoint_path(tmp_path / "a.edge")
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    with pytest.raises(BundleError, match="--resume"):
        adapt(parent, _images(40), tmp_path / "a.edge", AdaptConfig(**FAST))


def _quantized_child(parent: Bundle, out: Path) -> Bundle:
    with BundleWriter(out) as writer:
        writer.write_bytes("model.onnx", b"not really onnx")
        return writer.commit(name=out.stem, encoder=parent.manifest.encoder,
                             lineage=parent.child_lineage("quantize", {}), precision="int8")


def test_quantized_bundle_adapts_from_its_float_parent(parent, tmp_path):
    quantized = _quantized_child(parent, tmp_path / "q.edge")
    result = adapt(quantized, _images(40), tmp_path / "a.edge",
                   AdaptConfig(trainable="bn-stats", **FAST), export="never")
    # the adapted float weights are re-quantized, so the last entry is that quantize stage
    lineage = result.bundle.manifest.lineage
    assert lineage[-1].stage == "quantize" and result.bundle.manifest.precision == "int8"
    entry = next(e for e in reversed(lineage) if e.stage == "adapt")
    assert entry.parent == quantized.manifest_sha256
    assert entry.settings["parent_with_weights"] == str(parent.path)


def test_quantized_bundle_without_its_parent_says_what_to_pass(tmp_path):
    encoder = create_encoder("resnet18_cifar", width=0.25)
    lonely = write_encoder_bundle(tmp_path / "gone.edge", encoder, lineage=())
    quantized = _quantized_child(lonely, tmp_path / "q.edge")
    import shutil

    shutil.rmtree(lonely.path)
    with pytest.raises(BundleError, match="float"):
        adapt(quantized, _images(40), tmp_path / "a.edge", AdaptConfig(**FAST))


def test_guard_stops_on_drift_and_keeps_the_last_good_weights(parent, tmp_path):
    config = AdaptConfig(trainable="last-stage", lr=5.0, min_agreement=0.999, bn_stats=False, **FAST)
    result = adapt(parent, _images(48), tmp_path / "a.edge", config)
    assert result.stopped and "guard at step 1" in result.stopped
    assert result.steps_done == 1
    for key, value in _weights(parent).items():  # nothing passed the guard: parent weights kept
        torch.testing.assert_close(_weights(result.bundle)[key], value)


def test_out_of_memory_halves_the_batch_and_retries(parent, tmp_path, monkeypatch):
    from edge_ssl.adapt.run import AdaptRun

    real = AdaptRun._forward_backward
    failures = []

    def flaky(self, index):
        if not failures:
            failures.append(len(index))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, index)

    monkeypatch.setattr(AdaptRun, "_forward_backward", flaky)
    messages = []
    result = adapt(parent, _images(48), tmp_path / "a.edge",
                   AdaptConfig(trainable="lora", **FAST), progress=lambda e: messages.append(e.message))
    assert result.steps_done == 2 and failures == [8]
    assert result.history[0]["batch"] == 4
    assert any("out of memory" in m for m in messages)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_ssl", "adapt", *args]


def test_resume_after_sigkill(parent, tmp_path):
    """A real kill -9 mid-run leaves no bundle, only a checkpoint; --resume finishes the run."""
    np.savez(tmp_path / "local.npz", x=_images(40).images)
    out = tmp_path / "a.edge"
    common = [str(parent.path), "--data", str(tmp_path / "local.npz"), "--out", str(out),
              "--trainable", "lora", "--batch-size", "4", "--device", "cpu",
              "--opt", "checkpoint_every=1", "--opt", "guard_every=50", "--opt", "head_dim=32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli(*common, "--steps", "100000"), cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = checkpoint_path(out)
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "no checkpoint was written before the kill"
    assert not out.exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    resumed = subprocess.run(_cli(*common, "--steps", str(step + 2), "--resume", "--json"),
                             cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["steps_done"] == step + 2
    entry = Bundle.open(out).manifest.lineage[-1]
    assert entry.settings["resumed"] is True and entry.settings["steps_done"] == step + 2
    assert not ckpt.exists()


def test_cli_reports_json_and_one_line_errors(parent, tmp_path, capsys):
    from edge_ssl.cli import main

    np.savez(tmp_path / "few.npz", x=_images(3).images)
    with pytest.raises(SystemExit) as stop:
        main(["adapt", str(parent.path), "--data", str(tmp_path / "few.npz"), "--out", str(tmp_path / "a.edge")])
    assert stop.value.code == 1
    assert f"at least {MIN_IMAGES}" in capsys.readouterr().err
    np.savez(tmp_path / "local.npz", x=_images(40).images)
    with pytest.raises(SystemExit) as done:
        main(["adapt", str(parent.path), "--data", str(tmp_path / "local.npz"), "--out",
              str(tmp_path / "a.edge"), "--trainable", "bn-stats", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert done.value.code in (0, None), captured.err
    report = json.loads(captured.out)
    assert report["plan"]["trainable"] == "bn-stats" and Path(report["bundle"]).is_dir()


def test_adapted_bundles_belong_to_the_deployment_they_started_from(parent, tmp_path):
    from edge_ssl.adapt.inputs import deployment_name
    from edge_ssl.bundle import lineage_entry

    encoder = load_encoder(parent)
    first = write_encoder_bundle(tmp_path / "cam-monday.edge", encoder,
                                 lineage=parent.child_lineage("adapt", {}))
    second = write_encoder_bundle(tmp_path / "cam-tuesday.edge", encoder,
                                  lineage=first.child_lineage("adapt", {}))
    assert deployment_name(first) == deployment_name(second) == parent.manifest.name
    other = write_encoder_bundle(tmp_path / "student.edge", encoder,
                                 lineage=(lineage_entry("distill", {}, parent),))
    assert deployment_name(other) == "student"  # only adaptation keeps the deployment
