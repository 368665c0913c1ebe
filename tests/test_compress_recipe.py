"""The compress recipe: YAML + flag overrides, the chained stages, the per-stage table, targets."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from edge_ssl.compress.recipe import RecipeConfig, load_recipe
from edge_ssl.compress.stage_table import StageRow, choose_stage

from edge_ssl.bundle import Bundle, read_results, sha256_file
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
    assert [s for s in stages if s in ("distill", "prune", "quantize")] == ["distill", "prune", "quantize"]
    table = read_results(final)["compress"]
    assert [r["name"] for r in table["stages"]] == ["teacher", "distill", "prune", "quantize"]
    assert table["met"] and table["chosen"] == "quantize"
    params = [r["params"] for r in table["stages"]]
    assert params[2] < params[1] < params[0]
    assert all(0 <= r["knn_top1"] <= 1 and r["latency_ms"] > 0 for r in table["stages"])
    # ort-cpu: this host's measured time is the latency that counts, and the only one
    assert all(r["budget_kind"] == "measured-host" and [e["kind"] for e in r["latencies"]] == ["measured-host"]
               for r in table["stages"])
    json.dumps(table)
    _ships_what_it_measured(table, tmp_path)
    with pytest.raises(SystemExit) as refused:
        main(args)  # OUT exists: one-line error, exit 1
    assert refused.value.code == 1


def _ships_what_it_measured(table: dict, tmp_path) -> None:
    """Every stage bundle holds the graph its row measured; exporting a float stage reuses it."""
    from edge_ssl.runtime.export import export_bundle

    for row in table["stages"][1:]:
        stage = Bundle.open(row["bundle"], verify=True)
        assert row["graph_shipped"], row["name"]
        assert sha256_file(stage.file("model.onnx")) == row["graph_sha256"], row["name"]
    pruned = Bundle.open(table["stages"][2]["bundle"])
    assert pruned.manifest.metrics["export"]["parity"]["passed"]
    exported = export_bundle(pruned, tmp_path / "exported.edge").bundle
    assert exported.manifest.metrics["export"]["reused"]
    assert sha256_file(exported.file("model.onnx")) == table["stages"][2]["graph_sha256"]
    static = export_bundle(pruned, tmp_path / "static.edge", dynamic_batch=False).bundle
    assert not static.manifest.metrics["export"]["reused"]


def test_a_recipe_for_a_board_takes_for_and_precision_and_its_tile(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("for: orin-nano-8gb\nprecision: int8\nprune: 0.5\nmax_latency_ms: 1.5\n")
    recipe = load_recipe(path)
    assert (recipe.profile, recipe.quantize, recipe.target) == ("orin-nano-8gb", "int8", "tensorrt")
    assert recipe.prune_config().round_to == 32  # Ampere INT8 tensor cores
    assert load_recipe(path, {"quantize": "fp16"}).prune_config().round_to == 8
    with pytest.raises(ConfigError, match="does not run int8"):
        RecipeConfig(profile="nano-4gb", quantize="int8")
    with pytest.raises(ConfigError, match="drop --target"):
        RecipeConfig(profile="orin-nano-8gb", target="ort-cpu")


def test_arch_opt_merges_over_the_recipe_student_kwargs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("student: resnet18\nstudent_kwargs: {width: 0.25}\ndistill: {epochs: 3}\n")
    recipe = load_recipe(path, {"student_kwargs": {"image_size": 64}, "distill": {"device": "cpu"}})
    assert recipe.student_kwargs == {"width": 0.25, "image_size": 64}
    assert recipe.distill_config().epochs == 3 and recipe.distill_config().device == "cpu"
    other = load_recipe(path, {"student": "mobilenetv3_small"})  # kwargs were written for resnet18
    assert other.student_kwargs == {}


def _compress_cli(teacher_bundle, tmp_path, *extra: str) -> tuple[int, str]:
    from edge_ssl.cli import main

    np.savez(tmp_path / "unlabeled.npz", x=tiny_dataset(16).images)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("distill: {epochs: 1, batch_size: 8, cache_views: 1, queue_size: 16}\n"
                      "quantize_options: {calibration_images: 16}\n")
    args = ["compress", str(teacher_bundle.path), "--student", "resnet18_cifar", "--arch-opt", "width=0.125",
            "--prune", "0.5", "--data", str(tmp_path / "unlabeled.npz"), "--recipe", str(recipe),
            "--device", "cpu", "--out", str(tmp_path / "c.edge"), *extra]
    with pytest.raises(SystemExit) as done:
        main(args)
    return done.value.code, done


@pytest.mark.parametrize("extra, expected", [
    (("--set", "quantize_options.calibration_images=64"), "calibration_images is 64 but only 16"),
    (("--set", "quantize_options.calibration_images=8"), "needs at least 16"),
    (("--set", "prune_options.recovery_epochs=1", "--set", "prune_options.recovery={lr: -1}"),
     "prune_options.recovery"),
    (("--max-knn-drop", "1"), "--eval-data"),
    (("--set", "distill.batch_size=64"), "distill.batch_size=16"),
    (("--arch-opt", "width=0.5"), r"larger than the teacher: \d+\.\d+M params vs 0\.70M"),
])
def test_a_bad_setting_of_any_stage_fails_before_the_first_stage_runs(teacher_bundle, tmp_path, capsys,
                                                                     extra, expected):
    """The last stage's settings too: nothing is trained, no stage folder is created."""
    code, _ = _compress_cli(teacher_bundle, tmp_path, *extra)
    err = capsys.readouterr().err
    assert code == 1, err
    assert re.search(expected, err), err
    assert not list(tmp_path.glob("c.edge*")), "no stage may start before every setting is checked"


