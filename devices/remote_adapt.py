"""Adapt on the device itself: its own images and PyTorch; the result staged, verified, switched.

`edge-ssl adapt B.edge --on ssh://orin --data /data/cam0 --out A.edge` (``--train-on device``):

1. find the bundle with float weights on the device (an earlier adaptation's result is
   deployed with its weights), else upload it to ``deployments/<name>/adapt/inputs/<version>``
   (a partial upload resumes; removed after success);
2. run ``python -m edge_ssl adapt`` there on the device's own images, streaming its progress.
   Its checkpoint stays on the device: after a cut connection or a power loss the same
   command with ``--resume`` continues;
3. verify the result on the device, move it to ``staging/<version>``, fetch a verified copy
   to ``--out``, then switch ``current`` to it (the previous version stays for rollback).

Nothing is switched unless every step succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_ssl.devices.deploy import (
    DeployResult,
    app_dir,
    check_space,
    resolve_profile,
    upload_bundle,
    version_id,
)
from edge_ssl.devices.target import Target, TargetConnectionError, TargetError

from edge_ssl.adapt.inputs import deployment_name
from edge_ssl.bundle import (
    WEIGHTS_NAME,
    Bundle,
    unpack_bundle,
)
from edge_ssl.lineage import require_float_weights
from edge_ssl.outputs import check_bundle_out, move_into_place

#: Printed by the device's Python: proves it can run adaptation and says with what.
PROBE = ("import json, sys, torch, edge_ssl; print(json.dumps({'python': sys.version.split()[0], "
         "'torch': torch.__version__, 'cuda': torch.cuda.is_available(), "
         "'edge_ssl': edge_ssl.__version__}))")
#: Exit codes of a process the kernel killed (SIGKILL: usually the OOM killer on a Jetson).
_KILLED = (137, -9)
#: tegrastats period while the adaptation steps run (a step takes tenths of a second on a board).
STEP_POWER_INTERVAL_MS = 100


class DeviceAdaptError(TargetError):
    """Adaptation on the device failed; the deployed version was not changed."""


@dataclass(frozen=True)
class DeviceAdaptJob:
    """What to run on the device: where its images are and the `adapt` options to pass on."""

    data: tuple[str, ...]  # image paths on the device
    cli_args: tuple[str, ...] = ()  # adapt options passed through (--steps, --trainable, ...)
    name: str | None = None  # deployment name (default: edge_ssl.adapt.inputs.deployment_name)
    python: str | None = None  # the device's Python with torch + edge-ssl (default: the agent's)
    profile: str | None = None  # device profile for the default budget (default: detected)
    resume: bool = False
    timeout_s: float = 6 * 3600.0
    keep: int = 3


class StepPowerMeter:
    """Energy per adaptation step where tegrastats exists (a Jetson): module power sampled
    while the step loop runs (``edge_ssl.adapt.run`` wraps it in :meth:`sampling`), times the
    measured seconds per step. Labelled measured; None with the reason where it cannot be."""

    def __init__(self, interval_ms: int = STEP_POWER_INTERVAL_MS) -> None:
        self.interval_ms = interval_ms
        self.lines: list[str] = []
        self.seconds = 0.0

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """tegrastats runs in the background for the duration (nothing runs without it)."""
        from edge_ssl.devices.agent import Tegrastats

        sampler = Tegrastats(self.interval_ms)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.lines += sampler.stop()
            self.seconds += time.perf_counter() - started

    def measured(self, seconds_per_step: float | None) -> dict[str, Any]:
        """{energy_per_step_j, avg_power_w, rail, ...}; the figures None with a reason when
        there is no tegrastats, no timed step, or no line with power rails."""
        from edge_ssl.devices.power import PowerError, summarize_power

        record: dict[str, Any] = {"kind": "measured on this device (tegrastats)",
                                  "energy_per_step_j": None, "avg_power_w": None}
        if shutil.which("tegrastats") is None:
            return {**record, "reason": "tegrastats is not on this machine's PATH (JetPack ships "
                                        "it on Jetson boards); no power to measure."}
        if not seconds_per_step:
            return {**record, "reason": "no gradient step was timed."}
        if not self.lines:
            return {**record, "reason": f"tegrastats gave no line in the {self.seconds:.2f} s of "
                                        f"steps (one every {self.interval_ms} ms); run more --steps."}
        try:
            power = summarize_power(self.lines, {"1": seconds_per_step * 1000.0})
        except PowerError as exc:
            return {**record, "reason": str(exc)}
        return {**record, "energy_per_step_j": round(power.energy_per_inference_mj["1"] / 1000.0, 5),
                "avg_power_w": round(power.avg_power_w, 3), "max_power_w": round(power.max_power_w, 3),
                "rail": power.total_rail, "samples": power.samples, "interval_ms": self.interval_ms,
                "sec_per_step": seconds_per_step,
                "method": "average module power over the step loop (guard checks included) x the "
                          "mean measured seconds per step"}


def probe_device_python(target: Target, python: str) -> dict[str, Any]:
    """Versions of Python, torch and edge-ssl on the device; DeviceAdaptError when one is missing."""
    done = target.run([python, "-c", PROBE], check=False)
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    reason = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1]
    raise DeviceAdaptError(
        f"{target.label}: {python} cannot run adaptation on the device ({reason}). Install "
        "edge-ssl there with the PyTorch wheel of its JetPack (docs/adapt.md, 'On the device'), "
        "point --device-python at that interpreter, or pass --train-on host to adapt here "
        "on local images and deploy the result."
    )


def adapt_on_device(
    bundle_path: str | os.PathLike, target: Target, out: str | os.PathLike, job: DeviceAdaptJob, *,
    overwrite: bool = False, progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Adapt on ``target`` and deploy the result there; returns the device run's report.

    The report is what ``edge-ssl adapt --json`` printed on the device, with ``bundle``
    (the fetched copy at ``out``), ``trained_on`` (the device's versions) and ``deploy``.
    """
    out = Path(out)
    deployed = Bundle.open(bundle_path, verify=True)
    weights = require_float_weights(deployed, "adaptation")
    check_bundle_out(out, overwrite=overwrite)
    name = job.name or deployment_name(deployed)
    python = job.python or target.settings.python
    versions = probe_device_python(target, python)
    info = target.agent("info", "--root", target.root, "--name", name, "--light")
    profile, _ = resolve_profile(job.profile, info)
    app = app_dir(target, name)
    source = _input_on_device(weights, target, app, info)
    run_dir = f"{app}/adapt/runs/{version_id(weights)}-{_data_key(job.data)}"
    remote_out = f"{run_dir}/{out.name}"  # the bundle's name, as a local run would give it
    argv = adapt_argv(python, source, remote_out, job, profile.key if profile else None)
    try:
        code, stdout, stderr = target.run_streaming(argv, timeout=job.timeout_s, on_line=progress)
    except TargetConnectionError as exc:
        raise DeviceAdaptError(f"{exc} The device keeps its checkpoint: run the same command "
                               "with --resume to continue; nothing was switched.") from None
    if code != 0:
        raise DeviceAdaptError(failure_message(target.label, code, stderr))
    report = _parse_report(target.label, stdout)
    version, digest = _stage(target, remote_out, app)
    fetched = fetch_bundle(target, f"{app}/staging/{version}", out, overwrite=overwrite)
    if fetched.manifest_sha256 != digest:
        raise DeviceAdaptError(f"{target.label}: the fetched copy differs from the staged bundle; "
                               "run the command again (nothing was switched).")
    switched = target.agent("activate", "--root", target.root, "--name", name, "--version", version,
                            "--keep", str(job.keep), "--expect-manifest", digest)
    target.run(["rm", "-rf", run_dir, f"{app}/adapt/inputs"], check=False)
    report.update(bundle=str(out), trained_on={"target": target.label, "input": source, **versions},
                  deploy={"target": target.label, "name": name, "version": version,
                          "previous": switched["previous"], "profile": profile.key if profile else None})
    return report


