"""Write a report: refuse to replace one unless asked, then HTML, Markdown and charts atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from edge_ssl.bundle import atomic_write_bytes
from edge_ssl.errors import ConfigError
from edge_ssl.report.collect import CHART_NAMES, collect_report
from edge_ssl.report.html import render_html, render_markdown
from edge_ssl.report.plots import render_charts


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
