"""Deploy a bundle to a target: check, upload with resume, verify, build, switch atomically."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.devices.detect import jetpack_for_l4t, parse_nvpmodel_query, parse_tegra_release
from edge_ssl.devices.profiles import DeviceProfile, get_profile, match_profile
from edge_ssl.devices.target import DiskFullError, Target, TargetConnectionError

from edge_ssl.bundle import MANIFEST_NAME, WEIGHTS_NAME, Bundle, sha256_file
from edge_ssl.config import check_choice, check_flag, check_int, check_positive
from edge_ssl.errors import ConfigError, EdgeSSLError

#: engines/<device>_sm<cc>_trt<version>_<precision>.plan (the bundle convention).
_ENGINE_NAME = re.compile(r"^engines/(?P<device>[^/]+)_sm(?P<sm>\d+)_trt(?P<trt>[\d.]+)_(?P<precision>\w+)\.plan$")
#: Beside the staged manifest: which manifest files were deliberately not shipped.
DEPLOY_NOTE = "deploy.json"
#: Working memory a runtime needs beyond the model file: a rough floor, not a promise.
RUNTIME_OVERHEAD_BYTES = 300 * 2**20
#: Precisions a bundle may carry and what the device must support to run them.
_NEEDS = {"fp32": set(), "bf16": {"fp16"}, "fp16": {"fp16"}, "int8": {"int8"}, "mixed": {"fp16"}}


class DeployError(EdgeSSLError, RuntimeError):
    """The bundle cannot be deployed to this device (nothing on the device was changed)."""


@dataclass(frozen=True)
class DeployOptions:
    """What `edge-ssl deploy` may do beyond uploading and switching."""

    name: str | None = None  # deployment name on the device (default: the bundle's name)
    profile: str | None = None  # device profile; default: detected from the device
    build_engine: bool = False  # build a TensorRT plan on the device with trtexec
    engine_precision: str | None = None  # default: the bundle's precision (fp32 -> fp16)
    keep: int = 3  # versions kept on the device for rollback
    build_timeout_s: float = 1800.0
    ship_weights: bool = False  # also send model.pt (only useful to adapt on the device)

    def __post_init__(self) -> None:
        check_int("DeployOptions", "keep", self.keep, minimum=2)  # a rollback target exists
        check_flag("DeployOptions", "build_engine", self.build_engine)
        check_flag("DeployOptions", "ship_weights", self.ship_weights)
        check_positive("DeployOptions", build_timeout_s=self.build_timeout_s)
        if self.name is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.name):
            raise ConfigError(f"deployment name {self.name!r} must be letters, digits, '.', '_' or '-'.")
        if self.engine_precision is not None:
            check_choice("DeployOptions", "engine_precision", self.engine_precision, ("fp32", "fp16", "int8"))


@dataclass
class DeployResult:
    """What a deploy did on one target."""

    target: str
    name: str
    version: str
    previous: str | None
    uploaded_bytes: int = 0
    resumed_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    engine: str | None = None
    omitted_files: list[str] = field(default_factory=list)
    repaired_files: list[str] = field(default_factory=list)  # damaged on the device, re-sent
    profile: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def version_id(bundle: Bundle) -> str:
    """The on-device version name: the bundle's manifest sha256 prefix."""
    return bundle.manifest_sha256[:16]


def app_dir(target: Target, name: str) -> str:
    return f"{target.root}/deployments/{name}"


def device_facts(info: dict[str, Any]) -> dict[str, Any]:
    """JetPack, L4T, TensorRT version and memory from the agent's `info` answer."""
    l4t = parse_tegra_release(info.get("nv_tegra_release") or "")
    trt = (info.get("tensorrt") or {}).get("version")
    return {
        "model": info.get("device_tree_model"),
        "l4t": l4t,
        "jetpack": jetpack_for_l4t(l4t),
        "tensorrt": trt,
        "memory_gb": (info.get("memory") or {}).get("MemTotal", 0) / 2**30 or None,
        "has_onnxruntime": "version" in (info.get("onnxruntime") or {}),
        "has_tensorrt": trt is not None or bool(info.get("trtexec")),
        "nvpmodel": parse_nvpmodel_query((info.get("nvpmodel") or {}).get("raw", "")),
    }


