"""Small, pure helpers for reading a Dynamo FX graph: what an op is, its fake value, its module path.

Nothing here mutates a graph; the passes build on these to say what a node *computes*.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
ADD_TARGETS = (operator.add, torch.add, operator.iadd)
MUL_TARGETS = (operator.mul, torch.mul, operator.imul)
DROPOUT_TARGETS = (F.dropout, torch.dropout, torch.nn.functional.dropout)
ADDMM_TARGETS = (torch.addmm,)
VIEW_METHODS = ("view", "reshape")
CAST_METHODS = ("to", "float", "half", "bfloat16", "type")


def value(node: Any) -> Any:
    """The fake value Dynamo recorded for `node` (a FakeTensor, SymInt, ...), or the constant itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def is_call(node: Any, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_tensor_input(node: Any) -> bool:
    """A graph input or attribute: where parameters and buffers enter a Dynamo graph."""
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") and isinstance(
        value(node), torch.Tensor
    )


def requires_grad(node: Any) -> bool:
    v = value(node)
    return bool(getattr(v, "requires_grad", False))


def is_float_cast(node: Any) -> bool:
    """`x.to(dtype)`, `x.float()`...: a cast to a floating dtype that keeps shape and device."""
    if not is_method(node, CAST_METHODS):
        return False
    src, out = value(node.args[0]), value(node)
    return (
        isinstance(src, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and out.dtype.is_floating_point
        and src.shape == out.shape
        and src.device == out.device
    )


def strip_casts(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Follow float casts back to the tensor they convert; return it and the casts passed."""
    casts = []
    while is_float_cast(node):
        casts.append(node)
        node = node.args[0]
    return node, casts


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The argument at `index` or keyword `name` (Dynamo keeps whichever the user wrote)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_MODULE_KEY = re.compile(r"(?:\.__dict__\['_modules'\]|\._modules)\['([^']+)'\]")


def module_path(node: fx.Node) -> Optional[str]:
    """Dotted path of the innermost module that produced `node`, from Dynamo's nn_module_stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    raw, _cls = list(stack.values())[-1]
    path = _MODULE_KEY.sub(r".\1", raw)
    path = re.sub(r"^L\['\w+'\]\.?", "", path)  # the traced root: L['self'], L['fn'], ...
    return path.lstrip(".") or None


def describe_size(size) -> str:
    """A shape entry as text: an int, or the sympy expression of a symbolic size."""
    if isinstance(size, torch.SymInt):
        return str(size.node.expr)
    return str(int(size))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_frozen_weight(node: Any) -> bool:
    """A weight a layer reads: a graph input, or one normalisation dequantised from frozen
    quantised inputs (`meta["fxlora_dequantised"]`: QLoRA's 4-bit base)."""
    return is_tensor_input(node) or isinstance(node, fx.Node) and node.meta.get("fxlora_dequantised", False)


_QUANT_NAMESPACES = ("bitsandbytes", "torchao", "gptq", "awq", "hqq", "quanto", "fbgemm", "marlin", "exllama")


def quantized_ops(node: Any, depth: int = 3) -> set:
    """Names of quantisation ops (by their op namespace) that compute `node`, looking `depth`
    nodes up and into autograd-function bodies: how explain names a quantised base it cannot read."""
    found: set = set()
    stack = [(node, 0)]
    seen: set = set()
    while stack:
        n, d = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or d > depth:
            continue
        seen.add(n)
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
            if n.target.namespace.lower() in _QUANT_NAMESPACES:
                found.add(n.target.name())
        if n.op == "get_attr" and n.graph.owning_module is not None:
            body = getattr(n.graph.owning_module, str(n.target), None)
            if isinstance(body, fx.GraphModule):
                stack.extend((m, d) for m in body.graph.nodes if m.op == "call_function")
        stack.extend((m, d + 1) for m in n.all_input_nodes)
    return found


def linear_layer(node: Any) -> Optional[tuple[fx.Node, fx.Node, Optional[fx.Node], str, tuple[fx.Node, ...]]]:
    """If `node` is a frozen-or-not linear layer's output, (x, W, b, kind, own nodes), else None.

    kind "linear": `linear(x, W, b)`; "conv1d": GPT-2's `addmm(b, x.view(-1, in), W).view(...)`.
    own nodes: the layer's nodes besides `node` (the addmm and the flattening view), innermost last.
    """
    if is_call(node, LINEAR_TARGETS):
        x, weight, bias = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        if is_frozen_weight(weight) and (bias is None or is_tensor_input(bias)):
            return x, weight, bias, "linear", ()
        return None
    if is_method(node, VIEW_METHODS) and is_call(node.args[0], ADDMM_TARGETS):
        mm = node.args[0]
        if mm.kwargs or len(mm.args) != 3 or len(mm.users) != 1:
            return None
        bias, flat, weight = mm.args
        if not (is_method(flat, VIEW_METHODS) and is_tensor_input(weight) and is_tensor_input(bias)):
            return None
        if value(bias).dim() != 1 or len(flat.users) != 1:
            return None
        x = flat.args[0]
        xv, ov = value(x), value(node)
        if xv.shape[:-1] == ov.shape[:-1] and xv.shape[-1] == value(weight).shape[0]:
            return x, weight, bias, "conv1d", (mm, flat)
    return None


def autocast_state(graph: fx.Graph) -> dict[fx.Node, str]:
    """Which nodes run inside `torch.autocast(...)`, as 'device:dtype': the region the graph
    opens, or the one the compiled call itself runs in (Dynamo traces under the caller's state)."""
    ambient = [
        f"{d}:{str(torch.get_autocast_dtype(d)).removeprefix('torch.')}"
        for d in ("cuda", "cpu")
        if torch.is_autocast_enabled(d)
    ]
    state, stack = {}, ambient[:1]
    for node in graph.nodes:
        target = getattr(node.target, "__name__", "")
        if node.op == "call_function" and target == "_enter_autocast":
            device, dtype, enabled = (list(node.args) + [None, None, True])[:3]
            if dtype is None and isinstance(device, str):
                dtype = torch.get_autocast_dtype(device)
            stack.append(f"{device}:{str(dtype).removeprefix('torch.')}" if enabled else None)
        elif node.op == "call_function" and target == "_exit_autocast":
            if stack:
                stack.pop()
        elif stack and stack[-1]:
            state[node] = stack[-1]
    return state


# Producers of x that Inductor's partitioner can rebuild from tensors saved anyway (with
# fxlora's rematerialize): norms and pointwise activations, seen through views and casts.
REBUILDABLE = (F.layer_norm, F.rms_norm, F.silu, F.gelu, F.relu, torch.tanh, operator.mul, torch.mul)


def rebuildable(x: fx.Node) -> bool:
    """Whether x is a norm or pointwise output that the partitioner may recompute in backward."""
    node, _ = strip_casts(x)
    while is_method(node, VIEW_METHODS):
        node, _ = strip_casts(node.args[0])
    return is_call(node, REBUILDABLE)


def needs_grad(node: Any) -> bool:
    """Whether `node` requires grad, True when its value is unknown (assume a gradient flows)."""
    return bool(getattr(value(node), "requires_grad", True))


def ancestors(node: fx.Node) -> set[fx.Node]:
    """`node` and every node it is computed from."""
    seen, stack = set(), [node]
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(m.all_input_nodes)
    return seen


_SOURCE_ROOT = re.compile(r"^[LG]\['([^']+)'\]")
_SOURCE_KEY = re.compile(
    r"(?:\.__dict__\['_(?:modules|parameters|buffers)'\]|\._(?:modules|parameters|buffers))\['([^']+)'\]")


def source_path(name: str) -> str:
    """A Dynamo source name as a dotted path from the traced frame's `self`
    (`L['self']._modules['q_proj']._parameters['weight']` -> `q_proj.weight`); another local
    keeps its name (`L['lora_A']._parameters['weight']` -> `lora_A.weight`)."""
    root = _SOURCE_ROOT.match(name)
    path = _SOURCE_KEY.sub(r".\1", name[root.end():] if root else name)
    if root and root.group(1) != "self":
        path = root.group(1) + path
    return path.lstrip(".")


def _source_name(node: fx.Node) -> Optional[str]:
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return source_path(name) if isinstance(name, str) else None


def input_name(node: Any) -> str:
    """A graph input as people know it (`lora_A.default.weight`), else the node's name."""
    if isinstance(node, fx.Node):
        return (_source_name(node) if node.op == "placeholder" else None) or node.name
    return repr(node)


def parameter_inputs(gm: fx.GraphModule) -> list[tuple[str, torch.nn.Parameter]]:
    """(path from the frame's `self`, the real parameter) for every parameter the graph reads:
    lifted to a placeholder (Dynamo's GraphArg keeps its source and value) or an attribute."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        try:
            real = grapharg.example if grapharg is not None else None
        except Exception:  # noqa: BLE001 - a value Dynamo no longer holds
            real = None
        if isinstance(real, torch.nn.Parameter):
            found.append((_source_name(node) or node.name, real))
    found += [(name, p) for name, p in gm.named_parameters()]
    return found


def scale_tensor_source(scale) -> Optional[fx.Node]:
    """A tensor node carrying the scale: a 1-element tensor, or the tensor a SymFloat was `.item()`ed from."""
    if not isinstance(scale, fx.Node):
        return None
    v = value(scale)
    if isinstance(v, torch.Tensor):
        return scale
    if scale.op == "call_method" and scale.target == "item":
        return scale.args[0]
    return None


def previous_output(node: fx.Node, op: Any, index: int) -> Optional[fx.Node]:
    """The last `op(...)[index]` before `node` in the graph, if any: the mask record of the previous
    rewritten site that drew one (sites chain their draws so they run in program order)."""
    cursor = node.prev
    while cursor.op != "root":
        if cursor.op == "call_function" and cursor.target is operator.getitem and cursor.args[1] == index and \
                getattr(cursor.args[0], "target", None) is op:
            return cursor
        cursor = cursor.prev
    return None
