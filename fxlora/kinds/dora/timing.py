"""One DoRA form, timed: the site's token-side work (z's op and the products with c; for PEFT's
dropout variant also the traced dropout and the (x - d) W^T GEMM, or the sparse-mask op that
replaces them all) forward and backward on random tensors of the site's sizes
(fxlora.cost.timing measures and caches). The norm is the same in every form and is not timed."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fxlora.cost.core import Form
from fxlora.cost.timing import TimingCase
from fxlora.graph.read import value
from fxlora.kinds.dora.forms import DoraShape
from fxlora.kinds.dora.match import DoraSite
from fxlora.ops import dora as _dora_ops, lora as _lora_ops  # noqa: F401  (register torch.ops.fxlora.*)


def time_case(site: DoraSite, shape: DoraShape, form: Form, at_hints: Callable) -> Optional[TimingCase]:
    if form.spec is None or form.traced:
        return None
    spec = form.spec
    T, i, o, r = (at_hints(e) for e in (shape.tokens, shape.in_features, shape.out_features, shape.rank))
    dtype, device, p = site.dtype, value(site.nodes.x).device, float(site.dropout_p or 0.0)
    conv1d = site.base_kind == "conv1d"
    key = (f"dora {form.name} {site.variant} T={T} i={i} o={o} r={r} dtype={dtype} p={p:g} fast={spec.fast_rng} "
           f"grads={int(site.a_trainable)}{int(site.b_trainable)}{int(site.m_trainable)} bias={int(site.has_bias)} "
           f"conv1d={int(conv1d)}")

    def build() -> Callable[[], None]:
        x = torch.randn(T, i, dtype=dtype, device=device, requires_grad=True)
        W = torch.randn((i, o) if conv1d else (o, i), dtype=dtype, device=device) * i**-0.5
        Wr = W.t() if conv1d else W
        bias = torch.zeros(o, dtype=dtype, device=device) if site.has_bias else None
        A = (torch.randn(r, i, dtype=dtype, device=device) * i**-0.5).requires_grad_(site.a_trainable)
        B = (torch.randn(o, r, dtype=dtype, device=device) * 0.01).requires_grad_(site.b_trainable)
        m = torch.ones(o, dtype=dtype, device=device, requires_grad=site.m_trainable)
        s = torch.tensor(2.0)
        wrt = [t for t in (x, A, B, m) if t.requires_grad]
        dy = torch.randn(T, o, dtype=dtype, device=device)

        def z_of(u, b=None, **flags):
            return torch.ops.fxlora.lora_linear(u, W, b, A, B, s, 0.0, dtype, dtype, dtype, spec.forward, spec.backward,
                                                conv1d, False, **flags)[0]

        def forward():
            c = (m * 1.1).view(1, -1)
            if spec.sparse:
                return torch.ops.fxlora.dora_dropped_linear(x, W, bias, A, B, s, c, p, conv1d, spec.fast_rng)[0]
            if site.variant == "dropped_base":
                d = F.dropout(x, p)
                return F.linear(x - d, Wr, bias) + c * z_of(d)
            if site.variant == "scaled_bias":
                flags = {"x_adapter": F.dropout(x, p)} if shape.adapter_dropout else {}
                return c * z_of(x, bias, **flags)
            y = c * z_of(x)
            return y + bias if bias is not None else y

        def call() -> None:
            torch.autograd.grad(forward(), wrt, dy)

        return call

    return TimingCase(key, build)
