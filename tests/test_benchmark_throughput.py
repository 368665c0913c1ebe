"""benchmarks/pretrain_throughput.py runs its settings side by side and reports what it measured."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import PROJECT_ROOT

pytest.importorskip("kornia", reason="the benchmark's old-default baseline uses kornia (pip install '.[dev]')")
sys.path.append(str(PROJECT_ROOT / "benchmarks"))

from legacy_views import KorniaViewAugment  # noqa: E402
from pretrain_throughput import main  # noqa: E402

from edge_ssl.data.views import ViewAugment, view_preset  # noqa: E402
from edge_ssl.models import create_encoder  # noqa: E402


def test_cpu_run_reports_every_setting_against_the_old_default(tmp_path):
    out = tmp_path / "tp.json"
    code = main(["--steps", "2", "--warmup", "1", "--batch-size", "8", "--width", "0.25",
                 "--device", "cpu", "--json-out", str(out)])
    report = json.loads(out.read_text())
    # At batch 8 the two view implementations' losses may differ by more than the tolerance:
    # the exit code says so, and only then.
    assert code == (0 if all(row["loss_within_tolerance"] for row in report["rows"]) else 1)
    assert [row["setting"] for row in report["rows"]] == ["old-default", "kornia-views", "new-default"]
    assert report["rows"][0]["ratio_to_old-default"] == 1.0
    assert all(row["images_per_second"] > 0 and row["mfu"] is None for row in report["rows"])
    assert set(report["views_ms_per_batch"]) == {"kornia", "edge_ssl"}
    assert report["flops_per_image"] > 0


@pytest.mark.parametrize("preset, local_crops", [("simclr", 0), ("dino", 2)])
def test_old_views_keep_the_interface_and_one_seed_repeats_them(preset, local_crops):
    spec = create_encoder("resnet18_cifar", width=0.25).spec.input
    config = view_preset(preset, 32, local_crops=local_crops)
    images = torch.rand(6, 3, 32, 32)
    old = [KorniaViewAugment(config, spec, generator=torch.Generator().manual_seed(1))(images)
           for _ in range(2)]
    new = ViewAugment(config, spec, generator=torch.Generator().manual_seed(1))(images)
    assert [v.shape for v in old[0]] == [v.shape for v in new]
    assert all(torch.equal(a, b) for a, b in zip(*old, strict=True))


def test_without_kornia_old_settings_are_refused_up_front_and_the_rest_runs(tmp_path, monkeypatch, capsys):
    import pretrain_throughput

    monkeypatch.setattr(pretrain_throughput, "has_kornia", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        main(["--steps", "2", "--device", "cpu"])
    assert stopped.value.code == 2 and "pip install kornia" in capsys.readouterr().err
    out = tmp_path / "tp.json"
    main(["--steps", "2", "--warmup", "1", "--batch-size", "8", "--width", "0.25", "--device", "cpu",
          "--settings", "new-default", "--json-out", str(out)])
    timings = json.loads(out.read_text())["views_ms_per_batch"]
    assert timings["kornia"] is None and timings["edge_ssl"] > 0


def test_profile_reports_where_a_settings_step_time_goes(tmp_path, capsys):
    out = tmp_path / "tp.json"
    main(["--steps", "2", "--warmup", "1", "--batch-size", "8", "--width", "0.25", "--device", "cpu",
          "--settings", "new-default", "--profile", "new-default", "--json-out", str(out)])
    profile = json.loads(out.read_text())["profile"]["new-default"]
    assert profile["steps"] == 10 and profile["time"] == "CPU self time"
    assert profile["device_busy_frac"] is None  # no GPU kernels on a CPU
    ops = [row["op"] for row in profile["top_ops"]]
    assert "aten::convolution_backward" in ops
    assert sum(row["share"] for row in profile["top_ops"]) <= 1.0
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--profile", "+nothing"])
    assert "unknown setting in --settings or --profile: +nothing" in capsys.readouterr().err


def test_device_busy_time_is_the_union_of_kernel_intervals():
    from pretrain_throughput import _covered

    assert _covered([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.8)]) == 4.0
    assert _covered([]) == 0.0
