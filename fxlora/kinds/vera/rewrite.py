"""Replace each chosen VeRA site by `fxlora::vera_linear` in its form; the site's own nodes die."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlora.cost.core import PricedForm
from fxlora.graph.edit import erase_dead, inserting_before, replace_output
from fxlora.graph.read import value
from fxlora.kinds.base import LayerSite
from fxlora.ops import vera as _vera_ops  # noqa: F401  (registers torch.ops.fxlora.vera_linear)


def rewrite(gm: fx.GraphModule, chosen: list[tuple[LayerSite, PricedForm]]) -> None:
    graph = gm.graph
    for site, priced in chosen:
        n = site.nodes
        with inserting_before(n.out) as inserted:
            # The op wants 1-d lambdas; PEFT's are already (r,) and (out,).
            lambda_d, lambda_b = (v if value(v).dim() == 1 else graph.call_method("reshape", (v, (-1,)))
                                  for v in n.vector_values)
            op = graph.call_function(
                torch.ops.fxlora.vera_linear.default,
                (n.x, n.weight, n.bias, *n.frozen, lambda_d, lambda_b, priced.form.name, site.compute_dtype,
                 site.out_dtype, site.base_kind == "conv1d"),
            )
            y = graph.call_function(operator.getitem, (op, 0))
        replace_output(n.out, y, inserted)
        erase_dead(n.internal)
