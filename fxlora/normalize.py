"""Bring equivalent spellings of an adapter to the one form the matchers read (docs/recognises.md).

One FX pass over the Dynamo graph, run on the candidate copy before every kind's matcher.
The rules are a table (`RULES`: name, one comment, a function); each function looks at one
node and either leaves it alone (returns False) or replaces it by the same value spelled
canonically (returns True). The driver sweeps the graph until no rule fires, counts every
firing in `torch._dynamo.utils.counters["fxlora"]["normalize.<rule>"]`, and tags the nodes a
rule created with `meta["fxlora_rules"]` so explain can say which rules made a site.

The canonical forms are PEFT's: `torch._C._nn.linear(x, W, b)`, a transpose is `W.t()`, a
scale is `y * s` after the product it scales, and weight-side LoRA is the activation-side sum
`linear(x, W, b) + linear(linear(x, A), B) * s`. Every rule keeps the value (up to float
rounding where a scale moves across a product or a division becomes a multiply); the rules
that move scales only fire inside a low-rank chain `linear(linear(u, A), B)`, so a graph with
no adapter is only re-spelled, never re-associated. The backend compiles the traced graph
whenever no site was rewritten, so normalising alone never changes what runs.

Why an FX pass over the Dynamo graph and not matching after decomposition to ATen: fxlora
rewrites before AOTAutograd (its custom ops choose what backward saves), and ATen graphs only
exist after the joint graph is traced and partitioned.
"""

from __future__ import annotations

import numbers
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.checkpoint import CheckpointPolicy

from fxlora.graph.read import (
    ADD_TARGETS, DROPOUT_TARGETS, LINEAR_TARGETS, MUL_TARGETS, ancestors, arg, is_call, is_method, is_tensor_input,
    value,
)

LINEAR = torch._C._nn.linear
MATMUL_TARGETS = (torch.matmul, operator.matmul, torch.mm)
DIV_TARGETS = (operator.truediv, torch.div, torch.true_divide)
CAST_NAMES = ("to", "float", "half", "bfloat16", "double", "type")
_MAX_SWEEPS = 8


