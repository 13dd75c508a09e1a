"""What every adapter kind shares: the Match and Decision types the pipeline and the report
read, and the site of a kind that sits on one frozen layer (IA3, VeRA, ReFT).

A kind is a package under fxlora/kinds/ with the contract `Kind` reads (fxlora/kinds/README.md).
Kinds never import each other; what two of them share lives here or below (graph/, cost/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import sympy
import torch
import torch.fx as fx

from fxlora.cost.core import I, PricedForm, T
from fxlora.cost.guards import size_expr, tokens_expr
from fxlora.graph.prove import Rejection
from fxlora.graph.read import describe_size, dtype_name, module_path, needs_grad, rebuildable, requires_grad, value

Size = Union[int, torch.SymInt]


@dataclass
class Match:
    """What a kind's `find` returns: its sites (numbered from 0) and the look-alikes it rejected."""

    sites: list
    rejections: list[Rejection]
    linears: int = 0  # base linears seen (adapted or not), for the LoRA report line

    @property
    def input_groups(self) -> dict[int, list[int]]:
        """Group id -> indices of the sites reading the same x."""
        groups: dict[int, list[int]] = {}
        for site in self.sites:
            groups.setdefault(site.input_group, []).append(site.index)
        return groups


@dataclass
class Decision:
    """What happened to one site: its priced candidates, the form chosen (or why none), and why."""

    kind: str
    site: int
    shape: Any = None
    candidates: list[PricedForm] = field(default_factory=list)
    chosen: Optional[PricedForm] = None
    peft_saved_bytes: Optional[sympy.Expr] = None
    reason: str = ""
    unit: tuple[int, ...] = ()  # the sites rewritten as one op with this one (itself included), if more than one

    @property
    def rewritten(self) -> bool:
        """A form was chosen and it is not the traced graph itself."""
        return self.chosen is not None and not self.chosen.form.traced


@dataclass(frozen=True)
class Kind:
    """One adapter kind's contract: each kind package builds its `KIND` (fxlora/kinds/README.md)."""

    name: str  # "lora", "ia3", ...: counters and `Report.sites_of`
    title: str  # for people: "LoRA"
    canonical: str  # the math its matcher reads, in one line
    columns: tuple[str, ...]  # explain's site-table header
    flop_budget: bool  # price with Config.flop_budget (LoRA) or let FLOPs only break ties
    find: Callable[[fx.GraphModule], Match]
    why_not: Callable[[Any, Any], str]  # (site, config) -> reason it cannot be rewritten, or ""
    shape: Callable[[Any, Any], Any]  # (site, config) -> the shape its formulas are priced at
    site_forms: Callable[[Any, Any, Any], tuple[list, str]]  # (site, shape, config) -> (forms, note)
    peft_saved_bytes: Callable[[Any], sympy.Expr]
    forced: Callable[[Any], Optional[tuple[str, str]]]  # config -> (form name, option) or None
    rewrite_sites: Callable[[fx.GraphModule, list], None]  # (gm, [(site, PricedForm)]) in graph order
    owned: Callable[[Any], tuple]  # site -> the nodes it claims (node ownership across kinds)
    row: Callable[[Any, Match], tuple[str, ...]]  # (site, match) -> explain's cells
    describe_shape: Callable[[Any], tuple[str, str]]  # shape -> (what, sizes) for the candidates heading
    draws_random: Callable[[Any, Any], bool] = lambda site, config: False  # (site, config): its form draws random numbers
    # (site, shape, form, at_hints) -> a fxlora.cost.timing.TimingCase, for objective "time"; None: not timed
    time_case: Optional[Callable[[Any, Any, Any, Callable], Any]] = None
    # (chosen [(site, PricedForm)], config) -> (units, notes): lists of sites rewritten as one op
    # (in graph order, each unit's sites too, every chosen site in exactly one) and a note per site on its unit; None: one per site
    group: Optional[Callable[[list, Any], tuple[list[list], dict[int, str]]]] = None


# --- sites on one frozen layer: IA3, VeRA, ReFT -------------------------------------------


