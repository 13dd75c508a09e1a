"""Adapter-like structure no kind matched, each with the rule that failed (docs/recognises.md).

Runs after every kind's matcher, on the normalised graph. Every frozen linear layer that no
site claimed is checked from three sides:

    output  a branch built from trainable tensors meets h = linear(x, W, b) in a binary op
            (walked back from the other operand, stopping at what h already depends on, at
            other layers and at matched sites: residual adds and SwiGLU are not adapters)
    weight  linear(x, W', b) with W' computed in the graph from the frozen W and trainable tensors
    input   x is rotated/scaled by a matrix or vector computed from trainable tensors just
            before the layer (OFT/BOFT-style input rotations)

A near miss is a `Rejection` whose reason names the canonical form that was not met and why;
layers that a kind already rejected (with its own reason) are not reported twice.
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

from fxlora.graph.read import (
    LINEAR_TARGETS, ancestors, arg, is_call, is_method, is_tensor_input, linear_layer, module_path, requires_grad,
    strip_casts, value,
)
from fxlora.normalize import param_like
from fxlora.graph.prove import Rejection

PREFIX = "adapter-like, matched by no kind: "
_WALK = 24  # nodes walked back from an operand before giving up on calling it a branch
_PASS_THROUGH = ("view", "reshape", "flatten", "contiguous", "to", "float", "half", "bfloat16", "type", "t")
_BINARY = (operator.add, operator.mul, operator.sub, operator.matmul, torch.add, torch.mul, torch.sub, torch.matmul,
           operator.truediv, torch.div, torch.bmm, torch.mm, operator.iadd, operator.imul, operator.isub)


def find_near_misses(gm: fx.GraphModule, matches: Iterable[Any]) -> list[Rejection]:
    """Every unclaimed frozen linear that meets trainable tensors, as a Rejection with the reason.

    `matches`: every kind's match (anything with `.sites` and `.rejections`), after all matchers ran."""
    matches = [m for m in matches if m is not None]
    claimed, stops = set(), set()
    for s in (s for m in matches for s in m.sites):
        claimed.add(s.nodes.layer_out)
        stops.add(s.nodes.add if hasattr(s.nodes, "add") else s.nodes.out)
    rejected = {r.node for m in matches for r in m.rejections}
    layers = [n for n in gm.graph.nodes if is_call(n, LINEAR_TARGETS)]
    frozen = {n for n in layers if _frozen_layer(n)}
    stops |= frozen
    found = []
    for n in layers:
        if n in claimed:
            continue
        reason, evidence = None, set()
        if n in frozen:
            reason, evidence = _output_side(n, stops)
            if reason is None:
                reason, evidence = _input_side(n)
        else:
            reason, evidence = _weight_side(n)
        if reason is None or {e.name for e in evidence} & rejected or n.name in rejected:
            continue
        found.append(Rejection(n.name, module_path(n), PREFIX + reason))
    return found


def _frozen_layer(n: fx.Node) -> bool:
    layer = linear_layer(n)
    if layer is None:
        return False
    W = value(layer[1])
    return W.dim() == 2 and W.dtype.is_floating_point and not requires_grad(layer[1])


def _trainable_input(n) -> bool:
    return is_tensor_input(n) and requires_grad(n)



def _walk(start: fx.Node, stop: set, budget: int = _WALK) -> tuple[list[fx.Node], list[fx.Node], bool]:
    """(nodes walked, trainable tensor inputs met, reached `stop`) going back from `start`."""
    walked, trainable, reached, seen, stack = [], [], False, set(), [start]
    while stack and len(walked) < budget:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m in stop:
            reached = True
            continue
        if _trainable_input(m):
            trainable.append(m)
            continue
        if m.op in ("placeholder", "get_attr"):
            continue
        walked.append(m)
        stack.extend(m.all_input_nodes)
        stack.extend(i for u in m.users if _mutates(u, m) for i in u.all_input_nodes)  # `R.add_(Q)`: R reads Q
    return walked, trainable, reached


def _mutates(u: fx.Node, m: fx.Node) -> bool:
    """`u` writes into `m` in place (`m.add_(...)`, `m[idx] = v`): what it writes is part of m's value."""
    name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
    return bool(u.args) and u.args[0] is m and (
        u.target is operator.setitem or (isinstance(name, str) and name.endswith("_") and not name.endswith("__")))


