"""ReFT's forms: the cost of the two ways to compute an intervention on a linear layer's
output (docs/reft.md; "Activations are not cheap in LoRA, weights are", Table 1, rows LoReFT
and DiReFT, for the weight-based fold).

Symbols as in fxlora.cost: T tokens, i the base layer's input, o = d its output (the
intervened width), r the intervention's rank. G = 2 T o i is one base-size GEMM. k = 2
projections of h for LoReFT (W_L h and R h), 1 for DiReFT.

    site   y = h + R^T (U' h + b_L),  h = x W^T + b       (LoReFT: U' h = W_L h - R h)
    act    the traced chain: saves h (T o) and the rank-r activation (T r)
           FLOPs ~ 2G + (6k + 6) T o r  (G without dx)
    weight y = x W'^T + c,  W' = W + R^T (U W),  c = b + R^T (U b + b_L),  U = W_L - R (DiReFT: W_1)
           saves x (T i; nothing when the partitioner rebuilds it) and W' (o i) for dx
           FLOPs ~ 3G + 10 o r i  (2G without dx): dW' = dy^T x is the extra base-size GEMM

Building W' as W + R^T (U W) costs 4 o r i, not the 2 o^2 r + 2 o^2 i of forming
M = I + R^T U (o x o) first. Saved bytes cross over at a token count: the weight form
saves less where T (o + r) > T i + o i (x not rebuilt), i.e. when i < o + r and T is large,
or always T > o i / (o + r) when x is rebuilt; the extra GEMM means the act form always
has fewer FLOPs once i > ~(6k+6)/2 r. fxlora.cost.core.choose_form decides per site; the
act form is `traced`: choosing it keeps the graph as it is.
"""

from __future__ import annotations

import sympy

from fxlora.cost.core import Form, I, O, R, T
from fxlora.kinds.base import LayerShape

G = 2 * T * O * I


def candidate_forms(s: LayerShape) -> list[Form]:
    k = 2 if s.kind == "loreft" else 1
    dx_act = G if s.x_needs_grad else 0
    act_fwd = G + 2 * k * T * O * R + 2 * T * R * O + T * O + (T * R if k == 2 else 0)
    act_bwd = 2 * T * R * O + 2 * T * R * O + 2 * k * T * O * R + 2 * k * T * R * O + T * O + dx_act
    act_saved = T * (O + R) * s.compute_bytes
    build = (O * R if k == 2 else 0) + 2 * R * O * I + 2 * O * R * I + O * I + (4 * O * R + O if s.has_bias else 2 * O * R)
    w_fwd = build + G
    w_bwd = G + 2 * O * R * I + 2 * O * R * I + 2 * R * I * O + 2 * R * O + (G if s.x_needs_grad else 0)
    x_saved = sympy.Integer(0) if s.x_rebuilt else T * I * s.x_bytes
    w_saved = x_saved + ((O * I + R * I) * s.compute_bytes if s.x_needs_grad else R * I * s.compute_bytes)
    return [
        Form("act", act_fwd + act_bwd, act_saved, traced=True),
        Form("weight", w_fwd + w_bwd, w_saved, not s.low_precision,
                    "W' = W + R^T U W in a 16-bit dtype rounds the intervention's small delta away" if s.low_precision else ""),
    ]


def peft_saved_bytes(shape: LayerShape) -> sympy.Expr:
    """What the traced (pyreft-style) chain saves: the act form."""
    return candidate_forms(shape)[0].saved_bytes
