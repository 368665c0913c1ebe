"""Adapting a bundle that carries TensorRT engines: each engine is refit with the new graph where it
was built refittable and TensorRT is here, else named for a rebuild on the device; the user is told which.

TensorRT cannot be installed here: a fake `tensorrt` (tests/test_runtime_tensorrt.py) stands in
for ONE test at a time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from edge_ssl.runtime import tensorrt as trt_module

from edge_ssl.adapt.requantize import engine_plan
from edge_ssl.bundle import Bundle, BundleWriter
from tests.test_runtime_tensorrt import HERE, fake_tensorrt

REFITTABLE = "engines/nvidia-h100_sm90_trt10.3.0_int8.plan"
FIXED = "engines/nvidia-h100_sm90_trt10.3.0_fp16.plan"  # built without REFIT


def _tensorrt(monkeypatch, *, importable: bool = True):
    """This machine is an H100; TensorRT 10.3 (fake) is importable, or nothing is."""
    monkeypatch.setattr(trt_module, "gpu_identity", lambda device=0: HERE)
    if not importable:
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
        monkeypatch.setattr(trt_module, "tensorrt_version", lambda: None)
        return None
    trt = fake_tensorrt("10.3.0")
    deserialize = trt.Runtime.deserialize_cuda_engine

    def refittable_when_built_so(self, data):  # one engine of each kind in one bundle
        engine = deserialize(self, data)
        if engine is not None:
            engine.refittable = b"REFIT" in data
        return engine

    trt.Runtime.deserialize_cuda_engine = refittable_when_built_so
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_module, "tensorrt_version", lambda: trt.__version__)
    return trt


def with_engines(bundle: Bundle, out: Path) -> Bundle:
    """``bundle`` as `edge-ssl build` leaves it: the same files plus a refittable INT8 plan and a
    plan built without REFIT (child lineage 'build')."""
    with BundleWriter(out) as writer:
        for name in bundle.manifest.files:
            writer.copy_file(name, bundle.path / name)
        writer.write_bytes(REFITTABLE, b"PLAN:INT8,REFIT")
        writer.write_bytes(FIXED, b"PLAN:FP16")
        return writer.commit(name=out.name.removesuffix(".edge"), encoder=bundle.manifest.encoder,
                             lineage=bundle.child_lineage("build", {}),
                             precision=bundle.manifest.precision, metrics=bundle.manifest.metrics)


@pytest.fixture
def deployed(tmp_path) -> Bundle:
    from tests.test_compress_fixtures import write_tiny_bundle

    return with_engines(write_tiny_bundle(tmp_path / "float.edge", width=0.125), tmp_path / "engines.edge")


@pytest.fixture
def graph(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the re-quantized graph")
    return path


def test_a_refittable_engine_is_refit_and_the_other_named_for_a_rebuild(deployed, graph, tmp_path,
                                                                         monkeypatch):
    trt = _tensorrt(monkeypatch)
    plan, files = engine_plan(deployed, graph, tmp_path / "work")
    assert plan["engine_path"] == {REFITTABLE: "refit", FIXED: "rebuild"}
    assert files[REFITTABLE].read_bytes() == b"PLAN:INT8,REFIT|refit"  # the new plan
    assert FIXED not in files  # a stale engine is never shipped
    assert "refit_from:model.onnx" in trt.calls and "build" not in trt.calls
    assert plan["engines"][REFITTABLE]["refit"] is True
    assert "built without REFIT" in plan["engines"][FIXED]
    assert json.dumps(plan)


def test_without_tensorrt_every_engine_is_named_for_a_rebuild(deployed, graph, tmp_path, monkeypatch):
    _tensorrt(monkeypatch, importable=False)
    plan, files = engine_plan(deployed, graph, tmp_path / "work")
    assert files == {}
    assert plan["engine_path"] == {REFITTABLE: "rebuild", FIXED: "rebuild"}
    assert all("tensorrt" in why.lower() and "rebuild" in why for why in plan["engines"].values())


def test_a_bundle_without_engines_has_no_engine_plan(graph, tmp_path):
    from tests.test_compress_fixtures import write_tiny_bundle

    assert engine_plan(write_tiny_bundle(tmp_path / "f.edge", width=0.125), graph, tmp_path) == ({}, {})


def test_adapting_an_int8_bundle_with_engines_says_which_were_refit(tmp_path, monkeypatch, capsys):
    from edge_ssl.cli import main
    from tests.test_adapt_resume_int8 import int8_bundle

    quantized, images = int8_bundle(tmp_path)
    deployed = with_engines(quantized, tmp_path / "engines.edge")
    np.savez(tmp_path / "local.npz", x=images)
    _tensorrt(monkeypatch)
    out = tmp_path / "adapted.edge"
    with pytest.raises(SystemExit) as done:
        main(["adapt", str(deployed.path), "--data", str(tmp_path / "local.npz"), "--out", str(out),
              "--steps", "1", "--batch-size", "8", "--trainable", "bias", "--device", "cpu",
              "--opt", "head_dim=32"])
    err = capsys.readouterr().err
    assert done.value.code in (0, None), err
    adapted = Bundle.open(out)
    assert adapted.manifest.precision == "int8"
    assert adapted.file(REFITTABLE).read_bytes() == b"PLAN:INT8,REFIT|refit"
    assert not adapted.has(FIXED)
    measured = adapted.manifest.lineage[-1].settings["requantize"]
    assert measured["engine_path"] == {REFITTABLE: "refit", FIXED: "rebuild"}
    assert f"engine refit here: {Path(REFITTABLE).name}" in err
    assert f"engine to rebuild on the device: {Path(FIXED).name}" in err
    assert max(len(line) for line in err.splitlines()) <= 80
