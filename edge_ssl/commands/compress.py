"""Compression commands: distill, prune, quantize and the compress recipe (heavy imports inside)."""

from __future__ import annotations

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

EvalDataOpt = Annotated[
    list[str] | None,
    typer.Option("--eval-data", help="Labeled images for the kNN bank (repeatable), e.g. cifar10_train_*.npz."),
]
EvalTestOpt = Annotated[
    list[str] | None,
    typer.Option("--eval-test", help="Labeled test images for kNN top-1, e.g. cifar10_test.npz."),
]
LimitOpt = Annotated[int | None, typer.Option(help="Use only the first N unlabeled images.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing OUT.")]


def _opened(bundle: Any) -> Any:
    """``bundle`` as an open Bundle (a path is opened without re-hashing: reading its size)."""
    from edge_ssl.bundle import Bundle

    return bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=False)


def _images_for(bundle: Any, data: list[str] | None, limit: int | None) -> Any:
    """Unlabeled images at the bundle's (path or Bundle) input size (resized when the source differs)."""
    from edge_ssl.data.sources import load_images

    size = _opened(bundle).manifest.input.shape[1]
    return load_images(data_source(data), split="train", image_size=size, limit=limit)


def _knn_data(eval_data: list[str] | None, eval_test: list[str] | None, *, bundle: Any = None,
              limit: int | None = None) -> Any:
    """Labeled bank and queries for kNN, at ``bundle``'s (path or Bundle) input size when given."""
    from edge_ssl.compress.measure import KnnData
    from edge_ssl.data.sources import load_images
    from edge_ssl.errors import ConfigError

    if not eval_data and not eval_test:
        return None
    if not eval_data or not eval_test:
        raise ConfigError("kNN evaluation needs both --eval-data (bank) and --eval-test (queries).")
    size = None if bundle is None else _opened(bundle).manifest.input.shape[1]
    return KnnData.from_datasets(load_images(list(eval_data), image_size=size, limit=limit),
                                 load_images(list(eval_test), image_size=size, limit=limit))


