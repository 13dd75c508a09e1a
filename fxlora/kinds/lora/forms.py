"""LoRA's forms: FLOPs and saved-for-backward bytes of every way to compute a LoRA linear.

RunLoRA (arXiv:2312.03415) Table 1 gives 2 forward and 8 backward bracketings; fxlora adds a
forward and two backwards that share one GEMM over x (or dY) between the base and the
adapter (forward 3, backward 9 and 10), and forward 4 (forward 1 keeping X A^T: fxlora.ops.lora). The pair is a form
"f<forward>/b<backward>", implemented by fxlora.ops.lora. Symbols are fxlora.cost's
(T tokens, i in, o out, r rank); the chooser is fxlora.cost.core.choose_form, with a FLOP
budget: every exact form saves about the same, so FLOPs must stay near the cheapest.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from fxlora.cost.core import ZERO, Form, I, O, R, T
from fxlora.ops.lora import BACKWARD_FORMS, FORWARD_FORMS, KEEPS_XA, MERGED_DX, MERGED_FORWARD


@dataclass(frozen=True)
class LoraShape:
    """What the cost model needs of a site; sizes may be sympy expressions of shape symbols."""

    tokens: sympy.Expr
    in_features: sympy.Expr
    out_features: sympy.Expr
    rank: sympy.Expr
    x_bytes: int  # element size of x as it enters the layer
    adapter_bytes: int  # element size the adapter computes in
    a_trainable: bool = True
    b_trainable: bool = True
    x_needs_grad: bool = True
    dropout: bool = False
    mixed_dtypes: bool = False  # base and adapter compute in different dtypes (bf16 W, fp32 A/B)
    eager_masks: bool = True  # dropout draws eager's masks (Config.eager_masks) or masks hashed from a graph-drawn seed
    recomputed: bool = False  # in a checkpointed region: the forward runs again in backward,
    # so dropout stays the traced op (its RNG is replayed by AOTAutograd) and the op reads drop(x),
    seeded_masks: bool = False  # or (hashed masks allowed) the op hashes its mask from a seed the graph drew

    @property
    def traced_dropout(self) -> bool:
        return self.dropout and self.recomputed


@dataclass(frozen=True)
class LoraSpec:
    """What the rewrite builds: RunLoRA's (forward, backward) pair and how a dropout mask
    reaches backward (replayed from its RNG state, or kept packed at 1 bit per element)."""

    forward: int
    backward: int
    packed_mask: bool = False
    fast_rng: bool = False
    traced_dropout: bool = False  # the op reads the traced graph's drop(x) (`x_adapter`) and draws nothing
    seeded: bool = False  # the op draws its mask from a seed the graph drew (a region's recompute reads the same)


def _gemm(m, n, k):
    return 2 * m * n * k


def forward_flops(form: int, save_xa: bool) -> sympy.Expr:
    """RunLoRA Table 1: forward1 2T(io + ri + or), forward2 2(ior + Tio) (+ X A^T when it is saved);
    forward 3 (fxlora.ops.lora): 2(ior + T(o + r)i), the X A^T columns riding on the base GEMM."""
    if form in (1, 4):  # 4 = 1 keeping X A^T
        return _gemm(T, O, I) + _gemm(T, R, I) + _gemm(T, O, R)
    if form == 3:
        return _gemm(O, I, R) + _gemm(T, O + R, I)
    return _gemm(O, I, R) + _gemm(T, O, I) + (_gemm(T, R, I) if save_xa else 0)


def backward_flops(form: int, shape: LoraShape, save_xa: bool) -> sympy.Expr:
    """RunLoRA Table 1 backward1..8, composed GEMM by GEMM so frozen A or B drop their terms.

    With A and B trainable and x needing grad this is Table 1 (tests check it), but for
    backward6: Table 1 prints `+ 4ior`, the GEMMs it names cost `+ 2ior` (only dA's
    (X^T dY) B^T multiplies i, o and r; dB reuses X A^T). We price what we run.
    """
    dA_by, dB_by, dX_by = BACKWARD_FORMS[form]
    need_A, need_B, need_x = shape.a_trainable, shape.b_trainable, shape.x_needs_grad
    flops = 0
    if (need_A and dA_by == "z1") or (need_x and dX_by != "merged"):
        flops += _gemm(T, R, O)  # Z1 = dY B (the *_cat bracketings: r more columns of dX's GEMM)
    if (need_A and dA_by == "xtdy") or (need_B and dB_by == "xtdy" and not save_xa):
        flops += _gemm(O, I, T)  # Z2 = dY^T X
    if need_A:
        flops += _gemm(R, I, T) if dA_by == "z1" else _gemm(R, I, O)
    if need_B:
        if save_xa:
            flops += _gemm(O, R, T)
        elif dB_by == "xa":
            flops += _gemm(T, R, I) + _gemm(O, R, T)  # rebuild X A^T, then dY^T (X A^T)
        else:
            flops += _gemm(O, R, I)
    if need_x:
        if dX_by in MERGED_DX:
            flops += _gemm(O, I, R) + _gemm(T, I, O)
        else:
            flops += _gemm(T, I, O) + _gemm(T, I, R)
    return flops


def saved_bytes(shape: LoraShape, save_xa: bool, packed_mask: bool = False, keeps_xa: bool = False) -> sympy.Expr:
    """What the op keeps for backward beyond parameters: X (T i), or X A^T (T r) when A is frozen;
    forwards 3 and 4 (`keeps_xa`) keep X A^T as well as X.

    A replayed dropout mask adds only its RNG state (a few KiB at most, counted as 0); a
    packed one adds T i / 8 bytes (1 bit per element of x).
    """
    mask = T * I / 8 if packed_mask else ZERO
    if save_xa:
        return T * R * shape.adapter_bytes + mask
    if shape.a_trainable or shape.b_trainable:
        return T * I * shape.x_bytes + mask + (T * R * shape.adapter_bytes if keeps_xa else ZERO)
    return ZERO


def transient_bytes(forward: int, backward: int, shape: LoraShape) -> sympy.Expr:
    """The merged weight W + s B A (o x i) that forward 2 and the merged-dX backwards build.

    It is never saved (the backward op builds it again), so it lives only inside one op,
    while the unsharded W it is built from lives anyway. Under FSDP this is what keeps
    resharding intact (docs/distributed.md): at most one merged copy at a time, never
    between forward and backward.
    """
    merged = forward in MERGED_FORWARD or (shape.x_needs_grad and BACKWARD_FORMS[backward][2] in MERGED_DX)
    return O * I * shape.adapter_bytes if merged else ZERO


def peft_saved_bytes(shape: LoraShape) -> sympy.Expr:
    """Autograd on PEFT's graph: X (or dropout(X) plus its bool mask) for dA, and X A^T for dB."""
    xa = T * R * shape.adapter_bytes if shape.b_trainable else 0
    if not shape.a_trainable:
        return xa
    if shape.dropout:
        return T * I * shape.adapter_bytes + T * I + xa
    return T * I * shape.x_bytes + xa


