"""INT8 QDQ per target, accuracy-aware fallback, FP16 graphs, the calibration protocol."""

from __future__ import annotations

import numpy as np
import pytest
from edge_ssl.compress.calibration import ImageCalibrationReader
from edge_ssl.compress.quantize import QuantizeConfig, QuantizeError, quantize

from edge_ssl.bundle import Bundle
from edge_ssl.errors import ConfigError, DataError
from tests.test_compress_fixtures import tiny_images, write_tiny_bundle


@pytest.fixture(scope="module")
def teacher_bundle(tmp_path_factory):
    """A tiny ResNet-18 (width 0.25) teacher bundle."""
    return write_tiny_bundle(tmp_path_factory.mktemp("teacher") / "teacher.edge")


def _zero_point_types(path) -> dict[str, set[int]]:
    import onnx

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, set[int]] = {"activation": set(), "weight": set()}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            found["activation"].add(inits[node.input[2]].data_type)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            found["weight"].add(inits[node.input[0]].data_type)
    return found


def test_ort_cpu_int8_is_u8s8_and_close_to_fp32(teacher_bundle, tmp_path):
    import onnx

    quantized = quantize(teacher_bundle.path, QuantizeConfig(calibration_images=32),
                         tiny_images(32), tmp_path / "q.edge")
    bundle, report = quantized.bundle, quantized.report
    assert set(bundle.manifest.files) == {"model.onnx"} and bundle.manifest.precision == "int8"
    assert bundle.manifest.lineage[-1].stage == "quantize"
    assert bundle.manifest.lineage[-1].parent == teacher_bundle.manifest_sha256
    types = _zero_point_types(bundle.file("model.onnx"))
    assert types["activation"] == {onnx.TensorProto.UINT8}
    assert onnx.TensorProto.INT8 in types["weight"]
    assert report.mean_cosine > 0.98 and report.fallback_layers == []
    assert bundle.file("model.onnx").stat().st_size < 0.5 * teacher_bundle.manifest.files["model.pt"].bytes
    assert Bundle.open(tmp_path / "q.edge").manifest.metrics["quantize"]["target"] == "ort-cpu"


def test_tensorrt_int8_is_symmetric_with_qdq_on_residual_adds(teacher_bundle, tmp_path):
    import onnx
    from onnx import numpy_helper

    quantized = quantize(teacher_bundle.path, QuantizeConfig(target="tensorrt", calibration_images=16),
                         tiny_images(16), tmp_path / "t.edge")
    bundle = quantized.bundle
    model = onnx.load(str(bundle.file("model.onnx")))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert adds and all(producers.get(i) == "DequantizeLinear" for n in adds for i in n.input)


def test_fallback_keeps_sensitive_layers_float_and_says_how_close(teacher_bundle, tmp_path):
    config = QuantizeConfig(calibration_images=16, min_cosine=1.0, max_fallback=2, sensitivity_images=8)
    with pytest.raises(QuantizeError, match="target not met.*mean cosine") as info:
        quantize(teacher_bundle.path, config, tiny_images(16), tmp_path / "f.edge")
    report = info.value.report
    assert not report.met and "target not met" in report.message
    assert 1 <= len(report.fallback_layers) <= 2
    assert report.sensitivity and report.sensitivity[0]["mean_cosine"] <= report.sensitivity[-1]["mean_cosine"]
    assert len(report.trials) == 3  # all-int8, then one and two layers kept float
    assert not (tmp_path / "f.edge").exists()  # a missed threshold writes nothing


def test_a_reachable_threshold_writes_the_graph_with_its_fallback(teacher_bundle, tmp_path):
    config = QuantizeConfig(calibration_images=16, min_cosine=0.5, max_fallback=2, sensitivity_images=8)
    quantized = quantize(teacher_bundle.path, config, tiny_images(16), tmp_path / "f.edge")
    bundle, report = quantized.bundle, quantized.report
    assert report.met and report.mean_cosine >= 0.5
    assert bundle.manifest.metrics["quantize"]["fallback_layers"] == report.fallback_layers
    assert bundle.manifest.metrics["output_check"]["effective_rank"] > 1.5


