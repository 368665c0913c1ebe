"""Accuracy-latency report over bundles: collect measured/predicted numbers and write HTML or Markdown."""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ssl.errors import ConfigError

#: Where a bundle's deployable model lives, most specific first (its size is the "size" column).
MODEL_FILES = ("model.int8.onnx", "model.onnx", "model.pt")
#: kNN k shown in the table when several were measured.
PREFERRED_K = "20"

_P50 = ("p50", "p50_ms", "median_ms", "median", "refined_ms", "predicted_ms")
_P90 = ("p90", "p90_ms")
_P99 = ("p99", "p99_ms")
_MEAN = ("mean", "mean_ms")
_STD = ("std", "std_ms")
_SAMPLES = ("samples_ms", "latencies_ms", "samples", "times_ms")
_BACKEND = ("backend", "runner")
_DEVICE = ("device", "target", "profile", "device_profile", "on")
_BATCH = ("batch_size", "batch")
_ENVIRONMENT = ("environment", "env")
_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mixed", "best")
_GROUPING_KEYS = ("batches", "batch_sizes", "per_batch", "results", "records", "summary", "latency")
_BACKEND_HINT = re.compile(r"ort|onnx|torch|tensorrt|trt|cuda|cpu|openvino", re.IGNORECASE)


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


# ------------------------------------------------------------------ collecting


def collect_report(bundle_paths: Sequence[str | os.PathLike], title: str | None = None) -> ReportData:
    """Open each bundle (verified) and extract its row, results and lineage."""
    from edge_ssl.bundle import Bundle, read_results

    if not bundle_paths:
        raise ConfigError("report needs at least one bundle; pass NAME.edge paths in pipeline order.")
    bundles = [Bundle.open(path, verify=True) for path in bundle_paths]
    results = [read_results(bundle) for bundle in bundles]
    measured_by_compress = compress_rows_by_path(results)
    rows = [stage_row(bundle, found, compress_row_of(bundle, found, measured_by_compress))
            for bundle, found in zip(bundles, results, strict=True)]
    nodes, edges = lineage_graph(bundles)
    return ReportData(
        title=title or "edge-ssl report: " + (
            rows[0].name if len(rows) == 1 else f"{rows[0].name} -> {rows[-1].name}"),
        generated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        rows=tuple(rows),
        nodes=tuple(nodes),
        edges=tuple(edges),
    )


def stage_row(bundle: Any, results: Mapping[str, Any], compress: Mapping[str, Any] | None = None) -> StageRow:
    """The report row of one bundle from its manifest, its results-file entry and, when
    `edge-ssl compress` measured it, that stage row (kNN, MACs, params, ORT-CPU latency)."""
    manifest = bundle.manifest
    metrics = dict(manifest.metrics)
    last = manifest.lineage[-1] if manifest.lineage else None
    compress = compress or {}
    # What compress measured wins over the manifest; a later count beside the bundle fills gaps.
    model = results.get("model") if isinstance(results.get("model"), Mapping) else {}
    measured = {k: compress[k] for k in ("params", "macs") if _is_number(compress.get(k))}
    counted = {**model, **{k: v for k, v in metrics.items() if _is_number(v)}, **measured,
               "nested": metrics}
    # kNN: an explicit `edge-ssl eval` first, then compress's measurement, then the manifest's.
    knn = knn_top1_of(results, {})
    if knn is None:
        knn = float(compress["knn_top1"]) if _is_number(compress.get("knn_top1")) else knn_top1_of({}, metrics)
    return StageRow(
        name=manifest.name,
        stage=stage_label(manifest.lineage),
        path=str(bundle.path),
        manifest_sha256=bundle.manifest_sha256,
        parent_sha256=last.parent if last else None,
        precision=manifest.precision,
        arch=manifest.encoder.arch,
        params=_as_int(find_number(counted, ("params", "parameters", "num_params"))),
        macs=_as_int(find_number(counted, ("macs", "mac"))),
        bytes=model_bytes(manifest, metrics),
        knn_top1=knn,
        latencies=tuple(latency_records(results, metrics) + compress_latency(compress)),
        adaptation=tuple(adaptation_histories(results, metrics)),
        files={name: {"sha256": rec.sha256, "bytes": rec.bytes} for name, rec in manifest.files.items()},
    )


