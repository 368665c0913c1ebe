"""`edge-ssl adapt --on TARGET`: training on the device itself, over a real OpenSSH server on loopback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from edge_ssl.devices.deploy import DeployOptions, deploy, deployment_status
from edge_ssl.devices.remote_adapt import (
    DeviceAdaptError,
    DeviceAdaptJob,
    adapt_argv,
    adapt_on_device,
    failure_message,
)
from edge_ssl.devices.target import SSHSettings, parse_target

from edge_ssl.bundle import Bundle, write_encoder_bundle
from tests.test_devices_ssh import _cli, loopback_device

pytest.importorskip("onnxruntime", reason="the adapted bundle is re-exported to ONNX for the device")


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    yield from loopback_device(tmp_path_factory.mktemp("sshd"))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Path:
    """A tiny float bundle with model.onnx: what a camera runs."""
    import torch
    from edge_ssl.runtime.export import export_encoder_onnx

    from edge_ssl.models import create_encoder

    root = tmp_path_factory.mktemp("bundles")
    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.125).eval()
    onnx = export_encoder_onnx(encoder, root / "cam.onnx")
    return write_encoder_bundle(root / "cam.edge", encoder, lineage=(),
                                extra_files={"model.onnx": onnx}).path


@pytest.fixture
def device_images(tmp_path) -> Path:
    """Unlabeled images that live on the device (loopback: the same filesystem)."""
    path = tmp_path / "on-device" / "frames.npz"
    path.parent.mkdir()
    np.savez(path, x=np.random.default_rng(0).integers(0, 255, (48, 32, 32, 3), dtype=np.uint8))
    return path


def _env(monkeypatch, device, root: Path, python: str = sys.executable) -> None:
    monkeypatch.setenv("EDGE_SSL_SSH_CONFIG", str(device.ssh_config))
    monkeypatch.setenv("EDGE_SSL_DEVICE_PYTHON", python)
    monkeypatch.setenv("EDGE_SSL_REMOTE_ROOT", str(root))


def test_adapts_on_the_device_then_switches_with_rollback_kept(device, deployed, device_images,
                                                               tmp_path, monkeypatch):
    root = tmp_path / "device-root"
    _env(monkeypatch, device, root)
    settings = SSHSettings(ssh_config=str(device.ssh_config), python=sys.executable, remote_root=str(root))
    with parse_target("ssh://device", settings) as target:
        first = deploy(deployed, target, DeployOptions())
    out = tmp_path / "cam-adapted.edge"
    done = _cli(["adapt", str(deployed), "--on", "ssh://device", "--data", str(device_images),
                 "--out", str(out), "--steps", "2", "--trainable", "bias", "--device", "cpu",
                 "--budget-mb", "500", "--json"])
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["steps_done"] == 2 and report["plan"]["trainable"] == "bias"
    assert report["trained_on"]["torch"] and report["trained_on"]["target"] == "device"
    assert report["deploy"]["previous"] == first.version
    fetched = Bundle.open(out, verify=True)  # the host's copy is the deployed version, byte for byte
    assert fetched.manifest_sha256[:16] == report["deploy"]["version"]
    assert fetched.manifest.lineage[-1].stage == "adapt" and fetched.has("model.onnx")
    app = root / "deployments" / "cam"
    assert os.readlink(app / "current") == f"versions/{report['deploy']['version']}"
    assert not any((app / "adapt" / "runs").iterdir())  # the run folder and its checkpoint are gone
    with parse_target("ssh://device", settings) as target:
        assert deployment_status(target, "cam")["current"] == report["deploy"]["version"]
    assert not (app / "adapt" / "inputs").exists()  # the uploaded float bundle is removed too
    again = _cli(["adapt", str(out), "--on", "ssh://device", "--data", str(device_images),
                  "--out", str(tmp_path / "again.edge"), "--trainable", "bn-stats", "--device", "cpu",
                  "--budget-mb", "500", "--json"])
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)  # the deployed adapted version has its weights: no upload
    assert second["trained_on"]["input"].endswith(f"/versions/{report['deploy']['version']}")
    assert second["deploy"]["previous"] == report["deploy"]["version"]
    back = _cli(["rollback", "cam", "--to", "ssh://device", "--json"])
    assert back.returncode == 0 and json.loads(back.stdout)[0]["result"]["current"] == report["deploy"]["version"]


def test_device_without_torch_says_what_to_install_and_switches_nothing(device, deployed, device_images,
                                                                        tmp_path, monkeypatch, capsys):
    from edge_ssl.cli import main

    bare = tmp_path / "bare-python"  # the device's system Python: no site-packages, so no torch
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    bare.chmod(0o755)
    root = tmp_path / "device-root"
    _env(monkeypatch, device, root, python=str(bare))
    with pytest.raises(SystemExit) as done:
        main(["adapt", str(deployed), "--on", "ssh://device", "--data", str(device_images),
              "--out", str(tmp_path / "a.edge"), "--steps", "2"])
    assert done.value.code == 1
    message = " ".join(capsys.readouterr().err.split())
    assert "cannot run adaptation on the device" in message and "--train-on host" in message
    assert "No module named" in message  # the device's own reason
    assert not (tmp_path / "a.edge").exists() and not (root / "deployments").exists()


def test_a_failed_device_run_reports_its_error_and_switches_nothing(device, deployed, tmp_path):
    root = tmp_path / "device-root"
    settings = SSHSettings(ssh_config=str(device.ssh_config), python=sys.executable, remote_root=str(root))
    job = DeviceAdaptJob(data=(str(tmp_path / "no-such-folder"),), cli_args=("--device", "cpu"))
    with parse_target("ssh://device", settings) as target:
        first = deploy(deployed, target, DeployOptions())
        with pytest.raises(DeviceAdaptError, match="adaptation on the device failed .*no-such-folder"):
            adapt_on_device(deployed, target, tmp_path / "a.edge", job)
        assert deployment_status(target, "cam")["current"] == first.version
    assert not (tmp_path / "a.edge").exists()


def test_a_run_past_its_time_limit_is_stopped_and_says_how_to_resume(deployed, device_images, tmp_path):
    settings = SSHSettings(python=sys.executable, remote_root=str(tmp_path / "device-root"))
    job = DeviceAdaptJob(data=(str(device_images),), cli_args=("--device", "cpu"), timeout_s=0.5)
    with parse_target("local", settings) as target, pytest.raises(DeviceAdaptError, match="--resume"):
        adapt_on_device(deployed, target, tmp_path / "a.edge", job)
    assert not (tmp_path / "a.edge").exists()


def test_existing_out_is_refused_before_anything_reaches_the_device(deployed, device_images, tmp_path):
    from edge_ssl.errors import BundleError

    (tmp_path / "a.edge").mkdir()
    settings = SSHSettings(python="/nonexistent/python", remote_root=str(tmp_path / "device-root"))
    with parse_target("local", settings) as target, pytest.raises(BundleError, match="already exists"):
        adapt_on_device(deployed, target, tmp_path / "a.edge", DeviceAdaptJob(data=(str(device_images),)))
    assert not (tmp_path / "device-root").exists()


def test_device_command_line_carries_profile_resume_and_options():
    job = DeviceAdaptJob(data=("/data/a", "/data/b"), cli_args=("--steps", "5"), resume=True)
    argv = adapt_argv("/opt/venv/bin/python", "/in", "/out.edge", job, "orin-nano-8gb")
    assert argv[:4] == ["/opt/venv/bin/python", "-m", "edge_ssl", "adapt"]
    assert argv.count("--data") == 2 and argv[-1] == "--resume"
    assert argv[argv.index("--profile") + 1] == "orin-nano-8gb"
    budgeted = DeviceAdaptJob(data=("/d",), cli_args=("--budget-mb", "300"))
    assert "--profile" not in adapt_argv("python3", "/in", "/o", budgeted, "orin-nano-8gb")


def test_a_killed_device_run_points_at_the_memory_budget():
    message = failure_message("orin", 137, "step 5/30\nKilled")
    assert "out-of-memory killer" in message and "--budget-mb" in message and "--resume" in message
    plain = failure_message("orin", 1, "loading\nerror: DataError: only 3 images")
    assert "error: DataError: only 3 images" in plain
