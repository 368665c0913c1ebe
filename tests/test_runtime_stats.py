"""Latency statistics: numpy-exact percentiles, clear errors, and shippable alone to a device."""

from __future__ import annotations

import ast
import importlib.util
import shutil

import numpy as np
import pytest
from edge_ssl.runtime.stats import latency_summary, percentile, throughput_per_s

from tests.conftest import PROJECT_ROOT

STATS = PROJECT_ROOT / "runtime" / "stats.py"


def test_summary_matches_numpy_on_a_skewed_sample():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=0.0, sigma=0.5, size=1001).tolist()
    summary = latency_summary(samples)
    assert summary["count"] == 1001
    for key, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        assert summary[key] == pytest.approx(float(np.percentile(samples, q)))
    assert summary["mean"] == pytest.approx(float(np.mean(samples)))
    assert summary["std"] == pytest.approx(float(np.std(samples)))
    assert summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]


def test_one_sample_has_zero_spread():
    summary = latency_summary([2.5])
    assert summary["p50"] == summary["p99"] == summary["max"] == 2.5
    assert summary["std"] == 0.0


@pytest.mark.parametrize(
    ("samples", "message"),
    [([], "at least one sample"), ([1.0, float("nan")], "finite"), ([1.0, -0.5], ">= 0")],
)
def test_bad_samples_are_rejected_with_the_reason(samples, message):
    with pytest.raises(ValueError, match=message):
        latency_summary(samples)


def test_percentile_and_throughput_helpers():
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert throughput_per_s(32, 16.0) == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="latency_ms > 0"):
        throughput_per_s(1, 0.0)


def test_module_parses_as_python_3_8_and_imports_nothing_of_edge_ssl():
    tree = ast.parse(STATS.read_text(), feature_version=(3, 8))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "collections", "math", "typing", "numpy", "statistics"}


def test_a_copy_of_the_file_works_on_its_own(tmp_path):
    # The devices engineer ships this one file next to the on-device agent.
    copy = tmp_path / "latency_stats.py"
    shutil.copyfile(STATS, copy)
    spec = importlib.util.spec_from_file_location("latency_stats", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.latency_summary([1.0, 3.0])["p50"] == pytest.approx(2.0)