class _Ctx:
    """What one normalisation call needs besides the node: the graph, its fake mode, the rule firing."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = gm.graph
        self.fake_mode = next(
            (getattr(value(n), "fake_mode", None) for n in gm.graph.find_nodes(op="placeholder")
             if getattr(value(n), "fake_mode", None) is not None), None)
        self.rule = ""
        self.seen: dict = {}  # same_weight: key -> first node computing it
        self.weight: dict = {}  # same_weight: node -> computed from parameters and buffers only
        self.tainted: Optional[set] = None  # same_weight: nodes an in-place op may see change

    def emit(self, before: fx.Node, op: str, target: Any, args: tuple, kwargs: Optional[dict] = None,
             like: Optional[fx.Node] = None, grad: Optional[bool] = None) -> fx.Node:
        """Insert `target(*args)` before `before` with its fake value (the value of `like` when given:
        the node it replaces). Raises _Skip (nothing inserted) when the value cannot be computed."""
        kwargs = kwargs or {}
        if like is not None:
            val = value(like)
        else:
            val = self._fake(op, target, args, kwargs, grad if grad is not None else _any_grad(args))
        with self.graph.inserting_before(before):
            node = self.graph.create_node(op, target, args, kwargs)
        src = like if like is not None else before
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in src.meta:
                node.meta[key] = src.meta[key]
        node.meta["example_value"] = val
        node.meta["fxlora_rules"] = _rules_of(args) | {self.rule}
        return node

    def _fake(self, op, target, args, kwargs, grad: bool):
        if self.fake_mode is None:
            raise _Skip("no fake mode")
        a, kw = fx.node.map_arg((args, kwargs), value)
        try:
            with self.fake_mode, torch.set_grad_enabled(grad):
                if op == "call_method":
                    return getattr(a[0], target)(*a[1:], **kw)
                return target(*a, **kw)
        except Exception as err:  # a rule that cannot type its result does not fire
            raise _Skip(str(err)) from err

    def replace(self, node: fx.Node, new: Any) -> bool:
        """Every use of `node` reads `new`; `node` and whatever only it read are erased."""
        if isinstance(new, fx.Node) and "fxlora_rules" in new.meta:  # a node a rule made, not a traced one
            made_by = node.meta.get("fxlora_rules", set()) | _rules_of((node.args, node.kwargs))  # what the rule consumed
            new.meta["fxlora_rules"] = new.meta.get("fxlora_rules", set()) | made_by | {self.rule}
        node.replace_all_uses_with(new)
        inputs = node.all_input_nodes
        self.graph.erase_node(node)  # a rule replaces only pure nodes, or dropout that draws nothing (p=0, eval)
        for n in inputs:
            _erase_dead(self.graph, n)
        return True


class _Skip(Exception):
    pass


def _rules_of(args) -> set:
    rules: set = set()
    fx.node.map_arg(args, lambda n: rules.update(n.meta.get("fxlora_rules", ())))
    return rules


def _any_grad(args) -> bool:
    found = []
    fx.node.map_arg(args, lambda n: found.append(bool(getattr(value(n), "requires_grad", False))))
    return any(found)


def _erase_dead(graph: fx.Graph, node: fx.Node) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        if n._erased or n.users or n.op in ("placeholder", "output", "get_attr") or _impure(n):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


_RANDOM = re.compile(r"dropout|rand|bernoulli|normal|multinomial|poisson|uniform|exponential|cauchy|geometric|empty")


def _impure(n: fx.Node) -> bool:
    """Random, in-place, or not a tensor: never merged, never erased by a rule."""
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if _RANDOM.search(name or "") or name.startswith("_") and name not in ("__getitem__",):
        return True
    if n.target in (operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.setitem):
        return True
    if (name.endswith("_") and not name.endswith("__")) or n.kwargs.get("out") is not None or n.kwargs.get("inplace"):
        return True
    return not isinstance(value(n), torch.Tensor)


# --- small readers ------------------------------------------------------------------------


def _t(n) -> Optional[torch.Tensor]:
    v = value(n)
    return v if isinstance(n, fx.Node) and isinstance(v, torch.Tensor) else None


def _is_2d(n) -> bool:
    v = _t(n)
    return v is not None and v.dim() == 2


def _is_t(n) -> bool:
    """The canonical transpose `W.t()` of a 2-D tensor."""
    return is_method(n, ("t",)) and len(n.args) == 1 and not n.kwargs


def _scalar(s) -> bool:
    """A Python number, a symbolic one, or a 1-element tensor that needs no grad (a scale, not a parameter)."""
    if isinstance(s, numbers.Number) and not isinstance(s, bool):
        return True
    if isinstance(s, fx.Node) and isinstance(value(s), (torch.SymFloat, torch.SymInt)):  # dynamic=True: `S.item()`
        return True
    v = _t(s)
    return v is not None and v.numel() == 1 and v.dim() <= 1 and not v.requires_grad


def _scaled(n) -> Optional[tuple[fx.Node, Any]]:
    """(y, s) when `n` is `y * s` or `s * y` with s a scalar."""
    if not (is_call(n, MUL_TARGETS) and len(n.args) == 2 and not n.kwargs):
        return None
    a, b = n.args
    if isinstance(a, fx.Node) and _scalar(b) and not _scalar(a):
        return a, b
    if isinstance(b, fx.Node) and _scalar(a) and not _scalar(b):
        return b, a
    return None


def _plain_linear(n) -> Optional[tuple[Any, fx.Node]]:
    """(input, weight) of `linear(u, W)` with a 2-D weight and no bias."""
    if not is_call(n, LINEAR_TARGETS) or len(n.args) > 3 or arg(n, 2, "bias") is not None:
        return None
    w = arg(n, 1, "weight")
    return (n.args[0], w) if _is_2d(w) else None


def _low_rank(A, B) -> bool:
    """A: (r, in), B: (out, r), r below both."""
    a, b = value(A), value(B)
    try:
        return a.shape[0] == b.shape[1] and bool(a.shape[0] < a.shape[1]) and bool(a.shape[0] < b.shape[0])
    except Exception:  # unbacked sizes: not provably low rank
        return False


def _through_scales(n: fx.Node) -> fx.Node:
    """Follow a node's single users through scalar multiplies and divisions."""
    while len(n.users) == 1:
        (u,) = n.users
        if _scaled(u) is not None or (is_call(u, DIV_TARGETS) and len(u.args) == 2 and u.args[0] is n and _scalar(u.args[1])):
            n = u
        else:
            break
    return n


def _back_through_scales(n):
    while isinstance(n, fx.Node):
        sc = _scaled(n)
        if sc is not None:
            n = sc[0]
        elif is_call(n, DIV_TARGETS) and len(n.args) == 2 and _scalar(n.args[1]) and not n.kwargs:
            n = n.args[0]
        else:
            break
    return n


def _chain_inner(lin) -> bool:
    """`lin` = linear(u, A) is the down-projection of a low-rank chain: its output reaches
    (through scales only) a linear(., B) with B: (out, r)."""
    p = _plain_linear(lin)
    if p is None:
        return False
    end = _through_scales(lin)
    users = list(end.users)
    return len(users) == 1 and (q := _plain_linear(users[0])) is not None and q[0] is end and _low_rank(p[1], q[1])


def _chain_outer(lin) -> bool:
    """`lin` = linear(y, B) is the up-projection of a low-rank chain."""
    q = _plain_linear(lin)
    if q is None:
        return False
    inner = _back_through_scales(q[0])
    p = _plain_linear(inner)
    return p is not None and _low_rank(p[1], q[1])


# --- the rules ----------------------------------------------------------------------------


