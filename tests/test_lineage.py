"""Lineage parents are found by hash: a moved bundle never falls back to an older ancestor."""

from __future__ import annotations

import shutil

import pytest
from edge_ssl.compress.prune import PruneConfig, prune

from edge_ssl.bundle import Bundle, BundleWriter
from edge_ssl.lineage import SEARCH_PATH_ENV, MissingParentError, find_float_ancestor
from edge_ssl.models import create_encoder, load_encoder
from tests.test_compress_fixtures import tiny_dataset, write_tiny_bundle


def _int8_child(parent: Bundle, out) -> Bundle:
    """An INT8-style bundle: only model.onnx, lineage pointing at ``parent``."""
    with BundleWriter(out) as writer:
        writer.write_bytes("model.onnx", b"graph")
        return writer.commit(name=out.name.removesuffix(".edge"), encoder=parent.manifest.encoder,
                             lineage=parent.child_lineage("quantize", {}), precision="int8")


@pytest.fixture
def chain(tmp_path):
    """teacher -> student (float, another architecture size) -> int8, in one folder."""
    teacher = write_tiny_bundle(tmp_path / "work" / "teacher.edge")
    student_encoder = create_encoder("resnet18_cifar", width=0.125)
    from edge_ssl.bundle import write_encoder_bundle

    student = write_encoder_bundle(tmp_path / "work" / "student.edge", student_encoder,
                                   lineage=teacher.child_lineage("distill", {}))
    int8 = _int8_child(student, tmp_path / "work" / "int8.edge")
    return teacher, student, int8


def test_the_float_parent_is_found_beside_a_bundle_moved_with_it(chain, tmp_path):
    _, student, _ = chain
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "work", moved)
    shutil.rmtree(tmp_path / "work")
    found = find_float_ancestor(Bundle.open(moved / "int8.edge"))
    assert found.manifest_sha256 == student.manifest_sha256
    assert found.path == moved / "student.edge"


def test_a_copied_int8_bundle_without_its_parent_is_refused_not_traced_to_the_teacher(chain, tmp_path):
    teacher, student, int8 = chain
    copy = tmp_path / "copied" / "int8.edge"
    shutil.copytree(int8.path, copy)
    shutil.rmtree(student.path)  # the float parent is gone; the teacher is still at its path
    bundle = Bundle.open(copy)
    with pytest.raises(MissingParentError, match="student") as info:
        find_float_ancestor(bundle)
    assert str(tmp_path / "copied") in str(info.value)
    # The user-facing stage says the same and writes nothing.
    with pytest.raises(MissingParentError):
        prune(bundle, PruneConfig(ratio=0.3), tiny_dataset(8), tmp_path / "p.edge")
    assert not (tmp_path / "p.edge").exists()


def test_the_search_path_names_where_copied_parents_are(chain, tmp_path, monkeypatch):
    _, student, int8 = chain
    shutil.copytree(int8.path, tmp_path / "a" / "int8.edge")
    shutil.copytree(student.path, tmp_path / "b" / "student.edge")
    shutil.rmtree(tmp_path / "work")
    monkeypatch.setenv(SEARCH_PATH_ENV, str(tmp_path / "b"))
    found = find_float_ancestor(Bundle.open(tmp_path / "a" / "int8.edge"))
    assert found.manifest_sha256 == student.manifest_sha256


def test_a_modified_parent_with_the_same_name_is_not_taken(chain, tmp_path):
    teacher, student, int8 = chain
    shutil.rmtree(student.path)
    # Another bundle now sits where the student was: same name, different manifest.
    write_tiny_bundle(tmp_path / "work" / "student.edge")
    with pytest.raises(MissingParentError):
        find_float_ancestor(Bundle.open(int8.path))


def test_prune_of_a_moved_int8_bundle_prunes_the_student_not_the_teacher(chain, tmp_path):
    teacher, student, int8 = chain
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "work", moved)
    shutil.rmtree(tmp_path / "work")
    result = prune(Bundle.open(moved / "int8.edge"), PruneConfig(ratio=0.3), tiny_dataset(8),
                   tmp_path / "p.edge")
    assert result.bundle.manifest.lineage[-1].parent == student.manifest_sha256
    before = load_encoder(Bundle.open(moved / "student.edge"))
    assert result.bundle.manifest.metrics["prune"]["params_before"] == sum(
        p.numel() for p in before.parameters())
