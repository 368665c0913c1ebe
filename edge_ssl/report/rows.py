"""What a report shows: its rows and records, and how their numbers are printed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LatencyRecord:
    """One latency summary of one bundle on one backend/device/batch size."""

    backend: str
    device: str
    batch_size: int
    p50: float
    p90: float | None
    p99: float | None = None
    mean: float | None = None
    std: float | None = None
    samples: tuple[float, ...] = ()
    environment: Mapping[str, Any] = field(default_factory=dict)
    predicted: bool = False
    source: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.backend, self.device)

    @property
    def label(self) -> str:
        return f"{self.backend} @ {self.device}" if self.device else self.backend


@dataclass(frozen=True)
class StageRow:
    """One bundle: what it is, what it costs, how accurate and how fast it was measured."""

    name: str
    stage: str
    path: str
    manifest_sha256: str
    parent_sha256: str | None
    precision: str
    arch: str
    params: int | None
    macs: int | None
    bytes: int | None
    knn_top1: float | None
    latencies: tuple[LatencyRecord, ...] = ()
    adaptation: tuple[Mapping[str, Any], ...] = ()
    files: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def measured(self) -> list[LatencyRecord]:
        return [r for r in self.latencies if not r.predicted]

    def predicted(self) -> list[LatencyRecord]:
        return [r for r in self.latencies if r.predicted]

    def headline(self, key: tuple[str, str]) -> LatencyRecord | None:
        """The smallest-batch measured record for (backend, device)."""
        matches = [r for r in self.measured() if r.key == key]
        return min(matches, key=lambda r: r.batch_size) if matches else None


@dataclass(frozen=True)
class LineageNode:
    sha256: str
    name: str
    stage: str
    given: bool  # one of the bundles the report was asked about
    kind: str = "bundle"  # or "engine"


@dataclass(frozen=True)
class LineageEdge:
    parent: str
    child: str
    stage: str


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, already extracted from manifests and results files."""

    title: str
    generated: str
    rows: tuple[StageRow, ...]
    nodes: tuple[LineageNode, ...]
    edges: tuple[LineageEdge, ...]

    def latency_keys(self, predicted: bool = False) -> list[tuple[str, str]]:
        """(backend, device) pairs in first-seen order."""
        keys: list[tuple[str, str]] = []
        for row in self.rows:
            for rec in row.latencies:
                if rec.predicted == predicted and rec.key not in keys:
                    keys.append(rec.key)
        return keys

    def key_label(self, key: tuple[str, str], predicted: bool = False) -> str:
        """'backend @ device', or just 'backend' when every such record is on one device."""
        devices = {k[1] for k in self.latency_keys(predicted)}
        return key[0] if len(devices) == 1 or not key[1] else f"{key[0]} @ {key[1]}"

    def speedup(self, row: StageRow, key: tuple[str, str]) -> float | None:
        """First bundle's p50 / this row's p50, same backend, device and batch size (measured only)."""
        base, mine = self.rows[0].headline(key), row.headline(key)
        if base is None or mine is None or base.batch_size != mine.batch_size or mine.p50 <= 0:
            return None
        return base.p50 / mine.p50


def human_count(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M'; None -> '—'."""
    if value is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".strip()


def human_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{value:.0f} B"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def latency_text(rec: LatencyRecord | None) -> str:
    if rec is None:
        return "—"
    p90 = "—" if rec.p90 is None else f"{rec.p90:.2f}"
    return f"{rec.p50:.2f} / {p90}"


#: A clean-accuracy change below this many points is within the noise of a small test set.
CLEAN_COST_NOTE_PTS = 0.5


def adaptation_outcome(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """Before/after kNN on shifted and clean test images of one adaptation run (its results
    record), the candidate kept, and the sentence that says what adapting cost; None when the
    run measured no accuracy."""
    keys = ("knn_top1_shifted_before", "knn_top1_shifted_after", "knn_top1_clean_before", "knn_top1_clean_after")
    values = {k: summary.get(k) for k in keys}
    if values["knn_top1_shifted_before"] is None or values["knn_top1_shifted_after"] is None:
        return None
    selection = summary.get("selection") if isinstance(summary.get("selection"), Mapping) else {}
    outcome = {**values, "corruption": summary.get("corruption"), "kept": selection.get("kept")}
    return {**outcome, "words": adaptation_words(outcome)}


def adaptation_words(outcome: Mapping[str, Any]) -> str:
    """One sentence: what adapting did on the shifted images and what it cost on clean ones."""
    shift = 100 * (outcome["knn_top1_shifted_after"] - outcome["knn_top1_shifted_before"])
    corruption = outcome.get("corruption") or "the shifted images"
    text = f"Adapting changed kNN top-1 on {corruption} by {shift:+.1f} points"
    kept = outcome.get("kept")
    text += f" (kept: {kept})" if kept else ""
    before, after = outcome.get("knn_top1_clean_before"), outcome.get("knn_top1_clean_after")
    if before is None or after is None:
        return text + "; clean accuracy was not measured."
    cost = 100 * (before - after)
    if cost >= CLEAN_COST_NOTE_PTS:
        return text + f"; it COST {cost:.1f} points of clean accuracy ({100 * before:.1f}% -> {100 * after:.1f}%)."
    return text + f"; clean accuracy {100 * before:.1f}% -> {100 * after:.1f}% (no loss beyond noise)."
