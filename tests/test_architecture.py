"""The import graph of src/draftforge points one way: no cycle, no import from a layer above.

The graph is read with `ast` (nothing is imported), function-level imports included: a lazy
import still ties the two modules together. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top, one layer a line: a module may import its own layer and the ones before it.
# A name is a module or a package (all modules under it).
LAYERS: list[tuple[str, ...]] = [
    # foundations: the run config, the packaged real parts, and serving (engines and their HTTP API), which needs
    # nothing of the project and sits under both `regenerate` (data) and `bench` (eval)
    ("draftforge", "draftforge.config", "draftforge.assets", "draftforge.serving"),
    ("draftforge.data",),
    ("draftforge.target", "draftforge.features"),
    ("draftforge.draft",),
    ("draftforge.train",),
    ("draftforge.export",),
    ("draftforge.decode",),  # the built-in speculative decoder as a library
    ("draftforge.eval",),
    ("draftforge.recipe", "draftforge.pipeline", "draftforge.demo", "draftforge.bundle"),
    ("draftforge.cli",),  # reaches every command by name through importlib, so it imports none of them here
]

# Violations the code still has, each to be burnt down (none today); an entry that no longer occurs fails
# the test, so remove it with the fix. "A -> B": A imports B from a layer above; "cycle: A, B": modules
# importing each other (directly or around a longer loop).
KNOWN_VIOLATIONS: set[str] = set()


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the draftforge modules it imports}, a `from package import name` resolved to the
    submodule when `name` is one, else to the package."""
    files = {module_name(f, src): f for f in sorted((src / "draftforge").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    imported.add(sub if sub in files else base)
        graph[name] = {m for m in imported if m.split(".")[0] == "draftforge" and m != name}
    return graph


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS) -> int:
    """Index of the layer whose longest matching name covers `module`; KeyError when none does."""
    best: tuple[int, int] | None = None
    for index, names in enumerate(layers):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
                best = (len(name), index)
    if best is None:
        raise KeyError(module)
    return best[1]


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(graph: Mapping[str, Iterable[str]], layers: list[tuple[str, ...]] = LAYERS) -> set[str]:
    """Upward imports as "A -> B" and cycles as "cycle: A, B, ..."."""
    up = {f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b, layers) > layer_of(a, layers)}
    return up | {"cycle: " + ", ".join(c) for c in cycles(graph)}


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if not _placed(m)]
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def _placed(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


def test_imports_point_down_and_never_in_a_circle():
    found = violations(import_graph())
    new, fixed = sorted(found - KNOWN_VIOLATIONS), sorted(KNOWN_VIOLATIONS - found)
    assert not new, "imports against the layers (docs/architecture.md):\n  " + "\n  ".join(new)
    assert not fixed, "fixed, so remove from KNOWN_VIOLATIONS:\n  " + "\n  ".join(fixed)


def test_the_checker_finds_cycles_and_upward_imports():
    layers = [("p.low",), ("p.high",)]
    graph = {"p.low.a": {"p.low.b"}, "p.low.b": {"p.low.c"}, "p.low.c": {"p.low.a", "p.high.x"},
             "p.high.x": {"p.low.a"}}
    assert violations(graph, layers) == {"p.low.c -> p.high.x", "cycle: p.high.x, p.low.a, p.low.b, p.low.c"}
    assert violations({"p.high.x": {"p.low.a"}, "p.low.a": set()}, layers) == set()
    assert layer_of("p.low", layers) == 0 and layer_of("p.high.x.y", layers) == 1


def test_the_graph_reader_resolves_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "draftforge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import one\n")
    (pkg / "sub" / "one.py").write_text("def f():\n    from ..top import X\n    import draftforge.sub\n")
    (pkg / "sub" / "two.py").write_text("from draftforge.sub import one, NAME\nimport os\n")
    (pkg / "top.py").write_text("X = 1\n")
    assert import_graph(tmp_path) == {
        "draftforge": set(),
        "draftforge.sub": {"draftforge.sub.one"},
        "draftforge.sub.one": {"draftforge.top", "draftforge.sub"},
        "draftforge.sub.two": {"draftforge.sub.one", "draftforge.sub"},
        "draftforge.top": set(),
    }
