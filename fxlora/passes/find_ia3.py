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

import numbers
from typing import Optional

import torch
import torch.fx as fx

from fxlora.graph_utils import (
    autocast_state,
    MUL_TARGETS,
    VIEW_METHODS,
    is_method,
    is_tensor_input,
    linear_layer,
    module_path,
    requires_grad,
    strip_casts,
    value,
)
from fxlora.sites import Rejection, ScalingMatch, ScalingNodes, ScalingSite


class NotASite(Exception):
    """Raised inside matching with the reason a look-alike is not a provable site."""


def find_ia3_sites(gm: fx.GraphModule) -> ScalingMatch:
    """Match every IA3 site of `gm`; never mutates the graph."""
    autocast = autocast_state(gm.graph)
    found: list[tuple[ScalingNodes, str, str]] = []
    rejections: list[Rejection] = []
    for node in gm.graph.nodes:
        for kind, prove in (("ia3_out", _prove_output_scaling), ("ia3_in", _prove_input_scaling)):
            try:
                proved = prove(node)
            except NotASite as why:
                rejections.append(Rejection(node.name, module_path(node), f"IA3 ({kind}): {why}"))
                continue
            if proved is not None:
                found.append((proved[0], proved[1], kind))
    sites = [describe(i, nodes, base_kind, kind, autocast.get(nodes.out)) for i, (nodes, base_kind, kind) in enumerate(found)]
    group_sites(sites)
    return ScalingMatch(sites, rejections)


# --- the vector ----------------------------------------------------------------------


def trace_vector(node, features) -> Optional[tuple[fx.Node, list[fx.Node]]]:
    """(tensor input, chain nodes from it to `node`) when `node` is a vector of `features`
    entries broadcast over the last dimension, built from one tensor input by `1 *`,
    flatten/view/reshape and float casts. None when it is not a vector at all."""
    v = value(node)
    if not isinstance(v, torch.Tensor) or v.dim() < 1 or v.numel() != features or v.shape[-1] != features:
        return None
    chain = []
    while not is_tensor_input(node):
        chain.append(node)
        if _is_mul_by_one(node):
            node = next(a for a in node.args if isinstance(a, fx.Node))
        elif is_method(node, ("flatten", *VIEW_METHODS)):
            node = node.args[0]
        else:
            src, casts = strip_casts(node)
            if not casts:
                return None
            chain.pop()
            chain.extend(casts)
            node = src
    return node, chain


def _is_mul_by_one(node) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in MUL_TARGETS):
        return False
    nums = [a for a in node.args if isinstance(a, numbers.Number)]
    return len(node.args) == 2 and len(nums) == 1 and nums[0] == 1


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


def check_vector(l: fx.Node, chain: list[fx.Node], site_user: fx.Node) -> None:
    if not requires_grad(l):
        raise NotASite(f"the vector {l.name} is frozen: nothing trains here")
    path = [l, *reversed(chain)]
    for node, nxt in zip(path, path[1:] + [site_user]):
        others = [u.name for u in node.users if u is not nxt]
        if others:
            raise NotASite(f"the vector {node.name} is also read by {', '.join(others)}, not only by this site")


def check_base(weight: fx.Node) -> None:
    W = value(weight)
    if not W.dtype.is_floating_point:
        raise NotASite(f"base weight is {W.dtype} (a quantized base); only float bases are matched")
    if requires_grad(weight):
        raise NotASite("base weight W requires grad; fxlora only rewrites sites with a frozen base")


def _only_user(node: fx.Node, user: fx.Node, what: str) -> None:
    others = [u.name for u in node.users if u is not user]
    if others:
        raise NotASite(f"{what} ({node.name}) is also read by {', '.join(others)}")


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
    _only_user(base, node, "the base layer's output W x")
    if value(node).shape != value(base).shape:
        raise NotASite("the vector broadcasts over more than the last dimension")
    nodes = ScalingNodes(
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
        _only_user(n, user, "x * l")
    if value(src).dtype != value(l).dtype:
        raise NotASite(f"x * l computes in {value(src).dtype}, not in the vector's dtype {value(l).dtype}")
    nodes = ScalingNodes(
        x=x, weight=weight, bias=bias, layer_out=node, vectors=(l,), vector_values=(s,), frozen=(),
        out=node, internal=(node, *own, *casts_after, src, *chain, *casts_before),
    )
    return nodes, base_kind


# --- description -----------------------------------------------------------------------


def describe(index: int, n: ScalingNodes, base_kind: str, kind: str, autocast, rank=None) -> ScalingSite:
    x, W = value(n.x), value(n.weight)
    names = {"vera": ("lambda_d", "lambda_b")}.get(kind, ("l",))
    return ScalingSite(
        index=index,
        kind=kind,
        module=(module_path(n.layer_out) or module_path(n.out) or "").removesuffix(".base_layer") or None,
        base_kind=base_kind,
        tokens=tuple(x.shape[:-1]),
        in_features=x.shape[-1],
        out_features=value(n.layer_out).shape[-1],
        rank=rank,
        x_dtype=x.dtype,
        weight_dtype=W.dtype,
        vector_dtype=value(n.vectors[-1]).dtype,
        compute_dtype=value(n.layer_out).dtype,
        out_dtype=value(n.out).dtype,
        autocast=autocast,
        has_bias=n.bias is not None,
        bias_trainable=n.bias is not None and requires_grad(n.bias),
        trainable=tuple(name for name, v in zip(names, n.vectors) if requires_grad(v)),
        nodes=n,
    )


def group_sites(sites: list[ScalingSite]) -> None:
    groups: dict[fx.Node, list[ScalingSite]] = {}
    for site in sites:
        groups.setdefault(site.nodes.x, []).append(site)
    for group_id, members in enumerate(groups.values()):
        for site in members:
            site.input_group, site.shared_x = group_id, len(members)


__all__ = ["NotASite", "find_ia3_sites"]
