"""One LoRA form, timed: `fxlora::lora_linear` forward and backward on random tensors of
the site's sizes and dtypes (fxlora.cost.timing measures and caches)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fxlora.cost.core import Form
from fxlora.cost.timing import TimingCase
from fxlora.graph.read import value
from fxlora.kinds.lora.forms import LoraShape
from fxlora.kinds.lora.match import LoraSite
from fxlora.kinds.lora.rewrite import op_arguments


def time_case(site: LoraSite, shape: LoraShape, form: Form, at_hints: Callable) -> Optional[TimingCase]:
    if form.lossy or form.spec is None:
        return None
    spec = form.spec
    T, i, o, r = (at_hints(e) for e in (shape.tokens, shape.in_features, shape.out_features, shape.rank))
    positional, flags = op_arguments(site, spec)
    p, _, _, adapter_dtype, _, _, conv1d, _ = positional
    device = value(site.nodes.x).device
    sizes = (f"lora T={T} i={i} o={o} r={r} x={site.x_dtype} W={site.weight_dtype}@{site.compute_dtype} "
           f"AB={site.adapter_dtype}@{adapter_dtype} p={p:g} fast={spec.fast_rng} grads="
           f"{int(shape.x_needs_grad)}{int(site.a_trainable)}{int(site.b_trainable)} bias={int(site.has_bias)} "
           f"conv1d={int(conv1d)}" + (" recomputed: forward x2, traced dropout timed" if shape.recomputed else ""))
    key = sizes.replace("lora ", f"lora {form.name} ", 1)

    def build() -> Callable[[], None]:
        x = torch.randn(T, i, dtype=site.x_dtype, device=device, requires_grad=shape.x_needs_grad)
        W = torch.randn((i, o) if conv1d else (o, i), dtype=site.weight_dtype, device=device) * i**-0.5
        bias = torch.zeros(o, dtype=site.weight_dtype, device=device) if site.has_bias else None
        A = (torch.randn(r, i, dtype=site.adapter_dtype, device=device) * i**-0.5).requires_grad_(site.a_trainable)
        B = (torch.randn(o, r, dtype=site.adapter_dtype, device=device) * 0.01).requires_grad_(site.b_trainable)
        kwargs = dict(flags)
        if spec.seeded:
            kwargs["seed"] = torch.tensor(1234, dtype=torch.int64, device=device)
        # Hashed masks outside regions are timed with the seedless fast generator: every dropout form pays
        # one draw and one replay alike, and the eager hash (a dozen int64 passes, one fused kernel once
        # compiled) would only lengthen the first compile.
        wrt = [t for t in (x, A, B) if t.requires_grad]
        args = (x, W, bias, A, B, torch.tensor(2.0), *positional)
        dy = torch.randn(T, o, dtype=torch.promote_types(site.compute_dtype, adapter_dtype), device=device)

        def forward():
            if spec.traced_dropout:  # the traced drop(x) the op reads is part of the form's cost (eager's as a stand-in)
                kwargs["x_adapter"] = torch.nn.functional.dropout(x.to(adapter_dtype), site.dropout_p)
            return torch.ops.fxlora.lora_linear(*args, **kwargs)[0]

        def call() -> None:
            if shape.recomputed:  # a checkpointed region runs its forward again in backward
                with torch.no_grad():
                    forward()
            y = forward()
            if wrt:
                torch.autograd.grad(y, wrt, dy)

        return call

    return TimingCase(key, build, sizes)
