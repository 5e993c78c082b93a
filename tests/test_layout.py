"""The package layout is the architecture: imports point down the floors and never go round.

Read from the source (no imports run), so the check costs milliseconds and holds for modules
imported lazily inside functions too. docs/design.md draws the same floors.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.layers

PACKAGE = Path(__file__).resolve().parents[1] / "wsfs"

# Bottom to top. A module may import its own package's modules and anything on a lower floor;
# packages sharing a floor never import each other (blocks/ and meta/ know nothing of each
# other; fs/ and sync/ meet only in the daemon).
FLOORS: tuple[tuple[str, ...], ...] = (
    ("wsfs", "wsfs.errors", "wsfs.config", "wsfs.logs", "wsfs.runtime", "wsfs.progress",
     "wsfs.latency", "wsfs.backoff", "wsfs.cachedir"),
    ("wsfs.store",),
    ("wsfs.blocks", "wsfs.meta"),
    ("wsfs.fs", "wsfs.sync"),
    ("wsfs.daemon",),
    ("wsfs.commands",),
    ("wsfs.__main__",),  # `python -m wsfs`
)


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The wsfs modules `name` imports, top level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            targets = submodules + ([base] if len(submodules) < len(node.names) else [])
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: set(imports(name, path, modules)) for name, path in modules.items()}


def home(name: str) -> tuple[int, str]:
    """The floor of a module and the group (package or floor-0 module) it belongs to."""
    for level, groups in enumerate(FLOORS):
        for group in sorted(groups, key=len, reverse=True):
            if group != "wsfs" and (name == group or name.startswith(group + ".")):
                return level, group
    if name == "wsfs":
        return 0, "wsfs"
    raise AssertionError(f"{name} is on no floor: add it to FLOORS here and to docs/design.md")


def test_every_import_points_down() -> None:
    upward = []
    for name, targets in graph().items():
        floor, group = home(name)
        for target in targets:
            target_floor, target_group = home(target)
            if target_group == group and floor > 0:
                continue  # within one package
            if target_floor < floor or (floor == target_floor == 0):
                continue
            upward.append(f"{name} -> {target}")
    assert not upward, "imports that do not point down a floor:\n" + "\n".join(sorted(upward))


def test_no_import_cycle() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_offline_commands_load_neither_fuse_nor_the_flusher() -> None:
    """`wsfs ls`, `du`, `gc`, `fsck` work on a machine without FUSE, and start fast."""
    heavy = {"wsfs.fs", "wsfs.sync.flusher", "wsfs.daemon.serve"}
    edges = graph()
    for command in ("wsfs.commands.admin.commands", "wsfs.commands.fsck"):
        seen: set[str] = set()
        todo = [command]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(edges[name])
        assert not seen & heavy, f"{command} imports {sorted(seen & heavy)}"
