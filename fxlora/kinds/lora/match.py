"""Find LoRA sites in a Dynamo graph by their math: `linear(x, W, b) + s * linear(linear(drop(x), A), B)`.

Matching starts from every low-rank chain `linear(linear(u, A), B)` (the shape every
LoRA-like adapter has) and then tries to *prove* the rest: the chain's input is the
base layer's input, the chain is scaled and added to that base layer's output, W is
frozen, and no intermediate escapes. A chain that fails a check becomes a `Rejection`
with the reason, so `explain` can say why a site was left alone. Names of modules
are never consulted for matching, only for the report.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxlora.graph.prove import NotASite, Rejection, check_base
from fxlora.graph.read import (
    ADD_TARGETS,
    ADDMM_TARGETS,
    DROPOUT_TARGETS,
    LINEAR_TARGETS,
    MUL_TARGETS,
    arg,
    autocast_state,
    is_call,
    is_float_cast,
    is_tensor_input,
    linear_layer,
    module_path,
    quantized_ops,
    requires_grad,
    strip_casts,
    value,
)
from fxlora.kinds.base import Match, Size, group_by_input

@dataclass
class LoraNodes:
    """The graph nodes of one LoRA site: `out = base(x) + s * B(A(dropout(cast(x))))`."""

    x: fx.Node  # the base layer's input (shared by q/k/v-style sites)
    weight: fx.Node  # frozen W: (out, in) for nn.Linear, (in, out) for GPT-2's Conv1D
    bias: Optional[fx.Node]
    base: fx.Node  # the tensor the branch is added to: W's output, or an earlier adapter's sum
    layer_out: fx.Node  # W's own output (linear, or Conv1D's viewed addmm); == base unless stacked
    lora_A: fx.Node  # (r, in)
    lora_B: fx.Node  # (out, r)
    input_casts: tuple[fx.Node, ...]  # x.to(adapter dtype) that PEFT inserts, innermost first
    dropout: Optional[fx.Node]
    xa: fx.Node  # linear(dropout(x), A)
    xab: fx.Node  # linear(xa, B)
    scaled: Optional[fx.Node]  # xab * s (None when s == 1 is implicit)
    scale: Union[float, fx.Node]
    add: fx.Node  # base + scaled: the site's output
    output_cast: Optional[fx.Node] = None  # B(A(x)) cast back to the base's dtype, before or after s (PEFT's 4-bit layers)


@dataclass
class LoraSite:
    """A proven LoRA site with everything later passes price and rewrite by."""

    index: int
    module: Optional[str]  # from Dynamo's nn_module_stack, for people only
    adapter: Optional[str]
    base_kind: str  # "linear" or "conv1d" (transposed weight, fan_in_fan_out)
    tokens: tuple[Size, ...]  # leading dims of x; tokens = their product
    in_features: Size
    out_features: Size
    rank: Size
    x_dtype: torch.dtype
    weight_dtype: torch.dtype
    adapter_dtype: torch.dtype
    compute_dtype: torch.dtype  # dtype of W's matmul output (autocast decides)
    autocast: Optional[str]  # e.g. "cpu:bfloat16" when inside an autocast region
    has_bias: bool
    bias_trainable: bool
    a_trainable: bool
    b_trainable: bool
    dropout_p: Optional[float]  # None: a runtime value (Dynamo tensorified the float)
    scaling: str  # "2.0", or the node that carries a tensor/symbolic scale
    stacked: int  # 0 for the first adapter on a base layer, 1 for the next...
    input_group: int = -1  # sites with the same x share a group id
    shared_x: int = 1  # how many sites read the same x
    nodes: LoraNodes = field(repr=False, default=None)

    kind = "lora"


def find(gm: fx.GraphModule) -> Match:
    """Match every LoRA site of `gm`; never mutates the graph."""
    graph = gm.graph
    autocast = autocast_state(graph)
    chains = [n for n in graph.nodes if _is_low_rank_chain(n)]
    # Branch outputs let a later adapter on the same layer see through an earlier one.
    branch_outputs = {_branch_output(xab): xab for xab in chains}

    sites: list[LoraSite] = []
    rejections: list[Rejection] = []
    for xab in chains:
        try:
            nodes, base_kind, stacked = _prove_site(xab, branch_outputs)
        except NotASite as why:
            rejections.append(Rejection(xab.name, module_path(xab), str(why)))
            continue
        sites.append(_describe(len(sites), nodes, base_kind, stacked, autocast.get(nodes.add)))
    rejections.extend(_unsupported_layer_adapters(graph))

    group_by_input(sites)

    adapter_weights = {n for s in sites for n in (s.nodes.lora_A, s.nodes.lora_B)}
    linears = sum(
        1
        for n in graph.nodes
        if (is_call(n, LINEAR_TARGETS) and arg(n, 1, "weight") not in adapter_weights)
        or is_call(n, ADDMM_TARGETS)
    )
    return Match(sites, rejections, linears)


# --- look-alikes on layers fxlora does not rewrite ------------------------------------

_CONV_TARGETS = (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d)
_EMBEDDING_TARGETS = (F.embedding, torch.embedding)
_MATMUL_TARGETS = (torch.matmul, operator.matmul)


def _unsupported_layer_adapters(graph: fx.Graph) -> list[Rejection]:
    """Adapters on Conv and Embedding layers (PEFT: `conv(conv(x, A), B)`, `embedding(ids, A^T) @ B^T`)
    are not rewritten; name them so explain says why, instead of staying silent."""
    found = []
    for node in graph.nodes:
        if is_call(node, _CONV_TARGETS) and is_call(node.args[0], _CONV_TARGETS) and _low_rank_pair(
            arg(node.args[0], 1, "weight"), arg(node, 1, "weight"), pointwise_outer=True
        ):
            found.append(Rejection(
                node.name, module_path(node),
                "a low-rank conv chain (LoRA on a Conv layer): fxlora only rewrites adapters on linear and "
                "Conv1D bases; kept as graph ops",
            ))
        elif (
            is_call(node, _MATMUL_TARGETS + LINEAR_TARGETS)
            and is_call(node.args[0], _EMBEDDING_TARGETS)
            # PEFT looks up rows of A^T (a trainable tensor, transposed), not a weight computed otherwise
            # (trainable tokens' W.index_copy(...) feeding a LoRA on the next layer is no Embedding LoRA)
            and _transposed_trainable(arg(node.args[0], 1, "weight"))
            and _low_rank_pair(arg(node.args[0], 1, "weight"), node.args[1], transposed_inner=True,
                               linear_outer=is_call(node, LINEAR_TARGETS))  # normalised: linear(., B)
        ):
            found.append(Rejection(
                node.name, module_path(node),
                "embedding(ids, A^T) @ B^T (LoRA on an Embedding): fxlora only rewrites adapters on linear and "
                "Conv1D bases; kept as graph ops",
            ))
    return found


def _transposed_trainable(node) -> bool:
    """`A.t()` (normalised transposes are `t`) of a trainable tensor input."""
    return (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "t"
            and is_tensor_input(node.args[0]) and requires_grad(node.args[0]))


def _low_rank_pair(inner, outer, *, pointwise_outer=False, transposed_inner=False, linear_outer=False) -> bool:
    """Inner weight maps in -> r, outer r -> out, with r below both: a plain CNN's conv(conv(x))
    or an embedding followed by a projection is not an adapter. A conv's in is its fan-in,
    in_channels/groups x kernel (the columns of A as a matrix), not its channel count."""
    A, B = value(inner), value(outer)
    if not (isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor)) or A.dim() < 2 or B.dim() < 2:
        return False
    if linear_outer:  # B as a linear's weight (out, r): read it as the matmul operand B^T
        B = B.t()
    r, n_in = (A.shape[1], A.shape[0]) if transposed_inner else (A.shape[0], A.shape[1:].numel())
    n_out = B.shape[1] if transposed_inner else B.shape[0]
    rank_in = B.shape[0] if transposed_inner else B.shape[1]
    if pointwise_outer and any(k != 1 for k in B.shape[2:]):
        return False
    return r == rank_in and _lt(r, n_in) and _lt(r, n_out)


# --- the chain --------------------------------------------------------------------


def _is_low_rank_chain(node: fx.Node) -> bool:
    """`linear(linear(u, A), B)` with A: (r, in), B: (out, r), r below both in and out."""
    if not is_call(node, LINEAR_TARGETS) or not is_call(node.args[0], LINEAR_TARGETS):
        return False
    a, b = arg(node.args[0], 1, "weight"), arg(node, 1, "weight")
    if not (is_tensor_input(a) and is_tensor_input(b)):
        return False
    A, B = value(a), value(b)
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        return False
    r = A.shape[0]
    return _lt(r, A.shape[1]) and _lt(r, B.shape[0])


def _lt(a, b) -> bool:
    try:
        return bool(a < b)
    except Exception:  # an unbacked symbolic size: cannot prove low rank
        return False


def _branch_output(xab: fx.Node) -> fx.Node:
    """The node that is added to the base: `xab * s`, or `xab` itself when unscaled."""
    users = list(xab.users)
    if len(users) == 1 and is_call(users[0], MUL_TARGETS):
        return users[0]
    return xab


def _only_user(node: fx.Node, what: str) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        names = ", ".join(u.name for u in users) or "nothing"
        raise NotASite(f"{what} ({node.name}) is used by {len(users)} nodes ({names}), not only by the adapter")
    return users[0]


def _prove_site(xab: fx.Node, branch_outputs: dict) -> tuple[LoraNodes, str, int]:
    xa = xab.args[0]
    if arg(xa, 2, "bias") is not None:
        raise NotASite("lora_A has a bias; LoRA's down-projection has none")
    if arg(xab, 2, "bias") is not None:
        raise NotASite("lora_B has a bias (PEFT lora_bias=True); not supported yet")
    _only_user(xa, "A(x)")
    lora_A, lora_B = arg(xa, 1, "weight"), arg(xab, 1, "weight")

    # Input side: optional dropout, then optional casts back to the tensor the base layer reads.
    u = xa.args[0]
    dropout = None
    # A dropout only the adapter reads is the adapter's own; one the base reads too is part of x.
    if is_call(u, DROPOUT_TARGETS) and len(u.users) == 1:
        dropout = u
        if arg(dropout, 3, "inplace", False):
            raise NotASite("the adapter's dropout is in-place")
        u = dropout.args[0]
    elif isinstance(u, fx.Node) and u.op == "call_module":
        raise NotASite(f"the adapter input goes through a module call ({u.target}) fxlora cannot see into")
    adapter_input, casts = strip_casts(u)

    # Output side: optional scale, then the add onto the base layer's output.
    scale: Union[float, fx.Node] = 1.0
    scaled = None
    branch = xab  # the node the add reads: B(A(x)), scaled and/or cast back
    out = _only_user(xab, "B(A(x))")
    output_cast = None
    if is_float_cast(out):  # PEFT's bnb layers: B(A(x)) in the adapter's dtype, cast back before the scale
        output_cast = branch = out
        out = _only_user(output_cast, "B(A(x)) cast back")
    if is_call(out, MUL_TARGETS):
        scale = _scalar_operand(out, branch)
        scaled = branch = out
        out = _only_user(scaled, "s * B(A(x))")
    if output_cast is None and is_float_cast(out):  # or after the scale (peft 0.21's bnb layers)
        output_cast = branch = out
        out = _only_user(output_cast, "s * B(A(x)) cast back")
    if not is_call(out, ADD_TARGETS) or len(out.args) != 2 or out.kwargs:
        raise NotASite(
            f"B(A(x)) flows into {_op_name(out)} instead of `base(x) + s * B(A(x))` "
            "(DoRA's magnitude scaling and other variants look like this)"
        )
    add = out
    base = add.args[1] if add.args[0] is branch else add.args[0]

    root, stacked = base, 0
    while is_call(root, ADD_TARGETS) and any(a in branch_outputs for a in root.args):
        other = [a for a in root.args if a not in branch_outputs]
        if len(other) != 1:
            break
        _only_user(root, "an earlier adapter's sum")
        root, stacked = other[0], stacked + 1
    x, weight, bias, base_kind = _base_layer(root)
    if stacked == 0:
        _only_user(base, "the base layer's output W x")

    if adapter_input is not x and x in casts:  # x is itself a cast (diffusers' attention output): stop there
        casts = casts[: casts.index(x)]
        adapter_input = x
    if adapter_input is not x:
        raise NotASite(
            f"the adapter reads {adapter_input.name if isinstance(adapter_input, fx.Node) else adapter_input!r}, "
            f"the base layer reads {x.name}: not the same input"
        )
    check_base(weight)
    if isinstance(value(x), torch.Tensor) and value(x).dim() < 1:
        raise NotASite("x has no feature dimension")

    nodes = LoraNodes(
        x=x, weight=weight, bias=bias, base=base, layer_out=root, lora_A=lora_A, lora_B=lora_B,
        input_casts=tuple(reversed(casts)), dropout=dropout, xa=xa, xab=xab,
        scaled=scaled, scale=scale, add=add, output_cast=output_cast,
    )
    return nodes, base_kind, stacked


def _scalar_operand(mul: fx.Node, xab: fx.Node) -> Union[float, fx.Node]:
    if len(mul.args) != 2:
        raise NotASite(f"{mul.name} is not a binary multiply")
    s = mul.args[1] if mul.args[0] is xab else mul.args[0]
    if isinstance(s, numbers.Number) and not isinstance(s, bool):
        return float(s)
    v = value(s)
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        return s
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        if requires_grad(s):
            raise NotASite("the scale is a trainable tensor; fxlora needs a constant scale")
        return s
    shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(s).__name__
    per_output = isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == value(xab).shape[-1] and v.numel() == v.shape[-1]
    hint = " (a per-output vector: DoRA's magnitude / ||W + s BA|| looks like this, in a spelling the DoRA kind did not match)" if per_output else ""
    raise NotASite(f"B(A(x)) is multiplied by {shape}, not by a scalar scale{hint}")


def _base_layer(node) -> tuple[fx.Node, fx.Node, Optional[fx.Node], str]:
    """`linear(x, W, b)` or GPT-2's Conv1D `addmm(b, x.view(-1, in), W).view(...)`: (x, W, b, kind)."""
    layer = linear_layer(node)
    if layer is None:
        raise NotASite(f"the adapter is added to {_op_name(node)}, not to a linear layer's output ({_base_hint(node)})")
    return layer[:4]


