"""Deploy, verify, switch, rollback and remote bench against a real OpenSSH server on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from edge_ssl.devices.deploy import (
    DeployError,
    DeployOptions,
    deploy,
    deployment_status,
    rollback,
    verify_deployment,
)
from edge_ssl.devices.remote import remote_bench, remote_doctor
from edge_ssl.devices.target import (
    DiskFullError,
    HostKeyError,
    SSHSettings,
    TargetConnectionError,
    TargetError,
    parse_target,
)

from edge_ssl.bundle import Bundle, lineage_entry, read_results, write_encoder_bundle

SSHD = Path("/usr/sbin/sshd")
pytestmark = pytest.mark.skipif(
    not SSHD.is_file() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
    reason="OpenSSH server/client not installed (/usr/sbin/sshd, ssh, ssh-keygen); .ci/run installs openssh-server",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class LoopbackDevice:
    """An sshd on 127.0.0.1 with its own host and user keys: the stand-in for a Jetson."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        for name in ("host_key", "user_key", "other_host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / name)], check=True)
        (home / "authorized_keys").write_text((home / "user_key.pub").read_text())
        (home / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {home / 'host_key'}\n"
            f"PidFile {home / 'sshd.pid'}\nAuthorizedKeysFile {home / 'authorized_keys'}\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nLogLevel ERROR\n"
        )
        self.known_hosts = home / "known_hosts"
        self.trust(home / "host_key.pub")
        self.ssh_config = home / "ssh_config"
        self.ssh_config.write_text(
            f"Host device\n  HostName 127.0.0.1\n  Port {self.port}\n  User root\n"
            f"  IdentityFile {home / 'user_key'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
        )
        self.proc: subprocess.Popen | None = None

    def trust(self, public_key: Path) -> None:
        key = " ".join(public_key.read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {key}\n")

    def start(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.home / "sshd_config")],
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("sshd did not start")

    def kill(self) -> None:
        """Cut every connection at once, like a device losing power or network."""
        if self.proc is None:
            return
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None


def loopback_device(home: Path):
    """A started LoopbackDevice (a generator for module-scoped fixtures); skips when sshd cannot run."""
    if not SSHD.is_file():
        pytest.skip("OpenSSH server not installed (/usr/sbin/sshd); .ci/run installs openssh-server")
    dev = LoopbackDevice(home)
    try:
        dev.start()
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"could not start a loopback sshd: {exc}")
    yield dev
    dev.kill()


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    yield from loopback_device(tmp_path_factory.mktemp("sshd"))


@pytest.fixture
def settings(device, tmp_path) -> SSHSettings:
    return SSHSettings(ssh_config=str(device.ssh_config), python=sys.executable,
                       remote_root=str(tmp_path / "device-root"), command_timeout_s=60)


def _bundle(out: Path, encoder, onnx_path: Path, version: int, blob_bytes: int = 0) -> Path:
    """A tiny encoder bundle with model.onnx; ``blob_bytes`` adds a large file for slow uploads."""
    extra = {"model.onnx": onnx_path}
    if blob_bytes:
        blob = out.parent / f"{out.name}.blob"
        blob.write_bytes(np.random.default_rng(version).bytes(blob_bytes))
        extra["blob.bin"] = blob
    write_encoder_bundle(out, encoder, lineage=(lineage_entry("test", {"v": version}),),
                         metrics={"version": version}, extra_files=extra)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from edge_ssl.runtime.export import export_encoder_onnx

    from edge_ssl.models import create_encoder

    root = tmp_path_factory.mktemp("bundles")
    encoder = create_encoder("resnet18_cifar", width=0.125)
    onnx_path = export_encoder_onnx(encoder, root / "tiny.onnx")
    return {
        "v1": _bundle(root / "enc-v1.edge", encoder, onnx_path, 1),
        "v2": _bundle(root / "enc-v2.edge", encoder, onnx_path, 2, blob_bytes=3 * 2**20),
    }


