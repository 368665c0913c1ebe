"""Where commands run: this machine (`local`) or a device over the system OpenSSH client."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_ssl.config import check_flag, check_positive
from edge_ssl.errors import ConfigError, EdgeSSLError

AGENT_DIR = "agent"
DEFAULT_REMOTE_ROOT = ".edge-ssl"  # relative to the login user's home on the device
UPLOAD_CHUNK = 256 * 1024
#: Uploads fail if they go slower than this (bytes/s) beyond a fixed allowance.
MIN_UPLOAD_RATE = 256 * 1024


class TargetError(EdgeSSLError, RuntimeError):
    """A command on the target failed."""


class TargetConnectionError(TargetError):
    """The target cannot be reached, or the connection broke or timed out."""


class HostKeyError(TargetConnectionError):
    """The device's SSH host key is unknown or changed; nothing was sent."""


class DiskFullError(TargetError):
    """The device ran out of disk space while writing."""


@dataclass(frozen=True)
class SSHSettings:
    """How to reach devices; defaults honour ~/.ssh/config, ProxyJump and the agent."""

    ssh_config: str | None = None  # passed as `ssh -F`; None -> the user's ~/.ssh/config
    accept_new_host: bool = False  # StrictHostKeyChecking=accept-new instead of yes
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 120.0
    identity: str | None = None
    known_hosts: str | None = None
    python: str = "python3"  # the device's interpreter for the agent
    remote_root: str | None = None  # default: ~/.edge-ssl on the device

    def __post_init__(self) -> None:
        check_positive("SSHSettings", connect_timeout_s=self.connect_timeout_s,
                       command_timeout_s=self.command_timeout_s)
        check_flag("SSHSettings", "accept_new_host", self.accept_new_host)
        if self.ssh_config and not Path(self.ssh_config).is_file():
            raise ConfigError(f"--ssh-config {self.ssh_config!r} does not exist.")


def agent_kit() -> dict[str, Path]:
    """Files uploaded to the device to run the agent: agent.py and the runtime modules it shares."""
    here = Path(__file__).resolve().parent
    kit = {"agent.py": here / "agent.py"}
    for name in ("stats", "batch_sizes"):
        path = here.parent / "runtime" / f"{name}.py"
        if not path.is_file():  # an installed (non-editable) package
            import importlib

            path = Path(importlib.import_module(f"edge_ssl.runtime.{name}").__file__)
        kit[f"{name}.py"] = path
    return kit


def _kit_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, source in agent_kit().items():
            tar.add(source, arcname=name)
    return buffer.getvalue()


