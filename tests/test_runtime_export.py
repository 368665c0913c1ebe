"""ONNX export: a clean graph, parity against torch in the manifest, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from edge_ssl.runtime import export as export_module
from edge_ssl.runtime.embed import embed_with_runner, sample_images
from edge_ssl.runtime.errors import ParityError
from edge_ssl.runtime.export import (
    TRAINING_OPS,
    ParityReport,
    check_parity,
    export_bundle,
    graph_op_counts,
)
from edge_ssl.runtime.ort import OrtRunner

from edge_ssl.bundle import Bundle, lineage_entry, write_encoder_bundle
from edge_ssl.errors import BundleError, ConfigError, MissingDependencyError
from tests.conftest import PROJECT_ROOT

TEACHER = PROJECT_ROOT.parent / "shared" / "teachers" / "simclr_resnet18_cifar.edge"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Bundle:
    import torch

    from edge_ssl.models import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.25)
    # Non-trivial BN statistics so folding them into the convs is actually exercised.
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("export") / "tiny.edge"
    return write_encoder_bundle(out, encoder, lineage=(lineage_entry("test", {}),))


@pytest.fixture(scope="module")
def exported(tiny_bundle) -> Bundle:
    return export_bundle(tiny_bundle, tiny_bundle.path.with_name("tiny_x.edge")).bundle


def test_export_writes_a_clean_checked_graph_with_parity_in_the_manifest(tiny_bundle, exported):
    assert exported.has("model.onnx") and exported.has("model.pt")
    ops = graph_op_counts(exported.file("model.onnx"))
    assert not set(ops) & set(TRAINING_OPS), f"leftover training ops: {ops}"
    assert ops.get("Conv", 0) > 0
    info = exported.manifest.metrics["export"]
    assert info["parity"]["passed"] and info["parity"]["min_cosine"] >= 0.9999
    assert info["normalization"] == "outside" and info["opset"] == 17
    stage = exported.manifest.lineage[-1]
    assert stage.stage == "export" and stage.parent == tiny_bundle.manifest_sha256
    assert Bundle.open(exported.path).manifest_sha256 == exported.manifest_sha256


def test_exported_graph_has_a_dynamic_batch_axis(exported):
    with OrtRunner(exported.file("model.onnx"), input_spec=exported.manifest.input) as runner:
        spec = runner.input_specs()["images"]
        assert spec.shape == (None, 3, 32, 32)
        for batch in (1, 5):
            out = runner.infer(np.zeros((batch, 3, 32, 32), np.float32))
            assert out.shape == (batch, exported.manifest.embed_dim)


def test_fp16_export_keeps_float32_io_and_has_its_own_parity(tiny_bundle, tmp_path):
    result = export_bundle(tiny_bundle, tmp_path / "fp16.edge", fp16=True).bundle
    parity = result.manifest.metrics["export"]["parity"]
    assert result.manifest.precision == "fp16"
    assert parity["precision"] == "fp16" and parity["min_cosine"] >= 0.999
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(result.file("model.onnx"))).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)


def test_baked_normalization_takes_raw_pixels_and_gives_the_same_embeddings(tiny_bundle, exported, tmp_path):
    baked = export_bundle(tiny_bundle, tmp_path / "baked.edge", bake_normalization=True).bundle
    assert baked.manifest.metrics["export"]["normalization"] == "baked"
    images = sample_images(limit=8)
    spec = tiny_bundle.manifest.input
    outside = embed_with_runner(OrtRunner(exported.file("model.onnx")), images, spec)
    inside_runner = OrtRunner(baked.file("model.onnx"))
    inside = embed_with_runner(inside_runner, images, spec)
    np.testing.assert_allclose(inside, outside, atol=1e-4)


def test_a_parity_failure_names_output_and_numbers_and_writes_nothing(tiny_bundle, tmp_path, monkeypatch):
    failing = ParityReport("embeddings", "fp32", 0.5, 0.4, 0.71, 0.9, 64, 0.9999, 1e-3)
    monkeypatch.setattr(export_module, "check_parity", lambda *a, **k: failing)
    out = tmp_path / "bad.edge"
    with pytest.raises(ParityError, match=r"'embeddings'.*min cosine 0\.710000.*max_rel 0\.4"):
        export_bundle(tiny_bundle, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_check_parity_catches_a_graph_from_other_weights(tiny_bundle, exported):
    import torch

    from edge_ssl.models import load_encoder

    encoder = load_encoder(tiny_bundle)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    report = check_parity(encoder, exported.file("model.onnx"), sample_images(limit=8), tiny_bundle.manifest.input)
    assert not report.passed
    with pytest.raises(ParityError, match="parity check failed"):
        export_module.require_parity(report, "test")


def test_refusals_happen_before_any_export(tiny_bundle, exported, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("export ran")

    monkeypatch.setattr(export_module, "export_encoder_onnx", boom)
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(tiny_bundle, exported.path)
    with pytest.raises(ConfigError, match="opset 9"):
        export_bundle(tiny_bundle, tmp_path / "o.edge", opset=9)
    with pytest.raises(ConfigError, match="exporter must be one of"):
        export_bundle(tiny_bundle, tmp_path / "o.edge", exporter="jit")
    int8 = _bundle_without_weights(exported, tmp_path / "int8.edge")
    with pytest.raises(BundleError, match="needs float weights"):
        export_bundle(int8, tmp_path / "o.edge")


def _bundle_without_weights(source: Bundle, out: Path) -> Bundle:
    from edge_ssl.bundle import BundleWriter

    with BundleWriter(out) as writer:
        writer.copy_file("model.onnx", source.file("model.onnx"))
        return writer.commit(name="int8", encoder=source.manifest.encoder,
                             lineage=source.child_lineage("quantize", {}), precision="int8")


def test_dynamo_exporter_without_onnxscript_says_what_to_install(tiny_bundle, tmp_path):
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("onnxscript is installed here")
    with pytest.raises(MissingDependencyError, match="onnxscript"):
        export_bundle(tiny_bundle, tmp_path / "d.edge", exporter="dynamo", opset=18)
    assert not (tmp_path / "d.edge").exists()


@pytest.mark.slow
def test_the_real_teacher_exports_with_parity_and_runs_on_torch_and_ort(tmp_path):
    if not (TEACHER / "manifest.json").is_file():
        pytest.skip(f"teacher bundle not found at {TEACHER} (see ../shared/teachers/README.md)")
    from edge_ssl.runtime.compare import compare_bundles

    before = json.loads((TEACHER / "manifest.json").read_text())
    result = export_bundle(TEACHER, tmp_path / "teacher_x.edge").bundle
    assert result.manifest.metrics["export"]["parity"]["min_cosine"] >= 0.9999
    comparison = compare_bundles(result.path, result.path, backend_a="torch", backend_b="ort", limit=16)
    assert comparison.min_cosine >= 0.9999
    assert json.loads((TEACHER / "manifest.json").read_text()) == before
