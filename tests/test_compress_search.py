"""Compression aimed at a board: the candidate search, the launch floor, --for, latency kinds."""

from __future__ import annotations

import numpy as np
import pytest
from edge_ssl.compress.pipeline import compress
from edge_ssl.compress.recipe import RecipeConfig
from edge_ssl.compress.search import (
    CandidateSpec,
    LatencyBudgetError,
    build_candidate,
    measure_candidate,
    search,
)
from edge_ssl.compress.stage_table import MEASURED_HOST, PREDICTED_FOR_BOARD
from edge_ssl.devices import profiles
from edge_ssl.devices.profiles import DeviceProfile

from edge_ssl.errors import ConfigError
from tests.test_compress_fixtures import tiny_dataset, write_tiny_bundle

#: A made-up Ampere board, slow enough that compute (not the launch floor) sets the time.
FAKE = DeviceProfile(
    key="fake-board", name="Fake Board", soc="fake", arch="ampere", compute_capability="8.7",
    cuda_cores=256, tensor_cores=8, gpu_max_mhz=600.0, dla_cores=0, memory_gb=4.0,
    memory_bandwidth_gbs=30.0, peak_fp16_tflops_dense=0.5, peak_int8_tops_dense=1.0,
    precisions=("fp32", "fp16", "int8"), jetpacks=(), module_ai_tops=None, module_ai_tops_kind=None,
)
WIDTHS = (0.375, 0.25, 0.125)


@pytest.fixture(autouse=True)
def fake_board(monkeypatch, tmp_path):
    """FAKE is a known profile; no user calibration file changes the predictions."""
    known = {**profiles.load_profiles(), FAKE.key: FAKE}
    monkeypatch.setattr(profiles, "load_profiles", lambda: known)
    monkeypatch.setenv("EDGE_SSL_PREDICT_CALIBRATION", str(tmp_path / "none.toml"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_tiny_bundle(tmp_path_factory.mktemp("teacher") / "teacher.edge", width=0.5)


@pytest.fixture(scope="module")
def predicted(teacher):
    """Each width's predicted ms on FAKE (int8), from the model itself: no published number."""
    found = {}
    for width in WIDTHS:
        spec = CandidateSpec("resnet18_cifar", {"width": width})
        found[width] = measure_candidate(build_candidate(spec, teacher.manifest.encoder, 32), spec, FAKE,
                                         "int8").predicted_ms
    return found


def _specs():
    return [CandidateSpec("resnet18_cifar", {"width": w}) for w in WIDTHS]


def test_the_search_picks_the_widest_candidate_that_fits(teacher, predicted):
    assert predicted[0.375] > predicted[0.25] > predicted[0.125]
    budget = (predicted[0.375] + predicted[0.25]) / 2
    result = search(teacher.manifest.encoder, _specs(), FAKE, "int8", budget, round_to=32, prune_ratios=())
    assert result.chosen is not None and result.chosen.spec.kwargs["width"] == 0.25
    assert result.chosen.predicted_ms <= budget and result.chosen.fits
    assert not result.teacher_fits
    table = result.to_dict()["candidates"]
    assert [c["fits"] for c in table if c["student_kwargs"]["width"] == 0.375] == [False]
    assert all(c["kind"] == "predicted-for-board" and len(c["interval_ms"]) == 2 for c in table)


def test_a_budget_below_the_launch_floor_is_refused_naming_the_floor(teacher):
    with pytest.raises(LatencyBudgetError, match=r"below the launch floor on fake-board") as caught:
        search(teacher.manifest.encoder, _specs()[-1:], FAKE, "int8", 1e-4, prune_ratios=())
    floor = float(caught.value.args[0].split("Allow at least ")[1].split(" ms")[0])
    assert floor > 1e-4


def test_an_unknown_for_profile_lists_the_known_ones(teacher, tmp_path, capsys):
    from edge_ssl.cli import main

    with pytest.raises(ConfigError, match=r"(?i)did you mean 'orin-nano-8gb'"):
        RecipeConfig(profile="orin-nano-8g")
    np.savez(tmp_path / "u.npz", x=tiny_dataset(16).images)
    with pytest.raises(SystemExit) as done:
        main(["compress", str(teacher.path), "--for", "orin-nano-8g", "--precision", "int8",
              "--max-latency-ms", "1.5", "--data", str(tmp_path / "u.npz"), "--out", str(tmp_path / "c.edge")])
    err = capsys.readouterr().err
    assert done.value.code != 0
    assert "orin-nano-8gb" in err and "agx-orin-64gb" in err
    assert not (tmp_path / "c.edge").exists()


def test_a_board_profile_given_to_device_names_for(teacher, tmp_path, capsys):
    from edge_ssl.cli import main

    with pytest.raises(SystemExit) as done:
        main(["compress", str(teacher.path), "--device", "orin-nano-8gb", "--out", str(tmp_path / "c.edge")])
    assert done.value.code != 0 and "--for orin-nano-8gb" in capsys.readouterr().err


def test_no_stage_reports_a_host_time_as_a_device_time(teacher, tmp_path):
    with pytest.raises(ConfigError, match="needs the board"):
        RecipeConfig(target="tensorrt", max_latency_ms=2.0)
    recipe = RecipeConfig(profile=FAKE.key, quantize="int8", max_latency_ms=1000.0, search=False,
                          bench_seconds=0.1, quantize_options={"calibration_images": 16})
    result = compress(teacher, recipe, tiny_dataset(16), tmp_path / "c.edge")
    assert [r.name for r in result.rows] == ["teacher", "quantize"]
    for row in result.rows:
        kinds = {entry["kind"]: entry for entry in row.to_dict()["latencies"]}
        assert kinds[MEASURED_HOST]["on"].startswith("this host")
        assert kinds[PREDICTED_FOR_BOARD]["on"] == FAKE.key
        assert row.budget_kind == PREDICTED_FOR_BOARD and row.budget_ms() == row.board_ms
        assert row.board_ms != row.latency_ms and len(row.board_interval_ms) == 2
    assert result.rows[-1].board_precision == "int8" and result.rows[0].board_precision == "fp16"


def test_a_teacher_that_fits_already_is_not_compressed(teacher, tmp_path):
    recipe = RecipeConfig(student="resnet18_cifar", student_kwargs={"width": 0.25}, profile=FAKE.key,
                          distill={"batch_size": 8}, quantize_options={"calibration_images": 16},
                          quantize="int8", max_latency_ms=1000.0)
    result = compress(teacher, recipe, tiny_dataset(16), tmp_path / "c.edge")
    assert result.bundle is None and result.rows == []
    assert "teacher already fits" in result.message and "--force" in result.message
    assert result.to_dict()["search"]["teacher_fits"] is True
    assert not (tmp_path / "c.edge").exists()
