"""Optional INT8 backend: Intel Neural Compressor 3.x PyTorch path (PT2E static quantization, autotune)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from edge_ssl.lazy import require


@dataclass
class IncResult:
    """The INC-quantized PyTorch model (an FX GraphModule in Q/DQ form) and how close it is to FP32."""

    model: Any
    mean_cosine: float
    min_cosine: float
    version: str


def inc_available() -> str | None:
    """None when neural_compressor's PyTorch path imports, else why not (for skips and reports)."""
    try:
        require("neural_compressor.torch.quantization", "the [inc] INT8 backend")
    except ImportError as exc:
        return str(exc)
    return None


def quantize_inc(encoder: Any, reader: Any, *, tolerable_loss: float = 0.01) -> IncResult:
    """Static INT8 quantization of ``encoder`` with INC 3.x ``autotune`` (accuracy-driven).

    ``reader``: an ``ImageCalibrationReader`` (the same calibration protocol as the ORT path):
    its batches calibrate, and the embedding cosine vs FP32 on them is the accuracy INC tunes
    against (``tolerable_loss`` relative). The encoder is not modified. Requires the [inc] extra.
    """
    inc = require("neural_compressor.torch.quantization", "the [inc] INT8 backend")
    inc_export = require("neural_compressor.torch.export", "the [inc] INT8 backend")
    import copy

    import torch

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    model = copy.deepcopy(encoder).float().eval()
    batches = [torch.from_numpy(b) for b in reader.batches()]
    with torch.no_grad():
        reference = torch.cat([model(b) for b in batches])
    batch = torch.export.Dim("batch", min=1, max=4096)
    exported = inc_export.export(model, example_inputs=(batches[0],), dynamic_shapes=({0: batch},))

    def run_fn(candidate: Any) -> None:
        with torch.no_grad():
            for batch in batches:
                candidate(batch)

    def eval_fn(candidate: Any) -> float:
        return _cosines(candidate, batches, reference)[0]

    tune = inc.TuningConfig(config_set=[inc.get_default_static_config()], tolerable_loss=tolerable_loss)
    quantized = inc.autotune(exported, tune_config=tune, eval_fn=eval_fn, run_fn=run_fn,
                             example_inputs=(batches[0],))
    mean, low = _cosines(quantized, batches, reference)
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("neural-compressor-pt")
    except PackageNotFoundError:
        found = "unknown"
    return IncResult(quantized, mean, low, found)


def _cosines(model: Any, batches: list[Any], reference: Any) -> tuple[float, float]:
    import torch
    from edge_ssl.compress.quantize import cosine_stats

    with torch.no_grad():
        out = torch.cat([model(b) for b in batches]).float()
    return cosine_stats(reference.numpy(), out.numpy())
