"""TensorRT build/refit/naming logic against a fake `tensorrt` installed for ONE test at a time.

TensorRT cannot be installed on these machines; tests/device/ runs the real thing.
"""

from __future__ import annotations

import enum
import importlib.machinery
import json
import os
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from edge_ssl.runtime import build as build_module
from edge_ssl.runtime import tensorrt as trt_module
from edge_ssl.runtime import trtexec as trtexec_module
from edge_ssl.runtime.build import build_bundle
from edge_ssl.runtime.cuda_buffers import GpuIdentity, device_slug
from edge_ssl.runtime.errors import EngineError
from edge_ssl.runtime.tensorrt import (
    BuildSettings,
    TensorRTRunner,
    build_engine,
    check_engine_compatible,
    engine_file_name,
    find_engine,
    fold_batchnorm,
    parse_engine_name,
    refit_engine,
)
from edge_ssl.runtime.trtexec import build_engine_trtexec, parse_trtexec_version

from edge_ssl.bundle import Bundle, BundleWriter, lineage_entry

HERE = GpuIdentity("nvidia-h100", 90)


# ---------------------------------------------------------------- the fake module
def fake_tensorrt(version: str = "10.3.0", dla_cores: int = 0, parse_ok: bool = True,
                  refittable: bool = True, dla_unsupported: tuple[str, ...] = ()) -> types.ModuleType:
    """A stand-in for the TensorRT Python API that records what the code asked for."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec() callers (torch) need one
    trt.__version__ = version
    trt.calls = []
    major = int(version.split(".")[0])
    flags = ["REFIT", "GPU_FALLBACK"] + (["FP16", "INT8", "BF16"] if major < 11 else [])
    trt.BuilderFlag = enum.Enum("BuilderFlag", flags)
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    trt.DeviceType = enum.Enum("DeviceType", ["GPU", "DLA"])
    trt.TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, severity):
            self.severity = severity

    class Layer:
        def __init__(self, name):
            self.name = name

    class Tensor:
        name, shape = "images", (-1, 3, 32, 32)

    class Network:
        def __init__(self, flags):
            self.flags = flags
            self.layers = [Layer("conv1"), Layer("relu1"), Layer("pool")]
            self.num_layers = len(self.layers)

        def get_input(self, i):
            return Tensor()

        def get_layer(self, i):
            return self.layers[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (low, opt, high)

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+tuned"

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles = set(), {}, []
            self.builder_optimization_level = None
            self.default_device_type = trt.DeviceType.GPU
            self.DLA_core = -1
            self.cache = None

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def can_run_on_DLA(self, layer):  # noqa: N802 - TensorRT's name
            return layer.name not in dla_unsupported

    class Builder:
        def __init__(self, logger):
            self.num_DLA_cores = dla_cores
            trt.builder = self

        def create_network(self, flags=0):
            self.network = Network(flags)
            return self.network

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append("build")
            return b"PLAN:" + ",".join(sorted(config.flags)).encode()

    class Error:
        def __init__(self, text):
            self.text = text

        def __str__(self):
            return self.text

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse(self, data):
            return parse_ok

        def get_error(self, i):
            return Error("In node 3 (Conv): unsupported attribute")

    class Engine:
        def __init__(self, data):
            self.data = data
            self.refittable = refittable

        def serialize(self):
            return self.data + b"|refit"

    class Runtime:
        def __init__(self, logger):
            self.DLA_core = -1

        def deserialize_cuda_engine(self, data):
            trt.calls.append("deserialize")
            return Engine(data) if data.startswith(b"PLAN") else None

    class Refitter:
        def __init__(self, engine, logger):
            self.set = {}

        def get_all_weights(self):
            return ["conv1.weight", "conv1.bias"]

        def set_named_weights(self, name, weights):
            self.set[name] = weights
            return True

        def get_missing_weights(self):
            return [n for n in self.get_all_weights() if n not in self.set]

        def refit_cuda_engine(self):
            trt.calls.append("refit")
            return True

    class OnnxParserRefitter:
        def __init__(self, refitter, logger):
            self.refitter, self.num_errors = refitter, 0

        def refit_from_file(self, path):
            trt.calls.append(f"refit_from:{Path(path).name}")
            for name in self.refitter.get_all_weights():
                self.refitter.set_named_weights(name, b"")
            return True

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime, trt.Refitter = Logger, Builder, OnnxParser, Runtime, Refitter
    trt.OnnxParserRefitter = OnnxParserRefitter
    trt.Weights = lambda array: array
    return trt


@pytest.fixture
def here(monkeypatch):
    """This 'machine': an H100 (sm90) whatever TensorRT the test installs."""
    monkeypatch.setattr(trt_module, "gpu_identity", lambda device=0: HERE)
    return HERE


def _install(monkeypatch, trt: types.ModuleType) -> types.ModuleType:
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_module, "tensorrt_version", lambda: trt.__version__)
    return trt


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx-bytes")
    return path


# ---------------------------------------------------------------- names
def test_engine_names_carry_device_capability_version_and_precision():
    rel = engine_file_name("NVIDIA H100 80GB HBM3", 90, "10.3.0.26", "fp16")
    assert rel == "engines/nvidia-h100-80gb-hbm3_sm90_trt10.3.0_fp16.plan"
    name = parse_engine_name(rel)
    assert (name.device, name.sm, name.trt, name.precision, name.dla_core) == ("nvidia-h100-80gb-hbm3", 90, "10.3.0", "fp16", None)
    assert parse_engine_name(engine_file_name("Orin", 87, "10.3.0", "int8", dla_core=1)).dla_core == 1
    assert device_slug("  ") == "gpu"
    with pytest.raises(EngineError, match="not an edge-ssl engine name"):
        parse_engine_name("model.plan")


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        ("engines/orin_sm87_trt10.3.0_fp16.plan", "sm87, this GPU is sm90"),
        ("engines/nvidia-h100_sm90_trt8.6.1_fp16.plan", "TensorRT 8.6.1, this machine has TensorRT 10.3.0"),
        ("engines/nvidia-a100_sm90_trt10.3.0_fp16.plan", "'nvidia-a100', this GPU is 'nvidia-h100'"),
    ],
)
def test_an_engine_for_another_gpu_or_version_is_refused_before_tensorrt_loads_it(
    tmp_path, here, monkeypatch, rel, why
):
    trt = _install(monkeypatch, fake_tensorrt("10.3.0.30"))
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PLAN")
    with pytest.raises(EngineError, match=f"built for .*{why}.*not portable"):
        TensorRTRunner(path).activate()
    assert "deserialize" not in trt.calls
    assert check_engine_compatible(tmp_path / "engines/nvidia-h100_sm90_trt10.3.0_fp16.plan", HERE, "10.3.0.30")


def test_find_engine_picks_the_one_for_this_gpu_and_lists_the_others(tmp_path, here):
    bundle = _bundle_with(tmp_path / "b.edge", {
        "engines/orin_sm87_trt10.3.0_fp16.plan": b"PLAN",
        "engines/nvidia-h100_sm90_trt10.3.0_fp16.plan": b"PLAN",
    })
    assert find_engine(bundle, here=HERE, trt="10.3.0").name == "nvidia-h100_sm90_trt10.3.0_fp16.plan"
    with pytest.raises(EngineError, match="asked for int8.*orin_sm87.*sm87, this GPU is sm90"):
        find_engine(bundle, precision="int8", here=HERE, trt="10.3.0")


# ---------------------------------------------------------------- build
def test_tensorrt_10_build_sets_flags_pool_profile_and_timing_cache(onnx_file, tmp_path, here, monkeypatch):
    trt = _install(monkeypatch, fake_tensorrt("10.3.0"))
    cache = tmp_path / "cache" / "timing.cache"
    settings = BuildSettings(precision="fp16", workspace_mb=512, refit=True, optimization_level=4, batch=(1, 4, 16))
    result = build_engine(onnx_file, tmp_path / "out", settings, timing_cache=cache)
    assert result.path == tmp_path / "out/engines/nvidia-h100_sm90_trt10.3.0_fp16.plan"
    assert result.path.read_bytes() == b"PLAN:FP16,REFIT"
    config = trt.builder.config
    assert config.pools == {"WORKSPACE": 512 << 20} and config.builder_optimization_level == 4
    assert config.profiles[0].shapes["images"] == ((1, 3, 32, 32), (4, 3, 32, 32), (16, 3, 32, 32))
    assert trt.builder.network.flags == 0 and not result.strongly_typed
    assert cache.read_bytes() == b"+tuned"
    build_engine(onnx_file, tmp_path / "out2", settings, timing_cache=cache)
    assert cache.read_bytes() == b"+tuned+tuned"  # read back and extended


def test_tensorrt_10_builds_an_fp16_graph_strongly_typed(onnx_file, tmp_path, here, monkeypatch):
    trt = _install(monkeypatch, fake_tensorrt("10.3.0"))
    result = build_engine(onnx_file, tmp_path, BuildSettings(precision="fp16", graph_precision="fp16"))
    assert result.strongly_typed and trt.builder.network.flags == 1 << 1
    assert "FP16" not in trt.builder.config.flags


def test_tensorrt_11_takes_precision_from_the_graph(onnx_file, tmp_path, here, monkeypatch):
    trt = _install(monkeypatch, fake_tensorrt("11.4.0"))
    with pytest.raises(EngineError, match="strongly typed.*graph, which is fp32, not fp16.*--fp16"):
        build_engine(onnx_file, tmp_path, BuildSettings(precision="fp16"))
    assert "build" not in trt.calls
    result = build_engine(onnx_file, tmp_path, BuildSettings(precision="fp16", graph_precision="fp16"))
    assert result.strongly_typed and result.flags == [] and result.path.name.endswith("trt11.4.0_fp16.plan")
    assert trt.builder.network.flags == 0  # strong typing is not a flag any more


def test_dla_build_reports_layers_that_fall_back_to_the_gpu(onnx_file, tmp_path, here, monkeypatch):
    trt = _install(monkeypatch, fake_tensorrt(dla_cores=2, dla_unsupported=("pool",)))
    result = build_engine(onnx_file, tmp_path, BuildSettings(precision="fp16", dla_core=1))
    config = trt.builder.config
    assert config.default_device_type == trt.DeviceType.DLA and config.DLA_core == 1
    assert "GPU_FALLBACK" in config.flags and result.dla_fallback_layers == ["pool"]
    assert result.path.name.endswith("_fp16_dla1.plan")
    with pytest.raises(EngineError, match="DLA core 2 requested but this device has 2"):
        build_engine(onnx_file, tmp_path, BuildSettings(precision="fp16", dla_core=2))


def test_bad_settings_and_parser_errors_are_clear(onnx_file, tmp_path, here, monkeypatch):
    with pytest.raises(EngineError, match="DLA runs FP16 or INT8"):
        BuildSettings(precision="fp32", dla_core=0)
    with pytest.raises(EngineError, match="explicitly quantized"):
        BuildSettings(precision="int8", graph_precision="fp32")
    with pytest.raises(EngineError, match="min <= opt <= max"):
        BuildSettings(batch=(8, 4, 16))
    _install(monkeypatch, fake_tensorrt(parse_ok=False))
    with pytest.raises(EngineError, match="parser rejected .*In node 3 \\(Conv\\)"):
        build_engine(onnx_file, tmp_path, BuildSettings())
    assert not (tmp_path / "engines").exists()


# ---------------------------------------------------------------- refit
def _engine(tmp_path: Path) -> Path:
    path = tmp_path / "engines" / "nvidia-h100_sm90_trt10.3.0_fp16.plan"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PLAN:FP16,REFIT")
    return path


def test_refit_with_named_weights_updates_the_engine_without_a_rebuild(tmp_path, here, monkeypatch):
    trt = _install(monkeypatch, fake_tensorrt())
    path = _engine(tmp_path)
    weights = {"conv1.weight": np.ones((4, 3, 3, 3)), "conv1.bias": np.zeros(4)}
    report = refit_engine(path, weights)
    assert report.refitted == 2 and trt.calls == ["deserialize", "refit"]
    assert path.read_bytes() == b"PLAN:FP16,REFIT|refit"
    with pytest.raises(EngineError, match="needs these weights too: conv1.bias"):
        refit_engine(path, {"conv1.weight": np.ones((4, 3, 3, 3))})
    with pytest.raises(EngineError, match="no refittable weights named fc.weight"):
        refit_engine(path, {"fc.weight": np.ones(2)})


def test_refit_of_an_engine_built_without_refit_says_to_rebuild(tmp_path, here, monkeypatch):
    _install(monkeypatch, fake_tensorrt(refittable=False))
    with pytest.raises(EngineError, match="built without REFIT.*--refit"):
        refit_engine(_engine(tmp_path), {"conv1.weight": np.ones(1)})


def test_fold_batchnorm_matches_torch_conv_bn_in_eval():
    import torch

    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    w, b = fold_batchnorm(conv.weight.detach().numpy(), conv.bias.detach().numpy(), bn.running_mean.numpy(),
                          bn.running_var.numpy(), bn.weight.detach().numpy(), bn.bias.detach().numpy(), bn.eps)
    x = torch.randn(2, 3, 8, 8)
    folded = torch.nn.functional.conv2d(x, torch.from_numpy(w), torch.from_numpy(b))
    np.testing.assert_allclose(folded.numpy(), bn(conv(x)).detach().numpy(), atol=1e-5)


# ---------------------------------------------------------------- trtexec
def _fake_trtexec(tmp_path: Path, version: int = 100300, fail: bool = False) -> Path:
    script = tmp_path / "bin" / "trtexec"
    script.parent.mkdir(parents=True, exist_ok=True)
    body = f"""#!{sys.executable}
