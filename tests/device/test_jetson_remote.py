"""Live checks on a real Jetson over SSH: set EDGE_SSL_JETSON=ssh://user@host (skipped otherwise)."""

from __future__ import annotations

import os

import pytest
from edge_ssl.devices.remote import remote_doctor
from edge_ssl.devices.target import SSHSettings, parse_target

pytestmark = pytest.mark.jetson
TARGET = os.environ.get("EDGE_SSL_JETSON")


@pytest.fixture
def jetson():
    if not TARGET:
        pytest.skip("EDGE_SSL_JETSON is not set (e.g. EDGE_SSL_JETSON=ssh://nvidia@orin.local)")
    settings = SSHSettings(python=os.environ.get("EDGE_SSL_DEVICE_PYTHON", "python3"))
    with parse_target(TARGET, settings) as target:
        yield target


def test_doctor_sees_a_jetson_with_jetpack_and_a_profile(jetson):
    report = remote_doctor(jetson)
    assert report["l4t"] and report["jetpack"], report
    assert report["profile"] is not None, f"no profile matches {report['model']!r}; add it to profiles.toml"
    assert report["nvpmodel"] is not None, "nvpmodel -q gave no mode"


def test_live_tegrastats_lines_parse(jetson):
    from edge_ssl.devices.power import parse_tegrastats_line

    done = jetson.run(["timeout", "2", "tegrastats", "--interval", "200"], check=False)
    lines = [line for line in done.stdout.decode().splitlines() if line.strip()]
    assert lines, "tegrastats printed nothing"
    sample = parse_tegrastats_line(lines[-1])
    assert sample.gpu_load_pct is not None and sample.ram_total_mb
    if sample.total_mw is None:
        pytest.skip("tegrastats shows no power rails for this user (needs root on this JetPack)")


def test_trtexec_builds_and_benches_an_engine(jetson, tmp_path):
    from edge_ssl.devices.deploy import DeployOptions, deploy
    from edge_ssl.devices.remote import remote_bench
    from edge_ssl.runtime.export import export_encoder_onnx

    from edge_ssl.bundle import BundleWriter
    from edge_ssl.models import create_encoder

    encoder = create_encoder("resnet18_cifar", width=0.25)
    onnx_path = export_encoder_onnx(encoder, tmp_path / "m.onnx")
    with BundleWriter(tmp_path / "jetson-check.edge") as writer:
        writer.copy_file("model.onnx", onnx_path)
        bundle = writer.commit(name="jetson-check", encoder=encoder.spec, lineage=())
    result = deploy(bundle.path, jetson, DeployOptions(build_engine=True, engine_precision="fp16"))
    assert result.engine and result.engine.endswith("_fp16.plan")
    report = remote_bench(bundle.path, jetson, backend="trtexec", duration_s=2, warmup_s=1, record=False)
    assert report["batches"]["1"]["mean"] > 0
