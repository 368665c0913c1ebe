"""Roofline latency prediction: always labelled predicted, ordered sensibly, refined by measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edge_ssl.devices.predict import graph_costs, predict_bundle, predict_onnx
from edge_ssl.devices.profiles import load_toml

from edge_ssl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """Conv-ReLU-Conv-pool-Gemm at 3x32x32, batch dynamic: built with onnx.helper, no torch."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        "w2": rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        "fc": rng.standard_normal((32, 10)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["embeddings"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_flops_are_counted_per_kernel(tiny_onnx):
    costs = {c.name: c for c in graph_costs(tiny_onnx, batch=2, precision="fp16")}
    assert set(costs) == {"stem", "conv", "pool", "head"}  # ReLU and Flatten fused away
    assert costs["stem"].kind == "stem"
    assert costs["conv"].flops == 2 * 2 * 32 * 16 * 16 * 16 * 9  # N*Cout*H*W * Cin*k*k MACs x2
    padded = {c.name: c for c in graph_costs(tiny_onnx, batch=2, precision="int8", tile=32)}
    assert padded["stem"].flops == costs["stem"].flops * 32 / 3 * 32 / 16  # Cin 3 -> 32, Cout 16 -> 32
    assert costs["head"].flops == 2 * 2 * 10 * 32


def test_prediction_is_labelled_and_ordered(tiny_onnx):
    fp16 = predict_onnx(tiny_onnx, "agx-orin-64gb", precision="fp16")
    int8 = predict_onnx(tiny_onnx, "agx-orin-64gb", precision="int8")
    nano = predict_onnx(tiny_onnx, "nano-4gb", precision="fp16")
    assert fp16.kind == int8.kind == "predicted" and "PREDICTED" in fp16.summary()
    assert nano.predicted_ms > int8.predicted_ms
    big_batch = predict_onnx(tiny_onnx, "nano-4gb", precision="fp16", batch=8)
    assert big_batch.predicted_ms > nano.predicted_ms


def test_unsupported_precision_and_unknown_peaks_are_refused(tiny_onnx):
    with pytest.raises(ConfigError, match="does not support int8"):
        predict_onnx(tiny_onnx, "nano-4gb", precision="int8")
    with pytest.raises(ConfigError, match="no cited fp16 peak"):
        predict_onnx(tiny_onnx, "thor", precision="fp16")


def test_lower_power_mode_clock_is_slower_or_flagged(tiny_onnx):
    maxn = predict_onnx(tiny_onnx, "orin-nano-8gb-super", precision="int8", power_mode=2)
    capped = predict_onnx(tiny_onnx, "orin-nano-8gb", precision="int8", power_mode=0)
    assert capped.predicted_ms > maxn.predicted_ms
    unknown_clock = predict_onnx(tiny_onnx, "agx-orin-64gb", precision="int8", power_mode=1)
    assert any("not recorded" in w for w in unknown_clock.warnings)


def test_a_measurement_on_the_device_refines_the_prediction(tiny_onnx, tmp_path):
    from edge_ssl.bundle import BundleWriter, record_results
    from edge_ssl.spec import EncoderSpec, InputSpec

    spec = EncoderSpec(arch="tiny", kwargs={}, input=InputSpec(shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3),
                       embed_dim=10)
    with BundleWriter(tmp_path / "tiny.edge") as writer:
        writer.copy_file("model.onnx", tiny_onnx)
        bundle = writer.commit(name="tiny", encoder=spec, lineage=())
    plain = predict_bundle(bundle.path, "orin-nx-16gb", precision="int8")
    assert plain.refined_ms is None
    measured = {"backend": "trtexec", "environment": {"profile": "orin-nx-16gb"},
                "batches": {"1": {"mean": plain.predicted_ms * 2}}}
    record_results(bundle, "device_bench", {"ssh://nx": measured})
    refined = predict_bundle(bundle.path, "orin-nx-16gb", precision="int8")
    assert refined.refined_ms == pytest.approx(plain.predicted_ms * 2)
    assert refined.kind == "predicted" and refined.refined_by == ["ssh://nx"]