def resolve_profile(requested: str | None, info: dict[str, Any]) -> tuple[DeviceProfile | None, list[str]]:
    """The profile to check against: the one asked for, else the one the device matches."""
    facts = device_facts(info)
    detected = match_profile(facts["model"], facts["memory_gb"]) if facts["model"] else None
    if requested is None:
        return detected, []
    profile = get_profile(requested)
    warnings = []
    if detected is not None and detected.key != profile.key:
        warnings.append(f"--profile {profile.key} but the device looks like {detected.key} ({facts['model']}).")
    return profile, warnings


def check_compatibility(bundle: Bundle, info: dict[str, Any], profile: DeviceProfile | None,
                        options: DeployOptions) -> list[str]:
    """Raise DeployError when the bundle cannot run there; return warnings otherwise."""
    facts = device_facts(info)
    warnings: list[str] = []
    if not bundle.has("model.onnx") and not any(_ENGINE_NAME.match(n) for n in bundle.manifest.files):
        raise DeployError(
            f"{bundle.path.name} has no model.onnx or TensorRT engine, nothing a device can run "
            f"(files: {', '.join(sorted(bundle.manifest.files))}). Export it first: "
            f"edge-ssl export {bundle.path} --out {bundle.path.stem}-onnx.edge"
        )
    precision = bundle.manifest.precision
    if profile is not None and not _NEEDS.get(precision, set()) <= set(profile.precisions):
        raise DeployError(
            f"{bundle.path.name} is a {precision} bundle but {profile.name} supports "
            f"{', '.join(profile.precisions)}. Deploy a float (fp32/fp16) bundle instead."
        )
    engine_precision = options.engine_precision or {"fp32": "fp16"}.get(precision, precision)
    if options.build_engine and profile is not None and engine_precision not in profile.precisions:
        raise DeployError(f"{profile.name} cannot build {engine_precision} engines (supports {', '.join(profile.precisions)}).")
    for name in bundle.manifest.files:
        match = _ENGINE_NAME.match(name)
        if match and not options.build_engine and facts["tensorrt"] and not facts["tensorrt"].startswith(match["trt"]):
            raise DeployError(
                f"{name} was built with TensorRT {match['trt']} but the device has TensorRT "
                f"{facts['tensorrt']}; plans are not portable. Pass --build-engine to build one there."
            )
    model_bytes = max((r.bytes for n, r in bundle.manifest.files.items() if n.endswith(".onnx")), default=0)
    available = (info.get("memory") or {}).get("MemAvailable")
    if available and model_bytes + RUNTIME_OVERHEAD_BYTES > available:
        raise DeployError(
            f"the device has {available / 2**20:.0f} MiB of memory available; the model needs "
            f"about {(model_bytes + RUNTIME_OVERHEAD_BYTES) / 2**20:.0f} MiB to run. Use a smaller "
            "(pruned / int8) bundle or stop other processes on the device."
        )
    if not (facts["has_onnxruntime"] or facts["has_tensorrt"]):
        warnings.append(
            f"the device's {info.get('python_executable')} has neither onnxruntime nor TensorRT; "
            "the bundle is deployed but cannot be benchmarked until one is installed."
        )
    if options.build_engine and not info.get("trtexec"):
        raise DeployError("--build-engine needs trtexec on the device (JetPack's TensorRT: /usr/src/tensorrt/bin/trtexec).")
    return warnings


def omitted_files(bundle: Bundle, options: DeployOptions) -> list[str]:
    """Manifest files not shipped: float weights, which the device runtimes cannot load."""
    if options.ship_weights or not bundle.has("model.onnx"):
        return []
    return [name for name in bundle.manifest.files if name == WEIGHTS_NAME]


def _bundle_files(bundle: Bundle, omitted: list[str], only: set[str] | None = None) -> dict[str, Path]:
    files = {name: bundle.path / name for name in sorted(bundle.manifest.files) if name not in omitted}
    files[MANIFEST_NAME] = bundle.path / MANIFEST_NAME  # last: a staged manifest means all sent
    return {name: path for name, path in files.items() if only is None or name in only}


