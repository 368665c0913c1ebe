"""One latency harness for every backend: warm-up, timed loop, percentiles, environment."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from edge_ssl.runtime.batch_sizes import parse_batch_sizes
from edge_ssl.runtime.stats import latency_summary, throughput_per_s

from edge_ssl.errors import ConfigError

#: Called as progress(batch_size, seconds_done, seconds_total) at most every PROGRESS_EVERY_S.
Progress = Callable[[int, float, float], None]
PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class BatchResult:
    """Latency (ms) of one batch size; ``compute_ms`` when the backend reports it."""

    batch_size: int
    latency_ms: dict[str, float]
    throughput_per_s: float
    compute_ms: dict[str, float] | None
    iterations: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size, "latency_ms": self.latency_ms,
            "throughput_per_s": self.throughput_per_s, "compute_ms": self.compute_ms,
            "iterations": self.iterations, "seconds": self.seconds,
        }


@dataclass(frozen=True)
class BenchReport:
    """A benchmark of one runner: per batch size results, peak memory and the environment."""

    runner: dict[str, Any]
    batches: tuple[BatchResult, ...]
    settings: dict[str, Any]
    peak_rss_mb: float
    environment: dict[str, Any] = field(default_factory=dict)
    peak_device_memory_mb: float | None = None

    @property
    def single_stream_p90_ms(self) -> float | None:
        """MLPerf single-stream headline: p90 latency at batch 1 (None if not measured)."""
        for result in self.batches:
            if result.batch_size == 1:
                return result.latency_ms["p90"]
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner, "settings": self.settings,
            "single_stream_p90_ms": self.single_stream_p90_ms,
            "batches": {str(r.batch_size): r.to_dict() for r in self.batches},
            "peak_rss_mb": self.peak_rss_mb, "peak_device_memory_mb": self.peak_device_memory_mb,
            "environment": self.environment,
        }


def check_bench_settings(batch_sizes: Sequence[int] | str, duration_s: float, warmup_s: float,
                         iterations: int | None) -> tuple[int, ...]:
    """Validate harness settings before any model is loaded."""
    sizes = parse_batch_sizes(batch_sizes)
    if not duration_s > 0 or warmup_s < 0:
        raise ConfigError(f"duration must be > 0 s and warm-up >= 0 s; got {duration_s} and {warmup_s}.")
    if iterations is not None and (not isinstance(iterations, int) or iterations < 1):
        raise ConfigError(f"iterations must be a positive integer or None (run for the duration); got {iterations!r}.")
    return sizes


def benchmark(
    runner: Any,
    *,
    batch_sizes: Sequence[int] = (1,),
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    iterations: int | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> BenchReport:
    """Time ``runner.infer`` per batch size: warm up for ``warmup_s``, then run for
    ``duration_s`` (or exactly ``iterations`` times). Activates the runner if needed."""
    sizes = check_bench_settings(batch_sizes, duration_s, warmup_s, iterations)
    opened = not runner.is_active
    if opened:
        runner.activate()
    try:
        shape = _input_shape(runner)
        rng = np.random.default_rng(seed)
        results = []
        skipped = {}
        for size in sizes:
            why = _cannot_run(runner, size)
            if why:
                skipped[str(size)] = why
                continue
            batch = rng.standard_normal((size, *shape), dtype=np.float32)
            results.append(_time_batch(runner, batch, duration_s, warmup_s, iterations, progress))
        info = runner.info
        device_mb = runner.device_memory_mb() if hasattr(runner, "device_memory_mb") else None
    finally:
        if opened:
            runner.deactivate()
    settings = {"batch_sizes": list(sizes), "duration_s": duration_s, "warmup_s": warmup_s,
                "iterations": iterations, "skipped_batch_sizes": skipped}
    return BenchReport(info, tuple(results), settings, peak_rss_mb(), bench_environment(info), device_mb)


def _cannot_run(runner: Any, size: int) -> str | None:
    fixed = runner.max_batch_size
    if fixed is not None and fixed != size:
        return f"the graph's batch is fixed at {fixed}"
    limit = getattr(runner, "batch_limit", None)
    if limit is not None and size > limit:
        return f"above the engine's max batch {limit}"
    return None


def _input_shape(runner: Any) -> tuple[int, ...]:
    spec = next(iter(runner.input_specs().values()))
    trailing = spec.shape[1:]
    if any(d is None for d in trailing):
        raise ConfigError(f"cannot benchmark a graph with dynamic image dims ({spec.describe()}).")
    return tuple(int(d) for d in trailing)


def _time_batch(runner: Any, batch: np.ndarray, duration_s: float, warmup_s: float,
                iterations: int | None, progress: Progress | None) -> BatchResult:
    infer = runner.infer
    clock = time.perf_counter
    infer(batch)  # first call: lazy allocations, graph capture, autotuning
    end_warmup = clock() + warmup_s
    while clock() < end_warmup:
        infer(batch)
    samples: list[float] = []
    computes: list[float | None] = []
    record, record_compute = samples.append, computes.append
    begin = clock()
    deadline = begin + duration_s
    tick = begin + PROGRESS_EVERY_S
    limit = iterations or sys.maxsize
    while True:
        t0 = clock()
        infer(batch)
        t1 = clock()
        record(t1 - t0)
        record_compute(runner.last_compute_ms)
        if len(samples) >= limit or (iterations is None and t1 >= deadline):
            break
        if progress is not None and t1 >= tick:
            progress(len(batch), t1 - begin, duration_s)
            tick = t1 + PROGRESS_EVERY_S
    seconds = clock() - begin
    latency = latency_summary([s * 1000.0 for s in samples])
    reported = [c for c in computes if c is not None]
    return BatchResult(
        batch_size=len(batch), latency_ms=latency,
        throughput_per_s=throughput_per_s(len(batch), latency["mean"]),
        compute_ms=latency_summary(reported) if len(reported) == len(samples) else None,
        iterations=len(samples), seconds=seconds,
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0, 1)


def bench_environment(runner_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """describe_environment() + threads, GPU and, on Jetson, power mode, clocks, JetPack."""
    from edge_ssl.environment import describe_environment

    env = dict(describe_environment())
    env["threads"] = (runner_info or {}).get("threads") or os.cpu_count()
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    jetson = _jetson_info()
    if jetson:
        env["jetson"] = jetson
    return env


def _jetson_info() -> dict[str, Any] | None:
    try:
        from edge_ssl.devices.detect import detect_jetson
    except ImportError:
        return None
    try:
        info = detect_jetson()
    except Exception:  # detection must never break a measurement
        return None
    if info is None:
        return None
    record: dict[str, Any] = dict(info.to_dict())
    record["nvpmodel"] = _command_output(["nvpmodel", "-q"])
    record["jetson_clocks"] = _command_output(["jetson_clocks", "--show"])
    record["clocks_pinned"] = clocks_pinned(record["jetson_clocks"])
    if record["clocks_pinned"] is False:
        warnings.warn(
            "Jetson clocks are not pinned (DVFS on): latency will vary between runs. Run "
            "`sudo nvpmodel -m <mode>` and `sudo jetson_clocks` before measuring.",
            RuntimeWarning, stacklevel=2,
        )
    return record


def clocks_pinned(show: str | None) -> bool | None:
    """From `jetson_clocks --show`: True when every MinFreq equals its MaxFreq; None if unknown."""
    if not show:
        return None
    pairs = re.findall(r"MinFreq=(\d+)\s+MaxFreq=(\d+)", show)
    if not pairs:
        return None
    return all(low == high for low, high in pairs)


def _command_output(argv: list[str], timeout_s: float = 5.0) -> str | None:
    """stdout of a diagnostic tool (argv list, no shell); None when absent or failing."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def bench_bundle(
    bundle: Any,
    backend: str = "auto",
    *,
    batch_sizes: Sequence[int] = (1,),
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    iterations: int | None = None,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: Progress | None = None,
    record: bool = True,
) -> BenchReport:
    """Benchmark a bundle on one backend; store the report in the results file beside it
    (key "bench", per runner name), never in the bundle."""
    from edge_ssl.runtime.backends import open_runner

    from edge_ssl.bundle import Bundle, read_results, record_results

    check_bench_settings(batch_sizes, duration_s, warmup_s, iterations)
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    runner = open_runner(bundle, backend, threads=threads, providers=providers, device=device,
                         precision=precision)
    report = benchmark(runner, batch_sizes=batch_sizes, duration_s=duration_s,
                       warmup_s=warmup_s, iterations=iterations, progress=progress)
    if record:
        previous = dict(read_results(bundle).get("bench", {}))
        previous[str(report.runner.get("name", backend))] = report.to_dict()
        record_results(bundle, "bench", previous)
    return report
