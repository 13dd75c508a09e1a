"""IA3's forms: FLOPs and bytes saved for backward of output and input scaling.

"Activations are not cheap in LoRA, weights are" (withdrawn ICLR 2025 submission), Table 1, row (IA)^3:
the weight-based reformulation folds l into W. Symbols are fxlora.cost's (T tokens, i in,
o out); G = 2 T o i is one base-size GEMM. The ops are fxlora/ops/ia3.py.

    ia3_out  y = (x W^T + b) * l
        act        saves h (T o);                 FLOPs ~ 2G + 4 T o
        recompute  saves x (T i), rebuilds h;     FLOPs ~ 3G + 4 T o
        weight     saves x, dl = rowsum(dW' * W); FLOPs ~ 3G + 4 o i (+ 2 T o with a bias)
    ia3_in   y = (x * l) W^T + b
        act        saves x;                        FLOPs ~ 2G + 4 T i
        weight     saves x, dl = colsum(dW' * W);  FLOPs ~ 3G + 4 o i

x is what several sites read at once (k and v share the normed hidden state): an x-saving
form is charged T i / n for n sites reading that x, since autograd keeps one storage.
Forms are chosen by saved bytes, FLOPs only break ties: every exact way around saving IA3's
T x out product costs one base-size GEMM (h rebuilt, or dW' = dy^T x), which a per-site
FLOP budget would always refuse; the price is shown in `explain`. Where saved bytes tie
(recompute vs weight) the FLOP comparison depends on T, and the chooser guards it.
"""

from __future__ import annotations

from fxlora.cost.core import Form, I, O, T
from fxlora.kinds.base import LayerShape, x_saved_bytes

G = 2 * T * O * I  # one base-size GEMM


def _ia3_out(s: LayerShape) -> list[Form]:
    dx = G if s.x_needs_grad else 0
    bias = 2 * T * O if s.has_bias else 0
    act = G + T * O + 3 * T * O + dx + (T * O if s.has_bias else 0)
    weight = (O * I + O) + G + O * I + dx + G + 2 * O * I + bias
    return [
        Form("act", act, T * O * s.compute_bytes, True),
        Form("recompute", act + G, x_saved_bytes(s), True),
        Form("weight", weight, x_saved_bytes(s), *_merge_legal(s)),
    ]


def _ia3_in(s: LayerShape) -> list[Form]:
    dx = T * I if s.x_needs_grad else 0
    act = T * I + G + G + 2 * T * I + dx
    weight = O * I + G + G + 2 * O * I + ((O * I + G) if s.x_needs_grad else 0)
    return [
        Form("act", act, x_saved_bytes(s), True),
        Form("weight", weight, x_saved_bytes(s), *_merge_legal(s)),
    ]


def _merge_legal(s: LayerShape) -> tuple[bool, str]:
    if s.mixed_dtypes:
        return False, "the vectors scale in another dtype than W's matmul: merging them into W would change the rounding"
    return True, ""


def candidate_forms(shape: LayerShape) -> list[Form]:
    return _ia3_out(shape) if shape.kind == "ia3_out" else _ia3_in(shape)


def peft_saved_bytes(shape: LayerShape):
    """Autograd on PEFT's graph: h for dl (ia3_out); x (ia3_in)."""
    return T * O * shape.compute_bytes if shape.kind == "ia3_out" else x_saved_bytes(shape)
