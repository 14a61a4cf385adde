"""The import contract between the layers, checked statically on the source of every module under bridge/.

Every import statement counts: at module level, inside functions and classes, and under
``if TYPE_CHECKING:`` (a type-only import is still a dependency of the module's design, and it is the
first step towards a runtime one). Nothing is imported here: the source is parsed with ``ast``.

- bridge.core is pure: no I/O or adapter library, and nothing from bridge outside bridge.core.
- the energy arithmetic (bridge.energy.types, intervals, tariffs, report, meters, modbus_map) is pure in the same way: it
  builds on bridge.core and itself only.
- bridge.config builds on bridge.core only (and itself, and the pure energy parsers).
- the energy store and recorder are adapters: like a north side, they know neither bridge.south nor the
  assembly.
- bridge.south and bridge.north do not know each other, nor what assembles them (app, service, cli, demo,
  testing): neither side receives the App.
- no import cycle among bridge modules.
"""
from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bridge"

# Modules that do I/O or wrap an I/O stack: none of them belongs in the pure core. Pure standard-library
# modules (struct, dataclasses, enum, math, bisect, time, hashlib, hmac, os for os.urandom, ...) are fine.
CORE_FORBIDDEN = frozenset({
    "asyncio", "socket", "selectors", "serial", "ssl", "threading", "subprocess", "uvloop", "asyncua",
    "prometheus_client", "yaml",
})
ASSEMBLY = ("bridge.app", "bridge.service", "bridge.cli", "bridge.demo", "bridge.testing")


@dataclass(frozen=True)
class Import:
    """One imported name, as the module that imports it sees it."""
    file: Path
    line: int
    statement: str        # the source text of the import statement
    target: str           # what is imported, absolute: "asyncio", "bridge.core.codec", "prometheus_client.core"
    type_only: bool       # under ``if TYPE_CHECKING:``

    @property
    def top(self) -> str:
        return self.target.split(".")[0]

    def __str__(self) -> str:
        where = f"{self.file.relative_to(ROOT)}:{self.line}"
        return f"{where}: {self.statement}{'  (under TYPE_CHECKING)' if self.type_only else ''}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def bridge_files() -> dict[str, Path]:
    """Module name -> file, for every .py under bridge/."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = bridge_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _type_only_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the statements in the body of an ``if TYPE_CHECKING:`` (not its else branch)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                for inner in ast.walk(statement):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def _package_of(module: str, path: Path) -> str:
    """The package that a relative import in ``module`` is relative to."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_in_source(source: str, path: Path, module: str, modules: frozenset[str] | set[str]) -> list[Import]:
    """Every import in ``source`` (all nesting levels). ``from X import y`` is an import of module X.y when
    that is a module of ``modules``, else of X: the names it takes from X are X's attributes."""
    tree = ast.parse(source, filename=str(path))
    type_only = _type_only_lines(tree)
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module, path)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                origin = ".".join(p for p in (base, node.module) if p)
            else:
                origin = node.module or ""
            if origin == "__future__":
                continue
            targets = []
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                targets.append(candidate if candidate in modules else origin)
        else:
            continue
        statement = ast.get_source_segment(source, node) or ast.unparse(node)
        statement = " ".join(statement.split())
        for target in dict.fromkeys(targets):
            found.append(Import(path, node.lineno, statement, target, node.lineno in type_only))
    return found


def all_imports() -> dict[str, list[Import]]:
    names = frozenset(MODULES)
    return {module: imports_in_source(path.read_text(), path, module, names) for module, path in MODULES.items()}


IMPORTS = all_imports()


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def bridge_imports(module: str) -> Iterator[Import]:
    return (imp for imp in IMPORTS[module] if within(imp.target, "bridge"))


def report(rule: str, violations: list[str]) -> str:
    return f"{rule}; {len(violations)} violation(s):\n  " + "\n  ".join(violations)


# ------------------------------------------------------------------------------- the analysis itself


def test_the_layout_is_the_one_these_rules_are_about():
    """Guards against the rules passing vacuously after a move: each layer has modules and each is parsed."""
    for package in ("bridge.core", "bridge.config", "bridge.south", "bridge.north", "bridge.north.opcua"):
        assert package in MODULES, f"{package} is not a package under {PACKAGE}: update tests/test_architecture.py"
    for module in ("bridge.core.codec", "bridge.core.plan", "bridge.config.loader", "bridge.south.segment",
                   "bridge.north.modbus_tcp", "bridge.north.opcua.server", "bridge.app"):
        assert module in MODULES, f"{module} not found: update tests/test_architecture.py"
    assert any(imp.target == "bridge.core.codec" for imp in IMPORTS["bridge.core.image"])


def test_every_kind_of_import_is_seen(tmp_path):
    source = (
        "from __future__ import annotations\n"
        "import os, bridge.core.codec as c\n"
        "from typing import TYPE_CHECKING\n"
        "from bridge.core import pdu as P, errors\n"
        "from bridge import __version__\n"
        "from . import sibling\n"
        "from ..core.model import Config\n"
        "if TYPE_CHECKING:\n"
        "    from bridge.app import App\n"
        "else:\n"
        "    import json\n"
        "def f():\n"
        "    import asyncio\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from yaml import safe_load\n"
    )
    modules = {"bridge", "bridge.core", "bridge.core.codec", "bridge.core.pdu", "bridge.core.errors",
               "bridge.core.model", "bridge.north", "bridge.north.sibling", "bridge.app"}
    path = tmp_path / "bridge" / "north" / "thing.py"
    found = imports_in_source(source, path, "bridge.north.thing", modules)
    seen = {(imp.target, imp.type_only) for imp in found}
    assert seen == {
        ("os", False), ("bridge.core.codec", False), ("typing", False), ("bridge.core.pdu", False),
        ("bridge.core.errors", False), ("bridge", False), ("bridge.north.sibling", False),
        ("bridge.core.model", False), ("bridge.app", True), ("json", False), ("asyncio", False),
        ("yaml", False),
    }