def _when_partly_arrived(staged_file, action):
    """A progress hook that runs ``action`` once the device holds part of the big file."""
    state = {"done": False}

    def hook(name: str, sent: int, total: int) -> None:
        if state["done"] or name != "blob.bin" or sent < 2**20:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            p.stat().st_size > 0 for p in staged_file().glob("*/blob.bin")
        ):
            time.sleep(0.02)
        state["done"] = True
        action()

    return hook


def _name(bundle: Path) -> str:
    return Bundle.open(bundle, verify=False).manifest.name


def test_deploy_switch_rollback_and_bench(device, settings, bundles):
    with parse_target("ssh://device", settings) as target:
        first = deploy(bundles["v1"], target, DeployOptions(name="enc"))
        assert first.previous is None and "model.onnx" not in first.skipped_files
        assert first.omitted_files == ["model.pt"]  # float weights stay home
        second = deploy(bundles["v2"], target, DeployOptions(name="enc"))
        assert second.previous == first.version
        app = Path(settings.remote_root) / "deployments" / "enc"
        assert os.readlink(app / "current") == f"versions/{second.version}"
        assert verify_deployment(target, "enc")["ok"]
        back = rollback(target, "enc")
        assert back["current"] == first.version
        assert os.readlink(app / "current") == f"versions/{first.version}"
        again = deploy(bundles["v1"], target, DeployOptions(name="enc"))  # already there: no upload
        assert again.uploaded_bytes == 0
        report = remote_bench(bundles["v1"], target, name="enc", batch_sizes=(1, 2), duration_s=0.2,
                              warmup_s=0.05, threads=1)
    assert report["kind"] == "measured" and report["backend"] == "onnxruntime"
    assert set(report["batches"]) == {"1", "2"} and report["batches"]["1"]["p50"] > 0
    assert report["environment"]["python"] and any("not a Jetson" in w for w in report["warnings"])
    recorded = read_results(Bundle.open(bundles["v1"]))["device_bench"]
    assert recorded["device"]["batches"]["2"]["count"] >= 1


def test_cut_connection_mid_upload_keeps_previous_and_resumes(device, settings, bundles):
    with parse_target("ssh://device", settings) as target:
        first = deploy(bundles["v1"], target, DeployOptions(name="enc"))
    app = Path(settings.remote_root) / "deployments" / "enc"
    pull_the_plug = _when_partly_arrived(lambda: app / "staging", device.kill)
    try:
        with parse_target("ssh://device", settings) as target, pytest.raises(TargetError) as cut:
            deploy(bundles["v2"], target, DeployOptions(name="enc"), progress=pull_the_plug)
    finally:
        device.start()
    assert "run the same deploy again: it resumes" in str(cut.value).lower()
    assert not re.search(r"failed: *(The upload|$)", str(cut.value))  # a reason, never empty
    assert os.readlink(app / "current") == f"versions/{first.version}"
    with parse_target("ssh://device", settings) as target:
        assert verify_deployment(target, "enc")["ok"]
        resumed = deploy(bundles["v2"], target, DeployOptions(name="enc"))
    assert "blob.bin" in resumed.resumed_files
    total = sum(p.stat().st_size for p in bundles["v2"].iterdir() if p.name != "model.pt")
    assert resumed.uploaded_bytes < total  # the part that arrived before the cut was kept
    assert os.readlink(app / "current") == f"versions/{resumed.version}"


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs for the full-disk test: {done.stderr.strip()}")


