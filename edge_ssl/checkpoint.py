"""Safe checkpoint reading (weights_only) and import of foreign SSL checkpoints into an Encoder."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_ssl.errors import CheckpointError, ConfigError
from edge_ssl.models import ENCODERS, Encoder, create_encoder
from edge_ssl.stage import StageResult
from edge_ssl.torchio import read_checkpoint as read_checkpoint

SOURCE_FORMATS = (
    "state_dict",
    "timm",
    "torchvision",
    "dino",
    "solo-learn",
    "lightly",
    "moco-v2",
    "moco-v3",
)

# Top-level entries of training checkpoints that wrap the model's state dict.
_WRAPPERS = ("state_dict", "model")
# Modules of classification heads; dropped when the target backbone (num_classes=0) lacks them.
_HEAD_MODULES = frozenset({"fc", "classifier", "head", "head_dist", "heads", "last_linear"})
_LIGHTLY_MODULES = frozenset(
    {
        "projection_head",
        "prediction_head",
        "backbone_momentum",
        "projection_head_momentum",
        "prediction_head_momentum",
        "prototypes",
        "student_head",
        "teacher_head",
    }
)
_SOLO_MODULES = frozenset(
    {"projector", "predictor", "momentum_backbone", "momentum_projector", "classifier", "queue"}
)
_LIGHTNING_KEYS = frozenset({"pytorch-lightning_version", "global_step", "optimizer_states"})
# list(torchvision_resnet.children()) names, for nn.Sequential backbones saved with numeric keys.
_TORCHVISION_RESNET_CHILDREN = (
    "conv1",
    "bn1",
    "relu",
    "maxpool",
    "layer1",
    "layer2",
    "layer3",
    "layer4",
    "avgpool",
    "fc",
)
_NOTES = {
    "state_dict": "edge-ssl Encoder state dict ('backbone.' prefix)",
    "timm": "timm state dict (names match the backbone directly)",
    "torchvision": "torchvision ResNet state dict (timm's ResNet uses the same names)",
    "solo-learn": "solo-learn (Lightning) checkpoint: 'backbone.' taken; projector, momentum "
    "backbone and classifier ignored",
    "lightly": "lightly model: 'backbone.' taken; projection/prediction heads and momentum copies ignored",
    "moco-v2": "MoCo v2: the query encoder 'encoder_q' taken; the momentum encoder 'encoder_k', "
    "the queue and the MLP head 'fc' ignored",
    "moco-v3": "MoCo v3: 'base_encoder' taken; 'momentum_encoder', 'predictor' and the projection "
    "head ignored",
    "dino": "DINO: the teacher backbone taken (the teacher is what the DINO paper evaluates); "
    "the student and the DINO head ignored",
}


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_checkpoint` took from a foreign checkpoint and what it left out."""

    path: str
    source_format: str
    mapped: tuple[str, ...]  # target (backbone) keys filled
    dropped: tuple[str, ...]  # source keys ignored, as paths from the file's root
    note: str = ""

    def summary(self) -> str:
        """A few lines: the format, how many tensors were mapped, what was dropped."""
        lines = [f"{self.path}: {self.source_format} checkpoint"]
        if self.note:
            lines.append(f"  {self.note}")
        lines.append(f"  mapped: {len(self.mapped)} backbone tensors")
        if self.dropped:
            groups: dict[str, list[str]] = {}
            for key in self.dropped:
                groups.setdefault(_group_of(key), []).append(key)
            shown = ", ".join(
                f"{g} ({len(keys)})" if len(keys) > 1 else g for g, keys in list(groups.items())[:8]
            )
            more = f", and {len(groups) - 8} more groups" if len(groups) > 8 else ""
            lines.append(f"  dropped: {len(self.dropped)} source keys: {shown}{more}")
            # One tensor per group says more than 'epoch' or 'optimizer' would.
            examples = [keys[0] for keys in groups.values() if "." in keys[0]][:3]
            if examples:
                lines.append(f"    e.g. {', '.join(examples)}")
        else:
            lines.append("  dropped: nothing")
        return "\n".join(lines)


