"""Find DoRA sites by their math ("DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353,
Eq. 5 with the norm detached as its Sec. 4.3 suggests):

    c = m / ||W + s (B A).detach()||_row      (detached: a constant for autograd)
    y = P + (c - 1) * Q + c * s * B(A(u))      P = linear(x, W, b): the base layer's output

PEFT and torchtune spell it this way; what differs is Q and u (the `variant`):
  "scaled_bias"   Q = P, u = x or drop(x)            (torchtune's DoRALinear: y = c * (P + s B A u))
  "unscaled_bias" Q = P - b (or P without a bias), u = x      (PEFT without dropout: y = b + c * z)
  "dropped_base"  Q = linear(drop(x), W), u = drop(x)          (PEFT with dropout)
B A arrives as the canonical `linear(B, t(A))`: PEFT's and torchtune's `B(A(eye)).T` is
normalised to it (fxlora/normalize.py `identity_product`).

Matching starts from every row norm of a sum `W + scaled B A` and proves the rest. The norm's
computation stays as traced (it is o x i work once per step, never per token); the site is what
reads the tokens: P, Q, B(A(u)) and the combination.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from fxlora.graph.prove import NotASite, check_base, prove_each
from fxlora.graph.read import (
    ADD_TARGETS, CAST_METHODS, DROPOUT_TARGETS, LINEAR_TARGETS, MUL_TARGETS, VIEW_METHODS, arg, autocast_state, is_call,
    is_method, is_tensor_input, linear_layer, module_path, requires_grad, strip_casts, value,
)
from fxlora.kinds.base import Match, Size, group_by_input

NORM_TARGETS = tuple(t for t in (torch.linalg.norm, torch.linalg.vector_norm, torch.norm,
                                 getattr(torch._C._linalg, "linalg_norm", None),
                                 getattr(torch._C._linalg, "linalg_vector_norm", None)) if t is not None)
SUB_TARGETS = (operator.sub, torch.sub)
DIV_TARGETS = (operator.truediv, torch.div, torch.true_divide)
DETACH = ("detach",)
SHAPE_METHODS = (*VIEW_METHODS, "unsqueeze")


@dataclass
class DoraNodes:
    """The graph nodes of one DoRA site (see the module docstring for the names)."""

    x: fx.Node  # the base layer's input
    weight: fx.Node  # frozen W: (out, in) for nn.Linear, (in, out) for GPT-2's Conv1D
    bias: Optional[fx.Node]
    layer_out: fx.Node  # P
    lora_A: fx.Node
    lora_B: fx.Node
    magnitude: fx.Node  # m
    scale_c: fx.Node  # c = m / n as the site reads it (stays traced: the rewrite reads it)
    scale: Union[float, fx.Node]  # s
    dropout: Optional[fx.Node]  # drop(x) where the adapter (and "dropped_base"'s Q) reads it
    adapter_in: fx.Node  # u: x or drop(x)
    q_weight: Optional[fx.Node]  # "dropped_base": the weight Q reads (W, or t(W) for Conv1D)
    out: fx.Node  # y: every use is redirected to the rewrite
    internal: tuple[fx.Node, ...]  # the site's token-side nodes, erased when dead, outermost first


@dataclass
class DoraSite:
    index: int
    module: Optional[str]
    variant: str  # scaled_bias, unscaled_bias, dropped_base
    base_kind: str  # linear or conv1d
    tokens: tuple[Size, ...]
    in_features: Size
    out_features: Size
    rank: Size
    dtype: torch.dtype
    dropout_p: Optional[float]
    scaling: str
    has_bias: bool
    a_trainable: bool
    b_trainable: bool
    m_trainable: bool
    autocast: Optional[str] = None
    input_group: int = -1
    shared_x: int = 1
    nodes: Any = None


def find(gm: fx.GraphModule) -> Match:
    rejections: list = []
    autocast = autocast_state(gm.graph)
    norms = [n for n in gm.graph.nodes if is_call(n, NORM_TARGETS) or is_method(n, ("norm",))]
    sites = []
    for norm, (variant, nodes, kind) in prove_each(norms, _prove, "DoRA: ", rejections):
        sites.append(_describe(len(sites), norm, variant, nodes, kind, autocast.get(nodes.out)))
    group_by_input(sites)
    return Match(sites, rejections)


def _describe(index, norm, variant, n: DoraNodes, base_kind, autocast) -> DoraSite:
    x, out = value(n.x), value(n.out)
    s = n.scale
    return DoraSite(
        index=index, module=(module_path(n.layer_out) or module_path(norm) or "").removesuffix(".base_layer") or None,
        variant=variant, base_kind=base_kind, tokens=tuple(x.shape[:-1]), in_features=x.shape[-1],
        out_features=out.shape[-1], rank=value(n.lora_A).shape[0], dtype=out.dtype,
        dropout_p=None if n.dropout is None else _dropout_p(n.dropout), scaling=f"{s:g}" if isinstance(s, float) else s.name,
        has_bias=n.bias is not None, a_trainable=requires_grad(n.lora_A), b_trainable=requires_grad(n.lora_B),
        m_trainable=requires_grad(n.magnitude), autocast=autocast, nodes=n,
    )


def _dropout_p(d: fx.Node) -> Optional[float]:
    p = arg(d, 1, "p", 0.5)
    return float(p) if isinstance(p, numbers.Number) else None


def _through(node: fx.Node, methods=DETACH + CAST_METHODS) -> fx.Node:
    """Follow detaches and casts back from `node` to the tensor they read."""
    while is_method(node, methods) or is_call(node, (torch.detach,)):
        node = node.args[0]
    return node


def _one_user(node: fx.Node, what: str) -> fx.Node:
    if len(node.users) != 1:
        raise NotASite(f"{what} ({node.name}) is read by {len(node.users)} nodes, not only by the site")
    return next(iter(node.users))


def _scaled_product(S: fx.Node) -> Optional[tuple[fx.Node, fx.Node, float]]:
    """(A, B, s) when S = s * (B A) (canonical `linear(B, t(A))`), through detaches and casts; whether
    the norm is a constant for autograd is read from its value (`_prove`), not from the detaches."""
    scale: Any = 1.0
    node = S
    while True:
        node = _through(node)
        if is_call(node, MUL_TARGETS) and len(node.args) == 2:
            a, b = node.args
            num, other = (b, a) if not isinstance(b, fx.Node) else (a, b) if not isinstance(a, fx.Node) else (None, None)
            if num is None or not isinstance(num, numbers.Number) or scale != 1.0:
                return None
            scale, node = float(num), other
            continue
        break
    if not (is_call(node, LINEAR_TARGETS) and len(node.args) == 2 and is_method(node.args[1], ("t",))):
        return None
    B, A = node.args[0], node.args[1].args[0]
    if not (is_tensor_input(A) and is_tensor_input(B) and value(A).dim() == 2 and value(B).dim() == 2):
        return None
    return A, B, scale


def _prove(norm: fx.Node):
    """(variant, DoraNodes, base kind) of the site around `norm`, None when `norm` is no DoRA norm."""
    if norm.args and _conv_dora_norm(norm.args[0]):
        raise NotASite("DoRA on a Conv layer (the norm of a 3-D+ W + s dW): fxlora rewrites DoRA on linear "
                       "and Conv1D bases only; kept as graph ops")
    if not norm.args or arg(norm, 2, "dim", norm.kwargs.get("dim")) not in (1, -1, (1,), [1]):
        return None
    total = norm.args[0]
    if not (is_call(total, ADD_TARGETS) and len(total.args) == 2):
        return None
    for Wv, S in (total.args, total.args[::-1]):
        if isinstance(S, fx.Node) and (product := _scaled_product(S)) is not None:
            break
    else:
        return None
    A, B, s = product
    W = _through(Wv, CAST_METHODS)
    W_rows = W
    if is_method(W, ("t",)):
        W = W.args[0]
    if not is_tensor_input(W):
        return None
    # The norm must be a constant for autograd (Sec. 4.3): detached, or built from nothing trainable.
    n = _through_users(norm)
    if requires_grad(n):
        raise NotASite("the norm ||W + s B A|| is not detached: gradients flow through it (DoRA's Sec. 4.3 "
                       "detaches it, PEFT and torchtune do; fxlora's forms assume a constant norm)")
    div = _one_user(n, "the norm")
    if not (is_call(div, DIV_TARGETS) and len(div.args) == 2 and div.args[1] is n):
        raise NotASite(f"the norm flows into {div.name} instead of `m / ||W + s B A||`")
    m = div.args[0]
    if not (is_tensor_input(m) and value(m).dim() == 1):
        raise NotASite(f"the magnitude {getattr(m, 'name', m)!r} is not a per-output parameter vector")
    c = div
    while len(c.users) == 1 and is_method(next(iter(c.users)), SHAPE_METHODS):
        c = next(iter(c.users))
    return _prove_combination(c, W, W_rows, A, B, s, m)


def _conv_dora_norm(total: Any) -> bool:
    """`W + s dW.detach()` with W a frozen 3-D+ weight: PEFT's DoRA on Conv1d/2d/3d."""
    if not (is_call(total, ADD_TARGETS) and len(total.args) == 2) or getattr(value(total), "dim", lambda: 0)() < 3:
        return False
    return any(is_tensor_input(a) and not requires_grad(a) for a in total.args) and any(
        isinstance(a, fx.Node) and any(is_method(p, DETACH) for p in [a, *a.all_input_nodes]) for a in total.args)