def check_space(bundle: Bundle, info: dict[str, Any], remote: dict[str, Any], omitted: list[str]) -> None:
    """DiskFullError before uploading when the device lacks room for what is missing."""
    missing = sum(
        path.stat().st_size - (remote.get(name) or {}).get("bytes", 0)
        for name, path in _bundle_files(bundle, omitted).items()
    )
    free = (info.get("disk") or {}).get("free")
    if free is not None and missing > free:
        raise DiskFullError(
            f"the device has {free / 2**20:.1f} MiB free under {info['disk']['path']}; the upload "
            f"needs {missing / 2**20:.1f} MiB. Free space on the device and run deploy again."
        )


def upload_bundle(bundle: Bundle, target: Target, staging: str, remote: dict[str, Any],
                  result: DeployResult, omitted: list[str],
                  progress: Callable[[str, int, int], None] | None = None,
                  only: set[str] | None = None) -> None:
    """Send every file (of ``only``) not already staged intact; resume partial ones.

    ``remote`` is the agent's `stat` of the staging folder: {name: {bytes, sha256}}.
    """
    note = json.dumps({"omitted": omitted, "manifest_sha256": bundle.manifest_sha256}).encode()
    target.write_file(f"{staging}/{DEPLOY_NOTE}", note)
    for name, path in _bundle_files(bundle, omitted, only).items():
        size = path.stat().st_size
        have = remote.get(name)
        offset = 0
        if have and have["bytes"] <= size and have["sha256"] == sha256_file_prefix(path, have["bytes"]):
            if have["bytes"] == size:
                result.skipped_files.append(name)
                continue
            offset = have["bytes"]
            if offset:
                result.resumed_files.append(name)
        report = (lambda sent, n=name, s=size, o=offset: progress(n, o + sent, s)) if progress else None
        try:
            result.uploaded_bytes += target.upload(path, f"{staging}/{name}", offset=offset, progress=report)
        except TargetConnectionError as exc:
            raise type(exc)(
                f"{exc} The upload of {name} stopped; what arrived is kept on the device and the "
                "deployed version keeps serving. Run the same deploy again: it resumes the upload."
            ) from exc


def sha256_file_prefix(path: Path, length: int) -> str:
    """sha256 of the first ``length`` bytes of ``path`` (the whole file when it is that long)."""
    if length == path.stat().st_size:
        return sha256_file(path)
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining > 0 and (chunk := f.read(min(1 << 20, remaining))):
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def engine_file_name(profile: DeviceProfile | None, tensorrt: str | None, precision: str) -> str:
    device = profile.key if profile else "device"
    sm = profile.compute_capability.replace(".", "") if profile else "unknown"
    return f"{device}_sm{sm}_trt{tensorrt or 'unknown'}_{precision}.plan"


