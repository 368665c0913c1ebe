"""What an adaptation run checks, reads and writes: inputs, replay, checkpoint path, lineage, the bundle."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.adapt.config import MIN_BATCH, MIN_HOLDOUT, MIN_IMAGES, AdaptConfig
from edge_ssl.bundle import Bundle
from edge_ssl.config import config_to_dict
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import BundleError, DataError
from edge_ssl.evaluate import EmbeddingHealth
from edge_ssl.lineage import require_float_weights
from edge_ssl.output_check import write_stage_bundle
from edge_ssl.outputs import check_bundle_out, checkpoint_dir
from edge_ssl.stage import StageResult


@dataclass(frozen=True)
class AdaptEvent:
    """Progress of a run, for a progress bar: phase 'stats', 'plan', 'step', 'guard' or 'write'."""

    phase: str
    step: int
    steps: int
    loss: float | None = None
    batch: int | None = None
    message: str = ""


@dataclass
class AdaptResult(StageResult):
    """What a run did: the new bundle, the plan, health before/after, and why it stopped.
    ``metrics`` is the run's own section of the bundle's metrics (``adapt``)."""

    plan: dict[str, Any]
    steps_done: int
    stopped: str | None
    health_before: EmbeddingHealth
    health_after: EmbeddingHealth
    agreement_after: float
    peak_step_mb: float
    seconds_per_step: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    guard: list[dict[str, Any]] = field(default_factory=list)
    export: dict[str, Any] = field(default_factory=dict)
    #: which of unadapted / AdaBN alone / adapted was kept and the criterion's values
    selection: dict[str, Any] | None = None
    #: every candidate encoder scored (for benchmarks; not serialized)
    candidates: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle.path),
            "plan": self.plan,
            "steps_done": self.steps_done,
            "stopped": self.stopped,
            "health_before": self.health_before.to_dict(),
            "health_after": self.health_after.to_dict(),
            "agreement_after": self.agreement_after,
            "peak_step_mb": self.peak_step_mb,
            "seconds_per_step": self.seconds_per_step,
            "guard": self.guard,
            "export": self.export,
            "selection": self.selection,
            **{k: v for k, v in self.metrics.items() if k in ("device_cost", "requantize")},
        }


def checkpoint_path(out: str | os.PathLike) -> Path:
    """Where a run writing ``out`` keeps its periodic checkpoint: ``OUT.ckpt/adapt.pt``."""
    out = Path(out)
    return checkpoint_dir(out) / "adapt.pt"


def run_out(deployed: Bundle, out: str | os.PathLike) -> Path:
    """Where the adaptation run of ``deployed`` writes (and checkpoints beside): ``out``, or for
    a quantized bundle its float weights at OUT.stages/adapt.edge, re-quantized into ``out``."""
    from edge_ssl.adapt.requantize import float_out, quantize_entry

    return float_out(Path(out)) if quantize_entry(deployed) is not None else Path(out)


def data_fingerprint(images: np.ndarray) -> str:
    """sha256 (first 16 hex) of the local images: lineage records it; --resume checks it."""
    import hashlib

    digest = hashlib.sha256(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()[:16]


def check_inputs(
    bundle: Bundle | str | os.PathLike, data: ImageDataset, out: str | os.PathLike,
    *, overwrite: bool, resume: bool,
) -> tuple[Bundle, Bundle]:
    """Everything that can fail before any work: (deployed bundle, bundle with float weights)."""
    deployed = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=True)
    weights = require_float_weights(deployed, "adaptation")
    out = Path(out)
    if out.resolve() in (deployed.path.resolve(), weights.path.resolve()):
        raise BundleError(f"--out {out} is the input bundle; adaptation writes a new bundle.")
    check_bundle_out(out, overwrite=overwrite)  # also: a non-bundle there is never replaced
    _check_checkpoint(checkpoint_path(run_out(deployed, out)), out, resume)
    if len(data) < MIN_IMAGES:
        raise DataError(
            f"adaptation needs at least {MIN_IMAGES} local images ({MIN_HOLDOUT} held back for the "
            f"guard plus a few batches of {MIN_BATCH}); {data.source} has {len(data)}. Collect "
            "more images first (a few hundred work well)."
        )
    return deployed, weights


def _check_checkpoint(ckpt: Path, out: Path, resume: bool) -> None:
    """--resume needs the run's checkpoint; a checkpoint there needs --resume (or deleting)."""
    if ckpt.exists() and not resume:
        raise BundleError(
            f"{ckpt} holds an interrupted adaptation run for {out}; pass --resume to continue "
            f"it, or delete {ckpt.parent} to start over."
        )
    if resume and not ckpt.exists():
        raise BundleError(f"--resume: no checkpoint of an interrupted run for {out} at {ckpt}; "
                          "run without --resume to start.")


