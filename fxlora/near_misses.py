"""Adapter-like structure no kind matched, each with the rule that failed (docs/recognises.md).

Runs after every kind's matcher, on the normalised graph. Every frozen layer that no site
claimed -- a linear, GPT-2's Conv1D, and the bases no kind rewrites (conv1d/2d/3d, embedding),
so that an adapter on them is named too -- is checked from three sides:

    output  a branch built from trainable tensors meets h = linear(x, W, b) in a binary op
            (walked back from the other operand, stopping at what h already depends on, at
            other layers and at matched sites: residual adds and SwiGLU are not adapters)
    weight  linear(x, W', b) with W' computed in the graph from the frozen W and trainable tensors
    input   x is rotated/scaled by a matrix or vector computed from trainable tensors just
            before the layer (OFT/BOFT-style input rotations)

A near miss is a `Rejection` whose reason names the canonical form that was not met and why;
layers that a kind already rejected (with its own reason) are not reported twice. On a base no
kind rewrites, only a branch that reads the layer's own input, or a trainable per-channel scale,
counts (a frozen embedding plus a trainable position embedding is not an adapter).
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxlora.graph.read import (
    LINEAR_TARGETS, ancestors, arg, input_name, is_call, is_method, is_tensor_input, linear_layer, module_path,
    requires_grad, strip_casts, value,
)
from fxlora.normalize import param_like
from fxlora.graph.prove import Rejection

PREFIX = "adapter-like, matched by no kind: "
_WALK = 24  # nodes walked back from an operand before giving up on calling it a branch
_PASS_THROUGH = ("view", "reshape", "flatten", "contiguous", "to", "float", "half", "bfloat16", "type", "t")
CONV_TARGETS = (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d)
EMBEDDING_TARGETS = (F.embedding, torch.embedding)
_ONLY_LINEAR = "no kind rewrites adapters on {} layers (only on linear and GPT-2 Conv1D layers)"
_CONV_NAMES = {"conv1d": "Conv1d", "conv2d": "Conv2d", "conv3d": "Conv3d"}
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
    layers = {n: base for n in gm.graph.nodes if (base := base_layer(n)) is not None}
    frozen = {n for n, (_, W) in layers.items() if _frozen(W)}
    stops |= frozen
    found = []
    for n, (kind, _) in layers.items():
        if n in claimed:
            continue
        reason, evidence = None, set()
        if n in frozen:
            reason, evidence = _output_side(n, stops, kind)
            if reason is None:
                reason, evidence = _input_side(n, kind)
        else:
            reason, evidence = _weight_side(n, kind)
        if reason is None or {e.name for e in evidence} & rejected or n.name in rejected:
            continue
        found.append(Rejection(n.name, module_path(n), PREFIX + reason))
    return found


def base_layer(n: fx.Node) -> Optional[tuple[str, Any]]:
    """(kind, weight node) when `n` is a layer's output: "linear", "conv1d" (GPT-2's Conv1D), whose
    adapters kinds rewrite, or "Conv1d/2d/3d", "Embedding" (torch's layers), whose adapters none rewrites."""
    if is_call(n, LINEAR_TARGETS):
        return "linear", arg(n, 1, "weight")
    layer = linear_layer(n)
    if layer is not None:
        return layer[3], layer[1]
    if is_call(n, CONV_TARGETS):
        return _CONV_NAMES[n.target.__name__], arg(n, 1, "weight")
    if is_call(n, EMBEDDING_TARGETS):  # F.embedding(ids, W); torch.embedding(W, ids)
        return "Embedding", n.args[0] if n.target is torch.embedding else arg(n, 1, "weight")
    return None


def _rewritable(kind: str) -> bool:
    return kind in ("linear", "conv1d")


def _frozen(W: Any) -> bool:
    v = value(W)
    return (is_tensor_input(W) and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.dtype.is_floating_point
            and not requires_grad(W))


def _trainable_input(n) -> bool:
    return is_tensor_input(n) and requires_grad(n)



def _walk(start: fx.Node, stop: set, budget: int = _WALK) -> tuple[list[fx.Node], list[fx.Node], set]:
    """(nodes walked, trainable tensor inputs met, the nodes of `stop` reached) going back from `start`."""
    walked, trainable, reached, seen, stack = [], [], set(), set(), [start]
    while stack and len(walked) < budget:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m in stop:
            reached.add(m)
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


def _output_side(layer: fx.Node, stops: set, kind: str = "linear") -> tuple[Optional[str], set]:
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
                scale = _channel_scale(u, other, h)
                if not _rewritable(kind) and not ((reached & h_cone) - {layer} or scale):
                    # not from the layer's input: a residual stream meeting what later layers made of h,
                    # or a trainable tensor beside the layer (a position embedding), is no adapter of it
                    continue
                what = scale or _branch_reason(other, walked, trainable, reached, layer)
                verdict = "no kind's canonical form matches" if _rewritable(kind) else _ONLY_LINEAR.format(kind)
                return (f"h = {layer.name} ({kind}) meets {what} in {u.name} ({_op(u)}); {verdict} "
                        "(docs/recognises.md)", {u, *walked})
    return None, set()


def _channel_scale(u: fx.Node, other: fx.Node, h: fx.Node) -> str:
    """'a trainable scale ...' when `u` multiplies h by a trainable tensor with one entry per channel
    (IA3's vector on a conv: (1, C, 1, 1)); "" otherwise."""
    if not is_call(u, (operator.mul, torch.mul, operator.imul)):
        return ""
    src = other
    while is_call(src, (operator.mul, torch.mul)) or is_method(src, _PASS_THROUGH + ("flatten",)):
        src = next((a for a in src.all_input_nodes if requires_grad(a)), None)
    if not _trainable_input(src):
        return ""
    v, hv = value(other), value(h)
    if not (isinstance(v, torch.Tensor) and isinstance(hv, torch.Tensor)) or v.numel() == 1:
        return ""
    channels = [d for d, n in enumerate(v.shape) if n != 1]
    if len(channels) != 1 or v.numel() not in tuple(hv.shape):
        return ""
    return f"a trainable scale {input_name(src)} of shape {tuple(v.shape)}, one entry per channel (IA3-style)"


def _branch_reason(other: fx.Node, walked: list, trainable: list, reached: bool, layer: fx.Node) -> str:
    names = ", ".join(input_name(t) for t in trainable[:4])
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
                return f"a low-rank chain whose weight {input_name(w)} is computed in the graph ({_op(w)})"
            if isinstance(A, torch.Tensor) and A.dim() == 2 and isinstance(B, torch.Tensor) and B.dim() == 2:
                r, d_in, d_out = A.shape[0], A.shape[1], B.shape[0]
                if not (r < d_in and r < d_out):
                    return f"a chain of two linears of rank {r}, not low for in={d_in}, out={d_out}"
            return "a low-rank chain whose output is also read outside the adapter or not added to h"
    convs = [w for w in walked if is_call(w, CONV_TARGETS) and is_call(w.args[0], CONV_TARGETS)]
    if convs:
        return _conv_chain(convs[0])
    looked_up = [w for w in walked if is_call(w, EMBEDDING_TARGETS)]
    if looked_up:
        table = base_layer(looked_up[0])[1]
        shape = tuple(value(table).shape) if isinstance(value(table), torch.Tensor) else "?"
        return (f"a lookup of the same ids in a table computed from trainable {names} ({_op(table)}, shape {shape}), "
                "then a projection (PEFT's embedding(ids, A^T) @ B^T)")
    muls = [w for w in walked if is_call(w, (operator.mul, torch.mul))]
    for m in muls:
        for a in m.args:
            if isinstance(a, fx.Node) and _trainable_input(a) and value(a).numel() == 1:
                return f"a branch scaled by {input_name(a)}, a tensor that requires grad"
    return (f"a branch built from trainable {names} through {', '.join(sorted({_op(w) for w in walked})[:6])}")


def _conv_chain(outer: fx.Node) -> str:
    """`conv(conv(u, A), B)`: its rank against the fan-in of A (in_channels/groups x kernel) and B's out."""
    A, B = value(arg(outer.args[0], 1, "weight")), value(arg(outer, 1, "weight"))
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)):
        return f"a chain of two {_op(outer)}"
    r, fan_in, n_in = A.shape[0], " x ".join(str(int(d)) for d in A.shape[1:]), A.shape[1:].numel()
    low = "low" if r < n_in and r < B.shape[0] else "not low"
    return (f"a chain of two {_op(outer)} of rank {r} ({low} for in {fan_in} = {n_in}, out={B.shape[0]}; "
            f"A {tuple(A.shape)}, B {tuple(B.shape)})")


