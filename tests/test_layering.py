"""The package's shape: every module imports on its own, no upward imports, a fast CLI start."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmflash

ROOT = Path(llmflash.__file__).parent
# package -> the llmflash packages it may import (docs/ARCHITECTURE.md, "What may import what")
BASE = {"errors", "sizes", "compute"}  # leaf modules: the error type, size parsing, matmul kernels
ALLOWED = {
    "errors": set(), "sizes": {"errors"}, "compute": {"errors"},
    "models": {"models"} | BASE,
    "format": {"format", "models"} | BASE,
    "runtime": {"runtime", "format", "models"} | BASE,
    "conversion": {"conversion", "runtime", "format", "models"} | BASE,
    "tools": {"tools", "conversion", "runtime", "format", "models", "defaults"} | BASE,
}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def llmflash_imports(path: Path) -> set[tuple[str, int]]:
    """(imported llmflash package, line) for every import in a file, at any depth."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        for name in _imported(node):
            if name.startswith("llmflash.") and top(name) and not top(name).startswith("__"):
                out.add((top(name), node.lineno))
    return out


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_graph() -> dict[str, set[str]]:
    """Module -> llmflash modules it imports at module level (what runs when it is imported)."""
    known = {module_of(p) for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
                continue
            for name in _imported(node):
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name.startswith("llmflash.") and name != module_of(path):
                    edges.add(name)
        graph[module_of(path)] = edges
    return graph


def test_no_upward_imports():
    bad: list[str] = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        pkg = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        allowed = ALLOWED.get(pkg)
        if allowed is None:  # api, cli, server, integrations, defaults: the faces may import anything
            continue
        for imported, line in llmflash_imports(path):
            if imported != pkg and imported not in allowed:
                bad.append(f"{rel}:{line} imports llmflash.{imported}")
    bad = sorted(set(bad))
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_module_level_import_cycle():
    """The explicit module-level imports form no cycle (a package's __init__ importing its own
    submodules is the one edge allowed back, since Python resolves it)."""
    graph = module_level_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, ()):
            if n.startswith(m + "."):  # a package importing its own submodule
                continue
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("entry", ["llmflash", "llmflash.cli", "llmflash.api", "llmflash.runtime.modes",
                                   "llmflash.tools.bench", "llmflash.conversion.writer", "llmflash.format.layout"])
def test_entry_modules_import_in_a_fresh_interpreter(entry):
    proc = subprocess.run([sys.executable, "-c", f"import {entry}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cli_answers_fast_without_torch():
    """--help, --version and argument errors: no torch import, well under half a second."""
    probe = ("import sys, time; t = time.perf_counter()\n"
             "from llmflash.cli import build_parser\n"
             "try:\n    build_parser().parse_args(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(time.perf_counter() - t, 'torch' in sys.modules, 'numpy' in sys.modules)")
    for argv in (["--help"], ["--version"], ["generate"], ["bench", "--help"], ["nonsense"]):
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
        seconds, torch_loaded, numpy_loaded = proc.stdout.strip().splitlines()[-1].split()
        assert torch_loaded == "False" and numpy_loaded == "False", argv
        assert float(seconds) < 0.5, (argv, seconds)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmflash", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and llmflash.__version__ in proc.stdout
    assert time.perf_counter() - started < 5  # a generous bound on a loaded CI machine


def test_public_api_names_survive_submodule_imports():
    """`llmflash.convert` stays the API function after the importers are loaded (a subpackage of
    the same name would replace it)."""
    import llmflash.conversion.writer  # noqa: F401
    import llmflash.defaults  # noqa: F401

    assert callable(llmflash.convert) and llmflash.convert.__module__ == "llmflash.api"
    assert callable(llmflash.load)