@dataclass
class LayerNodes:
    """The graph nodes of one IA3 or VeRA site.

    ia3_out: out = (linear(x, W, b)) * l         ia3_in: out = linear(cast(x * l), W, b)
    vera:    out = linear(x, W, b) + lambda_b * linear(lambda_d * linear(x, A), B)
    """

    x: fx.Node  # the base layer's input as the op reads it (before PEFT's casts)
    weight: fx.Node  # frozen W: (out, in) for nn.Linear, (in, out) for GPT-2's Conv1D
    bias: Optional[fx.Node]
    layer_out: fx.Node  # W's own output (linear, or Conv1D's viewed addmm)
    vectors: tuple[fx.Node, ...]  # the trainable vectors as the graph holds them: (l,) or (lambda_d, lambda_b)
    vector_values: tuple[fx.Node, ...]  # the nodes the math reads: l.flatten() scaled by 1, or lambda_* itself
    frozen: tuple[fx.Node, ...]  # VeRA's sliced shared A and B (as read by the linears); () for IA3
    out: fx.Node  # the site's output: every use of it is redirected to the op
    internal: tuple[fx.Node, ...]  # site nodes that die with the rewrite, erased when unused, in order


@dataclass
class LayerSite:
    """A proven site on one frozen layer (IA3, VeRA, ReFT): what its forms and rewrite need."""

    index: int
    kind: str  # ia3_out, ia3_in, vera, loreft, direft
    module: Optional[str]  # for people only
    base_kind: str  # "linear" or "conv1d"
    tokens: tuple[Size, ...]
    in_features: Size
    out_features: Size
    rank: Optional[Size]  # VeRA's / ReFT's r; None for IA3
    x_dtype: torch.dtype
    weight_dtype: torch.dtype
    vector_dtype: torch.dtype
    compute_dtype: torch.dtype  # dtype of W's matmul output (autocast decides)
    out_dtype: torch.dtype  # dtype of the site's output node
    autocast: Optional[str]
    has_bias: bool
    bias_trainable: bool
    trainable: tuple[str, ...]  # names of the trainable tensors: ("l",), ("lambda_d", "lambda_b"), ("R", "W_L")...
    input_group: int = -1  # sites (of this match) reading the same x share a group id
    shared_x: int = 1  # how many sites of this match read the same x
    nodes: Any = field(repr=False, default=None)  # LayerNodes, or the kind's own nodes (ReFT)


def describe_layer_site(index: int, n: Any, base_kind: str, kind: str, autocast, *, rank=None,
                        trainable: tuple[str, ...] = (), read: Optional[fx.Node] = None,
                        vector: Optional[fx.Node] = None, wrapper: str = ".base_layer") -> LayerSite:
    """The LayerSite of a site's proven nodes (x, weight, bias, layer_out, out).

    read: what the adapter reads of the layer's output, where it is not all of it (ReFT's
    positions); vector: the tensor whose dtype the adapter computes in (default: the last
    of `n.vectors`); wrapper: the adapter module's suffix on the layer's path (PEFT's base_layer).
    """
    x, W = value(n.x), value(n.weight)
    seen = value(read) if read is not None else None
    return LayerSite(
        index=index,
        kind=kind,
        module=(module_path(n.layer_out) or module_path(n.out) or "").removesuffix(wrapper) or None,
        base_kind=base_kind,
        tokens=tuple(seen.shape[:-1] if seen is not None else x.shape[:-1]),
        in_features=x.shape[-1],
        out_features=(seen if seen is not None else value(n.layer_out)).shape[-1],
        rank=rank,
        x_dtype=x.dtype,
        weight_dtype=W.dtype,
        vector_dtype=value(vector if vector is not None else n.vectors[-1]).dtype,
        compute_dtype=value(n.layer_out).dtype,
        out_dtype=value(n.out).dtype,
        autocast=autocast,
        has_bias=n.bias is not None,
        bias_trainable=n.bias is not None and requires_grad(n.bias),
        trainable=trainable,
        nodes=n,
    )


def group_by_input(sites: list) -> None:
    """Number the groups of sites that read the same x (k and v share the normed hidden state)."""
    groups: dict[fx.Node, list] = {}
    for site in sites:
        groups.setdefault(site.nodes.x, []).append(site)
    for group_id, members in enumerate(groups.values()):
        for site in members:
            site.input_group, site.shared_x = group_id, len(members)


