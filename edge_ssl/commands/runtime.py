"""Runtime commands: export, build, bench, backends, compare (heavy imports inside each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edge_ssl.commands.common import (
    DataOpt,
    JsonOpt,
    OverwriteOpt,
    app,
    comma_list,
    data_source,
    emit_json,
    stderr_console,
)
from edge_ssl.errors import ConfigError
from edge_ssl.runtime.batch_sizes import parse_batch_sizes

BackendOpt = Annotated[
    str,
    typer.Option(help="auto, tensorrt, ort-tensorrt, ort-cuda, ort, torch-cuda or torch (see `edge-ssl backends`)."),
]


# ---------------------------------------------------------------- export
@app.command()
def export(
    bundle: Annotated[Path, typer.Argument(help="A float bundle (with model.pt).")],
    out: Annotated[Path, typer.Option(help="Bundle to write: model.pt + model.onnx.")],
    opset: Annotated[int, typer.Option(help="ONNX opset; 17 parses on JetPack's TensorRT 8.5/10.x.")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 weights and compute in the graph (TensorRT strongly typed).")] = False,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--static-batch", help="Dynamic batch axis.")] = True,
    bake_normalization: Annotated[bool, typer.Option("--bake-normalization", help="Normalize inside the graph (input: pixels 0..1).")] = False,
    exporter: Annotated[str, typer.Option(help="torchscript (default) or dynamo (needs onnxscript, opset >= 18).")] = "torchscript",
    data: DataOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export to ONNX (onnxslim-cleaned, checked) with a parity check against the PyTorch model on real images."""
    from edge_ssl.runtime.export import export_bundle

    result = export_bundle(
        bundle, out, opset=opset, fp16=fp16, dynamic_batch=dynamic_batch,
        bake_normalization=bake_normalization, exporter=exporter,
        parity_images=data_source(data), overwrite=overwrite,
    ).bundle
    info = result.manifest.metrics["export"]
    summary = {"bundle": str(result.path), "manifest_sha256": result.manifest_sha256,
               "precision": result.manifest.precision, "parity": info["parity"], "ops": info["ops"]}
    if as_json:
        emit_json(summary)
        return
    parity = info["parity"]
    typer.echo(
        f"wrote {result.path}  ({result.manifest.precision}, opset {opset})  parity: min cosine "
        f"{parity['min_cosine']:.6f}, max_abs {parity['max_abs']:.2e} over {parity['samples']} images"
    )


