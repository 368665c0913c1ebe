"""Charts for the report (matplotlib, Agg, no pyplot global state): PNG bytes per chart name."""

from __future__ import annotations

import io
from typing import Any

from edge_ssl.report.rows import LatencyRecord, ReportData

_MARKERS = "osD^vP*Xh<>"


def render_charts(data: ReportData) -> dict[str, bytes]:
    """{'pareto': png, 'latency': png, 'predicted': png, 'adaptation': png}; absent when no data."""
    from edge_ssl.lazy import require

    require("matplotlib", "drawing the report's charts")
    charts = {}
    if any(row.knn_top1 is not None and row.measured() for row in data.rows):
        charts["pareto"] = pareto_chart(data)
    if any(row.measured() for row in data.rows):
        charts["latency"] = latency_chart(data)
    if any(row.predicted() for row in data.rows):
        charts["predicted"] = predicted_chart(data)
    if any(row.adaptation for row in data.rows):
        charts["adaptation"] = adaptation_chart(data)
    return charts


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _latency_axis(ax: Any, values: list[float], axis: str) -> None:
    """Log scale with plain-number ticks when latencies span 10x or more, linear otherwise."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    positive = [v for v in values if v > 0]
    if not positive or max(positive) / min(positive) < 10:
        return
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_formatter(ScalarFormatter())
    target.set_minor_formatter(NullFormatter())


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def pareto_chart(data: ReportData) -> bytes:
    """kNN top-1 vs measured p50 latency: one marker per stage, one colour per backend@device."""
    fig = _figure(9.5, 4.5)
    ax = fig.add_subplot()
    keys = data.latency_keys()
    points = []
    for k, key in enumerate(keys):
        colour = f"C{k % 10}"
        for r, row in enumerate(data.rows):
            rec = row.headline(key)
            if rec is None or row.knn_top1 is None:
                continue
            points.append((rec.p50, row.knn_top1))
            ax.scatter(rec.p50, 100 * row.knn_top1, color=colour, marker=_MARKERS[r % len(_MARKERS)],
                       s=60, label=f"{row.name} · {data.key_label(rec.key)}")
    frontier = pareto_front(points)
    if len(frontier) > 1:
        ax.plot([p[0] for p in frontier], [100 * p[1] for p in frontier], "k--", lw=1,
                label="Pareto front (measured)")
    _latency_axis(ax, [p[0] for p in points], "x")
    ax.set_xlabel("measured latency p50, ms (batch as benchmarked)")
    ax.set_ylabel("kNN top-1, %")
    ax.set_title("Accuracy vs latency (measured)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another that is both faster and at least as accurate (sorted by latency)."""
    front: list[tuple[float, float]] = []
    for latency, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((latency, accuracy))
    return front


def latency_chart(data: ReportData) -> bytes:
    """Measured latency per stage and backend: box plots of samples, else p50-p90-p99 ranges."""
    records: list[tuple[str, LatencyRecord]] = [
        (row.name, rec) for row in data.rows for rec in row.measured()
    ]
    fig = _figure(7.5, max(2.5, 0.35 * len(records) + 1.2))
    ax = fig.add_subplot()
    for i, (_name, rec) in enumerate(records):
        colour = f"C{data.latency_keys().index(rec.key) % 10}"
        if len(rec.samples) >= 5:
            box = ax.boxplot([list(rec.samples)], positions=[i], orientation="horizontal", widths=0.6,
                             patch_artist=True, showfliers=True, flierprops={"markersize": 2})
            box["boxes"][0].set_facecolor(colour)
            box["boxes"][0].set_alpha(0.5)
        else:
            high = rec.p99 or rec.p90 or rec.p50
            ax.plot([rec.p50, high], [i, i], color=colour, lw=6, alpha=0.5, solid_capstyle="butt")
            ax.plot([rec.p50], [i], "|", color="k", ms=12)
            if rec.p90 is not None:
                ax.plot([rec.p90], [i], "|", color=colour, ms=12)
    ax.set_yticks(range(len(records)))
    ax.set_yticklabels([f"{name} · {data.key_label(rec.key)} · b{rec.batch_size}" for name, rec in records], fontsize=7)
    ax.invert_yaxis()
    values = [v for _, rec in records for v in (*rec.samples, rec.p50, rec.p99 or rec.p50)]
    _latency_axis(ax, values, "x")
    ax.set_xlabel("latency, ms (box: samples; bar: p50 | p90 to p99)")
    ax.set_title("Latency distributions (measured)")
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def predicted_chart(data: ReportData) -> bytes:
    """Predicted p50 per stage and device profile: a separate chart so it never mixes with measured."""
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot()
    keys = data.latency_keys(predicted=True)
    width = 0.8 / max(1, len(keys))
    for k, key in enumerate(keys):
        xs, ys = [], []
        for r, row in enumerate(data.rows):
            recs = [rec for rec in row.predicted() if rec.key == key]
            if recs:
                xs.append(r + k * width)
                ys.append(min(recs, key=lambda rec: rec.batch_size).p50)
        ax.bar(xs, ys, width=width, label=f"{key[1] or key[0]} (predicted)", hatch="//", alpha=0.6)
    ax.set_xticks([r + 0.4 - width / 2 for r in range(len(data.rows))])
    ax.set_xticklabels([row.name for row in data.rows], fontsize=7, rotation=20)
    _latency_axis(ax, [rec.p50 for row in data.rows for rec in row.predicted()], "y")
    ax.set_ylabel("PREDICTED latency, ms")
    ax.set_title("Predicted latency on device profiles (a model, not a measurement)")
    ax.legend(fontsize=7)
    return _png(fig)


def adaptation_chart(data: ReportData) -> bytes:
    """Adaptation loss and embedding-health curves, one line per adapted bundle."""
    curves = [(row.name, c) for row in data.rows for c in row.adaptation]
    present = {k for _, c in curves for step in c["history"] for k in step} - {"step", "epoch", "batch"}
    preferred = ("loss", "effective_rank", "agreement", "dim_std_mean")
    fields = [f for f in preferred if f in present] or sorted(present)[:4]
    fig = _figure(7.5, 2.6 * max(1, len(fields)))
    axes = fig.subplots(max(1, len(fields)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, name in zip(axes, fields or ["loss"], strict=False):
        for label, curve in curves:
            points = {}  # step -> value; a later record of the same step (the final check) wins
            for i, step in enumerate(curve["history"]):
                if name in step:
                    points[step.get("step", step.get("epoch", i))] = step[name]
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker=".", label=label)
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("On-device adaptation")
    axes[-1].set_xlabel("step")
    return _png(fig)
