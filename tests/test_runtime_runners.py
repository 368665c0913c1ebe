"""Runners: lifecycle, input validation, backend choice, provider fallback, comparator."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from edge_ssl.runtime import backends as runner_module
from edge_ssl.runtime.backends import available_backends, open_runner
from edge_ssl.runtime.compare import compare_outputs, compare_runners
from edge_ssl.runtime.embed import embed_with_runner
from edge_ssl.runtime.errors import ProviderFallbackWarning, RunnerError
from edge_ssl.runtime.export import export_encoder_onnx
from edge_ssl.runtime.ort import OrtRunner
from edge_ssl.runtime.runner import BACKENDS, Runner, TensorSpec
from edge_ssl.runtime.torch_runner import GraphCache, TorchRunner

from edge_ssl.bundle import Bundle, lineage_entry, write_encoder_bundle
from edge_ssl.errors import BundleError, ConfigError
from tests.conftest import COSINE_MIN


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Bundle]:
    """A float bundle without ONNX and the same encoder with model.onnx (no parity run: fast)."""
    import torch

    from edge_ssl.models import create_encoder

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("runners")
    encoder = create_encoder("resnet18_cifar", width=0.25).eval()
    onnx_path = export_encoder_onnx(encoder, root / "model.onnx")
    plain = write_encoder_bundle(root / "plain.edge", encoder, lineage=(lineage_entry("test", {}),))
    exported = write_encoder_bundle(root / "x.edge", encoder, lineage=(lineage_entry("test", {}),),
                                    extra_files={"model.onnx": onnx_path})
    return {"plain": plain, "exported": exported, "onnx": onnx_path}


def _batch(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32), dtype=np.float32)


def test_ort_runner_lifecycle_and_info(bundles):
    runner = OrtRunner(bundles["onnx"], threads=1)
    with pytest.raises(RunnerError, match="needs an active runner"):
        runner.infer(_batch())
    with runner:
        out = runner.infer(_batch(3))
        assert out.shape == (3, 128) and out.dtype == np.float32
        assert runner.last_compute_ms is not None and runner.last_compute_ms > 0
        info = runner.info
        assert info["backend"] == "ort" and info["providers"] == ["CPUExecutionProvider"]
        assert info["threads"] == 1 and "onnxruntime" in info["versions"]
        with pytest.raises(RunnerError, match="already active"):
            runner.activate()
    assert not runner.is_active


@pytest.mark.parametrize(
    ("batch", "found"),
    [
        (np.zeros((2, 3, 32, 32), np.float64), "float64"),
        (np.zeros((2, 3, 24, 24), np.float32), r"\(2, 3, 24, 24\)"),
        (np.zeros((3, 32, 32), np.float32), r"\(3, 32, 32\)"),
        ([[0.0]], "list"),
    ],
)
def test_wrong_input_names_expected_and_found(bundles, batch, found):
    with OrtRunner(bundles["onnx"]) as runner, pytest.raises(RunnerError) as err:
        runner.infer(batch)
    assert "images: float32 (N, 3, 32, 32)" in str(err.value)
    assert pytest.importorskip("re").search(found, str(err.value))


def test_truncated_and_foreign_onnx_files_are_refused_clearly(bundles, tmp_path):
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(bundles["onnx"].read_bytes()[:300])
    with pytest.raises(RunnerError, match="cannot load .*truncated, not an ONNX model"):
        OrtRunner(truncated).activate()
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    with pytest.raises(RunnerError, match="5 bytes, starts with b'hello'"):
        OrtRunner(text).activate()
    from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, InputSpec

    other = InputSpec(shape=(3, 64, 64), mean=CIFAR_MEAN, std=CIFAR_STD)
    with pytest.raises(RunnerError, match=r"does not fit its bundle.*\(N, 3, 64, 64\)"):
        OrtRunner(bundles["onnx"], input_spec=other).activate()
    with pytest.raises(RunnerError, match="does not exist"):
        OrtRunner(tmp_path / "missing.onnx").activate()


def test_a_provider_that_is_not_installed_is_an_error(bundles):
    with pytest.raises(RunnerError, match="has no CUDAExecutionProvider.*onnxruntime-gpu"):
        OrtRunner(bundles["onnx"], providers=["cuda", "cpu"]).activate()


def test_silent_fallback_to_cpu_is_warned_loudly(bundles, monkeypatch):
    import onnxruntime

    real = onnxruntime.get_available_providers()
    # onnxruntime-gpu without its CUDA libraries lists CUDA but quietly runs on CPU.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    runner = OrtRunner(bundles["onnx"], providers=["cuda", "cpu"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # onnxruntime's own note
        with pytest.warns(ProviderFallbackWarning, match="DROPPED .*CUDAExecutionProvider"):
            runner.activate()
    assert runner.info["fallback"] == ["CUDAExecutionProvider"]
    runner.deactivate()
    strict = OrtRunner(bundles["onnx"], providers=["cuda", "cpu"], strict_providers=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(RunnerError, match="NOT the requested provider"):
            strict.activate()


def test_torch_and_ort_agree_and_compare_reports_it(bundles):
    torch_runner = TorchRunner(bundles["plain"], threads=1)
    ort_runner = OrtRunner(bundles["onnx"], threads=1)
    result = compare_runners(torch_runner, ort_runner, [_batch(2), _batch(3)])
    assert result.samples == 5 and result.min_cosine >= COSINE_MIN and result.max_abs < 1e-3
    assert not torch_runner.is_active and not ort_runner.is_active
    assert result.reference.startswith("torch") and result.candidate.startswith("ort")


def test_compare_outputs_math():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    result = compare_outputs(ref, np.array([[0.0, 1.0], [0.0, 2.0]]))
    assert result.min_cosine == pytest.approx(0.0) and result.mean_cosine == pytest.approx(0.5)
    assert result.max_abs == 1.0 and result.max_rel == pytest.approx(0.5)
    both_zero = compare_outputs(np.zeros((2, 2)), np.zeros((2, 2)))
    assert both_zero.min_cosine == 0.0 and both_zero.zero_rows == 2 and not both_zero.passed(0.5)
    assert "all-zero" in both_zero.describe()
    assert compare_outputs(ref, np.array([[np.nan, 0.0], [0.0, 2.0]])).min_cosine == float("-inf")
    with pytest.raises(RunnerError, match=r"shape \(2, 2\).*\(2, 3\)"):
        compare_outputs(ref, np.zeros((2, 3)))


def test_open_runner_auto_picks_ort_for_exported_and_torch_otherwise(bundles):
    assert isinstance(open_runner(bundles["exported"]), OrtRunner)
    assert isinstance(open_runner(bundles["plain"]), TorchRunner)
    assert isinstance(open_runner(str(bundles["onnx"])), OrtRunner)
    assert isinstance(open_runner(bundles["exported"].path, "torch"), TorchRunner)


def test_ort_on_a_bundle_without_onnx_says_to_export(bundles):
    with pytest.raises(BundleError, match="runs model.onnx, but .* has none.*edge-ssl export"):
        open_runner(bundles["plain"], "ort")


def test_unknown_backend_suggests_the_nearest(bundles):
    with pytest.raises(ConfigError, match="Did you mean 'tensorrt'"):
        open_runner(bundles["plain"], "tensorrtt")


def test_available_backends_explains_each_missing_one():
    found = available_backends()
    assert list(found) == list(BACKENDS)
    assert found["ort"] is None and found["torch"] is None
    for name, why in found.items():
        assert why is None or len(why) > 20, name


def test_auto_with_no_usable_backend_lists_every_reason(bundles, monkeypatch):
    monkeypatch.setitem(runner_module._CHECKS, "ort", lambda: "onnxruntime is not installed")
    monkeypatch.setitem(runner_module._CHECKS, "torch", lambda: "torch is not installed")
    with pytest.raises(RunnerError, match=r"(?s)no backend can run.*ort: onnxruntime is not installed.*torch: torch is not installed"):
        open_runner(bundles["exported"])


def test_torch_fp16_or_cuda_graphs_on_cpu_are_refused(bundles):
    with pytest.raises(RunnerError, match="needs a CUDA device"):
        TorchRunner(bundles["plain"], device="cpu", precision="fp16")
    with pytest.raises(RunnerError, match="needs a CUDA device"):
        TorchRunner(bundles["plain"], device="cpu", cuda_graphs=True)


class _FakeTensor:
    def __init__(self, shape):
        self.shape = shape
        self.value = None

    def copy_(self, other):
        self.value = other


def test_graph_cache_captures_once_per_shape_and_stays_bounded():
    captured = []

    def capture(shape):
        static_in, static_out = _FakeTensor(shape), _FakeTensor(shape)
        captured.append(shape)
        return static_in, lambda: setattr(static_out, "value", static_in.value * 2), static_out

    cache = GraphCache(capture, max_graphs=2)
    assert cache.run(np.ones((1, 3))).value.sum() == 6
    assert cache.run(np.full((1, 3), 2.0)).value.sum() == 12  # replayed with new input
    cache.run(np.ones((4, 3)))
    cache.run(np.ones((8, 3)))
    assert captured == [(1, 3), (4, 3), (8, 3)]
    assert set(cache.graphs) == {(4, 3), (8, 3)}


class _StaticRunner(Runner):
    """A static-batch engine stand-in: doubles the mean of each sample."""

    backend = "fake"

    def _activate(self):
        self._specs = (TensorSpec("images", (4, 3, 32, 32)),)
        self._info["normalization"] = "outside"

    def _deactivate(self):
        pass

    def _infer(self, batch):
        return np.repeat(batch.reshape(len(batch), -1).mean(axis=1, keepdims=True), 2, axis=1)


def test_embed_pads_static_batches_and_drops_the_padding(tiny_spec):
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    runner = _StaticRunner()
    out = embed_with_runner(runner, images, tiny_spec.input, batch_size=256)
    assert out.shape == (6, 2) and not runner.is_active
    with runner:
        with pytest.raises(RunnerError, match="fixed at 4"):
            runner.infer(np.zeros((2, 3, 32, 32), np.float32))
