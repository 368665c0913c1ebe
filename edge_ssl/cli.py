"""The edge-ssl command line: thin typer commands, heavy imports inside each command."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edge_ssl.commands.common import (
    DataOpt,
    JsonOpt,
    KwOpt,
    TrainingProgress,
    app,
    data_source,
    emit_json,
    parse_key_values,
    stderr_console,
)
from edge_ssl.errors import EdgeSSLError

# ---------------------------------------------------------------- pretrain
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(help="Resize every image to NxN (shorter side, then centre crop); needed to combine "
                 "--data sources of different sizes."),
]
LimitOpt = Annotated[int | None, typer.Option(help="Use only the first N (train) images; N >= 1.")]
StreamOpt = Annotated[str, typer.Option(
    help="auto: stream .tar shards and image folders larger than the memory budget (4 GB decoded), "
         "load the rest in memory; on: always stream; off: always load in memory. See docs/scale-out.md.")]
WorkersOpt = Annotated[int | None, typer.Option(
    help="Decode processes per training process when streaming (default: the node's CPU cores / its "
         "training processes, at most 8; 0: in-process).")]


def _pretrain_labels() -> dict[str, str]:
    """Errors raised from `edge-ssl pretrain` name its flags, not PretrainConfig fields."""
    from edge_ssl.train.methods import METHODS

    labels = {"PretrainConfig": "--{flag}"}
    labels |= {METHODS.get(name).config_class.__name__: "--method-opt {name}" for name in METHODS}
    return labels


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option(help="Bundle to write, e.g. teacher.edge.")],
    method: Annotated[str, typer.Option(help="SSL method: simclr, byol, dino, simsiam, vicreg, barlow_twins.")] = "byol",
    arch: Annotated[str, typer.Option(help="Encoder name (see `edge-ssl encoders`).")] = "resnet18_cifar",
    data: DataOpt = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step per process.")] = 256,
    optimizer: Annotated[str | None, typer.Option(help="lars, adamw or sgd (default: the method's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Base LR for batch 256, scaled linearly (default: the method's).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Default: the method's.")] = None,
    warmup_epochs: Annotated[float, typer.Option(help="Linear LR warm-up; ~10% of epochs works well.")] = 1.0,
    grad_clip: Annotated[float | None, typer.Option(help="Clip the gradient norm (helps when the loss turns NaN).")] = None,
    amp: Annotated[str, typer.Option(help="Mixed precision on GPU: auto (bf16 on Ampere+, else fp16), off, fp16, bf16. CPU: off.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Cap steps per epoch (quick trials).")] = None,
    limit: LimitOpt = None,
    image_size: ImageSizeOpt = None,
    stream: StreamOpt = "auto",
    workers: WorkersOpt = None,
    arch_opt: KwOpt = None,
    method_opt: Annotated[list[str] | None, typer.Option(help="KEY=VALUE for the method config, e.g. temperature=0.2.")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder + loss (GPU; minutes of warm-up, then faster).")] = False,
    cuda_graphs: Annotated[bool, typer.Option(help="Compile with CUDA graphs (mode reduce-overhead): for small, launch-bound models.")] = False,
    channels_last: Annotated[bool, typer.Option(help="NHWC convolutions on GPU (faster with tensor cores).")] = True,
    log_every: Annotated[int | None, typer.Option(help="Steps between loss read-outs (progress, NaN check); default 1 on CPU, 50 on GPU.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.ckpt/ after a stop.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT bundle.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain an SSL encoder and write it as a bundle. Runs unchanged under torchrun (DDP)."""
    from edge_ssl.config import check_int, cli_labels
    from edge_ssl.train.pretrain import PretrainConfig, check_outputs

    with cli_labels(_pretrain_labels()):
        config = PretrainConfig(
            method=method, arch=arch, arch_kwargs=parse_key_values(arch_opt, "--arch-opt"),
            method_kwargs=parse_key_values(method_opt, "--method-opt"), epochs=epochs,
            batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
            warmup_epochs=warmup_epochs, grad_clip=grad_clip, amp=amp, device=device, seed=seed,
            steps_per_epoch=steps_per_epoch, channels_last=channels_last, compile=compile_model,
            cuda_graphs=cuda_graphs, log_every=log_every,
        )
        config.check_names()
        for flag, value in (("limit", limit), ("image_size", image_size)):
            if value is not None:
                check_int("", f"--{flag.replace('_', '-')}", value)
        check_outputs(out, resume=resume, overwrite=overwrite)  # before any data is read
        dataset = _pretrain_data(data, limit, image_size, stream=stream, workers=workers,
                                 input_size=_input_size(arch, config.arch_kwargs))
        result = _run_pretrain(config, dataset, out, resume=resume, overwrite=overwrite)
    if result.bundle is not None:  # ranks > 0 under torchrun write nothing
        _pretrain_summary(result, as_json)