#: The backend column of the ONNX Runtime CPU latency that `edge-ssl compress` measured.
COMPRESS_BACKEND = "ort-cpu (compress)"


def compress_row_of(bundle: Any, results: Mapping[str, Any],
                    by_path: Mapping[Path, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The stage row `edge-ssl compress` recorded for this bundle.

    Its own 'compress_stage' record (every stage bundle), else the chosen stage of its
    'compress' record (the final bundle), else the row of another reported bundle's
    'compress' record that names this bundle's path (the teacher, which compress never
    writes beside) with the same precision.
    """
    own = results.get("compress_stage")
    if isinstance(own, Mapping):
        return own
    final = results.get("compress")
    if isinstance(final, Mapping):
        chosen = [r for r in final.get("stages") or () if isinstance(r, Mapping)
                  and r.get("name") == final.get("chosen")]
        if chosen:
            return chosen[-1]
    row = by_path.get(_resolved(bundle.path))
    return row if row is not None and row.get("precision") == bundle.manifest.precision else None


def compress_rows_by_path(results: Sequence[Mapping[str, Any]]) -> dict[Path, Mapping[str, Any]]:
    """Every stage row of every 'compress' record, by the resolved path of the bundle it measured."""
    rows: dict[Path, Mapping[str, Any]] = {}
    for found in results:
        record = found.get("compress")
        stages = record.get("stages") if isinstance(record, Mapping) else None
        for row in stages or ():
            if isinstance(row, Mapping) and isinstance(row.get("bundle"), str):
                rows[_resolved(Path(row["bundle"]))] = row
    return rows


def compress_latency(row: Mapping[str, Any]) -> list[LatencyRecord]:
    """Compress's measured ORT-CPU p50 as a latency record (no p90 or environment was kept)."""
    if not _is_number(row.get("latency_ms")):
        return []
    batch = row.get("latency_batch")
    return [LatencyRecord(backend=COMPRESS_BACKEND, device="", p50=float(row["latency_ms"]), p90=None,
                          batch_size=int(batch) if _is_number(batch) else 1,
                          source=f"compress: {row.get('latency_source', 'measured')}")]


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except OSError:
        return Path(path)


def stage_label(lineage: Sequence[Any]) -> str:
    """The stage that made a bundle; an export names what it exported ('prune + export')."""
    if not lineage:
        return "?"
    if lineage[-1].stage == "export" and len(lineage) > 1:
        return f"{lineage[-2].stage} + export"
    return lineage[-1].stage


def find_number(data: Mapping[str, Any], names: Iterable[str], depth: int = 2) -> float | None:
    """The first numeric value under one of ``names``, top level first, then nested dicts."""
    names = tuple(names)
    for name in names:
        value = data.get(name)
        if _is_number(value):
            return float(value)
    if depth > 1:
        for value in data.values():
            if isinstance(value, Mapping):
                found = find_number(value, names, depth - 1)
                if found is not None:
                    return found
    return None


def model_bytes(manifest: Any, metrics: Mapping[str, Any]) -> int | None:
    """Size of the deployable model file (metrics 'bytes' wins when the stage recorded one)."""
    recorded = find_number(metrics, ("bytes", "model_bytes", "size_bytes"), depth=1)
    if recorded is not None:
        return int(recorded)
    for name in MODEL_FILES:
        if name in manifest.files:
            return int(manifest.files[name].bytes)
    return None


def knn_top1_of(results: Mapping[str, Any], metrics: Mapping[str, Any]) -> float | None:
    """kNN top-1 (fraction) from the results file's 'eval', else from the manifest metrics."""
    for source in (results.get("eval"), metrics):
        if not isinstance(source, Mapping):
            continue
        value = _knn_value(source)
        if value is not None:
            return value
        for nested in source.values():
            if isinstance(nested, Mapping) and (value := _knn_value(nested)) is not None:
                return value
    return None


def _knn_value(data: Mapping[str, Any]) -> float | None:
    value = data.get("knn_top1")
    if _is_number(value):
        return float(value)
    if isinstance(value, Mapping) and value:
        if _is_number(value.get(PREFERRED_K)):
            return float(value[PREFERRED_K])
        first = sorted(value, key=lambda k: int(k) if str(k).isdigit() else 1 << 30)[0]
        return float(value[first]) if _is_number(value[first]) else None
    return None


def latency_records(results: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[LatencyRecord]:
    """Every latency summary found under '*bench*', 'latency*' and 'predict*' keys.

    Records under a 'predict*' key, or flagged ``predicted: true``, are predictions.
    """
    found: list[LatencyRecord] = []
    for origin, data in (("results", results), ("metrics", metrics)):
        for key, value in data.items():
            lowered = str(key).lower()
            if not ("bench" in lowered or lowered.startswith(("latency", "predict"))):
                continue
            if isinstance(value, Mapping) and _is_bench_reports(value):
                found += _bench_report_records(value, predicted=lowered.startswith("predict"),
                                               source=f"{origin}:{key}")
                continue
            context = {"predicted": lowered.startswith("predict"), "source": f"{origin}:{key}"}
            _walk_latency(value, context, found)
    return _dedupe(found)


def _is_bench_reports(value: Mapping[str, Any]) -> bool:
    return bool(value) and all(isinstance(v, Mapping) and "batches" in v for v in value.values())


def _bench_report_records(reports: Mapping[str, Any], *, predicted: bool, source: str) -> list[LatencyRecord]:
    """The runtime's format: {runner name: BenchReport.to_dict()} with per-batch latency_ms."""
    records = []
    for name, report in reports.items():
        env = dict(report.get("environment") or {})
        runner = report.get("runner") if isinstance(report.get("runner"), Mapping) else {}
        backend = report.get("backend") if isinstance(report.get("backend"), str) else None
        backend = backend or _runner_label(str(name), runner)
        predicted = predicted or report.get("kind") == "predicted"
        device = str(report.get("device") or report.get("target") or _env_device(env))
        for key, batch in (report.get("batches") or {}).items():
            if not isinstance(batch, Mapping) or not str(batch.get("batch_size", key)).isdigit():
                continue
            latency = batch.get("latency_ms", batch)
            if not isinstance(latency, Mapping) or _pick(latency, _P50) is None:
                continue
            context = {"backend": backend, "device": device, "environment": env,
                       "batch_size": int(batch.get("batch_size", key)), "predicted": predicted,
                       "source": source}
            records.append(_record(latency, context, _pick(latency, _P50)))
    return records


def _runner_label(name: str, runner: Mapping[str, Any]) -> str:
    """'ort' + CPUExecutionProvider -> 'ort (CPU)'; other runner names ('ort[CPU]') as they are.

    Precision is a property of the bundle (its row), not of the backend column: an INT8 graph
    and an FP32 one on 'ort[CPU]' share a column so their speed-up is one ratio.
    """
    providers = runner.get("providers")
    if isinstance(providers, list) and providers and name == runner.get("backend", name):
        first = str(providers[0]).removesuffix("ExecutionProvider")
        return f"{name} ({first})"
    return name


def _walk_latency(node: Any, context: dict[str, Any], out: list[LatencyRecord]) -> None:
    if isinstance(node, list):
        for item in node:
            _walk_latency(item, context, out)
        return
    if not isinstance(node, Mapping):
        return
    context = _latency_context(node, context)
    summary = _pick(node, _P50)
    if summary is not None:
        out.append(_record(node, context, summary))
        return
    for key, value in node.items():
        child = dict(context)
        text = str(key)
        if text.isdigit():
            child.setdefault("batch_size", int(text))
        elif text.lower() in _PRECISIONS:
            child.setdefault("precision", text.lower())
        elif isinstance(value, Mapping) and text not in (*_ENVIRONMENT, "settings", "config"):
            child["hints"] = (*context.get("hints", ()), text)
        if text not in (*_ENVIRONMENT, "compute_ms", "settings", "config"):
            _walk_latency(value, child, out)


def _latency_context(node: Mapping[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    context = dict(context)
    for field_name, names in (("backend", _BACKEND), ("device", _DEVICE)):
        value = next((node[n] for n in names if isinstance(node.get(n), str)), None)
        if value:
            context[field_name] = value
    batch = next((node[n] for n in _BATCH if _is_number(node.get(n))), None)
    if batch is not None:
        context["batch_size"] = int(batch)
    env = next((node[n] for n in _ENVIRONMENT if isinstance(node.get(n), Mapping)), None)
    if env is not None:
        context["environment"] = dict(env)
    if node.get("predicted") is True or node.get("kind") == "predicted":
        context["predicted"] = True
    return context


def _record(node: Mapping[str, Any], context: Mapping[str, Any], p50: float) -> LatencyRecord:
    env = context.get("environment", {})
    hints = [h for h in context.get("hints", ()) if h.lower() not in _GROUPING_KEYS]
    backend = context.get("backend") or next((h for h in hints if _BACKEND_HINT.search(h)), None)
    precision = context.get("precision") or node.get("precision")
    if isinstance(precision, str) and precision not in (backend or ""):
        backend = f"{backend} {precision}" if backend else precision
    others = [h for h in hints if h != backend]
    device = context.get("device") or (others[0] if others else _env_device(env))
    samples = next((node[n] for n in _SAMPLES if isinstance(node.get(n), list)), [])
    return LatencyRecord(
        backend=str(backend or "unknown"),
        device=str(device),
        batch_size=int(context.get("batch_size", 1)),
        p50=p50,
        p90=_pick(node, _P90),
        p99=_pick(node, _P99),
        mean=_pick(node, _MEAN),
        std=_pick(node, _STD),
        samples=tuple(float(s) for s in samples if _is_number(s)),
        environment=env,
        predicted=bool(context.get("predicted")),
        source=str(context.get("source", "")),
    )


def _env_device(env: Mapping[str, Any]) -> str:
    for key in ("profile", "jetson", "device_model", "gpu", "cpu"):
        value = env.get(key)
        if isinstance(value, Mapping):
            value = value.get("model") or value.get("name")
        if isinstance(value, str) and value:
            return _short(value)
    return str(env.get("host", ""))


def _short(text: str, limit: int = 40) -> str:
    text = re.sub(r"\s+", " ", text.replace("(R)", "").replace("(TM)", "")).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dedupe(records: list[LatencyRecord]) -> list[LatencyRecord]:
    seen, unique = set(), []
    for rec in records:
        ident = (rec.backend, rec.device, rec.batch_size, rec.p50, rec.predicted)
        if ident not in seen:
            seen.add(ident)
            unique.append(rec)
    return unique


def adaptation_histories(results: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-step adaptation curves: lists of {step, loss, effective_rank, ...} under 'adapt*' keys."""
    curves = []
    for origin, data in (("results", results), ("metrics", metrics)):
        if curves:
            break  # the results file's record is the fuller one; the manifest's repeats its guard
        for key, value in data.items():
            if str(key).lower().startswith("adapt") and isinstance(value, Mapping):
                history = _history_of(value)
                if history:
                    curves.append({"source": f"{origin}:{key}", "history": history, "summary": value})
    return curves


def _history_of(data: Mapping[str, Any]) -> list[dict[str, float]]:
    """Per-step logs (loss...) followed by the guard's health checks (effective rank, agreement)."""
    merged: list[dict[str, float]] = []
    for name in ("history", "curve", "log", "logs", "guard"):
        value = data.get(name)
        if isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
            merged += [{k: float(v) for k, v in item.items() if _is_number(v)} for item in value]
    return [entry for entry in merged if len(entry) > 1]


def lineage_graph(bundles: Sequence[Any]) -> tuple[list[LineageNode], list[LineageEdge]]:
    """Nodes (bundles by manifest sha256, plus engine files) and stage edges from every lineage."""
    nodes: dict[str, LineageNode] = {}
    edges: dict[tuple[str, str], LineageEdge] = {}
    given = {b.manifest_sha256 for b in bundles}
    for bundle in bundles:
        entries = bundle.manifest.lineage
        for i, entry in enumerate(entries):
            last = i == len(entries) - 1
            sha = bundle.manifest_sha256 if last else entries[i + 1].parent
            name = bundle.manifest.name if last else (entries[i + 1].parent_name or "?")
            if not sha:
                continue
            if sha not in nodes or (sha in given and not nodes[sha].given):
                nodes[sha] = LineageNode(sha, name, entry.stage, sha in given)
            if entry.parent:
                nodes.setdefault(
                    entry.parent, LineageNode(entry.parent, entry.parent_name or "?", "?", False)
                )
                edges[(entry.parent, sha)] = LineageEdge(entry.parent, sha, entry.stage)
        for fname, rec in bundle.manifest.files.items():
            if fname.startswith("engines/"):
                nodes.setdefault(rec.sha256, LineageNode(rec.sha256, fname, "engine", True, "engine"))
                edges[(bundle.manifest_sha256, rec.sha256)] = LineageEdge(
                    bundle.manifest_sha256, rec.sha256, "engine"
                )
    return list(nodes.values()), list(edges.values())


# ------------------------------------------------------------------ writing


#: Charts the Markdown variant writes as PNG files beside it (``STEM_NAME.png``).
CHART_NAMES = ("pareto", "latency", "predicted", "adaptation")


def check_report_out(out: str | os.PathLike, *, overwrite: bool = False, markdown: bool = False) -> Path:
    """Validate the output path before any work: an .html (or .md) file in a writable folder.

    An existing report (or, with ``markdown``, its .md and PNG files) is replaced only with
    ``overwrite``.
    """
    from edge_ssl.outputs import require_writable_dir

    path = Path(out)
    if path.suffix.lower() not in (".html", ".htm", ".md"):
        raise ConfigError(f"--out must end in .html (or .md), got {str(path)!r}; e.g. --out report.html.")
    if path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a directory; give a file name such as report.html.")
    existing = [p for p in report_files(path, markdown) if p.exists()]
    if existing and not overwrite:
        names = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise ConfigError(f"{names} already exists; choose another --out or pass --overwrite.")
    require_writable_dir(path.parent if str(path.parent) else Path("."))
    return path


def report_files(path: Path, markdown: bool) -> list[Path]:
    """Every file a report at ``path`` may write (HTML, Markdown, chart PNGs)."""
    files = [] if path.suffix.lower() == ".md" else [path]
    if markdown or path.suffix.lower() == ".md":
        md_path = path.with_suffix(".md")
        files += [md_path, *(md_path.with_name(f"{md_path.stem}_{n}.png") for n in CHART_NAMES)]
    return files


def write_report(
    bundle_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    markdown: bool = False,
    title: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write a self-contained HTML report (and with ``markdown`` a .md + PNGs beside it).

    Returns the written paths, HTML first. An ``out`` ending in .md writes Markdown only.
    Every file is written atomically (temp + rename); an existing one only with ``overwrite``.
    """
    from edge_ssl.bundle import atomic_write_bytes
    from edge_ssl.report_html import render_html, render_markdown
    from edge_ssl.report_plots import render_charts

    path = check_report_out(out, overwrite=overwrite, markdown=markdown)
    data = collect_report(bundle_paths, title=title)
    charts = render_charts(data)
    written = []
    if path.suffix.lower() != ".md":
        atomic_write_bytes(path, render_html(data, charts).encode("utf-8"))
        written.append(path)
    if markdown or path.suffix.lower() == ".md":
        md_path = path.with_suffix(".md")
        images = {}
        for name, png in charts.items():
            image_path = md_path.with_name(f"{md_path.stem}_{name}.png")
            atomic_write_bytes(image_path, png)
            images[name] = image_path.name
        atomic_write_bytes(md_path, render_markdown(data, images).encode("utf-8"))
        written.append(md_path)
    return written


# ------------------------------------------------------------------ helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _as_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _pick(node: Mapping[str, Any], names: Iterable[str]) -> float | None:
    return next((float(node[n]) for n in names if _is_number(node.get(n))), None)


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
