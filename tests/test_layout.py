"""Install layout: one namespace mapped onto the card's folders; light imports stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

HEAVY = ("torch", "tensorrt", "neural_compressor", "timm", "kornia")


@pytest.mark.parametrize(
    ("module", "folder"),
    [
        ("edge_ssl", "edge_ssl"),
        ("edge_ssl.compress", "compress"),
        ("edge_ssl.runtime", "runtime"),
        ("edge_ssl.devices", "devices"),
        ("edge_ssl.train.methods", "edge_ssl/train/methods"),
    ],
)
def test_namespace_maps_onto_the_project_folders(module, folder):
    imported = __import__(module, fromlist=["_"])
    assert Path(imported.__file__).resolve().parent == (PROJECT_ROOT / folder).resolve()


def _imported_after(code: str) -> set[str]:
    probe = code + "\nimport sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT
    ).stdout.split()
    return {name.split(".")[0] for name in out}


def test_device_side_imports_no_torch_or_tensorrt():
    loaded = _imported_after(
        "import edge_ssl.runtime, edge_ssl.devices, edge_ssl.bundle, edge_ssl.devices.detect"
    )
    assert not loaded & set(HEAVY), f"heavy modules imported: {loaded & set(HEAVY)}"


def test_cli_help_imports_no_torch():
    loaded = _imported_after(
        "from edge_ssl.cli import app\n"
        "try:\n    app(['--help'], prog_name='edge-ssl')\nexcept SystemExit:\n    pass"
    )
    assert not loaded & set(HEAVY), f"heavy modules imported: {loaded & set(HEAVY)}"


def test_console_script_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "edge_ssl", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("pretrain", "import", "eval", "inspect", "encoders", "doctor", "demo"):
        assert command in out