def _group_of(path: str) -> str:
    """'state_dict.module.encoder_k.layer1.0.conv1.weight' -> 'encoder_k' (for summaries)."""
    parts = path.split(".")
    while len(parts) > 1 and parts[0] in {*_WRAPPERS, "module", "teacher", "student"}:
        parts = parts[1:]
    if len(parts) > 2 and parts[0] in {"encoder_q", "base_encoder", "backbone", "teacher_backbone"}:
        return ".".join(parts[:2])
    return parts[0]


# --- import ---------------------------------------------------------------------------------


@dataclass
class _Source:
    """Backbone tensors pulled out of a checkpoint, keyed by backbone-relative names."""

    source_format: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # backbone-relative name -> path in file
    dropped: list[str] = field(default_factory=list)
    note: str = ""


def import_checkpoint(
    path: str | Path, arch: str, **arch_kwargs: Any
) -> tuple[Encoder, ImportReport]:
    """Read a foreign SSL checkpoint and load its backbone into ``create_encoder(arch, **arch_kwargs)``.

    Recognised: edge-ssl state dicts, timm and torchvision state dicts, DINO training
    checkpoints (teacher preferred) and released backbones, solo-learn, lightly (including
    ``nn.Sequential`` ResNet backbones with numeric keys), MoCo v2 and MoCo v3. Loading is
    strict: a shape that does not fit or a missing tensor raises CheckpointError.
    """
    return import_checkpoint_dict(read_checkpoint(path), arch, source=str(path), **arch_kwargs)


@dataclass(kw_only=True)
class ImportResult(StageResult):
    """The imported bundle, its metrics and what the checkpoint's keys became."""

    report: ImportReport


def import_bundle(checkpoint: str | os.PathLike, arch: str, out: str | os.PathLike, *,
                  overwrite: bool = False, **arch_kwargs: Any) -> ImportResult:
    """Stage "import": a foreign checkpoint -> a bundle at ``out`` (output checked first,
    the model's embeddings checked before it is written)."""
    from edge_ssl.bundle import lineage_entry, sha256_file
    from edge_ssl.models import count_parameters
    from edge_ssl.output_check import write_stage_bundle
    from edge_ssl.outputs import check_bundle_out

    check_bundle_out(out, overwrite=overwrite)
    encoder, report = import_checkpoint(checkpoint, arch, **arch_kwargs)
    settings = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
                "source_format": report.source_format, "arch": arch, "arch_kwargs": arch_kwargs,
                "mapped": len(report.mapped), "dropped": len(report.dropped)}
    result = ImportResult(report=report)
    result.wrote(write_stage_bundle(
        out, encoder, stage="import", lineage=(lineage_entry("import", settings),),
        metrics={"params": count_parameters(encoder)}, overwrite=overwrite))
    return result


def import_checkpoint_dict(
    checkpoint: Mapping[str, Any], arch: str, *, source: str = "<checkpoint>", **arch_kwargs: Any
) -> tuple[Encoder, ImportReport]:
    """Like :func:`import_checkpoint` for a checkpoint already in memory (left unchanged)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{source}: expected a checkpoint dict, got {type(checkpoint).__name__}."
        )
    encoder = create_encoder(arch, **arch_kwargs)
    found = _extract(checkpoint, source)
    mapped, head_dropped = _fit(found, encoder.backbone, arch, arch_kwargs, source)
    report = ImportReport(
        path=source,
        source_format=found.source_format,
        mapped=mapped,
        dropped=tuple(found.dropped + head_dropped),
        note=found.note,
    )
    return encoder, report


def _tensor_entries(
    container: Mapping[str, Any], prefix: str, dropped: list[str]
) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (path in file, tensor); non-tensor entries go to ``dropped``."""
    entries: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in container.items():
        path = f"{prefix}{key}"
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            entries[key] = (path, value)
        else:
            dropped.append(path)
    if entries and all(key.startswith("module.") for key in entries):
        # Saved from a DistributedDataParallel wrapper.
        entries = {key[len("module.") :]: entry for key, entry in entries.items()}
    return entries


def _take(found: _Source, entries: dict[str, tuple[str, torch.Tensor]], prefix: str) -> None:
    for key, (path, tensor) in entries.items():
        if prefix and not key.startswith(prefix):
            found.dropped.append(path)
            continue
        name = key[len(prefix) :]
        found.tensors[name] = tensor
        found.origin[name] = path


def _modules(entries: Mapping[str, Any]) -> set[str]:
    return {key.split(".", 1)[0] for key in entries}


