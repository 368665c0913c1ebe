"""On-device adaptation: a deployed encoder keeps learning from unlabeled local images, within a memory budget."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.adapt.config import AdaptConfig
from edge_ssl.adapt.export import engine_messages
from edge_ssl.adapt.inputs import (
    AdaptEvent,
    AdaptResult,
    check_bank,
    check_inputs,
    check_replay,
    run_out,
)
from edge_ssl.adapt.run import run_adaptation
from edge_ssl.bundle import Bundle, check_bundle_out
from edge_ssl.data.sources import ImageDataset
from edge_ssl.errors import BundleError

__all__ = ["AdaptConfig", "AdaptEvent", "AdaptResult", "adapt"]


def adapt(
    bundle: Bundle | str | os.PathLike,
    data: ImageDataset,
    out: str | os.PathLike,
    config: AdaptConfig = AdaptConfig(),
    *,
    resume: bool = False,
    overwrite: bool = False,
    profile_memory_gb: float | None = None,
    export: str = "auto",
    progress: Callable[[AdaptEvent], None] | None = None,
    replay: np.ndarray | None = None,
    replay_labels: np.ndarray | None = None,
    profile: str | None = None,
    power: Any = None,
) -> AdaptResult:
    """Adapt ``bundle``'s encoder to the unlabeled ``data`` and write the result to ``out``.

    AdaBN statistics first, then ``config.steps`` SSL + distillation steps on the subset
    the memory budget allows, guarded against collapse and drift; the bundle is written
    atomically at the end (an interrupted run leaves only ``OUT.ckpt/``, for ``--resume``).
    ``export``: 'auto' re-exports ONNX (and refits TensorRT engines) when the input bundle
    had them, 'always', or 'never'. ``replay``: clean uint8 (N, H, W, 3) images for the
    ``replay_weight`` term (never the local images); by default the bundle's own
    (``adapt_replay.npz``, written by ``edge-ssl adapt-tune``). ``config`` is used as given: build it with
    ``edge_ssl.adapt.tune.adapt_config_for`` to start from the BN settings that
    ``edge-ssl adapt-tune`` recorded in the bundle, as the CLI does.
    ``replay_labels``: labels of ``replay`` (default: the bundle's, when its replay file has
    them); with them the replay images are the labeled bank that ``keep_best`` scores against.
    ``profile``: a device profile name; the step's time on it is PREDICTED into the metrics.
    ``power``: an ``edge_ssl.devices.remote_adapt.StepPowerMeter`` (the CLI passes one): energy
    per step MEASURED with tegrastats, or None with the reason, in ``device_cost['energy']``.
    """
    deployed, weights = check_inputs(bundle, data, out, overwrite=overwrite, resume=resume)
    if export not in ("auto", "always", "never"):
        raise BundleError(f"export must be auto, always or never; got {export!r}.")
    bank = check_bank(replay, replay_labels, config, deployed, weights)
    replay = check_replay(replay, config, deployed, weights)
    float_path = run_out(deployed, out)
    requantized = float_path != Path(out)
    if requantized:
        check_bundle_out(float_path, overwrite=overwrite or resume)
    result = run_adaptation(
        deployed, weights, data, float_path, config, resume=resume, overwrite=overwrite or requantized,
        profile_memory_gb=profile_memory_gb, export="never" if requantized else export,
        progress=progress or (lambda e: None), replay=replay, bank=bank, profile=profile, power=power,
    )
    if requantized:
        _requantize(result, deployed, data, Path(out), overwrite=overwrite, bank=bank, progress=progress)
    for line in engine_messages(result.export):  # refit here or rebuilt on the device: say which
        (progress or (lambda e: None))(AdaptEvent("write", result.steps_done, result.steps_done,
                                                  message=line))
    return result


def _requantize(result: AdaptResult, deployed: Bundle, data: ImageDataset, out: Path, *,
                overwrite: bool, bank: tuple[np.ndarray, np.ndarray] | None,
                progress: Callable[[AdaptEvent], None] | None) -> None:
    """Replace ``result.bundle`` (the adapted float weights) by its re-quantized child at ``out``."""
    from edge_ssl.adapt.requantize import requantize

    if progress is not None:
        progress(AdaptEvent("write", result.steps_done, result.steps_done,
                            message=f"re-quantizing to {deployed.manifest.precision} like the deployed bundle"))
    written, measured = requantize(deployed, result.bundle, data.images, out, overwrite=overwrite, bank=bank,
                                   device_cost=result.metrics.get("device_cost"))
    result.metrics["requantize"] = measured
    result.export = {**result.export, "requantize": measured, "float_weights": str(result.bundle.path)}
    result.bundle = written
