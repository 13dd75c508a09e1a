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
