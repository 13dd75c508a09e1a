"""Replace each chosen DoRA site by `fxlora::lora_linear` (z) and the magnitude's products
(fxlora/kinds/dora/forms.py gives the three spellings). The norm and c = m / n stay as traced;
the site's token-side nodes (P, Q, B(A(u)), the products and sums) become dead and are erased.
A dropout stays as traced: the op reads its output, so its mask is the graph's (replayed by
AOTAutograd in a checkpointed region's recompute) and equals eager's.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlora.cost.core import PricedForm
from fxlora.graph.edit import erase_dead, inserting_before, replace_output, scale_node
from fxlora.graph.read import previous_output
from fxlora.kinds.dora.match import DoraSite
from fxlora.ops import dora as _dora_ops, lora as _lora_ops  # noqa: F401  (register torch.ops.fxlora.*)

LINEAR = torch._C._nn.linear


def rewrite(gm: fx.GraphModule, chosen: list[tuple[DoraSite, PricedForm]]) -> None:
    """In graph order; sites that draw their own masks chain them (program order, as eager draws)."""
    last_draw = previous_output(chosen[0][0].nodes.out, torch.ops.fxlora.dora_dropped_linear.default, 2) if chosen else None
    for site, priced in chosen:
        if priced.form.spec.sparse:
            last_draw = _replace_sparse(site, priced.form.spec, last_draw)
        else:
            _replace(site, priced.form.spec)


def _replace_sparse(site: DoraSite, spec, last_draw):
    """PEFT's dropout variant as fxlora::dora_dropped_linear: the op draws the site's mask where the
    traced dropout drew it (the dropout node dies with the site)."""
    n = site.nodes
    graph = n.out.graph
    with inserting_before(n.out) as inserted:
        op = graph.call_function(
            torch.ops.fxlora.dora_dropped_linear.default,
            (n.x, n.weight, n.bias, n.lora_A, n.lora_B, scale_node(graph, n.scale), n.scale_c, float(site.dropout_p),
             site.base_kind == "conv1d"),
            {**({"fast_rng": True} if spec.fast_rng else {}), **({"after": last_draw} if last_draw is not None else {})})
        y = graph.call_function(operator.getitem, (op, 0))
        draw = graph.call_function(operator.getitem, (op, 2))
    replace_output(n.out, y, inserted)
    erase_dead([*n.internal, n.adapter_in, n.dropout])
    return draw


def _replace(site: DoraSite, spec) -> None:
    n = site.nodes
    graph = n.out.graph
    dtype = site.dtype
    conv1d = site.base_kind == "conv1d"
    save_xa = not site.a_trainable and site.b_trainable
    with inserting_before(n.out) as inserted:
        scale = scale_node(graph, n.scale)
        flags = {}
        if site.variant == "scaled_bias":  # y = c * (x W^T + b + s B A u)
            x_op, bias = n.x, n.bias
            if n.dropout is not None:
                flags["x_adapter"] = n.adapter_in
        elif site.variant == "unscaled_bias":  # y = c * (x W^T + s B A x) + b
            x_op, bias = n.x, None
        else:  # dropped_base: y = (x - d) W^T + b + c * (d W^T + s B A d)
            x_op, bias = n.adapter_in, None
        op = graph.call_function(
            torch.ops.fxlora.lora_linear.default,
            (x_op, n.weight, bias, n.lora_A, n.lora_B, scale, 0.0, dtype, dtype, dtype, spec.forward, spec.backward,
             conv1d, save_xa), flags)
        z = graph.call_function(operator.getitem, (op, 0))
        y = graph.call_function(operator.mul, (n.scale_c, z))
        if site.variant == "unscaled_bias" and n.bias is not None:
            y = graph.call_function(operator.add, (y, n.bias))
        elif site.variant == "dropped_base":
            rest = graph.call_function(operator.sub, (n.x, n.adapter_in))
            base = graph.call_function(LINEAR, (rest, n.q_weight, n.bias))
            y = graph.call_function(operator.add, (base, y))
    replace_output(n.out, y, inserted)
    erase_dead(n.internal)
