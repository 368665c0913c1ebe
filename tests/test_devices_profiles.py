"""Device profiles: every board loads, lookups explain themselves, the CLI lists and shows them."""

from __future__ import annotations

import json

import pytest
from edge_ssl.devices.profiles import get_profile, jetpack_table, load_profiles, match_profile
from typer.testing import CliRunner

from edge_ssl.cli import app
from edge_ssl.errors import ConfigError

REQUIRED = ("nano-4gb", "tx2", "xavier-nx", "agx-xavier", "orin-nano-4gb", "orin-nano-8gb",
            "orin-nano-8gb-super", "orin-nx-8gb", "orin-nx-16gb", "agx-orin-32gb", "agx-orin-64gb", "thor")


def test_every_requested_board_has_a_profile_with_known_jetpacks():
    profiles = load_profiles()
    assert set(REQUIRED) <= set(profiles)
    table = jetpack_table()
    for profile in profiles.values():
        assert all(jp in table for jp in profile.jetpacks), profile.key
        assert "fp32" in profile.precisions


def test_orin_nano_has_no_dla_and_orin_nx_16gb_runs_int8():
    assert get_profile("orin-nano-8gb").dla_cores == 0
    nx = get_profile("orin-nx-16gb")
    assert "int8" in nx.precisions and nx.compute_capability == "8.7"
    assert nx.tensorrt_versions()["5.1.1"] == "8.5.2"


def test_unknown_profile_suggests_the_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'orin-nx-16gb'"):
        get_profile("orin-nx-16")


def test_unknown_power_mode_lists_the_known_ones():
    with pytest.raises(ConfigError, match="0 \\(MAXN\\)"):
        get_profile("agx-orin-64gb").power_mode(7)


def test_recorded_board_names_map_to_profiles():
    from tests.test_detect import FIXTURES

    boards = json.loads((FIXTURES / "device_tree_models.json").read_text())["boards"]
    for board in boards:
        found = match_profile(board["model"], board["mem_total_kb"] * 1024 / 2**30)
        assert (found.key if found else None) == board["profile"], board["model"]


def test_cli_lists_and_shows_profiles():
    runner = CliRunner()
    listed = runner.invoke(app, ["devices", "--json"])
    assert listed.exit_code == 0 and "thor" in json.loads(listed.stdout)
    shown = runner.invoke(app, ["devices", "show", "orin-nx-16gb", "--json"])
    assert shown.exit_code == 0
    assert json.loads(shown.stdout)["jetpacks"]["6.0"]["tensorrt"] == "8.6.2"


@pytest.mark.parametrize(("board", "profile"), [("Xavier NX", "xavier-nx"), ("AGX Orin 32GB", "agx-orin-32gb")])
def test_recorded_nvpmodel_modes_exist_in_the_profiles(board, profile):
    from edge_ssl.devices.detect import parse_nvpmodel_query

    from tests.test_detect import FIXTURES

    outputs = json.loads((FIXTURES / "nvpmodel_q.json").read_text())["outputs"]
    recorded = next(o for o in outputs if board in o["board"])
    mode = parse_nvpmodel_query(recorded["text"])
    assert get_profile(profile).power_mode(mode["id"]).name == mode["name"]