def _pretrain_summary(result: Any, as_json: bool) -> None:
    summary = {
        "bundle": str(result.bundle.path),
        "manifest_sha256": result.bundle.manifest_sha256,
        "final_loss": result.final_loss,
        "images_per_second": result.images_per_second,
        "epochs_run": result.epochs_run,
    }
    if as_json:
        emit_json(summary)
        return
    typer.echo(f"wrote {summary['bundle']}  loss {result.final_loss:.4f}  "
               f"{result.images_per_second:.0f} images/s")


def _pretrain_data(
    data: list[str] | None, limit: int | None, image_size: int | None, *,
    stream: str = "auto", workers: int | None = None, input_size: int = 32,
) -> Any:
    """The training images (a BatchSource: in memory or streamed), with a one-line note."""
    from edge_ssl.data.streaming import choose_source, describe_source

    source = choose_source(data_source(data), input_size, stream=stream, load_size=image_size,
                           limit=limit, workers=workers)
    stderr_console().print(describe_source(source), markup=False, highlight=False, soft_wrap=True)
    return source


def _input_size(arch: str, arch_kwargs: dict[str, Any]) -> int:
    from edge_ssl.data.streaming import input_size_for

    return input_size_for(arch, arch_kwargs)


def _run_pretrain(config: Any, dataset: Any, out: Path, *, resume: bool, overwrite: bool) -> Any:
    """pretrain() with a progress bar; Ctrl-C says what was kept and how to --resume (exit 130)."""
    from edge_ssl.train.pretrain import checkpoint_dir
    from edge_ssl.train.pretrain import pretrain as run_pretrain

    try:
        with TrainingProgress(stderr_console()) as bar:
            return run_pretrain(config, dataset, out, resume=resume, overwrite=overwrite, progress=bar.update)
    except KeyboardInterrupt:
        typer.echo(interrupted_message(checkpoint_dir(out) / "last.pt"), err=True)
        raise typer.Exit(130) from None


def interrupted_message(ckpt: Path) -> str:
    """What Ctrl-C left behind and the command that continues the run."""
    if ckpt.is_file():
        return (
            f"interrupted: the checkpoint of the last finished epoch is kept in {ckpt.parent}. "
            "Continue with the same command plus --resume."
        )
    return "interrupted before the first epoch finished; nothing was saved. Run the command again to start over."


