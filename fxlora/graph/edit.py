"""The only helpers that mutate a graph: insert a site's replacement, swap it in, erase the dead.

Invariants (fxlora/kinds/README.md): every inserted node gets a fake value in
`meta["example_value"]`, the replaced node's other metadata moves to its replacement, and
only nodes that became dead are erased.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map

from fxlora.graph.read import scale_tensor_source, value


@contextlib.contextmanager
def inserting_before(node: fx.Node) -> Iterator[list[fx.Node]]:
    """`graph.inserting_before(node)` that also collects the nodes inserted (in order)."""
    graph, before = node.graph, node.prev
    inserted: list[fx.Node] = []
    with graph.inserting_before(node):
        yield inserted
    cursor = before.next
    while cursor is not node:
        inserted.append(cursor)
        cursor = cursor.next


def replace_output(old: fx.Node, new: fx.Node, inserted: Iterable[fx.Node]) -> None:
    """Redirect every use of `old` to `new`, a node among `inserted`, after giving each
    inserted node its fake value and `new` the metadata of `old`."""
    fake_values(list(inserted), value(old))
    new.meta.update({k: v for k, v in old.meta.items() if k not in ("example_value", "val")})
    new.meta["example_value"] = value(old)
    old.replace_all_uses_with(new)
    old.meta[REPLACED_BY] = new  # a later site that read `old` (chained sites) finds `new` (remap_nodes)


REPLACED_BY = "fxlora_replaced_by"


def current(node: fx.Node) -> fx.Node:
    """The node that now stands for `node`: itself, or what a rewrite replaced it by (transitively)."""
    while REPLACED_BY in node.meta:
        node = node.meta[REPLACED_BY]
    return node


def remap_nodes(nodes: Any, moved: Mapping[fx.Node, fx.Node]) -> Any:
    """A copy of a site's nodes dataclass (LoraNodes, LayerNodes, ...) whose nodes are current:
    moved to another graph by `moved` (old -> copy), then through the replacements rewrites recorded."""
    def now(v):
        if isinstance(v, fx.Node):
            return current(moved.get(v, v))
        if isinstance(v, tuple):
            return tuple(now(x) for x in v)
        return v

    return dataclasses.replace(nodes, **{f.name: now(getattr(nodes, f.name)) for f in dataclasses.fields(nodes)})


def fake_values(nodes: list[fx.Node], example) -> None:
    """Run `nodes` on fake values, in the fake mode of `example`, to fill `meta["example_value"]`.

    Under no_grad, with requires_grad set by hand: fake values computed with autograd would
    keep their inputs alive (FSDP2's unsharded weights, through a custom op's saved context).
    """
    fake_mode = getattr(example, "fake_mode", None)
    if fake_mode is None:
        return
    todo = [n for n in nodes if n.meta.get("example_value") is None and n.op in ("call_function", "call_method")]
    try:
        with fake_mode, torch.no_grad():
            for node in todo:
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
                if node.op == "call_method":
                    out = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    out = node.target(*args, **kwargs)
                grad = _any_requires_grad((args, kwargs))
                node.meta["example_value"] = tree_map(lambda t: _with_grad(t, grad), out)
    except Exception:  # a nicety for later passes and explain, never a reason to drop the rewrite
        for node in todo:
            node.meta.pop("example_value", None)


def _any_requires_grad(tree) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in tree_flatten(tree)[0])


def _with_grad(t, grad: bool):
    if isinstance(t, torch.Tensor) and grad and (t.dtype.is_floating_point or t.dtype.is_complex):
        t.requires_grad_(True)
    return t


def copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A node-for-node copy of `gm`'s graph (metadata included) and the map old node -> copy."""
    graph = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    graph._codegen = gm.graph._codegen
    copies: dict = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for node, copy in copies.items():  # DDP's splitter (propagate_dynamo_source) reads every placeholder's
        if hasattr(node, "_dynamo_source"):
            copy._dynamo_source = node._dynamo_source
    return graph, copies


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` sharing its attributes: what the passes rewrite, so the untouched graph is
    still at hand if anything goes wrong."""
    return fx.GraphModule(gm, copy_graph(gm)[0])


def erase_dead(nodes: Iterable) -> None:
    """Erase each node (in the order given) that nothing reads any more."""
    for node in nodes:
        if isinstance(node, fx.Node) and not node.users:
            node.graph.erase_node(node)


def scale_node(graph: fx.Graph, scale) -> fx.Node:
    """The scale as fxlora's ops take it (inserted at the graph's insert point): a 0-d tensor; a
    Python float would become a guard."""
    node = scale_tensor_source(scale)
    if node is None:
        return graph.call_function(torch.tensor, (float(scale),), {"dtype": torch.float32})
    return graph.call_method("reshape", (node, ())) if value(node).dim() > 0 else node
