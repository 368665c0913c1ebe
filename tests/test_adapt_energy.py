"""Energy per adaptation step where tegrastats exists: module power sampled while the steps run,
recorded (measured, with its rail) in the adapted bundle's adapt.device_cost; None with the reason
where there is no tegrastats. A fake tegrastats replays recorded Jetson lines: no board needed."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from edge_ssl.devices.remote_adapt import StepPowerMeter

from edge_ssl.bundle import Bundle

RECORDED = json.loads((Path(__file__).parent / "fixtures/devices/tegrastats.json").read_text())["lines"]
ORIN_NANO = next(r for r in RECORDED if r["id"] == "orin-nano-jp6")  # VDD_IN 5704 mW
NO_RAILS = "RAM 2020/7852MB (lfb 1x4MB) CPU [1%@345] GR3D_FREQ 0%"  # as a non-root user sees it


def _fake_tegrastats(folder: Path, line: str, monkeypatch) -> Path:
    """`tegrastats --interval MS` that prints ``line`` every 20 ms until stopped, first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "tegrastats"
    script.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.02; done\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return script


def _no_tegrastats(monkeypatch) -> None:
    path = [p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "tegrastats").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(path))


def test_energy_per_step_is_the_power_during_the_steps_times_their_time(tmp_path, monkeypatch):
    _fake_tegrastats(tmp_path / "bin", ORIN_NANO["line"], monkeypatch)
    meter = StepPowerMeter()
    with meter.sampling():
        time.sleep(0.3)
    measured = meter.measured(0.25)
    watts = ORIN_NANO["total_mw"] / 1000
    assert measured["avg_power_w"] == pytest.approx(watts, rel=1e-3)
    assert measured["energy_per_step_j"] == pytest.approx(watts * 0.25, rel=1e-3)
    assert measured["rail"] == ORIN_NANO["total_rail"] and measured["samples"] >= 2
    assert measured["kind"].startswith("measured")


def test_without_tegrastats_the_energy_is_none_with_the_reason(monkeypatch):
    _no_tegrastats(monkeypatch)
    meter = StepPowerMeter()
    with meter.sampling():
        pass
    measured = meter.measured(0.25)
    assert measured["energy_per_step_j"] is None and measured["avg_power_w"] is None
    assert "tegrastats" in measured["reason"]


def test_lines_without_power_rails_say_why(tmp_path, monkeypatch):
    _fake_tegrastats(tmp_path / "bin", NO_RAILS, monkeypatch)
    meter = StepPowerMeter()
    with meter.sampling():
        time.sleep(0.2)
    measured = meter.measured(0.25)
    assert measured["energy_per_step_j"] is None and "root" in measured["reason"]


@pytest.fixture(scope="module")
def local_images(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny float bundle, 48 local images in an .npz)."""
    from tests.test_compress_fixtures import tiny_images, write_tiny_bundle

    folder = tmp_path_factory.mktemp("energy")
    np.savez(folder / "local.npz", x=tiny_images(48, seed=2))
    return write_tiny_bundle(folder / "cam.edge", width=0.125).path, folder / "local.npz"


def _adapt_cli(bundle: Path, data: Path, out: Path, capsys) -> dict:
    from edge_ssl.cli import main

    with pytest.raises(SystemExit) as done:
        main(["adapt", str(bundle), "--data", str(data), "--out", str(out), "--steps", "3",
              "--batch-size", "8", "--trainable", "bias", "--device", "cpu", "--opt", "head_dim=32",
              "--json"])
    captured = capsys.readouterr()
    assert done.value.code in (0, None), captured.err
    return json.loads(captured.out)


def test_edge_ssl_adapt_records_the_energy_in_the_adapted_bundle(local_images, tmp_path,
                                                                  monkeypatch, capsys):
    bundle, data = local_images
    _fake_tegrastats(tmp_path / "bin", ORIN_NANO["line"], monkeypatch)
    report = _adapt_cli(bundle, data, tmp_path / "a.edge", capsys)
    cost = Bundle.open(tmp_path / "a.edge").manifest.metrics["adapt"]["device_cost"]
    energy = cost["energy"]
    assert energy == report["device_cost"]["energy"]  # what --json printed is what shipped
    sec_per_step = cost["measured_host"]["sec_per_step"]
    assert energy["sec_per_step"] == sec_per_step
    assert energy["energy_per_step_j"] == pytest.approx(energy["avg_power_w"] * sec_per_step, rel=1e-3)
    assert energy["avg_power_w"] == pytest.approx(ORIN_NANO["total_mw"] / 1000, rel=1e-3)
    assert energy["rail"] == "VDD_IN" and energy["kind"].startswith("measured")


def test_edge_ssl_adapt_without_tegrastats_says_so_in_the_bundle(local_images, tmp_path,
                                                                 monkeypatch, capsys):
    bundle, data = local_images
    _no_tegrastats(monkeypatch)
    _adapt_cli(bundle, data, tmp_path / "a.edge", capsys)
    energy = Bundle.open(tmp_path / "a.edge").manifest.metrics["adapt"]["device_cost"]["energy"]
    assert energy["energy_per_step_j"] is None and "tegrastats" in energy["reason"]
