"""Embed uint8 images with any runner (how INT8/FP16 graphs are evaluated; no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from edge_ssl.runtime.errors import RunnerError
from edge_ssl.runtime.preprocess import preprocess_images

from edge_ssl.spec import InputSpec


def embed_with_runner(
    runner: Any,
    images_uint8: np.ndarray,
    input_spec: InputSpec | Mapping[str, Any],
    batch_size: int = 256,
) -> np.ndarray:
    """(N, D) float32 embeddings of uint8 NHWC images, preprocessed batch by batch.

    Follows the graph's normalization (``runner.info["normalization"]``); a static-batch
    engine gets its last batch padded and the padding dropped. Activates the runner if needed.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RunnerError(f"batch_size must be a positive integer; got {batch_size!r}.")
    opened = not runner.is_active
    if opened:
        runner.activate()
    try:
        raw = runner.info.get("normalization") == "baked"
        fixed = runner.max_batch_size
        step = fixed or batch_size
        chunks = []
        for start in range(0, len(images_uint8), step):
            batch = preprocess_images(images_uint8[start:start + step], input_spec, normalize=not raw)
            count = len(batch)
            if fixed and count < fixed:
                batch = np.concatenate([batch, np.repeat(batch[-1:], fixed - count, axis=0)])
            chunks.append(runner.infer(batch)[:count])
    finally:
        if opened:
            runner.deactivate()
    if not chunks:
        raise RunnerError("embed_with_runner got no images; pass a non-empty uint8 (N, H, W, C) array.")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def sample_images(data: list[str] | None = None, limit: int = 64) -> np.ndarray:
    """Real uint8 images for checks: ``data`` sources (test split) or the embedded digits test split."""
    from edge_ssl.data.sources import embedded_default, load_images

    if not isinstance(limit, int) or limit < 1:
        raise RunnerError(f"limit must be a positive integer; got {limit!r}.")
    dataset = load_images(list(data), split="test", limit=limit) if data else embedded_default("test")
    return dataset.images[:limit]