class Target:
    """Runs argv lists on a device; every call has a timeout."""

    label = "target"

    def __init__(self, settings: SSHSettings) -> None:
        self.settings = settings
        self._kit_installed = False

    # -- to implement
    def command(self, argv: Sequence[str]) -> list[str]:
        raise NotImplementedError

    @property
    def root(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared
    def _failure(self, argv: Sequence[str], code: int, stderr: str) -> TargetError:
        reason = stderr.strip()[-400:] or "(it printed no error message)"
        return TargetError(f"{self.label}: `{shlex.join(argv)[:160]}` exited {code}: {reason}")

    def run(self, argv: Sequence[str], *, timeout: float | None = None, stdin: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` on the target; TargetError on a non-zero exit when ``check``."""
        limit = timeout or self.settings.command_timeout_s
        try:
            done = subprocess.run(
                self.command(argv), input=stdin, capture_output=True, timeout=limit,
                stdin=None if stdin is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise TargetConnectionError(
                f"{self.label}: `{argv[0]}` did not finish within {limit:.0f} s; the device is slow "
                "or unreachable (raise the timeout or check the network)."
            ) from None
        self._raise_for_transport(done.returncode, done.stderr.decode("utf-8", "replace"))
        if check and done.returncode != 0:
            raise self._failure(argv, done.returncode, done.stderr.decode("utf-8", "replace"))
        return done

    def _raise_for_transport(self, code: int, stderr: str) -> None:
        """Transport errors (SSH exit 255) become TargetConnectionError/HostKeyError."""

    def run_streaming(self, argv: Sequence[str], *, timeout: float,
                      on_line: Callable[[str], None]) -> tuple[int, bytes, str]:
        """Run a long command, passing each stderr line to ``on_line`` as it arrives (stdout
        and stderr are read by one thread each, so neither pipe can fill and block it).

        Returns (exit code, stdout, the last 4,000 characters of stderr); a broken
        connection raises TargetConnectionError, the time limit passing kills the command.
        """
        import threading

        proc = subprocess.Popen(self.command(argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tail: list[str] = []

        def pump() -> None:
            assert proc.stderr is not None  # Popen(stderr=PIPE) always sets it
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                tail.append(line)
                del tail[:-60]
                on_line(line)

        chunks: list[bytes] = []
        readers = [threading.Thread(target=pump, daemon=True),
                   threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)]
        for reader in readers:
            reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TargetConnectionError(
                f"{self.label}: `{argv[0]}` did not finish within {timeout:.0f} s and was stopped."
            ) from None
        finally:
            for reader in readers:
                reader.join(timeout=5)
        stdout = b"".join(chunks)
        stderr = "\n".join(tail)[-4000:]
        self._raise_for_transport(proc.returncode, stderr)
        return proc.returncode, stdout, stderr

    def save_output(self, argv: Sequence[str], local: str | os.PathLike, *,
                    timeout: float | None = None) -> int:
        """Write what ``argv`` prints on the target into ``local`` (atomically); its size.

        Used to fetch files: ``["cat", path]``, or ``["tar", "-cf", "-", ...]`` for a folder.
        """
        local = Path(local)
        tmp = local.with_name(f".{local.name}.part-{os.getpid()}")
        limit = timeout or self.settings.command_timeout_s
        try:
            with open(tmp, "wb") as sink, tempfile.TemporaryFile() as err:
                try:
                    code = subprocess.run(self.command(argv), stdin=subprocess.DEVNULL,
                                          stdout=sink, stderr=err, timeout=limit).returncode
                except subprocess.TimeoutExpired:
                    raise TargetConnectionError(
                        f"{self.label}: `{argv[0]}` did not finish within {limit:.0f} s.") from None
                err.seek(0)
                stderr = err.read().decode("utf-8", "replace")
            self._raise_for_transport(code, stderr)
            if code != 0:
                raise self._failure(argv, code, stderr)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local.stat().st_size

    def ensure_agent(self) -> str:
        """Upload the agent kit (once per Target) and return the remote agent path."""
        kit_dir = f"{self.root}/{AGENT_DIR}"
        if not self._kit_installed:
            # One round trip: a tar stream unpacked into a fresh folder renamed over the old.
            script = ('mkdir -p "$1.new.$$" && tar -xf - -C "$1.new.$$" && rm -rf "$1" '
                      '&& mv "$1.new.$$" "$1"')
            done = self.run(["sh", "-c", script, "sh", kit_dir], stdin=_kit_tar(), check=False)
            if done.returncode != 0:
                raise _write_failure(self.label, kit_dir, done.stderr.decode("utf-8", "replace"))
            self._kit_installed = True
        return f"{kit_dir}/agent.py"

    def agent(self, command: str, *args: str, timeout: float | None = None,
              python: str | None = None) -> dict[str, Any]:
        """Run an agent command; its JSON answer, TargetError carrying the agent's message."""
        agent_path = self.ensure_agent()
        argv = [python or self.settings.python, agent_path, command, *args]
        done = self.run(argv, timeout=timeout, check=False)
        text = done.stdout.decode("utf-8", "replace").strip()
        try:
            answer = json.loads(text.splitlines()[-1]) if text else None
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            stderr = done.stderr.decode("utf-8", "replace").strip()
            raise TargetError(
                f"{self.label}: the agent ({argv[0]}) gave no JSON answer to {command!r} "
                f"(exit {done.returncode}): {(stderr or text)[-400:]}. Is {argv[0]!r} a Python "
                ">= 3.6 on the device? Choose another with --python."
            )
        if not answer.get("ok", False) and "error" in answer:
            raise TargetError(f"{self.label}: agent {command} failed: {answer['error']}")
        return answer

    def write_file(self, remote: str, data: bytes, timeout: float | None = None) -> None:
        """Write a small file atomically (temp name + mv), creating its folder."""
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"'
        done = self.run(["sh", "-c", script, "sh", remote], stdin=data, timeout=timeout, check=False)
        if done.returncode != 0:
            raise _write_failure(self.label, remote, done.stderr.decode("utf-8", "replace"))

    def upload(self, local: str | os.PathLike, remote: str, *, offset: int = 0,
               progress: Callable[[int], None] | None = None) -> int:
        """Stream ``local`` from byte ``offset`` into ``remote`` (appending when offset > 0).

        Returns the bytes sent. The connection breaking, the disk filling or the time
        limit passing raise; what arrived stays for a later resume.
        """
        size = os.path.getsize(local)
        script = ('mkdir -p "$(dirname "$1")" && cat >> "$1"' if offset
                  else 'mkdir -p "$(dirname "$1")" && cat > "$1"')
        deadline = time.monotonic() + self.settings.command_timeout_s + (size - offset) / MIN_UPLOAD_RATE
        with tempfile.TemporaryFile() as err, open(local, "rb") as source:
            source.seek(offset)
            proc = subprocess.Popen(self.command(["sh", "-c", script, "sh", remote]),
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            sent = self._pump(proc, source, deadline, progress)
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise TargetConnectionError(f"{self.label}: upload of {remote} timed out.") from None
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
        self._raise_for_transport(code, stderr)
        if code != 0 or sent != size - offset:
            raise _write_failure(self.label, remote, stderr or f"exit {code}, sent {sent} bytes")
        return sent

    def _pump(self, proc: subprocess.Popen, source: Any, deadline: float,
              progress: Callable[[int], None] | None) -> int:
        sent = 0
        assert proc.stdin is not None  # Popen(stdin=PIPE) always sets it
        try:
            while chunk := source.read(UPLOAD_CHUNK):
                if time.monotonic() > deadline:
                    proc.kill()
                    break
                proc.stdin.write(chunk)
                sent += len(chunk)
                if progress:
                    progress(sent)
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the exit code and stderr say why
        return sent


def _write_failure(label: str, remote: str, stderr: str) -> TargetError:
    if "No space left" in stderr or "Disk quota exceeded" in stderr or "File too large" in stderr:
        return DiskFullError(
            f"{label}: the device ran out of space writing {remote} ({stderr.strip()[-200:]}). "
            "Free space on the device (old deployments: `edge-ssl deploy --keep 1`) and run the "
            "same command again; it resumes."
        )
    return TargetError(f"{label}: writing {remote} failed: {stderr.strip()[-300:]}")


class LocalTarget(Target):
    """This machine; the same agent and file layout as a device (useful on the Jetson itself)."""

    label = "local"

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    @property
    def root(self) -> str:
        return self.settings.remote_root or str(Path.home() / DEFAULT_REMOTE_ROOT)


class SSHTarget(Target):
    """A device reached with the system `ssh` (config, ProxyJump, agent, known_hosts honoured)."""

    def __init__(self, user: str | None, host: str, port: int | None, settings: SSHSettings) -> None:
        super().__init__(settings)
        if not host or host.startswith("-") or any(c.isspace() for c in host):
            raise ConfigError(f"invalid SSH host {host!r}; use ssh://user@host[:port].")
        if user is not None and (not user or user.startswith("-")):
            raise ConfigError(f"invalid SSH user {user!r}; use ssh://user@host[:port].")
        if shutil.which("ssh") is None:
            raise ConfigError("the OpenSSH client `ssh` is not on PATH; install openssh-client.")
        self.user, self.host, self.port = user, host, port
        self.label = f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"
        self._control_dir: str | None = None
        self._master_started = False

    @property
    def root(self) -> str:
        return self.settings.remote_root or DEFAULT_REMOTE_ROOT

    def _options(self) -> list[str]:
        s = self.settings
        options = ["-o", "BatchMode=yes",
                   "-o", f"StrictHostKeyChecking={'accept-new' if s.accept_new_host else 'yes'}",
                   "-o", f"ConnectTimeout={max(1, int(s.connect_timeout_s))}",
                   "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if s.ssh_config:
            options[:0] = ["-F", s.ssh_config]
        if s.identity:
            options += ["-i", s.identity, "-o", "IdentitiesOnly=yes"]
        if s.known_hosts:
            options += ["-o", f"UserKnownHostsFile={s.known_hosts}"]
        if self.port:
            options += ["-p", str(self.port)]
        if self._control_dir:
            options += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self._control_dir}/%C"]
        return options

    def _destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def command(self, argv: Sequence[str]) -> list[str]:
        self._ensure_master()
        return ["ssh", *self._options(), "--", self._destination(), shlex.join(argv)]

    def _ensure_master(self) -> None:
        """One multiplexed connection (ControlMaster) shared by all later commands."""
        if self._master_started:
            return
        self._master_started = True
        self._control_dir = tempfile.mkdtemp(prefix="esl-", dir="/tmp")
        argv = ["ssh", *self._options(), "-o", "ControlMaster=yes", "-o", "ControlPersist=120",
                "-f", "-N", "--", self._destination()]
        with tempfile.TemporaryFile() as err:
            try:
                code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=err, timeout=self.settings.connect_timeout_s + 5).returncode
            except subprocess.TimeoutExpired:
                code = 255
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
        if code != 0:
            self._master_started = False
            self._drop_control_dir()
            self._raise_for_transport(255, stderr or "connection timed out")

    def _raise_for_transport(self, code: int, stderr: str) -> None:
        if code != 255:
            return
        if "IDENTIFICATION HAS CHANGED" in stderr or "Host key for" in stderr and "has changed" in stderr:
            raise HostKeyError(
                f"{self.label}: the device's SSH host key CHANGED since it was recorded in "
                "known_hosts; refusing to connect (this can be an attack). If the device was "
                f"re-flashed, remove the old key with `{self.forget_key_command(stderr)}` and "
                "connect again."
            )
        if "Host key verification failed" in stderr or "No ED25519 host key is known" in stderr \
                or "host key is known" in stderr:
            raise HostKeyError(
                f"{self.label}: the device's SSH host key is not in known_hosts; refusing to "
                "connect. Verify it (`ssh-keyscan` + compare the fingerprint on the device) or "
                "pass --accept-new-host (or set EDGE_SSL_ACCEPT_NEW_HOST=1) to record it on "
                "first use."
            )
        reason = stderr.strip()[-300:] or (
            "ssh exited 255 without a message: the connection was closed (the device "
            "rebooted, lost its network, or its sshd stopped).")
        raise TargetConnectionError(f"{self.label}: SSH connection failed: {reason}")

    def forget_key_command(self, stderr: str = "") -> str:
        """The `ssh-keygen -R` line that removes this device's recorded key.

        Taken from what ssh printed (the entry it checked, e.g. '[127.0.0.1]:2222' behind a
        ~/.ssh/config alias, and the known_hosts file); else built from host and port.
        """
        entry = re.search(r"Host key for (\S+) has changed", stderr)
        offending = re.search(r"Offending \S+ key in (.+):\d+\s*$", stderr, re.MULTILINE)
        name = entry.group(1) if entry else (
            f"[{self.host}]:{self.port}" if self.port and self.port != 22 else self.host)
        argv = ["ssh-keygen"]
        default = Path.home() / ".ssh" / "known_hosts"
        if offending and Path(offending.group(1)).expanduser() != default:
            argv += ["-f", offending.group(1)]
        return shlex.join(argv + ["-R", name])

    def close(self) -> None:
        if self._control_dir and self._master_started:
            argv = ["ssh", *self._options(), "-O", "exit", "--", self._destination()]
            try:
                subprocess.run(argv, capture_output=True, timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._master_started = False
        self._drop_control_dir()

    def _drop_control_dir(self) -> None:
        if self._control_dir:
            shutil.rmtree(self._control_dir, ignore_errors=True)
            self._control_dir = None


def parse_target(spec: str, settings: SSHSettings | None = None) -> Target:
    """'local' or 'ssh://user@host[:port]' -> a Target (ConfigError says the allowed forms)."""
    settings = settings or SSHSettings()
    if spec == "local":
        return LocalTarget(settings)
    parts = urlsplit(spec)
    if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/"):
        raise ConfigError(
            f"target {spec!r} is not understood; use 'local' or 'ssh://user@host[:port]' "
            "(hosts from ~/.ssh/config work too: ssh://myorin)."
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"target {spec!r} has an invalid port.") from None
    return SSHTarget(parts.username, parts.hostname, port, settings)
