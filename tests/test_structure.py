"""The codebase's shape, checked: imports flow one way and never in a circle.

``hotfleet`` ← ``node_agent`` ← ``coordinator``: the shared library knows
neither side, the agent never imports the coordinator.  And no module of the
product imports, directly or through others (function-level imports
included: they are cycles all the same, only deferred), a module that
imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.agents import ROOT

PACKAGES = ("hotfleet", "node_agent", "coordinator")
LAYER = {"hotfleet": 0, "node_agent": 1, "coordinator": 2}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "_proto" in path.parts:
                continue  # generated
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every product module ``path`` imports, at any depth of its code (TYPE_CHECKING aside)."""
    tree = ast.parse(path.read_text())
    checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            checking.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_imports_flow_from_coordinator_to_node_agent_to_hotfleet() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for target in _imports(path, set(modules)):
            if LAYER[target.split(".")[0]] > LAYER[name.split(".")[0]]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_no_module_imports_itself_through_others() -> None:
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how packages work: not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_what_the_worker_reads_in_bare_interpreters_needs_no_third_party_package() -> None:
    """hotfleet.protocol is read by the worker's metrics and by the coverage checks run in
    interpreters that have nothing installed (3.12/3.13 without grpc): stdlib only."""
    tree = ast.parse((ROOT / "hotfleet" / "protocol.py").read_text())
    imported = {
        (a.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        for a in (node.names if isinstance(node, ast.Import) else [node])
    }
    assert imported <= {"__future__", "enum"}, imported
