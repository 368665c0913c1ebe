"""Compare two runners (or two output arrays): max abs/rel error and per-sample cosine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edge_ssl.runtime.errors import RunnerError

#: Cosine floors for a pass, by the precision of the graph under test.
COSINE_FLOOR = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.995, "int8": 0.98, "mixed": 0.995}


@dataclass(frozen=True)
class Comparison:
    """How far ``candidate`` is from ``reference`` for one output.

    ``max_rel`` is the largest absolute difference divided by the largest reference
    magnitude (scale-relative: elementwise ratios explode on near-zero entries).
    ``zero_rows``: samples where either side is an all-zero vector; they count as a
    mismatch (cosine 0), since a model that outputs zeros has lost the image.
    """

    output: str
    max_abs: float
    max_rel: float
    min_cosine: float
    mean_cosine: float
    samples: int
    reference: str = "reference"
    candidate: str = "candidate"
    zero_rows: int = 0

    def passed(self, min_cosine: float) -> bool:
        return bool(self.min_cosine >= min_cosine)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.candidate} vs {self.reference} on {self.output!r}: max_abs {self.max_abs:.3g}, "
            f"max_rel {self.max_rel:.3g}, min cosine {self.min_cosine:.6f}, mean cosine "
            f"{self.mean_cosine:.6f} over {self.samples} samples"
            + (f"; {self.zero_rows} all-zero outputs (a mismatch)" if self.zero_rows else "")
        )


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(a_i, b_i) per row of two (N, ...) arrays (each row flattened), 0 where either row
    is all zero: the one row cosine of the project (parity, quantization, the adaptation guard)."""
    x = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    y = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(norms == 0, 0.0, np.sum(x * y, axis=1) / np.where(norms == 0, 1.0, norms))


def compare_outputs(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    output: str = "embeddings",
    names: tuple[str, str] = ("reference", "candidate"),
) -> Comparison:
    """Compare two (N, ...) arrays sample by sample (cosine over the flattened sample)."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(candidate, dtype=np.float64)
    if ref.shape != out.shape:
        raise RunnerError(
            f"cannot compare {output!r}: {names[0]} gives shape {ref.shape}, {names[1]} gives "
            f"{out.shape}. Both must produce the same shape for the same inputs."
        )
    if ref.size == 0:
        raise RunnerError(f"cannot compare {output!r}: the outputs are empty.")
    diff = np.abs(ref - out)
    scale = float(np.abs(ref).max())
    # A zero-norm sample never agrees, not even with another zero vector: two models that
    # both output zeros are both broken, not equal.
    cosine = row_cosines(ref, out)
    degenerate = (np.abs(ref.reshape(len(ref), -1)).max(axis=1) == 0) | (
        np.abs(out.reshape(len(out), -1)).max(axis=1) == 0)
    finite = np.isfinite(out).all()
    return Comparison(
        output=output,
        max_abs=float(diff.max()) if finite else float("inf"),
        max_rel=float(diff.max() / scale) if finite and scale > 0 else float("inf"),
        min_cosine=float(cosine.min()) if finite else float("-inf"),
        mean_cosine=float(cosine.mean()) if finite else float("-inf"),
        samples=int(ref.shape[0]),
        reference=names[0],
        candidate=names[1],
        zero_rows=int(degenerate.sum()),
    )


def compare_runners(
    a: Any, b: Any, inputs: np.ndarray | Iterable[np.ndarray], *, output: str = "embeddings"
) -> Comparison:
    """Run the same inputs through runners ``a`` (reference) and ``b`` and compare outputs.

    ``inputs`` is one float32 NCHW batch or an iterable of batches, as the runners expect
    (normalized unless the graph bakes normalization in). Inactive runners are activated
    for the comparison and deactivated afterwards.
    """
    batches = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    if not batches:
        raise RunnerError("compare_runners needs at least one input batch; got none.")
    outs = []
    for runner in (a, b):
        with _active(runner):
            outs.append(np.concatenate([runner.infer(batch) for batch in batches]))
    names = (_label(a), _label(b))
    return compare_outputs(outs[0], outs[1], output=output, names=names)


def _label(runner: Any) -> str:
    info: Mapping[str, Any] = getattr(runner, "info", {}) or {}
    return str(info.get("name") or info.get("backend") or type(runner).__name__)


class _active:
    """Activate a runner for a block unless the caller already did."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.opened = False

    def __enter__(self) -> Any:
        if not getattr(self.runner, "is_active", True):
            self.runner.activate()
            self.opened = True
        return self.runner

    def __exit__(self, *exc: object) -> None:
        if self.opened:
            self.runner.deactivate()


def compare_bundles(
    a: Any,
    b: Any,
    *,
    backend_a: str = "default",
    backend_b: str = "auto",
    data: list[str] | None = None,
    limit: int = 64,
) -> Comparison:
    """Embed the same real images with A and B (bundles or .onnx files) and compare.

    ``backend_a`` "default" means torch when A holds float weights (the reference a graph
    should match), else auto. Each runner gets the input its graph expects.
    """
    from edge_ssl.runtime.backends import open_runner
    from edge_ssl.runtime.embed import embed_with_runner, sample_images

    sides = [_open_side(a), _open_side(b)]
    spec = next((s.manifest.input for s in sides if s is not None), None)
    if spec is None:
        raise RunnerError("compare needs at least one bundle (for the input spec); both are bare .onnx files.")
    if backend_a == "default":
        backend_a = "torch" if sides[0] is not None and sides[0].has("model.pt") else "auto"
    images = sample_images(data, limit)
    outs, names = [], []
    for target, side, backend in ((a, sides[0], backend_a), (b, sides[1], backend_b)):
        runner = open_runner(side if side is not None else target, backend)
        outs.append(embed_with_runner(runner, images, spec, batch_size=32))
        names.append(f"{Path(str(target)).name}:{runner.info.get('name')}")
    return compare_outputs(outs[0], outs[1], output="embeddings", names=(names[0], names[1]))


def _open_side(target: Any) -> Any:
    from edge_ssl.bundle import Bundle

    if isinstance(target, Bundle):
        return target
    if str(target).endswith(".onnx"):
        return None
    return Bundle.open(target)
