"""The CLI end to end: pretrain -> eval -> inspect -> import, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_ssl.cli import main, parse_key_values
from edge_ssl.errors import ConfigError

TINY = ["--arch", "resnet18_cifar", "--arch-opt", "width=0.125", "--batch-size", "8",
        "--steps-per-epoch", "2", "--epochs", "1", "--warmup-epochs", "0"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def labeled_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8), y=np.arange(60) % 3)
    return path


def test_pretrain_eval_inspect_roundtrip(tmp_path, labeled_npz, capsys):
    out = tmp_path / "t.edge"
    code, stdout, err = run(capsys, "pretrain", "--method", "simclr", "--data", str(labeled_npz),
                            "--out", str(out), "--json", *TINY)
    assert code == 0, err
    made = json.loads(stdout)
    assert made["bundle"] == str(out) and np.isfinite(made["final_loss"])

    code, stdout, err = run(capsys, "eval", str(out), "--data", str(labeled_npz), "--k", "5",
                            "--no-probe", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert set(result["knn_top1"]) == {"5"} and result["linear_probe_top1"] is None
    assert result["num_train"] == 48 and result["num_test"] == 12  # stratified 20% held out
    results_file = json.loads((tmp_path / "t.edge.results.json").read_text())
    assert made["manifest_sha256"] in results_file

    code, stdout, err = run(capsys, "inspect", str(out), "--json")
    assert code == 0, err
    shown = json.loads(stdout)
    assert shown["manifest"]["lineage"][0]["stage"] == "pretrain"
    assert shown["results"]["eval"]["knn_top1"]["5"] == result["knn_top1"]["5"]


def test_inspect_names_the_tampered_file(tmp_path, labeled_npz, capsys):
    out = tmp_path / "t.edge"
    run(capsys, "pretrain", "--method", "simclr", "--data", str(labeled_npz), "--out", str(out), *TINY)
    weights = out / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    code, stdout, err = run(capsys, "inspect", str(out))
    assert code == 1
    assert err.startswith("error: ") and "model.pt" in err and len(err.strip().splitlines()) == 1


def test_import_reports_mapping_and_writes_a_bundle(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.resnet18(weights=None)
    ckpt = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in source.state_dict().items()}}, ckpt)
    code, stdout, err = run(capsys, "import", str(ckpt), "--arch", "resnet18",
                            "--out", str(tmp_path / "r18.edge"), "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["source_format"] == "moco-v2"
    assert any(k.endswith("fc.weight") for k in report["dropped"])
    code, stdout, _ = run(capsys, "inspect", str(tmp_path / "r18.edge"), "--json")
    assert json.loads(stdout)["manifest"]["lineage"][0]["stage"] == "import"


def test_import_wrong_arch_is_one_line_and_writes_nothing(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    ckpt = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), ckpt)
    code, _, err = run(capsys, "import", str(ckpt), "--arch", "resnet18_cifar", "--out", str(tmp_path / "x.edge"))
    assert code == 1 and "conv1.weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.edge").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["pretrain", "--out", "x.edge", "--data", "/no/such/dir"], "does not exist"),
        (["pretrain", "--out", "x.edge", "--method", "byl"], "Did you mean 'byol'"),
        (["pretrain", "--out", "x.edge", "--arch", "resnet81"], "Did you mean"),
        (["pretrain", "--out", "x.edge", "--arch-opt", "width"], "KEY=VALUE"),
        (["eval", "missing.edge"], "does not exist"),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 1
    assert err.startswith("error: ") and expected in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.edge").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edge_ssl", "--debug", "inspect", str(tmp_path / "missing.edge")],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "BundleError" in proc.stderr


def test_encoders_and_doctor_json(capsys):
    code, stdout, _ = run(capsys, "encoders", "--json")
    assert code == 0 and "resnet18_cifar" in {row["name"] for row in json.loads(stdout)}
    code, stdout, _ = run(capsys, "doctor", "--json")
    checks = json.loads(stdout)
    assert code == 0 and {"python", "torch", "onnxruntime", "tensorrt", "jetson"} <= set(checks)


def test_parse_key_values():
    assert parse_key_values(["width=0.5", "name=abc", "flag=true"], "--x") == {
        "width": 0.5, "name": "abc", "flag": True,
    }
    with pytest.raises(ConfigError):
        parse_key_values(["=1"], "--x")

# `edge-ssl demo` end to end: tests/test_demo.py (the pipeline demo's own tests).