def _extract(checkpoint: Mapping[str, Any], source: str) -> _Source:
    dropped: list[str] = []
    dino_part = next(
        (k for k in ("teacher", "student") if isinstance(checkpoint.get(k), Mapping)), None
    )
    if dino_part is not None:
        dropped.extend(str(k) for k in checkpoint if k != dino_part)
        entries = _tensor_entries(checkpoint[dino_part], f"{dino_part}.", dropped)
        note = _NOTES["dino"]
        if dino_part == "student":
            note = "DINO checkpoint without a teacher: the student backbone taken; the DINO head ignored"
        found = _Source("dino", dropped=dropped, note=note)
        _take(found, entries, "backbone." if "backbone" in _modules(entries) else "")
        return _finish(found, checkpoint, source)

    container: Mapping[str, Any] = checkpoint
    prefix = ""
    wrapper = next((w for w in _WRAPPERS if isinstance(checkpoint.get(w), Mapping)), None)
    if wrapper is not None:
        container, prefix = checkpoint[wrapper], f"{wrapper}."
        dropped.extend(str(k) for k in checkpoint if k != wrapper)
    entries = _tensor_entries(container, prefix, dropped)
    modules = _modules(entries)
    lightning = bool(_LIGHTNING_KEYS & set(checkpoint))

    if "encoder_q" in modules:
        fmt, take = "moco-v2", "encoder_q."
    elif "base_encoder" in modules:
        fmt, take = "moco-v3", "base_encoder."
    elif "teacher_backbone" in modules:  # lightly's DINO example model
        fmt, take = "lightly", "teacher_backbone."
    elif "backbone" in modules:
        others = modules - {"backbone"}
        take = "backbone."
        if others & _LIGHTLY_MODULES:
            fmt = "lightly"
        elif others & _SOLO_MODULES or lightning:
            fmt = "solo-learn"
        elif others <= {"head"} and others:
            fmt = "dino"  # a MultiCropWrapper state dict: backbone + DINO head
        elif not others:
            fmt = "state_dict"
        else:
            fmt = "lightly"
    else:
        take = ""
        resnet_layout = "conv1" in modules and "layer1" in modules
        fmt = "torchvision" if resnet_layout else "timm"
    note = _NOTES[fmt]
    if fmt == "lightly" and take == "teacher_backbone.":
        note = "lightly DINO model: 'teacher_backbone' taken; the student and both heads ignored"
    elif fmt == "dino":
        note = "DINO backbone+head state dict: 'backbone.' taken; the DINO head ignored"
    found = _Source(fmt, dropped=dropped, note=note)
    _take(found, entries, take)
    return _finish(found, checkpoint, source)


def _finish(found: _Source, checkpoint: Mapping[str, Any], source: str) -> _Source:
    if not found.tensors:
        top = ", ".join(map(str, list(checkpoint)[:8]))
        raise CheckpointError(
            f"{source}: found no backbone tensors (top-level keys: {top}). Expected a state dict "
            "or a DINO, MoCo, solo-learn, lightly, timm or torchvision checkpoint."
        )
    if all(name.split(".", 1)[0].isdigit() for name in found.tensors):
        _rename_sequential(found)
    return found