def velora_form(shape: LoraShape, sub_token: int) -> Form:
    """VeLoRA (arXiv:2405.17991) on forward 1 / backward 1 (A trainable): saves z_p = group(x) v (T x i/M)
    and X A^T (T x r, so dB stays exact) instead of X. Lossy in dA only; opt-in (docs/lossy.md).

    FLOPs: forward 1, plus the projection (2 T i) and X A^T kept; backward 1 without the X A^T
    rebuild, plus x_hat = z_p v^T (T i).
    """
    M = sympy.Integer(sub_token)
    saved = T * (I / M) * shape.adapter_bytes + (T * R * shape.adapter_bytes if shape.b_trainable else 0)
    flops = forward_flops(1, False) + 2 * T * I + backward_flops(1, shape, save_xa=True) + T * I
    return Form(f"f1/b1+velora(M={sub_token})", sympy.expand(flops), sympy.expand(saved), lossy=f"velora(M={sub_token})",
                spec=LoraSpec(1, 1))


def candidate_forms(shape: LoraShape) -> list[Form]:
    """Every (forward, backward) pair, with why it is illegal where it is; with dropout, each
    legal pair once with its mask replayed and once kept packed ("+bits")."""
    save_xa = not shape.a_trainable and shape.b_trainable
    forms = []
    for fwd in FORWARD_FORMS:
        for bwd in BACKWARD_FORMS:
            dX_by = BACKWARD_FORMS[bwd][2]
            why_not = ""
            if shape.dropout and fwd in MERGED_FORWARD:
                why_not = "dropout: W x and B A drop(x) read different inputs, no merged weight"
            elif shape.dropout and dX_by in MERGED_DX:
                why_not = "dropout: dX of the adapter passes the mask, no merged weight"
            elif shape.mixed_dtypes and (fwd in MERGED_FORWARD or dX_by in MERGED_DX):
                why_not = "base and adapter compute in different dtypes: W + s B A would change the rounding"
            elif shape.mixed_dtypes and dX_by == "split_cat":
                why_not = "base and adapter compute in different dtypes: [W | s B] is one GEMM in one dtype"
            elif not shape.x_needs_grad and dX_by.endswith("_cat"):
                why_not = "x needs no gradient: no dX GEMM to share with dY B"
            xa_saved = save_xa or fwd in KEEPS_XA
            if not why_not and xa_saved and BACKWARD_FORMS[bwd][1] == "xtdy":
                twin = next(k for k, v in BACKWARD_FORMS.items() if v == (BACKWARD_FORMS[bwd][0], "xa", dX_by))
                why_not = f"X A^T is kept, so dB reads it: the same computation as f{fwd}/b{twin}"
            flops = sympy.expand(forward_flops(fwd, save_xa) + backward_flops(bwd, shape, xa_saved))
            # Hashed masks (fxlora.ops.lora.hashed_keep) replay in one fused pass: a packed record only adds bytes.
            packs = (False, True) if shape.eager_masks else (False,)
            if shape.traced_dropout and shape.seeded_masks and not why_not:  # a region may draw from a seed instead
                for packed in packs:
                    forms.append(Form(
                        f"f{fwd}/b{bwd}+seeded" + ("+bits" if packed else ""), flops,
                        saved_bytes(shape, save_xa, packed, fwd in KEEPS_XA), True, "",
                        transient_bytes=transient_bytes(fwd, bwd, shape), spec=LoraSpec(fwd, bwd, packed, True, seeded=True),
                    ))
            if shape.traced_dropout and dX_by == "split_cat":
                why_not = "the adapter reads the traced drop(x): its dX goes to another input than dY W's"
            masks = packs if shape.dropout and not shape.traced_dropout and not why_not else (False,)
            draws = shape.dropout and not shape.traced_dropout
            for packed in masks:
                forms.append(Form(
                    f"f{fwd}/b{bwd}" + ("+bits" if packed else "") + ("+traced-mask" if shape.traced_dropout else ""),
                    flops, saved_bytes(shape, save_xa, packed, fwd in KEEPS_XA),
                    not why_not, why_not, transient_bytes=transient_bytes(fwd, bwd, shape),
                    spec=LoraSpec(fwd, bwd, packed, draws and not shape.eager_masks, shape.traced_dropout),
                ))
    return forms
