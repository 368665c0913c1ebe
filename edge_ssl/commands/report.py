"""`edge-ssl report`: an accuracy-latency report (HTML, optionally Markdown) over bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_ssl.commands.common import JsonOpt, app, emit_json


@app.command()
def report(
    bundles: Annotated[list[Path], typer.Argument(
        help="Bundles in pipeline order (teacher first: speed-ups are against the first one).")],
    out: Annotated[Path, typer.Option(help="The HTML file to write (self-contained).")] = Path(
        "report.html"),
    md: Annotated[bool, typer.Option("--md", help="Also write Markdown (+ PNG charts) beside it.")] = False,
    title: Annotated[str, typer.Option(help="Report title (default: first -> last bundle).")] = "",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report (and its .md/PNGs).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Per-stage table, lineage graph, accuracy-latency Pareto chart, latency distributions, environments."""
    from edge_ssl.report.write import write_report

    written = write_report(bundles, out, markdown=md, title=title or None, overwrite=overwrite)
    if as_json:
        emit_json({"written": [str(p) for p in written]})
        return
    for path in written:
        typer.echo(f"wrote {path}")