def same_weight(ctx: _Ctx, n: fx.Node) -> bool:
    # computed from parameters and buffers only (inputs are visited first): cheap, and skips activations
    if n.op in ("placeholder", "get_attr"):
        ctx.weight[n] = n.op == "get_attr" or param_like(n)
        return False
    ctx.weight[n] = weightlike = n.op in ("call_function", "call_method") and all(
        ctx.weight.get(m, False) for m in n.all_input_nodes)
    if not weightlike or _impure(n):
        return False
    try:
        key = (n.op, n.target, _freeze(n.args), _freeze(n.kwargs))
        hash(key)
    except TypeError:
        return False
    first = ctx.seen.get(key)
    if first is None or first._erased:
        ctx.seen[key] = n
        return False
    a, b = value(first), value(n)
    if (a.shape, a.dtype, a.requires_grad, a.device) != (b.shape, b.dtype, b.requires_grad, b.device):
        return False
    if ctx.tainted is None:
        ctx.tainted = _tainted(ctx.graph)
    cone = ancestors(n)
    inputs = [m for m in cone if m.op == "placeholder"]
    # a trainable weight's computation (a parametrization), never an activation's
    if cone & ctx.tainted or not all(map(param_like, inputs)) or not any(bool(value(m).requires_grad) for m in inputs):
        return False
    return ctx.replace(n, first)


def param_like(n: fx.Node) -> bool:
    """A parameter or buffer placeholder (Dynamo names them by their module attribute), not an activation."""
    name = str(n.target).lower()
    return "_parameters_" in name or "_buffers_" in name


def _freeze(x):
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, *map(_freeze, x))
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, slice):
        return ("slice", _freeze(x.start), _freeze(x.stop), _freeze(x.step))
    if isinstance(x, torch.Tensor) or (isinstance(x, float) and x != x):
        raise TypeError("a tensor or nan constant")
    return x



def _tainted(graph: fx.Graph) -> set:
    """Everything an in-place op's operand depends on: values that may change between two reads."""
    out: set = set()
    for m in graph.nodes:
        if m.op in ("call_function", "call_method") and _impure(m) and m.args and isinstance(m.args[0], fx.Node):
            name = m.target if isinstance(m.target, str) else getattr(m.target, "__name__", "")
            if _RANDOM.search(name or "") and not m.kwargs.get("inplace") and not name.endswith("_"):
                continue
            out |= ancestors(m.args[0])
    return out


