"""A stage looks at the model it is about to write: finite, varied, not collapsed vs its parent."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_ssl.errors import EdgeSSLError

#: Images a stage embeds to check its output (its own data when it has some, else the
#: embedded digits at the model's input size).
PROBE_IMAGES = 64
#: The child's spread rank (the effective rank of its embeddings' variation across images)
#: must keep this share of its parent's. Collapse to a line drives it to ~1; on 64 CIFAR
#: images the shared teacher measures 47, a random-init student 22, and a student after one
#: distillation epoch 24, so 0.1 only catches collapse, not an undertrained model.
RELATIVE_RANK_FLOOR = 0.1
#: Rows with a norm below this are zero embeddings (an image the model maps to nothing).
ZERO_NORM = 1e-12
#: Below this share of a uniform embedding's per-dimension spread every image embeds to the
#: same point. Far under evaluate's collapse ratio (0.02): a fresh MobileNetV3 student after
#: two distillation steps measures 0.011 with its variation spread over 41 directions, an
#: undertrained model rather than a broken one.
CONSTANT_SPREAD_RATIO = 1e-3


class DegenerateOutputError(EdgeSSLError, ValueError):
    """A stage's model gives embeddings that are not usable (NaN, zero, constant, collapsed)."""


@dataclass(frozen=True)
class OutputCheck:
    """What a stage measured on its output before writing (recorded in the metrics)."""

    images: int
    finite: bool
    zero_rows: int
    dim_std_ratio: float  # per-dimension std of unit embeddings / 1/sqrt(D)
    effective_rank: float  # uncentered (edge_ssl.evaluate.embedding_health)
    spread_rank: float
    parent_spread_rank: float | None
    rank_floor: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_images(input_spec: Any, images: np.ndarray | None = None,
                 count: int = PROBE_IMAGES) -> np.ndarray:
    """``count`` evenly spaced images of ``images`` (uint8 NHWC at the model's size), or the
    embedded digits resized to the model's input when there are none of that size."""
    size = tuple(input_spec.shape[1:])
    if images is not None and len(images) >= 2 and tuple(images.shape[1:3]) == size:
        step = max(1, len(images) // count)
        return np.asarray(images[::step][:count])
    from edge_ssl.data.sources import _resized, embedded_default

    digits = embedded_default()
    picked = digits.subset(np.linspace(0, len(digits) - 1, count).astype(int))
    return picked.images if size == picked.images.shape[1:3] else _resized(picked, size[0]).images


def spread_rank(embeddings: np.ndarray) -> float:
    """Effective rank (Roy & Vetterli 2007) of the L2-normalized embeddings after removing
    their mean: how many directions the differences between images use (0 when all agree)."""
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), ZERO_NORM)
    singular = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    if singular.size == 0 or singular.max() <= ZERO_NORM:
        return 0.0
    singular = singular[singular > singular.max() * max(x.shape) * np.finfo(np.float64).eps]
    p = singular / singular.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def check_embeddings(stage: str, embeddings: np.ndarray,
                     parent: np.ndarray | None = None) -> OutputCheck:
    """DegenerateOutputError with the numbers unless ``embeddings`` (N, D) are finite, have no
    zero rows, are not one point (CONSTANT_SPREAD_RATIO), and keep RELATIVE_RANK_FLOOR of
    ``parent``'s spread rank."""
    from edge_ssl.evaluate import embedding_health

    x = np.asarray(embeddings, dtype=np.float64)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise DegenerateOutputError(
            f"{stage} produced a model whose embeddings are not finite for {bad} of {len(x)} "
            "probe images (NaN or inf); nothing was written. Lower the learning rate or check "
            "the input bundle."
        )
    zero_rows = int((np.linalg.norm(x, axis=1) < ZERO_NORM).sum())
    health = embedding_health(x)
    parent_rank = None if parent is None else spread_rank(parent)
    floor = 0.0 if parent_rank is None else RELATIVE_RANK_FLOOR * parent_rank
    check = OutputCheck(len(x), True, zero_rows, health.dim_std_mean / health.uniform_std,
                        health.effective_rank, spread_rank(x), parent_rank, floor)
    constant = check.dim_std_ratio < CONSTANT_SPREAD_RATIO
    if zero_rows or constant or check.spread_rank < max(floor, ZERO_NORM):
        raise DegenerateOutputError(_describe_failure(stage, check))
    return check


