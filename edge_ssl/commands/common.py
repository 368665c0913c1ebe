"""Shared pieces of the command line: the typer app, common options and output helpers.

Command modules (``edge_ssl.cli`` for the core, ``edge_ssl.commands.*`` for each
capability) register on this one ``app``; heavy imports stay inside each command.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from edge_ssl.errors import ConfigError

app = typer.Typer(
    name="edge-ssl",
    help="Self-supervised encoders from server GPUs to Jetson: pretrain, import, evaluate, inspect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

DataOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        help="Images: an .npz (x, optional y), an image folder (class subfolders or flat), or a "
        "cifar-10-batches-py dir. Repeat to combine. Default: the embedded digits set.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
LimitOpt = Annotated[int | None, typer.Option(help="Use only the first N images.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing OUT.")]
KwOpt = Annotated[
    list[str] | None,
    typer.Option(help="KEY=VALUE passed to the encoder factory, e.g. width=0.5 (repeatable)."),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """edge-ssl: pretrain, compress, export, deploy, measure and adapt SSL encoders."""


def parse_key_values(pairs: list[str] | None, option: str) -> dict[str, Any]:
    """['width=0.5', 'image_size=64'] -> {'width': 0.5, 'image_size': 64} (JSON values)."""
    values: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {pair!r}.")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def comma_list(text: str | None) -> list[str] | None:
    """'a, b,,c' -> ['a', 'b', 'c']; None when the option was not given (or names nothing).

    Batch sizes have their own parser, shared with the on-device agent:
    ``edge_ssl.runtime.batch_sizes.parse_batch_sizes``.
    """
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    return names or None


def stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def data_source(data: list[str] | None) -> list[str] | None:
    return list(data) if data else None


class TrainingProgress:
    """A rich progress bar fed by pretrain's ProgressEvent callback."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task: Any = None

    def __enter__(self) -> TrainingProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def update(self, event: Any) -> None:
        total = event.epochs * event.steps_per_epoch
        done = (event.epoch - 1) * event.steps_per_epoch + event.step
        stats = f"loss {event.loss:.4f}  lr {event.lr:.2e}  {event.images_per_second:.0f} img/s"
        if self.task is None:
            self.task = self.progress.add_task("pretrain", total=total, completed=done, stats=stats)
        self.progress.update(
            self.task, total=total, completed=done, stats=stats,
            description=f"epoch {event.epoch}/{event.epochs}",
        )