def noop(ctx: _Ctx, n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in DROPOUT_TARGETS:
        p, training = arg(n, 1, "p", 0.5), arg(n, 2, "training" if n.target is not torch.dropout else "train", True)
        if (isinstance(p, numbers.Number) and p == 0 or training is False) and not arg(n, 3, "inplace", False):
            return ctx.replace(n, n.args[0])
        return False
    if not (n.op == "call_method" and n.args and isinstance(n.args[0], fx.Node)):
        return False
    src, out = _t(n.args[0]), _t(n)
    if src is None or out is None:
        return False
    if n.target in CAST_NAMES:
        if is_traceable_wrapper_subclass(src):  # NF4Tensor.to(its own dtype) dequantises: not a noop
            return False
        if set(n.kwargs) - {"dtype", "device"} or (src.dtype, src.device, src.shape) != (out.dtype, out.device, out.shape):
            return False
        return ctx.replace(n, n.args[0])
    if n.target == "contiguous" and not n.kwargs and src.is_contiguous():
        return ctx.replace(n, n.args[0])
    if n.target == "clone" and not n.kwargs and len(n.args[0].users) == 1:
        # PEFT's QLoRA layers clone the base's output before adding to it: with no other reader
        # and no in-place op on either side, the copy is the value itself.
        if ctx.tainted is None:
            ctx.tainted = _tainted(ctx.graph)
        if n not in ctx.tainted and n.args[0] not in ctx.tainted and not _written_in_place(n):
            return ctx.replace(n, n.args[0])
    if n.target in ("view", "reshape", "flatten", "expand") and src.shape == out.shape:
        return ctx.replace(n, n.args[0])
    return False


def _written_in_place(n: fx.Node) -> bool:
    return any(_impure(u) and u.args and u.args[0] is n for u in n.users)


def transpose(ctx: _Ctx, n: fx.Node) -> bool:
    if _is_t(n) and _is_2d(n.args[0]) and _is_t(n.args[0]):  # t(t(W)) is W
        return ctx.replace(n, n.args[0].args[0])
    if _is_t(n) or not (n.args and _is_2d(n.args[0])) or not _is_transpose_spelling(n):
        return False
    return ctx.replace(n, ctx.emit(n, "call_method", "t", (n.args[0],), like=n))


def _is_transpose_spelling(n: fx.Node) -> bool:
    """`.T`, `.mT`, `torch.t`, `transpose(0, 1)` (any two dims), `permute(1, 0)` of a 2-D tensor."""
    if n.op == "call_function" and n.target is getattr and n.args[1:] in (("T",), ("mT",)):
        return True
    if n.op == "call_function" and n.target is torch.t and len(n.args) == 1:
        return True
    name = n.target if n.op == "call_method" else (n.target.__name__ if n.target in (torch.transpose, torch.permute) else None)
    if name == "transpose" and len(n.args) == 3 and not n.kwargs:
        return n.args[1] % 2 != n.args[2] % 2 if all(isinstance(d, int) for d in n.args[1:]) else False
    if name == "permute" and not n.kwargs:
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
        return [d % 2 for d in dims if isinstance(d, int)] == [1, 0] and len(dims) == 2
    return False


def matmul_to_linear(ctx: _Ctx, n: fx.Node) -> bool:
    if is_call(n, MATMUL_TARGETS) or is_method(n, ("matmul", "mm", "__matmul__")):
        if len(n.args) != 2 or n.kwargs:
            return False
        x, M = n.args
    else:
        return False
    xv = _t(x)
    if xv is None or xv.dim() < 1 or not _is_2d(M):
        return False
    W = M.args[0] if _is_t(M) else ctx.emit(n, "call_method", "t", (M,))
    return ctx.replace(n, ctx.emit(n, "call_function", LINEAR, (x, W), like=n))


def _einsum_projection(n: fx.Node) -> Optional[tuple[fx.Node, fx.Node, bool]]:
    """(x, w, w_is_weight) for a projection einsum: `...i,ri->...r` is linear(x, w) (w is the
    weight), `...i,ir->...r` is x @ w (the weight is t(w))."""
    if len(n.args) != 3 or not isinstance(n.args[0], str) or n.kwargs:
        return None
    eq, x, w = n.args
    m = re.fullmatch(r"\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z]{2})\s*->\s*([a-zA-Z.]+)\s*", eq)
    if m is None or not _is_2d(w):
        return None
    xs, ws, outs = m.groups()
    xs_l, out_l = xs.replace("...", "."), outs.replace("...", ".")
    if len(set(xs_l)) != len(xs_l) or len(set(out_l)) != len(out_l) or ws[0] == ws[1]:
        return None
    k = xs_l[-1]
    if k not in ws or k in out_l:
        return None
    r = ws[1] if ws[0] == k else ws[0]
    if r in xs_l or out_l != xs_l[:-1] + r:
        return None
    if "." in xs_l and "." != xs_l[0]:
        return None
    xv = _t(x)
    if xv is None or ("." not in xs_l and xv.dim() != len(xs_l)):
        return None
    return x, w, ws[1] == k


def einsum_to_linear(ctx: _Ctx, n: fx.Node) -> bool:
    proj = _einsum_projection(n) if is_call(n, (torch.einsum,)) else None
    if proj is None:
        return False
    x, w, is_weight = proj
    W = w if is_weight else w.args[0] if _is_t(w) else ctx.emit(n, "call_method", "t", (w,))
    return ctx.replace(n, ctx.emit(n, "call_function", LINEAR, (x, W), like=n))


def bias_into_linear(ctx: _Ctx, n: fx.Node) -> bool:
    if not (is_call(n, ADD_TARGETS) and len(n.args) == 2 and not n.kwargs):
        return False
    for lin, b in (n.args, n.args[::-1]):
        p = _plain_linear(lin)
        bv = _t(b)
        if p is None or bv is None or len(lin.users) != 1 or not is_tensor_input(b):
            continue
        if bv.dim() == 1 and bv.shape[0] == value(p[1]).shape[0] and value(n).shape == value(lin).shape:
            return ctx.replace(n, ctx.emit(n, "call_function", LINEAR, (p[0], p[1], b), like=n))
    return False


def add_alpha(ctx: _Ctx, n: fx.Node) -> bool:
    if not (is_call(n, (torch.add,)) and len(n.args) == 2 and set(n.kwargs) == {"alpha"}):
        return False
    a, b = n.args
    s = n.kwargs["alpha"]
    if not (isinstance(b, fx.Node) and isinstance(s, numbers.Number) and _chain_outer(_back_through_scales(b))):
        return False
    scaled = ctx.emit(n, "call_function", operator.mul, (b, s))
    return ctx.replace(n, ctx.emit(n, "call_function", operator.add, (a, scaled), like=n))


def scalar_last(ctx: _Ctx, n: fx.Node) -> bool:
    sc = _scaled(n)
    if sc is None or n.args[0] is sc[0]:
        return False
    return ctx.replace(n, ctx.emit(n, "call_function", operator.mul, sc, like=n))


def div_scale(ctx: _Ctx, n: fx.Node) -> bool:
    if not (is_call(n, DIV_TARGETS) and len(n.args) == 2 and not n.kwargs):
        return False
    y, c = n.args
    if not (isinstance(c, numbers.Number) and not isinstance(c, bool) and c != 0 and isinstance(y, fx.Node)):
        return False
    inner = _back_through_scales(y)
    users = list(n.users)
    feeds_chain = len(users) == 1 and _plain_linear(users[0]) is not None and (
        _chain_inner(users[0]) or _chain_outer(users[0]))
    if not (_chain_outer(inner) or _chain_inner(inner) or feeds_chain):
        return False
    return ctx.replace(n, ctx.emit(n, "call_function", operator.mul, (y, 1.0 / c), like=n))


def scale_out_of_linear(ctx: _Ctx, n: fx.Node) -> bool:
    p = _plain_linear(n)
    if p is None or not isinstance(p[0], fx.Node):
        return False
    sc = _scaled(p[0])
    if sc is None:
        return False
    y, s = sc
    if not (_chain_inner(n) or _chain_outer(n)):
        return False
    lin = ctx.emit(n, "call_function", LINEAR, (y, p[1]))
    return ctx.replace(n, ctx.emit(n, "call_function", operator.mul, (lin, s), like=n))


def merge_scales(ctx: _Ctx, n: fx.Node) -> bool:
    outer = _scaled(n)
    if outer is None:
        return False
    mid, s2 = outer
    inner = _scaled(mid)
    if inner is None or len(mid.users) != 1:
        return False
    y, s1 = inner
    if not (_chain_outer(y) or _chain_inner(y)):
        return False
    if isinstance(s1, numbers.Number) and isinstance(s2, numbers.Number):
        s = s1 * s2
    else:
        s = ctx.emit(n, "call_function", operator.mul, (s1, s2) if isinstance(s1, fx.Node) else (s2, s1))
    return ctx.replace(n, ctx.emit(n, "call_function", operator.mul, (y, s), like=n))


def weight_side_lora(ctx: _Ctx, n: fx.Node) -> bool:
    if not is_call(n, LINEAR_TARGETS) or len(n.args) > 3:
        return False
    x, Wp, b = n.args[0], arg(n, 1, "weight"), arg(n, 2, "bias")
    if not (is_call(Wp, ADD_TARGETS) and len(Wp.args) == 2 and not Wp.kwargs and len(Wp.users) == 1):
        return False
    for W, S in (Wp.args, Wp.args[::-1]):
        if not (is_tensor_input(W) and _is_2d(W) and isinstance(S, fx.Node) and len(S.users) == 1):
            continue
        found = _low_rank_product(S)
        if found is None:
            continue
        A, B, scales = found
        if value(S).shape != value(W).shape:
            continue
        scale: Any = 1.0
        for s in scales:
            if isinstance(s, numbers.Number):
                scale = scale * s
            elif isinstance(scale, numbers.Number) and scale == 1.0:
                scale = s
            else:
                scale = None
                break
        if scale is None:
            continue
        base = ctx.emit(n, "call_function", LINEAR, (x, W, b), grad=_requires_grad_any(x, W, b))
        xa = ctx.emit(n, "call_function", LINEAR, (x, A))
        xab = ctx.emit(n, "call_function", LINEAR, (xa, B))
        branch = xab if isinstance(scale, numbers.Number) and scale == 1.0 else ctx.emit(
            n, "call_function", operator.mul, (xab, scale))
        return ctx.replace(n, ctx.emit(n, "call_function", operator.add, (base, branch), like=n))
    return False


def _requires_grad_any(*nodes) -> bool:
    return any(bool(getattr(value(m), "requires_grad", False)) for m in nodes if isinstance(m, fx.Node))


def _low_rank_product(S: fx.Node) -> Optional[tuple[fx.Node, fx.Node, list]]:
    """(A, B, scales) when S = scales * B @ A, spelled `linear(B, t(A))` (the canonical `B @ A`),
    with scalar multiplies on the product, on A or on B, and A, B tensor inputs of low rank."""
    scales: list = []

    def unscale(m):
        while (sc := _scaled(m)) is not None and len(m.users) == 1:
            m, s = sc
            scales.append(s)
        return m

    P = unscale(S)
    p = _plain_linear(P)
    if p is None or len(P.users) != 1:
        return None
    Bn, At = p[0], p[1]
    if not (_is_t(At) and len(At.users) == 1):
        return None
    A = unscale(At.args[0])
    B = unscale(Bn)
    if not (is_tensor_input(A) and is_tensor_input(B) and _is_2d(A) and _is_2d(B) and _low_rank(A, B)):
        return None
    return A, B, scales


def identity_product(ctx: _Ctx, n: fx.Node) -> bool:
    # `B(A(eye(i))).T`: PEFT's and torchtune's DoRA build B A by pushing an identity through the adapter
    if not (_is_t(n) and is_call(n.args[0], LINEAR_TARGETS)):
        return False
    outer = n.args[0]
    q = _plain_linear(outer)
    if q is None or len(outer.users) != 1 or not is_call(q[0], LINEAR_TARGETS):
        return False
    inner = q[0]
    p = _plain_linear(inner)
    if p is None or len(inner.users) != 1:
        return False
    eye, A = p
    B = q[1]
    if not (is_call(eye, (torch.eye,)) and len(eye.users) == 1 and is_tensor_input(A) and is_tensor_input(B)
            and _low_rank(A, B) and len(eye.args) == 1 and value(A).shape[1] == eye.args[0]):
        return False
    At = ctx.emit(n, "call_method", "t", (A,))
    return ctx.replace(n, ctx.emit(n, "call_function", LINEAR, (B, At), like=n))


# --- a 4-bit base: bitsandbytes' autograd function as linear(x, dequant(Wq), b) -----------------

_AUTOGRAD_APPLY = getattr(torch.ops.higher_order, "autograd_function_apply", None)
_MATMULS = (torch.matmul, operator.matmul, torch.mm)
_DEQUANT_STEPS = (operator.iadd, operator.add)  # `absmax += offset` of double quantisation


def _bnb_op(n: fx.Node) -> bool:
    return n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "bitsandbytes"


def _subclass(n: Any) -> bool:
    """A tensor subclass value (torchao's NF4Tensor): its `.to(float dtype)` is its dequantisation."""
    return isinstance(n, fx.Node) and is_traceable_wrapper_subclass(value(n))


def _dequantises(n: fx.Node) -> bool:
    """A step that turns a quantised weight into a float one: a bitsandbytes op, or `.to(dtype)`
    of a quantised tensor subclass (torchao's `NF4Tensor`, as torchtune's `linear_nf4` reads it)."""
    return _bnb_op(n) or (n.op == "call_method" and n.target in CAST_NAMES and _subclass(n.args[0]))


def _body(gm: fx.GraphModule, n: Any) -> Optional[fx.GraphModule]:
    if isinstance(n, fx.Node) and n.op == "get_attr":
        sub = getattr(gm, n.target, None)
        return sub if isinstance(sub, fx.GraphModule) else None
    return None


def _dequantised_weight_chain(bwd: fx.GraphModule) -> Optional[tuple[fx.Node, list, int]]:
    """(W', its nodes in order, the operand index dX goes to) when `bwd` returns one gradient,
    `dY @ W'`, and W' is computed from saved values by dequantisation (bitsandbytes ops, an
    NF4Tensor's cast) and casts alone."""
    ph = [n for n in bwd.graph.nodes if n.op == "placeholder"]
    out = next(n for n in bwd.graph.nodes if n.op == "output").args[0]
    grads = [(k, g) for k, g in enumerate(out) if g is not None]
    if not ph or len(grads) != 1 or not is_call(grads[0][1], _MATMULS) or grads[0][1].args[0] is not ph[0]:
        return None
    index, mm = grads[0]
    w = mm.args[1]
    chain, stack, seen = [], [w], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or n.op == "placeholder" and n is not ph[0]:
            continue
        seen.add(n)
        plain = n.op == "call_method" and n.target in CAST_NAMES or n.op == "call_function" and n.target in _DEQUANT_STEPS
        if n is ph[0] or not (_bnb_op(n) or plain):
            return None
        chain.append(n)
        stack.extend(n.all_input_nodes)
    if not any(_dequantises(n) for n in chain):
        return None
    order = {n: k for k, n in enumerate(bwd.graph.nodes)}
    return w, sorted(chain, key=order.__getitem__), index


def _quantised_forward(fwd: fx.GraphModule, x_index: int) -> Optional[tuple[list, Optional[fx.Node]]]:
    """(the saved values, the bias or None: forward-body nodes) when `fwd` returns the 4-bit product
    of operand `x_index`: bitsandbytes' `gemm_4bit` (CPU), or a linear over a dequantised W (bitsandbytes
    on CUDA, torchao's `linear_nf4`)."""
    ph = [n for n in fwd.graph.nodes if n.op == "placeholder"]
    out = next(n for n in fwd.graph.nodes if n.op == "output").args[0]
    if not (isinstance(out, tuple) and len(out) == 2 and len(out[0]) == 1) or x_index >= len(ph):
        return None
    y, saved = out[0][0], out[1]
    if not all(isinstance(v, fx.Node) and _views_of_inputs(v) for v in saved):
        return None
    if _bnb_op(y) and "gemm_4bit" in str(y.target) and y.args and y.args[0] is ph[x_index]:
        bias = y.kwargs.get("bias", y.args[6] if len(y.args) > 6 else None)
    elif is_call(y, LINEAR_TARGETS) and y.args[0] is ph[x_index] and any(
            _dequantises(n) for n in ancestors(y.args[1]) if n.op != "placeholder"):
        bias = arg(y, 2, "bias")
    else:
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and _views_of_inputs(bias)):
        return None
    return list(saved), bias


