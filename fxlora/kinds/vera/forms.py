"""VeRA's forms: FLOPs and bytes saved for backward.

"Activations are not cheap in LoRA, weights are" (withdrawn ICLR 2025 submission), Table 1, row VeRA:
the weight-based form merges lambda_b B diag(lambda_d) A into W. Symbols are fxlora.cost's
(T tokens, i in, o out, r VeRA's rank); G = 2 T o i. The op is fxlora/ops/vera.py.

    vera     y = x W^T + b + lambda_b * B (lambda_d * A x)
        act        saves u = x A^T (T r);          FLOPs ~ 2G + 6 T r (i + o) - 2 T r i (no dx: fewer)
        weight     saves x, backward via dy^T(x A^T);  FLOPs ~ 2G + 4 o i r + 2 T r (i + o)

Chosen by saved bytes, FLOPs break ties (where x is shared r-fold saved bytes tie and the
FLOP comparison depends on T: the chooser guards it).
"""

from __future__ import annotations

from fxlora.cost.core import Form, I, O, R, T
from fxlora.kinds.base import LayerShape, x_saved_bytes

G = 2 * T * O * I  # one base-size GEMM


def _vera(s: LayerShape) -> list[Form]:
    train = s.train_d or s.train_b
    fwd_act = G + 2 * T * R * I + T * R + 2 * T * R * O + 2 * T * O
    bwd_act = (2 * T * R * O + 2 * T * O if s.train_b else 0) + 2 * T * O * R + (2 * T * R if s.train_d else 0)
    bwd_act += (G + T * R + 2 * T * R * I) if s.x_needs_grad else 0
    merged = 2 * O * R * I + O * R + R * I + O * I
    fwd_w = merged + G
    bwd_w = (2 * T * I * R + 2 * T * O * R + 3 * O * R * (int(s.train_d) + int(s.train_b)) if train else 0)
    bwd_w += (merged + G) if s.x_needs_grad else 0
    return [
        Form("act", fwd_act + bwd_act, T * R * s.compute_bytes, True),
        Form("weight", fwd_w + bwd_w, x_saved_bytes(s), *_merge_legal(s)),
    ]


def _merge_legal(s: LayerShape) -> tuple[bool, str]:
    if s.mixed_dtypes:
        return False, "the vectors scale in another dtype than W's matmul: merging them into W would change the rounding"
    return True, ""


def candidate_forms(shape: LayerShape) -> list[Form]:
    return _vera(shape)


def peft_saved_bytes(shape: LayerShape):
    """Autograd on PEFT's graph: x A^T, and B(lambda_d x A^T) for d lambda_b."""
    return T * R * shape.compute_bytes + (T * O * shape.compute_bytes if shape.train_b else 0)
