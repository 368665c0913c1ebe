"""The runtime commands end to end on a tiny bundle: export, bench, backends, compare, build."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edge_ssl.bundle import Bundle, lineage_entry, write_encoder_bundle
from edge_ssl.cli import app, main

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from edge_ssl.models import create_encoder

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cli")
    write_encoder_bundle(root / "tiny.edge", create_encoder("resnet18_cifar", width=0.25),
                         lineage=(lineage_entry("test", {}),))
    return root


def _json(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_export_bench_compare_round_trip(tiny):
    exported = _json(["export", str(tiny / "tiny.edge"), "--out", str(tiny / "x.edge"), "--json"])
    assert exported["parity"]["passed"] and exported["precision"] == "fp32"
    report = _json(["bench", str(tiny / "x.edge"), "--batch", "1,2", "--iterations", "5", "--warmup", "0",
                    "--threads", "1", "--json"])
    assert report["runner"]["backend"] == "ort" and set(report["batches"]) == {"1", "2"}
    assert report["batches"]["1"]["latency_ms"]["p99"] >= report["batches"]["1"]["latency_ms"]["p50"]
    assert "1" in json.dumps(json.loads((tiny / "x.edge.results.json").read_text()))
    comparison = _json(["compare", str(tiny / "tiny.edge"), str(tiny / "x.edge"), "--limit", "8", "--json"])
    assert comparison["min_cosine"] > 0.9999 and comparison["samples"] == 8


def test_backends_lists_every_backend_with_a_reason(tiny):
    found = _json(["backends", "--json"])
    assert found["ort"]["available"] and found["torch"]["available"]
    for info in found.values():
        assert info["available"] or info["reason"]


def test_errors_are_one_line_and_exit_1(tiny, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", str(tiny / "tiny.edge"), "--backend", "ort", "--iterations", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "has none" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["bench", str(tiny / "tiny.edge"), "--batch", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_build_without_onnx_fails_before_anything_is_written(tiny, capsys):
    with pytest.raises(SystemExit):
        main(["build", str(tiny / "tiny.edge"), "--out", str(tiny / "t.edge")])
    assert "build needs model.onnx" in capsys.readouterr().err
    assert not (tiny / "t.edge").exists()
    assert Bundle.open(tiny / "tiny.edge")