_VIEWS = ("view", "reshape", "t", "contiguous", *CAST_NAMES)


def _views_of_inputs(n: fx.Node) -> bool:
    """`n` is a body input, or views and casts of one (what bitsandbytes saves: `B.view(-1, 1)`)."""
    while n.op == "call_method" and n.target in _VIEWS and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n.op == "placeholder"


def _copy_out(ctx: _Ctx, before: fx.Node, n: fx.Node, env: dict) -> fx.Node:
    """`n` of a body (a view chain of its inputs), computed in the outer graph from `env`'s operands."""
    if n not in env:
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda m: _copy_out(ctx, before, m, env))
        env[n] = ctx.emit(before, n.op, n.target, args, kwargs, grad=False)
    return env[n]


def linear_4bit(ctx: _Ctx, n: fx.Node) -> bool:
    """A 4-bit base's autograd function reaches the graph as an autograd-function higher-order op:
    bitsandbytes' `MatMul4Bit` (PEFT's QLoRA layers; forward `x W'^T (+ b)` with W' dequantised inside
    its kernel, backward `dY W'` after dequantising again) or torchao's `linear_nf4` (torchtune's
    QLoRA; `linear(x, W.to(dtype))` and `dY @ W.to(dtype)` on an `NF4Tensor`). Spelled `linear(x, W', b)` with
    W' computed in the graph from the frozen quantised tensors by backward's own dequantisation
    ops, marked to be recomputed in backward rather than kept (as bitsandbytes does: no
    full-precision weight is saved). Same values: the function's forward is that product, and its
    backward `dY W'` is the linear's."""
    if _dequantises(n) and not _bnb_op(n) and is_tensor_input(n.args[0]) and not n.meta.get("fxlora_dequantised"):
        # where x needs no gradient Dynamo inlines `linear_nf4` as `linear(x, W.to(dtype))`: the cast is W'
        _dequantised(n)
        n.meta["fxlora_rules"] = n.meta.get("fxlora_rules", set()) | {ctx.rule}
        return True
    if _AUTOGRAD_APPLY is None or n.op != "call_function" or n.target is not _AUTOGRAD_APPLY or len(n.args) < 3:
        return False
    gm = ctx.graph.owning_module
    fwd, bwd = _body(gm, n.args[0]), _body(gm, n.args[1])
    if fwd is None or bwd is None:
        return False
    found = _dequantised_weight_chain(bwd)
    if found is None:
        return False
    w, chain, x_index = found
    fwd_found = _quantised_forward(fwd, x_index)
    if fwd_found is None:
        return False
    saved, bias = fwd_found
    operands = n.args[2:]
    getitems = list(n.users)
    if not all(is_call(u, (operator.getitem,)) and u.args[1] == 0 for u in getitems) or not getitems:
        return False
    bwd_ph = [m for m in bwd.graph.nodes if m.op == "placeholder"][1:]  # after dY: forward's saved values
    if len(bwd_ph) != len(saved):
        return False
    fwd_env = dict(zip((m for m in fwd.graph.nodes if m.op == "placeholder"), operands))
    env = {m: _copy_out(ctx, n, saved[k], fwd_env) for k, m in enumerate(bwd_ph)}
    x = operands[x_index]
    for m in chain:  # backward's dequantisation, copied out before the op
        args, kwargs = fx.node.map_arg((m.args, m.kwargs), env.__getitem__)
        env[m] = _dequantised(ctx.emit(n, m.op, m.target, args, kwargs, grad=False))
    bias = None if bias is None else _copy_out(ctx, n, bias, fwd_env)
    lin = _dequantised_linear(ctx, n, x, env[w], bias, getitems[0])
    for u in getitems:
        ctx.replace(u, lin)
    if not n.users:
        ctx.graph.erase_node(n)
    return True