def find_cycle_in(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """For each strongly connected component that has a cycle: its members, and one cycle through them
    (a path that returns to its start)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:
        start = min(component)
        if len(component) == 1 and start not in graph.get(start, ()):
            continue
        # the shortest way from start back to start inside the component, breadth first
        parent: dict[str, str | None] = {start: None}
        queue = deque([start])
        while True:
            v = queue.popleft()
            if start in graph[v]:
                break
            for w in sorted(graph[v] & component):
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
        path: list[str] = []
        step: str | None = v
        while step is not None:
            path.append(step)
            step = parent[step]
        cycles.append((sorted(component), [*reversed(path), start]))
    return cycles


def test_the_cycle_finder_reports_the_path():
    assert find_cycle_in({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [(["a", "b", "c"], ["a", "b", "c", "a"])]
    assert find_cycle_in({"a": {"a"}}) == [(["a"], ["a", "a"])]
    assert find_cycle_in({"a": {"b", "c"}, "b": {"a"}, "c": {"b"}, "d": {"a"}}) == [
        (["a", "b", "c"], ["a", "b", "a"])]


# ------------------------------------------------------------------------------- the rules


def test_core_is_pure():
    violations = []
    for module in MODULES:
        if not within(module, "bridge.core"):
            continue
        for imp in IMPORTS[module]:
            if imp.top in CORE_FORBIDDEN:
                violations.append(f"{imp}  -> {imp.top} is I/O or an adapter library")
            elif within(imp.target, "bridge") and not within(imp.target, "bridge.core"):
                violations.append(f"{imp}  -> {imp.target} is outside bridge.core")
    assert not violations, report("bridge.core must import no I/O or adapter module and nothing from bridge "
                                  "outside bridge.core", violations)


ENERGY_PURE = ("bridge.energy.types", "bridge.energy.intervals", "bridge.energy.tariffs", "bridge.energy.report",
               "bridge.energy.meters", "bridge.energy.modbus_map")


def test_energy_arithmetic_is_pure():
    violations = []
    for module in ENERGY_PURE:
        assert module in MODULES, f"{module} not found: update tests/test_architecture.py"
        for imp in IMPORTS[module]:
            if imp.top in CORE_FORBIDDEN or imp.top in ("sqlite3", "concurrent"):
                violations.append(f"{imp}  -> {imp.top} is I/O or an adapter library")
            elif within(imp.target, "bridge") and not (within(imp.target, "bridge.core") or imp.target in ENERGY_PURE
                                                        or imp.target == "bridge.energy"):
                violations.append(f"{imp}  -> {imp.target} is neither bridge.core nor pure energy arithmetic")
    assert not violations, report("the energy arithmetic must stay pure", violations)


def test_energy_adapters_know_neither_the_bus_nor_the_assembly():
    violations = [f"{imp}  -> {imp.target}"
                  for module in MODULES if within(module, "bridge.energy")
                  for imp in bridge_imports(module)
                  if within(imp.target, "bridge.south") or any(within(imp.target, a) for a in ASSEMBLY)]
    assert not violations, report("bridge.energy must import nothing from bridge.south nor the assembly", violations)


def test_config_builds_on_core_only():
    violations = [f"{imp}  -> {imp.target}"
                  for module in MODULES if within(module, "bridge.config")
                  for imp in bridge_imports(module)
                  if not (within(imp.target, "bridge.core") or within(imp.target, "bridge.config")
                          or imp.target in ENERGY_PURE)]
    assert not violations, report("bridge.config may import only bridge.core, bridge.config and the pure energy "
                                  "arithmetic", violations)


@pytest.mark.parametrize("side, other", [("bridge.south", "bridge.north"), ("bridge.north", "bridge.south")])
def test_the_sides_know_neither_each_other_nor_the_assembly(side, other):
    """South and north meet only in the core (the register image); the App is built from them, never passed
    into them. bridge.testing counts as assembly for both sides: it builds an App."""
    violations = []
    for module in MODULES:
        if not within(module, side):
            continue
        for imp in bridge_imports(module):
            if within(imp.target, other):
                violations.append(f"{imp}  -> {imp.target} is the other side")
            elif any(within(imp.target, assembly) for assembly in ASSEMBLY):
                violations.append(f"{imp}  -> {imp.target} is the assembly")
    assert not violations, report(f"{side} must import nothing from {other} nor from {', '.join(ASSEMBLY)}",
                                  violations)


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], Import]]:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    evidence: dict[tuple[str, str], Import] = {}
    for module in MODULES:
        for imp in bridge_imports(module):
            if imp.target in MODULES and imp.target != module:
                graph[module].add(imp.target)
                evidence.setdefault((module, imp.target), imp)
    return graph, evidence


def test_no_import_cycle():
    graph, evidence = import_graph()
    cycles = find_cycle_in(graph)
    described = []
    for component, cycle in cycles:
        steps = "\n      ".join(str(evidence[a, b]) for a, b in zip(cycle, cycle[1:]))
        described.append(f"{' -> '.join(cycle)}  (all of {', '.join(component)} import each other, "
                         f"directly or not)\n      {steps}")
    assert not cycles, report("bridge modules must not import each other in a cycle "
                              "(type-only imports included)", described)
