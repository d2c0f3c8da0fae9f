"""The engine's shape, kept by a test: no import cycle between qcowfs modules (imports
inside functions included), no module over about 500 lines, pyfuse3 and trio only in
the FUSE-facing modules, and ruff + mypy clean."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "qcowfs"
MAX_LINES = 520
FUSE_MODULES = {"fs", "fs_snapshots", "fuseloop", "mount", "fs_io", "io_threads"}


def _imports(path: Path) -> set:
    """qcowfs modules a module imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("qcowfs."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("qcowfs."))
    return out


def _graph() -> dict:
    mods = {p.stem: p for p in PKG.glob("*.py")}
    return {m: _imports(p) & set(mods) - {m} for m, p in mods.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict = {}
    path: list = []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_stay_small():
    big = {p.name: n for p in PKG.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_only_the_fuse_layer_knows_pyfuse3_and_trio():
    for p in PKG.glob("*.py"):
        if p.stem in FUSE_MODULES:
            continue
        names = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        assert not names & {"pyfuse3", "trio"}, f"{p.name} imports {names & {'pyfuse3', 'trio'}}"


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    assert found, f"{name} is installed by scripts/setup (the test extra)"
    return found


@pytest.mark.parametrize("cmd", [["ruff", "check", "qcowfs"], ["mypy"]], ids=["ruff", "mypy"])
def test_linters_are_clean(cmd):
    p = subprocess.run([_tool(cmd[0]), *cmd[1:]], cwd=PKG.parent, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