# ---------------------------------------------------------------- build
@app.command()
def build(
    bundle: Annotated[Path, typer.Argument(help="An exported bundle (with model.onnx).")],
    out: Annotated[Path, typer.Option(help="Bundle to write: the parent's files + engines/<...>.plan.")],
    precision: Annotated[str, typer.Option(help="fp16, int8 (QDQ graph), best or fp32. TensorRT 11 takes it from the graph.")] = "fp16",
    dla: Annotated[int | None, typer.Option(help="DLA core (Jetson Xavier/Orin AGX/NX); GPU fallback on.")] = None,
    workspace: Annotated[int | None, typer.Option(help="Builder workspace limit in MiB.")] = None,
    refit: Annotated[bool, typer.Option("--refit", help="Build a refittable engine (on-device adaptation).")] = False,
    opt_level: Annotated[int, typer.Option(help="Builder optimization level 0..5 (higher: slower build, maybe faster engine).")] = 3,
    batch: Annotated[str, typer.Option(help="min,opt,max batch of the optimization profile.")] = "1,8,32",
    timing_cache: Annotated[Path | None, typer.Option(help="Persistent timing cache (default ~/.cache/edge-ssl/tensorrt/timing.cache).")] = None,
    trtexec: Annotated[bool, typer.Option("--trtexec", help="Build with the trtexec tool instead of the Python bindings.")] = False,
    trtexec_path: Annotated[Path | None, typer.Option(help="trtexec executable (default: PATH or JetPack's).")] = None,
    overwrite: OverwriteOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="TensorRT builder log.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a TensorRT engine for this GPU (TensorRT 10 or 11) into a new bundle."""
    from edge_ssl.runtime.build import build_bundle, default_timing_cache

    sizes = parse_batch_sizes(batch, "--batch")
    if len(sizes) != 3:
        raise ConfigError(f"--batch expects min,opt,max (three integers); got {batch!r}.")
    result = build_bundle(
        bundle, out, precision=precision, workspace_mb=workspace, dla_core=dla, refit=refit,
        optimization_level=opt_level, batch=sizes, timing_cache=timing_cache or default_timing_cache(),
        use_trtexec=trtexec, trtexec=trtexec_path, overwrite=overwrite, verbose=verbose,
    )
    engines = result.manifest.metrics.get("engines", {})
    if as_json:
        emit_json({"bundle": str(result.path), "engines": engines})
        return
    for name, info in engines.items():
        typer.echo(f"{result.path}/{name}  TensorRT {info['trt_version']}  {info['precision']}")


# ---------------------------------------------------------------- bench
@app.command()
def bench(
    bundle: Annotated[Path, typer.Argument(help="Bundle to measure.")],
    backend: BackendOpt = "auto",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    duration: Annotated[float, typer.Option(help="Seconds measured per batch size.")] = 10.0,
    warmup: Annotated[float, typer.Option(help="Warm-up seconds per batch size (not measured).")] = 2.0,
    iterations: Annotated[int | None, typer.Option(help="Exactly N timed runs instead of --duration.")] = None,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (ort, torch CPU).")] = None,
    providers: Annotated[str | None, typer.Option(help="onnxruntime providers, e.g. cuda,cpu.")] = None,
    precision: Annotated[str | None, typer.Option(help="torch-cuda: fp16 (CUDA graphs); tensorrt: which engine.")] = None,
    record: Annotated[bool, typer.Option("--record/--no-record", help="Store the report in NAME.edge.results.json.")] = True,
    on: Annotated[list[str] | None, typer.Option("--on", help="Measure on a device instead: ssh://user@host[:port] or local (repeatable; SSH options: `edge-ssl device-bench --help`).")] = None,
    accept_new_host: Annotated[bool, typer.Option("--accept-new-host", help="With --on: record an unknown host key on first use (a CHANGED key is always refused).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Latency p50/p90/p99 (MLPerf single-stream p90 is the headline) and throughput per batch size."""
    from edge_ssl.runtime.bench import bench_bundle, check_bench_settings

    sizes = check_bench_settings(parse_batch_sizes(batch, "--batch"), duration, warmup, iterations)
    if on:  # devices engineer: the agent measures on the device (edge_ssl.devices.remote)
        from edge_ssl.commands.devices import bench_on_devices

        bench_on_devices(bundle, on, backend=backend, batch_sizes=tuple(sizes), duration=duration, warmup=warmup,
                         iterations=iterations, threads=threads, record=record, as_json=as_json,
                         accept_new_host=accept_new_host)
        return
    console = stderr_console()
    with _BenchProgress(console, enabled=not as_json and iterations is None and duration * len(sizes) >= 3) as bar:
        report = bench_bundle(
            bundle, backend, batch_sizes=sizes, duration_s=duration, warmup_s=warmup,
            iterations=iterations, threads=threads, providers=comma_list(providers),
            precision=precision, progress=bar.update, record=record,
        )
    if as_json:
        emit_json(report.to_dict())
        return
    _print_bench(report)


class _BenchProgress:
    """A transient rich progress bar per batch size (only for runs of a few seconds or more)."""

    def __init__(self, console: Any, enabled: bool) -> None:
        self.enabled = enabled
        self.console = console
        self.progress: Any = None
        self.tasks: dict[int, Any] = {}

    def __enter__(self) -> _BenchProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, batch_size: int, done_s: float, total_s: float) -> None:
        if not self.enabled:
            return
        if self.progress is None:  # started on the first tick: errors before it print nothing extra
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self.progress.__enter__()
        if batch_size not in self.tasks:
            self.tasks[batch_size] = self.progress.add_task(f"batch {batch_size}", total=total_s)
        self.progress.update(self.tasks[batch_size], completed=min(done_s, total_s))


def _print_bench(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    info = report.runner
    table = Table(title=f"{info.get('name')}  ({info.get('precision', '?')}, threads {info.get('threads') or 'default'})")
    for column in ("batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "items/s", "compute p50 ms", "runs"):
        table.add_column(column, justify="right")
    for r in report.batches:
        lat = r.latency_ms
        compute = f"{r.compute_ms['p50']:.3f}" if r.compute_ms else "-"
        table.add_row(str(r.batch_size), f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                      f"{lat['mean']:.3f}", f"{lat['std']:.3f}", f"{r.throughput_per_s:.1f}", compute,
                      str(r.iterations))
    Console().print(table)
    headline = report.single_stream_p90_ms
    if headline is not None:
        typer.echo(f"single-stream p90 (batch 1): {headline:.3f} ms   peak RSS {report.peak_rss_mb:.0f} MiB")
    typer.echo(f"environment: {report.environment.get('cpu')}  {report.environment.get('gpu', 'no GPU')}")


# ---------------------------------------------------------------- backends
@app.command()
def backends(as_json: JsonOpt = False) -> None:
    """Which runtime backends work here, in the order `--backend auto` tries them, and why others do not."""
    from edge_ssl.runtime.backends import available_backends

    found = available_backends()
    if as_json:
        emit_json({name: {"available": why is None, "reason": why} for name, why in found.items()})
        return
    for name, why in found.items():
        typer.echo(f"{name:13s} {'yes' if why is None else 'no '}  {why or ''}".rstrip())


# ---------------------------------------------------------------- compare
@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="Reference: a bundle or an .onnx file.")],
    b: Annotated[Path, typer.Argument(help="Candidate: a bundle or an .onnx file.")],
    backend_a: Annotated[str, typer.Option(help="Backend for A (default torch when A has model.pt, else auto).")] = "default",
    backend_b: Annotated[str, typer.Option(help="Backend for B.")] = "auto",
    data: DataOpt = None,
    limit: Annotated[int, typer.Option(help="Images compared.")] = 64,
    min_cosine: Annotated[float | None, typer.Option(help="Fail (exit 1) below this per-sample cosine.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the same real images through two runners: max abs/rel error and per-sample cosine."""
    from edge_ssl.runtime.compare import compare_bundles
    from edge_ssl.runtime.errors import ParityError

    result = compare_bundles(a, b, backend_a=backend_a, backend_b=backend_b,
                             data=data_source(data), limit=limit)
    if as_json:
        emit_json(result.to_dict())
    else:
        typer.echo(result.describe())
    if min_cosine is not None and not result.passed(min_cosine):
        raise ParityError(f"{result.describe()} is below --min-cosine {min_cosine}.")
    if result.zero_rows:
        raise ParityError(f"{result.zero_rows} of {result.samples} images give all-zero embeddings "
                          "on one side: that model has lost its input. Check it with `edge-ssl eval`.")


# ---------------------------------------------------------------- refit
@app.command()
def refit(
    bundle: Annotated[Path, typer.Argument(help="A bundle with a refittable engine (`edge-ssl build --refit`).")],
    weights: Annotated[Path, typer.Option(help="Bundle with the new float weights (same architecture, e.g. adapted).")],
    out: Annotated[Path, typer.Option(help="Bundle to write: new weights, ONNX and refit engine.")],
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Put new weights into a TensorRT engine without rebuilding it (on-device adaptation)."""
    from edge_ssl.runtime.build import refit_bundle

    result = refit_bundle(bundle, weights, out, overwrite=overwrite)
    if as_json:
        emit_json({"bundle": str(result.path), "engines": result.manifest.metrics.get("engines", {})})
    else:
        typer.echo(f"wrote {result.path}  (engine refit, no rebuild)")
