"""Latency statistics in one place (stdlib + numpy; also shipped alone to devices)."""

# Python 3.8-compatible on purpose: the devices engineer copies this file next to the
# on-device agent, which may run on an older JetPack Python. No edge_ssl imports here.
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Keys every summary carries, in the order reports print them.
SUMMARY_KEYS = ("p50", "p90", "p99", "mean", "std", "min", "max", "count")


def percentile(samples_ms: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q!r}.")
    values = _as_array(samples_ms)
    return float(np.percentile(values, q))


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/std(population)/min/max (milliseconds) and count of ``samples_ms``.

    MLPerf single-stream reports the 90th percentile; it is the headline number.
    """
    values = _as_array(samples_ms)
    p50, p90, p99 = np.percentile(values, [50.0, 90.0, 99.0])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "count": int(values.size),
    }


def throughput_per_s(batch_size: int, latency_ms: float) -> float:
    """Items per second for ``batch_size`` items processed in ``latency_ms`` milliseconds."""
    if batch_size <= 0 or not latency_ms > 0:
        raise ValueError(
            f"throughput needs batch_size > 0 and latency_ms > 0; got {batch_size!r} and {latency_ms!r}."
        )
    return 1000.0 * batch_size / latency_ms


def _as_array(samples_ms: Sequence[float]) -> np.ndarray:
    values = np.asarray(list(samples_ms), dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("latency statistics need at least one sample; got none.")
    if not all(math.isfinite(v) for v in values.tolist()):
        raise ValueError("latency samples must be finite numbers; got NaN or inf.")
    if values.min() < 0:
        raise ValueError(
            f"latency samples must be >= 0 ms; got a minimum of {float(values.min())!r}."
        )
    return values
