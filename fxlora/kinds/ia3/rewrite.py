"""Replace each chosen IA3 site by `fxlora::ia3_linear` in its form. The site's own nodes (base
layer, product, the vector's flatten chain) become dead and are erased; nodes read outside
the site never are.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlora.cost.core import PricedForm
from fxlora.graph.edit import erase_dead, inserting_before, replace_output
from fxlora.kinds.base import LayerSite
from fxlora.ops import ia3 as _ia3_ops  # noqa: F401  (registers torch.ops.fxlora.ia3_linear)


def rewrite(gm: fx.GraphModule, chosen: list[tuple[LayerSite, PricedForm]]) -> None:
    for site, priced in chosen:
        n = site.nodes
        with inserting_before(n.out) as inserted:
            op = gm.graph.call_function(
                torch.ops.fxlora.ia3_linear.default,
                (n.x, n.weight, n.bias, n.vectors[0], site.kind == "ia3_in", priced.form.name, site.compute_dtype,
                 site.vector_dtype, site.out_dtype, site.base_kind == "conv1d"),
            )
            y = gm.graph.call_function(operator.getitem, (op, 0))
        replace_output(n.out, y, inserted)
        erase_dead(n.internal)
