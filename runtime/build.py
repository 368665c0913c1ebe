"""The "build" stage: a new bundle = the parent's files + a TensorRT engine for this GPU."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_ssl.runtime.cuda_buffers import GpuIdentity
from edge_ssl.runtime.errors import EngineError
from edge_ssl.runtime.tensorrt import BuildSettings, EngineBuild, build_engine

from edge_ssl.errors import BundleError

ONNX_NAME = "model.onnx"


def default_timing_cache() -> Path:
    """~/.cache/edge-ssl/tensorrt/timing.cache (TensorRT keys entries by GPU and version itself)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-ssl" / "tensorrt" / "timing.cache"


def graph_precision_of(bundle: Any) -> str:
    """What the bundle's model.onnx holds: fp32, fp16 or int8 (the manifest's precision)."""
    precision = bundle.manifest.precision
    return precision if precision in ("fp32", "fp16", "int8", "mixed") else "fp32"


def build_bundle(
    bundle_path: Any,
    out: str | os.PathLike,
    *,
    precision: str = "fp16",
    workspace_mb: int | None = None,
    dla_core: int | None = None,
    gpu_fallback: bool = True,
    refit: bool = False,
    optimization_level: int = 3,
    batch: tuple[int, int, int] = (1, 8, 32),
    timing_cache: str | os.PathLike | None = None,
    use_trtexec: bool = False,
    trtexec: str | os.PathLike | None = None,
    gpu: GpuIdentity | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> Any:
    """Build an engine from the bundle's ONNX (Python API, or trtexec) into a new bundle.

    Every check (bundle, ONNX present, settings, output location) runs before the build;
    nothing is written at ``out`` when the build fails.
    """
    from edge_ssl.bundle import Bundle, BundleWriter

    bundle = bundle_path if isinstance(bundle_path, Bundle) else Bundle.open(bundle_path)
    if not bundle.has(ONNX_NAME):
        raise BundleError(
            f"build needs {ONNX_NAME}; {bundle.path} has {sorted(bundle.manifest.files)}. "
            f"Export it first: `edge-ssl export {bundle.path} --out EXPORTED.edge`."
        )
    settings = BuildSettings(
        precision=precision, workspace_mb=workspace_mb, dla_core=dla_core, gpu_fallback=gpu_fallback,
        refit=refit, optimization_level=optimization_level, batch=batch,
        graph_precision=graph_precision_of(bundle),
    )
    with BundleWriter(out, overwrite=overwrite) as writer:
        for name in bundle.manifest.files:
            writer.copy_file(name, bundle.path / name)
        result = _run_build(bundle, writer.tmp, settings, use_trtexec, trtexec, gpu, timing_cache, verbose)
        rel = result.path.relative_to(writer.tmp).as_posix()
        writer.write_json(rel.removesuffix(".plan") + ".json", result.to_dict() | {"path": rel})
        metrics = dict(bundle.manifest.metrics)
        metrics["engines"] = {**metrics.get("engines", {}), rel: _engine_metrics(result, rel)}
        lineage_settings = {**asdict(settings), "tool": result.tool, "engine": rel}
        return writer.commit(
            name=Path(out).name.removesuffix(".edge"), encoder=bundle.manifest.encoder,
            lineage=bundle.child_lineage("build", lineage_settings),
            precision=bundle.manifest.precision, metrics=metrics,
        )


def _run_build(bundle: Any, root: Path, settings: BuildSettings, use_trtexec: bool, trtexec: Any,
               gpu: GpuIdentity | None, timing_cache: Any, verbose: bool) -> EngineBuild:
    onnx_path = bundle.file(ONNX_NAME)
    if use_trtexec:
        from edge_ssl.runtime.trtexec import build_engine_trtexec

        export = bundle.manifest.metrics.get("export", {})
        return build_engine_trtexec(
            onnx_path, root, settings, input_name=str(export.get("input_name", "images")),
            input_shape=tuple(bundle.manifest.input.shape), trtexec=trtexec, gpu=gpu,
            timing_cache=timing_cache,
        )
    if gpu is not None:
        raise EngineError("an explicit GPU identity is only for --trtexec builds; the Python API asks the GPU.")
    return build_engine(onnx_path, root, settings, timing_cache=timing_cache, verbose=verbose)


def _engine_metrics(result: EngineBuild, rel: str) -> dict[str, Any]:
    return {
        "trt_version": result.trt_version, "gpu": result.gpu, "precision": result.settings["precision"],
        "strongly_typed": result.strongly_typed, "dla_core": result.settings["dla_core"],
        "dla_fallback_layers": len(result.dla_fallback_layers), "refit": result.settings["refit"],
        "tool": result.tool, "build_seconds": round(result.seconds, 2),
    }


EXPORT_SETTINGS = ("opset", "fp16", "dynamic_batch", "bake_normalization", "exporter")


def refit_bundle(engine_bundle: Any, weights_bundle: Any, out: str | os.PathLike, *,
                 overwrite: bool = False) -> Any:
    """A new bundle: ``weights_bundle``'s weights in ``engine_bundle``'s refittable engines.

    The new weights are exported exactly as the engine's graph was (same opset, FP16,
    normalization; BatchNorm folded by the export) and parity-checked, then every engine
    that runs on this GPU is refit from that ONNX (no rebuild). Engines for other GPUs
    cannot be refit here and are left out (they would hold the old weights).
    """
    import tempfile

    from edge_ssl.runtime.export import export_bundle
    from edge_ssl.runtime.tensorrt import find_engine, refit_engine

    from edge_ssl.bundle import Bundle, BundleWriter

    engine_bundle = engine_bundle if isinstance(engine_bundle, Bundle) else Bundle.open(engine_bundle)
    weights_bundle = weights_bundle if isinstance(weights_bundle, Bundle) else Bundle.open(weights_bundle)
    _check_same_architecture(engine_bundle, weights_bundle)
    engine = find_engine(engine_bundle)  # refuses early when no engine runs here
    exported = engine_bundle.manifest.metrics.get("export")
    if not exported or engine_bundle.manifest.precision == "int8":
        raise EngineError(
            f"{engine_bundle.path} holds a {engine_bundle.manifest.precision} graph without export "
            "settings to reproduce; INT8 engines need the new weights quantized again (`edge-ssl "
            "quantize`) and a new `edge-ssl build`."
        )
    settings = {k: v for k, v in exported.items() if k in EXPORT_SETTINGS}
    with BundleWriter(out, overwrite=overwrite) as writer, tempfile.TemporaryDirectory(dir=Path(out).parent) as tmp:
        fresh = export_bundle(weights_bundle, Path(tmp) / "weights.edge", **settings).bundle
        for name in ("model.pt", ONNX_NAME):
            writer.copy_file(name, fresh.file(name))
        rel = engine.relative_to(engine_bundle.path).as_posix()
        report = refit_engine(engine, fresh.file(ONNX_NAME), out=writer.path_for(rel))
        metrics = dict(fresh.manifest.metrics)
        metrics["engines"] = {rel: {**engine_bundle.manifest.metrics.get("engines", {}).get(rel, {}),
                                    "refit_from": weights_bundle.manifest_sha256}}
        lineage = (*weights_bundle.manifest.lineage, *engine_bundle.child_lineage(
            "refit", {"engine": rel, "weights": str(weights_bundle.path), "refitted": report.refitted,
                      "weights_sha256": weights_bundle.manifest_sha256})[-1:])
        return writer.commit(name=Path(out).name.removesuffix(".edge"), encoder=weights_bundle.manifest.encoder,
                             lineage=lineage, precision=engine_bundle.manifest.precision, metrics=metrics)


def _check_same_architecture(engine_bundle: Any, weights_bundle: Any) -> None:
    a, b = engine_bundle.manifest.encoder, weights_bundle.manifest.encoder
    if (a.arch, dict(a.kwargs), a.embed_dim, a.input.shape) != (b.arch, dict(b.kwargs), b.embed_dim, b.input.shape):
        raise EngineError(
            f"refit needs the same architecture: the engine holds {a.arch} {dict(a.kwargs)} "
            f"(embed {a.embed_dim}), the weights are {b.arch} {dict(b.kwargs)} (embed {b.embed_dim}). "
            "A different architecture needs a new `edge-ssl export` and `edge-ssl build`."
        )
    if not weights_bundle.has("model.pt"):
        raise BundleError(f"refit takes float weights (model.pt) from {weights_bundle.path}; it has none.")
