"""Every setting of a compress run, checked before the first stage trains."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_ssl.compress.recipe import RecipeConfig
from edge_ssl.compress.stage_run import finished_stages, partial_dir, stages_dir

from edge_ssl.bundle import Bundle
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import ConfigError, DataError
from edge_ssl.lineage import require_float_weights


def check_compress_inputs(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset, out: Path,
                          knn: Any | None, overwrite: bool, resume: bool = False) -> None:
    """Every setting of every stage, checked before the first stage runs (seconds, no training)."""
    check_compress_out(out, overwrite=overwrite, resume=resume)
    source = require_float_weights(teacher, "compress")
    check_knn_settings(source, recipe, knn)
    check_student(source, recipe, data)
    check_prune_settings(recipe, data)
    check_quantize_settings(recipe, data)


def check_compress_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    """OUT can be written, and no earlier run's stages are replaced without --resume/--overwrite."""
    from edge_ssl.outputs import check_bundle_out

    check_bundle_out(out, overwrite=overwrite)
    stages, partial = stages_dir(out), partial_dir(out)
    if partial.exists() and not (resume or overwrite):
        kept = ", ".join(p.name for p in finished_stages(partial)) or "no finished stage"
        raise ConfigError(
            f"{partial} holds an interrupted run ({kept}); pass --resume to reuse its finished "
            "stages or --overwrite to start over."
        )
    if stages.exists() and not (resume or overwrite):
        raise ConfigError(
            f"{stages} already exists (stages of an earlier run); pass --resume to reuse the "
            "stages that match, or --overwrite to replace them."
        )


def check_knn_settings(teacher: Bundle, recipe: RecipeConfig, knn: Any | None) -> None:
    """kNN targets need labeled eval images, and those must be the teacher's image size."""
    quantize = recipe.quantize_config()
    wanted = [name for name, value in (
        ("max_knn_drop", recipe.max_knn_drop),
        ("quantize_options.max_knn_drop", None if quantize is None else quantize.max_knn_drop),
    ) if value is not None]
    if wanted and knn is None:
        raise ConfigError(
            f"{' and '.join(wanted)} needs labeled images to measure kNN top-1: pass --eval-data "
            "(the bank, e.g. cifar10_train_3.npz) and --eval-test (the queries, e.g. "
            "cifar10_test.npz), or remove the target from the recipe."
        )
    if knn is None:
        return
    size = tuple(teacher.manifest.input.shape[1:])
    for flag, images in (("--eval-data", knn.bank_images), ("--eval-test", knn.test_images)):
        if tuple(images.shape[1:3]) != size:
            raise DataError(
                f"{flag} images are {images.shape[1]}x{images.shape[2]} but the teacher reads "
                f"{size[0]}x{size[1]}; load them at the teacher's size (the compress command does)."
            )


def check_student(teacher: Bundle, recipe: RecipeConfig, data: ImageDataset) -> None:
    """The student pairs with the teacher and the data, and is smaller than the teacher."""
    from edge_ssl.compress.distill import check_data, check_pairing, config_names
    from edge_ssl.compress.measure import model_metrics

    from edge_ssl.models import create_encoder, load_encoder

    distill = recipe.distill_config()
    if distill is None:
        check_data(data, teacher.manifest.encoder, 2)
        return
    config_names(distill)
    student = create_encoder(distill.student, **distill.student_kwargs)
    check_pairing(teacher.manifest.encoder, student.spec)
    if len(data) < distill.batch_size:
        raise DataError(
            f"{len(data)} unlabeled images are fewer than one distillation batch of "
            f"{distill.batch_size}; pass --set distill.batch_size={_floor_pow2(len(data))} (or "
            "set it in the recipe), or more images with --data / a larger --limit."
        )
    check_data(data, student.spec, distill.batch_size)
    check_smaller(model_metrics(load_encoder(teacher)), model_metrics(student), distill)


def check_smaller(teacher: Mapping[str, int], student: Mapping[str, int], distill: Any) -> None:
    """Refuse a 'student' with more params or MACs than its teacher: never what compressing wants."""
    if student["params"] <= teacher["params"] and student["macs"] <= teacher["macs"]:
        return
    kwargs = ", ".join(f"{k}={v}" for k, v in distill.student_kwargs.items())
    raise ConfigError(
        f"the student {distill.student}({kwargs}) is larger than the teacher: "
        f"{student['params'] / 1e6:.2f}M params vs {teacher['params'] / 1e6:.2f}M, "
        f"{student['macs'] / 1e6:.1f}M MACs vs {teacher['macs'] / 1e6:.1f}M. Choose a smaller "
        "width (e.g. --arch-opt width=0.25; --arch-opt keys merge over the recipe's "
        "student_kwargs) or a smaller --student (see `edge-ssl encoders`)."
    )


def check_prune_settings(recipe: RecipeConfig, data: ImageDataset) -> None:
    """Pruning's data needs and its recovery distillation settings."""
    from edge_ssl.compress.distill import DistillConfig

    config = recipe.prune_config()
    if config is None or not (config.recovery_epochs or config.importance == "taylor"):
        return
    if len(data) < 2:
        raise DataError(f"pruning with {config.importance!r} importance / recovery needs at least "
                        f"2 unlabeled images; got {len(data)}. Pass more with --data.")
    if config.recovery_epochs:
        settings = {"objectives": ("feature",), "epochs": config.recovery_epochs,
                    "batch_size": min(config.batch_size, len(data)), "warmup_epochs": 0.0}
        try:
            DistillConfig.from_dict(settings | dict(config.recovery))
        except ConfigError as exc:
            raise ConfigError(f"prune_options.recovery: {exc}") from None


def check_quantize_settings(recipe: RecipeConfig, data: ImageDataset) -> None:
    """The quantize stage's calibration sizes (its own check), and no more calibration
    images asked for than are loaded: compress names the shortfall instead of using fewer."""
    from edge_ssl.compress.quantize import check_calibration_settings

    config = recipe.quantize_config()
    if config is None:
        return
    wanted, have = config.calibration_images, len(data)
    if config.precision == "int8" and wanted > have:
        raise ConfigError(
            f"quantize_options.calibration_images is {wanted} but only {have} unlabeled images are "
            f"loaded; pass --set quantize_options.calibration_images={have} (or fewer), or more "
            "images with --data / a larger --limit."
        )
    check_calibration_settings(config, have)


def _floor_pow2(n: int) -> int:
    return 1 << max(1, n.bit_length() - 1)
