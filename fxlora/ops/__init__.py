"""Custom ops with their forward/backward variants. Imports nothing else from fxlora."""

from fxlora.ops.lora import BACKWARD_FORMS, FORWARD_FORMS, lora_linear

__all__ = ["BACKWARD_FORMS", "FORWARD_FORMS", "lora_linear"]
