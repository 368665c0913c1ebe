"""The latency harness: what it reports, where results go, and settings checked up front."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edge_ssl.runtime.bench import bench_bundle, benchmark
from edge_ssl.runtime.runner import Runner, TensorSpec

from edge_ssl.bundle import Bundle, lineage_entry, read_results, results_path, write_encoder_bundle
from edge_ssl.errors import ConfigError


class _CountingRunner(Runner):
    """Returns zeros; counts calls and reports a compute time like a GPU backend would."""

    backend = "fake"

    def __init__(self, fixed_batch=None):
        super().__init__("fake")
        self.calls = 0
        self.fixed = fixed_batch

    def _activate(self):
        self._specs = (TensorSpec("images", (self.fixed, 3, 8, 8)),)
        self._info.update({"precision": "fp32", "threads": 1})

    def _deactivate(self):
        pass

    def _infer(self, batch):
        self.calls += 1
        self.last_compute_ms = 0.5
        return np.zeros((len(batch), 4), np.float32)


def test_fixed_iterations_report_percentiles_throughput_compute_and_memory():
    runner = _CountingRunner()
    seen = []
    report = benchmark(runner, batch_sizes=(1, 4), iterations=25, warmup_s=0.0, progress=lambda *a: seen.append(a))
    assert [r.batch_size for r in report.batches] == [1, 4]
    for result in report.batches:
        assert result.iterations == 25 and result.latency_ms["count"] == 25
        assert result.compute_ms["p50"] == 0.5
        assert result.throughput_per_s == pytest.approx(1000 * result.batch_size / result.latency_ms["mean"])
    assert runner.calls == 2 * (25 + 1)  # + one untimed first call per batch size
    assert report.single_stream_p90_ms == report.batches[0].latency_ms["p90"]
    data = report.to_dict()
    assert data["peak_rss_mb"] > 0 and data["environment"]["cpu"] and data["runner"]["name"] == "fake"
    json.dumps(data)
    assert not runner.is_active


def test_duration_mode_runs_for_about_the_duration():
    report = benchmark(_CountingRunner(), batch_sizes=(2,), duration_s=0.2, warmup_s=0.05)
    result = report.batches[0]
    assert result.iterations > 10 and 0.2 <= result.seconds < 2.0


def test_a_static_engine_is_measured_at_its_batch_only():
    report = benchmark(_CountingRunner(fixed_batch=4), batch_sizes=(1, 4, 8), iterations=3, warmup_s=0)
    assert [r.batch_size for r in report.batches] == [4]
    assert report.single_stream_p90_ms is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"batch_sizes": ()}, "batch sizes"), ({"batch_sizes": (0,)}, "batch sizes"),
     ({"duration_s": 0}, "duration"), ({"iterations": 0}, "iterations")],
)
def test_bad_settings_fail_before_the_runner_loads(kwargs, message):
    runner = _CountingRunner()
    with pytest.raises(ConfigError, match=message):
        benchmark(runner, **kwargs)
    assert runner.calls == 0 and not runner.is_active


def test_bench_bundle_records_results_beside_the_bundle_never_inside(tmp_path):
    import torch

    from edge_ssl.models import create_encoder

    torch.manual_seed(0)
    bundle = write_encoder_bundle(tmp_path / "b.edge", create_encoder("resnet18_cifar", width=0.25),
                                  lineage=(lineage_entry("test", {}),))
    files_before = sorted(p.name for p in bundle.path.iterdir())
    report = bench_bundle(bundle, "torch", batch_sizes=(1,), iterations=3, warmup_s=0, threads=1)
    assert sorted(p.name for p in bundle.path.iterdir()) == files_before
    assert Bundle.open(bundle.path).manifest_sha256 == bundle.manifest_sha256
    stored = read_results(bundle)["bench"]
    assert list(stored) == [report.runner["name"]]
    assert stored[report.runner["name"]]["batches"]["1"]["iterations"] == 3
    assert results_path(bundle).name == "b.edge.results.json"


def test_batch_sizes_above_an_engine_profile_are_skipped_with_the_reason():
    runner = _CountingRunner()
    runner.batch_limit = 8
    report = benchmark(runner, batch_sizes=(1, 32), iterations=2, warmup_s=0)
    assert [r.batch_size for r in report.batches] == [1]
    assert report.settings["skipped_batch_sizes"] == {"32": "above the engine's max batch 8"}


def test_jetson_clock_state_is_read_from_jetson_clocks_show():
    from edge_ssl.runtime.bench import clocks_pinned

    pinned = "cpu0: Online=1 Governor=schedutil MinFreq=2201600 MaxFreq=2201600 CurrentFreq=2201600\n" \
             "GPU MinFreq=1300500000 MaxFreq=1300500000 CurrentFreq=1300500000"
    dvfs = "cpu0: Online=1 Governor=schedutil MinFreq=115200 MaxFreq=2201600 CurrentFreq=729600"
    assert clocks_pinned(pinned) is True
    assert clocks_pinned(dvfs) is False
    assert clocks_pinned(None) is None and clocks_pinned("permission denied") is None


@pytest.mark.parametrize(
    ("value", "why"),
    [("1,x", "'x' is not an integer"), ("8,0", "'0' is not an integer >= 1"),
     ("", "no batch size given"), (" , ", "no batch size given"), ((2, 1.5), "1.5 is not"),
     ((True,), "True is not")],
)
def test_a_bad_batch_list_is_named_with_the_option_and_the_part_at_fault(value, why):
    from edge_ssl.runtime.batch_sizes import parse_batch_sizes

    with pytest.raises(ConfigError, match="--batch must be comma-separated integers") as info:
        parse_batch_sizes(value, "--batch")
    assert why in str(info.value) and "1,8,32" in str(info.value)


def test_a_batch_list_keeps_the_order_given():
    from edge_ssl.runtime.batch_sizes import parse_batch_sizes

    assert parse_batch_sizes(" 8, 1,32,") == (8, 1, 32)
    assert parse_batch_sizes((np.int64(4), 2)) == (4, 2)