import json, sys
print("&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # " + " ".join(sys.argv))
if "--help" in sys.argv:
    sys.exit(0)
with open({str(tmp_path / 'argv.json')!r}, "w") as f:
    json.dump(sys.argv, f)
if {fail!r}:
    print("[E] Error[4]: build failed"); sys.exit(1)
plan = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--saveEngine=")][0]
open(plan, "wb").write(b"PLAN-trtexec")
"""
    script.write_text(body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_trtexec_build_uses_an_argv_list_and_names_the_engine(onnx_file, tmp_path, monkeypatch):
    _fake_trtexec(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    settings = BuildSettings(precision="fp16", workspace_mb=256, dla_core=0, refit=True)
    result = build_engine_trtexec(onnx_file, tmp_path / "out", settings, input_name="images",
                                  input_shape=(3, 32, 32), gpu=GpuIdentity("orin", 87))
    assert result.path.name == "orin_sm87_trt10.3.0_fp16_dla0.plan" and result.tool == "trtexec"
    assert result.path.read_bytes() == b"PLAN-trtexec"
    argv = json.loads((tmp_path / "argv.json").read_text())
    for flag in ("--fp16", "--useDLACore=0", "--allowGPUFallback", "--refit", "--memPoolSize=workspace:256M",
                 "--minShapes=images:1x3x32x32", "--maxShapes=images:32x3x32x32", f"--onnx={onnx_file}"):
        assert flag in argv


def test_trtexec_failure_leaves_no_partial_engine(onnx_file, tmp_path, monkeypatch):
    exe = _fake_trtexec(tmp_path, fail=True)
    with pytest.raises(EngineError, match="(?s)trtexec failed \\(exit 1\\).*build failed"):
        build_engine_trtexec(onnx_file, tmp_path / "out", BuildSettings(), input_name="images",
                             input_shape=(3, 32, 32), trtexec=exe, gpu=HERE)
    assert list((tmp_path / "out" / "engines").iterdir()) == []


def test_trtexec_versions_parse_from_the_banner():
    assert parse_trtexec_version("[TensorRT v100300] # trtexec") == "10.3.0"
    assert parse_trtexec_version("TensorRT.trtexec [TensorRT v110400]") == "11.4.0"
    assert parse_trtexec_version("[I] TensorRT version: 8.6.2") == "8.6.2"
    assert parse_trtexec_version("no banner") is None


def test_missing_trtexec_says_where_jetpack_puts_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(trtexec_module, "JETPACK_TRTEXEC", str(tmp_path / "nope"))
    with pytest.raises(EngineError, match="trtexec not found"):
        trtexec_module.find_trtexec()


# ---------------------------------------------------------------- the build stage
def _bundle_with(out: Path, files: dict[str, bytes], precision: str = "fp32") -> Bundle:
    from edge_ssl.spec import CIFAR_MEAN, CIFAR_STD, EncoderSpec, InputSpec

    spec = EncoderSpec(arch="resnet18_cifar", kwargs={"width": 0.25},
                       input=InputSpec(shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD), embed_dim=128)
    with BundleWriter(out) as writer:
        for name, data in files.items():
            writer.write_bytes(name, data)
        return writer.commit(name=out.stem, encoder=spec, lineage=(lineage_entry("test", {}),), precision=precision)


def test_build_stage_writes_a_new_bundle_with_the_engine_and_its_record(tmp_path, monkeypatch):
    exe = _fake_trtexec(tmp_path)
    parent = _bundle_with(tmp_path / "x.edge", {"model.onnx": b"onnx"}, precision="fp16")
    result = build_bundle(parent, tmp_path / "t.edge", precision="fp16", use_trtexec=True, trtexec=exe,
                          gpu=GpuIdentity("Orin", 87), timing_cache=tmp_path / "tc.cache")
    rel = "engines/orin_sm87_trt10.3.0_fp16.plan"
    assert result.has(rel) and result.has("model.onnx") and result.has(rel.replace(".plan", ".json"))
    assert result.manifest.metrics["engines"][rel]["tool"] == "trtexec"
    assert result.manifest.lineage[-1].stage == "build"
    assert "--stronglyTyped" in json.loads((tmp_path / "argv.json").read_text())  # FP16 graph
    assert sorted(parent.manifest.files) == ["model.onnx"]  # the parent is untouched


def test_build_refuses_a_bundle_without_onnx_and_an_existing_output(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("build ran")

    monkeypatch.setattr(build_module, "_run_build", boom)
    plain = _bundle_with(tmp_path / "p.edge", {"model.pt": b"weights"})
    with pytest.raises(Exception, match="build needs model.onnx.*edge-ssl export"):
        build_bundle(plain, tmp_path / "t.edge")
    exported = _bundle_with(tmp_path / "x.edge", {"model.onnx": b"onnx"})
    with pytest.raises(Exception, match="already exists"):
        build_bundle(exported, plain.path)


# ---------------------------------------------------------------- the runner's data path
class _HostBuffers:
    """DeviceBuffers stand-in backed by host memory (the fake engine 'computes' on it)."""

    backend = "fake"

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}

    def alloc(self, nbytes):
        ptr = 1000 + len(self.memory)
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def to_device(self, ptr, array):
        self.memory[ptr][: array.nbytes] = array.reshape(-1).view(np.uint8)

    def to_host(self, array, ptr):
        array.reshape(-1).view(np.uint8)[:] = self.memory[ptr][: array.nbytes]

    def stream_handle(self):
        return 7

    def mark_start(self):
        pass

    def mark_stop(self):
        pass

    def synchronize(self):
        return 0.25

    def free(self):
        self.memory.clear()


def _runnable_tensorrt(buffers: _HostBuffers) -> types.ModuleType:
    trt = fake_tensorrt("10.3.0")
    trt.DataType = enum.Enum("DataType", ["FLOAT"])
    trt.nptype = lambda dtype: np.float32

    class Context:
        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr):
            setattr(self, f"ptr_{name}", ptr)

        def execute_async_v3(self, stream):
            n = self.shape[0]
            x = buffers.memory[self.ptr_images][: n * 3 * 32 * 32 * 4].view(np.float32).reshape(n, -1)
            out = np.repeat(x.sum(axis=1, keepdims=True), 4, axis=1).astype(np.float32)
            buffers.memory[self.ptr_embeddings][: out.nbytes] = out.reshape(-1).view(np.uint8)
            return stream == 7

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ("images", "embeddings")[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "images" else trt.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return (-1, 3, 32, 32) if name == "images" else (-1, 4)

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32)]

        def create_execution_context(self):
            return Context()

    class Runtime:
        def __init__(self, logger):
            self.DLA_core = -1

        def deserialize_cuda_engine(self, data):
            return Engine()

    trt.Runtime = Runtime
    return trt


def test_tensorrt_runner_feeds_buffers_and_enforces_the_profile(tmp_path, here, monkeypatch):
    buffers = _HostBuffers()
    _install(monkeypatch, _runnable_tensorrt(buffers))
    monkeypatch.setattr(trt_module.DeviceBuffers, "create", staticmethod(lambda: buffers))
    with TensorRTRunner(_engine(tmp_path)) as runner:
        assert runner.input_specs()["images"].shape == (None, 3, 32, 32)
        batch = np.ones((3, 3, 32, 32), np.float32)
        np.testing.assert_allclose(runner.infer(batch), np.full((3, 4), 3 * 32 * 32))
        assert runner.last_compute_ms == 0.25 and runner.info["precision"] == "fp16"
        with pytest.raises(Exception, match="exceeds the engine's max batch 8"):
            runner.infer(np.ones((9, 3, 32, 32), np.float32))
    assert buffers.memory == {}


def test_refit_stage_exports_the_new_weights_like_the_engine_and_refits_it(tmp_path, here, monkeypatch):
    import torch
    from edge_ssl.runtime.build import refit_bundle
    from edge_ssl.runtime.export import export_bundle

    from edge_ssl.bundle import write_encoder_bundle
    from edge_ssl.models import create_encoder

    trt = _install(monkeypatch, fake_tensorrt())
    torch.manual_seed(0)
    lineage = (lineage_entry("test", {}),)
    base = write_encoder_bundle(tmp_path / "base.edge", create_encoder("resnet18_cifar", width=0.25), lineage=lineage)
    exported = export_bundle(base, tmp_path / "x.edge", fp16=True).bundle
    rel = "engines/nvidia-h100_sm90_trt10.3.0_fp16.plan"
    with BundleWriter(tmp_path / "t.edge") as writer:
        for name in exported.manifest.files:
            writer.copy_file(name, exported.path / name)
        writer.write_bytes(rel, b"PLAN:FP16,REFIT")
        engine_bundle = writer.commit(name="t", encoder=exported.manifest.encoder, lineage=exported.child_lineage("build", {}),
                                      precision="fp16", metrics=exported.manifest.metrics)
    adapted = write_encoder_bundle(tmp_path / "adapted.edge", create_encoder("resnet18_cifar", width=0.25), lineage=lineage)
    result = refit_bundle(engine_bundle, adapted, tmp_path / "refit.edge")
    assert result.file(rel).read_bytes() == b"PLAN:FP16,REFIT|refit"
    assert "refit_from:model.onnx" in trt.calls and "build" not in trt.calls
    assert result.manifest.metrics["export"]["fp16"] is True  # exported like the engine's graph
    assert result.file("model.pt").read_bytes() == adapted.file("model.pt").read_bytes()
    assert result.manifest.lineage[-1].stage == "refit"
    wider = write_encoder_bundle(tmp_path / "wide.edge", create_encoder("resnet18_cifar", width=0.5), lineage=lineage)
    with pytest.raises(EngineError, match="same architecture"):
        refit_bundle(engine_bundle, wider, tmp_path / "bad.edge")
    assert not (tmp_path / "bad.edge").exists()
