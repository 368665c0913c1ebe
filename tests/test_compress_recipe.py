"""The compress recipe: YAML + flag overrides, the chained stages, the per-stage table, targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edge_ssl.compress.recipe import RecipeConfig, StageRow, choose_stage, load_recipe

from edge_ssl.bundle import Bundle, read_results
from edge_ssl.errors import ConfigError
from tests.test_compress_fixtures import tiny_dataset, write_tiny_bundle


@pytest.fixture(scope="module")
def teacher_bundle(tmp_path_factory):
    """A tiny ResNet-18 (width 0.25) teacher bundle."""
    return write_tiny_bundle(tmp_path_factory.mktemp("teacher") / "teacher.edge")


def _row(name: str, knn: float, latency: float) -> StageRow:
    return StageRow(name, f"{name}.edge", 1, 1, 1, knn, latency, "ort-cpu measured", "fp32")


def test_yaml_recipe_with_flag_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student: resnet18_cifar\nprune: 0.5\ndistill:\n  epochs: 3\ntarget: tensorrt\n")
    recipe = load_recipe(path, {"prune": 0.25, "max_knn_drop": None})
    assert recipe.prune == 0.25 and recipe.target == "tensorrt" and recipe.distill_config().epochs == 3
    path.write_text("studnet: resnet18_cifar\n")
    with pytest.raises(ConfigError, match="(?i)did you mean 'student'"):
        load_recipe(path)
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        RecipeConfig(prune=1.0)
    with pytest.raises(ConfigError, match="DistillConfig"):
        RecipeConfig(student="resnet18_cifar", distill={"epoch": 3})


def test_the_recipe_files_in_the_repository_load():
    from tests.conftest import PROJECT_ROOT

    files = sorted((PROJECT_ROOT / "recipes").glob("*.yaml"))
    assert files
    for file in files:
        load_recipe(file)


def test_choose_stage_keeps_the_last_stage_meeting_targets_or_says_how_close():
    rows = [_row("teacher", 0.70, 10.0), _row("distill", 0.69, 4.0), _row("quantize", 0.685, 1.5)]
    chosen, met, _ = choose_stage(rows, RecipeConfig(max_latency_ms=2.0, max_knn_drop=2.0))
    assert (chosen, met) == ("quantize", True)
    chosen, met, message = choose_stage(rows, RecipeConfig(max_latency_ms=1.0, max_knn_drop=2.0))
    assert (chosen, met) == ("quantize", False)
    assert "0.50 ms over" in message
    chosen, met, message = choose_stage(rows, RecipeConfig(max_latency_ms=5.0, max_knn_drop=0.5))
    assert chosen == "distill" and not met and "pts over" in message


def test_compress_cli_chains_the_stages_and_stores_the_table(teacher_bundle, tmp_path):
    from edge_ssl.cli import main

    data = tiny_dataset(16, labeled=True)
    for name, subset in (("bank", data), ("test", tiny_dataset(8, seed=1, labeled=True))):
        np.savez(tmp_path / f"{name}.npz", x=subset.images, y=subset.labels)
    np.savez(tmp_path / "unlabeled.npz", x=data.images)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "distill: {epochs: 1, batch_size: 8, cache_views: 1, queue_size: 16, head_hidden_dim: 16,"
        " warmup_epochs: 0.0}\nquantize_options: {calibration_images: 16}\nbench_seconds: 0.2\n"
    )
    out = tmp_path / "c.edge"
    args = ["compress", str(teacher_bundle.path), "--student", "resnet18_cifar", "--arch-opt", "width=0.125",
            "--prune", "0.5", "--quantize", "int8", "--target", "ort-cpu", "--data", str(tmp_path / "unlabeled.npz"),
            "--eval-data", str(tmp_path / "bank.npz"), "--eval-test", str(tmp_path / "test.npz"),
            "--recipe", str(recipe), "--device", "cpu", "--max-latency-ms", "10000", "--out", str(out), "--json"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None)
    final = Bundle.open(out)
    assert final.manifest.precision == "int8"
    stages = [e.stage for e in final.manifest.lineage]
    assert stages[-3:] == ["distill", "prune", "quantize"]
    table = read_results(final)["compress"]
    assert [r["name"] for r in table["stages"]] == ["teacher", "distill", "prune", "quantize"]
    assert table["met"] and table["chosen"] == "quantize"
    params = [r["params"] for r in table["stages"]]
    assert params[2] < params[1] < params[0]
    assert all(0 <= r["knn_top1"] <= 1 and r["latency_ms"] > 0 for r in table["stages"])
    json.dumps(table)
    with pytest.raises(SystemExit) as refused:
        main(args)  # OUT exists: one-line error, exit 1
    assert refused.value.code == 1