def _through_users(node: fx.Node) -> fx.Node:
    """Follow `node`'s single users through detaches and casts: the norm as the division reads it."""
    while len(node.users) == 1 and (is_method(u := next(iter(node.users)), DETACH + ("to",)) or is_call(u, (torch.detach,))):
        node = u
    return node


def _prove_combination(c, W, W_rows, A, B, s, m):
    users = list(c.users)
    subs = [u for u in users if is_call(u, SUB_TARGETS) and u.args == (c, 1)]
    muls = [u for u in users if is_call(u, MUL_TARGETS)]
    if len(users) != 2 or len(subs) != 1 or len(muls) != 1:
        raise NotASite(f"m / ||W + s B A|| ({c.name}) is read by {', '.join(u.name for u in users)}: expected "
                       "`(c - 1) * Q` and `c * B(A(u))` (a DoRA spelling fxlora does not know)")
    coef, cmul = subs[0], muls[0]
    q_term = _one_user(coef, "c - 1")
    if not (is_call(q_term, MUL_TARGETS) and len(q_term.args) == 2 and coef in q_term.args):
        raise NotASite(f"c - 1 flows into {q_term.name}, not into `(c - 1) * Q`")
    Q = q_term.args[1] if q_term.args[0] is coef else q_term.args[0]
    R = cmul.args[1] if cmul.args[0] is c else cmul.args[0]
    r_term, scale2 = cmul, None
    if is_call(R, MUL_TARGETS):  # c * (B(A(u)) * s)
        R, scale2 = _split_scale(R)
    else:
        after = _one_user(cmul, "c * B(A(u))")
        if is_call(after, MUL_TARGETS):
            _, scale2 = _split_scale(after, keep=cmul)
            r_term = after
    if not isinstance(R, fx.Node) or not is_call(R, LINEAR_TARGETS) or arg(R, 1, "weight") is not B:
        raise NotASite(f"c multiplies {getattr(R, 'name', R)}, not B(A(u)) with the B of the norm")
    xa = R.args[0]
    if not (is_call(xa, LINEAR_TARGETS) and arg(xa, 1, "weight") is A):
        raise NotASite(f"B reads {xa.name}, not A(u) with the A of the norm")
    if scale2 is None:
        scale2 = 1.0
    if isinstance(scale2, float) and scale2 != s:
        raise NotASite(f"the adapter is scaled by {scale2:g} but the norm by {s:g}")
    dora = _one_user(q_term, "(c - 1) * Q")
    if not (is_call(dora, ADD_TARGETS) and set(dora.args) == {q_term, r_term}):
        raise NotASite(f"(c - 1) * Q flows into {dora.name}, not into `(c - 1) * Q + c * s * B(A(u))`")
    out = _one_user(dora, "the DoRA term")
    if not (is_call(out, ADD_TARGETS) and len(out.args) == 2 and dora in out.args):
        raise NotASite(f"the DoRA term flows into {out.name}, not onto the base layer's output")
    P = out.args[1] if out.args[0] is dora else out.args[0]
    layer = linear_layer(P)
    if layer is None:
        raise NotASite(f"the DoRA term is added to {getattr(P, 'name', P)}, not to a linear layer's output")
    x, weight, bias, base_kind, layer_nodes = layer
    if weight is not W:
        raise NotASite(f"the norm is of {W.name}, the base layer's weight is {weight.name}")
    if (base_kind == "conv1d") != (W_rows is not W):
        raise NotASite("the norm's rows are not the base layer's outputs (fan_in_fan_out mismatch)")
    check_base(weight)
    u, casts = strip_casts(xa.args[0])
    dropout = u if is_call(u, DROPOUT_TARGETS) else None
    if dropout is not None and arg(dropout, 3, "inplace", False):
        raise NotASite("the adapter's dropout is in-place")
    if dropout is not None:
        u, casts = strip_casts(dropout.args[0])
    if u is not x and x not in casts:  # the base may read a cast of x itself (x.float())
        raise NotASite(f"the adapter reads {u.name}, the base layer reads {x.name}: not the same input")
    own = [xa, R]
    q_weight = None
    if Q is P:
        variant = "scaled_bias" if bias is not None else "unscaled_bias"
        if variant == "unscaled_bias" and dropout is not None:
            variant = "scaled_bias"  # no bias: torchtune's y = c * (P + s B A drop(x)) is the same
        if set(P.users) != {q_term, out}:
            raise NotASite(f"the base layer's output ({P.name}) is also read outside the site")
    elif is_call(Q, SUB_TARGETS) and Q.args == (P, bias) and bias is not None:
        variant = "unscaled_bias"
        if dropout is not None:
            raise NotASite("Q = P - b with a dropped adapter input: a DoRA spelling fxlora does not know")
        if set(P.users) != {Q, out} or len(Q.users) != 1:
            raise NotASite(f"the base layer's output ({P.name}) is also read outside the site")
        own.append(Q)
    elif is_call(Q, LINEAR_TARGETS) and arg(Q, 2, "bias") is None and dropout is not None \
            and strip_casts(Q.args[0])[0] is dropout and _reads_weight(arg(Q, 1, "weight"), W, base_kind):
        variant = "dropped_base"
        q_weight = arg(Q, 1, "weight")
        if len(Q.users) != 1 or set(P.users) != {out}:
            raise NotASite(f"the dropped base output ({Q.name}) is also read outside the site")
        own.append(Q)
    else:
        raise NotASite(f"(c - 1) multiplies {getattr(Q, 'name', Q)}: not the base output, P - b, nor W drop(x)")
    if len(xa.users) != 1 or len(R.users) != 1:
        raise NotASite("A(u) or B(A(u)) is also read outside the site")
    internal = (out, dora, q_term, coef, r_term, cmul, *own[::-1], P, *layer_nodes)
    scale = s if scale2 == s or not isinstance(scale2, fx.Node) else scale2
    nodes = DoraNodes(x=x, weight=W, bias=bias, layer_out=P, lora_A=A, lora_B=B, magnitude=m, scale_c=c,
                      scale=scale, dropout=dropout, adapter_in=xa.args[0], q_weight=q_weight, out=out,
                      internal=tuple(dict.fromkeys(internal)))
    return variant, nodes, base_kind


def _reads_weight(node: Any, W: fx.Node, base_kind: str) -> bool:
    """`node` is W as a linear reads it: W itself, or t(W) for Conv1D's (in, out) layout."""
    node = strip_casts(node)[0] if isinstance(node, fx.Node) else node
    if base_kind == "conv1d":
        return is_method(node, ("t",)) and node.args[0] is W
    return node is W


def _split_scale(node: fx.Node, keep: Optional[fx.Node] = None) -> tuple[Any, Any]:
    """(the tensor, the scalar) of `y * s`; `keep`: the tensor operand it must have."""
    a, b = node.args
    for t, s in ((a, b), (b, a)):
        if (keep is None or t is keep) and (isinstance(s, numbers.Number) or (
                isinstance(s, fx.Node) and isinstance(value(s), torch.Tensor) and value(s).numel() == 1
                and not requires_grad(s))):
            return t, float(s) if isinstance(s, numbers.Number) else s
    raise NotASite(f"{node.name} scales B(A(u)) by a non-scalar")
