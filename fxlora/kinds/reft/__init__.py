"""ReFT interventions on a frozen linear layer's output (LoReFT, DiReFT): the kind contract.

    out = h + linear(linear(h, W_L, b_L) - linear(h, R), R^T)       h = linear(x, W, b)

Its user modules (`fxlora.reft`: LoReFT/DiReFT interventions to attach) live in `modules`.
"""

from __future__ import annotations

from fxlora.graph.read import value
from fxlora.kinds.base import LayerShape, LayerSite, layer_kind, layer_shape
from fxlora.kinds.reft.forms import candidate_forms, peft_saved_bytes
from fxlora.kinds.reft.match import find
from fxlora.kinds.reft.rewrite import rewrite


def why_not(site: LayerSite, config) -> str:
    n = site.nodes
    if n.positions:
        return (f"position-restricted intervention (reads {n.read.name}, a slice of h): folding it into W "
                "would apply it to every position; left as traced")
    dtypes = {site.x_dtype, site.weight_dtype, site.vector_dtype, site.compute_dtype, site.out_dtype, value(n.Rt).dtype}
    if len(dtypes) > 1 or site.autocast:
        return "mixed dtypes or autocast: folding the intervention into W would change the rounding"
    return ""


def shape(site: LayerSite, config) -> LayerShape:
    return layer_shape(site, config, low_precision=site.weight_dtype.itemsize < 4)


def forced(config):
    """scaling_form's act and weight exist for ReFT too; its recompute does not, so it is ignored here."""
    return (config.scaling_form, "scaling_form") if config.scaling_form in ("act", "weight") else None


KIND = layer_kind(
    name="reft", title="ReFT", canonical="h + linear(linear(h, W_L, b_L) - linear(h, R), R^T),  h = linear(x, W, b)",
    find=find, why_not=why_not, shape=shape, forms=candidate_forms, peft_saved_bytes=peft_saved_bytes,
    rewrite_sites=rewrite, forced=forced,
)
