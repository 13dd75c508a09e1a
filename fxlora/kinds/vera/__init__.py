"""VeRA (frozen shared random A, B; trainable vectors lambda_d, lambda_b): the kind contract.

    out = linear(x, W, b) + lambda_b * linear(lambda_d * linear(x, A), B)
"""

from __future__ import annotations

import torch

from fxlora.kinds.base import LayerShape, LayerSite, layer_kind, layer_shape
from fxlora.kinds.vera.forms import candidate_forms, peft_saved_bytes
from fxlora.kinds.vera.match import find
from fxlora.kinds.vera.rewrite import rewrite


def why_not(site: LayerSite, config) -> str:
    expected = torch.promote_types(site.compute_dtype, torch.promote_types(site.vector_dtype, site.compute_dtype))
    if site.out_dtype != expected:
        return f"dtype flow not understood (output is {site.out_dtype}, expected {expected})"
    return ""


def shape(site: LayerSite, config) -> LayerShape:
    return layer_shape(site, config, train_d="lambda_d" in site.trainable, train_b="lambda_b" in site.trainable)


KIND = layer_kind(
    name="vera", title="VeRA", canonical="linear(x, W, b) + lambda_b * linear(lambda_d * linear(x, A), B)",
    find=find, why_not=why_not, shape=shape, forms=candidate_forms, peft_saved_bytes=peft_saved_bytes,
    rewrite_sites=rewrite,
)
