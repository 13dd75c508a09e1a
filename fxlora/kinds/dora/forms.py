"""DoRA's forms: one LoRA linear z over the tokens and the magnitude applied to it.

Every site is rewritten to (fxlora/kinds/dora/match.py names the variants)

    scaled_bias:    y = c * z,                      z = x W^T + b + s (u A^T) B^T
    unscaled_bias:  y = c * z + b,                  z = x W^T + s (x A^T) B^T
    dropped_base:   y = (x - d) W^T + b + c * z,    z = d W^T + s (d A^T) B^T,  d = drop(x)

with c = m / ||W + s B A|| traced as before (o x i work once per step). z is `fxlora::lora_linear`
in one of RunLoRA's (forward, backward) pairs ("Run LoRA Run", arXiv:2312.03415, Table 1, and
fxlora.ops.lora's forward 3 / backward 9); the products with c stay in the graph, where
Inductor fuses them into z's consumers. What backward keeps: the op's x (or d), X A^T for
forms 3/4, and z once for the magnitude's gradient (dm = sum_t dY * z / n) instead of PEFT's
two token tensors (the base output and B(A(u))). With the weight forms z is one GEMM over the
merged W + s B A, so a DoRA step reads the tokens as often as a LoRA step does.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from fxlora.cost.core import ZERO, Form, I, O, R, T


@dataclass(frozen=True)
class DoraShape:
    tokens: sympy.Expr
    in_features: sympy.Expr
    out_features: sympy.Expr
    rank: sympy.Expr
    x_bytes: int
    variant: str
    adapter_dropout: bool  # u = drop(x) while the base reads x (torchtune with dropout)
    dropout: bool  # a traced drop(x) whose bool mask backward keeps
    a_trainable: bool = True
    b_trainable: bool = True
    m_trainable: bool = True
    mixed_dtypes: bool = False
    dropout_p: float = 0.0
    recomputed: bool = False  # in a checkpointed region: a form that draws its own mask is illegal
    sparse_kernels: bool = False  # fp32 on the CPU, where the sparse form's kernels were measured
    eager_masks: bool = True  # Config.eager_masks: the sparse form draws eager's masks or the fast generator's


@dataclass(frozen=True)
class DoraSpec:
    forward: int
    backward: int
    sparse: bool = False  # fxlora::dora_dropped_linear (draws its mask) instead of lora_linear on drop(x)
    fast_rng: bool = False


# what each form is, for people -> (forward, backward, keeps X A^T, merged weight); its name is "f<fwd>/b<bwd>"
FORMS = {
    "weight": (3, 9, True, True),  # z and X A^T from one GEMM over [W + s B A; A]; dX and dY B from one
    "weight-lean": (2, 5, False, True),  # z over W + s B A; X A^T rebuilt in backward (RunLoRA forward 2)
    "split": (1, 1, False, False),  # RunLoRA forward 1 / backward 1
    "split+xa": (4, 1, True, False),  # forward 1 keeping X A^T
}


def _gemm(m, n, k):
    return 2 * m * n * k


def form_flops(forward: int, backward: int, shape: DoraShape) -> sympy.Expr:
    """RunLoRA Table 1 for z (forward 1/2, backward 1/5; forward 3 and backward 9: fxlora.ops.lora),
    plus what every form shares: the norm's B A (o i r), the products with c, and the dropped
    base GEMMs of "dropped_base" (forward and dX)."""
    keeps_xa = forward in (3, 4)
    fwd = {1: _gemm(T, O, I) + _gemm(T, R, I) + _gemm(T, O, R), 4: _gemm(T, O, I) + _gemm(T, R, I) + _gemm(T, O, R),
           2: _gemm(O, I, R) + _gemm(T, O, I), 3: _gemm(O, I, R) + _gemm(T, O + R, I)}[forward]
    bwd = _gemm(T, R, O)  # Z1 = dY B (a column block of dX's GEMM in backward 9)
    bwd += _gemm(R, I, T) if shape.a_trainable else 0  # dA = Z1^T X
    if shape.b_trainable:
        bwd += _gemm(O, R, T) + (0 if keeps_xa else _gemm(T, R, I))  # dB = dY^T (X A^T), rebuilt or kept
    bwd += _gemm(O, I, R) + _gemm(T, I, O) if backward in (5, 9) else _gemm(T, I, O) + _gemm(T, I, R)
    shared = _gemm(O, I, R) + 3 * O * I + 3 * T * O
    if shape.variant == "dropped_base":
        shared += 2 * _gemm(T, O, I)
    return sympy.expand(fwd + bwd + shared)


def form_saved_bytes(keeps_xa: bool, shape: DoraShape) -> sympy.Expr:
    """x (or d) for dA and X A^T's rebuild; X A^T (T r) for forms 3/4; z (T o) for dm; a traced
    dropout's bool mask (T i)."""
    saved = T * I * shape.x_bytes if (shape.a_trainable or shape.b_trainable) else ZERO
    saved += T * R * shape.x_bytes if keeps_xa else ZERO
    saved += T * O * shape.x_bytes if shape.m_trainable else ZERO
    return saved + (T * I if shape.dropout else ZERO)


