"""LoRA (and its opt-in compressed forms, LoRA-FA's frozen A and VeLoRA): the kind contract.

    out = linear(x, W, b) + s * linear(linear(drop(x), A), B)
"""

from __future__ import annotations

import dataclasses

import torch

from fxlora.config import Config
from fxlora.cost.guards import size_expr, tokens_expr
from fxlora.graph.read import describe_size, dtype_name, needs_grad, scale_tensor_source, value
from fxlora.kinds.base import Kind, Match
from fxlora.kinds.lora import forms as _forms
from fxlora.kinds.lora.forms import LoraShape, peft_saved_bytes
from fxlora.kinds.lora.group import group_sites, joins_group, why_not_groupable
from fxlora.kinds.lora.match import LoraSite, find
from fxlora.kinds.lora.rewrite import rewrite
from fxlora.kinds.lora.timing import time_case
from fxlora.kinds.lora.velora import velora_forms

def why_not(site: LoraSite, config: Config) -> str:
    n = site.nodes
    if site.stacked:
        return "stacked on another adapter's sum (multi-adapter): kept as graph ops, exact as PEFT"
    if site.dropout_p is None:
        return "dropout p is a runtime value (Dynamo tensorified it under dynamic shapes): kept as graph ops"
    if scale_tensor_source(n.scale) is None and not isinstance(n.scale, float):
        return "the scale is a symbolic float with no tensor behind it"
    out_dtype = torch.promote_types(site.compute_dtype, value(n.xab).dtype)
    if value(n.add).dtype != out_dtype:
        return f"dtype flow not understood (sum is {value(n.add).dtype}, expected {out_dtype})"
    return ""


def shape(site: LoraSite, config: Config) -> LoraShape:
    adapter_dtype = value(site.nodes.xab).dtype
    return LoraShape(
        tokens=tokens_expr(site.tokens),
        in_features=size_expr(site.in_features),
        out_features=size_expr(site.out_features),
        rank=size_expr(site.rank),
        x_bytes=site.x_dtype.itemsize,
        adapter_bytes=adapter_dtype.itemsize,
        a_trainable=site.a_trainable,
        b_trainable=site.b_trainable,
        x_needs_grad=needs_grad(site.nodes.x),
        dropout=site.nodes.dropout is not None and site.dropout_p != 0.0,
        mixed_dtypes=site.compute_dtype != adapter_dtype,
        eager_masks=config.eager_masks(),
        recomputed=config.in_checkpoint,
        # fast masks are Inductor's rule (Config.eager_masks); forcing a "+seeded" form asks for them
        seeded_masks=not config.eager_masks() or "+seeded" in (config.force_form or ""),
    )


FAST_MASKS = ("dropout masks hashed from a graph-drawn seed and the element index, replayed in backward "
              "(Inductor's rule: eager's masks only with fallback_random=True)")


def site_forms(site: LoraSite, shape: LoraShape, config: Config):
    lossy, note = velora_forms(site, shape, config)
    if shape.dropout and not shape.eager_masks:
        note = f"{note}; {FAST_MASKS}" if note else FAST_MASKS
    exact = _forms.candidate_forms(shape)
    if config.group_shared_input and not config.force_form and not why_not_groupable(site):
        # one op with the sites sharing x saves more than any bracketing that would keep it alone
        exact = [f if joins_group(site, f) or not f.legal else dataclasses.replace(
            f, legal=False, why_not=f"x shared with {site.shared_x - 1} other site(s): their one op runs "
            "backward 1 or 5 (group.py)") for f in exact]
    return [*exact, *lossy], note


def forced(config: Config):
    return (config.force_form, "force_form") if config.force_form else None


def owned(site: LoraSite) -> tuple:
    n = site.nodes
    return (n.add, n.scaled, n.output_cast, n.xab, n.xa, n.dropout, *n.input_casts, n.layer_out)


def row(site: LoraSite, match: Match) -> tuple[str, ...]:
    name = site.module or site.nodes.add.name
    if site.adapter:
        name += f" [{site.adapter}]"
    trains = "+".join(k for k, on in (("A", site.a_trainable), ("B", site.b_trainable)) if on) or "-"
    dtype = dtype_name(site.adapter_dtype)
    if site.autocast:
        dtype = f"{dtype}@{site.autocast.split(':')[1]}"
    if dtype_name(site.weight_dtype) != dtype_name(site.adapter_dtype):
        dtype = f"W {dtype_name(site.weight_dtype)}, AB {dtype}"
    shared = [str(i) for i in match.input_groups.get(site.input_group, []) if i != site.index]
    return (
        str(site.index),
        name,
        site.base_kind + (f"+{site.stacked}" if site.stacked else ""),
        "*".join(describe_size(d) for d in site.tokens) or "1",
        describe_size(site.in_features),
        describe_size(site.out_features),
        describe_size(site.rank),
        dtype,
        trains,
        "runtime" if site.dropout_p is None else f"{site.dropout_p:g}",
        site.scaling,
        "trainable" if site.bias_trainable else ("yes" if site.has_bias else "no"),
        ",".join(shared) or "-",
    )


def describe_shape(s: LoraShape) -> tuple[str, str]:
    return "", (f"T={s.tokens}, i={s.in_features}, o={s.out_features}, r={s.rank}"
            + (", A frozen" if not s.a_trainable else "") + (", dropout" if s.dropout else "")
            + (", checkpointed: forward timed twice" if s.recomputed else ""))


KIND = Kind(
    name="lora", title="LoRA", canonical="linear(x, W, b) + linear(linear(drop(x), A), B) * s",
    columns=("#", "site", "base", "tokens", "in", "out", "r", "dtype", "trains", "dropout", "scale", "bias",
             "x shared with"),
    flop_budget=True, find=find, why_not=why_not, shape=shape, site_forms=site_forms,
    peft_saved_bytes=peft_saved_bytes, forced=forced, rewrite_sites=rewrite, owned=owned, row=row,
    describe_shape=describe_shape, time_case=time_case, group=group_sites,
)
