"""Build an engine with NVIDIA's trtexec (argv list, no shell) where Python bindings are missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from edge_ssl.runtime.cuda_buffers import GpuIdentity, gpu_identity
from edge_ssl.runtime.errors import EngineError
from edge_ssl.runtime.tensorrt import BuildSettings, EngineBuild, engine_file_name

#: Where JetPack puts trtexec (not on PATH by default).
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
_VERSION = re.compile(r"TensorRT[ .]v?(\d{5,6})\b|TensorRT version:?\s*(\d+\.\d+\.\d+)")


def find_trtexec(explicit: str | os.PathLike | None = None) -> Path:
    """The trtexec executable: ``explicit``, PATH, or JetPack's location."""
    candidates = [str(explicit)] if explicit else ["trtexec", JETPACK_TRTEXEC]
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return Path(found)
    raise EngineError(
        f"trtexec not found (looked for {', '.join(candidates)}). On Jetson it is at "
        f"{JETPACK_TRTEXEC} (JetPack's tensorrt package); on x86 it ships in TensorRT's bin/."
    )


def trtexec_argv(trtexec: Path, onnx_path: Path, plan: Path, settings: BuildSettings,
                 input_name: str, input_shape: tuple[int, ...], major: int,
                 timing_cache: Path | None = None) -> list[str]:
    """The argv (never a shell string) for a trtexec build matching ``settings``."""
    argv = [str(trtexec), f"--onnx={onnx_path}", f"--saveEngine={plan}", "--skipInference"]
    if major >= 11 or settings.graph_precision == "fp16":
        argv.append("--stronglyTyped")
    else:
        argv += {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--fp16"],
                 "best": ["--fp16", "--int8"]}[settings.precision]
    dims = "x".join(str(d) for d in input_shape)
    low, opt, high = settings.batch
    argv += [f"--minShapes={input_name}:{low}x{dims}", f"--optShapes={input_name}:{opt}x{dims}",
             f"--maxShapes={input_name}:{high}x{dims}"]
    if settings.workspace_mb:
        argv.append(f"--memPoolSize=workspace:{settings.workspace_mb}M")
    if settings.dla_core is not None:
        argv.append(f"--useDLACore={settings.dla_core}")
        if settings.gpu_fallback:
            argv.append("--allowGPUFallback")
    if settings.refit:
        argv.append("--refit")
    argv.append(f"--builderOptimizationLevel={settings.optimization_level}")
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={timing_cache}")
    return argv


def parse_trtexec_version(output: str) -> str | None:
    """'[TensorRT v100300]' -> '10.3.0'; 'TensorRT version: 10.3.0' -> '10.3.0'."""
    match = _VERSION.search(output)
    if match is None:
        return None
    if match.group(2):
        return match.group(2)
    number = int(match.group(1))
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def trtexec_version(trtexec: Path) -> str:
    """Ask trtexec for its TensorRT version (its banner) without building anything."""
    try:
        done = subprocess.run([str(trtexec), "--help"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineError(f"cannot run {trtexec}: {exc}") from exc
    version = parse_trtexec_version(done.stdout + done.stderr)
    if version is None:
        raise EngineError(f"{trtexec} did not report a TensorRT version (banner '[TensorRT vNNNNNN]').")
    return version


def build_engine_trtexec(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: BuildSettings,
    *,
    input_name: str,
    input_shape: tuple[int, ...],
    trtexec: str | os.PathLike | None = None,
    gpu: GpuIdentity | None = None,
    timing_cache: str | os.PathLike | None = None,
    timeout_s: float = 3600.0,
) -> EngineBuild:
    """Same build as :func:`build_engine` through trtexec; the plan gets the same file name."""
    exe = find_trtexec(trtexec)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EngineError(f"ONNX file {onnx_path} does not exist.")
    gpu = gpu or gpu_identity()
    version = trtexec_version(exe)
    major = int(version.split(".")[0])
    if major >= 11 and settings.precision in ("fp16", "int8") and settings.graph_precision != settings.precision:
        raise EngineError(
            f"TensorRT {version} builds strongly typed networks: the graph is {settings.graph_precision}, "
            f"--precision {settings.precision} cannot change that. Export with --fp16 or quantize first."
        )
    target = Path(out_dir) / engine_file_name(gpu.device, gpu.sm, version, settings.precision, settings.dla_core)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    argv = trtexec_argv(exe, onnx_path, partial, settings, input_name, input_shape, major,
                        Path(timing_cache) if timing_cache else None)
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        partial.unlink(missing_ok=True)
        raise EngineError(f"trtexec did not finish within {timeout_s:.0f} s: {' '.join(argv)}") from exc
    if done.returncode != 0 or not partial.is_file() or partial.stat().st_size == 0:
        partial.unlink(missing_ok=True)
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise EngineError(f"trtexec failed (exit {done.returncode}): {' '.join(argv)}\n{tail}")
    os.replace(partial, target)
    return EngineBuild(
        path=target, trt_version=version, gpu=asdict(gpu), settings=asdict(settings),
        strongly_typed="--stronglyTyped" in argv, flags=[a for a in argv[4:] if not a.startswith("--m")],
        seconds=time.perf_counter() - start, tool="trtexec",
    )
