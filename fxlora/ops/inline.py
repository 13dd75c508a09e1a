"""Inductor compiles what runs inside fxlora's ops: a post-grad pass that inlines each op's body.

fxlora's ops keep their boundary through AOTAutograd: what an op's forward returns is what the
partitioner can save, so the op (not the min-cut) decides the saved bytes and the GEMM order of
backward. Once the joint graph is partitioned that boundary has done its job. Left opaque, each
op's body would run as eager ATen calls issued from Python (one kernel launch each on a GPU),
with its masks, casts, scales and rank-r epilogues unfused. This pass runs first among
Inductor's post-grad passes (`post_grad_custom_pre_pass`, once on the forward graph and once
on the backward graph): it traces each op's body over the node's fake values, functionalised
and decomposed as Inductor decomposes everything else (`make_fx` with `select_decomp_table`,
as `pattern_matcher.fwd_only` traces a replacement), and splices the trace in place of the
node (`Graph.graph_copy`). Inductor then lowers and fuses those ATen ops with their neighbours.

An op is inlined only where its body is a pure function of its inputs. Bodies that read
state the trace cannot see (eager's dropout masks: an RNG state drawn from or set in Python;
a mask record packed in forward; sparse layouts) say so through the op's `inline_check`, and
stay opaque (the eager body runs, as under `inner="aot_eager"`); a body that still fails to
trace, or whose trace holds a constant, stays opaque with the error as its reason. Either way
the result is exact: the inlined trace computes what the eager body computes.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.operator_schemas import normalize_function
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from fxlora.ops._common import is_fxlora_op

log = logging.getLogger("fxlora")

# op name ("fxlora::lora_linear") -> why_not(*args, **kwargs): a reason the body must stay opaque, or None
_CHECKS: dict[str, Callable[..., Optional[str]]] = {}


def inline_check(qualname: str) -> Callable:
    """Register why an op's body cannot be inlined (None: it can); it is called with every argument by name."""

    def register(why_not: Callable[..., Optional[str]]) -> Callable[..., Optional[str]]:
        _CHECKS[qualname] = why_not
        return why_not

    return register


def pure(**_) -> None:
    """The check of an op whose body is always a pure function of its inputs."""
    return None


@dataclasses.dataclass
class InlineResult:
    """What one pass over one graph did: op name -> count inlined, and (op, reason) left opaque."""

    inlined: dict[str, int] = dataclasses.field(default_factory=dict)
    opaque: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def op_body(op: Any) -> Callable:
    """The Python function `torch.library.custom_op` wrapped: the op's eager body. `op`: its
    qualified name ("fxlora::lora_linear") or an overload (`torch.ops.fxlora.lora_linear.default`)."""
    return torch._library.custom_ops.OPDEFS[op if isinstance(op, str) else _qualname(op)]._init_fn


def _qualname(op: torch._ops.OpOverload) -> str:
    """The op's qualified name: "fxlora::lora_linear" for `torch.ops.fxlora.lora_linear.default`."""
    return op.name().split(".")[0]


def inline_ops(graph: fx.Graph) -> InlineResult:
    """Replace every fxlora op node of `graph` whose body traces by that trace; return what it did."""
    result = InlineResult()
    for node in [n for n in graph.nodes if is_fxlora_op(n)]:
        name = _qualname(node.target)
        why = why_not_inline(node)
        if why is None:
            try:
                _inline(graph, node, name)
                result.inlined[name] = result.inlined.get(name, 0) + 1
                continue
            except Exception as err:  # noqa: BLE001 - an op that does not trace runs its eager body
                why = f"its body does not trace ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        result.opaque.append((name, why))
        log.debug("fxlora: %s left opaque: %s", name, why)
    return result


def why_not_inline(node: fx.Node) -> Optional[str]:
    """Why this fxlora op's body is not a pure function of its inputs (None: it is; it may be traced, or
    run again with the same result, e.g. recomputed in backward)."""
    name = _qualname(node.target)
    if name not in _CHECKS:
        return "no inline check registered"
    args, kwargs = pytree.tree_map_only(fx.Node, lambda n: n.meta.get("val"), (node.args, node.kwargs))
    named = normalize_function(node.target, args, kwargs, normalize_to_only_use_kwargs=True)
    return _CHECKS[name](**named.kwargs)


def _inline(graph: fx.Graph, node: fx.Node, name: str) -> None:
    from torch._inductor.pattern_matcher import fwd_only
    from torch._inductor.virtualized import V

    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    at = [k for k, leaf in enumerate(flat) if isinstance(leaf, fx.Node)]
    fakes = [flat[k].meta["val"] for k in at]
    body = op_body(name)

    def traced(*tensors):
        leaves = list(flat)
        for k, t in zip(at, tensors):
            leaves[k] = t
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        return body(*args, **kwargs)

    functional = torch.func.functionalize(traced, remove="mutations")
    with V.fake_mode:
        sub = fwd_only(functional, fakes)
    if any(n.op == "get_attr" for n in sub.graph.nodes):
        raise ValueError("the trace holds a constant tensor (state the body reads outside its inputs)")
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(node):
        outputs = graph.graph_copy(sub.graph, {p: flat[k] for p, k in zip(placeholders, at)})
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    for user in list(node.users):
        # Users are `getitem(op, k)` (ops return tuples or lists of tensors).
        assert user.target.__name__ == "getitem", user
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)


@functools.lru_cache(1)
def _ops_hash() -> bytes:
    """The ops' source: what their inlined bodies are (Inductor's FX graph cache keys on it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return get_hash_for_files(tuple(sorted(glob.glob(os.path.join(here, "*.py")))))


class InlineOpsPass(CustomGraphPass):
    """`inline_ops` as an Inductor post-grad pass; `results` gathers what each graph's run did."""

    def __init__(self, results: list) -> None:
        self.results = results  # the report's list: AOTAutograd may compile backward after the report is out

    def __call__(self, graph: fx.Graph) -> None:
        self.results.append(inline_ops(graph))

    def uuid(self) -> Any:
        return _ops_hash()
