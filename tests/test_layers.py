"""fxlora's layers point one way (docs/architecture.md): no import cycle, not even through an
import inside a function; kinds never import each other; the shared layers import nothing above them."""

from __future__ import annotations

import ast
import pathlib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fxlora"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """Module -> fxlora module it imports, anywhere in the file (functions included)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("fxlora"):
                    graph.add_edge(name, target)
    return graph


GRAPH = import_graph()


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, cycles


@pytest.mark.parametrize("layer, allowed", [
    ("fxlora.ops", ("fxlora.ops",)),
    ("fxlora.cost", ("fxlora.cost",)),
    ("fxlora.graph", ("fxlora.graph",)),
    ("fxlora.kinds", ("fxlora.kinds", "fxlora.cost", "fxlora.graph", "fxlora.ops", "fxlora.config")),
    ("fxlora.pipeline", ("fxlora.kinds", "fxlora.cost", "fxlora.graph", "fxlora.config", "fxlora.checkpoint",
                         "fxlora.report", "fxlora.normalize", "fxlora.near_misses")),
    ("fxlora.normalize", ("fxlora.graph",)),
    ("fxlora.near_misses", ("fxlora.graph", "fxlora.normalize")),
    ("fxlora.report", ()),
    ("fxlora.checkpoint", ("fxlora.config",)),
    ("fxlora.inference", ()),
    ("fxlora.budget", ("fxlora.config", "fxlora.graph", "fxlora.ops")),  # the backend's partitioner: over the shared layers
    ("fxlora.bench.frontier", ("fxlora.bench.spec", "fxlora.bench.results")),
    ("fxlora.bench.spec", ()),
    ("fxlora.bench.results", ("fxlora.bench.spec",)),
])
def test_layers_import_only_below(layer, allowed):
    wrong = [(a, b) for a, b in GRAPH.edges
             if (a == layer or a.startswith(layer + ".")) and not any(b == x or b.startswith(x + ".") for x in allowed)]
    assert not wrong, wrong


def test_kinds_never_import_each_other():
    def kind_of(module: str):
        parts = module.split(".")
        return parts[2] if len(parts) > 2 and parts[1] == "kinds" and parts[2] != "base" else None

    crossing = [(a, b) for a, b in GRAPH.edges if kind_of(a) and kind_of(b) and kind_of(a) != kind_of(b)
                and a != "fxlora.kinds"]
    assert not crossing, crossing