@app.command()
def distill(
    teacher: Annotated[Path, typer.Argument(help="Teacher bundle (float; a quantized one is traced to its float parent).")],
    student: Annotated[str, typer.Option(help="Student encoder name (see `edge-ssl encoders`).")],
    out: Annotated[Path, typer.Option(help="Student bundle to write.")],
    data: DataOpt = None,
    arch_opt: KwOpt = None,
    objective: Annotated[list[str] | None, typer.Option(help="feature, seed, ssl (repeatable; default feature + seed).")] = None,
    weight: Annotated[list[str] | None, typer.Option(help="OBJECTIVE=WEIGHT, e.g. seed=0.5 (repeatable).")] = None,
    ssl_method: Annotated[str, typer.Option(help="The student's own SSL loss for --objective ssl.")] = "simclr",
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step per process.")] = 256,
    lr: Annotated[float, typer.Option(help="AdamW LR for batch 256 (scaled linearly).")] = 2e-3,
    warmup_epochs: Annotated[float, typer.Option()] = 1.0,
    queue_size: Annotated[int, typer.Option(help="SEED queue length (teacher embeddings).")] = 4096,
    cache_views: Annotated[int | None, typer.Option(help="Fixed views per image whose teacher embeddings are cached (0 = none; default: 4 on CPU, 0 on GPU).")] = None,
    teacher_precision: Annotated[str, typer.Option(help="auto, fp32, bf16, fp16 (GPU only).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    steps_per_epoch: Annotated[int | None, typer.Option(help="Cap steps per epoch (quick trials).")] = None,
    init: Annotated[str, typer.Option(help="random, or teacher: start a narrower copy of the teacher's architecture from its channels (weight selection).")] = "random",
    limit: LimitOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.ckpt/ after a stop.")] = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Distill an SSL teacher into a smaller student on unlabeled images. Runs under torchrun (DDP)."""
    from edge_ssl.compress.distill import DistillConfig
    from edge_ssl.compress.distill import distill as run_distill

    weights = {k: float(v) for k, v in parse_key_values(weight, "--weight").items()}
    config = DistillConfig(
        student=student, student_kwargs=parse_key_values(arch_opt, "--arch-opt"),
        objectives=tuple(objective or ("feature", "seed")), weights=weights, ssl_method=ssl_method,
        epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs,
        queue_size=queue_size, cache_views=cache_views, teacher_precision=teacher_precision,
        device=device, seed=seed, steps_per_epoch=steps_per_epoch, init=init,
    )
    dataset = _images_for(teacher, data, limit)
    with TrainingProgress(stderr_console()) as bar:
        result = run_distill(teacher, config, dataset, out, resume=resume, overwrite=overwrite,
                             progress=bar.update)
    if result.bundle is None:
        return
    summary = {"bundle": str(result.bundle.path), "manifest_sha256": result.bundle.manifest_sha256,
               "final_loss": result.final_loss, "images_per_second": result.images_per_second,
               "params": result.bundle.manifest.metrics.get("params")}
    if as_json:
        emit_json(summary)
    else:
        typer.echo(f"wrote {summary['bundle']}  loss {result.final_loss:.4f}  "
                   f"{summary['params'] / 1e6:.2f}M params  {result.images_per_second:.0f} images/s")


@app.command()
def prune(
    bundle: Annotated[Path, typer.Argument(help="Float bundle to prune (a quantized one is traced to its float parent).")],
    out: Annotated[Path, typer.Option(help="Pruned bundle to write.")],
    ratio: Annotated[float, typer.Option(help="Fraction of channels to remove, in (0, 1).")] = 0.5,
    data: DataOpt = None,
    importance: Annotated[str, typer.Option(help="l1, l2, bn_scale or taylor (uses --data).")] = "l2",
    scope: Annotated[str, typer.Option(help="global (rank channels across layers) or uniform.")] = "global",
    round_to: Annotated[int, typer.Option(help="Keep channel counts multiples of this (TensorRT likes 8).")] = 8,
    exclude: Annotated[list[str] | None, typer.Option(help="Module name pattern never pruned, e.g. 'backbone.conv1' (repeatable).")] = None,
    steps: Annotated[int, typer.Option(help="Iterative pruning steps.")] = 1,
    recovery_epochs: Annotated[int, typer.Option(help="Recovery distillation epochs from the unpruned model after each step.")] = 0,
    prune_heads: Annotated[bool, typer.Option(help="ViT: remove whole heads instead of shrinking head dims.")] = False,
    device: Annotated[str, typer.Option(help="Device for recovery distillation.")] = "cpu",
    limit: LimitOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Structured pruning: channels (CNN) or heads / MLP width (ViT) are physically removed."""
    from edge_ssl.compress.prune import PruneConfig
    from edge_ssl.compress.prune import prune as run_prune

    config = PruneConfig(ratio=ratio, importance=importance, scope=scope, round_to=round_to,
                         exclude=tuple(exclude or ()), steps=steps, recovery_epochs=recovery_epochs,
                         prune_heads=prune_heads, device=device)
    needs_data = importance == "taylor" or recovery_epochs > 0 or data
    dataset = _images_for(bundle, data, limit) if needs_data else None
    result = run_prune(bundle, config, dataset, out, overwrite=overwrite)
    first, last = result.steps[0], result.steps[-1]
    summary = {"bundle": str(result.bundle.path), "manifest_sha256": result.bundle.manifest_sha256,
               "params_before": first["params"], "params": last["params"],
               "macs_before": first["macs"], "macs": last["macs"]}
    if as_json:
        emit_json(summary)
    else:
        typer.echo(f"wrote {summary['bundle']}  params {first['params'] / 1e6:.2f}M -> {last['params'] / 1e6:.2f}M  "
                   f"MACs {first['macs'] / 1e6:.1f}M -> {last['macs'] / 1e6:.1f}M")


@app.command()
def quantize(
    bundle: Annotated[Path, typer.Argument(help="Float bundle to quantize.")],
    out: Annotated[Path, typer.Option(help="Quantized bundle to write (model.onnx = the INT8/FP16 graph).")],
    data: DataOpt = None,
    precision: Annotated[str, typer.Option(help="int8 (calibrated QDQ) or fp16.")] = "int8",
    target: Annotated[str, typer.Option(help="ort-cpu (U8S8) or tensorrt (S8S8 symmetric).")] = "ort-cpu",
    calibration: Annotated[str, typer.Option(help="minmax, entropy or percentile.")] = "minmax",
    calibration_images: Annotated[int, typer.Option(help="Unlabeled images used for calibration.")] = 256,
    min_cosine: Annotated[float | None, typer.Option(help="Keep sensitive layers float until the mean embedding cosine vs FP32 reaches this.")] = None,
    max_knn_drop: Annotated[float | None, typer.Option(help="Keep sensitive layers float until kNN top-1 drops at most this many points (needs --eval-data/--eval-test).")] = None,
    max_fallback: Annotated[int, typer.Option(help="At most this many layers kept float.")] = 16,
    eval_data: EvalDataOpt = None,
    eval_test: EvalTestOpt = None,
    limit: LimitOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Post-training quantization of a bundle's encoder to INT8 (onnxruntime QDQ) or FP16."""
    from edge_ssl.compress.quantize import QuantizeConfig
    from edge_ssl.compress.quantize import quantize as run_quantize

    config = QuantizeConfig(precision=precision, target=target, calibration=calibration,
                            calibration_images=calibration_images, min_cosine=min_cosine,
                            max_knn_drop=max_knn_drop, max_fallback=max_fallback)
    knn = _knn_data(eval_data, eval_test)
    images = _images_for(bundle, data, limit or calibration_images).images
    console = stderr_console()
    quantized = run_quantize(bundle, config, images, out, knn=knn, overwrite=overwrite,
                             log=lambda m: console.print(m))
    written, report = quantized.bundle, quantized.report
    summary = {"bundle": str(written.path), "manifest_sha256": written.manifest_sha256,
               **{k: v for k, v in report.to_dict().items() if k not in ("trials", "sensitivity")}}
    if as_json:
        emit_json(summary)
        return
    typer.echo(f"wrote {written.path}  {precision} for {target}  cosine mean {report.mean_cosine:.4f} "
               f"min {report.min_cosine:.4f}  float layers: {', '.join(report.fallback_layers) or 'none'}")
    if report.message:
        typer.echo(report.message)


@app.command()
def compress(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Argument(help="Teacher bundle.")],
    out: Annotated[Path, typer.Option(help="Final bundle (the best stage); stages go to OUT.stages/.")],
    student: Annotated[str | None, typer.Option(help="Student encoder (omit to compress the teacher itself).")] = None,
    arch_opt: KwOpt = None,
    prune_ratio: Annotated[float | None, typer.Option("--prune", help="Pruning ratio in (0, 1).")] = None,
    quantize_to: Annotated[str | None, typer.Option("--quantize", help="int8, fp16 or none.")] = None,
    target: Annotated[str | None, typer.Option(help="ort-cpu or tensorrt.")] = None,
    data: DataOpt = None,
    eval_data: EvalDataOpt = None,
    eval_test: EvalTestOpt = None,
    eval_limit: Annotated[int | None, typer.Option(help="Use only the first N images of --eval-data and of --eval-test (quick trials).")] = None,
    for_profile: Annotated[str | None, typer.Option("--for", help="Device profile the budget is for, e.g. orin-nano-8gb (see `edge-ssl devices`): latency PREDICTED on that board, and a search for the student that fits before training.")] = None,
    precision: Annotated[str | None, typer.Option(help="int8, fp16 or none: the final precision (same as --quantize).")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="Latency budget at batch 1: on the --for board (predicted), else this host's onnxruntime CPU (measured).")] = None,
    force: Annotated[bool, typer.Option(help="Compress even when the teacher already fits the --for budget.")] = False,
    on: Annotated[str | None, typer.Option("--on", help="Measure every stage on this device (ssh://user@host or local) through the agent; the budget is checked on that MEASURED latency.")] = None,
    accept_new_host: Annotated[bool, typer.Option(help="With --on: trust a device's SSH host key on first contact.")] = False,
    max_knn_drop: Annotated[float | None, typer.Option(help="Allowed kNN top-1 drop vs the teacher, in points.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML; flags given here override it.")] = None,
    set_keys: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE overriding one recipe key, e.g. distill.batch_size=64 or quantize_options.calibration_images=128 (repeatable).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Distillation epochs (overrides the recipe).")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device for distillation: auto, cpu, cuda (overrides the recipe; the board is --for).")] = None,
    limit: LimitOpt = None,
    resume: Annotated[bool, typer.Option(help="Reuse the finished stages of an interrupted (or the last) run whose parent, settings and data match; redo the rest.")] = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Chain distill -> prune -> quantize toward a latency / accuracy target; print a per-stage table.

    Every setting of every stage is checked before the first one runs. Stages are written
    to OUT.stages.partial/ and swapped in with OUT only at the end: a failed or interrupted
    run leaves an earlier OUT as it was; --resume continues it.
    """
    from edge_ssl.bundle import Bundle
    from edge_ssl.commands.devices import env_settings
    from edge_ssl.compress.pipeline import compress as run_compress
    from edge_ssl.compress.stage_run import CompressInterrupted

    _check_board_flags(device, quantize_to, precision)
    config = _compress_recipe(recipe, set_keys, student=student, arch_opt=arch_opt, prune=prune_ratio,
                              quantize=quantize_to or precision, target=target, profile=for_profile,
                              max_latency_ms=max_latency_ms, max_knn_drop=max_knn_drop,
                              force=force or None, epochs=epochs, device=device, on=on)
    teacher_bundle = Bundle.open(teacher, verify=True)  # opened once for the whole run
    knn = _knn_data(eval_data, eval_test, bundle=teacher_bundle, limit=eval_limit)
    dataset = _images_for(teacher_bundle, data, limit)
    console = stderr_console()
    try:
        with TrainingProgress(console) as bar:
            result = run_compress(teacher_bundle, config, dataset, out, knn=knn, overwrite=overwrite, resume=resume,
                                  log=lambda m: console.print(m), progress=bar.update,
                                  device_settings=env_settings(accept_new_host) if config.on else None)
    except CompressInterrupted as stop:
        typer.echo(_interrupted_text(ctx, stop), err=True)
        raise typer.Exit(130) from None
    _show(result, as_json)


def _show(result: Any, as_json: bool) -> None:
    if as_json:
        emit_json(result.to_dict())
    elif result.bundle is None:  # the teacher fits the board's budget already
        typer.echo(result.message)
    else:
        _print_table(result)


def _table_columns(board: str | None, device: str | None) -> list[str]:
    columns = ["stage", "params", "MACs"] + ([] if board or device else ["bytes"]) + ["kNN %", "host ms"]
    columns += (["board ms"] + ([] if device else ["range ms"])) if board else []  # 80 columns
    columns += ["device ms"] if device else []
    return columns + (["prec"] if board or device else ["precision"])


def _table_cells(row: Any, chosen: str, board: str | None, device: str | None) -> list[str]:
    cells = [row.name + (" *" if row.name == chosen else ""),
             "-" if row.params is None else f"{row.params / 1e6:.2f}M",
             "-" if row.macs is None else f"{row.macs / 1e6:.1f}M"]
    cells += [] if board or device else [f"{row.bytes / 1e6:.2f} MB"]
    cells += ["-" if row.knn_top1 is None else f"{100 * row.knn_top1:.2f}",
              "-" if row.latency_ms is None else f"{row.latency_ms:.2f}"]
    if board:
        low, high = row.board_interval_ms or (None, None)
        cells.append("-" if row.board_ms is None else f"{row.board_ms:.3f}")
        cells += [] if device else ["-" if low is None else f"{low:.2f}-{high:.2f}"]
    if device:
        cells.append("-" if row.device_ms is None else f"{row.device_ms:.3f}")
    return cells + [(row.board_precision or row.precision) if board else row.precision]


def _check_board_flags(device: str | None, quantize: str | None, precision: str | None) -> None:
    """--device is a torch device, never a board; one precision."""
    from edge_ssl.devices.profiles import load_profiles
    from edge_ssl.errors import ConfigError

    if device is not None and device in load_profiles():
        raise ConfigError(f"--device {device} names a board; --device is the torch device for training "
                          f"(auto, cpu, cuda). Use --for {device} for the board.")
    if quantize is not None and precision is not None and quantize != precision:
        raise ConfigError(f"--quantize {quantize} and --precision {precision} disagree (the same setting); "
                          "pass one.")


def _compress_recipe(path: Path | None, set_keys: list[str] | None, *, arch_opt: list[str] | None,
                     epochs: int | None, device: str | None, **flags: Any) -> Any:
    """The recipe file, then --set KEY=VALUE, then the dedicated flags; mapping keys merge."""
    from edge_ssl.compress.recipe import load_recipe

    overrides: dict[str, Any] = {}
    for key, value in parse_key_values(set_keys, "--set").items():
        _set_dotted(overrides, key, _yaml_value(value))
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if arch_opt:
        overrides["student_kwargs"] = {**overrides.get("student_kwargs", {}),
                                       **parse_key_values(arch_opt, "--arch-opt")}
    distill = {k: v for k, v in {"epochs": epochs, "device": device}.items() if v is not None}
    if distill:
        overrides["distill"] = {**overrides.get("distill", {}), **distill}
    return load_recipe(path, overrides)


def _yaml_value(value: Any) -> Any:
    """``{lr: 0.001}`` or ``[feature, seed]`` as the recipe file would read them."""
    if not isinstance(value, str):
        return value
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """``distill.batch_size=64`` -> ``{"distill": {"batch_size": 64}}`` (a recipe key path)."""
    from edge_ssl.errors import ConfigError

    parts = key.split(".")
    if not all(parts) or len(parts) > 2:
        raise ConfigError(f"--set {key}=...: use KEY or SECTION.KEY, e.g. --set distill.batch_size=64.")
    if len(parts) == 1:
        values[key] = value
        return
    section = values.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"--set {key}=...: {parts[0]} is not a section of the recipe.")
    section[parts[1]] = value


def _interrupted_text(ctx: Any, stop: Any) -> str:
    """What Ctrl-C kept and the exact command that continues the run."""
    import shlex

    command = ["edge-ssl", ctx.info_name or "compress", *_given_args(ctx)]
    if "--resume" not in command:
        command.append("--resume")
    if stop.kept:
        kept = (f"the finished stage bundles {', '.join(p.name for p in stop.kept)} are kept in "
                f"{stop.folder}")
    else:
        kept = f"no stage had finished ({stop.folder} keeps any distillation checkpoint)"
    return (f"interrupted during stage {stop.stage!r}: {kept}; an earlier OUT and its stages are "
            f"untouched. Continue with:\n  {shlex.join(command)}")


def _given_args(ctx: Any) -> list[str]:
    """The command line that produced ``ctx``'s parameters (defaults left out)."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value is False or value == () or value == [] or value == param.default:
            continue
        if param.param_type_name == "argument":
            args.append(str(value))
        elif value is True:
            args.append(param.opts[0])
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [param.opts[0], str(item)]
        else:
            args += [param.opts[0], str(value)]
    return args


def _print_table(result: Any) -> None:
    """The stage table: this host's measured latency, the board's PREDICTED one with its
    interval (--for) and the device's MEASURED one (--on)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    board = result.rows[0].board if result.rows else None
    device = result.rows[0].device if result.rows else None
    table = Table(title="edge-ssl compress (* = the stage written to OUT)", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for column in _table_columns(board, device):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result.rows:
        table.add_row(*_table_cells(row, result.chosen, board, device))
    Console(width=80).print(table)
    typer.echo("host ms: measured here, onnxruntime CPU p50 (measured-host)")
    if board:
        typer.echo(f"board ms: PREDICTED for {board}, batch 1; range ms: its interval")
    if device:
        typer.echo(f"device ms: MEASURED on {device} through the agent")
    kind = result.rows[-1].budget_kind if result.rows else None
    if kind:
        typer.echo(f"the budget is checked on the {kind} latency")
    typer.echo(result.message)
    typer.echo(f"wrote {result.bundle.path} (stage {result.chosen!r})")