def adapt_argv(python: str, source: str, remote_out: str, job: DeviceAdaptJob,
               profile: str | None) -> list[str]:
    """The `edge-ssl adapt` command line run on the device."""
    argv = [python, "-m", "edge_ssl", "adapt", source, "--out", remote_out, "--json",
            "--overwrite", "--export", "always"]
    for path in job.data:
        argv += ["--data", path]
    argv += list(job.cli_args)
    if profile and "--profile" not in job.cli_args and "--budget-mb" not in job.cli_args:
        argv += ["--profile", profile]
    if job.resume:
        argv.append("--resume")
    return argv


def failure_message(label: str, code: int, stderr: str) -> str:
    """Why the device's adaptation run failed, and what to do next."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    detail = errors[-1] if errors else stderr.strip()[-400:]
    if code in _KILLED:
        return (f"{label}: the adaptation process was killed (exit {code}), most likely by the "
                "device's out-of-memory killer. Lower --budget-mb (or use --trainable bn-stats) "
                "and run again with --resume; nothing was switched.")
    return f"{label}: adaptation on the device failed (exit {code}): {detail} Nothing was switched."


def fetch_bundle(target: Target, remote_dir: str, out: Path, *, overwrite: bool) -> Bundle:
    """Copy a bundle folder from the device to ``out`` (verified, moved into place atomically)."""
    parent, base = remote_dir.rsplit("/", 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.fetch-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        tar = work / "bundle.tar"
        target.save_output(["tar", "-cf", "-", "-C", parent, base], tar, timeout=3600)
        fetched = unpack_bundle(tar, work / "unpacked")
        check_bundle_out(out, overwrite=overwrite)
        move_into_place({fetched.path: out})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Bundle.open(out, verify=True)


def _data_key(data: tuple[str, ...]) -> str:
    """A short, stable name for the device's image paths (one run folder, and checkpoint, per set)."""
    return hashlib.sha256("\0".join(data).encode()).hexdigest()[:12]


