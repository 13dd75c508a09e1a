"""Opt-in compressed activations for LoRA: VeLoRA's per-site vector v and LoRA-FA's frozen A.

The public face of fxlora/kinds/lora/compress.py (docs/lossy.md):

    fxlora.velora.prepare(model, first_batch, {"method": "velora"})
    fxlora.freeze_lora_A(model)
"""

from fxlora.kinds.lora.compress import BUFFER, freeze_lora_A, lora_layers, prepare, vector_for

__all__ = ["BUFFER", "freeze_lora_A", "lora_layers", "prepare", "vector_for"]
