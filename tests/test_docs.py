"""The docs cannot rot: their marked shell examples run as written, and the CLI reference is current."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs"
#: The user guides whose every shell block must say whether it runs in this test.
GUIDES = (
    "quickstart.md",
    "compress-your-checkpoint.md",
    "deploy-to-jetson.md",
    "measure-latency.md",
    "adapt-on-device.md",
)
_MARKER = re.compile(r"<!--\s*doc-test(?::\s*skip\b\s*(?P<reason>.*?))?\s*-->")
_FENCE = re.compile(r"^```(?P<lang>console|bash|sh|shell)\s*$")


@dataclass(frozen=True)
class ShellBlock:
    doc: str
    line: int
    commands: tuple[str, ...]
    skip_reason: str | None  # None: runnable; "": unmarked


def shell_blocks(path: Path) -> list[ShellBlock]:
    """Fenced console/bash blocks with the doc-test marker (if any) on the lines before them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not _FENCE.match(lines[i]):
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        marker = _marker_before(lines, start)
        reason = "" if marker is None else (marker.group("reason") if marker.group(0).find("skip") >= 0 else None)
        blocks.append(ShellBlock(path.name, start + 1, tuple(_commands(body)), reason))
        i += 1
    return blocks


def _marker_before(lines: list[str], fence: int) -> re.Match | None:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return _MARKER.search(lines[j]) if j >= 0 else None


def _commands(body: list[str]) -> list[str]:
    """`$ cmd \\` continuation lines joined; output lines (no `$ `) ignored."""
    commands, current = [], None
    for raw in body:
        line = raw.rstrip()
        if current is not None:
            current += " " + line.rstrip("\\").strip()
        elif line.startswith("$ "):
            current = line[2:].rstrip("\\").strip()
        if current is not None and not line.endswith("\\"):
            commands.append(current)
            current = None
    return commands


def _run(command: str, cwd: Path) -> None:
    """`edge-ssl ...` runs in this process (one torch import for the whole doc); the rest via bash."""
    from edge_ssl.cli import main

    if command.startswith("edge-ssl "):
        try:
            main(shlex.split(command[len("edge-ssl "):], comments=True))
        except SystemExit as exc:
            assert exc.code in (0, None), f"`{command}` exited {exc.code}"
        return
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{command}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"`{command}` failed:\n{done.stdout}\n{done.stderr}"


def _guides() -> list[Path]:
    return [DOCS / name for name in GUIDES if (DOCS / name).exists()]


@pytest.mark.parametrize("doc", _guides(), ids=lambda p: p.name)
def test_every_shell_block_says_whether_it_runs(doc):
    unmarked = [b.line for b in shell_blocks(doc) if b.skip_reason == ""]
    assert not unmarked, (
        f"{doc.name}: shell blocks at lines {unmarked} need `<!-- doc-test -->` (runs in "
        "tests/test_docs.py) or `<!-- doc-test: skip WHY -->` (needs a Jetson, SSH host, GPU...)"
    )


def _runnable(doc: Path) -> list[ShellBlock]:
    return [b for b in shell_blocks(doc) if b.skip_reason is None]


@pytest.mark.parametrize("doc", [d for d in sorted(DOCS.glob("*.md")) if _runnable(d)], ids=lambda p: p.name)
def test_doc_examples_run_as_written(doc, tmp_path, monkeypatch):
    """Every doc's `<!-- doc-test -->` blocks, in order, in one fresh folder per doc."""
    blocks = _runnable(doc)
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        for command in block.commands:
            _run(command, tmp_path)


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (DOCS / "cli-reference.md").read_text(encoding="utf-8")
    assert committed == module.render_cli_reference(), (
        "docs/cli-reference.md is out of date: run `.venv/bin/python docs/gen_cli.py`"
    )


def test_doc_links_point_at_files_that_exist():
    for doc in _guides():
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
