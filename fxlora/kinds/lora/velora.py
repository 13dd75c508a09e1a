"""VeLoRA (arXiv:2405.17991; opt-in, lossy) as one more LoRA form, offered where the user asked.

A site gets the VeLoRA form when all of these hold, and otherwise keeps its exact form with
a note saying why:
  - `compress["targets"]` selects its module path (user configuration, so by name);
  - A trains (with A frozen the exact op already saves x A^T instead of x: nothing to compress);
  - no dropout (the op would need the mask replay as well; not done);
  - `fxlora.velora.prepare` created a v for the layer owning the site's `lora_A`
    (looked up from the real parameter Dynamo hands with the graph input, not by name),
    and v's length M divides the input width.
"""

from __future__ import annotations

import dataclasses

import torch

from fxlora.config import Config, compress_targets, sub_token_size
from fxlora.cost.core import Form
from fxlora.kinds.lora.compress import vector_for
from fxlora.kinds.lora.forms import LoraShape, velora_form
from fxlora.kinds.lora.match import LoraSite


def velora_forms(site: LoraSite, shape: LoraShape, config: Config) -> tuple[list[Form], str]:
    """([the VeLoRA form carrying its v], note) when the site is compressed, else ([], why not)."""
    spec = config.compress
    if spec is None or not compress_targets(spec, site.module):
        return [], ""
    if not site.a_trainable:
        return [], "velora targeted, nothing to compress: A frozen, so x A^T is saved instead of x (exact)"
    if site.dropout_p:
        return [], "velora targeted but not applied: dropout sites stay exact"
    in_features = site.in_features
    symbolic = isinstance(in_features, torch.SymInt)
    if not symbolic and sub_token_size(spec["sub_token"], int(in_features)) is None:
        return [], f"velora targeted but not applied: sub_token {spec['sub_token']} does not divide in={in_features}"
    grapharg = site.nodes.lora_A.meta.get("grapharg")
    example = getattr(grapharg, "example", None) if grapharg is not None else None
    v = vector_for(example) if example is not None else None
    if v is None:
        return [], "velora targeted but not applied: no v (call fxlora.velora.prepare(model, batch, compress))"
    if symbolic or int(in_features) % v.numel():
        return [], f"velora targeted but not applied: M={v.numel()} does not divide in={in_features}"
    note = f"LOSSY, opted in: VeLoRA, sub-token M={v.numel()}, dA from z_p v^T"
    return [dataclasses.replace(velora_form(shape, v.numel()), note=note, spec=v)], ""
