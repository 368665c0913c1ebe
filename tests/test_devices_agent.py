"""The on-device agent: old-Python syntax, JSON answers, atomic switch and rollback (local target)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from edge_ssl.devices.deploy import DeployError, DeployOptions, deploy, rollback, verify_deployment
from edge_ssl.devices.target import SSHSettings, TargetError, agent_kit, parse_target

from edge_ssl.errors import ConfigError

AGENT = Path(__file__).resolve().parents[1] / "devices" / "agent.py"
OLD_PYTHONS = [Path(f"/root/.pyenv/versions/{v}/bin/python") for v in ("3.6.15", "3.8.18")]


@pytest.mark.parametrize("python", OLD_PYTHONS, ids=lambda p: p.parts[-3])
def test_agent_runs_on_old_jetpack_pythons(python, tmp_path):
    if not python.is_file():
        pytest.skip(f"{python} not installed (JetPack 4 ships 3.6, JetPack 5 ships 3.8)")
    subprocess.run([str(python), "-m", "py_compile", str(AGENT)], check=True)
    done = subprocess.run([str(python), str(AGENT), "info", "--root", str(tmp_path)], capture_output=True, text=True)
    info = json.loads(done.stdout)
    assert done.returncode == 0 and info["python"].startswith(python.parts[-3][:3])
    assert "version" in info["numpy"] or "missing" in info["numpy"]  # no numpy needed for info


@pytest.mark.parametrize("python", [Path(sys.executable), *OLD_PYTHONS], ids=lambda p: p.parts[-3])
def test_the_shipped_kit_names_a_bad_batch_list_in_its_json_answer(python, tmp_path):
    # Old pythons have no edge_ssl: the kit's own batch_sizes.py must answer there too.
    if not python.is_file():
        pytest.skip(f"{python} not installed (JetPack 4 ships 3.6, JetPack 5 ships 3.8)")
    kit = tmp_path / "kit"
    kit.mkdir()
    for name, source in agent_kit().items():
        shutil.copyfile(source, kit / name)
    folder = tmp_path / "version"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    done = subprocess.run([str(python), str(kit / "agent.py"), "bench", str(folder),
                           "--batch-sizes", "1,x"], capture_output=True, text=True)
    error = json.loads(done.stdout)["error"]
    assert done.returncode == 1 and "--batch-sizes must be comma-separated integers" in error
    assert "'x' is not an integer" in error


def test_agent_failure_is_json_with_exit_1(tmp_path):
    done = subprocess.run([sys.executable, str(AGENT), "verify", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "no manifest.json" in json.loads(done.stdout)["error"]


def _tiny_bundle(path: Path, tag: int) -> Path:
    from edge_ssl.bundle import BundleWriter
    from edge_ssl.spec import EncoderSpec, InputSpec

    spec = EncoderSpec(arch="tiny", kwargs={"tag": tag}, input=InputSpec(shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3),
                       embed_dim=4)
    with BundleWriter(path) as writer:
        writer.write_bytes("model.onnx", b"not really onnx %d" % tag)
        writer.commit(name="tiny", encoder=spec, lineage=())
    return path


def test_local_deploy_keeps_n_versions_and_rolls_back(tmp_path):
    settings = SSHSettings(python=sys.executable, remote_root=str(tmp_path / "root"))
    bundles = [_tiny_bundle(tmp_path / f"b{i}.edge", i) for i in range(3)]
    with parse_target("local", settings) as target:
        results = [deploy(b, target, DeployOptions(keep=2)) for b in bundles]
        app = tmp_path / "root" / "deployments" / "tiny"
        assert sorted(os.listdir(app / "versions")) == sorted(r.version for r in results[1:])
        assert rollback(target, "tiny")["current"] == results[1].version
        assert verify_deployment(target, "tiny")["ok"]
        with pytest.raises(TargetError, match="no previous version"):
            rollback(target, "tiny")  # the version before that was pruned (keep=2)


def test_rollback_errors_name_what_is_really_on_the_device(tmp_path):
    settings = SSHSettings(python=sys.executable, remote_root=str(tmp_path / "root"))
    bundles = [_tiny_bundle(tmp_path / f"b{i}.edge", i) for i in range(2)]
    with parse_target("local", settings) as target:
        first, second = (deploy(b, target, DeployOptions()) for b in bundles)
        assert rollback(target, "tiny")["current"] == first.version  # `second` leaves the history
        with pytest.raises(TargetError, match="not on the device") as unknown:
            rollback(target, "tiny", "deadbeef")
        assert f"{first.version} (current)" in str(unknown.value) and second.version in str(unknown.value)
        with pytest.raises(TargetError, match="no previous version") as nothing_before:
            rollback(target, "tiny")
        assert f"--version ({second.version})" in str(nothing_before.value)  # still there: say how
        assert "pruned" not in str(nothing_before.value)
        with pytest.raises(TargetError, match="nothing named 'tiny2' was ever deployed") as never:
            rollback(target, "tiny2")
        assert "deployed names: tiny" in str(never.value)
        assert rollback(target, "tiny", second.version)["current"] == second.version


def test_changed_key_hint_names_the_known_hosts_entry():
    from edge_ssl.devices.target import SSHTarget

    with_port = SSHTarget("nvidia", "127.0.0.1", 2222, SSHSettings())
    assert with_port.forget_key_command() == "ssh-keygen -R '[127.0.0.1]:2222'"
    assert SSHTarget(None, "orin.local", None, SSHSettings()).forget_key_command() == "ssh-keygen -R orin.local"
    said = ('Offending ED25519 key in /tmp/kh file:3\n  remove with:\n'
            'Host key for [10.0.0.7]:2200 has changed and you have requested strict checking.\n')
    assert with_port.forget_key_command(said) == "ssh-keygen -f '/tmp/kh file' -R '[10.0.0.7]:2200'"


@pytest.mark.parametrize("command", ["deploy", "rollback", "bench", "device-bench", "doctor",
                                     "device-doctor", "adapt"])
def test_every_command_that_connects_accepts_accept_new_host(command):
    from typer.testing import CliRunner

    from edge_ssl.cli import app

    done = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert done.exit_code == 0 and "--accept-new-host" in done.stdout


def test_deploy_refuses_a_precision_the_board_lacks(tmp_path):
    from edge_ssl.bundle import BundleWriter
    from edge_ssl.spec import EncoderSpec, InputSpec

    spec = EncoderSpec(arch="tiny", kwargs={}, input=InputSpec(shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3), embed_dim=4)
    with BundleWriter(tmp_path / "q.edge") as writer:
        writer.write_bytes("model.onnx", b"int8 graph")
        writer.commit(name="q", encoder=spec, lineage=(), precision="int8")
    settings = SSHSettings(python=sys.executable, remote_root=str(tmp_path / "root"))
    with parse_target("local", settings) as target, pytest.raises(DeployError, match="supports fp32, fp16"):
        deploy(tmp_path / "q.edge", target, DeployOptions(profile="nano-4gb"))
    assert not (tmp_path / "root" / "deployments").exists()


@pytest.mark.parametrize("spec", ["http://x", "ssh://", "ssh://-oProxyCommand=x", "ssh://h:99999", "ssh://h/path"])
def test_bad_targets_are_rejected_before_any_connection(spec):
    with pytest.raises(ConfigError):
        parse_target(spec)


# Real trtexec summaries: TensorRT 8.6+/10 (github.com/hmorimitsu/ptlflow/issues/65) and an
# older one without percentile(90%) (github.com/beyondli/Yolo_on_Jetson/issues/4).
TRTEXEC_NEW = ("[05/27/2024-16:38:42] [I] GPU Compute Time: min = 29.8193 ms, max = 30.4572 ms, "
               "mean = 30.3322 ms, median = 30.333 ms, percentile(90%) = 30.4037 ms, percentile(95%) = "
               "30.4156 ms, percentile(99%) = 30.4204 ms\n")
TRTEXEC_OLD = ("GPU Compute Time: min = 3.17834 ms, max = 3.88306 ms, mean = 3.63242 ms, median = 3.71753 ms, "
               "percentile(99%) 3.87793 ms \n")


def test_trtexec_gpu_compute_summaries_parse():
    from edge_ssl.devices.agent import parse_trtexec_gpu_time

    new = parse_trtexec_gpu_time("Latency: min = 1 ms\n" + TRTEXEC_NEW)
    assert new["mean"] == 30.3322 and new["p50"] == 30.333 and new["p90"] == 30.4037
    old = parse_trtexec_gpu_time(TRTEXEC_OLD)
    assert old["p99"] == 3.87793 and "p90" not in old
    assert parse_trtexec_gpu_time("&&&& FAILED TensorRT.trtexec") is None


def test_a_bundle_without_onnx_is_sent_back_to_export(tmp_path):
    from edge_ssl.bundle import BundleWriter
    from edge_ssl.spec import EncoderSpec, InputSpec

    spec = EncoderSpec(arch="tiny", kwargs={}, input=InputSpec(shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3), embed_dim=4)
    with BundleWriter(tmp_path / "float.edge") as writer:
        writer.write_bytes("weights.bin", b"float weights only")
        writer.commit(name="float", encoder=spec, lineage=())
    settings = SSHSettings(python=sys.executable, remote_root=str(tmp_path / "root"))
    with parse_target("local", settings) as target, pytest.raises(DeployError, match="edge-ssl export"):
        deploy(tmp_path / "float.edge", target)
