"""Replace each proven LoRA site by `fxlora::lora_linear` in the form the cost model chose.

The op computes `base(x) + s * B(A(drop(x)))` itself, so the site's own nodes (the base
linear, dropout, casts, both adapter linears, the scale and the add) become dead and are
erased. PEFT's `x.to(adapter dtype)` copy disappears with them: the op reads x as it is.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch
import torch.fx as fx

from fxlora import cost
from fxlora.config import Config
from fxlora.graph_utils import size_decider, size_expr, value
from fxlora.ops import lora as lora_ops  # noqa: F401  (registers torch.ops.fxlora.*)
from fxlora.passes import rewrite_velora
from fxlora.sites import LoraMatch, LoraSite

log = logging.getLogger("fxlora")


@dataclass
class Decision:
    """What happened to one site: its priced candidates, the form chosen (or why none), and why."""

    site: int
    shape: Optional[cost.SiteShape]
    candidates: list[cost.PricedForm] = field(default_factory=list)
    chosen: Optional[cost.PricedForm] = None
    peft_saved_bytes: Optional[sympy.Expr] = None
    reason: str = ""

    @property
    def rewritten(self) -> bool:
        return self.chosen is not None


def rewrite_lora_sites(gm: fx.GraphModule, match: LoraMatch, config: Config) -> list[Decision]:
    """Price every site, rewrite the legal ones in place; returns one Decision per site."""
    decide = size_decider(gm)
    decisions = []
    last_draw: Optional[fx.Node] = None  # RNG output of the previous dropout site: masks drawn in program order
    for site in match.sites:
        why_not = _why_not_rewritable(site, config)
        if why_not:
            decisions.append(Decision(site.index, None, reason=why_not))
            continue
        shape = site_shape(site)
        priced = cost.price(shape)
        chosen, why = cost.choose_form(
            priced, objective=config.objective, flop_budget=config.flop_budget,
            decide=decide, forced=config.forced_form(),
        )
        lossy, v, note = rewrite_velora.plan(site, shape, config)  # opt-in `compress` only
        if lossy is not None:
            chosen, why, priced = lossy, note, [*priced, lossy]
        elif note:
            why = f"{why}; {note}"
        decision = Decision(site.index, shape, priced, None, cost.peft_saved_bytes(shape).subs(_sizes(shape)), why)
        if config.rewrite:
            if lossy is not None:
                rewrite_velora.replace_site(gm, site, v)
            else:
                last_draw = _replace_site(gm.graph, site, chosen.form, last_draw)
            decision.chosen = chosen
        else:
            decision.reason = f"rewrite=False (would choose {chosen.form.name}: {why})"
        decisions.append(decision)
    if any(d.rewritten for d in decisions):
        gm.graph.lint()
        gm.recompile()
    return decisions


def site_shape(site: LoraSite) -> cost.SiteShape:
    tokens = sympy.Integer(1)
    for d in site.tokens:
        tokens *= size_expr(d)
    adapter_dtype = value(site.nodes.xab).dtype
    return cost.SiteShape(
        tokens=tokens,
        in_features=size_expr(site.in_features),
        out_features=size_expr(site.out_features),
        rank=size_expr(site.rank),
        x_bytes=site.x_dtype.itemsize,
        adapter_bytes=adapter_dtype.itemsize,
        a_trainable=site.a_trainable,
        b_trainable=site.b_trainable,
        x_needs_grad=bool(getattr(value(site.nodes.x), "requires_grad", True)),
        dropout=site.nodes.dropout is not None and site.dropout_p != 0.0,
        mixed_dtypes=site.compute_dtype != adapter_dtype,
    )


def _sizes(shape: cost.SiteShape) -> dict:
    return {cost.T: shape.tokens, cost.I: shape.in_features, cost.O: shape.out_features, cost.R: shape.rank}


def _why_not_rewritable(site: LoraSite, config: Config) -> str:
    n = site.nodes
    if site.stacked:
        return "stacked on another adapter's sum (multi-adapter): kept as graph ops, exact as PEFT"
    if site.dropout_p is None:
        return "dropout p is a runtime value (Dynamo tensorified it under dynamic shapes): kept as graph ops"
    if value(n.x).device.type not in ("cpu", "cuda"):
        return f"device {value(n.x).device.type} is not supported by fxlora::lora_linear"
    if _scale_tensor_source(n.scale) is None and not isinstance(n.scale, float):
        return "the scale is a symbolic float with no tensor behind it"
    out_dtype = torch.promote_types(site.compute_dtype, value(n.xab).dtype)
    if value(n.add).dtype != out_dtype:
        return f"dtype flow not understood (sum is {value(n.add).dtype}, expected {out_dtype})"
    return ""


def _scale_tensor_source(scale) -> Optional[fx.Node]:
    """A tensor node carrying the scale: a 1-element tensor, or the tensor a SymFloat was `.item()`ed from."""
    if not isinstance(scale, fx.Node):
        return None
    v = value(scale)
    if isinstance(v, torch.Tensor):
        return scale
    if scale.op == "call_method" and scale.target == "item":
        return scale.args[0]
    return None


def _replace_site(graph: fx.Graph, site: LoraSite, form: cost.Form, last_draw: Optional[fx.Node]) -> Optional[fx.Node]:
    """Returns the node of the RNG state this site drew its mask from (or `last_draw` without dropout)."""
    n = site.nodes
    draws = bool(site.dropout_p)
    adapter_dtype = value(n.xab).dtype
    mask_dtype = value(n.dropout.args[0]).dtype if n.dropout is not None else adapter_dtype
    save_xa = not site.a_trainable and site.b_trainable
    with graph.inserting_before(n.add):
        scale = _scale_tensor_source(n.scale)
        if scale is None:
            scale = graph.call_function(torch.tensor, (float(n.scale),), {"dtype": torch.float32})
        elif value(scale).dim() > 0:
            scale = graph.call_method("reshape", (scale, ()))
        op = graph.call_function(
            torch.ops.fxlora.lora_linear.default,
            (
                n.x, n.weight, n.bias, n.lora_A, n.lora_B, scale, float(site.dropout_p or 0.0),
                mask_dtype, site.compute_dtype, adapter_dtype, form.forward, form.backward,
                site.base_kind == "conv1d", save_xa,
            ),
            {"after": last_draw} if draws and last_draw is not None else {},
        )
        y = graph.call_function(operator.getitem, (op, 0))
        if draws:
            last_draw = graph.call_function(operator.getitem, (op, 2))
    y.meta.update({k: v for k, v in n.add.meta.items() if k != "example_value"})
    y.meta["example_value"] = value(n.add)
    n.add.replace_all_uses_with(y)
    _erase_dead([n.add, n.scaled, n.xab, n.xa, n.dropout, *reversed(n.input_casts), n.layer_out, *_conv1d_parts(n.layer_out)])
    return last_draw


def _conv1d_parts(layer_out: fx.Node) -> list[fx.Node]:
    if layer_out.op == "call_method":  # view(addmm(b, view(x), W))
        mm = layer_out.args[0]
        return [mm, mm.args[1]]
    return []


def _erase_dead(nodes) -> None:
    for node in nodes:
        if isinstance(node, fx.Node) and not node.users:
            node.graph.erase_node(node)
