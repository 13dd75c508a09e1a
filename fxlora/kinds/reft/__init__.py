"""ReFT interventions on a frozen linear layer's output (LoReFT, DiReFT): the kind contract.

    out = h + linear(linear(h, W_L, b_L) - linear(h, R), R^T)       h = linear(x, W, b)

Its user modules (`fxlora.reft`: LoReFT/DiReFT interventions to attach) live in `modules`.
"""

from __future__ import annotations

from fxlora.config import Config
from fxlora.graph.read import value
from fxlora.kinds.base import (
    LAYER_COLUMNS, LayerShape, LayerSite, describe_layer_shape, layer_owned, layer_row, layer_shape,
)
from fxlora.kinds.reft import forms as _forms
from fxlora.kinds.reft.forms import peft_saved_bytes
from fxlora.kinds.reft.match import find
from fxlora.kinds.reft.rewrite import rewrite as rewrite_sites

NAME = "reft"
TITLE = "ReFT"
CANONICAL = "h + matmul(linear(h, W_L, b_L) - linear(h, R), R),  h = linear(x, W, b)"
FLOP_BUDGET = False
COLUMNS = LAYER_COLUMNS
owned = layer_owned
row = layer_row
describe_shape = describe_layer_shape


def why_not(site: LayerSite, config: Config) -> str:
    n = site.nodes
    if n.positions:
        return (f"position-restricted intervention (reads {n.read.name}, a slice of h): folding it into W "
                "would apply it to every position; left as traced")
    dtypes = {site.x_dtype, site.weight_dtype, site.vector_dtype, site.compute_dtype, site.out_dtype, value(n.R).dtype}
    if len(dtypes) > 1 or site.autocast:
        return "mixed dtypes or autocast: folding the intervention into W would change the rounding"
    return ""


def shape(site: LayerSite, config: Config) -> LayerShape:
    return layer_shape(site, config, low_precision=site.weight_dtype.itemsize < 4)


def site_forms(site: LayerSite, shape: LayerShape, config: Config):
    return _forms.candidate_forms(shape), ""


def forced(config: Config):
    """scaling_form's act and weight exist for ReFT too; its recompute does not, so it is ignored here."""
    return (config.scaling_form, "scaling_form") if config.scaling_form in ("act", "weight") else None


__all__ = ["NAME", "TITLE", "CANONICAL", "COLUMNS", "FLOP_BUDGET", "find", "why_not", "shape", "site_forms",
           "peft_saved_bytes", "forced", "rewrite_sites", "owned", "row", "describe_shape"]
