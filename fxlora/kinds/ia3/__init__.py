"""IA3 (output and input scaling by a trainable vector): the kind contract.

    out = linear(x, W, b) * l            out = linear(x * l, W, b)
"""

from __future__ import annotations

import torch

from fxlora.kinds.base import LayerSite, layer_kind, layer_shape
from fxlora.kinds.ia3.forms import candidate_forms, peft_saved_bytes
from fxlora.kinds.ia3.match import find
from fxlora.kinds.ia3.rewrite import rewrite


def why_not(site: LayerSite, config) -> str:
    expected = torch.promote_types(site.compute_dtype, site.vector_dtype) if site.kind == "ia3_out" else site.compute_dtype
    if site.out_dtype != expected:
        return f"dtype flow not understood (output is {site.out_dtype}, expected {expected})"
    return ""


KIND = layer_kind(
    name="ia3", title="IA3", canonical="mul(linear(x, W, b), l)  |  linear(mul(x, l), W, b)",
    find=find, why_not=why_not, shape=layer_shape, forms=candidate_forms, peft_saved_bytes=peft_saved_bytes,
    rewrite_sites=rewrite,
)
