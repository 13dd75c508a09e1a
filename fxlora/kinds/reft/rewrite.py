"""Where ReFT's weight form won, rewrite the site into plain torch ops that autograd
differentiates exactly:

    y = linear(x, W + R^T (U W), b + R^T (U b + b_L))      U = W_L - R (LoReFT) or W_1 (DiReFT)

The act form is the traced chain itself (a `traced` form): the pipeline never passes it here.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlora.cost.core import PricedForm
from fxlora.graph.edit import erase_dead, inserting_before, replace_output
from fxlora.kinds.base import LayerSite


def rewrite(gm: fx.GraphModule, chosen: list[tuple[LayerSite, PricedForm]]) -> None:
    for site, _weight_form in chosen:
        _replace(gm.graph, site)


def _replace(graph: fx.Graph, site: LayerSite) -> None:
    n = site.nodes
    mm = torch.matmul
    with inserting_before(n.out) as inserted:
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
    replace_output(n.out, y, inserted)
    erase_dead(n.internal)
