"""VeLoRA's per-site vector v (arXiv:2405.17991): created and initialised before compiling, found by the rewrite.

    compress = {"method": "velora"}                  # defaults: sub_token "D/32", targets v_proj, down_proj
    fxlora.velora.prepare(model, first_batch, compress)
    model = torch.compile(model, backend="fxlora", options={"compress": compress})

`prepare` registers a buffer `velora_v` (M,) on every targeted PEFT LoRA layer (so it is
saved and loaded with `state_dict`), runs one eager no-grad forward on the batch given,
sets v to the unit-length mean of that batch's sub-tokens of the layer's input, and never
changes it again. The rewrite finds a site's v through the site's `lora_A` parameter
(Dynamo hands the real parameter with each graph input), never through names, and reads
the buffer as a constant of the compiled graph: `load_state_dict` (an in-place copy)
reaches it; replacing the buffer object after compiling (e.g. `model.to(device)`) does
not, so prepare and move first, then compile.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from fxlora.config import compress_targets, normalize_compress, sub_token_size

BUFFER = "velora_v"
_LAYER_OF_A = WeakIdKeyDictionary()  # lora_A parameter -> weakref to its LoRA layer (tensors compare by identity)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers (modules holding a `lora_A` ModuleDict of nn.Linear) by module path."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and len(m.lora_A) > 0
    }


def prepare(model: nn.Module, batch: Any, compress: Optional[Mapping[str, Any]] = None) -> dict[str, torch.Tensor]:
    """Create and initialise v on every LoRA layer `compress` targets; returns {module path: v}.

    `batch`: the first training batch (a dict of model kwargs, a tensor, or a tuple of args).
    Layers whose input width M does not divide are skipped (and stay exact when compiled).
    """
    spec = normalize_compress(compress or {})
    chosen = {}
    for name, layer in lora_layers(model).items():
        if not compress_targets(spec, name):
            continue
        d = next(iter(layer.lora_A.values())).in_features
        m = sub_token_size(spec["sub_token"], d)
        if m is None:
            continue
        A = next(iter(layer.lora_A.values())).weight
        v = torch.zeros(m, dtype=torch.float32, device=A.device)
        if hasattr(layer, BUFFER):
            delattr(layer, BUFFER)
        layer.register_buffer(BUFFER, v)
        for lin in layer.lora_A.values():
            _LAYER_OF_A[lin.weight] = weakref.ref(layer)
        chosen[name] = layer
    sums: dict[str, list] = {}
    hooks = [layer.register_forward_pre_hook(_collector(name, sums, getattr(layer, BUFFER).numel()))
             for name, layer in chosen.items()]
    try:
        with torch.no_grad():
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, layer in chosen.items():
        total, count = sums.get(name, (None, 0))
        v = getattr(layer, BUFFER)
        mean = total / max(count, 1) if total is not None else torch.zeros_like(v)
        if mean.norm() < 1e-12:  # a dead input: any unit vector will do
            mean = torch.ones_like(v)
        v.copy_(F.normalize(mean.to(v), dim=0))
        out[name] = v
    return out


def _collector(name: str, sums: dict, m: int):
    def hook(_module, args):
        x = args[0].detach().float().reshape(-1, m)
        total, count = sums.get(name, (0, 0))
        sums[name] = (total + x.sum(0), count + x.shape[0])
    return hook


def vector_for(lora_A: Any) -> Optional[torch.Tensor]:
    """The `velora_v` buffer of the layer that owns this `lora_A` parameter, if `prepare` created one."""
    try:
        ref = _LAYER_OF_A.get(lora_A)
    except TypeError:
        return None
    layer = ref() if ref is not None else None
    return getattr(layer, BUFFER, None) if layer is not None else None


def freeze_lora_A(model: nn.Module) -> int:
    """LoRA-FA (arXiv:2308.03303): freeze every LoRA A, train B only. Returns how many A were frozen.

    fxlora's exact rewrite then saves x A^T (T x r) per site instead of x (T x in).
    """
    n = 0
    for layer in lora_layers(model).values():
        for lin in layer.lora_A.values():
            lin.weight.requires_grad_(False)
            n += 1
    return n
