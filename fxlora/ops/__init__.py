"""Custom ops with their forward/backward variants. Imports nothing else from fxlora."""

from fxlora.ops.dora import dora_dropped_linear
from fxlora.ops.ia3 import ia3_linear
from fxlora.ops.lora import lora_linear
from fxlora.ops.vera import vera_linear
from fxlora.ops.velora import velora_linear

__all__ = ["dora_dropped_linear", "ia3_linear", "lora_linear", "velora_linear", "vera_linear"]
