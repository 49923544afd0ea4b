"""The package's import graph, function-level imports included: no cycle, and imports at module top.

``make test`` also runs the import-linter contracts (``pyproject.toml``: layers, independent roles,
acyclic siblings). Run this file as a script to print the graph: one line per module, what it imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "efedllm"


def import_graph() -> dict[str, set[str]]:
    """efedllm module -> the efedllm modules it imports (grimp reads every import statement, nested ones too)."""
    graph = grimp.build_graph("efedllm")
    return {module: graph.find_modules_directly_imported_by(module) for module in sorted(graph.modules)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph.get(module, ()):
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def function_level_imports() -> list[str]:
    """``path:line`` of every import inside a function of the package that carries no comment saying why."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for function in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and "optional" not in lines[node.lineno - 1]:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["efedllm.client.remote"]  # the graph was really read
    assert cycles(graph) == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_sit_at_module_top():
    """A function-level import is allowed only for a heavy optional dependency, with a comment saying so."""
    assert function_level_imports() == []


if __name__ == "__main__":
    graph = import_graph()
    for module, imported in graph.items():
        print(f"{module} -> {', '.join(sorted(imported)) or '(nothing of efedllm)'}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, cycles: {cycles(graph) or 'none'}", file=sys.stderr)