def _input_on_device(bundle: Bundle, target: Target, app: str, info: dict[str, Any]) -> str:
    """Where the float bundle is on the device: a deployed version that has its weights
    (an earlier adaptation's result), else an upload to adapt/inputs/ (removed after success)."""
    version = version_id(bundle)
    deployed = f"{app}/versions/{version}"
    if version in ((info.get("deployment") or {}).get("versions") or []):
        files = target.agent("stat", deployed)["files"]
        if WEIGHTS_NAME in files and target.agent("verify", deployed)["ok"]:
            return deployed
    folder = f"{app}/adapt/inputs/{version}"
    _upload_input(bundle, target, folder, info)
    return folder


def _upload_input(bundle: Bundle, target: Target, folder: str, info: dict[str, Any]) -> None:
    """The float bundle on the device, weights included (resumes a partial upload)."""
    staged = target.agent("stat", folder)["files"]
    check_space(bundle, info, staged, [])
    upload_bundle(bundle, target, folder, staged, DeployResult(target.label, "", "", None), [])
    report = target.agent("verify", folder)
    if not report["ok"] or report["manifest_sha256"] != bundle.manifest_sha256:
        raise DeviceAdaptError(f"{target.label}: the uploaded bundle failed verification "
                               f"({report.get('bad')}); run the command again, it resumes.")


def _parse_report(label: str, stdout: bytes) -> dict[str, Any]:
    text = stdout.decode("utf-8", "replace").strip()
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict):
        raise DeviceAdaptError(f"{label}: the device's adapt run printed no JSON report: {text[-300:]!r}")
    return report


def _stage(target: Target, remote_out: str, app: str) -> tuple[str, str]:
    """Verify the device's result and move it to staging/<version>; (version, manifest sha256)."""
    checked = target.agent("verify", remote_out)
    if not checked["ok"]:
        raise DeviceAdaptError(f"{target.label}: the adapted bundle failed verification on the "
                               f"device: {checked['bad']}; run the command again.")
    digest = checked["manifest_sha256"]
    version = digest[:16]
    staging = f"{app}/staging/{version}"
    script = 'mkdir -p "$(dirname "$2")" && rm -rf "$2" && mv "$1" "$2"'
    target.run(["sh", "-c", script, "sh", remote_out, staging])
    return version, digest
