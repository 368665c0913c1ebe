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


#: Appended to the guide's compress example so it runs in about a minute: few images, one epoch,
#: a short latency measurement. `distill.init=random`: a student initialized from the teacher's
#: channels starts with a collapsed embedding (effective rank ~1.3 on the shared teacher) that a
#: few steps cannot spread, and the stage's output check rightly refuses it; the real run trains
#: 100 epochs. Later flags override earlier ones, so the command as written stays in front.
QUICK_COMPRESS = ("--limit", "256", "--epochs", "1", "--eval-limit", "200", "--set", "bench_seconds=0.2",
                  "--set", "distill.batch_size=64", "--set", "distill.cache_views=1",
                  "--set", "distill.init=random", "--set", "prune_options.recovery_epochs=1",
                  "--set", "quantize_options.calibration_images=256")


@pytest.mark.slow
def test_the_guides_compress_example_runs_as_written(tmp_path):
    """docs/compress-your-checkpoint.md §4 with the shared teacher and CIFAR-10 (small --limit)."""
    from edge_ssl.bundle import Bundle
    from edge_ssl.cli import main

    shared = PROJECT_ROOT.parent / "shared"
    if not (shared / "teachers" / "simclr_resnet18_cifar.edge" / "manifest.json").is_file() or not (
            shared / "data" / "cifar10" / "cifar10_test.npz").is_file():
        pytest.skip(f"needs the shared teacher and CIFAR-10 under {shared} (see its README)")
    commands = [c for b in shell_blocks(DOCS / "compress-your-checkpoint.md") for c in b.commands
                if c.startswith("edge-ssl compress ") and "cifar-r18-to-r18x025-ort-cpu.yaml" in c]
    assert len(commands) == 1, commands  # section 4: the shared teacher with its recipe
    args = shlex.split(commands[0][len("edge-ssl "):])
    out = tmp_path / args[args.index("--out") + 1]
    args[args.index("--out") + 1] = str(out)
    cwd = os.getcwd()
    os.chdir(PROJECT_ROOT)  # the guide's paths are relative to the project root
    try:
        with pytest.raises(SystemExit) as done:
            main([*args, *QUICK_COMPRESS])
    finally:
        os.chdir(cwd)
    assert done.value.code in (0, None), f"`{commands[0]}` exited {done.value.code}"
    Bundle.open(out)  # the chosen stage (the closest to the recipe's targets on so few images)
    stages = out.with_name(out.name + ".stages")
    assert Bundle.open(stages / "3-quantize.edge").manifest.precision == "int8"
