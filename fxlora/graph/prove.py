"""The checks every kind's matcher shares: each proves one fact about a candidate site or
raises `NotASite` with the reason, which the matcher turns into a `Rejection`.

Pure: reads the graph, never changes it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

from fxlora.graph.read import (
    MUL_TARGETS, VIEW_METHODS, is_method, is_tensor_input, module_path, requires_grad, strip_casts, value,
)


class NotASite(Exception):
    """Raised inside matching with the reason a look-alike is not a provable site."""


@dataclass(frozen=True)
class Rejection:
    """An adapter-like pattern fxlora could not prove is a site, and why (shown by explain)."""

    node: str
    module: Optional[str]
    reason: str


def prove_each(nodes: Iterable[fx.Node], prove: Callable[[fx.Node], Any], label: str,
               rejections: list[Rejection]) -> list[tuple[fx.Node, Any]]:
    """(node, proof) for each node `prove` proves a site at; a `NotASite` it raises becomes a
    Rejection of the node, its reason prefixed with `label` ("VeRA: "). None: not a look-alike."""
    proved = []
    for node in nodes:
        try:
            proof = prove(node)
        except NotASite as why:
            rejections.append(Rejection(node.name, module_path(node), f"{label}{why}"))
            continue
        if proof is not None:
            proved.append((node, proof))
    return proved


def check_base(weight: fx.Node) -> None:
    """The base layer is a frozen float weight: the only base fxlora rewrites around."""
    W = value(weight)
    if not W.dtype.is_floating_point:
        raise NotASite(f"base weight is {W.dtype} (a quantized base); only float bases are matched")
    if requires_grad(weight):
        raise NotASite("base weight W requires grad; fxlora only rewrites sites with a frozen base")


def only_user(node: fx.Node, user: fx.Node, what: str) -> None:
    """`node` is read by `user` alone: a rewrite that drops it changes nothing else."""
    others = [u.name for u in node.users if u is not user]
    if others:
        raise NotASite(f"{what} ({node.name}) is also read by {', '.join(others)}")


def is_mul_by_one(node) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in MUL_TARGETS):
        return False
    nums = [a for a in node.args if isinstance(a, numbers.Number)]
    return len(node.args) == 2 and len(nums) == 1 and nums[0] == 1


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
        if is_mul_by_one(node):
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


def check_vector(l: fx.Node, chain: list[fx.Node], site_user: fx.Node) -> None:
    """A trainable vector read by this site only, along its whole flatten/cast chain."""
    if not requires_grad(l):
        raise NotASite(f"the vector {l.name} is frozen: nothing trains here")
    path = [l, *reversed(chain)]
    for node, nxt in zip(path, path[1:] + [site_user]):
        others = [u.name for u in node.users if u is not nxt]
        if others:
            raise NotASite(f"the vector {node.name} is also read by {', '.join(others)}, not only by this site")
