"""Collect a report's numbers from bundles and their results: measured, predicted, lineage."""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_ssl.errors import ConfigError
from edge_ssl.report.rows import (
    LatencyRecord,
    LineageEdge,
    LineageNode,
    ReportData,
    StageRow,
)

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


# ------------------------------------------------------------------ helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _as_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _pick(node: Mapping[str, Any], names: Iterable[str]) -> float | None:
    return next((float(node[n]) for n in names if _is_number(node.get(n))), None)