def _base_hint(node) -> str:
    """Why the base was not read: a quantised base fxlora does not know is named as one."""
    ops = quantized_ops(node)
    if any("gemv_4bit" in op for op in ops):
        return ("a bitsandbytes 4-bit weight packed for CPU inference: bitsandbytes repacks it the first time the "
                "layer runs in eval mode without gradients; call model.train() before the first forward")
    if ops:
        return (f"a quantised base fxlora does not read: {', '.join(sorted(ops))}; only bitsandbytes 4-bit "
                "(nf4/fp4, MatMul4Bit or gemm_4bit) bases are matched")
    return "custom bases are not matched"


def _op_name(node) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "output":
        return "the graph's output"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} = {node.op} {target}"


# --- description --------------------------------------------------------------------


def _describe(index: int, nodes: LoraNodes, base_kind: str, stacked: int, autocast) -> LoraSite:
    x, W, A = value(nodes.x), value(nodes.weight), value(nodes.lora_A)
    B, base_out = value(nodes.lora_B), value(nodes.layer_out)
    out_features = W.shape[0] if base_kind == "linear" else W.shape[1]
    site_module = module_path(nodes.add)
    a_module = module_path(nodes.xa) or ""
    adapter = None
    if site_module and a_module.startswith(site_module + "."):
        parts = a_module[len(site_module) + 1 :].split(".")
        adapter = parts[-1] if len(parts) >= 2 else None
    if isinstance(nodes.scale, fx.Node):
        v = value(nodes.scale)
        scaling = f"{nodes.scale.name} ({type(v).__name__})"
    else:
        scaling = repr(nodes.scale)
    p: Optional[float] = 0.0
    if nodes.dropout is not None and arg(nodes.dropout, 2, "training", True):
        p = arg(nodes.dropout, 1, "p", 0.5)
        # Under dynamic=True Dynamo may turn p into a tensor input read with .item(): known at run time only.
        p = float(p) if isinstance(p, numbers.Number) else None
    return LoraSite(
        index=index,
        module=site_module,
        adapter=adapter,
        base_kind=base_kind,
        tokens=tuple(x.shape[:-1]),
        in_features=x.shape[-1],
        out_features=out_features,
        rank=A.shape[0],
        x_dtype=x.dtype,
        weight_dtype=W.dtype,
        adapter_dtype=B.dtype,
        compute_dtype=base_out.dtype,
        autocast=autocast,
        has_bias=nodes.bias is not None,
        bias_trainable=nodes.bias is not None and requires_grad(nodes.bias),
        a_trainable=requires_grad(nodes.lora_A),
        b_trainable=requires_grad(nodes.lora_B),
        dropout_p=p,
        scaling=scaling,
        stacked=stacked,
        nodes=nodes,
    )