def test_full_remote_disk_keeps_previous_and_resumes(device, settings, bundles, tmp_path):
    small = tmp_path / "small-disk"
    _mount_tmpfs(small, "12m")
    try:
        full = SSHSettings(**{**settings.__dict__, "remote_root": str(small)})
        with parse_target("ssh://device", full) as target:
            first = deploy(bundles["v1"], target, DeployOptions(name="enc"))
            filler = small / "filler"

            def eat_free_space() -> None:  # another process fills the disk mid-upload
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 2**16)
                            f.flush()
                    except OSError:
                        pass

            app = small / "deployments" / "enc"
            fill_the_disk = _when_partly_arrived(lambda: app / "staging", eat_free_space)
            with pytest.raises(DiskFullError, match="ran out of space"):
                deploy(bundles["v2"], target, DeployOptions(name="enc"), progress=fill_the_disk)
            assert os.readlink(app / "current") == f"versions/{first.version}"
            assert deployment_status(target, "enc")["versions"] == [first.version]
            assert verify_deployment(target, "enc")["ok"]
            filler.unlink()
            second = deploy(bundles["v2"], target, DeployOptions(name="enc"))
        assert "blob.bin" in second.resumed_files
        assert os.readlink(app / "current") == f"versions/{second.version}"
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def test_changed_host_key_is_refused(device, settings):
    device.trust(device.home / "other_host_key.pub")
    try:
        with parse_target("ssh://device", settings) as target, pytest.raises(HostKeyError, match="CHANGED") as refused:
            target.agent("info", "--root", target.root)
        # the entry ssh checked behind the ~/.ssh/config alias, quoted for the shell
        assert f"-R '[127.0.0.1]:{device.port}'" in str(refused.value)
    finally:
        device.trust(device.home / "host_key.pub")


def test_unknown_host_needs_the_explicit_flag(device, settings):
    device.known_hosts.write_text("")
    try:
        with parse_target("ssh://device", settings) as target, pytest.raises(HostKeyError, match="accept-new-host"):
            target.agent("info", "--root", target.root)
        accepting = SSHSettings(**{**settings.__dict__, "accept_new_host": True})
        with parse_target("ssh://device", accepting) as target:
            assert remote_doctor(target)["agent"]["ok"]
        assert "ssh-ed25519" in device.known_hosts.read_text()
    finally:
        device.trust(device.home / "host_key.pub")


def test_tampered_file_on_the_device_is_detected(device, settings, bundles):
    with parse_target("ssh://device", settings) as target:
        result = deploy(bundles["v1"], target, DeployOptions(name="enc"))
        deployed = Path(settings.remote_root) / "deployments" / "enc" / "versions" / result.version
        model = deployed / "model.onnx"
        model.write_bytes(model.read_bytes()[:-1] + b"\x00")
        with pytest.raises(DeployError, match="model.onnx"):
            verify_deployment(target, "enc")
        with pytest.raises(DeployError, match="modified on the device"):
            remote_bench(bundles["v1"], target, name="enc", duration_s=0.1, warmup_s=0)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_rollback_to_a_tampered_version_is_refused(device, settings, bundles):
    with parse_target("ssh://device", settings) as target:
        first = deploy(bundles["v1"], target, DeployOptions(name="enc"))
        second = deploy(bundles["v2"], target, DeployOptions(name="enc"))
        app = Path(settings.remote_root) / "deployments" / "enc"
        _flip_a_byte(app / "versions" / first.version / "model.onnx")
        for version in (first.version, None):  # named, and the default previous version
            with pytest.raises(TargetError, match="damaged") as refused:
                rollback(target, "enc", version)
            assert "model.onnx (sha256 mismatch)" in str(refused.value)
            assert "edge-ssl deploy" in str(refused.value)
            assert os.readlink(app / "current") == f"versions/{second.version}"
        with pytest.raises(TargetError, match="not on the device") as unknown:
            rollback(target, "enc", "deadbeef")
        assert f"{second.version} (current), {first.version}" in str(unknown.value) or \
            f"{first.version}, {second.version} (current)" in str(unknown.value)
        with pytest.raises(TargetError, match="nothing named 'encoder' was ever deployed"):
            rollback(target, "encoder")


