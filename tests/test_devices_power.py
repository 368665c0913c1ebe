"""tegrastats parsing on recorded real lines from JetPack 4, 5 and 6 boards; energy per inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edge_ssl.devices.power import PowerError, parse_tegrastats_line, summarize_power

LINES = json.loads((Path(__file__).parent / "fixtures/devices/tegrastats.json").read_text())["lines"]


@pytest.mark.parametrize("recorded", LINES, ids=lambda r: r["id"])
def test_total_power_from_each_jetpack_format(recorded):
    sample = parse_tegrastats_line(recorded["line"])
    assert sample.total_mw == recorded["total_mw"]
    assert sample.total_rail == recorded["total_rail"]
    assert sample.ram_used_mb and sample.ram_total_mb and sample.ram_used_mb < sample.ram_total_mb
    assert "RAM" not in sample.rails_mw and "SWAP" not in sample.rails_mw
    assert sample.gpu_load_pct is not None and sample.cpu_load_pct


def test_offline_cores_and_sensors_are_not_numbers():
    agx = next(r for r in LINES if r["id"] == "agx-orin-jp6")["line"]
    sample = parse_tegrastats_line(agx)
    assert all(t > -100 for t in sample.temperatures_c.values())  # CV0@-256C = powered off
    nx = parse_tegrastats_line(next(r for r in LINES if r["id"] == "xavier-nx-jp5")["line"])
    assert nx.cpu_load_pct[-2:] == (None, None) and nx.gpu_mhz == 510


def test_energy_per_inference_is_power_times_latency_per_image():
    lines = [r["line"] for r in LINES if r["id"] == "orin-nano-jp6"] * 3
    summary = summarize_power(lines, {"1": 2.0, "8": 8.0})
    assert summary.avg_power_w == pytest.approx(5.704)
    assert summary.energy_per_inference_mj["1"] == pytest.approx(5.704 * 2.0)
    assert summary.energy_per_inference_mj["8"] == pytest.approx(5.704 * 1.0)


def test_lines_without_rails_explain_the_sudo_requirement():
    with pytest.raises(PowerError, match="root"):
        summarize_power(["RAM 2020/7852MB (lfb 1x4MB) CPU [1%@345] GR3D_FREQ 0%"], {"1": 1.0})