def peft_saved_bytes(shape: DoraShape) -> sympy.Expr:
    """Autograd on PEFT's (and torchtune's) graph: x (or drop(x)) for dA, X A^T for dB, the base
    output and B(A(u)) for dm (two T o tensors), a dropout's bool mask."""
    saved = T * I * shape.x_bytes + T * R * shape.x_bytes
    saved += 2 * T * O * shape.x_bytes if shape.m_trainable else ZERO
    return saved + (T * I if shape.dropout else ZERO)


def sparse_mask_form(shape: DoraShape) -> Form:
    """PEFT's dropout variant with its two dense passes over the dropped input replaced by sparse
    work in p (fxlora.ops.dora): x W^T and S W^T (S: the dropped fraction p of x) forward, one dense
    dX GEMM and an SDDMM at the dropped positions backward. Keeps x, z and the mask at 1 bit/element."""
    p = sympy.Float(shape.dropout_p, 6)
    fwd = _gemm(T, O, I) + p * _gemm(T, O, I) + _gemm(T, R, I) + _gemm(T, O, R)
    bwd = _gemm(T, I, O) + p * _gemm(T, I, O) + _gemm(T, R, O) + _gemm(T, I, R)
    bwd += (_gemm(R, I, T) if shape.a_trainable else 0) + (_gemm(O, R, T) + _gemm(T, R, I) if shape.b_trainable else 0)
    saved = T * I * shape.x_bytes + (T * O * shape.x_bytes if shape.m_trainable else ZERO) + T * I / 8
    why_not = ""
    if shape.recomputed:
        why_not = "in a checkpointed region: its mask must be the traced graph's, which the recompute replays"
    elif not shape.sparse_kernels:
        why_not = "sparse kernels measured for fp32 on the CPU only"
    return Form("sparse-mask", sympy.expand(fwd + bwd + 3 * T * O), sympy.expand(saved), not why_not, why_not,
                spec=DoraSpec(0, 0, sparse=True, fast_rng=not shape.eager_masks))


def candidate_forms(shape: DoraShape) -> list[Form]:
    # PEFT's graph: forward 1 / backward 1 plus B A pushed through an identity (i i r + i r o)
    traced_flops = form_flops(1, 1, shape) + _gemm(I, I, R) + _gemm(I, R, O) - _gemm(O, I, R)
    forms = [Form("traced", sympy.expand(traced_flops), peft_saved_bytes(shape), True, "", traced=True)]
    for name, (fwd, bwd, keeps_xa, merged) in FORMS.items():
        why_not = ""
        if merged and shape.adapter_dropout:
            why_not = "the adapter reads drop(x), the base reads x: no merged weight"
        elif merged and shape.mixed_dtypes:
            why_not = "base and adapter compute in different dtypes: W + s B A would change the rounding"
        forms.append(Form(f"f{fwd}/b{bwd}", form_flops(fwd, bwd, shape), sympy.expand(form_saved_bytes(keeps_xa, shape)),
                          not why_not, why_not, transient_bytes=O * I * shape.x_bytes if merged else ZERO,
                          spec=DoraSpec(fwd, bwd)))
    if shape.variant == "dropped_base" and shape.dropout:
        forms.append(sparse_mask_form(shape))
    return forms