def split_holdout(count: int, config: AdaptConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-back indices) for the guard; seeded, so --resume gets the same split."""
    order = np.random.default_rng(config.seed).permutation(count)
    hold = max(MIN_HOLDOUT, int(round(config.holdout_frac * count)))
    return np.sort(order[hold:]), np.sort(order[:hold])


def check_replay(replay: np.ndarray | None, config: AdaptConfig, deployed: Bundle,
                 weights: Bundle) -> np.ndarray | None:
    """The replay images a run uses: ``replay``, else the bundle's ``adapt_replay.npz``; None
    when ``replay_weight`` is 0. DataError when the weight needs images and there are none."""
    if config.replay_weight <= 0:
        return None
    from edge_ssl.adapt.replay import check_replay_images, load_replay

    if replay is None:
        replay = load_replay(deployed, weights)
    if replay is None:
        raise DataError("replay_weight > 0 needs clean replay images: a bundle from edge-ssl adapt-tune "
                        "(adapt_replay.npz), --replay-data or adapt(..., replay=); none were given. "
                        "Use replay_weight=0 without them.")
    return check_replay_images(replay, "replay")


def check_bank(replay: np.ndarray | None, labels: np.ndarray | None, config: AdaptConfig,
               deployed: Bundle, weights: Bundle) -> tuple[np.ndarray, np.ndarray] | None:
    """The labeled clean images ``keep_best`` scores against: ``replay`` with ``labels``, else
    the bundle's replay file when it holds labels; None without labels (the criterion is then
    view consistency, edge_ssl.adapt.select)."""
    if not config.keep_best:
        return None
    if replay is not None:
        if labels is None:
            return None
        labels = np.asarray(labels)
        if labels.shape != (len(replay),) or labels.dtype.kind not in "iu":
            raise DataError(f"replay_labels must be integers, one per replay image ({len(replay)}); "
                            f"got {labels.dtype} {labels.shape}.")
        return replay, labels
    from edge_ssl.adapt.replay import load_replay_bank

    found = load_replay_bank(deployed, weights)
    return None if found is None or found[1] is None else (found[0], found[1])


def deployment_name(bundle: Bundle) -> str:
    """The deployment an adapted bundle belongs to: the name of the model that adaptation
    started from (through any chain of adaptations), else the bundle's own name."""
    name = bundle.manifest.name
    for entry in reversed(bundle.manifest.lineage):
        if entry.stage != "adapt" or not entry.parent_name:
            break
        name = entry.parent_name
    return name


def lineage_settings(config: AdaptConfig, data: ImageDataset, plan: dict[str, Any],
                     extra: dict[str, Any]) -> dict[str, Any]:
    """The lineage entry's settings: config, data fingerprint, plan and what happened."""
    return {
        "config": config_to_dict(config),
        "data": {"source": data.source, "images": len(data),
                 "fingerprint": data_fingerprint(data.images),
                 "image_size": list(data.image_size)},
        "trainable": plan.get("trainable"),
        "plan": plan,
        **extra,
    }


def write_adapted(out: Path, encoder: Any, lineage: tuple, metrics: dict[str, Any], *,
                  overwrite: bool, extra_files: dict[str, Path] | None = None,
                  weights: Bundle | None = None, images: np.ndarray | None = None) -> Bundle:
    """The adapted bundle: a plain encoder with the parent's spec, written atomically once its
    output on ``images`` is checked against the deployed weights (``weights``)."""
    from edge_ssl.models import load_encoder

    parent = None if weights is None else load_encoder(weights)
    return write_stage_bundle(out, encoder, stage="adapt", parent=parent, images=images,
                              lineage=lineage, metrics=metrics, extra_files=extra_files,
                              overwrite=overwrite)
