"""The per-stage table of a compress run: how each stage is measured, and which is kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.compress.recipe import RecipeConfig

from edge_ssl.bundle import Bundle, record_results, sha256_file

#: The three kinds of latency, never mixed (DESIGN.md "Latency on a board you do not have").
MEASURED_HOST, MEASURED_ON_BOARD, PREDICTED_FOR_BOARD = "measured-host", "measured-on-board", "predicted-for-board"


@dataclass
class StageRow:
    """One row of the per-stage table.

    ``latency_ms`` is ALWAYS this host's onnxruntime-CPU p50 (``latency_kind``
    measured-host). ``board_ms`` is the latency on ``board`` (``board_kind``
    predicted-for-board, with ``board_interval_ms``). ``budget_kind`` says which of the two
    the budget is checked on: the board's for a board, the host's only for ort-cpu.
    """

    name: str
    bundle: str
    params: int | None
    macs: int | None
    bytes: int
    knn_top1: float | None
    latency_ms: float | None
    latency_source: str
    precision: str
    latency_kind: str = MEASURED_HOST
    board: str | None = None
    board_ms: float | None = None
    board_interval_ms: list[float] | None = None
    board_kind: str | None = None
    board_precision: str | None = None
    #: measured on the --on device (measured-on-board) with the agent's backend
    device: str | None = None
    device_ms: float | None = None
    device_backend: str | None = None
    device_providers: list[str] | None = None  # onnxruntime's providers there (CPU-only is said)
    launch_bound_share: float | None = None
    budget_kind: str | None = MEASURED_HOST
    #: the ONNX graph the row was measured on, and whether it is the bundle's own model.onnx
    graph_sha256: str | None = None
    graph_shipped: bool = False

    def budget_ms(self) -> float | None:
        """The latency the budget is checked on (None: none that may be, e.g. tensorrt, no board)."""
        if self.budget_kind == MEASURED_HOST:
            return self.latency_ms
        if self.budget_kind == MEASURED_ON_BOARD:
            return self.device_ms
        return self.board_ms if self.budget_kind == self.board_kind else None

    def latencies(self) -> list[dict[str, Any]]:
        """Every latency of the row with its kind and where it holds."""
        found = []
        if self.latency_ms is not None:
            found.append({"kind": self.latency_kind, "ms": self.latency_ms, "interval_ms": None,
                          "on": "this host (onnxruntime CPU)", "precision": self.precision})
        if self.board_ms is not None:
            found.append({"kind": self.board_kind, "ms": self.board_ms, "interval_ms": self.board_interval_ms,
                          "on": self.board, "precision": self.board_precision})
        if self.device_ms is not None:
            found.append({"kind": MEASURED_ON_BOARD, "ms": self.device_ms, "interval_ms": None,
                          "on": f"{self.device} ({self.device_backend}"
                          f"{': ' + ', '.join(self.device_providers) if self.device_providers else ''})",
                          "precision": self.precision})
        return found

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "latencies": self.latencies()}


@dataclass
class CompressResult:
    rows: list[StageRow]
    chosen: str
    met: bool
    message: str
    bundle: Bundle | None = None
    reused: list[str] = field(default_factory=list)  # stages taken over from an earlier run
    ran: list[str] = field(default_factory=list)  # stages run (or redone) by this run
    search: Any | None = None  # compress.search.SearchResult when a board budget was searched

    def to_dict(self) -> dict[str, Any]:
        search = None if self.search is None else self.search.to_dict()
        return {"stages": [r.to_dict() for r in self.rows], "chosen": self.chosen, "met": self.met,
                "message": self.message, "bundle": None if self.bundle is None else str(self.bundle.path),
                "manifest_sha256": None if self.bundle is None else self.bundle.manifest_sha256,
                "reused": list(self.reused), "ran": list(self.ran),
                "candidates": None if search is None else search["candidates"], "search": search}


class StageMeter:
    """Measures a bundle the same way for every stage: params, MACs, ONNX bytes, kNN, latency."""

    def __init__(self, recipe: RecipeConfig, knn: Any | None, workdir: Path, device: Any = None) -> None:
        self.recipe, self.knn, self.workdir, self.device = recipe, knn, workdir, device

    def measure(self, name: str, bundle: Bundle, *, record: bool = True) -> StageRow:
        """Measure ``bundle``; ``record`` stores the row beside it (never for an input bundle:
        the teacher's folder may be read-only or shared)."""
        from edge_ssl.compress.measure import model_metrics
        from edge_ssl.compress.quantize import onnx_embed

        from edge_ssl.models import load_encoder

        spec = bundle.manifest.input
        if bundle.has("model.pt"):
            encoder = load_encoder(bundle)
            sizes = model_metrics(encoder)
        else:
            sizes = {k: bundle.manifest.metrics.get(k) for k in ("params", "macs")}
        graph = _shipped_graph(bundle) or self._export(encoder, name)
        top1 = None
        if self.knn is not None:
            top1 = self.knn.top1(lambda images: onnx_embed(graph, images, spec))
        latency = self._latency(graph, spec)
        row = StageRow(name, str(bundle.path), sizes["params"], sizes["macs"], graph.stat().st_size, top1,
                       latency, "measured-host: onnxruntime CPU on this machine", bundle.manifest.precision,
                       budget_kind=MEASURED_HOST if self.recipe.target == "ort-cpu" else None,
                       graph_sha256=sha256_file(graph), graph_shipped=bundle.has("model.onnx"))
        if self.recipe.profile is not None:
            prediction = self._board(row, graph)
            if record:
                _record_prediction(bundle, prediction)
        if self.device is not None:
            self._on_device(row, name, bundle, record)
        if record:
            record_results(bundle, "compress_stage", row.to_dict())
        return row

    def _on_device(self, row: StageRow, name: str, bundle: Bundle, record: bool) -> None:
        """Fill ``row``'s MEASURED latency on the --on device; the budget is checked on it."""
        measured = self.device.measure(name, bundle, record=record)
        row.device, row.device_ms, row.device_backend = measured.target, measured.ms, measured.backend
        row.device_providers = measured.providers
        row.budget_kind = MEASURED_ON_BOARD

    def _board(self, row: StageRow, graph: Path) -> Any:
        """Fill ``row``'s board latency: PREDICTED for the recipe's profile (float stages run
        in FP16 there, a quantized one in its own precision)."""
        from edge_ssl.devices.predict import predict_onnx

        precision = row.precision if row.precision in ("int8", "fp16") else "fp16"
        prediction = predict_onnx(graph, self.recipe.profile, precision=precision,
                                  batch=self.recipe.latency_batch)
        row.board, row.board_kind, row.budget_kind = prediction.device, PREDICTED_FOR_BOARD, PREDICTED_FOR_BOARD
        row.board_ms, row.board_interval_ms = prediction.predicted_ms, list(prediction.interval_ms)
        row.board_precision, row.launch_bound_share = precision, prediction.launch_bound_share
        return prediction

    def _export(self, encoder: Any, name: str) -> Path:
        from edge_ssl.runtime.export import export_encoder_onnx

        return export_encoder_onnx(encoder, self.workdir / f"{name}.onnx", dynamic_batch=True)

    def _latency(self, graph: Path, spec: Any) -> float:
        from edge_ssl.compress.measure import ort_latency_ms

        return ort_latency_ms(graph, spec, self.recipe.latency_batch, seconds=self.recipe.bench_seconds,
                              threads=self.recipe.threads)


def _shipped_graph(bundle: Bundle) -> Path | None:
    """The graph ``bundle`` ships when it is the one to measure: a quantized bundle's, or a
    float bundle's own default export (a compress stage's); else None (export one)."""
    from edge_ssl.runtime.export import EXPORT_DEFAULTS, shipped_graph

    if not bundle.has("model.pt"):
        return bundle.file("model.onnx")
    return shipped_graph(bundle, dict(EXPORT_DEFAULTS))


def _record_prediction(bundle: Bundle, prediction: Any) -> None:
    """The stage's board prediction beside it (under 'predict', where `predict` and the report look)."""
    from edge_ssl.devices.predict import record_prediction

    from edge_ssl.errors import BundleError

    try:
        record_prediction(bundle.path, prediction)
    except BundleError:
        pass  # the row in the compress record still has it


def choose_stage(rows: list[StageRow], recipe: RecipeConfig) -> tuple[str, bool, str]:
    """The last stage that meets both targets; else the closest (fewest violated ms/points)."""
    teacher = rows[0]
    candidates = rows[1:] or rows

    def misses(row: StageRow) -> tuple[float, float]:
        latency = 0.0
        if recipe.max_latency_ms is not None and row.budget_ms() is not None:
            latency = max(0.0, row.budget_ms() - recipe.max_latency_ms)
        drop = 0.0
        if recipe.max_knn_drop is not None and row.knn_top1 is not None and teacher.knn_top1 is not None:
            drop = max(0.0, 100 * (teacher.knn_top1 - row.knn_top1) - recipe.max_knn_drop)
        return latency, drop

    meeting = [r for r in candidates if misses(r) == (0.0, 0.0)]
    if meeting:
        return meeting[-1].name, True, f"all targets met by stage {meeting[-1].name!r}"
    best = min(candidates, key=lambda r: (misses(r)[1] > 0, sum(misses(r))))
    late, drop = misses(best)
    parts, hints = [], []
    if late:
        kind = best.budget_kind if best.board is None else f"{best.budget_kind} {best.board}"
        parts.append(f"latency {best.budget_ms():.2f} ms ({kind}) is {late:.2f} ms over --max-latency-ms "
                     f"{recipe.max_latency_ms}")
        hints.append("for latency: a smaller student (--student, --arch-opt width=...) or a higher --prune ratio")
    if drop:
        parts.append(f"kNN drop is {drop:.2f} pts over --max-knn-drop {recipe.max_knn_drop}")
        hints.append("for accuracy: a larger student (--arch-opt width=...), a lower --prune ratio, "
                     "or more distillation (--epochs, more --data images)")
    return best.name, False, (f"target not met; kept the closest stage {best.name!r}: " + "; ".join(parts)
                              + ". Try " + "; ".join(hints) + ".")


def row_text(row: StageRow) -> str:
    """One stage as one line of at most 80 columns (the latency source is in the table's footer)."""
    knn = "-" if row.knn_top1 is None else f"{100 * row.knn_top1:.2f}%"
    latency = "-" if row.latency_ms is None else f"{row.latency_ms:.2f} ms"
    params = "-" if row.params is None else f"{row.params / 1e6:.2f}M"
    macs = "-" if row.macs is None else f"{row.macs / 1e6:.1f}M"
    return (f"{row.name:8s} {params:>7s} params {macs:>8s} MACs {row.bytes / 1e6:6.2f} MB  "
            f"kNN {knn:>6s}  {latency:>9s}")
