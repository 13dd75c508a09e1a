"""Find VeRA sites in a Dynamo graph by their math:

    linear(x, W, b) + lambda_b * linear(lambda_d * linear(x, A), B)

A: (r, in) and B: (out, r) are frozen (PEFT slices them from random matrices shared by
every layer: `vera_A[:, :in]`, `vera_B[:out, :]`), lambda_d: (r,) and lambda_b: (out,) are
vectors, at least one trainable. Everything else -- a trainable W, A or B, a dropout only the
adapter reads (vera_dropout > 0; a dropout the base layer reads too is part of x), an
intermediate read elsewhere -- is a `Rejection` with its reason.
"""

from __future__ import annotations

import torch.fx as fx

from fxlora.graph.prove import NotASite, check_base, check_vector, prove_each, trace_vector
from fxlora.graph.read import (
    ADD_TARGETS, DROPOUT_TARGETS, LINEAR_TARGETS, MUL_TARGETS, arg, autocast_state, is_call, linear_layer, requires_grad,
    value,
)
from fxlora.kinds.base import LayerNodes, Match, describe_layer_site, group_by_input


def find(gm: fx.GraphModule) -> Match:
    """Match every VeRA site of `gm`; never mutates the graph."""
    autocast = autocast_state(gm.graph)
    sites, rejections = [], []
    for _, (nodes, base_kind, rank) in prove_each(gm.graph.nodes, _prove, "VeRA: ", rejections):
        trainable = tuple(name for name, v in zip(("lambda_d", "lambda_b"), nodes.vectors) if requires_grad(v))
        sites.append(describe_layer_site(len(sites), nodes, base_kind, "vera", autocast.get(nodes.out),
                                         rank=rank, trainable=trainable))
    group_by_input(sites)
    return Match(sites, rejections)


def _scaled(node, features):
    """(vector node, tensor input, chain, other operand) when `node` = vector * other."""
    if not (is_call(node, MUL_TARGETS) and len(node.args) == 2 and not node.kwargs):
        return None
    for s, other in (node.args, reversed(node.args)):
        traced = trace_vector(s, features) if isinstance(s, fx.Node) else None
        if traced is not None and isinstance(other, fx.Node) and value(other).shape == value(node).shape:
            return s, *traced, other
    return None


def _prove(lin2: fx.Node):
    # Anchor: linear(lambda_d * linear(u, A), B) -- the up-projection of the adapter.
    if not is_call(lin2, LINEAR_TARGETS) or arg(lin2, 2, "bias") is not None:
        return None
    B = arg(lin2, 1, "weight")
    Bv = value(B)
    if getattr(Bv, "dim", lambda: 0)() != 2:
        return None
    r, out_features = Bv.shape[1], Bv.shape[0]
    inner = _scaled(lin2.args[0], r)
    if inner is None or not is_call(inner[3], LINEAR_TARGETS) or arg(inner[3], 2, "bias") is not None:
        return None
    s_d, lambda_d, chain_d, lin1 = inner
    A = arg(lin1, 1, "weight")
    outer = _scaled(next(iter(lin2.users), None), out_features) if len(lin2.users) == 1 else None
    if outer is None:
        return None
    s_b, lambda_b, chain_b, _ = outer
    m2 = next(iter(lin2.users))

    if not (requires_grad(lambda_d) or requires_grad(lambda_b)):
        raise NotASite("lambda_d and lambda_b are both frozen: nothing trains here")
    for vec, chain, user in ((lambda_d, chain_d, lin2.args[0]), (lambda_b, chain_b, m2)):
        if requires_grad(vec):
            check_vector(vec, chain, user)
    for name, mat in (("A", A), ("B", B)):
        if requires_grad(mat):
            raise NotASite(f"the shared {name} requires grad; VeRA's A and B are frozen")
    if value(A).shape[0] != r:
        raise NotASite(f"A has {value(A).shape[0]} rows, B has {r} columns")
    for n, user in ((lin1, lin2.args[0]), (lin2.args[0], lin2)):
        if len(n.users) != 1:
            raise NotASite(f"{n.name} is also read outside the adapter")

    u = lin1.args[0]
    # A dropout only the adapter reads is its own (vera_dropout > 0); one the base reads too is part of x
    # (the model's own nn.Dropout before the layer), so the site reads x as the base does.
    if is_call(u, DROPOUT_TARGETS) and len(u.users) == 1:
        raise NotASite("dropout on the adapter's input (vera_dropout > 0): not supported yet, kept as graph ops")
    if len(m2.users) != 1 or not is_call(next(iter(m2.users)), ADD_TARGETS):
        raise NotASite("lambda_b * B(...) is not only added to a base layer's output")
    add = next(iter(m2.users))
    if len(add.args) != 2 or add.kwargs:
        raise NotASite(f"{add.name} is not a binary add")
    base = add.args[1] if add.args[0] is m2 else add.args[0]
    layer = linear_layer(base)
    if layer is None:
        raise NotASite(f"the adapter is added to {base.name if isinstance(base, fx.Node) else base!r}, not to a linear layer's output")
    x, weight, bias, base_kind, own = layer
    if u is not x:
        raise NotASite(f"the adapter reads {getattr(u, 'name', u)}, the base layer reads {x.name}: not the same input")
    check_base(weight)
    if len(base.users) != 1:
        raise NotASite(f"the base layer's output ({base.name}) is also read outside the site")
    nodes = LayerNodes(
        x=x, weight=weight, bias=bias, layer_out=base, vectors=(lambda_d, lambda_b), vector_values=(s_d, s_b),
        frozen=(A, B), out=add,
        internal=(add, m2, lin2, lin2.args[0], lin1, base, *own, *chain_b, *chain_d),
    )
    return nodes, base_kind, r
