"""The package's imports run one way: no module imports, directly or through others, a module
that imports it back, counting the imports inside functions too (a deferred import hides a
cycle from Python, not from a reader)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The predet modules ``path`` imports anywhere in its body (``from a import b`` counts as
    ``a.b`` when that is a module, else ``a``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = list((SRC / "predet").rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, modules) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None. A package's own
    ``__init__`` re-exporting its submodules is not a cycle of the submodules with each other."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node.rpartition(".")[0] or node == nxt.rpartition(".")[0]:
                continue  # a module and its own package's __init__
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_and_the_graph_holds_deferred_imports():
    assert find_cycle({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None
    assert "predet.engine.runfolder" in import_graph()["predet.tools.sweep.run"]  # imported inside sweep()


# The layers data flows through, first to last (README "Code map"): a module may import its own
# layer and those before it, never a later one. A module belongs to the longest prefix that
# names it: ``checkpoint.atomic`` and ``engine.distributed`` are foundations, ``checkpoint.io``
# sits with the data it saves, and the rest of ``checkpoint`` (formats, transfer, export) comes
# after the models and the loop.
LAYERS = [
    ("predet", "predet.errors", "predet.config", "predet.checkpoint.atomic", "predet.engine.distributed"),
    ("predet.checkpoint.io", "predet.data"),
    ("predet.modeling",),
    ("predet.engine",),
    ("predet.checkpoint",),
    ("predet.evaluation",),
    ("predet.pretrain", "predet.finetune"),
    ("predet.tools",),
    ("predet.cli", "predet.__main__"),
]


def layer_of(module: str) -> int:
    matches = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
               if module == p or module.startswith(p + ".")]
    return max(matches)[1]


def test_imports_run_from_the_first_layer_to_the_last():
    late = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
            for m, deps in sorted(import_graph().items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not late, "imports against the layers:\n" + "\n".join(late)


def test_the_layer_check_sees_a_late_import():
    assert layer_of("predet.checkpoint.atomic") < layer_of("predet.data.coco") < layer_of("predet.modeling.detectors")
    assert layer_of("predet.engine.trainer") < layer_of("predet.checkpoint.transfer") < layer_of("predet.tools.sweep.run")
    assert layer_of("predet.tools.plots") > layer_of("predet.evaluation.pretext")  # plots may import pretext, not back
