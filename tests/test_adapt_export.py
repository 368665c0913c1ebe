"""After adaptation: model.onnx re-exported like the parent's, engines refit or reported for rebuild."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ssl.adapt.api import AdaptConfig, adapt
from edge_ssl.bundle import BundleWriter
from edge_ssl.data.sources import ImageDataset
from edge_ssl.models import create_encoder, load_encoder
from tests.conftest import COSINE_MIN

pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the re-exported graph")


def test_reexports_onnx_and_reports_engines_it_cannot_refit(tmp_path):
    from edge_ssl.runtime.export import export_encoder_onnx

    torch.manual_seed(0)
    encoder = create_encoder("resnet18_cifar", width=0.25).eval()
    onnx_path = export_encoder_onnx(encoder, tmp_path / "parent.onnx")
    with BundleWriter(tmp_path / "deployed.edge") as writer:
        writer.save_state_dict(encoder.state_dict())
        writer.copy_file("model.onnx", onnx_path)
        writer.write_bytes("engines/orin_sm87_trt10.3_fp16.plan", b"an engine for another device")
        parent = writer.commit(name="deployed", encoder=encoder.spec, lineage=(),
                               metrics={"export": {"opset": 17, "fp16": False}})
    images = np.random.default_rng(0).integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    result = adapt(parent, ImageDataset(images, None, None, "random"), tmp_path / "a.edge",
                   AdaptConfig(trainable="bn-stats", device="cpu"))
    bundle = result.bundle
    assert bundle.has("model.onnx") and bundle.manifest.metrics["export"]["opset"] == 17
    engines = bundle.manifest.metrics["adapt"]["export"]["engines"]
    assert "not refit" in engines["engines/orin_sm87_trt10.3_fp16.plan"]
    assert not any(name.startswith("engines/") for name in bundle.manifest.files)  # never stale

    import onnxruntime as ort

    from edge_ssl.tensors import preprocess

    batch = preprocess(images[:8], encoder.spec.input).numpy()
    session = ort.InferenceSession(str(bundle.file("model.onnx")), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: batch})[0]
    with torch.no_grad():
        torch_out = load_encoder(bundle)(torch.from_numpy(batch)).numpy()
    cosine = (onnx_out * torch_out).sum(1) / np.linalg.norm(onnx_out, axis=1) / np.linalg.norm(torch_out, axis=1)
    assert cosine.min() > COSINE_MIN


def test_train_on_host_deploys_under_the_parents_deployment_name(tmp_path, monkeypatch, capsys):
    import json

    from edge_ssl.bundle import write_encoder_bundle
    from edge_ssl.cli import main

    torch.manual_seed(0)
    parent = write_encoder_bundle(tmp_path / "cam.edge", create_encoder("resnet18_cifar", width=0.25),
                                  lineage=())
    images = np.random.default_rng(0).integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "local.npz", x=images)
    device_root = tmp_path / "device"
    monkeypatch.setenv("EDGE_SSL_REMOTE_ROOT", str(device_root))
    args = ["adapt", str(parent.path), "--data", str(tmp_path / "local.npz"), "--on", "local",
            "--train-on", "host", "--trainable", "bn-stats", "--device", "cpu", "--budget-mb", "500", "--json"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--out", str(tmp_path / "cam-adapted.edge")])
    captured = capsys.readouterr()
    assert done.value.code in (0, None), captured.err
    report = json.loads(captured.out)
    assert report["deploy"]["name"] == "cam" and report["deploy"]["version"]
    assert report["plan"]["budget_mb"] == 500
    assert (tmp_path / "cam-adapted.edge" / "model.onnx").is_file()  # exported for the device
