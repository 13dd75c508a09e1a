"""Replace each chosen LoRA site by `fxlora::lora_linear` (or VeLoRA's op) in its form.

The op computes `base(x) + s * B(A(drop(x)))` itself, so the site's own nodes (the base
linear, dropout, casts, both adapter linears, the scale and the add) become dead and are
erased. PEFT's `x.to(adapter dtype)` copy disappears with them: the op reads x as it is.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxlora.cost.core import PricedForm
from fxlora.graph.edit import erase_dead, inserting_before, replace_output, scale_node
from fxlora.graph.read import previous_output, value
from fxlora.kinds.lora.forms import LoraSpec
from fxlora.kinds.lora.match import LoraNodes, LoraSite
from fxlora.ops import lora as _lora_ops, lora_group as _group_ops, velora as _velora_ops  # noqa: F401  (register torch.ops.fxlora.*)
from fxlora.ops.lora import MERGED_DX, BACKWARD_FORMS


def rewrite(gm: fx.GraphModule, chosen: list[tuple[LoraSite, PricedForm]]) -> None:
    """Rewrite the sites in graph order; dropout sites chain their RNG draws (program order).
    Two or more sites handed over together are a group (group.py): one op."""
    if len(chosen) > 1 and all(site.nodes.x is chosen[0][0].nodes.x for site, _ in chosen):
        _replace_group(chosen)
        return
    last_draw = previous_output(chosen[0][0].nodes.add, torch.ops.fxlora.lora_linear.default, 2) if chosen else None  # RNG output of the previous dropout site
    for site, priced in chosen:
        if priced.form.lossy:
            _replace_velora(gm, site, priced.form.spec)
        else:
            last_draw = _replace_exact(site, priced.form.spec, last_draw)


def op_arguments(site: LoraSite, spec: LoraSpec) -> tuple[tuple, dict]:
    """`fxlora::lora_linear`'s arguments after its five tensors and the scale, for `site` in form
    `spec`: (positional, keyword flags). The rewrite and the timing (timing.py) both use these."""
    n = site.nodes
    adapter_dtype = value(n.xab).dtype
    mask_dtype = value(n.dropout.args[0]).dtype if n.dropout is not None else adapter_dtype
    p = 0.0 if spec.traced_dropout and not spec.seeded else float(site.dropout_p or 0.0)  # traced: the graph draws
    positional = (p, mask_dtype, site.compute_dtype, adapter_dtype, spec.forward,
                  spec.backward, site.base_kind == "conv1d", not site.a_trainable and site.b_trainable)
    flags = {name: True for name, on in (("fast_rng", spec.fast_rng), ("packed_mask", spec.packed_mask))
             if on and p}
    return positional, flags


def _replace_exact(site: LoraSite, spec: LoraSpec, last_draw: Optional[fx.Node]) -> Optional[fx.Node]:
    """Returns the node of this site's mask record (or `last_draw` without an RNG-state draw)."""
    n = site.nodes
    graph = n.add.graph
    dropped = bool(site.dropout_p) and not spec.traced_dropout  # the op itself masks x
    # A graph-drawn seed (a region's "+seeded" forms, or hashed masks): backward and a region's recompute
    # read the same one. Otherwise the op draws from the RNG state, in program order (`after`).
    seeded = spec.seeded or (dropped and spec.fast_rng)
    draws = dropped and not seeded
    positional, flags = op_arguments(site, spec)
    with inserting_before(n.add) as inserted:
        if spec.traced_dropout:  # the traced dropout stays (and its casts): the op reads its output
            flags["x_adapter"] = n.dropout
        if seeded:
            flags["seed"] = graph.call_function(torch.randint, (0, 2**62, ()),
                                                {"dtype": torch.int64, "device": value(n.x).device})
        op = graph.call_function(
            torch.ops.fxlora.lora_linear.default,
            (n.x, n.weight, n.bias, n.lora_A, n.lora_B, scale_node(graph, n.scale), *positional),
            {**({"after": last_draw} if draws and last_draw is not None else {}), **flags},
        )
        y = graph.call_function(operator.getitem, (op, 0))
        if draws:
            last_draw = graph.call_function(operator.getitem, (op, 2))
    _swap(n, y, inserted)
    return last_draw


def _replace_group(chosen: list[tuple[LoraSite, PricedForm]]) -> None:
    """`fxlora::lora_group_linear` before the group's first output (group.py hands the sites over
    in graph order); each site's output is its y."""
    sites = [site for site, _ in chosen]
    specs = [priced.form.spec for _, priced in chosen]
    graph = sites[0].nodes.add.graph
    with inserting_before(sites[0].nodes.add) as inserted:
        op = graph.call_function(torch.ops.fxlora.lora_group_linear.default, (
            sites[0].nodes.x,
            [s.nodes.weight for s in sites],
            [s.nodes.bias for s in sites if s.nodes.bias is not None],
            [s.nodes.lora_A for s in sites],
            [s.nodes.lora_B for s in sites],
            [scale_node(graph, s.nodes.scale) for s in sites],
            sites[0].compute_dtype,
            [spec.forward for spec in specs],
            [BACKWARD_FORMS[spec.backward][2] in MERGED_DX for spec in specs],
            [s.base_kind == "conv1d" for s in sites],
            [s.nodes.bias is not None for s in sites],
        ))
        ys = [graph.call_function(operator.getitem, (op, k)) for k in range(len(sites))]
    for site, y in zip(sites, ys):
        _swap(site.nodes, y, inserted)


def _replace_velora(gm: fx.GraphModule, site: LoraSite, v: torch.Tensor) -> None:
    """VeLoRA's op (opt-in, lossy); v becomes a buffer of `gm` (the same tensor, so loading reaches it)."""
    n = site.nodes
    graph = gm.graph
    attr = f"_fxlora_velora_v_{site.index}"
    while hasattr(gm, attr):
        attr += "_"
    gm.register_buffer(attr, v)
    fake_mode = getattr(value(n.x), "fake_mode", None)
    with inserting_before(n.add) as inserted:
        v_node = graph.get_attr(attr)
        if fake_mode is not None:
            v_node.meta["example_value"] = fake_mode.from_tensor(v)
        op = graph.call_function(
            torch.ops.fxlora.velora_linear.default,
            (n.x, n.weight, n.bias, n.lora_A, n.lora_B, scale_node(graph, n.scale), v_node, site.compute_dtype,
             value(n.xab).dtype, site.base_kind == "conv1d", site.b_trainable),
        )
        y = graph.call_function(operator.getitem, (op, 0))
    _swap(n, y, inserted)


def _swap(n: LoraNodes, y: fx.Node, inserted: list[fx.Node]) -> None:
    replace_output(n.add, y, inserted)
    erase_dead([n.add, n.scaled, n.output_cast, n.xab, n.xa, n.dropout, *reversed(n.input_casts), n.layer_out, *_conv1d_parts(n.layer_out)])


def _conv1d_parts(layer_out: fx.Node) -> list[fx.Node]:
    if layer_out.op == "call_method":  # view(addmm(b, view(x), W))
        mm = layer_out.args[0]
        return [mm, mm.args[1]]
    return []