def test_cli_predict_json(tiny_onnx):
    from typer.testing import CliRunner

    from edge_ssl.cli import app

    out = CliRunner().invoke(app, ["predict", str(tiny_onnx), "--for", "orin-nx-16gb", "--precision", "int8", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["kind"] == "predicted"


def test_published_anchors_cover_enough_devices_with_sources():
    anchors = load_toml(ROOT / "devices" / "anchors.toml")["anchor"]
    assert len(anchors) >= 40 and len({a["device"] for a in anchors}) >= 6
    assert {a["precision"] for a in anchors} == {"fp16", "int8"}
    assert all(a["source"] and a["source_id"] and a["published_ms"] > 0 for a in anchors)
    assert {a["timing"] for a in anchors} <= {"gpu_compute", "end_to_end"}


def _tiny_bundle(tiny_onnx: Path, root: Path):
    from edge_ssl.bundle import BundleWriter
    from edge_ssl.spec import EncoderSpec, InputSpec

    spec = EncoderSpec(arch="tiny", kwargs={}, input=InputSpec(shape=(3, 32, 32), mean=(0.5,) * 3,
                                                               std=(0.5,) * 3), embed_dim=10)
    with BundleWriter(root / "tiny.edge") as writer:
        writer.copy_file("model.onnx", tiny_onnx)
        return writer.commit(name="tiny", encoder=spec, lineage=())


def test_cli_predict_records_each_prediction_where_the_report_shows_it(tiny_onnx, tmp_path):
    from typer.testing import CliRunner

    from edge_ssl.bundle import read_results
    from edge_ssl.cli import app
    from edge_ssl.report.collect import collect_report

    bundle = _tiny_bundle(tiny_onnx, tmp_path)
    shown = {}
    for device, precision in (("orin-nx-16gb", "int8"), ("orin-nano-8gb", "fp16")):
        out = CliRunner().invoke(app, ["predict", str(bundle.path), "--for", device,
                                       "--precision", precision, "--json"])
        assert out.exit_code == 0, out.output
        printed = json.loads(out.stdout)
        assert printed["recorded_in"] == str(tmp_path / "tiny.edge.results.json")
        shown[(device, precision)] = printed["predicted_ms"]
    recorded = read_results(bundle)["predict"]
    assert set(recorded) == {"orin-nx-16gb int8", "orin-nano-8gb fp16"}
    assert all(entry["kind"] == "predicted" for entry in recorded.values())
    row = collect_report([bundle.path]).rows[0]
    assert not row.measured()
    assert {(r.device, r.backend): r.p50 for r in row.predicted()} == shown


def test_cli_predict_on_a_read_only_bundle_folder_still_predicts(tiny_onnx, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import edge_ssl.bundle as bundle_module
    from edge_ssl.cli import app

    bundle = _tiny_bundle(tiny_onnx, tmp_path)

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bundle_module, "atomic_write_bytes", read_only)
    out = CliRunner().invoke(app, ["predict", str(bundle.path), "--for", "orin-nx-16gb"])
    assert out.exit_code == 0, out.output
    assert "PREDICTED" in out.stdout and "recorded in" not in out.stdout
    assert "prediction was not recorded" in out.stderr and "Permission denied" in out.stderr
    assert not (tmp_path / "tiny.edge.results.json").exists()


def test_interval_holds_the_estimate_and_is_wider_where_uncalibrated(tiny_onnx):
    fitted = predict_onnx(tiny_onnx, "xavier-nx", precision="fp16")
    uncalibrated = predict_onnx(tiny_onnx, "xavier-nx", precision="fp32")
    for p in (fitted, uncalibrated):
        low, high = p.interval_ms
        assert low < p.predicted_ms < high
    assert fitted.calibration.startswith("fitted") and uncalibrated.calibration == "uncalibrated"
    assert any("UNCALIBRATED" in w for w in uncalibrated.warnings)
    width = {p.calibration: p.interval_ms[1] / p.interval_ms[0] for p in (fitted, uncalibrated)}
    assert width["uncalibrated"] > width[fitted.calibration]


def test_the_launch_floor_does_not_halve_with_int8(tiny_onnx):
    fp16 = predict_onnx(tiny_onnx, "orin-nano-8gb", precision="fp16", use_local=False)
    int8 = predict_onnx(tiny_onnx, "orin-nano-8gb", precision="int8", use_local=False)
    assert fp16.launch_bound_share > 0.5  # a 32x32 graph is launch-bound on an Orin
    assert int8.predicted_ms > 0.75 * fp16.predicted_ms
    assert "launch-bound on this board" in fp16.summary()


def test_cli_json_carries_interval_share_and_calibration(tiny_onnx):
    from typer.testing import CliRunner

    from edge_ssl.cli import app

    out = CliRunner().invoke(app, ["predict", str(tiny_onnx), "--for", "agx-orin-64gb", "--precision",
                                   "fp16", "--json"])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.stdout)
    assert printed["kind"] == "predicted" and printed["calibration"]
    low, high = printed["interval_ms"]
    assert low < printed["predicted_ms"] < high and 0 < printed["launch_bound_share"] <= 1


def test_cli_for_unknown_profile_lists_the_known_ones_and_device_names_for(tiny_onnx, capsys):
    from edge_ssl.cli import main

    with pytest.raises(SystemExit) as unknown:
        main(["predict", str(tiny_onnx), "--for", "orin-nanoo-8gb"])
    said = capsys.readouterr().err
    assert unknown.value.code == 1
    assert "did you mean 'orin-nano-8gb'" in said.lower() and "agx-orin-64gb" in said
    with pytest.raises(SystemExit) as old:
        main(["predict", str(tiny_onnx), "--device", "orin-nx-16gb"])
    assert old.value.code == 1 and "--for orin-nx-16gb" in capsys.readouterr().err


def test_calibrate_writes_a_local_file_that_later_predictions_use(tiny_onnx, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edge_ssl.cli import app

    local = tmp_path / "config" / "predict_calibration.toml"
    monkeypatch.setenv("EDGE_SSL_PREDICT_CALIBRATION", str(local))
    shipped = predict_onnx(tiny_onnx, "orin-nx-16gb", precision="fp16")
    measurements = tmp_path / "measured.json"
    measurements.write_text(json.dumps([
        {"onnx": str(tiny_onnx), "profile": "orin-nx-16gb", "precision": "fp16", "batch": 1,
         "mean_ms": shipped.predicted_ms * 3},
    ]))
    out = CliRunner().invoke(app, ["predict", "--calibrate", str(measurements)])
    assert out.exit_code == 0, out.output
    assert local.is_file()
    later = predict_onnx(tiny_onnx, "orin-nx-16gb", precision="fp16")
    assert later.predicted_ms == pytest.approx(shipped.predicted_ms * 3, rel=1e-3)
    assert later.calibration.startswith("local") and str(local) in later.calibration
    other_board = predict_onnx(tiny_onnx, "agx-orin-64gb", precision="fp16")
    assert not other_board.calibration.startswith("local")


def test_swish_is_a_kernel_of_its_own_but_relu_folds_into_the_conv(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((16, 16, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["images", "w"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w"], ["c2"], pads=[1] * 4, name="conv2"),
             helper.make_node("Sigmoid", ["c2"], ["s"], name="swish"),
             helper.make_node("Mul", ["c2", "s"], ["out"])]
    graph = helper.make_graph(nodes, "swish", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                             [1, 16, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16, 32, 32])], [w])
    path = tmp_path / "swish.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    costs = graph_costs(path, precision="fp16")
    assert [c.kind for c in costs] == ["conv", "conv", "eltwise"]
    assert costs[2].bytes >= 2 * (16 * 32 * 32) * 2  # it streams the activation in and out (FP16)
