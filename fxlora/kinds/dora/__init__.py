"""DoRA ("DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353): the kind contract.

    y = P + (c - 1) * Q + c * s * B(A(u)),   c = m / ||W + s B A||.detach(),   P = linear(x, W, b)

Runs before LoRA: a DoRA site's B(A(u)) is LoRA-shaped, and its nodes belong to the DoRA site.
"""

from __future__ import annotations

import torch

from fxlora.config import Config
from fxlora.cost.guards import size_expr, tokens_expr
from fxlora.graph.read import describe_size, dtype_name, value
from fxlora.kinds.base import Kind, Match
from fxlora.kinds.dora.forms import DoraShape, candidate_forms, peft_saved_bytes
from fxlora.kinds.dora.match import DoraSite, find
from fxlora.kinds.dora.rewrite import rewrite
from fxlora.kinds.dora.timing import time_case


def why_not(site: DoraSite, config: Config) -> str:
    n = site.nodes
    if site.nodes.dropout is not None and site.dropout_p is None:
        return "dropout p is a runtime value: kept as graph ops"
    dtypes = {value(v).dtype for v in (n.x, n.weight, n.lora_A, n.lora_B, n.scale_c, n.out)}
    if len(dtypes) > 1 or site.autocast:
        return f"mixed dtypes ({', '.join(sorted(dtype_name(d) for d in dtypes))}{', autocast' if site.autocast else ''}): kept as graph ops"
    return ""


def shape(site: DoraSite, config: Config) -> DoraShape:
    return DoraShape(
        tokens=tokens_expr(site.tokens), in_features=size_expr(site.in_features),
        out_features=size_expr(site.out_features), rank=size_expr(site.rank), x_bytes=site.dtype.itemsize,
        variant=site.variant, adapter_dropout=site.variant == "scaled_bias" and site.nodes.dropout is not None,
        dropout=site.nodes.dropout is not None and bool(site.dropout_p), a_trainable=site.a_trainable,
        b_trainable=site.b_trainable, m_trainable=site.m_trainable, dropout_p=float(site.dropout_p or 0.0),
        recomputed=config.in_checkpoint, eager_masks=config.eager_masks(),
        sparse_kernels=site.dtype == torch.float32 and value(site.nodes.x).device.type == "cpu",
    )


def site_forms(site: DoraSite, shape: DoraShape, config: Config):
    return candidate_forms(shape), ""


def forced(config: Config):
    return (config.force_form, "force_form") if config.force_form else None


def owned(site: DoraSite) -> tuple:
    return (*site.nodes.internal, site.nodes.dropout)


def row(site: DoraSite, match: Match) -> tuple[str, ...]:
    trains = "+".join(k for k, on in (("A", site.a_trainable), ("B", site.b_trainable), ("m", site.m_trainable)) if on) or "-"
    shared = [str(i) for i in match.input_groups.get(site.input_group, []) if i != site.index]
    return (
        str(site.index), site.module or site.nodes.out.name, site.base_kind,
        "*".join(describe_size(d) for d in site.tokens) or "1", describe_size(site.in_features),
        describe_size(site.out_features), describe_size(site.rank), dtype_name(site.dtype), trains,
        "-" if site.dropout_p is None else f"{site.dropout_p:g}", site.scaling,
        {"scaled_bias": "c*(P+sBAu)", "unscaled_bias": "c*z+b", "dropped_base": "(x-d)W+b+c*z"}[site.variant],
        "m / ||W + s BA|| (detached)", ",".join(shared) or "-",
    )


def describe_shape(s: DoraShape) -> tuple[str, str]:
    return "", f"T={s.tokens}, i={s.in_features}, o={s.out_features}, r={s.rank}, {s.variant}" + (
        ", dropout" if s.dropout else "")


KIND = Kind(
    name="dora", title="DoRA", canonical="linear(x, W, b) + (c - 1) * Q + c * s * linear(linear(u, A), B), "
                                         "c = m / ||W + s * B @ A||.detach()",
    columns=("#", "site", "base", "tokens", "in", "out", "r", "dtype", "trains", "dropout", "scale", "form of y",
             "magnitude scale", "x shared with"),
    flop_budget=True, find=find, why_not=why_not, shape=shape, site_forms=site_forms,
    peft_saved_bytes=peft_saved_bytes, forced=forced, rewrite_sites=rewrite, owned=owned, row=row,
    describe_shape=describe_shape, time_case=time_case,
)
