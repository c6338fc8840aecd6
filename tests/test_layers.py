"""The package's import graph, read from the source (ast): no import circle, and every arrow points
down the layers  cli -> bench / demo / export -> toy world -> evaluation -> methods -> lexicon -> edits -> models,
with files / errors / registry under everything. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import erasekit

PACKAGE = Path(erasekit.__file__).parent
# Module prefix -> layer; a module may import only from its own layer's package or a lower layer.
LAYERS: dict[str, int] = {
    "erasekit.files": 0,
    "erasekit.errors": 0,
    "erasekit.registry": 0,
    "erasekit.models": 1,
    "erasekit.edits": 2,
    "erasekit.lexicon": 3,
    "erasekit.methods": 4,
    "erasekit.evaluation": 5,
    "erasekit.toyworld": 6,
    "erasekit.bench": 7,
    "erasekit.demo": 7,
    "erasekit.export": 7,
    "erasekit.cli": 8,
}


def module_name(path: Path) -> str:
    parts = ["erasekit", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The erasekit modules (of ``modules``) that ``path`` imports anywhere in its code; relative
    imports resolved, and ``from pkg import sub`` counted as an import of ``pkg.sub`` alone."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{alias.name}" for alias in node.names} & modules
            found |= subs
            if len(subs) < len(node.names):  # some names are attributes of ``target`` itself
                found.add(target)
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def layer(module: str) -> int | None:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else LAYERS[best]


def test_every_module_has_a_layer():
    assert [m for m in graph() if m != "erasekit" and layer(m) is None] == []


def test_arrows_point_down():
    # The top-level package only hands names on lazily and lets the toy world register itself.
    upward = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        if a != "erasekit"
        for b in targets
        if b != "erasekit" and layer(b) > layer(a)
    ]
    assert upward == []


def test_no_import_circle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_core_does_not_import_the_toy_world():
    core = ("erasekit.evaluation", "erasekit.methods", "erasekit.models", "erasekit.lexicon", "erasekit.edits")
    bad = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        if a.startswith(core)
        for b in targets
        if b.startswith("erasekit.toyworld")
    ]
    assert bad == []