def test_redeploying_a_damaged_version_repairs_it(device, settings, bundles, monkeypatch):
    _device_env(monkeypatch, device, settings)
    name = ["--to", "ssh://device", "--name", "cli"]
    assert _cli(["deploy", str(bundles["v2"]), *name]).returncode == 0
    app = Path(settings.remote_root) / "deployments" / "cli"
    deployed = app / os.readlink(app / "current")
    _flip_a_byte(deployed / "model.onnx")
    doctor = _cli(["doctor", "--on", "ssh://device"])
    assert doctor.returncode == 1  # a damaged `current` is a finding, named with its file
    assert "DAMAGED: model.onnx (sha256 mismatch)" in doctor.stdout
    assert "clocks pinned: unknown (" in doctor.stdout
    repaired = _cli(["deploy", str(bundles["v2"]), *name, "--json"])
    assert repaired.returncode == 0, repaired.stderr
    result = json.loads(repaired.stdout)[0]["result"]
    assert result["repaired_files"] == ["model.onnx"]
    assert result["uploaded_bytes"] == (bundles["v2"] / "model.onnx").stat().st_size  # only that file
    assert app / os.readlink(app / "current") == deployed and not (app / "staging" / deployed.name).exists()
    (deployed / "blob.bin").write_bytes(b"")  # a file emptied on the device
    told = _cli(["deploy", str(bundles["v2"]), *name])
    assert told.returncode == 0 and "repaired version" in told.stdout and "blob.bin" in told.stdout
    healthy = _cli(["doctor", "--on", "ssh://device", "--json"])
    assert healthy.returncode == 0, healthy.stderr
    assert json.loads(healthy.stdout)["deployments"]["cli"]["ok"]


def test_device_without_onnxruntime_says_what_to_install(device, settings, bundles, tmp_path):
    python = tmp_path / "python-without-onnxruntime"
    python.write_text(
        "#!/bin/sh\n"
        f"exec {sys.executable} -c \"import sys, runpy; sys.modules['onnxruntime'] = None; "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\" \"$@\"\n"
    )
    python.chmod(0o755)
    bare = SSHSettings(**{**settings.__dict__, "python": str(python)})
    with parse_target("ssh://device", bare) as target:
        result = deploy(bundles["v1"], target, DeployOptions(name="enc"))
        assert any("neither onnxruntime nor TensorRT" in w for w in result.warnings)
        with pytest.raises(TargetError, match="onnxruntime is not importable"):
            remote_bench(bundles["v1"], target, name="enc", duration_s=0.1, warmup_s=0)


def test_unreachable_device_fails_fast(settings, tmp_path):
    config = tmp_path / "config"
    config.write_text(f"Host nowhere\n  HostName 127.0.0.1\n  Port {_free_port()}\n")
    quick = SSHSettings(ssh_config=str(config), connect_timeout_s=3, python=sys.executable,
                        remote_root=settings.remote_root)
    started = time.monotonic()
    with parse_target("ssh://nowhere", quick) as target, pytest.raises(TargetConnectionError):
        target.agent("info")
    assert time.monotonic() - started < 15


def test_agent_answers_are_json(settings, bundles):
    with parse_target("local", settings) as target:
        info = target.agent("info", "--root", target.root)
    assert json.loads(json.dumps(info))["python"]


# ---------------------------------------------------------------- the command line
def _cli(args: list[str]) -> subprocess.CompletedProcess:
    """Run `edge-ssl ARGS` in-process (a subprocess per call costs seconds of imports)."""
    from typer.testing import CliRunner

    from edge_ssl.cli import app

    result = CliRunner().invoke(app, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def _device_env(monkeypatch, device, settings) -> None:
    monkeypatch.setenv("EDGE_SSL_SSH_CONFIG", str(device.ssh_config))
    monkeypatch.setenv("EDGE_SSL_DEVICE_PYTHON", sys.executable)
    monkeypatch.setenv("EDGE_SSL_REMOTE_ROOT", settings.remote_root)


def _deploy_bench_rollback(bundle: Path, previous: Path) -> dict:
    name = ["--name", "cli"]
    assert _cli(["deploy", str(previous), "--to", "ssh://device", *name]).returncode == 0
    deployed = _cli(["deploy", str(bundle), "--to", "ssh://device", *name, "--json"])
    assert deployed.returncode == 0, deployed.stderr
    version = json.loads(deployed.stdout)[0]["result"]["version"]
    bench = _cli(["bench", str(bundle), "--on", "ssh://device", "--duration", "0.3", "--warmup", "0.1",
                  "--batch", "1", "--json"])
    assert bench.returncode == 0, bench.stderr
    back = _cli(["rollback", "cli", "--to", "ssh://device", "--json"])
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)[0]["result"]["previous"] == version
    return json.loads(bench.stdout)[0]["result"]


