"""The import graph of graftlib/, passes/ and tools/ has no cycle, and the engine imports no pass or tool.

Read from the source (AST), so imports inside functions and under ``TYPE_CHECKING`` count like the
others: a lazy import hides a cycle from Python, not from the reader.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"graftlib": ROOT / "graftlib", "graftlib.passes": ROOT / "passes", "graftlib.tools": ROOT / "tools"}
OUTSIDE_ENGINE = ("graftlib.passes", "graftlib.tools")


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if package == "graftlib" and parts and parts[0] in ("passes", "tools"):
                continue  # the worktree's symlinks to passes/ and tools/
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `name` imports, anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_reads_lazy_and_relative_imports(tmp_path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..grafted import Grafted\n"
                      "def f():\n    from ..tools import demo\n    import graftlib.io\n")
    known = {"graftlib.grafted", "graftlib.tools", "graftlib.tools.demo", "graftlib.io", "graftlib.diff"}
    assert _imports("graftlib.diff.m", source, known) == {"graftlib.grafted", "graftlib.tools",
                                                          "graftlib.tools.demo", "graftlib.io"}


def test_no_import_cycle() -> None:
    graph = _graph()
    assert len(graph) > 20 and "graftlib.grafted" in graph and "graftlib.passes.lora" in graph
    assert "graftlib.grafted" in graph["graftlib"]  # the graph is read, not empty
    cycles = _cycles(graph)
    assert not cycles, "import cycles (modules that import each other, lazily or not):\n" + "\n".join(
        "  " + ", ".join(c) for c in cycles)


@pytest.mark.parametrize("lower", ["merge", "io", "combine", "mixed", "peft", "diff", "select", "registry"])
def test_lower_modules_do_not_import_grafted(lower: str) -> None:
    graph = _graph()
    names = [m for m in graph if m == f"graftlib.{lower}" or m.startswith(f"graftlib.{lower}.")]
    assert names, lower
    for name in names:
        assert "graftlib.grafted" not in graph[name], f"{name} imports graftlib.grafted; use graftlib.protocols"


def test_engine_imports_no_pass_or_tool() -> None:
    graph = _graph()
    engine = [m for m in graph if not m.startswith(OUTSIDE_ENGINE)]
    offending = {m: sorted(t for t in graph[m] if t.startswith(OUTSIDE_ENGINE)) for m in engine}
    assert not {m: t for m, t in offending.items() if t}, "the engine must not import passes or tools " \
        "(use the registry: graftlib.registry.get_method)"
