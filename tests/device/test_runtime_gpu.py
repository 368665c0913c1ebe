"""Runtime on a real CUDA GPU: torch FP16 + CUDA graphs, ORT CUDA, TensorRT build/run/refit.

Run on a GPU host: `pytest -m gpu tests/device/test_runtime_gpu.py` (skipped without CUDA).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from edge_ssl.runtime.backends import available_backends, open_runner
from edge_ssl.runtime.compare import compare_runners
from edge_ssl.runtime.embed import embed_with_runner, sample_images
from edge_ssl.runtime.errors import EngineError
from edge_ssl.runtime.export import export_bundle
from edge_ssl.runtime.ort import OrtRunner
from edge_ssl.runtime.torch_runner import TorchRunner

from edge_ssl.bundle import Bundle, lineage_entry, write_encoder_bundle
from tests.conftest import COSINE_MIN

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Bundle:
    import torch

    from edge_ssl.models import create_encoder

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gpu")
    plain = write_encoder_bundle(root / "s.edge", create_encoder("resnet18_cifar", width=0.25),
                                 lineage=(lineage_entry("test", {}),))
    return export_bundle(plain, root / "s_x.edge").bundle


def _inputs(bundle: Bundle) -> np.ndarray:
    from edge_ssl.runtime.preprocess import preprocess_images

    return preprocess_images(sample_images(limit=16), bundle.manifest.input)


def test_torch_cuda_fp16_with_cuda_graphs_matches_cpu(exported):
    reference = TorchRunner(exported, device="cpu")
    fast = TorchRunner(exported, device="cuda", precision="fp16", cuda_graphs=True)
    result = compare_runners(reference, fast, [_inputs(exported)[:8], _inputs(exported)[8:]])
    assert result.min_cosine >= COSINE_MIN
    with fast:
        fast.infer(_inputs(exported)[:4])
        assert fast.last_compute_ms is not None and fast.info["cuda_graphs"]


def test_ort_cuda_runs_on_the_gpu_without_falling_back(exported):
    if available_backends()["ort-cuda"] is not None:
        pytest.skip(available_backends()["ort-cuda"])
    runner = OrtRunner(exported.file("model.onnx"), providers=["cuda", "cpu"], strict_providers=True)
    result = compare_runners(OrtRunner(exported.file("model.onnx")), runner, _inputs(exported))
    assert result.min_cosine >= COSINE_MIN


@pytest.fixture(scope="module")
def engine_bundle(exported, tmp_path_factory) -> Bundle:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt is not installed (pip install 'edge-ssl[tensorrt]' on x86 GPU hosts)")
    from edge_ssl.runtime.build import build_bundle

    root = tmp_path_factory.mktemp("trt")
    fp16 = export_bundle(exported, root / "fp16.edge", fp16=True).bundle
    return build_bundle(fp16, root / "trt.edge", precision="fp16", refit=True, batch=(1, 8, 32),
                        timing_cache=root / "timing.cache")


def test_tensorrt_engine_builds_runs_and_matches_onnxruntime(engine_bundle):
    images = sample_images(limit=40)
    spec = engine_bundle.manifest.input
    ort = embed_with_runner(OrtRunner(engine_bundle.file("model.onnx")), images, spec)
    trt_runner = open_runner(engine_bundle, "tensorrt")
    trt = embed_with_runner(trt_runner, images, spec, batch_size=32)
    cosine = np.sum(ort * trt, axis=1) / (np.linalg.norm(ort, axis=1) * np.linalg.norm(trt, axis=1))
    assert cosine.min() >= COSINE_MIN
    assert open_runner(engine_bundle).backend == "tensorrt"  # auto prefers TensorRT


def test_tensorrt_refit_from_a_new_onnx_changes_the_outputs(engine_bundle, tmp_path):
    import shutil

    import torch
    from edge_ssl.runtime.export import export_encoder_onnx
    from edge_ssl.runtime.tensorrt import TensorRTRunner, find_engine, refit_engine

    from edge_ssl.models import load_encoder

    encoder = load_encoder(engine_bundle)
    with torch.no_grad():
        for p in encoder.parameters():
            p.mul_(1.5)
    new_onnx = export_encoder_onnx(encoder, tmp_path / "new.onnx", fp16=True)
    engine = tmp_path / find_engine(engine_bundle).name
    shutil.copyfile(find_engine(engine_bundle), engine)
    refit_engine(engine, new_onnx)
    batch = _inputs(engine_bundle)[:4]
    with TensorRTRunner(engine) as refitted, OrtRunner(new_onnx) as reference:
        cos = compare_runners(reference, refitted, batch).min_cosine
    assert cos >= 0.99


def test_an_engine_renamed_to_another_gpu_is_refused(engine_bundle, tmp_path):
    import shutil

    from edge_ssl.runtime.tensorrt import TensorRTRunner, find_engine

    source = find_engine(engine_bundle)
    fake = tmp_path / source.name.replace("_sm", "_sm1").replace("_trt", "_trt1")
    shutil.copyfile(source, fake)
    with pytest.raises(EngineError, match="not portable"):
        TensorRTRunner(fake).activate()
