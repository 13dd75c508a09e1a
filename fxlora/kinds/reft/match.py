"""Find ReFT interventions on a frozen linear layer's output by their math (docs/reft.md).

    LoReFT  out = h + linear(linear(h, W_L, b_L) - linear(h, R), R^T)
    DiReFT  out = h + linear(linear(h, W_1, b_1), R^T)          h = linear(x, W, b)

(the canonical form after fxlora.normalize: `matmul(D, R)`, `D @ R`, pyreft's `matmul(h, R_t)`
and `(.) @ R_t.T` all arrive as linears whose weights are transposes of each other),

R is any (r, d) tensor that requires grad: a trainable weight, or the orthogonal
parametrization's product computed inside the traced forward (householder, matrix_exp...);
its computation is left in the graph and read as it is. W must be frozen, h and every
intermediate read by the intervention only. An intervention on a slice of h (pyreft's
positions: `h[:, :k]`) is matched and reported, never rewritten. Sites are LayerSites
(kind "loreft"/"direft"), read by explain like IA3/VeRA sites.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from fxlora.graph.prove import NotASite, check_base, prove_each
from fxlora.graph.read import (
    ADD_TARGETS, LINEAR_TARGETS, arg, autocast_state, is_call, is_method, linear_layer, requires_grad, value,
)
from fxlora.kinds.base import LayerSite, Match, describe_layer_site

SUB_TARGETS = (operator.sub, torch.sub)


@dataclass
class ReftNodes:
    x: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    layer_out: fx.Node  # h
    read: fx.Node  # what the intervention reads: h, or a slice of it
    R: Optional[fx.Node]  # (r, d); None for a DiReFT whose graph holds only R^T
    W_L: fx.Node  # (r, d): W_L (LoReFT) or W_1 (DiReFT)
    b_L: Optional[fx.Node]
    out: fx.Node  # the add: every use is redirected
    internal: tuple  # nodes that die with the rewrite, in erase order
    positions: bool = False  # the intervention reads a slice of h
    Rt: Optional[fx.Node] = None  # (d, r): R^T as the graph holds it (the weight of the outer linear)


def find(gm: fx.GraphModule) -> Match:
    """Match every ReFT site of `gm`; never mutates the graph."""
    autocast = autocast_state(gm.graph)
    rejections: list = []
    sites = [_describe(i, nodes, kind, autocast.get(node))
             for i, (node, (nodes, kind)) in enumerate(prove_each(gm.graph.nodes, _prove, "ReFT: ", rejections))]
    return Match(sites, rejections)


def _lin(node) -> Optional[tuple]:
    """(input, weight, bias) of a functional linear."""
    if not is_call(node, LINEAR_TARGETS):
        return None
    return node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")


def _prove(node: fx.Node):
    if not (is_call(node, ADD_TARGETS) and len(node.args) == 2 and not node.kwargs):
        return None
    for base, P in (node.args, node.args[::-1]):
        if isinstance(base, fx.Node) and _lin(P) is not None and _lin(P)[2] is None:
            found = _prove_chain(node, base, P)
            if found is not None:
                return found
    return None


def _transposes(a, b) -> bool:
    """`a` is `b.t()` or `b` is `a.t()` (fxlora.normalize spells every 2-D transpose `t`)."""
    is_t = lambda n, of: is_method(n, ("t",)) and n.args[0] is of  # noqa: E731
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and (is_t(a, b) or is_t(b, a))


def _prove_chain(add: fx.Node, read: fx.Node, P: fx.Node):
    D, Rt, _ = _lin(P)
    Rtv, hv = value(Rt), value(read)
    if not (isinstance(Rtv, torch.Tensor) and isinstance(hv, torch.Tensor) and Rtv.dim() == 2 and hv.dim() >= 1):
        return None
    d = hv.shape[-1]
    if Rtv.shape[0] != d or not requires_grad(Rt):
        return None
    kind, internal = None, [add, P]
    if is_call(D, SUB_TARGETS) and len(D.args) == 2 and not D.kwargs:
        a, b = D.args
        la, lb = _lin(a), _lin(b)
        if la is None or lb is None or la[0] is not read or lb[0] is not read or not _transposes(lb[1], Rt) or lb[2] is not None:
            return None
        kind, (_, WL, bL), Rn = "loreft", la, lb[1]
        internal += [D, a, b]
    elif _lin(D) is not None and _lin(D)[0] is read:
        kind, (_, WL, bL) = "direft", _lin(D)
        Rn = Rt.args[0] if is_method(Rt, ("t",)) else None
        internal += [D]
    else:
        return None
    if is_method(Rt, ("t",)) and len(Rt.users) == 1:
        internal.append(Rt)
    if not isinstance(value(WL), torch.Tensor) or tuple(value(WL).shape) != (Rtv.shape[1], Rtv.shape[0]):
        return None
    positions = False
    h = read
    if is_call(read, (operator.getitem,)):
        h, positions = read.args[0], True
    if not (requires_grad(WL) or requires_grad(Rt) or (bL is not None and requires_grad(bL))):
        return None
    layer = linear_layer(h)
    if layer is None:  # the intervention is proved; only its base is not in sight (pyvene's hooks break the graph)
        raise NotASite(f"the intervened tensor h ({h.name}) is not a linear layer's output in this graph: "
                       "folding needs W; left as traced")
    x, weight, bias, base_kind, own = layer
    if base_kind != "linear":
        raise NotASite(f"the intervened layer is a {base_kind}; only nn.Linear outputs are matched")
    check_base(weight)
    # every intermediate read by the chain only
    for n in internal[1:]:
        others = [u.name for u in n.users if u not in internal]
        if others:
            raise NotASite(f"{n.name} is also read by {', '.join(others)}")
    chain_readers = set(internal) | ({read} if positions else set())
    if positions:
        others = [u.name for u in read.users if u not in internal]
        if others:
            raise NotASite(f"the slice {read.name} is also read by {', '.join(others)}")
    elif [u for u in h.users if u not in chain_readers]:
        others = [u.name for u in h.users if u not in chain_readers]
        raise NotASite(f"the base layer's output h ({h.name}) is also read by {', '.join(others)}")
    internal.append(h)
    nodes = ReftNodes(x=x, weight=weight, bias=bias, layer_out=h, read=read, R=Rn, W_L=WL, b_L=bL, out=add,
                      internal=tuple(internal), positions=positions, Rt=Rt)
    return nodes, kind


def _describe(index: int, n: ReftNodes, kind: str, autocast) -> LayerSite:
    names = ("R", "W_L", "b_L") if kind == "loreft" else ("R", "W_1", "b_1")
    trainable = tuple(name for name, v in zip(names, (n.Rt, n.W_L, n.b_L)) if v is not None and requires_grad(v))
    return describe_layer_site(index, n, "linear", kind, autocast, rank=value(n.Rt).shape[1], trainable=trainable,
                               read=n.read, vector=n.W_L, wrapper=".base")


__all__ = ["ReftNodes", "find"]
