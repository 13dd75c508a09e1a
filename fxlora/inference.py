"""Graphs that need no backward (`model.eval()` + `generate()` under `torch.inference_mode()` or `no_grad`).

fxlora's forms differ mostly in what backward keeps; with no backward, saved bytes mean
nothing and only FLOPs can make a form worth it (a merged W for long prefills). Such
graphs are priced by FLOPs (`objective="flops"`), and every form stays exact.
"""

from __future__ import annotations

import torch
import torch.fx as fx

NO_BACKWARD_NOTE = "no backward (gradients disabled): forms chosen by FLOPs; saved bytes do not apply"


def needs_backward(gm: fx.GraphModule) -> bool:
    """Will autograd run backward through this graph? Grad mode when Dynamo compiles it, and any output needing grad."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if not outputs:
        return True
    values = [a.meta.get("example_value", a.meta.get("val")) for a in _flat_nodes(outputs[0].args)]
    known = [v for v in values if isinstance(v, torch.Tensor)]
    return not known or any(v.requires_grad for v in known)


def _flat_nodes(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found
