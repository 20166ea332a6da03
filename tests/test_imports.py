"""The package's layout holds: no import cycles, the core and storage work without grpc, and
each room imports only the rooms below it (docs/design.md, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raftfast"

# room -> rooms it must never import (directly, at module level)
FORBIDDEN = {
    "raftfast.core": (
        "raftfast.server",
        "raftfast.client",
        "raftfast.tools",
        "raftfast.transport",
        "raftfast.kv",
        "raftfast.storage",
        "raftfast.proto",
        "grpc",
    ),
    "raftfast.storage": (
        "raftfast.server",
        "raftfast.client",
        "raftfast.tools",
        "raftfast.transport",
        "raftfast.kv",
        "raftfast.proto",
        "grpc",
    ),
    "raftfast.kv": ("raftfast.server", "raftfast.client", "raftfast.tools"),
    "raftfast.objects": ("raftfast.server", "raftfast.client", "raftfast.tools", "grpc"),
    "raftfast.client": ("raftfast.server", "raftfast.tools", "raftfast.kv.fsm"),
    "raftfast.server": ("raftfast.tools",),
    "raftfast.transport": ("raftfast.server", "raftfast.client", "raftfast.tools"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "proto" in path.parts:
            continue
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _module_level_imports(path: Path) -> list[str]:
    """What ``path`` imports when it is imported (not inside functions or TYPE_CHECKING)."""
    out = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                out.append(node.module)
                out.extend(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    # The root package imports lazily (PEP 562): it is nobody's dependency at import time.
    return {
        name: {
            t for t in _module_level_imports(path) if t in modules and t not in (name, "raftfast")
        }
        for name, path in modules.items()
    }


def test_there_are_no_import_cycles() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert cycles == []


def test_the_graph_sees_imports() -> None:
    # (the checks below would pass vacuously on an empty graph)
    graph = _graph()
    assert "raftfast.core.rawnode" in graph["raftfast.server.driver"]
    assert "raftfast.client.calls" in graph["raftfast.client.client"]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_what_is_below_them(room: str) -> None:
    bad = []
    for name, path in _modules().items():
        if name != room and not name.startswith(room + "."):
            continue
        for target in _module_level_imports(path):
            for forbidden in FORBIDDEN[room]:
                if target == forbidden or target.startswith(forbidden + "."):
                    bad.append(f"{name} imports {target}")
    assert bad == []


def test_the_core_and_storage_work_without_grpc() -> None:
    code = (
        "import sys; sys.modules['grpc'] = None\n"
        "import raftfast.core.raft, raftfast.core.rawnode, raftfast.storage.wal\n"
        "import raftfast.storage.snapshot, raftfast.kv.fsm, raftfast.objects, raftfast\n"
        "assert raftfast.StateMachine is raftfast.statemachine.StateMachine\n"
        "assert 'grpc' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # ...and the same line fails where grpc is needed (the blocker above is real)
    code = "import sys; sys.modules['grpc'] = None\nimport raftfast.server.driver\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0 and "grpc" in done.stderr