def _rename_sequential(found: _Source) -> None:
    """nn.Sequential(*list(resnet.children())[:-1]) keys ('4.0.conv1.weight') -> ResNet names."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in found.tensors.items():
        index, _, rest = name.partition(".")
        child = (
            _TORCHVISION_RESNET_CHILDREN[int(index)]
            if int(index) < len(_TORCHVISION_RESNET_CHILDREN)
            else index
        )
        tensors[f"{child}.{rest}"] = tensor
        origin[f"{child}.{rest}"] = found.origin[name]
    found.tensors, found.origin = tensors, origin
    layout = "nn.Sequential ResNet backbone (numeric keys): 0->conv1, 1->bn1, 4..7->layer1..layer4"
    if found.source_format in ("state_dict", "timm", "torchvision"):
        # Plain numeric keys come from lightly's documented `nn.Sequential(*children[:-1])`.
        found.source_format, found.note = "lightly", layout
    else:
        found.note = f"{found.note}; {layout}"


def _fit(
    found: _Source,
    backbone: torch.nn.Module,
    arch: str,
    arch_kwargs: Mapping[str, Any],
    source: str,
) -> tuple[tuple[str, ...], list[str]]:
    """Check ``found`` against the backbone strictly and load it; returns (mapped, dropped heads)."""
    target = backbone.state_dict()
    heads = [n for n in found.tensors if n not in target and n.split(".", 1)[0] in _HEAD_MODULES]
    tensors = {n: t for n, t in found.tensors.items() if n not in heads}
    what = f"{source} ({found.source_format})"

    for name, wanted in target.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(wanted.shape):
            got = tuple(tensors[name].shape)
            raise CheckpointError(
                f"{what}: tensor {found.origin[name]!r} has shape {got} but {arch}'s {name!r} "
                f"needs {tuple(wanted.shape)}. {_hint(name, got, tensors, backbone, arch, arch_kwargs)}"
            )
    missing = [n for n in target if n not in tensors and not n.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(
            f"{what}: {arch} needs {len(missing)} tensors the checkpoint does not have, e.g. "
            f"{', '.join(missing[:4])}. {_hint('', (), tensors, backbone, arch, arch_kwargs)}"
        )
    unexpected = [n for n in tensors if n not in target]
    if unexpected:
        examples = ", ".join(found.origin[n] for n in unexpected[:4])
        raise CheckpointError(
            f"{what}: {len(unexpected)} tensors of the checkpoint have no place in {arch}, e.g. "
            f"{examples}. {_hint('', (), tensors, backbone, arch, arch_kwargs)}"
        )

    # Checkpoints from before BatchNorm counted batches lack num_batches_tracked; keep ours.
    state = {n: tensors.get(n, default) for n, default in target.items()}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{what}: loading into {arch} failed: {exc}") from exc
    mapped = tuple(n for n in target if n in tensors)
    return mapped, [found.origin[n] for n in heads]


def _hint(
    name: str,
    shape: tuple[int, ...],
    tensors: Mapping[str, torch.Tensor],
    backbone: torch.nn.Module,
    arch: str,
    arch_kwargs: Mapping[str, Any],
) -> str:
    if name == "pos_embed" and len(shape) == 3:
        size = _vit_image_size(backbone, shape[1])
        if size:
            return (
                f"The checkpoint's position embedding is for image_size={size}; "
                f"pass image_size={size} (CLI: --arch {arch} --arch-opt image_size={size})."
            )
    fits = _fitting_archs(tensors, arch, arch_kwargs)
    if fits:
        return f"It fits {' or '.join(fits[:3])}; use that instead."
    return (
        "Pass the --arch (and --arch-opt width=/image_size=) the checkpoint was trained with; "
        "`edge-ssl encoders` lists the archs."
    )


def _vit_image_size(backbone: torch.nn.Module, tokens: int) -> int | None:
    patch = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    if not patch:
        return None
    grid = math.isqrt(max(tokens - prefix, 0))
    if grid * grid != tokens - prefix or grid == 0:
        return None
    return grid * int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _fitting_archs(
    tensors: Mapping[str, torch.Tensor], arch: str, arch_kwargs: Mapping[str, Any]
) -> list[str]:
    """Registered encoders whose backbone the tensors fill exactly."""
    wanted = {
        n: tuple(t.shape) for n, t in tensors.items() if not n.endswith("num_batches_tracked")
    }
    variants = [dict(arch_kwargs)] + ([{}] if arch_kwargs else [])
    fits = []
    for kwargs in variants:
        for name in ENCODERS.names():
            if name == arch and kwargs == dict(arch_kwargs):
                continue
            if _backbone_shapes(name, tuple(sorted(kwargs.items()))) == wanted:
                settings = (
                    " with the default width and image_size" if arch_kwargs and not kwargs else ""
                )
                fits.append(f"arch '{name}'{settings}")
        if fits:
            break
    return fits


@functools.lru_cache(maxsize=128)
def _backbone_shapes(name: str, kwargs: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an encoder's backbone, built on the 'meta' device (no memory, no init)."""
    try:
        with torch.device("meta"):
            backbone = create_encoder(name, **dict(kwargs)).backbone
    except (ConfigError, RuntimeError, TypeError, ValueError):
        return {}
    return {
        n: tuple(t.shape)
        for n, t in backbone.state_dict().items()
        if not n.endswith("num_batches_tracked")
    }
