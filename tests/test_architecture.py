"""One house with rooms: no import cycles, core modules lean on one room at most, short
functions, and nothing under runtime/ or devices/ pulls torch in at import."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

#: Source folder -> import name (pyproject's package-dir).
FOLDERS = {"edge_ssl": "edge_ssl", "compress": "edge_ssl.compress", "runtime": "edge_ssl.runtime",
           "devices": "edge_ssl.devices"}
#: Capability rooms; every other module of edge_ssl/ is the shared floor.
ROOMS = ("edge_ssl.adapt", "edge_ssl.data", "edge_ssl.report", "edge_ssl.train", "edge_ssl.compress",
         "edge_ssl.runtime", "edge_ssl.devices")
#: The composition layer may use every room.
COMPOSERS = ("edge_ssl.cli", "edge_ssl.demo", "edge_ssl.commands")
MAX_FUNCTION_LINES = 60
HEAVY = ("torch", "tensorrt", "neural_compressor", "timm", "kornia")


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(PROJECT_ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or a name inside one)."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str) -> set[str]:
    """Project modules ``name`` imports anywhere in its file, function-level imports included."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    resolved = {_resolve(n) for n in found if n.startswith("edge_ssl")}
    return {m for m in resolved if m and m != name and not name.startswith(m + ".")}


def _cycles() -> list[list[str]]:
    graph = {name: imports_of(name) for name in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            if component:
                cycles.append(sorted([node, *component]))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for name in graph:
        if name not in index:
            visit(name)
    return cycles


def room_of(name: str) -> str | None:
    return next((room for room in ROOMS if name == room or name.startswith(room + ".")), None)


def test_no_import_cycles_even_through_function_level_imports():
    assert _cycles() == []


def test_core_modules_lean_on_one_room_at_most():
    crowded = {}
    for name in modules():
        if not name.startswith("edge_ssl.") or room_of(name) in ROOMS[4:]:
            continue  # compress/, runtime/ and devices/ are rooms of their own folders
        if any(name == c or name.startswith(c + ".") for c in COMPOSERS):
            continue
        others = {room_of(m) for m in imports_of(name)} - {None, room_of(name)}
        if len(others) > 1:
            crowded[name] = sorted(others)
    assert crowded == {}


def test_functions_fit_on_a_screen():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


def test_the_checker_sees_function_level_imports():
    assert "edge_ssl.adapt.run" in imports_of("edge_ssl.adapt.api")
    assert "edge_ssl.compress.training" in imports_of("edge_ssl.compress.distill")


@pytest.mark.parametrize("room", ["edge_ssl.runtime", "edge_ssl.devices"])
def test_every_device_side_module_imports_without_torch(room):
    names = [n for n in modules() if room_of(n) == room]
    probe = (f"import importlib, sys\nfor n in {names!r}:\n    importlib.import_module(n)\n"
             "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True, cwd=PROJECT_ROOT).stdout.split())
    assert not loaded & set(HEAVY), f"{room} pulls in {sorted(loaded & set(HEAVY))} at import"
