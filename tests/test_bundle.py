"""The bundle: atomic writes, verification that names the bad file, lineage, results, tar."""

from __future__ import annotations

import json
import os

import pytest

from edge_ssl.bundle import (
    MANIFEST_NAME,
    Bundle,
    BundleWriter,
    lineage_entry,
    pack_bundle,
    read_results,
    record_results,
    results_path,
    unpack_bundle,
)
from edge_ssl.errors import BundleError, BundleIntegrityError


def _write(path, spec, payload=b"weights", stage="pretrain", parent=None, overwrite=False):
    with BundleWriter(path, overwrite=overwrite) as writer:
        writer.write_bytes("model.pt", payload)
        writer.write_json("bench/cpu.json", {"p50_ms": 1.0})
        lineage = parent.child_lineage(stage, {"x": 1}) if parent else (lineage_entry(stage, {"x": 1}),)
        return writer.commit(name=path.name.removesuffix(".edge"), encoder=spec, lineage=lineage)


def test_roundtrip_manifest_and_files(tmp_path, tiny_spec):
    bundle = _write(tmp_path / "t.edge", tiny_spec)
    opened = Bundle.open(tmp_path / "t.edge")
    assert opened.manifest_sha256 == bundle.manifest_sha256
    assert opened.manifest.encoder == tiny_spec
    assert set(opened.manifest.files) == {"model.pt", "bench/cpu.json"}
    assert opened.manifest.files["model.pt"].bytes == len(b"weights")
    raw = json.loads((tmp_path / "t.edge" / MANIFEST_NAME).read_text())
    assert raw["schema_version"] == 1 and raw["embed_dim"] == 128
    assert raw["input"]["mean"] == list(tiny_spec.input.mean)
    entry = raw["lineage"][0]
    assert entry["stage"] == "pretrain" and entry["parent"] is None
    assert "versions" in entry["environment"] and entry["environment"]["host"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_verify_names_modified_and_truncated_files(tmp_path, tiny_spec):
    _write(tmp_path / "t.edge", tiny_spec)
    (tmp_path / "t.edge" / "model.pt").write_bytes(b"weightz")
    with pytest.raises(BundleIntegrityError, match=r"model\.pt sha256 .* does not match"):
        Bundle.open(tmp_path / "t.edge")
    (tmp_path / "t.edge" / "model.pt").write_bytes(b"wei")
    with pytest.raises(BundleIntegrityError, match=r"model\.pt has 3 bytes.*truncated"):
        Bundle.open(tmp_path / "t.edge")
    assert Bundle.open(tmp_path / "t.edge", verify=False).manifest.name == "t"
    (tmp_path / "t.edge" / "model.pt").unlink()
    with pytest.raises(BundleIntegrityError, match=r"model\.pt is listed in the manifest but missing"):
        Bundle.open(tmp_path / "t.edge")


def test_open_rejects_non_bundles_clearly(tmp_path, tiny_spec):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nope.edge")
    (tmp_path / "empty.edge").mkdir()
    with pytest.raises(BundleError, match="has no manifest.json"):
        Bundle.open(tmp_path / "empty.edge")
    _write(tmp_path / "t.edge", tiny_spec)
    manifest = tmp_path / "t.edge" / MANIFEST_NAME
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(BundleIntegrityError, match="not valid JSON"):
        Bundle.open(tmp_path / "t.edge")
    manifest.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        Bundle.open(tmp_path / "t.edge")
    manifest.write_text(json.dumps({"schema_version": 1, "name": "x"}))
    with pytest.raises(BundleError, match="malformed"):
        Bundle.open(tmp_path / "t.edge")


def test_writer_refuses_existing_and_failed_write_leaves_old_bundle(tmp_path, tiny_spec):
    first = _write(tmp_path / "t.edge", tiny_spec)
    with pytest.raises(BundleError, match="already exists"):
        BundleWriter(tmp_path / "t.edge")
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(tmp_path / "t.edge", overwrite=True) as writer:
            writer.write_bytes("model.pt", b"new")
            raise RuntimeError("boom")
    assert Bundle.open(tmp_path / "t.edge").manifest_sha256 == first.manifest_sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.edge"]
    second = _write(tmp_path / "t.edge", tiny_spec, payload=b"other", overwrite=True)
    assert second.manifest_sha256 != first.manifest_sha256
    assert (tmp_path / "t.edge" / "model.pt").read_bytes() == b"other"


def test_writer_refuses_to_replace_a_non_bundle(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(BundleError, match="not a bundle"):
        BundleWriter(tmp_path / "data", overwrite=True)


def test_writer_rejects_paths_outside_the_bundle(tmp_path):
    with BundleWriter(tmp_path / "t.edge") as writer:
        for bad in ("../x", "/etc/passwd", MANIFEST_NAME):
            with pytest.raises(BundleError, match="invalid bundle file name"):
                writer.path_for(bad)


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path, tiny_spec, monkeypatch):
    writer = BundleWriter(tmp_path / "t.edge")

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_bytes", full)
    with pytest.raises(BundleError, match="No space left on device.*Nothing was changed"):
        with writer:
            writer.write_bytes("model.pt", b"x")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_lineage_points_at_parent_manifest(tmp_path, tiny_spec):
    parent = _write(tmp_path / "p.edge", tiny_spec)
    child = _write(tmp_path / "c.edge", tiny_spec, stage="prune", parent=parent)
    stages = [e.stage for e in child.manifest.lineage]
    assert stages == ["pretrain", "prune"]
    assert child.manifest.lineage[-1].parent == parent.manifest_sha256
    assert child.manifest.lineage[-1].parent_name == "p"
    assert Bundle.open(tmp_path / "p.edge").manifest_sha256 == parent.manifest_sha256


def test_results_live_beside_the_bundle_keyed_by_manifest(tmp_path, tiny_spec):
    bundle = _write(tmp_path / "t.edge", tiny_spec)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "t.edge").rglob("*")}
    path = record_results(bundle, "eval", {"knn_top1": {"20": 0.5}})
    assert path == results_path(bundle) == tmp_path / "t.edge.results.json"
    record_results(bundle, "latency", {"p50_ms": 2.0})
    got = read_results(Bundle.open(tmp_path / "t.edge"))
    assert got["eval"]["knn_top1"]["20"] == 0.5 and got["latency"]["p50_ms"] == 2.0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "t.edge").rglob("*")}
    assert before == after, "recording results must not touch the bundle"
    path.write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        read_results(bundle)


def test_pack_and_unpack_roundtrip(tmp_path, tiny_spec):
    bundle = _write(tmp_path / "t.edge", tiny_spec)
    tar = pack_bundle(bundle, tmp_path / "t.tar")
    dest = tmp_path / "device"
    dest.mkdir()
    unpacked = unpack_bundle(tar, dest)
    assert unpacked.manifest_sha256 == bundle.manifest_sha256
    assert unpacked.path == dest / "t.edge"
    truncated = tmp_path / "bad.tar"
    truncated.write_bytes(tar.read_bytes()[: os.path.getsize(tar) // 3])
    with pytest.raises(BundleError):
        unpack_bundle(truncated, tmp_path / "device2")
