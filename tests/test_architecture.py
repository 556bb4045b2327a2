"""The architecture as tests: which room may import which, no import cycles, no giant modules.

The rooms of ``fleet/`` and the direction of their imports are drawn in docs/architecture.md;
this file is the executable half of that page. Every import counts, whether at module level,
inside a function (a lazy import is still a dependency) or under ``TYPE_CHECKING`` (a cycle the
type checker needs is still a cycle a reader has to untangle).

``python tests/test_architecture.py`` prints the largest modules and classes, the table that
docs/architecture.md shows.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("device", "fleet")

#: What each room of fleet/ may import (besides itself, ``device`` and the package root).
#: Read it bottom-up: state and strategies depend on nothing of the fleet manager; the CLI may
#: use everything. Nothing may point back up.
ALLOWED: dict[str, frozenset[str]] = {
    "state": frozenset(),
    "strategies": frozenset(),
    "ops": frozenset({"state"}),
    "runtime": frozenset({"state", "strategies", "ops"}),
    "sim": frozenset({"state", "strategies", "ops", "runtime"}),
    "report": frozenset({"state", "strategies"}),
    "web": frozenset({"state", "strategies", "ops", "report"}),
    "deploy": frozenset({"state", "ops"}),
    "cli": frozenset({"state", "strategies", "ops", "runtime", "sim", "report", "web", "deploy"}),
}

MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "fleet.runtime.runner"; a package is named by its __init__
    path: Path

    @property
    def room(self) -> str | None:
        """The fleet room (``fleet.state.store`` -> ``state``); None outside fleet's rooms."""
        parts = self.name.split(".")
        return parts[1] if parts[0] == "fleet" and len(parts) > 1 else None


def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "pb" in path.relative_to(ROOT).parts:  # generated protobuf code
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            found[name] = Module(name, path)
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (longest known prefix), else None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: Module) -> Iterator[tuple[str, int]]:
    """(imported project module, line) for every import statement in ``module``."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), str(module.path))
    is_package = module.path.name == "__init__.py"
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.name.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` depends on pkg.sub when sub is a module, else on pkg.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module.name:
                yield resolved, node.lineno


GRAPH: dict[str, set[str]] = {
    name: {target for target, _ in _imports(module)} for name, module in MODULES.items()
}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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


# ---- the rules ------------------------------------------------------------------------------


def test_the_cycle_finder_finds_a_cycle() -> None:
    """Guards the guard: a finder that never reports would make the next test pass forever."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_device_or_fleet() -> None:
    """A cycle means neither module can be read, tested or moved without the other."""
    assert _cycles(GRAPH) == []


def test_device_never_imports_fleet() -> None:
    """A device installs ``sparsefleet`` without the fleet manager's dependencies (click, rich,
    matplotlib); one import of fleet/ from device/ would break every Pi."""
    offending = [
        f"{MODULES[name].path.relative_to(ROOT)}:{line} imports {target}"
        for name in MODULES
        if name.startswith("device")
        for target, line in _imports(MODULES[name])
        if target.startswith("fleet")
    ]
    assert offending == []


def test_every_fleet_module_lives_in_a_room() -> None:
    """fleet/ has rooms, not a flat folder: a new top-level module must find its room."""
    loose = sorted(
        name
        for name in MODULES
        if name.startswith("fleet.") and name.count(".") == 1
        if MODULES[name].path.name != "__init__.py"
    )
    assert loose == [], f"modules directly under fleet/ (move them into a room): {loose}"
    rooms = {m.room for m in MODULES.values() if m.room is not None}
    assert rooms == set(ALLOWED), "a room was added or removed: update ALLOWED and the docs"


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_the_rooms_below_them(room: str) -> None:
    """The direction of imports: cli -> runtime/sim/report -> strategies/state/ops, never back.

    For example the store must not know the runner exists, and a strategy (pure aggregation
    maths) must not reach into the round loop or the CLI."""
    offending = []
    for module in MODULES.values():
        if module.room != room:
            continue
        for target, line in _imports(module):
            target_room = MODULES[target].room
            if target_room is None or target_room == room or target_room in ALLOWED[room]:
                continue
            offending.append(f"{module.path.relative_to(ROOT)}:{line} imports {target}")
    assert offending == []


def test_the_rules_catch_an_upward_import(tmp_path: Path) -> None:
    """Guards the guard: a state module that imports the runner is reported."""
    fake = Module("fleet.state.fake", tmp_path / "fake.py")
    fake.path.write_text("from fleet.runtime.runner import Runner\n", encoding="utf-8")
    MODULES[fake.name] = fake
    try:
        imports = list(_imports(fake))
    finally:
        del MODULES[fake.name]
    assert imports == [("fleet.runtime.runner", 1)]
    assert "runtime" not in ALLOWED["state"]


# ---- sizes ----------------------------------------------------------------------------------


def _line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def _classes(module: Module) -> Iterator[tuple[str, int]]:
    tree = ast.parse(module.path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
            yield f"{module.name}.{node.name}", node.end_lineno - node.lineno + 1


def _documented_exceptions() -> set[str]:
    """Modules docs/architecture.md allows over the limit: its lines ``- allowed: `path` ...``."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    return set(re.findall(r"^- allowed: `([^`]+)`", text, flags=re.MULTILINE))


def test_no_module_over_the_limit_unless_the_docs_say_why() -> None:
    allowed = _documented_exceptions()
    too_big = sorted(
        f"{m.path.relative_to(ROOT)} ({_line_count(m.path)} lines)"
        for m in MODULES.values()
        if _line_count(m.path) > MAX_MODULE_LINES and str(m.path.relative_to(ROOT)) not in allowed
    )
    assert too_big == [], f"over {MAX_MODULE_LINES} lines; split, or say why in the docs"


def test_no_class_over_the_limit() -> None:
    too_big = sorted(
        f"{name} ({lines} lines)"
        for module in MODULES.values()
        for name, lines in _classes(module)
        if lines > MAX_CLASS_LINES
    )
    assert too_big == []


def _size_table(top: int = 10) -> str:
    modules = sorted(((_line_count(m.path), m) for m in MODULES.values()), key=lambda x: -x[0])
    classes = sorted((c for m in MODULES.values() for c in _classes(m)), key=lambda c: -c[1])
    lines = ["| module | lines |", "|---|---:|"]
    lines += [f"| `{m.path.relative_to(ROOT)}` | {n} |" for n, m in modules[:top]]
    lines += ["", "| class | lines |", "|---|---:|"]
    lines += [f"| `{name}` | {n} |" for name, n in classes[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(_size_table() + "\n")