def deploy(bundle_path: str | os.PathLike, target: Target, options: DeployOptions | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> DeployResult:
    """Deploy a bundle; the previous deployment keeps serving until the final atomic switch."""
    options = options or DeployOptions()
    started = time.monotonic()
    bundle = Bundle.open(bundle_path, verify=True)
    name = options.name or bundle.manifest.name
    info = target.agent("info", "--root", target.root, "--name", name, "--light")
    profile, warnings = resolve_profile(options.profile, info)
    warnings += check_compatibility(bundle, info, profile, options)
    version = version_id(bundle)
    state = info["deployment"]
    result = DeployResult(target=target.label, name=name, version=version, previous=state["current"],
                          profile=profile.key if profile else None, warnings=warnings)
    if version in state["versions"]:
        result.repaired_files = _stage_repair(bundle, target, name, version, options, result, progress)
    else:
        staging = f"{app_dir(target, name)}/staging/{version}"
        staged = target.agent("stat", staging)["files"]
        omitted = omitted_files(bundle, options)
        check_space(bundle, info, staged, omitted)
        upload_bundle(bundle, target, staging, staged, result, omitted, progress)
        result.omitted_files = omitted
        if options.build_engine:
            _verify_staged(target, staging, bundle)
            result.engine = _build_engine(target, staging, bundle, profile, info, options)
    # activate re-verifies every staged file and the manifest before the atomic switch (and
    # repairs a damaged deployed version from the files staged for it)
    switched = target.agent("activate", "--root", target.root, "--name", name, "--version", version,
                            "--keep", str(options.keep), "--expect-manifest", bundle.manifest_sha256)
    result.previous = switched["previous"]
    result.seconds = time.monotonic() - started
    return result


def _stage_repair(bundle: Bundle, target: Target, name: str, version: str, options: DeployOptions,
                  result: DeployResult, progress: Callable[[str, int, int], None] | None) -> list[str]:
    """Stage fresh copies of what is damaged in the deployed ``version``; the damaged names.

    A damaged or foreign manifest means nothing in the folder can be trusted: all is re-sent.
    """
    health = target.agent("check", "--root", target.root, "--name", name, "--version", version)
    health = health["deployments"][name]
    if health["ok"] and health["manifest_sha256"] == bundle.manifest_sha256:
        return []
    damaged = sorted(b["file"] for b in health["bad"]) or [MANIFEST_NAME]
    omitted = omitted_files(bundle, options)
    resend = set(damaged) if health["manifest_sha256"] == bundle.manifest_sha256 else None
    staging = f"{app_dir(target, name)}/staging/{version}"
    staged = target.agent("stat", staging)["files"]
    upload_bundle(bundle, target, staging, staged, result, omitted, progress, only=resend)
    result.omitted_files = omitted
    return damaged


def _verify_staged(target: Target, staging: str, bundle: Bundle) -> None:
    report = target.agent("verify", staging)
    if report["manifest_sha256"] != bundle.manifest_sha256:
        raise DeployError(f"{target.label}: the staged manifest differs from {bundle.path}; run deploy again.")
    if not report["ok"]:
        raise DeployError(f"{target.label}: staged files failed sha256 verification: {report['bad']}; run deploy again.")


def _build_engine(target: Target, staging: str, bundle: Bundle, profile: DeviceProfile | None,
                  info: dict[str, Any], options: DeployOptions) -> str:
    precision = options.engine_precision or {"fp32": "fp16"}.get(bundle.manifest.precision, bundle.manifest.precision)
    out = engine_file_name(profile, device_facts(info)["tensorrt"], precision)
    built = target.agent("build-engine", staging, "--precision", precision, "--out", out,
                         "--timeout", str(options.build_timeout_s), timeout=options.build_timeout_s + 60)
    return built["engine"]


def _describe_bad(bad: list[dict[str, str]]) -> str:
    return ", ".join(f"{b['file']} ({b['problem']})" for b in bad)


def rollback(target: Target, name: str, to_version: str | None = None) -> dict[str, Any]:
    """Point `current` back at the previous kept version (or ``to_version``) once the agent
    has verified that version's files; a damaged version is refused (TargetError)."""
    args = ["--root", target.root, "--name", name] + (["--to", to_version] if to_version else [])
    return target.agent("rollback", *args)


def deployment_status(target: Target, name: str) -> dict[str, Any]:
    return target.agent("status", "--root", target.root, "--name", name)


def verify_deployment(target: Target, name: str, version: str | None = None) -> dict[str, Any]:
    """Re-hash the deployed files on the device; raises DeployError naming tampered files."""
    version = version or deployment_status(target, name)["current"]
    if version is None:
        raise DeployError(f"{target.label}: nothing is deployed under the name {name!r}.")
    report = target.agent("verify", f"{app_dir(target, name)}/versions/{version}")
    if not report["ok"]:
        raise DeployError(
            f"{target.label}: deployed version {version} of {name} was modified on the device: "
            f"{_describe_bad(report['bad'])}. Deploy the same bundle again to repair it "
            "(`edge-ssl deploy BUNDLE --to TARGET`), or roll back (`edge-ssl rollback`)."
        )
    return report
