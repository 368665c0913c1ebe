"""A compress stage ships the graph it was measured on: ``model.onnx`` beside ``model.pt``.

`edge-ssl compress` measures every stage's kNN and latency on an ONNX graph; the float stages
(distill, prune) write that graph into their bundle with its parity record, so the row's
numbers belong to a file that ships, and `edge-ssl export` of the bundle reuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def ship_graph(encoder: Any, images: np.ndarray | None, where: str) -> Any:
    """An ``attach`` for ``write_stage_bundle``: exports ``encoder`` with
    `edge-ssl export`'s defaults (``EXPORT_DEFAULTS``), checks parity on probe images of the stage's data (the embedded
    digits when it has none of the model's size) and adds ``model.onnx`` + ``metrics.export``."""

    def attach(folder: Path) -> tuple[dict[str, Path], dict[str, Any]]:
        from edge_ssl.runtime.export import EXPORT_DEFAULTS, export_checked

        from edge_ssl.output_check import probe_images

        graph = folder / "model.onnx"
        parity = probe_images(encoder.spec.input, images)
        record = export_checked(encoder, graph, parity, dict(EXPORT_DEFAULTS), where=where)
        return {"model.onnx": graph}, {"export": record}

    return attach
