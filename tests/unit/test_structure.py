"""The engine's shape, kept by a test: the layers are folders and their rules are folder rules.

    qcowfs/errors.py   the error hierarchy: imports nothing of qcowfs
    qcowfs/format/     on-disk structures, no I/O: imports only format/ and errors
    qcowfs/crypto/     sector ciphers and LUKS key slots, computation only: crypto/, format/, errors
    qcowfs/engine/     the image and its parts: imports engine/, crypto/, format/, errors; no pyfuse3, no trio
    qcowfs/fuse/       FUSE operations, request loop, I/O threads, mount: anything below it;
                       the only folder that may import pyfuse3 or trio
    qcowfs/backup/     backups into qcow2 chains: engine/, crypto/, format/, errors (a mount is reached
                       through its files, as any client reaches it, never through fuse/)
    qcowfs/cli/        commands: anything

No import cycle between modules (imports inside functions included), ruff clean (qcowfs/,
qcowfs_dev/ and tests/) and mypy clean (qcowfs/, qcowfs_dev/). Module length has no cap: a
module is as long as its one concern needs (docs/architecture.md, "How long is a module"). The
checks take the package's path, so the test below plants violations in a copy of the tree and
sees each one reported.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.repo import ROOT

PKG = ROOT / "qcowfs"

#: what each layer may import of qcowfs (by first path component; "" is the package root)
ALLOWED = {
    "errors": set(),
    "format": {"format", "errors"},
    "crypto": {"crypto", "format", "errors"},
    "engine": {"engine", "crypto", "format", "errors"},
    "fuse": {"fuse", "engine", "crypto", "format", "errors", "__init__"},
    "backup": {"backup", "engine", "crypto", "format", "errors"},
    "cli": {"cli", "backup", "fuse", "engine", "crypto", "format", "errors", "__init__"},
    "__init__": set(),
    "__main__": {"cli"},
}
FUSE_ONLY = {"pyfuse3", "trio", "outcome"}


def modules(pkg: Path) -> dict[str, Path]:
    """Dotted module name (relative to the package) -> file, for every module of the tree."""
    out = {}
    for p in sorted(pkg.rglob("*.py")):
        parts = list(p.relative_to(pkg).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts.pop()
        out[".".join(parts)] = p
    return out


def _resolve(mod: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> set[str]:
    """The modules of the tree an ImportFrom names, as dotted names."""
    if node.level == 0:
        if not node.module or not node.module.startswith("qcowfs"):
            return set()
        base = node.module.split(".")[1:]
    else:
        here = mod.split(".") if is_package else mod.split(".")[:-1]
        if mod == "__init__":
            here = []
        base = here[: len(here) - (node.level - 1)] + (
            node.module.split(".") if node.module else []
        )
    out = set()
    for alias in node.names:
        sub = ".".join(base + [alias.name])
        out.add(sub if sub in known else ".".join(base) or "__init__")
    return out


def imports(pkg: Path) -> dict[str, set[str]]:
    """Module -> the tree's modules it imports, at any depth of its code."""
    mods = modules(pkg)
    known = set(mods)
    graph = {}
    for mod, path in mods.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found |= _resolve(mod, path.name == "__init__.py", node, known)
            elif isinstance(node, ast.Import):
                found |= {
                    a.name.split(".", 1)[1] for a in node.names if a.name.startswith("qcowfs.")
                }
        graph[mod] = {m for m in found if m in known} - {mod}
    return graph


def layer(mod: str) -> str:
    return mod.split(".")[0]


def layer_violations(pkg: Path) -> list[str]:
    out = []
    for mod, deps in sorted(imports(pkg).items()):
        allowed = ALLOWED.get(layer(mod))
        if allowed is None:
            out.append(
                f"{mod}: in no layer (put it in format/, crypto/, engine/, fuse/, backup/ or cli/)"
            )
            continue
        for dep in sorted(deps):
            if layer(dep) not in allowed and not dep.startswith(mod + "."):
                out.append(f"{mod} imports {dep}: {layer(mod)}/ may import only {sorted(allowed)}")
    return out


def fuse_only_violations(pkg: Path) -> list[str]:
    out = []
    for mod, path in modules(pkg).items():
        if layer(mod) == "fuse":
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out += [f"{mod} imports {n}: only fuse/ may" for n in sorted(names & FUSE_ONLY)]
    return out


def cycles(pkg: Path) -> list[str]:
    graph = imports(pkg)
    state: dict[str, str] = {}
    path: list[str] = []
    found: list[str] = []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append(" -> ".join(path[path.index(n) :] + [n]))
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_layers_import_only_downwards():
    assert layer_violations(PKG) == []


def test_only_the_fuse_layer_knows_pyfuse3_and_trio():
    assert fuse_only_violations(PKG) == []


def test_no_import_cycle():
    assert cycles(PKG) == []


def test_the_rules_catch_planted_violations(tmp_path):
    """Each rule fails on a tree that breaks it (a copy of qcowfs/ with one line planted)."""
    tree = tmp_path / "qcowfs"
    shutil.copytree(PKG, tree, ignore=shutil.ignore_patterns("__pycache__"))
    assert layer_violations(tree) == [] and fuse_only_violations(tree) == [] and cycles(tree) == []

    def plant(rel: str, line: str) -> None:
        p = tree / rel
        p.write_text(p.read_text() + "\n" + line + "\n")

    plant("format/entries.py", "from ..engine import image  # noqa")
    plant("engine/hostfile.py", "import trio  # noqa")
    plant("engine/resize.py", "from ..fuse.operations import QcowOperations  # noqa")
    plant("format/compression.py", "from . import snapshot_table  # noqa")
    plant("format/snapshot_table.py", "from .compression import decompress_cluster  # noqa")
    (tree / "loose.py").write_text("from .errors import QcowError  # noqa\n")
    assert sorted(layer_violations(tree)) == [
        "engine.resize imports fuse.operations: engine/ may import only ['crypto', 'engine', 'errors', 'format']",
        "format.entries imports engine.image: format/ may import only ['errors', 'format']",
        "loose: in no layer (put it in format/, crypto/, engine/, fuse/, backup/ or cli/)",
    ]
    assert fuse_only_violations(tree) == ["engine.hostfile imports trio: only fuse/ may"]
    assert "format.compression -> format.snapshot_table -> format.compression" in cycles(tree)


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    assert found, f"{name} is installed by scripts/setup (the test extra)"
    return found


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "qcowfs", "qcowfs_dev", "tests"],
        ["ruff", "format", "--check", "qcowfs", "qcowfs_dev", "tests"],
        ["mypy"],
    ],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_linters_are_clean(cmd):
    p = subprocess.run([_tool(cmd[0]), *cmd[1:]], cwd=PKG.parent, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
