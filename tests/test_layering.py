"""The core modules stay layered: no import cycles among config, methods, objectives, models,
train_loop and data (function-level imports included: a lazy import is still a dependency),
and no objective reaches into another module's private names."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "raylib")
LAYERS = ("config", "methods", "objectives", "models", "train_loop", "data")


def _layer(module: str) -> str | None:
    for name in LAYERS:
        if module == f"raylib.{name}" or module.startswith(f"raylib.{name}."):
            return name
    return None


def _imports(tree: ast.AST):
    """(module, imported names) of every import, skipping `if TYPE_CHECKING:` blocks (type
    hints only, never executed)."""
    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    yield a.name, []
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                yield child.module, [a.name for a in child.names]
            yield from walk(child)
    yield from walk(tree)


def _modules():
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.join(ROOT, "..")).removesuffix(".py").replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), ast.parse(open(path).read())


def test_no_import_cycles_among_the_core_modules():
    edges: dict[str, set[str]] = {name: set() for name in LAYERS}
    why: dict[tuple[str, str], str] = {}
    for module, tree in _modules():
        src = _layer(module)
        if src is None:
            continue
        for target, names in _imports(tree):
            for dst in {_layer(target), *(_layer(f"{target}.{n}") for n in names)} - {None, src}:
                edges[src].add(dst)
                why.setdefault((src, dst), f"{module} imports {target}")
    # a cycle is a path back to its start
    def reach(start, node, seen):
        for nxt in edges[node]:
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                path = reach(start, nxt, seen)
                if path:
                    return [node, *path]
        return None
    for name in LAYERS:
        cycle = reach(name, name, set())
        assert cycle is None, " -> ".join(cycle) + ": " + "; ".join(why[(a, b)] for a, b in zip(cycle, cycle[1:]))


def test_objectives_use_no_private_names_of_other_modules():
    for module, tree in _modules():
        if not module.startswith("raylib.objectives"):
            continue
        for target, names in _imports(tree):
            if target.startswith("raylib.") and not target.startswith("raylib.objectives"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{module} imports {private} from {target}"