def _dequantised(n: fx.Node) -> fx.Node:
    """Mark a step of a weight's dequantisation: recomputed in backward rather than kept (Inductor's
    partitioner honours the tag selective checkpointing uses: nothing full-size is saved), and a frozen
    weight the matchers read though it is no graph input (graph.read.is_frozen_weight). Every step
    is marked, since a later rule may drop the final cast."""
    n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    n.meta["fxlora_dequantised"] = True
    return n


def _dequantised_linear(ctx: _Ctx, before: fx.Node, x: fx.Node, weight: fx.Node, bias: Any, like: fx.Node) -> fx.Node:
    if _t(weight) is None or _t(x) is None:
        raise _Skip("no fake value")
    if _t(weight).dtype != _t(x).dtype:
        weight = _dequantised(ctx.emit(before, "call_method", "to", (weight, _t(x).dtype), grad=False))
    return ctx.emit(before, "call_function", LINEAR, (x, weight, bias), like=like)


def bnb_4bit_gemm(ctx: _Ctx, n: fx.Node) -> bool:
    """Where x needs no gradient bitsandbytes calls its fused 4-bit product directly
    (`bitsandbytes::gemm_4bit`, no autograd function): spelled `linear(x, W', b)` as above,
    W' = `dequantize_4bit` (after `dequantize_blockwise` of the absmax under double quantisation)."""
    if not (n.op == "call_function" and _bnb_op(n) and "gemm_4bit" in str(n.target)):
        return False
    names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit", "absmax_code", "absmax_offset")
    a = {k: arg(n, i, k) for i, k in enumerate(names)}
    if any(a[k] is None for k in names[:6]):
        return False
    ops = torch.ops.bitsandbytes
    absmax = a["absmax"]
    if a["absmax_8bit"] is not None:  # double quantisation: the absmax is itself 8-bit, blockwise (256)
        code = ctx.emit(n, "call_method", "to", (a["absmax_code"], _t(a["absmax_8bit"]).device), grad=False)
        absmax = ctx.emit(n, "call_function", ops.dequantize_blockwise.default,
                          (a["absmax_8bit"], a["absmax"], code, 256, torch.float32), grad=False)
        absmax = ctx.emit(n, "call_function", operator.add, (absmax, a["absmax_offset"]), grad=False)
        for m in (code, absmax.args[0], absmax):
            _dequantised(m)
    weight = _dequantised(ctx.emit(n, "call_function", ops.dequantize_4bit.default,
                                   (a["B"], absmax, a["blocksize"], a["quant_type"], a["shapeB"], torch.float32), grad=False))
    return ctx.replace(n, _dequantised_linear(ctx, n, a["A"], weight, a["bias"], n))


