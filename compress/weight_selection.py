"""Initialize a narrower student from its teacher's weights ("weight selection").

Xu et al., "Initializing Models with Larger Ones" (ICLR 2024): when the student is the
teacher's architecture at a smaller width, copy a subset of the teacher's channels into
it instead of starting from random weights; distillation then starts from a model that
already carries the teacher's filters and converges much faster.

Selection is *consistent*: every tensor dimension of teacher size T that becomes size S
in the student keeps the same evenly spaced indices. Channels that share a residual
stream have the same size, so they keep the same indices and the residual adds stay
aligned; a convolution's output channels and the next layer's input channels match the
same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from edge_ssl.errors import EdgeSSLError


class WeightSelectionError(EdgeSSLError, ValueError):
    """The student is not a narrower copy of the teacher's architecture."""


def selected_indices(teacher_size: int, student_size: int) -> torch.Tensor:
    """``student_size`` evenly spaced indices into ``range(teacher_size)`` (the same for every tensor)."""
    if student_size > teacher_size:
        raise WeightSelectionError(f"a student dimension of {student_size} is wider than the teacher's {teacher_size}.")
    return torch.linspace(0, teacher_size - 1, student_size).round().long()


def select_tensor(teacher: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The sub-tensor of ``teacher`` with ``shape``, selecting evenly spaced indices on each dimension."""
    if teacher.dim() != len(shape):
        raise WeightSelectionError(f"a teacher tensor of shape {tuple(teacher.shape)} cannot fill {tuple(shape)}.")
    out = teacher
    for dim, (big, small) in enumerate(zip(teacher.shape, shape, strict=True)):
        if big != small:
            out = out.index_select(dim, selected_indices(big, small))
    return out.clone()


def select_state(teacher_state: Mapping[str, torch.Tensor], student_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full student state dict filled from the teacher's; every student key must exist in the teacher."""
    missing = [key for key in student_state if key not in teacher_state]
    if missing:
        raise WeightSelectionError(
            f"the student has {len(missing)} tensors the teacher lacks (first: {missing[0]!r}); "
            "weight selection needs the teacher's architecture at a smaller width (e.g. "
            "--student resnet18_cifar --arch-opt width=0.5 for a resnet18_cifar teacher)."
        )
    selected = {}
    for key, target in student_state.items():
        source = teacher_state[key]
        if not source.is_floating_point():
            selected[key] = source.clone()  # e.g. BatchNorm's num_batches_tracked
            continue
        try:
            selected[key] = select_tensor(source, target.shape).to(target.dtype)
        except WeightSelectionError as exc:
            raise WeightSelectionError(f"{key}: {exc}") from None
    return selected


def inherit_teacher_weights(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Load the teacher's selected channels into ``student`` in place; a summary for the lineage."""
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    student.load_state_dict(select_state(teacher_state, student_state))
    narrowed = sum(1 for k, v in student_state.items() if v.shape != teacher_state[k].shape)
    return {"method": "weight-selection (uniform, consistent)", "tensors": len(student_state),
            "narrowed_tensors": narrowed}
