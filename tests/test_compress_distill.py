"""Distillation: a student bundle with lineage, pairing and float-weight checks, cache, resume."""

from __future__ import annotations

import numpy as np
import pytest
from edge_ssl.compress.distill import DistillConfig, DistillError, distill, train_student

from edge_ssl.bundle import Bundle, BundleWriter, sha256_file
from edge_ssl.errors import BundleError, CheckpointError, ConfigError
from edge_ssl.models import create_encoder, load_encoder
from tests.test_compress_fixtures import tiny_dataset, write_tiny_bundle


@pytest.fixture(scope="module")
def teacher_bundle(tmp_path_factory):
    """A tiny ResNet-18 (width 0.25) teacher bundle."""
    return write_tiny_bundle(tmp_path_factory.mktemp("teacher") / "teacher.edge")


STUDENT = {"student": "resnet18_cifar", "student_kwargs": {"width": 0.125}, "batch_size": 8,
           "device": "cpu", "queue_size": 16, "head_hidden_dim": 32, "warmup_epochs": 0.0}


def _config(**overrides) -> DistillConfig:
    return DistillConfig(**(STUDENT | {"epochs": 1} | overrides))


def test_distill_writes_a_student_bundle_and_leaves_the_teacher_untouched(teacher_bundle, tmp_path):
    before = sha256_file(teacher_bundle.path / "manifest.json")
    result = distill(teacher_bundle.path, _config(cache_views=2), tiny_dataset(16), tmp_path / "s.edge")
    bundle = Bundle.open(tmp_path / "s.edge")
    assert bundle.manifest.lineage[-1].stage == "distill"
    assert bundle.manifest.lineage[-1].parent == teacher_bundle.manifest_sha256
    assert bundle.manifest.metrics["params"] < teacher_bundle.manifest.metrics["params"]
    assert np.isfinite(result.final_loss)
    student = load_encoder(bundle)
    assert student.spec.embed_dim != teacher_bundle.manifest.embed_dim  # dims may differ
    assert sha256_file(teacher_bundle.path / "manifest.json") == before
    assert (tmp_path / "s.edge.ckpt" / "teacher_cache.pt").is_file()


def test_student_learns_to_follow_the_teacher(teacher_bundle):
    import torch
    from edge_ssl.compress.distill import load_teacher

    _, teacher = load_teacher(teacher_bundle.path)
    data = tiny_dataset(16)
    torch.manual_seed(0)
    student = create_encoder("resnet18_cifar", width=0.125)
    config = _config(objectives=("feature",), epochs=4, cache_views=1, lr=2e-2, batch_size=16)
    result = train_student(student, teacher, data, config)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]


def test_objectives_combine_with_the_students_own_ssl_loss_without_cache(teacher_bundle):
    from edge_ssl.compress.distill import load_teacher

    _, teacher = load_teacher(teacher_bundle.path)
    config = _config(objectives=("feature", "seed", "ssl"), cache_views=0,
                     ssl_kwargs={"projection_hidden_dim": 32, "projection_dim": 16})
    result = train_student(create_encoder("resnet18_cifar", width=0.125), teacher, tiny_dataset(16), config)
    assert np.isfinite(result.final_loss)


def test_teacher_and_student_of_different_input_sizes_cannot_be_paired(teacher_bundle, tmp_path):
    config = _config(student_kwargs={"width": 0.125, "image_size": 64})
    with pytest.raises(DistillError, match="image_size=32"):
        distill(teacher_bundle.path, config, tiny_dataset(16), tmp_path / "s.edge")
    assert not (tmp_path / "s.edge").exists()


def test_a_quantized_bundle_is_traced_to_its_float_parent(teacher_bundle, tmp_path):
    # An INT8-style bundle: no model.pt, lineage pointing at the float teacher.
    with BundleWriter(tmp_path / "q.edge") as writer:
        writer.write_bytes("model.onnx", b"not a real graph")
        writer.commit(name="q", encoder=teacher_bundle.manifest.encoder,
                      lineage=teacher_bundle.child_lineage("quantize", {}), precision="int8")
    distill(tmp_path / "q.edge", _config(cache_views=1), tiny_dataset(8), tmp_path / "s.edge")
    assert Bundle.open(tmp_path / "s.edge").manifest.lineage[-1].parent == teacher_bundle.manifest_sha256
    # Without a float parent on disk: a clear error, nothing written.
    with BundleWriter(tmp_path / "orphan.edge") as writer:
        writer.write_bytes("model.onnx", b"x")
        writer.commit(name="orphan", encoder=teacher_bundle.manifest.encoder, lineage=(), precision="int8")
    with pytest.raises(BundleError, match="float weights"):
        distill(tmp_path / "orphan.edge", _config(), tiny_dataset(8), tmp_path / "s2.edge")
    assert not (tmp_path / "s2.edge").exists()


def test_resume_continues_and_refuses_other_settings(teacher_bundle, tmp_path):
    data, out = tiny_dataset(16), tmp_path / "s.edge"
    distill(teacher_bundle.path, _config(cache_views=1), data, out)
    resumed = distill(teacher_bundle.path, _config(cache_views=1, epochs=2), data, out, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    with pytest.raises(CheckpointError, match="lr"):
        distill(teacher_bundle.path, _config(cache_views=1, epochs=3, lr=0.5), data, out, resume=True)
    with pytest.raises(ConfigError, match="already exists"):
        distill(teacher_bundle.path, _config(), data, out)


def test_bad_settings_fail_before_training():
    with pytest.raises(ConfigError, match="objectives"):
        DistillConfig(objectives=("feature", "mse"))
    with pytest.raises(ConfigError, match="two views"):
        DistillConfig(objectives=("ssl",), cache_views=1)


def _ddp_worker(rank: int, init_file: str, teacher: str, out: str) -> None:
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        distill(teacher, _config(batch_size=4, cache_views=1), tiny_dataset(16), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distill_under_ddp_two_cpu_processes(teacher_bundle, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ddp.edge"
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(teacher_bundle.path), str(out)), nprocs=2, join=True)
    bundle = Bundle.open(out)
    settings = bundle.manifest.lineage[-1].settings
    assert settings["batch_size"] == 4 and bundle.manifest.metrics["distill"]["epochs"] == 1
    import torch

    state = torch.load(tmp_path / "ddp.edge.ckpt" / "last.pt", weights_only=True)
    assert state["settings"]["world_size"] == 2


@pytest.mark.gpu
def test_distill_on_cuda_runs_the_teacher_in_half_precision(teacher_bundle, tmp_path):
    import torch
    from edge_ssl.compress.distill import _frozen_teacher, load_teacher

    _, teacher = load_teacher(teacher_bundle.path)
    frozen = _frozen_teacher(teacher, torch.device("cuda", 0), "auto")
    assert frozen.compute_dtype in (torch.bfloat16, torch.float16)
    result = distill(teacher_bundle.path, _config(device="cuda", cache_views=0), tiny_dataset(16),
                     tmp_path / "gpu.edge")
    assert np.isfinite(result.final_loss) and result.bundle is not None