def _op(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _output_side(layer: fx.Node, stops: set) -> tuple[Optional[str], set]:
    h_cone = ancestors(layer)
    outs = [layer]
    for u in list(layer.users):  # h as a cast or view reads it
        if is_method(u, _PASS_THROUGH) and u.args[0] is layer:
            outs.append(u)
    for h in outs:
        for u in h.users:
            if not (u.op in ("call_function", "call_method") and (u.target in _BINARY or u.target in (
                    "add", "mul", "sub", "matmul", "__add__", "__mul__"))):
                continue
            for other in u.all_input_nodes:
                if other is h or other in h_cone:
                    continue
                walked, trainable, reached = _walk(other, (h_cone | stops) - {other})
                if not trainable:
                    continue
                what = _branch_reason(other, walked, trainable, reached, layer)
                return (f"h = {layer.name} meets {what} in {u.name} ({_op(u)}); no kind's canonical form matches "
                        "(docs/recognises.md)", {u, *walked})
    return None, set()


def _branch_reason(other: fx.Node, walked: list, trainable: list, reached: bool, layer: fx.Node) -> str:
    names = ", ".join(t.name for t in trainable[:4])
    if not reached:
        v = value(other)
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else "?"
        return f"a tensor of shape {shape} computed from trainable {names} alone (not from the layer's input)"
    lins = [w for w in walked if is_call(w, LINEAR_TARGETS)]
    for lin in lins:  # a chain of two trainable linears: say why it is not a low-rank LoRA branch
        up = arg(lin, 1, "weight")
        inner = lin.args[0]
        down = inner
        between = []
        while isinstance(down, fx.Node) and not is_call(down, LINEAR_TARGETS) and down.op != "placeholder" and len(between) < 4:
            between.append(down)
            down = down.args[0] if down.args and isinstance(down.args[0], fx.Node) else None
        if is_call(down, LINEAR_TARGETS):
            A, B = value(arg(down, 1, "weight")), value(up)
            if between:
                return (f"a chain of two linears with {', '.join(_op(b) for b in between)} between them "
                        "(not a linear, scaled branch)")
            if not (is_tensor_input(arg(down, 1, "weight")) and is_tensor_input(up)):
                w = arg(down, 1, "weight") if not is_tensor_input(arg(down, 1, "weight")) else up
                return f"a low-rank chain whose weight {w.name} is computed in the graph ({_op(w)})"
            if isinstance(A, torch.Tensor) and A.dim() == 2 and isinstance(B, torch.Tensor) and B.dim() == 2:
                r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
                if not (r < d_in and r < d_out):
                    return f"a chain of two linears of rank {r}, not low for in={d_in}, out={d_out}"
            return "a low-rank chain whose output is also read outside the adapter or not added to h"
    muls = [w for w in walked if is_call(w, (operator.mul, torch.mul))]
    for m in muls:
        for a in m.args:
            if isinstance(a, fx.Node) and _trainable_input(a) and value(a).numel() == 1:
                return f"a branch scaled by {a.name}, a tensor that requires grad"
    return (f"a branch built from trainable {names} through {', '.join(sorted({_op(w) for w in walked})[:6])}")


def _weight_side(lin: fx.Node) -> tuple[Optional[str], set]:
    Wn = arg(lin, 1, "weight")
    if not isinstance(Wn, fx.Node) or is_tensor_input(Wn):
        return None, set()
    src, _ = strip_casts(Wn)
    if is_method(src, ("t",)) and is_tensor_input(src.args[0]):
        return None, set()
    W = value(Wn)
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        return None, set()
    walked, trainable, _ = _walk(Wn, set())
    frozen = [m for m in ancestors(Wn) if is_tensor_input(m) and not requires_grad(m) and value(m).dtype.is_floating_point
              and value(m).numel() == W.numel()]
    if not trainable or not frozen:
        return None, set()
    names = ", ".join(t.name for t in trainable[:4])
    return (f"its weight is computed in the graph ({_op(Wn)}) from frozen {frozen[0].name} and trainable {names}, "
            "not as W + s * B @ A of a low rank", set(walked))


def _input_side(layer: fx.Node) -> tuple[Optional[str], set]:
    x = layer.args[0]
    for _ in range(4):
        if not isinstance(x, fx.Node):
            return None, set()
        if is_method(x, _PASS_THROUGH) or is_method(x, ("permute", "transpose")):
            x = x.args[0]
            continue
        break
    if not isinstance(x, fx.Node) or x.op not in ("call_function", "call_method"):
        return None, set()
    mixes = is_call(x, (torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.einsum, operator.mul, torch.mul)) \
        or is_call(x, LINEAR_TARGETS)
    if not mixes:
        return None, set()
    for other in x.all_input_nodes:
        if is_tensor_input(other):
            if _trainable_input(other) and is_call(x, (operator.mul, torch.mul)):
                return (f"its input is {x.name} = x * {other.name}, a trainable tensor of shape "
                        f"{tuple(value(other).shape)} that is not an IA3 vector of the layer", {x})
            continue
        walked, trainable, _ = _walk(other, set(), budget=12)
        if trainable and all(m.op != "placeholder" or is_tensor_input(m) for m in walked) and not _depends_on_activation(other):
            names = ", ".join(t.name for t in trainable[:4])
            return (f"its input is {x.name} ({_op(x)}) with a matrix computed from trainable {names} "
                    "(an input rotation, OFT/BOFT-style): no kind rewrites input-side rotations", {x, *walked})
    return None, set()


def _depends_on_activation(n: fx.Node) -> bool:
    """Whether `n` reads a graph input that is not a parameter or buffer (an activation)."""
    return any(m.op == "placeholder" and not param_like(m) for m in ancestors(n))


__all__ = ["find_near_misses"]
