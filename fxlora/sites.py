"""What matching learns about an adapter site, in one place for the cost model, the rewrite and explain."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.fx as fx

Size = Union[int, torch.SymInt]


@dataclass
class LoraNodes:
    """The graph nodes of one LoRA site: `out = base(x) + s * B(A(dropout(cast(x))))`."""

    x: fx.Node  # the base layer's input (shared by q/k/v-style sites)
    weight: fx.Node  # frozen W: (out, in) for nn.Linear, (in, out) for GPT-2's Conv1D
    bias: Optional[fx.Node]
    base: fx.Node  # the tensor the branch is added to: W's output, or an earlier adapter's sum
    layer_out: fx.Node  # W's own output (linear, or Conv1D's viewed addmm); == base unless stacked
    lora_A: fx.Node  # (r, in)
    lora_B: fx.Node  # (out, r)
    input_casts: tuple[fx.Node, ...]  # x.to(adapter dtype) that PEFT inserts, innermost first
    dropout: Optional[fx.Node]
    xa: fx.Node  # linear(dropout(x), A)
    xab: fx.Node  # linear(xa, B)
    scaled: Optional[fx.Node]  # xab * s (None when s == 1 is implicit)
    scale: Union[float, fx.Node]
    add: fx.Node  # base + scaled: the site's output


@dataclass
class LoraSite:
    """A proven LoRA site with everything later passes price and rewrite by."""

    index: int
    module: Optional[str]  # from Dynamo's nn_module_stack, for people only
    adapter: Optional[str]
    base_kind: str  # "linear" or "conv1d" (transposed weight, fan_in_fan_out)
    tokens: tuple[Size, ...]  # leading dims of x; tokens = their product
    in_features: Size
    out_features: Size
    rank: Size
    x_dtype: torch.dtype
    weight_dtype: torch.dtype
    adapter_dtype: torch.dtype
    compute_dtype: torch.dtype  # dtype of W's matmul output (autocast decides)
    autocast: Optional[str]  # e.g. "cpu:bfloat16" when inside an autocast region
    has_bias: bool
    bias_trainable: bool
    a_trainable: bool
    b_trainable: bool
    dropout_p: Optional[float]  # None: a runtime value (Dynamo tensorified the float)
    scaling: str  # "2.0", or the node that carries a tensor/symbolic scale
    stacked: int  # 0 for the first adapter on a base layer, 1 for the next...
    input_group: int = -1  # sites with the same x share a group id
    nodes: LoraNodes = field(repr=False, default=None)

    @property
    def kind(self) -> str:
        return "lora"


@dataclass(frozen=True)
class Rejection:
    """A LoRA-like pattern (two chained low-rank linears) that fxlora could not prove is a site."""

    node: str
    module: Optional[str]
    reason: str


@dataclass
class LoraMatch:
    """What `find_lora_sites` returns: sites, the patterns it rejected, inputs shared between sites."""

    sites: list[LoraSite]
    rejections: list[Rejection]
    input_groups: dict[int, list[int]]  # group id -> site indices
    linears: int  # base linears seen (adapted or not), for the report


# --- IA3 and VeRA: a frozen base layer scaled by (or added to a product of) trainable vectors ---

SCALING_KINDS = ("ia3_out", "ia3_in", "vera")


@dataclass
class ScalingNodes:
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
class ScalingSite:
    """A proven IA3 or VeRA site with everything the cost model, the rewrite and explain need."""

    index: int
    kind: str  # one of SCALING_KINDS
    module: Optional[str]  # for people only
    base_kind: str  # "linear" or "conv1d"
    tokens: tuple[Size, ...]
    in_features: Size
    out_features: Size
    rank: Optional[Size]  # VeRA's r; None for IA3
    x_dtype: torch.dtype
    weight_dtype: torch.dtype
    vector_dtype: torch.dtype
    compute_dtype: torch.dtype  # dtype of W's matmul output (autocast decides)
    out_dtype: torch.dtype  # dtype of the site's output node
    autocast: Optional[str]
    has_bias: bool
    bias_trainable: bool
    trainable: tuple[str, ...]  # names of the trainable vectors: ("l",) or ("lambda_d", "lambda_b") or a subset
    input_group: int = -1  # sites (of this match) reading the same x share a group id
    shared_x: int = 1  # how many sites of this match read the same x
    nodes: ScalingNodes = field(repr=False, default=None)


@dataclass
class ScalingMatch:
    """What `find_ia3_sites` / `find_vera_sites` return: sites and the rejected look-alikes."""

    sites: list[ScalingSite]
    rejections: list[Rejection]