@dataclass(frozen=True)
class Rule:
    name: str
    comment: str
    fn: Callable[[_Ctx, fx.Node], bool]


RULES: tuple[Rule, ...] = (
    Rule("linear_4bit", "a 4-bit base's autograd function (bitsandbytes' `MatMul4Bit`, torchao's `linear_nf4`: "
         "QLoRA's base) is `linear(x, W', b)`, W' dequantised in the graph and recomputed in backward, not kept",
         linear_4bit),
    Rule("bnb_4bit_gemm", "bitsandbytes' fused `gemm_4bit` (its path when x needs no gradient) is "
         "`linear(x, W', b)`, W' dequantised in the graph", bnb_4bit_gemm),
    Rule("same_weight", "a trainable weight computed twice from the same parameters is computed once "
         "(pyreft reads its orthogonal R twice)", same_weight),
    Rule("noop", "`.to(same dtype)`, `.contiguous()` of a contiguous tensor, a same-shape view, dropout p=0 "
         "or not training, `.clone()` of a value nothing else reads or writes: the input itself", noop),
    Rule("transpose", "`.T .mT .t() torch.t transpose(0,1) permute(1,0)` of a 2-D tensor is `t(W)`; "
         "`t(t(W))` is W", transpose),
    Rule("matmul_to_linear", "`x @ M`, `matmul`, `mm`, with M 2-D: `linear(x, t(M))` "
         "(`x @ W.t()` is `linear(x, W)`)", matmul_to_linear),
    Rule("einsum_to_linear", "a projection einsum `...i,ri->...r` is `linear(x, W)`, `...i,ir->...r` is "
         "`linear(x, t(M))`", einsum_to_linear),
    Rule("bias_into_linear", "`linear(x, W) + b` with b: (out,) a tensor input is `linear(x, W, b)`", bias_into_linear),
    Rule("add_alpha", "`torch.add(y, branch, alpha=s)` is `y + branch * s` (a low-rank branch)", add_alpha),
    Rule("scalar_last", "`s * y` is `y * s` for a scalar s", scalar_last),
    Rule("div_scale", "`y / c` for a number c along a low-rank chain is `y * (1/c)`", div_scale),
    Rule("scale_out_of_linear", "`linear(y * s, W)` inside a low-rank chain is `linear(y, W) * s` "
         "(a scale on x or between A and B moves after B)", scale_out_of_linear),
    Rule("merge_scales", "`(y * s1) * s2` after a low-rank chain is `y * (s1 * s2)`", merge_scales),
    Rule("identity_product", "`B(A(eye(i))).T` (PEFT's and torchtune's DoRA) is `B @ A`, spelled `linear(B, t(A))`",
         identity_product),
    Rule("weight_side_lora", "`linear(x, W + s * B @ A, b)` (minLoRA's parametrization) is "
         "`linear(x, W, b) + linear(linear(x, A), B) * s`", weight_side_lora),
)


