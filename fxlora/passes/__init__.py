"""fxlora's graph passes, one module a pass.

A pass is a function over a `torch.fx.GraphModule` that returns what it did. Only
rewrite passes mutate the graph; matching passes read it. See docs/architecture.md.
"""

from fxlora.passes.find_ia3 import find_ia3_sites
from fxlora.passes.find_lora import find_lora_sites
from fxlora.passes.find_reft import find_reft_sites
from fxlora.passes.find_vera import find_vera_sites
from fxlora.passes.rewrite_lora import Decision, rewrite_lora_sites
from fxlora.passes.rewrite_reft import rewrite_reft_sites
from fxlora.passes.rewrite_scaling import ScalingDecision, rewrite_scaling_sites

__all__ = [
    "Decision", "ScalingDecision", "find_ia3_sites", "find_lora_sites", "find_reft_sites", "find_vera_sites",
    "rewrite_lora_sites", "rewrite_reft_sites", "rewrite_scaling_sites",
]
