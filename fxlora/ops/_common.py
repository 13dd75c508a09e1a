"""What every fxlora op shares: the placeholder for an output it does not produce, and W's layout."""

from __future__ import annotations

import torch.fx as fx
from torch import Tensor

NO_TENSOR = (0,)  # shape of an output a form does not produce (custom ops return fixed arities)


def is_fxlora_op(node: fx.Node) -> bool:
    """A call of one of fxlora's custom ops (`torch.ops.fxlora.*`)."""
    return node.op == "call_function" and getattr(node.target, "namespace", None) == "fxlora"


def base_weight(weight: Tensor, conv1d: bool) -> Tensor:
    """W as (out, in): GPT-2's Conv1D stores it transposed (fan_in_fan_out)."""
    return weight.t() if conv1d else weight