@dataclass(frozen=True)
class LayerShape:
    """What the cost model needs of a LayerSite; sizes may be sympy expressions of shape symbols."""

    kind: str
    tokens: sympy.Expr
    in_features: sympy.Expr
    out_features: sympy.Expr
    rank: sympy.Expr  # 0 for IA3
    x_bytes: int
    compute_bytes: int  # element size of W's matmul output
    shared_x: int = 1  # sites reading the same x
    x_needs_grad: bool = True
    has_bias: bool = False
    mixed_dtypes: bool = False  # the vectors scale in another dtype than W's matmul
    low_precision: bool = False  # W in bf16/fp16: folding a small delta into W would round it away
    train_d: bool = True  # VeRA: lambda_d trainable
    train_b: bool = True  # VeRA: lambda_b trainable
    x_rebuilt: bool = False  # x is a norm/pointwise output the partitioner may rebuild (rematerialize)


def layer_shape(site: LayerSite, config: Any, **kind_fields: Any) -> LayerShape:
    """The shape of a LayerSite; x counts as rebuilt where Inductor's partitioner may recompute it."""
    x_rebuilt = config.inner == "inductor" and config.rematerialize and rebuildable(site.nodes.x)
    mixed = len({site.compute_dtype, site.vector_dtype, site.out_dtype, site.weight_dtype, site.x_dtype}) > 1
    return LayerShape(
        kind=site.kind,
        tokens=tokens_expr(site.tokens),
        in_features=size_expr(site.in_features),
        out_features=size_expr(site.out_features),
        rank=size_expr(site.rank) if site.rank is not None else sympy.Integer(0),
        x_bytes=site.x_dtype.itemsize,
        compute_bytes=site.compute_dtype.itemsize,
        shared_x=site.shared_x,
        x_needs_grad=needs_grad(site.nodes.x),
        has_bias=site.has_bias,
        x_rebuilt=x_rebuilt,
        mixed_dtypes=mixed,
        **kind_fields,
    )


def x_saved_bytes(s: LayerShape) -> sympy.Expr:
    """x once per group of sites reading it; nothing when the partitioner can rebuild it from
    tensors saved anyway (a norm's input and rstd, an MLP's gate and up: fxlora's rematerialize)."""
    return sympy.Integer(0) if s.x_rebuilt else T * I * s.x_bytes / s.shared_x




LAYER_COLUMNS = ("#", "site", "kind", "base", "tokens", "in", "out", "r", "dtype", "trains", "bias", "x read by")
LAYER_TITLES = {"ia3_out": "IA3 (output scaling)", "ia3_in": "IA3 (input scaling)", "vera": "VeRA",
                "loreft": "LoReFT", "direft": "DiReFT"}


def layer_row(site: LayerSite, match: Match) -> tuple[str, ...]:
    """explain's cells for a LayerSite."""
    dtype = dtype_name(site.compute_dtype) + (f"@{site.autocast.split(':')[1]}" if site.autocast else "")
    if dtype_name(site.vector_dtype) != dtype_name(site.compute_dtype):
        dtype += f", vec {dtype_name(site.vector_dtype)}"
    return (
        str(site.index), site.module or site.nodes.out.name, LAYER_TITLES[site.kind], site.base_kind,
        "*".join(describe_size(t) for t in site.tokens) or "1", describe_size(site.in_features),
        describe_size(site.out_features), "-" if site.rank is None else describe_size(site.rank), dtype,
        "+".join(site.trainable), "yes" if site.has_bias else "no", str(site.shared_x),
    )


def describe_layer_shape(s: LayerShape) -> tuple[str, str]:
    return LAYER_TITLES[s.kind], (f"T={s.tokens}, i={s.in_features}, o={s.out_features}"
            + (f", r={s.rank}" if s.rank else "")
            + (f", x read by {s.shared_x}" if s.shared_x > 1 else "")
            + (", x rebuilt by the partitioner" if s.x_rebuilt else ""))


def layer_kind(*, name: str, title: str, canonical: str, find, why_not, shape, forms, peft_saved_bytes,
               rewrite_sites, forced=None) -> Kind:
    """The Kind of an adapter on one frozen layer (IA3, VeRA, ReFT): one site table, x-sharing
    groups, forms chosen by saved bytes with FLOPs breaking ties, `scaling_form` to force one."""
    return Kind(
        name=name, title=title, canonical=canonical, columns=LAYER_COLUMNS, flop_budget=False, find=find,
        why_not=why_not, shape=shape, site_forms=lambda site, shape, config: (forms(shape), ""),
        peft_saved_bytes=peft_saved_bytes,
        forced=forced or (lambda config: (config.scaling_form, "scaling_form") if config.scaling_form else None),
        rewrite_sites=rewrite_sites, owned=lambda site: (site.nodes.out, *site.nodes.internal), row=layer_row,
        describe_shape=describe_layer_shape,
    )
