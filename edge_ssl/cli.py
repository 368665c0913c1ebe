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
    amp: Annotated[str, typer.Option(help="Mixed precision on GPU: auto, off, fp16, bf16 (CPU: always off).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Cap steps per epoch (quick trials).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N images.")] = None,
    arch_opt: KwOpt = None,
    method_opt: Annotated[list[str] | None, typer.Option(help="KEY=VALUE for the method config, e.g. temperature=0.2.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.ckpt/ after a stop.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain an SSL encoder and write it as a bundle. Runs unchanged under torchrun (DDP)."""
    from edge_ssl.data import load_images
    from edge_ssl.pretrain import PretrainConfig
    from edge_ssl.pretrain import pretrain as run_pretrain

    config = PretrainConfig(
        method=method,
        arch=arch,
        arch_kwargs=parse_key_values(arch_opt, "--arch-opt"),
        method_kwargs=parse_key_values(method_opt, "--method-opt"),
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        grad_clip=grad_clip,
        amp=amp,
        device=device,
        seed=seed,
        steps_per_epoch=steps_per_epoch,
    )
    config.check_names()
    dataset = load_images(data_source(data), split="train", limit=limit)
    console = stderr_console()
    console.print(f"data: {dataset.source}" + (f" ({dataset.skipped} non-image files skipped)" if dataset.skipped else ""))
    with TrainingProgress(console) as bar:
        result = run_pretrain(config, dataset, out, resume=resume, overwrite=overwrite, progress=bar.update)
    if result.bundle is None:  # ranks > 0 under torchrun
        return
    summary = {
        "bundle": str(result.bundle.path),
        "manifest_sha256": result.bundle.manifest_sha256,
        "final_loss": result.final_loss,
        "images_per_second": result.images_per_second,
        "epochs_run": result.epochs_run,
    }
    if as_json:
        emit_json(summary)
    else:
        typer.echo(
            f"wrote {summary['bundle']}  loss {result.final_loss:.4f}  "
            f"{result.images_per_second:.0f} images/s"
        )


# ---------------------------------------------------------------- import
@app.command("import")
def import_(
    checkpoint: Annotated[Path, typer.Argument(help="A .pth/.pt/.ckpt/.safetensors file.")],
    arch: Annotated[str, typer.Option(help="Encoder the weights belong to (see `edge-ssl encoders`).")],
    out: Annotated[Path, typer.Option(help="Bundle to write, e.g. dino_r50.edge.")],
    arch_opt: KwOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build a bundle from a foreign checkpoint (torchvision, timm, DINO, solo-learn, lightly, MoCo)."""
    from edge_ssl.bundle import BundleWriter, lineage_entry, sha256_file
    from edge_ssl.checkpoint import import_checkpoint
    from edge_ssl.models import count_parameters

    arch_kwargs = parse_key_values(arch_opt, "--arch-opt")
    encoder, report = import_checkpoint(checkpoint, arch, **arch_kwargs)
    settings = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "source_format": report.source_format,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "mapped": len(report.mapped),
        "dropped": len(report.dropped),
    }
    with BundleWriter(out, overwrite=overwrite) as writer:
        writer.save_state_dict(encoder.state_dict())
        bundle = writer.commit(
            name=out.name.removesuffix(".edge"),
            encoder=encoder.spec,
            lineage=(lineage_entry("import", settings),),
            metrics={"params": count_parameters(encoder)},
        )
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
    batch_size: Annotated[int, typer.Option()] = 256,
    limit: Annotated[int | None, typer.Option(help="Use only the first N train images.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """kNN and linear-probe top-1 on frozen embeddings, plus collapse health; saved beside the bundle."""
    from edge_ssl.evaluate import EvalConfig, evaluate_bundle

    config = EvalConfig(
        knn_k=tuple(k) if k else EvalConfig.knn_k, probe=probe, device=device, batch_size=batch_size
    )
    with stderr_console().status(f"evaluating {bundle.name} (embedding, kNN, probe)..."):
        result, path = evaluate_bundle(
            bundle, data_source(data), data_source(test_data), config, limit=limit
        )
    if as_json:
        emit_json(result.to_dict() | {"results_file": str(path)})
        return
    _print_eval_table(bundle.name, result)
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


# ---------------------------------------------------------------- encoders
@app.command()
def encoders(as_json: JsonOpt = False) -> None:
    """List the encoder names `--arch` accepts."""
    from edge_ssl.models import encoder_info, encoder_names

    infos = [encoder_info(name) for name in encoder_names()]
    if as_json:
        emit_json([_dc(info) for info in infos])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="encoders (kwargs: width=<multiplier>, image_size=<pixels>)")
    for column in ("name", "timm model", "family", "input", "description"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.name, info.timm_name, info.family, str(info.input_size), info.description)
    Console().print(table)


def _dc(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


# ---------------------------------------------------------------- doctor
@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """Report Python, torch, CUDA, onnxruntime providers, TensorRT and Jetson detection."""
    from edge_ssl.doctor import run_checks

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


# ---------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's bundle and results.")] = Path("edge-ssl-demo"),
    epochs: Annotated[int, typer.Option(help="Pretraining epochs on the embedded digits.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Pretrain a small SSL encoder on the embedded digits (~1 min on a CPU), evaluate it, print a table."""
    from edge_ssl.demo import run_demo

    console = stderr_console()
    with TrainingProgress(console) as bar:
        report = run_demo(out, epochs=epochs or None, device=device, progress=bar.update, log=console.print)
    if as_json:
        emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"edge-ssl demo: {report['method']} on {report['data']}")
    for column in ("encoder", "kNN top-1 (k=20)", "linear probe", "effective rank", "collapsed"):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        table.add_row(
            row["name"],
            f"{100 * row['knn_top1']:.1f}%",
            f"{100 * row['linear_probe_top1']:.1f}%",
            f"{row['effective_rank']:.1f}",
            "YES" if row["collapsed"] else "no",
        )
    Console().print(table)
    typer.echo(f"bundle: {report['bundle']}  ({report['pretrain_seconds']:.0f} s pretraining)")


def _register_capabilities() -> None:
    """Import each capability's command module so its commands join ``app`` (no heavy imports)."""
    import importlib
    import pkgutil

    import edge_ssl.commands as commands

    for info in pkgutil.iter_modules(commands.__path__):
        if info.name != "common":
            importlib.import_module(f"edge_ssl.commands.{info.name}")


_register_capabilities()


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and a non-zero exit; --debug shows the traceback."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        app(args=args, prog_name="edge-ssl", standalone_mode=True)
    except EdgeSSLError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except Exception as exc:  # a bug or an environment failure: still one line without --debug
        if debug:
            raise
        typer.echo(
            f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