def _weight_side(lin: fx.Node, kind: str = "linear") -> tuple[Optional[str], set]:
    Wn = base_layer(lin)[1] if base_layer(lin) is not None else None
    if not isinstance(Wn, fx.Node) or is_tensor_input(Wn):
        return None, set()
    src, _ = strip_casts(Wn)
    if is_method(src, ("t",)) and is_tensor_input(src.args[0]):
        return None, set()
    W = value(Wn)
    if not isinstance(W, torch.Tensor) or W.dim() < 2:
        return None, set()
    walked, trainable, _ = _walk(Wn, set())
    frozen = [m for m in ancestors(Wn) if is_tensor_input(m) and not requires_grad(m) and value(m).dtype.is_floating_point
              and value(m).numel() == W.numel()]
    if not trainable or not frozen:
        return None, set()
    names = ", ".join(input_name(t) for t in trainable[:4])
    verdict = "not as W + s * B @ A of a low rank" if _rewritable(kind) else _ONLY_LINEAR.format(kind)
    return (f"its weight is computed in the graph ({_op(Wn)}) from frozen {input_name(frozen[0])} and trainable "
            f"{names}, {verdict}", set(walked))


def _input_side(layer: fx.Node, kind: str = "linear") -> tuple[Optional[str], set]:
    if kind == "embedding":  # its input is ids: nothing to scale or rotate
        return None, set()
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
        scale = _channel_scale(x, other, x) if not _rewritable(kind) else ""
        if scale:
            return f"its input is {x.name} = x * {scale}; {_ONLY_LINEAR.format(kind)}", {x}
        if is_tensor_input(other):
            if _trainable_input(other) and is_call(x, (operator.mul, torch.mul)):
                return (f"its input is {x.name} = x * {input_name(other)}, a trainable tensor of shape "
                        f"{tuple(value(other).shape)} that is not an IA3 vector of the layer", {x})
            continue
        walked, trainable, _ = _walk(other, set(), budget=12)
        if trainable and all(m.op != "placeholder" or is_tensor_input(m) for m in walked) and not _depends_on_activation(other):
            names = ", ".join(input_name(t) for t in trainable[:4])
            return (f"its input is {x.name} ({_op(x)}) with a matrix computed from trainable {names} "
                    "(an input rotation, OFT/BOFT-style): no kind rewrites input-side rotations", {x, *walked})
    return None, set()


def _depends_on_activation(n: fx.Node) -> bool:
    """Whether `n` reads a graph input that is not a parameter or buffer (an activation)."""
    return any(m.op == "placeholder" and not param_like(m) for m in ancestors(n))


__all__ = ["CONV_TARGETS", "EMBEDDING_TARGETS", "base_layer", "find_near_misses"]
