"""SSL distillation: train a student encoder to match a frozen SSL teacher on unlabeled images."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_ssl.compress.distill_config import (
    DistillConfig,
    DistillError,
    DistillProgress,
    DistillResult,
)
from edge_ssl.compress.stage_graph import ship_graph

from edge_ssl.bundle import Bundle
from edge_ssl.config import config_to_dict
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import DataError
from edge_ssl.output_check import write_stage_bundle
from edge_ssl.outputs import check_bundle_out, checkpoint_dir
from edge_ssl.stage import open_float_parent


def check_pairing(teacher_spec: Any, student_spec: Any) -> None:
    """Teacher and student must read the same image size (the views are shared)."""
    if tuple(teacher_spec.input.shape) != tuple(student_spec.input.shape):
        raise DistillError(
            f"teacher and student cannot be paired: the teacher reads {tuple(teacher_spec.input.shape)} "
            f"images, the student {tuple(student_spec.input.shape)}. Build the student for the "
            f"teacher's size, e.g. --arch-opt image_size={teacher_spec.input.shape[1]}."
        )


def load_teacher(path: str | os.PathLike | Bundle, stage: str = "distill") -> tuple[Bundle, Any]:
    """(float bundle, encoder) for a teacher; a quantized bundle is traced to its float parent."""
    _, source, encoder = open_float_parent(path, stage)
    return source, encoder


def distill(
    teacher: str | os.PathLike | Bundle,
    config: DistillConfig,
    data: ImageDataset,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[DistillProgress], None] | None = None,
    with_graph: bool = False,
) -> DistillResult:
    """Distill ``teacher`` into a new ``config.student`` encoder and write it to ``out``.

    Checks the output, the pairing and the data before training; checkpoints every epoch
    to ``checkpoint_dir(out)``; with ``resume`` continues from there. Under torchrun every
    rank trains its shard and rank 0 writes the bundle. ``with_graph`` ships the student's
    parity-checked ONNX graph in the bundle too (what compress measures).
    """
    out = Path(out)
    check_bundle_out(out, overwrite=overwrite or resume)
    teacher_bundle, teacher_encoder = load_teacher(teacher)
    student, init = _new_student(config, teacher_encoder, data)
    result = train_student(
        student, teacher_encoder, data, config,
        ckpt_dir=checkpoint_dir(out), resume=resume, progress=progress,
        identity={"teacher": teacher_bundle.manifest_sha256},
    )
    if result.rank == 0:
        settings = config_to_dict(config) | {
            "teacher": teacher_bundle.manifest.name,
            "teacher_sha256": teacher_bundle.manifest_sha256,
            "data": data.source,
            "num_images": len(data),
            "student_init": init,
        }
        result.wrote(write_stage_bundle(
            out, result.encoder, stage="distill", parent=teacher_encoder, images=data.images,
            lineage=teacher_bundle.child_lineage("distill", settings),
            metrics=_metrics(result, config), overwrite=overwrite or resume,
            attach=ship_graph(result.encoder, data.images, str(out)) if with_graph else None,
        ))
    return result


def _new_student(config: DistillConfig, teacher: Any, data: ImageDataset) -> tuple[Any, dict[str, Any]]:
    """The student before training (seeded; from the teacher's channels with ``init=teacher``),
    checked against the teacher and the data; and how it was initialized."""
    import torch

    from edge_ssl.models import create_encoder

    config_names(config)
    torch.manual_seed(config.seed)  # the student's initial weights follow the seed too
    student = create_encoder(config.student, **config.student_kwargs)
    check_pairing(teacher.spec, student.spec)
    check_data(data, teacher.spec, config.batch_size)
    if config.init != "teacher":
        return student, {"method": "random"}
    from edge_ssl.compress.weight_selection import inherit_teacher_weights

    return student, inherit_teacher_weights(student, teacher)


def _metrics(result: DistillResult, config: DistillConfig) -> dict[str, Any]:
    return {
        "params": _params(result.encoder),
        "distill": {
            "final_loss": result.final_loss,
            "epochs": len(result.history),
            "images_per_second": result.images_per_second,
            "seconds": result.seconds,
            "objectives": list(config.objectives),
        },
    }


def config_names(config: DistillConfig) -> None:
    """Fail fast on an unknown student or SSL method name."""
    from edge_ssl.models import ENCODERS
    from edge_ssl.train.methods import METHODS

    ENCODERS.get(config.student)
    if "ssl" in config.objectives:
        METHODS.get(config.ssl_method)


def check_data(data: ImageDataset, spec: Any, batch_size: int) -> None:
    """Unlabeled images of the encoder's size, at least one batch of them."""
    if not isinstance(data, ImageDataset):
        raise DataError(f"distillation data must be an edge_ssl.data.sources.ImageDataset; got {type(data).__name__}.")
    size = tuple(spec.input.shape[1:])
    if data.image_size != size:
        raise DataError(
            f"{data.source}: images are {data.image_size[0]}x{data.image_size[1]} but the encoder "
            f"reads {size[0]}x{size[1]}; load them with image_size={size[0]} (edge_ssl.data.sources.load_images)."
        )
    if len(data) < batch_size:
        raise DataError(
            f"{data.source}: {len(data)} images are fewer than one batch of {batch_size}; "
            "lower --batch-size or add images."
        )


def _params(encoder: Any) -> int:
    from edge_ssl.models import count_parameters

    return count_parameters(encoder)


def train_student(
    student: Any,
    teacher: Any,
    data: ImageDataset,
    config: DistillConfig,
    *,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    progress: Callable[[DistillProgress], None] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> DistillResult:
    """Train ``student`` (a copy; the argument is not modified) against a frozen ``teacher``.

    The core loop shared by ``distill`` and pruning's recovery distillation.
    """
    import copy

    import torch

    from edge_ssl.device import activate_device, device_kind, resolve_device
    from edge_ssl.train.distributed import init_distributed, shutdown

    check_pairing(teacher.spec, student.spec)
    dist_info = init_distributed(device_kind(config.device))
    try:
        device = resolve_device(config.device, local_rank=dist_info.local_rank if dist_info.enabled else None)
        activate_device(device)
        torch.manual_seed(config.seed)
        student = copy.deepcopy(student).to(device).train()
        frozen = _frozen_teacher(teacher, device, config.teacher_precision)
        from edge_ssl.compress.training import DistillSession

        session = DistillSession.build(student, frozen, data, config, device, dist_info, ckpt_dir, identity)
        if resume:
            session.load_checkpoint()
        return session.run(progress)
    finally:
        shutdown(dist_info)


def _frozen_teacher(teacher: Any, device: Any, precision: str) -> Any:
    """A frozen eval-mode copy of the teacher; half precision on GPU (bf16 when supported)."""
    import copy

    import torch

    frozen = copy.deepcopy(teacher).to(device).eval()
    for param in frozen.parameters():
        param.requires_grad_(False)
    dtype = torch.float32
    if device.type == "cuda" and precision != "fp32":
        bf16 = torch.cuda.is_bf16_supported()
        dtype = torch.float16 if precision == "fp16" or (precision == "auto" and not bf16) else torch.bfloat16
    frozen.compute_dtype = dtype
    return frozen
