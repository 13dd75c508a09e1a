"""Replace each proven IA3 / VeRA site by `fxlora::ia3_linear` / `fxlora::vera_linear` in the
form fxlora/cost_scaling.py chose. The site's own nodes (base layer, products, the vector's
flatten chain) become dead and are erased; nodes read outside the site never are.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch
import torch.fx as fx

from fxlora import cost_scaling as cost
from fxlora.config import Config
from fxlora.graph_utils import is_method, size_decider, size_expr, strip_casts, value
from fxlora.ops import ia3 as _ia3_ops, vera as _vera_ops  # noqa: F401  (register torch.ops.fxlora.*)
from fxlora.sites import ScalingMatch, ScalingSite

# Producers of x that Inductor's partitioner can rebuild from tensors saved anyway (with
# fxlora's rematerialize): norms and pointwise activations, seen through views and casts.
_REBUILDABLE = {torch.nn.functional.layer_norm, torch.nn.functional.rms_norm, torch.nn.functional.silu,
                torch.nn.functional.gelu, torch.nn.functional.relu, torch.tanh, operator.mul, torch.mul}


@dataclass
class ScalingDecision:
    """What happened to one IA3/VeRA site: priced candidates, the form chosen (or why none)."""

    site: int
    kind: str
    shape: Optional[cost.ScalingShape]
    candidates: list = field(default_factory=list)
    chosen: Optional[object] = None  # cost.PricedForm
    peft_saved_bytes: Optional[sympy.Expr] = None
    reason: str = ""

    @property
    def rewritten(self) -> bool:
        return self.chosen is not None


def rewrite_scaling_sites(gm: fx.GraphModule, match: ScalingMatch, config: Config) -> list[ScalingDecision]:
    decide = size_decider(gm)
    decisions = []
    for site in match.sites:
        why_not = _why_not_rewritable(site)
        if why_not:
            decisions.append(ScalingDecision(site.index, site.kind, None, reason=why_not))
            continue
        shape = site_shape(site, x_rebuilt=config.inner == "inductor" and config.rematerialize and _rebuildable(site.nodes.x))
        priced = cost.price(shape)
        chosen, why = cost.choose(priced, objective=config.objective, decide=decide, forced=config.scaling_form)
        d = ScalingDecision(site.index, site.kind, shape, priced, None, cost.peft_saved_bytes(shape).subs(cost.sizes(shape)), why)
        if config.rewrite:
            _replace(gm.graph, site, chosen.form.name)
            d.chosen = chosen
        else:
            d.reason = f"rewrite=False (would choose {chosen.form.name}: {why})"
        decisions.append(d)
    if any(d.rewritten for d in decisions):
        gm.graph.lint()
        gm.recompile()
    return decisions


def site_shape(site: ScalingSite, x_rebuilt: bool = False) -> cost.ScalingShape:
    tokens = sympy.Integer(1)
    for d in site.tokens:
        tokens *= size_expr(d)
    n = site.nodes
    mixed = len({site.compute_dtype, site.vector_dtype, site.out_dtype, site.weight_dtype, site.x_dtype}) > 1
    return cost.ScalingShape(
        kind=site.kind,
        tokens=tokens,
        in_features=size_expr(site.in_features),
        out_features=size_expr(site.out_features),
        rank=size_expr(site.rank) if site.rank is not None else sympy.Integer(0),
        x_bytes=site.x_dtype.itemsize,
        compute_bytes=site.compute_dtype.itemsize,
        shared_x=site.shared_x,
        x_needs_grad=bool(getattr(value(n.x), "requires_grad", True)),
        has_bias=site.has_bias,
        mixed_dtypes=mixed,
        train_d=site.kind != "vera" or "lambda_d" in site.trainable,
        train_b=site.kind != "vera" or "lambda_b" in site.trainable,
        x_rebuilt=x_rebuilt,
    )


def _rebuildable(x: fx.Node) -> bool:
    node, _ = strip_casts(x)
    while is_method(node, ("view", "reshape")):
        node, _ = strip_casts(node.args[0])
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in _REBUILDABLE


def _why_not_rewritable(site: ScalingSite) -> str:
    if value(site.nodes.x).device.type not in ("cpu", "cuda"):
        return f"device {value(site.nodes.x).device.type} is not supported"
    if site.kind == "vera":
        expected = torch.promote_types(site.compute_dtype, torch.promote_types(site.vector_dtype, site.compute_dtype))
    elif site.kind == "ia3_out":
        expected = torch.promote_types(site.compute_dtype, site.vector_dtype)
    else:
        expected = site.compute_dtype
    if site.out_dtype != expected:
        return f"dtype flow not understood (output is {site.out_dtype}, expected {expected})"
    return ""


def _replace(graph: fx.Graph, site: ScalingSite, form: str) -> None:
    n = site.nodes
    conv1d = site.base_kind == "conv1d"
    with graph.inserting_before(n.out):
        if site.kind == "vera":
            lambda_d, lambda_b = (_flat(graph, v) for v in n.vector_values)
            op = graph.call_function(
                torch.ops.fxlora.vera_linear.default,
                (n.x, n.weight, n.bias, *n.frozen, lambda_d, lambda_b, form, site.compute_dtype, site.out_dtype, conv1d),
            )
        else:
            op = graph.call_function(
                torch.ops.fxlora.ia3_linear.default,
                (n.x, n.weight, n.bias, n.vectors[0], site.kind == "ia3_in", form, site.compute_dtype,
                 site.vector_dtype, site.out_dtype, conv1d),
            )
        y = graph.call_function(operator.getitem, (op, 0))
    y.meta.update({k: v for k, v in n.out.meta.items() if k != "example_value"})
    y.meta["example_value"] = value(n.out)
    n.out.replace_all_uses_with(y)
    for node in n.internal:
        if isinstance(node, fx.Node) and not node.users:
            graph.erase_node(node)


def _flat(graph: fx.Graph, vec: fx.Node) -> fx.Node:
    """VeRA's lambdas as the op wants them: 1-d. PEFT's are already (r,) and (out,)."""
    return vec if value(vec).dim() == 1 else graph.call_method("reshape", (vec, (-1,)))


__all__ = ["ScalingDecision", "rewrite_scaling_sites", "site_shape"]
