"""The layers import in one direction: config -> data -> core -> train -> study -> entry points, and
`tracking` is a service (it imports only config and fileio; train and study call it); `fileio` and
`mirror` (local copies of bucket folders) are utilities below everything, but `core` does no storage sync:
it is handed a sync object (`ia2ray.mirror.BucketSync`) by the layers above."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ia2ray"

# what each layer may import from ia2ray (besides itself)
ALLOWED = {
    "fileio": set(),
    "mirror": {"fileio"},
    "config": {"fileio"},
    "data": {"config", "fileio"},
    "core": {"config", "data", "fileio"},
    "tracking": {"config", "fileio"},
    "train": {"config", "data", "core", "fileio", "mirror", "tracking"},
    "study": {"config", "data", "core", "train", "fileio", "mirror", "tracking"},
    "testbed": {"config", "data", "core", "fileio"},
    "run": {"config", "data", "core", "train", "fileio", "mirror", "tracking"},
    "tune": {"config", "data", "core", "train", "study", "fileio", "mirror", "tracking"},
    "report": {"config", "study"},  # an entry point: rebuilds a study's report
    "__init__": set(),
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_layers(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "ia2ray" else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "ia2ray" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_imports_follow_the_layers():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        layer = layer_of(path)
        extra = imported_layers(path) - ALLOWED[layer] - {layer}
        if extra:
            wrong.append(f"{path.relative_to(PKG)} ({layer}) imports {sorted(extra)}")
    assert wrong == []


def imported_modules(path: Path) -> set[str]:
    """ia2ray modules `path` imports, at any depth of the file (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ia2ray.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("ia2ray"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_no_import_cycles_between_modules():
    """Modules import each other without circles (counting imports inside functions, which would
    otherwise hide a circle); a package's `__init__` re-exporting its modules is not a circle."""
    paths = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {name: {m for m in imported_modules(p) if m in paths and m != name and not name.startswith(m + ".")}
             for name, p in paths.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert cycles == []
