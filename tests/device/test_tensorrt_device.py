"""TensorRT on a real Jetson: build (Python API and trtexec), DLA, run, compare with ORT.

Run on the device: `pytest -m jetson tests/device/test_tensorrt_device.py`.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
from edge_ssl.runtime.backends import open_runner
from edge_ssl.runtime.embed import embed_with_runner, sample_images
from edge_ssl.runtime.export import export_bundle
from edge_ssl.runtime.ort import OrtRunner

from edge_ssl.bundle import Bundle, lineage_entry, write_encoder_bundle
from tests.conftest import COSINE_MIN

pytestmark = pytest.mark.jetson


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory) -> Bundle:
    pytest.importorskip("torch", reason="export needs torch on the device (JetPack's PyTorch wheel)")
    import torch

    from edge_ssl.models import create_encoder

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("jetson")
    plain = write_encoder_bundle(root / "s.edge", create_encoder("resnet18_cifar", width=0.25),
                                 lineage=(lineage_entry("test", {}),))
    return export_bundle(plain, root / "s_fp16.edge", fp16=True).bundle


def _check_against_ort(bundle: Bundle, engine_runner) -> None:
    images = sample_images(limit=32)
    spec = bundle.manifest.input
    reference = embed_with_runner(OrtRunner(bundle.file("model.onnx")), images, spec)
    assert _cosine(reference, embed_with_runner(engine_runner, images, spec, batch_size=8)) >= COSINE_MIN


def test_python_api_engine_on_the_gpu(fp16_bundle, tmp_path):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("JetPack's python3-libnvinfer (tensorrt) is not importable in this environment")
    from edge_ssl.runtime.build import build_bundle

    built = build_bundle(fp16_bundle, tmp_path / "gpu.edge", precision="fp16", batch=(1, 8, 8),
                         workspace_mb=512, timing_cache=tmp_path / "timing.cache")
    _check_against_ort(built, open_runner(built, "tensorrt"))


def test_dla_engine_with_gpu_fallback(fp16_bundle, tmp_path):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not importable")
    import tensorrt as trt

    if trt.Builder(trt.Logger()).num_DLA_cores == 0:
        pytest.skip("this Jetson has no DLA (Orin Nano, TX2, Nano)")
    from edge_ssl.runtime.build import build_bundle

    built = build_bundle(fp16_bundle, tmp_path / "dla.edge", precision="fp16", dla_core=0, batch=(1, 8, 8))
    info = next(iter(built.manifest.metrics["engines"].values()))
    assert info["dla_core"] == 0 and info["dla_fallback_layers"] >= 0
    _check_against_ort(built, open_runner(built, "tensorrt"))


def test_trtexec_engine(fp16_bundle, tmp_path):
    from edge_ssl.runtime.trtexec import JETPACK_TRTEXEC

    if shutil.which("trtexec") is None and shutil.which(JETPACK_TRTEXEC) is None:
        pytest.skip(f"trtexec not found on PATH or at {JETPACK_TRTEXEC}")
    from edge_ssl.runtime.build import build_bundle

    built = build_bundle(fp16_bundle, tmp_path / "trtexec.edge", precision="fp16", batch=(1, 8, 8), use_trtexec=True)
    assert next(iter(built.manifest.metrics["engines"].values()))["tool"] == "trtexec"
    if importlib.util.find_spec("tensorrt") is not None:
        _check_against_ort(built, open_runner(built, "tensorrt"))


def test_bench_records_jetson_power_mode(fp16_bundle):
    from edge_ssl.runtime.bench import bench_bundle

    report = bench_bundle(fp16_bundle, "ort", batch_sizes=(1,), iterations=20, warmup_s=0.5, record=False)
    assert "jetson" in report.environment and report.environment["jetson"].get("model")