# ---------------------------------------------------------------- import
@app.command("import")
def import_(
    checkpoint: Annotated[Path, typer.Argument(help="A .pth/.pt/.ckpt/.safetensors file.")],
    arch: Annotated[str, typer.Option(help="Encoder the weights belong to (see `edge-ssl encoders`).")],
    out: Annotated[Path, typer.Option(help="Bundle to write, e.g. dino_r50.edge.")],
    arch_opt: KwOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT bundle.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a bundle from a foreign checkpoint (torchvision, timm, DINO, solo-learn, lightly, MoCo)."""
    from edge_ssl.checkpoint import import_bundle

    result = import_bundle(checkpoint, arch, out, overwrite=overwrite,
                           **parse_key_values(arch_opt, "--arch-opt"))
    bundle, report = result.bundle, result.report
    if as_json:
        emit_json(
            {
                "bundle": str(bundle.path),
                "manifest_sha256": bundle.manifest_sha256,
                "source_format": report.source_format,
                "mapped": list(report.mapped),
                "dropped": list(report.dropped),
            }
        )
    else:
        typer.echo(report.summary())
        typer.echo(f"wrote {bundle.path}")


# ---------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    bundle: Annotated[Path, typer.Argument(help="A NAME.edge bundle.")],
    data: DataOpt = None,
    test_data: Annotated[
        list[str] | None,
        typer.Option(help="Labeled test images; default: the data's own test split, or a stratified 20% of --data."),
    ] = None,
    k: Annotated[list[int] | None, typer.Option("--k", help="kNN neighbours (repeatable). Default 20 and 200.")] = None,
    probe: Annotated[bool, typer.Option(help="Also fit a linear probe.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass; lower it on out-of-memory.")] = 256,
    limit: LimitOpt = None,
    image_size: ImageSizeOpt = None,
    stream: StreamOpt = "auto",
    workers: WorkersOpt = None,
    results: Annotated[
        Path | None,
        typer.Option(help="Results file to update (JSON keyed by bundle); default NAME.edge.results.json beside the bundle."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """kNN and linear-probe top-1 on frozen embeddings, plus collapse health; saved beside the bundle."""
    from edge_ssl.bundle import results_path
    from edge_ssl.config import cli_labels
    from edge_ssl.data.streaming import evaluate_bundle_streamed
    from edge_ssl.evaluate import EvalConfig

    with cli_labels({"EvalConfig": "--{flag}", "evaluate": "--{flag}"}):
        config = EvalConfig(
            knn_k=tuple(k) if k else EvalConfig.knn_k, probe=probe, device=device, batch_size=batch_size
        )
        with stderr_console().status(f"evaluating {bundle.name} (embedding, kNN, probe)..."):
            result, path = evaluate_bundle_streamed(
                bundle, data_source(data), data_source(test_data), config,
                limit=limit, image_size=image_size, results=results, stream=stream, workers=workers,
            )
    if path is None:
        typer.echo(
            f"warning: results not saved: {results_path(bundle).parent} is not writable; "
            "pass --results PATH to keep them.", err=True,
        )
    if as_json:
        emit_json(result.to_dict() | {"results_file": str(path) if path else None})
        return
    _print_eval_table(bundle.name, result)
    if path is not None:
        typer.echo(f"results: {path}")


def _print_eval_table(title: str, result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, acc in sorted(result.knn_top1.items()):
        table.add_row(f"kNN top-1 (k={k})", f"{100 * acc:.2f}%")
    if result.linear_probe_top1 is not None:
        table.add_row("linear probe top-1", f"{100 * result.linear_probe_top1:.2f}%")
    health = result.health
    table.add_row("effective rank", f"{health.effective_rank:.1f} / {health.embed_dim}")
    table.add_row("dim std (mean) / 1/sqrt(D)", f"{health.dim_std_mean:.4f} / {health.uniform_std:.4f}")
    table.add_row("collapsed", "YES" if health.collapsed else "no")
    table.add_row("train / test images", f"{result.num_train} / {result.num_test}")
    Console().print(table)


# ---------------------------------------------------------------- inspect
@app.command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="A NAME.edge bundle.")],
    verify: Annotated[bool, typer.Option(help="Re-hash every file against the manifest.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Show a bundle's manifest: encoder, input, files (verified), lineage and metrics."""
    from edge_ssl.bundle import Bundle, read_results

    opened = Bundle.open(bundle, verify=verify)
    manifest = opened.manifest
    if verify:
        _check_weights_fit(opened)
    results = read_results(opened)
    if as_json:
        emit_json(
            {
                "path": str(opened.path),
                "manifest_sha256": opened.manifest_sha256,
                "verified": verify,
                "manifest": manifest.to_dict(),
                "results": results,
            }
        )
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    spec = manifest.encoder
    console.print(f"[bold]{manifest.name}[/]  {opened.path}")
    console.print(f"manifest sha256 {opened.manifest_sha256}")
    console.print(
        f"encoder {spec.arch} {dict(spec.kwargs) or ''}  embed dim {spec.embed_dim}  "
        f"input {list(spec.input.shape)} {spec.input.dtype}  precision {manifest.precision}"
    )
    files = Table(title="files" + (" (sha256 verified)" if verify else " (not verified)"))
    for column in ("file", "bytes", "sha256"):
        files.add_column(column)
    for name, record in sorted(manifest.files.items()):
        files.add_row(name, f"{record.bytes:,}", record.sha256[:16] + "...")
    console.print(files)
    lineage = Table(title="lineage")
    for column in ("stage", "time", "host", "parent"):
        lineage.add_column(column)
    for entry in manifest.lineage:
        parent = f"{entry.parent_name} ({entry.parent[:12]})" if entry.parent else "-"
        lineage.add_row(entry.stage, entry.time, str(entry.environment.get("host", "?")), parent)
    console.print(lineage)
    if manifest.metrics:
        console.print("metrics " + json.dumps(manifest.metrics, sort_keys=True))
    if results:
        console.print("results " + json.dumps(results, sort_keys=True))


def _check_weights_fit(opened: Any) -> None:
    """The manifest's encoder must rebuild and take model.pt strictly (BundleError otherwise)."""
    from edge_ssl.bundle import WEIGHTS_NAME
    from edge_ssl.errors import BundleError

    if not opened.has(WEIGHTS_NAME):
        return
    from edge_ssl.models import build_from_spec, load_state_dict_file, weights_mismatch

    spec = opened.manifest.encoder
    try:
        problem = weights_mismatch(build_from_spec(spec), load_state_dict_file(opened.file(WEIGHTS_NAME)))
    except EdgeSSLError as exc:
        raise BundleError(f"{opened.path}: the manifest's encoder cannot be rebuilt ({exc}); --no-verify shows the manifest anyway.") from None
    if problem:
        raise BundleError(
            f"{opened.path}: model.pt does not fit the manifest's encoder {spec.arch!r} "
            f"{dict(spec.kwargs) or ''} ({problem}). Re-create the bundle with edge-ssl import or "
            "pretrain; --no-verify shows the manifest anyway."
        )


# ---------------------------------------------------------------- encoders
@app.command()
def encoders(as_json: JsonOpt = False) -> None:
    """List the encoder names `--arch` accepts."""
    from edge_ssl.models import encoder_info, encoder_names

    infos = [encoder_info(name) for name in encoder_names()]
    if as_json:
        emit_json([_dc(info) for info in infos])
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title="encoders (kwargs: width=<multiplier>, image_size=<pixels>)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # Names are what users type: never wrapped or cut; the description wraps instead.
    table.add_column("name", no_wrap=True, min_width=max(len(info.name) for info in infos))
    table.add_column("family", no_wrap=True)
    table.add_column("px", no_wrap=True, justify="right")
    table.add_column("description")  # wraps between words; the timm model name is in --json
    for info in infos:
        table.add_row(info.name, info.family, str(info.input_size), info.description)
    Console().print(table)


def _dc(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


# ---------------------------------------------------------------- doctor
@app.command()
def doctor(
    as_json: JsonOpt = False,
    on: Annotated[str | None, typer.Option("--on", help="Check a device instead: ssh://user@host[:port] (see `edge-ssl device-doctor --help`).")] = None,
    accept_new_host: Annotated[bool, typer.Option("--accept-new-host", help="With --on: record an unknown host key on first use (a CHANGED key is always refused).")] = False,
) -> None:
    """Report Python, torch, CUDA, onnxruntime providers, TensorRT and Jetson detection."""
    if on:  # devices engineer: the on-device agent answers (edge_ssl.devices.remote)
        from edge_ssl.commands.devices import doctor_on_device

        doctor_on_device(on, as_json, accept_new_host=accept_new_host)
        return
    from edge_ssl.doctor import CHECKS, register_check, run_checks

    if "jetson" not in CHECKS:
        register_check("jetson", _jetson_check)
    checks = run_checks()
    if as_json:
        emit_json(checks)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="edge-ssl doctor")
    table.add_column("component")
    table.add_column("status")
    for name, value in checks.items():
        table.add_row(name, str(value))
    Console().print(table)


def _jetson_check() -> str:
    from edge_ssl.devices.detect import detect_jetson

    info = detect_jetson()
    if info is None:
        return "not a Jetson"
    return f"{info.model}, L4T {info.l4t or '?'}, JetPack {info.jetpack or '?'}"


# ---------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's bundles, results and report.")] = Path("edge-ssl-demo"),
    epochs: Annotated[
        int | None, typer.Option(help="Teacher pretraining epochs.  [default: the demo's preset]", show_default=False)
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="Every stage with tiny budgets (tests, a first look).")] = False,
    data: DataOpt = None,
    teacher: Annotated[
        Path | None, typer.Option(help="Start from this float bundle instead of pretraining a teacher.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole pipeline on the embedded digits: pretrain, distill, prune, INT8, ONNX, bench, predict, adapt, report."""
    from edge_ssl.config import cli_labels
    from edge_ssl.demo import DemoProgress, print_demo, run_demo

    console = stderr_console()
    with cli_labels({"PretrainConfig": "--{flag}"}), DemoProgress(console) as bar:
        report = run_demo(out, quick=quick, data=data_source(data), teacher=teacher, epochs=epochs,
                          device=device, progress=bar.update, log=console.print)
    if as_json:
        emit_json(report)
        return
    print_demo(report)


def _register_capabilities() -> None:
    """Import each capability's command module so its commands join ``app`` (no heavy imports)."""
    import importlib
    import pkgutil

    import edge_ssl.commands as commands

    for info in pkgutil.iter_modules(commands.__path__):
        if info.name != "common":
            importlib.import_module(f"edge_ssl.commands.{info.name}")


_register_capabilities()


#: Exit codes, the same for every command (docs/cli.md has the table).
EXIT_USER_ERROR = 1  # bad input, settings, data or environment: the message says the fix
EXIT_USAGE = 2  # unknown command or option, malformed value (click's own usage errors)
EXIT_INTERNAL = 3  # a bug in edge-ssl: please report it with the --debug traceback
EXIT_INTERRUPTED = 130  # Ctrl-C


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and a non-zero exit; --debug shows the traceback."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        app(args=args, prog_name="edge-ssl", standalone_mode=True)
    except EdgeSSLError as exc:
        _fail(debug, str(exc), EXIT_USER_ERROR)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except OSError as exc:  # permission, full disk, missing file: the environment, not a bug
        _fail(debug, describe_os_error(exc), EXIT_USER_ERROR)
    except MemoryError:
        _fail(debug, "out of memory; lower --batch-size or --limit, or use a machine with "
              "more memory", EXIT_USER_ERROR)
    except Exception as exc:  # a bug: still one line without --debug
        _fail(debug, f"internal error {type(exc).__name__}: {exc} (a bug in edge-ssl; "
              "rerun with --debug for the traceback and report it)", EXIT_INTERNAL)


def _fail(debug: bool, message: str, code: int) -> None:
    if debug:
        raise
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code) from None


def describe_os_error(exc: OSError) -> str:
    """One line naming the path and what to do (PermissionError, a full disk, a missing file)."""
    import errno

    path = exc.filename if exc.filename is not None else "a file"
    if isinstance(exc, PermissionError):
        return (f"permission denied: {path} ({exc.strerror}); choose a location you can write "
                "to, or fix its permissions.")
    if exc.errno == errno.ENOSPC:
        return f"the disk is full while writing {path}; free space or write elsewhere."
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {path}."
    return f"{exc.strerror or exc} ({path})."


if __name__ == "__main__":
    main()
