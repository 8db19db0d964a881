"""The package's import rules, checked on the source with `ast`: no import cycle between modules, the dependency
direction between the packages, and engine/core/ importable without torch.

Every import counts, also those inside functions (a lazy import is still a dependency, and a cycle through one
is still a cycle) and those under `if TYPE_CHECKING:`.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
# package -> packages it must not import (DESIGN.md: serve -> trainer -> engine, serve -> adapters -> engine,
# trainer -> adapters, adapters/trainer -> storage; the engine imports none of the others; nothing imports serve;
# storage (databases and blob stores) imports none of them)
FORBIDDEN = {
    "loraplex.engine": ("loraplex.adapters", "loraplex.trainer", "loraplex.serve", "loraplex.bench",
                        "loraplex.storage"),
    "loraplex.storage": ("loraplex.engine", "loraplex.adapters", "loraplex.trainer", "loraplex.serve",
                         "loraplex.bench"),
    "loraplex.adapters": ("loraplex.trainer", "loraplex.serve", "loraplex.bench"),
    "loraplex.trainer": ("loraplex.serve", "loraplex.bench"),
    "loraplex.bench": ("loraplex.serve",),
}
NO_TORCH_PACKAGE = "loraplex.engine.core"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: root / folder for pkg, folder in setuptools["package-dir"].items()}


def discover_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of every package pyproject.toml maps."""
    modules = {}
    for pkg, folder in package_dirs(root).items():
        for path in folder.glob("*.py"):
            modules[pkg if path.name == "__init__.py" else f"{pkg}.{path.stem}"] = path
    return modules


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The modules of the package that one import statement loads: `from pkg import sub` names the submodule
    when `sub` is one, else the package; an unknown dotted name resolves to its nearest known parent."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = []
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            found.append(name)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = {dep for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                         for dep in _imported(module, path, node, modules)}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    path, seen = [start], {start}
    while True:  # every module of the component reaches start; walk until a module repeats
        nxt = min(w for w in graph[path[-1]] if w in component)
        if nxt in seen:
            return path[path.index(nxt):] + [nxt]
        path.append(nxt)
        seen.add(nxt)


def test_pyproject_lists_every_package():
    """A folder with an __init__.py that pyproject.toml does not list is missing from a wheel install."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = package_dirs()
    assert sorted(setuptools["packages"]) == sorted(dirs)
    for pkg, folder in dirs.items():
        for init in folder.glob("*/__init__.py"):
            assert f"{pkg}.{init.parent.name}" in dirs, f"{init.parent} is not in pyproject.toml's packages"


def test_no_import_cycles():
    modules = discover_modules()
    assert len(modules) > 50 and "loraplex.engine.core.scheduler" in modules
    cycles = find_cycles(import_graph(modules))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]  # a module importing itself is no cycle here


def test_package_dependency_direction():
    graph = import_graph(discover_modules())
    wrong = [f"{m} imports {d}" for m, deps in graph.items() for d in sorted(deps)
             for pkg, banned in FORBIDDEN.items() if (m == pkg or m.startswith(pkg + "."))
             and any(d == b or d.startswith(b + ".") for b in banned)]
    assert not wrong, "\n".join(wrong)


def test_engine_core_imports_only_engine_core():
    graph = import_graph(discover_modules())
    core = {m for m in graph if m == NO_TORCH_PACKAGE or m.startswith(NO_TORCH_PACKAGE + ".")}
    wrong = [f"{m} imports {d}" for m in sorted(core) for d in sorted(graph[m] - core)]
    assert not wrong, "\n".join(wrong)


def test_engine_core_imports_without_torch():
    """With torch made unimportable, every engine/core module still imports (in a fresh interpreter)."""
    core = sorted(m for m in discover_modules() if m == NO_TORCH_PACKAGE or m.startswith(NO_TORCH_PACKAGE + "."))
    assert "loraplex.engine.core.scheduler" in core and "loraplex.engine.core.kv_cache" in core
    code = ("import importlib, sys\n"
            "sys.modules['torch'] = None  # `import torch` now raises ImportError\n"
            f"for name in {core!r}:\n"
            "    importlib.import_module(name)\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "print('ok', len(sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]