def test_fp16_graph(teacher_bundle, tmp_path):
    quantized = quantize(teacher_bundle.path, QuantizeConfig(precision="fp16", calibration_images=8),
                         tiny_images(8), tmp_path / "h.edge")
    bundle, report = quantized.bundle, quantized.report
    assert bundle.manifest.precision == "fp16" and report.mean_cosine > 0.99


def test_bad_calibration_data_and_settings_write_nothing(teacher_bundle, tmp_path):
    with pytest.raises(DataError, match="at least 16"):
        quantize(teacher_bundle.path, QuantizeConfig(), tiny_images(4), tmp_path / "a.edge")
    with pytest.raises(DataError, match="64x64"):
        quantize(teacher_bundle.path, QuantizeConfig(), np.zeros((32, 64, 64, 3), np.uint8), tmp_path / "b.edge")
    with pytest.raises(DataError, match="uint8"):
        quantize(teacher_bundle.path, QuantizeConfig(), np.zeros((32, 32, 32, 3), np.float32), tmp_path / "c.edge")
    with pytest.raises(ConfigError, match="target"):
        QuantizeConfig(target="tensorrt-ish")
    with pytest.raises(QuantizeError, match="eval"):
        quantize(teacher_bundle.path, QuantizeConfig(max_knn_drop=1.0), tiny_images(16), tmp_path / "d.edge")
    assert not list(tmp_path.iterdir())


def test_calibration_reader_protocol(teacher_bundle):
    # Equal batches (at most batch_size) that use every image: 20 = 4 x 5.
    reader = ImageCalibrationReader(tiny_images(20), teacher_bundle.manifest.input, batch_size=8)
    sizes = []
    while (item := reader.get_next()) is not None:
        sizes.append(item["images"].shape[0])
        assert item["images"].dtype == np.float32 and item["images"].shape[1:] == (3, 32, 32)
    assert sizes == [5, 5, 5, 5] and len(reader) == 4
    reader.rewind()
    assert reader.get_next()["images"].shape[0] == 5
    assert [b.shape[0] for b in reader] == [5, 5, 5, 5]


@pytest.mark.parametrize("count", [16, 17, 32, 40, 300, 257])
def test_calibration_batches_are_equal_and_use_every_image(count):
    from edge_ssl.compress.calibration import even_batch_size

    size = even_batch_size(count)
    assert 1 <= size <= 32 and count % size == 0


@pytest.mark.parametrize(("method", "count"), [("percentile", 100), ("entropy", 40)])
def test_histogram_calibration_takes_a_count_that_is_not_a_multiple_of_its_batch(
        teacher_bundle, tmp_path, method, count):
    # The user's report: percentile with 300 images failed with "setting an array element
    # with a sequence" (a ragged last batch of 12); 256 worked.
    config = QuantizeConfig(calibration=method, calibration_images=count)
    quantized = quantize(teacher_bundle.path, config, tiny_images(count), tmp_path / "q.edge")
    bundle, report = quantized.bundle, quantized.report
    assert bundle.manifest.lineage[-1].settings["calibration_images_used"] == count
    assert report.mean_cosine > 0.98


def test_calibration_settings_are_checked_from_counts_alone():
    from edge_ssl.compress.quantize import check_calibration_settings

    assert check_calibration_settings(QuantizeConfig(calibration="percentile", calibration_images=512), 300) == 300
    assert check_calibration_settings(QuantizeConfig(calibration="entropy", calibration_images=17), 300) == 17
    assert check_calibration_settings(QuantizeConfig(precision="fp16"), 1) == 1
    with pytest.raises(ConfigError, match="--calibration-images 16"):
        check_calibration_settings(QuantizeConfig(calibration_images=8), 10)
    with pytest.raises(DataError, match="at least 16 images; got 10"):
        check_calibration_settings(QuantizeConfig(calibration="entropy"), 10)


def test_ort_cpu_uses_seven_bit_weights_only_on_x86_without_vnni(monkeypatch):
    import platform

    from edge_ssl.compress.quantize import ORT_CPU, TENSORRT, uses_reduce_range

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    avx2 = "flags : fpu sse avx avx2 fma"
    vnni = "flags : fpu sse avx avx2 avx512f avx512_vnni"
    assert uses_reduce_range(ORT_CPU, avx2) is True
    assert uses_reduce_range(ORT_CPU, vnni) is False
    assert uses_reduce_range(TENSORRT, avx2) is False
