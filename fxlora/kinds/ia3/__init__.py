"""IA3 (output and input scaling by a trainable vector): the kind contract.

    out = linear(x, W, b) * l            out = linear(x * l, W, b)
"""

from __future__ import annotations

import torch

from fxlora.config import Config
from fxlora.kinds.base import (
    LAYER_COLUMNS, LayerShape, LayerSite, describe_layer_shape, forced_scaling_form, layer_owned, layer_row,
    layer_shape,
)
from fxlora.kinds.ia3 import forms as _forms
from fxlora.kinds.ia3.forms import peft_saved_bytes
from fxlora.kinds.ia3.match import find
from fxlora.kinds.ia3.rewrite import rewrite as rewrite_sites

NAME = "ia3"
TITLE = "IA3"
CANONICAL = "mul(linear(x, W, b), l)  |  linear(mul(x, l), W, b)"
FLOP_BUDGET = False
COLUMNS = LAYER_COLUMNS
forced = forced_scaling_form
owned = layer_owned
row = layer_row
describe_shape = describe_layer_shape


def why_not(site: LayerSite, config: Config) -> str:
    expected = torch.promote_types(site.compute_dtype, site.vector_dtype) if site.kind == "ia3_out" else site.compute_dtype
    if site.out_dtype != expected:
        return f"dtype flow not understood (output is {site.out_dtype}, expected {expected})"
    return ""


def shape(site: LayerSite, config: Config) -> LayerShape:
    mixed = len({site.compute_dtype, site.vector_dtype, site.out_dtype, site.weight_dtype, site.x_dtype}) > 1
    return layer_shape(site, config, mixed_dtypes=mixed)


def site_forms(site: LayerSite, shape: LayerShape, config: Config):
    return _forms.candidate_forms(shape), ""


__all__ = ["NAME", "TITLE", "CANONICAL", "COLUMNS", "FLOP_BUDGET", "find", "why_not", "shape", "site_forms",
           "peft_saved_bytes", "forced", "rewrite_sites", "owned", "row", "describe_shape"]
