"""The layers, read from the source (every import statement, function bodies included): ``avatar/`` never imports
``launch``, the packages import only downwards (``avatar/README.md``), and neither tree has an import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The layers of ``avatar/README.md``, top first: a module imports its own layer or the ones below, never above.
LAYERS = [
    {"api", "serve", "__init__"},
    {"validate", "plan", "config_doc"},
    {"pipeline", "memory"},
    {"models", "parallel", "weights", "perf"},
    {"attention", "io", "config", "compose", "resources", "progress", "version", "domain"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(*trees: str) -> dict[str, Path]:
    return {module_name(p): p for tree in trees for p in sorted((ROOT / tree).rglob("*.py"))}


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (resolved to the longest known module name)."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in map(resolve, targets) if t and t != name}
    return found


def graph(*trees: str) -> dict[str, set[str]]:
    known = modules(*trees)
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layer_of(name: str) -> int:
    top = name.split(".")[1] if "." in name else "__init__"
    for depth, layer in enumerate(LAYERS):
        if top in layer:
            return depth
    raise AssertionError(f"{name}: avatar/{top} is in no layer of tests/unit/test_layering.py (add it to LAYERS)")


def test_avatar_never_imports_launch():
    edges = graph("avatar", "launch")
    wrong = sorted(f"{a} imports {b}" for a, targets in edges.items() if a.startswith("avatar") for b in targets
                   if b == "launch" or b.startswith("launch."))  # fmt: skip
    assert not wrong, "the library must not depend on the entry points:\n" + "\n".join(wrong)


def test_no_import_cycles():
    found = cycles(graph("avatar", "launch"))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_avatar_packages_import_only_downwards():
    edges = graph("avatar")
    wrong = []
    for a, targets in edges.items():
        for b in targets:
            if b.split(".")[:2] != a.split(".")[:2] and layer_of(b) < layer_of(a):
                wrong.append(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})")
    assert not wrong, "upward imports (see avatar/README.md):\n" + "\n".join(sorted(wrong))


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import launch.dist\n", {"launch.dist"}),
        ("def f():\n    from launch import run\n", {"launch.run"}),
        ("def f():\n    from ..plan import ParallelPlan\n", {"avatar.plan"}),
    ],
)
def test_the_reader_sees_every_import_form(tmp_path, source, expected):
    """The check cannot pass by missing an import: module-level, in a function body, relative."""
    known = modules("avatar", "launch")
    path = tmp_path / "probe_module.py"
    path.write_text(source)
    assert imports(path, "avatar.pipeline.probe_module", known) == expected
    edges = graph("avatar", "launch")
    edges["avatar.plan"] = edges["avatar.plan"] | {"avatar.validate"}
    assert cycles(edges), "a cycle added back is found"
