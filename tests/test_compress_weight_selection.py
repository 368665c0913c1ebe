"""Weight selection: a narrower student initialized from evenly spaced teacher channels."""

from __future__ import annotations

import pytest
import torch
from edge_ssl.compress.distill import DistillConfig, distill
from edge_ssl.compress.weight_selection import (
    WeightSelectionError,
    inherit_teacher_weights,
    select_state,
    selected_indices,
)

from edge_ssl.bundle import Bundle
from edge_ssl.errors import ConfigError
from edge_ssl.models import create_encoder
from tests.test_compress_fixtures import tiny_dataset, write_tiny_bundle


def test_indices_are_evenly_spaced_and_keep_both_ends():
    assert selected_indices(64, 32).tolist() == [round(i * 63 / 31) for i in range(32)]
    assert selected_indices(8, 8).tolist() == list(range(8))
    with pytest.raises(WeightSelectionError, match="wider"):
        selected_indices(8, 16)


def test_every_student_tensor_is_the_teachers_selected_sub_tensor():
    torch.manual_seed(0)
    teacher, student = create_encoder("resnet18_cifar", width=0.25), create_encoder("resnet18_cifar", width=0.125)
    summary = inherit_teacher_weights(student, teacher)
    t, s = teacher.state_dict(), student.state_dict()
    assert summary["tensors"] == len(s) and 0 < summary["narrowed_tensors"] < len(s)
    for key, value in s.items():
        expected = t[key]
        for dim, size in enumerate(value.shape):
            if expected.shape[dim] != size:
                expected = expected.index_select(dim, selected_indices(t[key].shape[dim], size))
        assert torch.equal(value, expected), key


def test_same_width_copies_the_teacher_exactly():
    torch.manual_seed(0)
    teacher = create_encoder("resnet18_cifar", width=0.25).eval()
    student = create_encoder("resnet18_cifar", width=0.25).eval()
    inherit_teacher_weights(student, teacher)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


def test_residual_streams_keep_the_same_channels_in_every_block():
    """The identity shortcut adds block input to conv2's output: both must keep the same channels."""
    torch.manual_seed(0)
    teacher = create_encoder("resnet18_cifar", width=0.25).eval()
    student = create_encoder("resnet18_cifar", width=0.125).eval()
    inherit_teacher_weights(student, teacher)
    # Zero every teacher channel outside the selection: the narrow student then computes the
    # teacher's embedding exactly on the selected channels (only when selection is consistent).
    keep = {size: selected_indices(size, size // 2) for size in (16, 32, 64, 128)}
    with torch.no_grad():
        for module in teacher.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                mask = torch.zeros(module.num_features, dtype=torch.bool)
                mask[keep[module.num_features]] = True
                module.weight[~mask] = 0
                module.bias[~mask] = 0
        inherit_teacher_weights(student, teacher)
        x = torch.randn(3, 3, 32, 32)
        wide = teacher(x)[:, keep[128]]
        assert torch.allclose(student(x), wide, atol=1e-5)


def test_a_foreign_or_wider_student_is_refused_with_a_reason():
    teacher = create_encoder("resnet18_cifar", width=0.125)
    with pytest.raises(WeightSelectionError, match="architecture at a smaller width"):
        select_state(teacher.state_dict(), create_encoder("mobilenetv3_small_cifar", width=0.25).state_dict())
    with pytest.raises(WeightSelectionError, match="wider than the teacher"):
        inherit_teacher_weights(create_encoder("resnet18_cifar", width=0.25), teacher)


def test_distill_with_teacher_init_records_it_in_the_lineage(tmp_path):
    teacher = write_tiny_bundle(tmp_path / "t.edge")
    config = DistillConfig(student="resnet18_cifar", student_kwargs={"width": 0.125}, batch_size=8, epochs=1,
                           device="cpu", queue_size=16, head_hidden_dim=32, warmup_epochs=0.0,
                           cache_views=2, init="teacher")
    distill(teacher.path, config, tiny_dataset(16), tmp_path / "s.edge")
    settings = Bundle.open(tmp_path / "s.edge").manifest.lineage[-1].settings
    assert settings["init"] == "teacher"
    assert settings["student_init"]["method"].startswith("weight-selection")
    with pytest.raises(ConfigError, match="init"):
        DistillConfig(init="imagenet")
