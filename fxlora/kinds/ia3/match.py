"""Find IA3 sites in a Dynamo graph by their math: a frozen linear layer whose output, or
whose input, is multiplied by a trainable vector broadcast over the last dimension.

    output scaling:  mul(linear(x, W, b), l')                 (PEFT: l' = 1 * ia3_l.flatten())
    input scaling:   linear(cast(mul(cast(x), l')), W, b)     (PEFT feedforward_modules)

`l'` must trace back (through `1 *`, flatten/view and float casts) to one trainable tensor
input whose numel is the scaled dimension. Anything that breaks the proof -- a trainable W,
an intermediate or the vector read elsewhere, several vectors multiplied together -- is a
`Rejection` with its reason. Module names are read for the report only.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx

from fxlora.graph.prove import NotASite, Rejection, check_base, check_vector, only_user, prove_each, trace_vector
from fxlora.graph.read import MUL_TARGETS, autocast_state, linear_layer, requires_grad, strip_casts, value
from fxlora.kinds.base import LayerNodes, Match, describe_layer_site, group_by_input


def find(gm: fx.GraphModule) -> Match:
    """Match every IA3 site of `gm`; never mutates the graph."""
    autocast = autocast_state(gm.graph)
    rejections: list[Rejection] = []
    found = prove_each(gm.graph.nodes, _prove, "IA3 ", rejections)
    sites = [describe_layer_site(i, nodes, base_kind, kind, autocast.get(nodes.out), trainable=("l",))
             for i, (_, (nodes, base_kind, kind)) in enumerate(found)]
    group_by_input(sites)
    return Match(sites, rejections)


def _prove(node: fx.Node):
    """(nodes, base kind, "ia3_out" | "ia3_in"): a node is a mul (output scaling) or a linear (input)."""
    for kind, prove in (("ia3_out", _prove_output_scaling), ("ia3_in", _prove_input_scaling)):
        try:
            proved = prove(node)
        except NotASite as why:
            raise NotASite(f"({kind}): {why}") from None
        if proved is not None:
            return (*proved, kind)
    return None


def _vector_operand(mul: fx.Node, other: fx.Node, features) -> Optional[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """(scaling node, tensor input, chain) for the operand of `mul` that is not `other`."""
    if len(mul.args) != 2 or mul.kwargs or other not in mul.args:
        return None
    s = mul.args[1] if mul.args[0] is other else mul.args[0]
    if s is other:
        return None
    traced = trace_vector(s, features)
    if traced is None:
        if _is_product_of_vectors(s, features):
            raise NotASite("the scaling is a product of several vectors (several active adapters); not matched")
        return None
    return s, *traced


def _is_product_of_vectors(node, features) -> bool:
    return (
        isinstance(node, fx.Node) and node.op == "call_function" and node.target in MUL_TARGETS
        and all(isinstance(a, fx.Node) and trace_vector(a, features) for a in node.args)
    )


# --- the two shapes ------------------------------------------------------------------


def _prove_output_scaling(node: fx.Node):
    if not (node.op == "call_function" and node.target in MUL_TARGETS and len(node.args) == 2):
        return None
    base = next((a for a in node.args if linear_layer(a) is not None), None)
    if base is None:
        return None
    x, weight, bias, base_kind, own = linear_layer(base)
    out_features = value(base).shape[-1]
    found = _vector_operand(node, base, out_features)
    if found is None:
        return None
    s, l, chain = found
    if not requires_grad(l):
        return None  # a frozen scale (a constant) is not an adapter: not even a look-alike
    check_vector(l, chain, node)
    check_base(weight)
    only_user(base, node, "the base layer's output W x")
    if value(node).shape != value(base).shape:
        raise NotASite("the vector broadcasts over more than the last dimension")
    nodes = LayerNodes(
        x=x, weight=weight, bias=bias, layer_out=base, vectors=(l,), vector_values=(s,), frozen=(),
        out=node, internal=(node, base, *own, *chain),
    )
    return nodes, base_kind


def _prove_input_scaling(node: fx.Node):
    layer = linear_layer(node)
    if layer is None:
        return None
    xin, weight, bias, base_kind, own = layer
    src, casts_after = strip_casts(xin)
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target in MUL_TARGETS and len(src.args) == 2):
        return None
    in_features = value(xin).shape[-1]
    tensor_operand = next((a for a in src.args if isinstance(a, fx.Node) and value(a).shape == value(src).shape), None)
    if tensor_operand is None:
        return None
    found = _vector_operand(src, tensor_operand, in_features)
    if found is None:
        return None
    s, l, chain = found
    if not requires_grad(l):
        return None  # a frozen norm weight feeding a linear, not an adapter
    x, casts_before = strip_casts(tensor_operand)
    check_vector(l, chain, src)
    check_base(weight)
    path = [*reversed(casts_before), src, *reversed(casts_after)]
    for n, user in zip(path, path[1:] + [own[-1] if own else node]):
        only_user(n, user, "x * l")
    if value(src).dtype != value(l).dtype:
        raise NotASite(f"x * l computes in {value(src).dtype}, not in the vector's dtype {value(l).dtype}")
    nodes = LayerNodes(
        x=x, weight=weight, bias=bias, layer_out=node, vectors=(l,), vector_values=(s,), frozen=(),
        out=node, internal=(node, *own, *casts_after, src, *chain, *casts_before),
    )
    return nodes, base_kind
