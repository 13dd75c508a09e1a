"""VeLoRA (opt-in, lossy): rewrite a targeted LoRA site into `fxlora::velora_linear`.

Called by `rewrite_lora_sites` for each site when the `compress` option is set. A site is
compressed when all of these hold, and otherwise keeps its exact form with a note saying why:
  - `compress["targets"]` selects its module path (user configuration, so by name);
  - A trains (with A frozen the exact op already saves x A^T instead of x: nothing to compress);
  - no dropout (the op would need the mask replay as well; not done);
  - `fxlora.velora.prepare` created a v for the layer owning the site's `lora_A`
    (looked up from the real parameter Dynamo hands with the graph input, not by name),
    and v's length M divides the input width.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxlora import cost
from fxlora.config import Config, compress_targets, sub_token_size
from fxlora.graph_utils import value
from fxlora.ops import velora as velora_ops  # noqa: F401  (registers torch.ops.fxlora.velora_*)
from fxlora.sites import LoraSite


def plan(site: LoraSite, shape: cost.SiteShape, config: Config) -> tuple[Optional[cost.PricedForm], Optional[torch.Tensor], str]:
    """(priced VeLoRA form, v) when the site is compressed; else (None, None, why not) ('' when not targeted)."""
    spec = config.compress
    if spec is None or not compress_targets(spec, site.module):
        return None, None, ""
    if not site.a_trainable:
        return None, None, "velora targeted, nothing to compress: A frozen, so x A^T is saved instead of x (exact)"
    if site.dropout_p:
        return None, None, "velora targeted but not applied: dropout sites stay exact"
    if not isinstance(site.in_features, torch.SymInt) and sub_token_size(spec["sub_token"], int(site.in_features)) is None:
        return None, None, f"velora targeted but not applied: sub_token {spec['sub_token']} does not divide in={site.in_features}"
    v = _vector(site)
    if v is None:
        return None, None, "velora targeted but not applied: no v (call fxlora.velora.prepare(model, batch, compress))"
    in_features = site.in_features
    if isinstance(in_features, torch.SymInt) or int(in_features) % v.numel():
        return None, None, f"velora targeted but not applied: M={v.numel()} does not divide in={in_features}"
    form = cost.velora_form(shape, v.numel())
    return cost.price_form(form, shape), v, f"LOSSY, opted in: VeLoRA, sub-token M={v.numel()}, dA from z_p v^T"


def _vector(site: LoraSite) -> Optional[torch.Tensor]:
    from fxlora.velora import vector_for

    grapharg = site.nodes.lora_A.meta.get("grapharg")
    example = getattr(grapharg, "example", None) if grapharg is not None else None
    return vector_for(example) if example is not None else None


def replace_site(gm: fx.GraphModule, site: LoraSite, v: torch.Tensor) -> None:
    """Swap the site's nodes for one `fxlora::velora_linear`; v becomes a buffer of `gm` (same tensor)."""
    from fxlora.passes.rewrite_lora import _conv1d_parts, _erase_dead, _scale_tensor_source

    graph, n = gm.graph, site.nodes
    attr = f"_fxlora_velora_v_{site.index}"
    while hasattr(gm, attr):
        attr += "_"
    gm.register_buffer(attr, v)
    adapter_dtype = value(n.xab).dtype
    with graph.inserting_before(n.add):
        scale = _scale_tensor_source(n.scale)
        if scale is None:
            scale = graph.call_function(torch.tensor, (float(n.scale),), {"dtype": torch.float32})
        elif value(scale).dim() > 0:
            scale = graph.call_method("reshape", (scale, ()))
        v_node = graph.get_attr(attr)
        fake_mode = getattr(value(n.x), "fake_mode", None)
        if fake_mode is not None:
            v_node.meta["example_value"] = fake_mode.from_tensor(v)
        op = graph.call_function(
            torch.ops.fxlora.velora_linear.default,
            (n.x, n.weight, n.bias, n.lora_A, n.lora_B, scale, v_node, site.compute_dtype, adapter_dtype,
             site.base_kind == "conv1d", site.b_trainable),
        )
        y = graph.call_function(operator.getitem, (op, 0))
    y.meta.update({k: val for k, val in n.add.meta.items() if k != "example_value"})
    y.meta["example_value"] = value(n.add)
    n.add.replace_all_uses_with(y)
    _erase_dead([n.add, n.scaled, n.xab, n.xa, n.dropout, *reversed(n.input_casts), n.layer_out, *_conv1d_parts(n.layer_out)])
