"""fxlora's graph passes, one module a pass.

A pass is a function over a `torch.fx.GraphModule` that returns what it did. Only
rewrite passes mutate the graph; matching passes read it. See docs/architecture.md.
"""

from fxlora.passes.find_lora import find_lora_sites
from fxlora.passes.rewrite_lora import Decision, rewrite_lora_sites

__all__ = ["Decision", "find_lora_sites", "rewrite_lora_sites"]