def _describe_failure(stage: str, check: OutputCheck) -> str:
    parent = ("" if check.parent_spread_rank is None
              else f" (its parent's {check.parent_spread_rank:.2f}, floor {check.rank_floor:.2f})")
    return (
        f"{stage} produced a degenerate model; nothing was written. On {check.images} probe "
        f"images: {check.zero_rows} all-zero embeddings, per-dimension spread "
        f"{check.dim_std_ratio:.4f} of a uniform embedding's (one point: < "
        f"{CONSTANT_SPREAD_RATIO}), effective "
        f"rank {check.effective_rank:.2f}, spread rank {check.spread_rank:.2f}{parent}. The "
        "representation is gone: check the input bundle with `edge-ssl eval`, and lower the "
        "stage's strength (prune ratio, learning rate) or train it longer on more images."
    )


def check_encoder(stage: str, encoder: Any, parent: Any | None = None,
                  images: np.ndarray | None = None) -> OutputCheck:
    """Embed probe images with ``encoder`` (and ``parent``, an encoder) and check them."""
    from edge_ssl.evaluate import embed

    probe = probe_images(encoder.spec.input, images)
    reference = None
    if parent is not None and tuple(parent.spec.input.shape) == tuple(encoder.spec.input.shape):
        reference = embed(parent, probe, batch_size=PROBE_IMAGES)
    return check_embeddings(stage, embed(encoder, probe, batch_size=PROBE_IMAGES), reference)


def check_graph(stage: str, embed_graph: Callable[[np.ndarray], np.ndarray], input_spec: Any,
                parent: Any | None = None, images: np.ndarray | None = None) -> OutputCheck:
    """The same check for a model that runs as a graph (``embed_graph(images) -> (N, D)``)."""
    from edge_ssl.evaluate import embed

    probe = probe_images(input_spec, images)
    reference = None if parent is None else embed(parent, probe, batch_size=PROBE_IMAGES)
    return check_embeddings(stage, embed_graph(probe), reference)


#: ``attach(folder)`` -> (extra files written into ``folder``, extra metrics): what a stage
#: adds to its bundle once the output check passed (compress: the graph it measured).
Attach = Callable[[Path], tuple[Mapping[str, Path], Mapping[str, Any]]]


def write_stage_bundle(
    out: str | os.PathLike,
    encoder: Any,
    *,
    stage: str,
    lineage: tuple[Any, ...],
    parent: Any | None = None,
    images: np.ndarray | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Any] | None = None,
    attach: Attach | None = None,
    overwrite: bool = False,
) -> Any:
    """Check ``encoder``'s output (against ``parent``, the encoder it came from) on probe
    images, then write it with :func:`edge_ssl.bundle.write_encoder_bundle`; the check goes
    into the metrics as ``output_check``, and ``attach``'s files and metrics (made only after
    the check passed) into the bundle. A degenerate model raises and writes nothing."""
    from edge_ssl.bundle import write_encoder_bundle

    check = check_encoder(stage, encoder, parent, images)
    metrics = {**dict(metrics or {}), "output_check": check.to_dict()}
    files = dict(extra_files or {})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.attach-") as tmp:
        if attach is not None:
            attached, more = attach(Path(tmp))
            files.update(attached)
            metrics.update(more)
        return write_encoder_bundle(out, encoder, lineage=lineage, metrics=metrics,
                                    extra_files=files, overwrite=overwrite)
