"""Measure on the device through the agent: remote bench (with power) and remote doctor."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from edge_ssl.devices.deploy import (
    DeployError,
    DeployOptions,
    app_dir,
    deploy,
    device_facts,
    resolve_profile,
    verify_deployment,
    version_id,
)
from edge_ssl.devices.power import PowerError, summarize_power
from edge_ssl.devices.target import Target
from edge_ssl.runtime.bench import check_bench_settings

from edge_ssl.bundle import Bundle, read_results, record_results, utc_now
from edge_ssl.errors import ConfigError

RESULTS_KEY = "device_bench"
#: Fleet benches run in threads; the results file is read-modified-written under this lock.
_RESULTS_LOCK = threading.Lock()
BACKENDS = ("onnxruntime", "trtexec")


def remote_doctor(target: Target, name: str | None = None) -> dict[str, Any]:
    """What the device offers edge-ssl (python, numpy, runtimes, JetPack, clocks, space) and
    whether each deployment's `current` (or ``name``'s) still matches its manifest sha256s."""
    info = target.agent("info", "--root", target.root)
    facts = device_facts(info)
    profile, _ = resolve_profile(None, info)
    args = ["--root", target.root] + (["--name", name] if name else [])
    deployments = target.agent("check", *args)["deployments"]
    warnings = environment_warnings(info) + integrity_warnings(deployments)
    return {"target": target.label, "profile": profile.key if profile else None,
            "warnings": warnings, "deployments": deployments, **facts, "agent": info}


def integrity_warnings(deployments: dict[str, Any]) -> list[str]:
    """One line per deployment whose `current` failed verification: the files, the fix."""
    return [
        f"deployment {name}: current version {entry['version']} is DAMAGED ("
        + ", ".join(f"{b['file']}: {b['problem']}" for b in entry["bad"])
        + f"); deploy the same bundle again to repair it (`edge-ssl deploy BUNDLE --to TARGET"
        f" --name {name}`) or roll back"
        for name, entry in sorted(deployments.items())
        if entry["version"] is not None and not entry["ok"]
    ]


def environment_warnings(info: dict[str, Any]) -> list[str]:
    """Conditions that make latency numbers unrepresentative or benchmarks impossible."""
    warnings = []
    if not info.get("nv_tegra_release"):
        warnings.append(f"{info.get('hostname')} is not a Jetson: numbers describe this machine only.")
    elif info.get("clocks_pinned") is not True:
        state = "not pinned" if info.get("clocks_pinned") is False else "in an unknown state"
        warnings.append(
            f"GPU clocks are {state}: latency will vary with DVFS. Run `sudo jetson_clocks` "
            "on the device (and keep the nvpmodel mode fixed) before benchmarking."
        )
    if "version" not in (info.get("numpy") or {}):
        warnings.append(f"numpy is missing for {info.get('python_executable')}: install python3-numpy.")
    if "version" not in (info.get("onnxruntime") or {}) and not info.get("trtexec"):
        warnings.append("neither onnxruntime nor trtexec is available on the device: nothing can run a model.")
    return warnings


def _ensure_deployed(bundle: Bundle, target: Target, name: str, state: dict[str, Any],
                     deploy_if_needed: bool) -> str:
    version = version_id(bundle)
    if version not in state["versions"]:
        if not deploy_if_needed:
            raise DeployError(f"{bundle.path.name} is not deployed on {target.label}; run `edge-ssl deploy` first.")
        deploy(bundle.path, target, DeployOptions(name=name))
    verify_deployment(target, name, version)
    return version


def _engine_for(target: Target, folder: str) -> str:
    engines = sorted(n for n in target.agent("stat", folder)["files"] if n.startswith("engines/") and n.endswith(".plan"))
    if not engines:
        raise DeployError(f"{target.label}: no TensorRT engine in {folder}; deploy with --build-engine first.")
    return engines[-1]


def remote_bench(
    bundle_path: str | os.PathLike,
    target: Target,
    *,
    name: str | None = None,
    backend: str = "onnxruntime",
    batch_sizes: Sequence[int] = (1,),
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    iterations: int | None = None,
    threads: int | None = None,
    tegrastats_ms: int | None = None,
    deploy_if_needed: bool = True,
    record: bool = True,
) -> dict[str, Any]:
    """Benchmark the deployed bundle on the device and record it beside the local bundle."""
    if backend not in BACKENDS:
        raise ConfigError(f"remote backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    batch_sizes = check_bench_settings(batch_sizes, duration_s, warmup_s, iterations)
    if backend == "trtexec" and tuple(batch_sizes) != (1,):
        raise ConfigError("the trtexec backend measures batch 1 (engines are built for batch 1 by "
                          "`deploy --build-engine`); use --backend onnxruntime for other batch sizes.")
    bundle = Bundle.open(bundle_path, verify=True)
    name = name or bundle.manifest.name
    info = target.agent("info", "--root", target.root, "--name", name, "--light")
    version = _ensure_deployed(bundle, target, name, info["deployment"], deploy_if_needed)
    folder = f"{app_dir(target, name)}/versions/{version}"
    interval = tegrastats_ms if tegrastats_ms is not None else (100 if info.get("nv_tegra_release") else 0)
    args = [folder, "--backend", backend, "--batch-sizes", ",".join(str(b) for b in batch_sizes),
            "--warmup", str(warmup_s), "--duration", str(duration_s),
            "--iterations", str(iterations or 0), "--threads", str(threads or 0),
            "--tegrastats-ms", str(interval)]
    if backend == "trtexec":
        args += ["--engine", _engine_for(target, folder)]
    budget = len(batch_sizes) * (warmup_s + duration_s + 60) + 120
    started = time.monotonic()
    measured = target.agent("bench", *args, timeout=budget)
    report = _report(target, name, version, info, measured, time.monotonic() - started)
    if record:
        with _RESULTS_LOCK:
            previous = dict(read_results(bundle).get(RESULTS_KEY, {}))
            previous[target.label] = report
            report["results_file"] = str(record_results(bundle, RESULTS_KEY, previous))
    return report


def _report(target: Target, name: str, version: str, info: dict[str, Any],
            measured: dict[str, Any], seconds: float) -> dict[str, Any]:
    facts = device_facts(info)
    profile, _ = resolve_profile(None, info)
    warnings = environment_warnings(info)
    power = None
    if measured.get("tegrastats"):
        latency = {b: r["mean"] for b, r in measured["batches"].items()}
        try:
            power = summarize_power(measured["tegrastats"], latency).to_dict()
        except PowerError as exc:
            warnings.append(str(exc))
    return {
        "kind": "measured",
        "target": target.label,
        "deployment": name,
        "version": version,
        "backend": measured["backend"],
        "providers": measured.get("providers"),
        "batches": measured["batches"],
        "power": power,
        "environment": {
            **facts,
            "profile": profile.key if profile else None,
            "python": info.get("python"),
            "hostname": info.get("hostname"),
            "machine": info.get("machine"),
            "onnxruntime": (info.get("onnxruntime") or {}).get("version"),
            "clocks_pinned": info.get("clocks_pinned"),
            "temperatures_c": info.get("temperatures_c"),
        },
        "warnings": warnings,
        "measured_at": utc_now(),
        "seconds": seconds,
    }