def test_cli_deploy_bench_rollback_doctor(device, settings, bundles, monkeypatch):
    _device_env(monkeypatch, device, settings)
    report = _deploy_bench_rollback(bundles["v1"], bundles["v2"])
    assert report["kind"] == "measured" and report["batches"]["1"]["p90"] > 0
    doctor = _cli(["doctor", "--on", "ssh://device", "--json"])
    assert doctor.returncode == 0, doctor.stderr
    assert json.loads(doctor.stdout)["agent"]["onnxruntime"]["version"]


def test_cli_fleet_one_host_down_does_not_stop_the_others(device, settings, bundles, monkeypatch):
    _device_env(monkeypatch, device, settings)
    down = f"ssh://root@127.0.0.1:{_free_port()}"
    done = _cli(["deploy", str(bundles["v1"]), "--to", "ssh://device", "--to", down, "--json"])
    assert done.returncode == 1  # one failure is reported in the exit status...
    rows = {row["target"]: row for row in json.loads(done.stdout)}
    assert rows["device"]["ok"] and not rows[down]["ok"]  # ...without stopping the healthy host
    assert "connection" in rows[down]["error"].lower()


@pytest.fixture
def teacher_bundle() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared" / "teachers" / "simclr_resnet18_cifar.edge"
    if not (path / "manifest.json").is_file():
        pytest.skip(f"teacher bundle not found at {path} (see ../shared/teachers/README.md)")
    return path


@pytest.mark.slow
def test_teacher_export_deploy_bench_rollback_from_the_cli(device, settings, bundles, teacher_bundle,
                                                           tmp_path, monkeypatch):
    exported = tmp_path / "teacher-onnx.edge"
    done = _cli(["export", str(teacher_bundle), "--out", str(exported)])
    if done.returncode != 0:
        pytest.skip(f"`edge-ssl export` is not usable here yet: {done.stderr.strip()[-200:]}")
    _device_env(monkeypatch, device, settings)
    report = _deploy_bench_rollback(exported, bundles["v1"])
    assert report["batches"]["1"]["p50"] > 0


def test_remote_bench_turns_tegrastats_samples_into_energy(device, settings, bundles, tmp_path):
    """A replayed recorded Orin Nano tegrastats stream stands in for the device's INA3221 rails."""
    recorded = json.loads((Path(__file__).parent / "fixtures/devices/tegrastats.json").read_text())["lines"]
    line = next(r["line"] for r in recorded if r["id"] == "orin-nano-jp6")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "tegrastats"
    fake.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.05; done\n")
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nPATH="{bin_dir}:$PATH" exec {sys.executable} "$@"\n')
    for script in (fake, python):
        script.chmod(0o755)
    with parse_target("ssh://device", SSHSettings(**{**settings.__dict__, "python": str(python)})) as target:
        report = remote_bench(bundles["v1"], target, name="enc", duration_s=0.3, warmup_s=0.05,
                              tegrastats_ms=50, record=False)
    power = report["power"]
    assert power["samples"] >= 1 and power["avg_power_w"] == pytest.approx(5.704)
    mean_ms = report["batches"]["1"]["mean"]
    assert power["energy_per_inference_mj"]["1"] == pytest.approx(5.704 * mean_ms)
