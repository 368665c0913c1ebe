"""Jetson detection from recorded /proc/device-tree/model and /etc/nv_tegra_release files."""

from __future__ import annotations

import pytest
from edge_ssl.devices.detect import detect_jetson, jetpack_for_l4t, parse_tegra_release

# Recorded from real devices (JetPack 6.0 AGX Orin, JetPack 5.1.2 Orin Nano, JetPack 4.6 Nano).
RECORDED = [
    (
        b"NVIDIA Jetson AGX Orin Developer Kit\x00",
        "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024\n",
        "36.3.0",
        "6.0",
    ),
    (
        b"NVIDIA Jetson Orin Nano Developer Kit\x00",
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023\n",
        "35.4.1",
        "5.1.2",
    ),
    (
        b"NVIDIA Jetson Nano Developer Kit\x00",
        "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64, DATE: Sat Feb 19 17:05:08 UTC 2022\n",
        "32.7.1",
        "4.6.x",
    ),
]


@pytest.mark.parametrize(("model", "release", "l4t", "jetpack"), RECORDED)
def test_detects_recorded_jetsons(tmp_path, model, release, l4t, jetpack):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "proc/device-tree/model").write_bytes(model)
    (tmp_path / "etc/nv_tegra_release").write_text(release)
    info = detect_jetson(tmp_path)
    assert info is not None
    assert info.model == model.decode().strip("\x00")
    assert (info.l4t, info.jetpack) == (l4t, jetpack)


def test_not_a_jetson(tmp_path):
    assert detect_jetson(tmp_path) is None
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    assert detect_jetson(tmp_path) is None


def test_custom_carrier_board_detected_by_l4t_release(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "proc/device-tree/model").write_bytes(b"Acme Vision Box\x00")
    (tmp_path / "etc/nv_tegra_release").write_text(RECORDED[0][1])
    info = detect_jetson(tmp_path)
    assert info is not None and info.model == "Acme Vision Box" and info.jetpack == "6.0"


def test_release_parsing_edge_cases():
    assert parse_tegra_release("garbage") is None
    assert jetpack_for_l4t("35.4.1") == "5.1.2"
    assert jetpack_for_l4t("99.1") is None


# ---------------------------------------------------------------- nvpmodel, memory
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from edge_ssl.devices.detect import memory_gb, parse_nvpmodel_query  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "devices"


@pytest.mark.parametrize(
    "recorded", json.loads((FIXTURES / "nvpmodel_q.json").read_text())["outputs"], ids=lambda r: r["board"]
)
def test_parses_recorded_nvpmodel_outputs(recorded):
    assert parse_nvpmodel_query(recorded["text"]) == {"name": recorded["name"], "id": recorded["id"]}


def test_nvpmodel_garbage_is_none():
    assert parse_nvpmodel_query("nvpmodel: command not found") is None


def test_memory_from_meminfo(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:       15655832 kB\nMemFree: 1 kB\n")
    assert memory_gb(tmp_path) == pytest.approx(14.93, abs=0.01)
    assert memory_gb(tmp_path / "missing") is None