def normalize(gm: fx.GraphModule, recompile: bool = True) -> dict[str, int]:
    """Rewrite `gm` in place to the canonical spelling; return how often each rule fired.

    `recompile=False` leaves gm's Python code stale (the backend's rewrites recompile what they change)."""
    ctx = _Ctx(gm)
    fired: dict[str, int] = {}
    for _ in range(_MAX_SWEEPS):
        changed = False
        ctx.seen.clear()
        ctx.weight.clear()
        ctx.tainted = None
        for node in list(gm.graph.nodes):
            for rule in RULES:
                if node._erased:
                    break
                ctx.rule = rule.name
                try:
                    hit = rule.fn(ctx, node)
                except _Skip:
                    hit = False
                if hit:
                    fired[rule.name] = fired.get(rule.name, 0) + 1
                    counters["fxlora"][f"normalize.{rule.name}"] += 1
                    changed = True
                    break
        if not changed:
            break
    if fired and recompile:
        gm.graph.lint()
        gm.recompile()
    return fired


def rules_of(node: Any) -> set:
    """The normalisation rules that made `node` (empty for a node as traced)."""
    return set(node.meta.get("fxlora_rules", ())) if isinstance(node, fx.Node) else set()


def site_rules(site: Any) -> set:
    """The normalisation rules that made any node of `site` (its canonical form is its kind's)."""
    rules: set = set()
    for v in vars(site.nodes).values():
        for n in v if isinstance(v, tuple) else (v,):
            rules |= rules_of(n)
    return rules


__all__ = ["RULES", "Rule", "normalize", "rules_of", "site_rules"]
