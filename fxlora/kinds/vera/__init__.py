"""VeRA (frozen shared random A, B; trainable vectors lambda_d, lambda_b): the kind contract.

    out = linear(x, W, b) + lambda_b * linear(lambda_d * linear(x, A), B)
"""

from __future__ import annotations

import torch

from fxlora.config import Config
from fxlora.kinds.base import (
    LAYER_COLUMNS, LayerShape, LayerSite, describe_layer_shape, forced_scaling_form, layer_owned, layer_row,
    layer_shape,
)
from fxlora.kinds.vera import forms as _forms
from fxlora.kinds.vera.forms import peft_saved_bytes
from fxlora.kinds.vera.match import find
from fxlora.kinds.vera.rewrite import rewrite as rewrite_sites

NAME = "vera"
TITLE = "VeRA"
CANONICAL = "linear(x, W, b) + lambda_b * linear(lambda_d * linear(x, A), B)"
FLOP_BUDGET = False
COLUMNS = LAYER_COLUMNS
forced = forced_scaling_form
owned = layer_owned
row = layer_row
describe_shape = describe_layer_shape


def why_not(site: LayerSite, config: Config) -> str:
    expected = torch.promote_types(site.compute_dtype, torch.promote_types(site.vector_dtype, site.compute_dtype))
    if site.out_dtype != expected:
        return f"dtype flow not understood (output is {site.out_dtype}, expected {expected})"
    return ""


def shape(site: LayerSite, config: Config) -> LayerShape:
    mixed = len({site.compute_dtype, site.vector_dtype, site.out_dtype, site.weight_dtype, site.x_dtype}) > 1
    return layer_shape(site, config, mixed_dtypes=mixed, train_d="lambda_d" in site.trainable,
                       train_b="lambda_b" in site.trainable)


def site_forms(site: LayerSite, shape: LayerShape, config: Config):
    return _forms.candidate_forms(shape), ""


__all__ = ["NAME", "TITLE", "CANONICAL", "COLUMNS", "FLOP_BUDGET", "find", "why_not", "shape", "site_forms",
           "peft_saved_bytes", "forced", "rewrite_sites", "owned", "row", "describe_shape"]