def test_an_out_that_cannot_be_written_names_the_folder(teacher_bundle, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _ = _compress_cli(teacher_bundle, tmp_path, "--out", str(blocker / "c.edge"))
    err = capsys.readouterr().err
    assert code == 1 and f"cannot write to {blocker}" in err, err


def test_a_missed_target_says_which_way_to_go():
    rows = [_row("teacher", 0.70, 10.0), _row("distill", 0.60, 4.0)]
    _, met, message = choose_stage(rows, RecipeConfig(max_knn_drop=3.0))
    assert not met and "a larger student" in message and "a lower --prune ratio" in message
    assert "a smaller student" not in message
    _, met, message = choose_stage(rows, RecipeConfig(max_latency_ms=1.0))
    assert not met and "a smaller student" in message and "a higher --prune ratio" in message
    assert "a larger student" not in message


def test_stage_messages_name_what_compress_takes():
    from edge_ssl.compress.stage_run import compress_terms

    text = compress_terms("distill", "16 images are fewer than one batch of 32; lower --batch-size.")
    assert "--batch-size" not in text and "distill.batch_size" in text
    text = compress_terms("quantize", "Raise --max-fallback, use entropy calibration.")
    assert "quantize_options.max_fallback" in text
    assert compress_terms("prune", "Lower --ratio or exclude layers.") == "Lower --prune or exclude layers."


def test_compress_on_a_device_checks_the_budget_on_what_it_measured_there(teacher_bundle, tmp_path,
                                                                          monkeypatch, capsys):
    """--on local: the agent measures every stage (teacher included) on the "device"; the rows
    carry measured-on-board latencies and the budget is checked on them, not on the host's."""
    import sys

    monkeypatch.setenv("EDGE_SSL_REMOTE_ROOT", str(tmp_path / "device"))
    monkeypatch.setenv("EDGE_SSL_DEVICE_PYTHON", sys.executable)
    code, _ = _compress_cli(teacher_bundle, tmp_path, "--quantize", "none", "--on", "local",
                            "--set", "bench_seconds=0.2", "--max-latency-ms", "10000", "--json")
    assert code in (0, None)
    table = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in table["stages"]] == ["teacher", "distill", "prune"]
    for row in table["stages"]:
        kinds = [e["kind"] for e in row["latencies"]]
        assert kinds == ["measured-host", "measured-on-board"] and row["budget_kind"] == "measured-on-board"
        assert row["device_ms"] > 0 and row["device_backend"] == "onnxruntime"
        assert "CPUExecutionProvider" in row["device_providers"]  # said, never hidden
    assert table["met"]


def test_an_unreachable_device_is_refused_before_any_training(teacher_bundle, tmp_path, capsys):
    code, _ = _compress_cli(teacher_bundle, tmp_path, "--on", "ssh://nobody@127.0.0.1:1",
                            "--max-latency-ms", "5")
    assert code == 1
    assert "127.0.0.1" in capsys.readouterr().err
    assert not (tmp_path / "c.edge.stages.partial" / "1-distill.edge").exists()
