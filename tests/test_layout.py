"""The package's structure rules (docs/architecture.md): no import cycles, small modules, no private cross-imports,
and subpackages that import only the layers below them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safegate"
MAX_LINES = 450
# Who may import whom: a subpackage imports only those listed for it (and the package root's helpers below).
ROOT_HELPERS = {"safegate._lazy", "safegate._moved", "safegate.errors"}
LAYERS = {
    "modeling": set(),
    "backbones": {"modeling"},
    "hub": {"modeling", "backbones"},
    "data": {"modeling", "backbones"},
    "testing": {"modeling", "backbones", "data"},
    "training": {"modeling", "backbones", "hub", "data", "evaluation"},
    "evaluation": {"modeling", "backbones", "hub", "data"},
    "defenses": {"modeling", "backbones", "data", "evaluation"},
    "bench": {"modeling", "backbones", "training", "testing", "data"},
    "serving": {"modeling", "backbones", "hub", "data"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported module, imported names, type-checking only) for every import in the file, function-level too."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], id(node) in type_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names], id(node) in type_only))
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(target: str, names: list[str]) -> list[str]:
    """The safegate modules an import statement loads (a `from package import module` names the module)."""
    if not target.startswith("safegate"):
        return []
    out = [target] if target in MODULES else []
    out += [f"{target}.{name}" for name in names if f"{target}.{name}" in MODULES]
    return out


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names, type_only in imports(path):
            if not type_only:
                edges[name].update(t for t in resolve(target, names) if t != name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def package_edges() -> set[tuple[str, str]]:
    """Module edges ignoring a package's own `__init__` (it may re-export its modules)."""
    return {(a, b) for a, targets in graph().items() for b in targets if not a.startswith(b + ".")}


def test_no_import_cycles_between_modules():
    edges = {a: {b for b in targets if not a.startswith(b + ".")} for a, targets in graph().items()}
    assert cycles(edges) == []


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and f"{module}.__init__" in MODULES) else None


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_subpackage_imports_only_the_layers_below_it(layer):
    allowed = LAYERS[layer] | {layer}
    bad = sorted(
        f"{a} -> {b}"
        for a, b in package_edges()
        if a.startswith(f"safegate.{layer}")
        and b not in ROOT_HELPERS
        and b != "safegate"
        and (b.split(".")[1] if b.count(".") else None) not in allowed
    )
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by concern"


def test_no_private_name_is_imported_across_modules():
    bad = []
    for name, path in MODULES.items():
        for target, names, _ in imports(path):
            if target.startswith("safegate") and target != name:
                bad += [f"{name}: from {target} import {n}" for n in names if n.startswith("_") and n != "__version__"]
    assert bad == []
