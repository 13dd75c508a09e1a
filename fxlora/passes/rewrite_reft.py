"""Price each ReFT site (fxlora/cost_reft.py) and, where the weight form wins, rewrite it
into plain torch ops that autograd differentiates exactly:

    y = linear(x, W + R^T (U W), b + R^T (U b + b_L))      U = W_L - R (LoReFT) or W_1 (DiReFT)

The act form is the traced chain itself: choosing it leaves the graph as it is. Decisions are
`ScalingDecision`s so explain and the backend read them like IA3/VeRA's.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlora import cost_reft as cost
from fxlora.config import Config
from fxlora.cost_scaling import choose
from fxlora.graph_utils import size_decider, size_expr, value
from fxlora.passes.rewrite_scaling import ScalingDecision, _rebuildable
from fxlora.sites import ScalingMatch, ScalingSite


class ReftDecision(ScalingDecision):
    """A ScalingDecision whose act form is 'leave the traced chain': rewritten only for weight."""

    @property
    def rewritten(self) -> bool:
        return self.chosen is not None and self.chosen.form.name != "act"


def rewrite_reft_sites(gm: fx.GraphModule, match: ScalingMatch, config: Config) -> list[ScalingDecision]:
    decide = size_decider(gm)
    decisions = []
    for site in match.sites:
        why_not = _why_not_rewritable(site)
        if why_not:
            decisions.append(ReftDecision(site.index, site.kind, None, reason=why_not))
            continue
        shape = site_shape(site, x_rebuilt=config.inner == "inductor" and config.rematerialize and _rebuildable(site.nodes.x))
        priced = cost.price(shape)
        forced = config.scaling_form if config.scaling_form in ("act", "weight") else None
        chosen, why = choose(priced, objective=config.objective, decide=decide, forced=forced)
        d = ReftDecision(site.index, site.kind, shape, priced, None, cost.peft_saved_bytes(shape).subs(cost.sizes(shape)), why)
        if not config.rewrite:
            d.reason = f"rewrite=False (would choose {chosen.form.name}: {why})"
        else:
            d.chosen = chosen
            if chosen.form.name == "weight":
                _replace(gm.graph, site)
            else:
                d.reason = why + " (act: the traced chain is kept as it is)"
        decisions.append(d)
    if any(d.rewritten for d in decisions):
        gm.graph.lint()
        gm.recompile()
    return decisions


def site_shape(site: ScalingSite, x_rebuilt: bool = False) -> cost.ReftShape:
    import sympy

    tokens = sympy.Integer(1)
    for t in site.tokens:
        tokens *= size_expr(t)
    return cost.ReftShape(
        kind=site.kind,
        tokens=tokens,
        in_features=size_expr(site.in_features),
        out_features=size_expr(site.out_features),
        rank=size_expr(site.rank),
        x_bytes=site.x_dtype.itemsize,
        compute_bytes=site.compute_dtype.itemsize,
        x_needs_grad=bool(getattr(value(site.nodes.x), "requires_grad", True)),
        has_bias=site.has_bias,
        x_rebuilt=x_rebuilt,
        low_precision=site.weight_dtype.itemsize < 4,
    )


def _why_not_rewritable(site: ScalingSite) -> str:
    n = site.nodes
    if n.positions:
        return (f"position-restricted intervention (reads {n.read.name}, a slice of h): folding it into W "
                "would apply it to every position; left as traced")
    dtypes = {site.x_dtype, site.weight_dtype, site.vector_dtype, site.compute_dtype, site.out_dtype, value(n.Rt).dtype}
    if len(dtypes) > 1 or site.autocast:
        return "mixed dtypes or autocast: folding the intervention into W would change the rounding"
    if value(n.x).device.type not in ("cpu", "cuda"):
        return f"device {value(n.x).device.type} is not supported"
    return ""


def _replace(graph: fx.Graph, site: ScalingSite) -> None:
    n = site.nodes
    mm = torch.matmul
    with graph.inserting_before(n.out):
        Rt = n.Rt  # (d, r), as the matched graph holds it
        U = graph.call_function(operator.sub, (n.W_L, n.R)) if site.kind == "loreft" else n.W_L
        W2 = graph.call_function(operator.add, (n.weight, graph.call_function(mm, (Rt, graph.call_function(mm, (U, n.weight))))))
        inner = graph.call_function(mm, (U, n.bias)) if n.bias is not None else None
        if n.b_L is not None:
            inner = n.b_L if inner is None else graph.call_function(operator.add, (inner, n.b_L))
        c = graph.call_function(mm, (Rt, inner)) if inner is not None else None
        if n.bias is not None:
            c = graph.call_function(operator.add, (n.bias, c))
        y = graph.call_function(torch._C._nn.linear, (n.x, W2, c))
    _fake_values(graph, n.out, y, value(n.x))
    y.meta.update({k: v for k, v in n.out.meta.items() if k != "example_value"})
    y.meta["example_value"] = value(n.out)
    n.out.replace_all_uses_with(y)
    for node in n.internal:
        if not node.users:
            graph.erase_node(node)


def _fake_values(graph: fx.Graph, start: fx.Node, stop: fx.Node, example) -> None:
    """Give the nodes inserted before `start` (up to `stop`) their fake values (passes/README.md)."""
    fake_mode = getattr(example, "fake_mode", None)  # the mode Dynamo's example values live in
    if fake_mode is None:
        return
    new, node = [], stop
    while node is not start and node.op == "call_function" or node.op == "call_method":
        if node.meta.get("example_value") is not None:
            break
        new.append(node)
        node = node.prev
    try:
        with fake_mode:
            for node in reversed(new):
                args = fx.node.map_arg(node.args, value)
                fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
                node.meta["example_value"] = fn(*(args[1:] if node.op == "call_method" else args))
    except Exception:  # a nicety for later passes, never a reason to drop the rewrite
        for node in new:
            node.meta.pop("example_value", None)


__all__ = ["ReftDecision", "rewrite_reft_sites", "site_shape"]
