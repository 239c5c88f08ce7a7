"""The package's layers, read from its modules' imports: each layer imports only what stands
below it, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ratelimiter"

# What each layer may import of ours (besides itself). The shared base (errors, pricing,
# ledger, responses) sits on the engine; the sidecar and the library both stand on it, and
# never on each other. cli.py and the package's re-exports sit on top of everything.
ALLOWED = {
    "errors": set(),
    "engine": {"errors"},
    "pricing": {"errors", "engine"},
    "ledger": {"errors", "engine", "pricing"},
    "responses": {"errors", "engine", "pricing"},
    "library": {"errors", "engine", "pricing", "ledger", "responses"},
    "gateway": {"errors", "engine", "pricing", "ledger", "responses"},
    "testing": set(),
}
TOP = {"__init__", "cli", "middleware", "admin_client"}  # composition and re-exports


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at any depth of its code."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            modules = {n for n in names if resolves(n)}
            # "from . import keys" imports the submodule, not its package back
            found |= modules if node.module is None and modules else {target, *modules}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m == "ratelimiter" or m.startswith("ratelimiter.")}


def resolves(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative).is_dir()


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_each_layer_imports_only_what_stands_below_it() -> None:
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        own = layer(module)
        if own in TOP:
            continue
        for target in sorted(targets):
            if layer(target) not in ALLOWED[own] | {own}:
                wrong.append(f"{module} imports {target}")
    assert wrong == [], "\n".join(wrong)


def test_the_layers_cover_the_package() -> None:
    assert {layer(m) for m in GRAPH} <= set(ALLOWED) | TOP


def test_no_import_circle() -> None:
    circles = []
    for start in GRAPH:
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH.get(node, ()) & GRAPH.keys():
                if nxt == start:
                    circles.append(" -> ".join([*path, nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert circles == [], "\n".join(sorted(circles)[:10])
