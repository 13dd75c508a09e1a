"""Symbolic cost model: FLOPs and saved-for-backward bytes of every way to compute a LoRA linear.

Formulas are sympy expressions in T (tokens = product of x's leading dims), i (in),
o (out), r (rank); `price` substitutes a site's sizes, which stay symbolic under
dynamic shapes. `choose_form` compares them through a `decide` callback: the backend
passes ShapeEnv.evaluate_expr, so a choice that depends on T installs a guard and a
batch crossing the threshold recompiles into the other form.

Imports nothing else from fxlora.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import sympy

T, I, O, R = sympy.symbols("T i o r", positive=True, integer=True)

OBJECTIVES = ("saved_bytes", "flops")
# RunLoRA backward k -> (dA bracketing, dB bracketing, dX bracketing); mirrors fxlora.ops.lora.
BACKWARD_FORMS = {
    1: ("z1", "xa", "split"),
    2: ("z1", "xtdy", "split"),
    3: ("xtdy", "xtdy", "split"),
    4: ("xtdy", "xtdy", "merged"),
    5: ("z1", "xa", "merged"),
    6: ("xtdy", "xa", "split"),
    7: ("xtdy", "xa", "merged"),
    8: ("z1", "xtdy", "merged"),
}


@dataclass(frozen=True)
class SiteShape:
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


@dataclass(frozen=True)
class Form:
    """One candidate: a forward and a backward bracketing, with their formulas in T, i, o, r."""

    forward: int
    backward: int
    flops: sympy.Expr
    saved_bytes: sympy.Expr
    legal: bool
    why_not: str = ""
    lossy: str = ""  # "" for the exact forms; e.g. "velora(M=16)" for an opt-in lossy one
    transient_bytes: sympy.Expr = sympy.Integer(0)  # a merged W + s B A alive while the op runs

    @property
    def name(self) -> str:
        return f"f{self.forward}/b{self.backward}" + (f"+{self.lossy}" if self.lossy else "")


@dataclass(frozen=True)
class PricedForm:
    form: Form
    flops: sympy.Expr  # the formula with the site's sizes substituted
    saved_bytes: sympy.Expr
    transient_bytes: sympy.Expr = sympy.Integer(0)


def _gemm(m, n, k):
    return 2 * m * n * k


def forward_flops(form: int, save_xa: bool) -> sympy.Expr:
    """RunLoRA Table 1: forward1 2T(io + ri + or), forward2 2(ior + Tio) (+ X A^T when it is saved)."""
    if form == 1:
        return _gemm(T, O, I) + _gemm(T, R, I) + _gemm(T, O, R)
    return _gemm(O, I, R) + _gemm(T, O, I) + (_gemm(T, R, I) if save_xa else 0)


def backward_flops(form: int, shape: SiteShape, save_xa: bool) -> sympy.Expr:
    """RunLoRA Table 1 backward1..8, composed GEMM by GEMM so frozen A or B drop their terms.

    With A and B trainable and x needing grad this is Table 1 (tests check it), but for
    backward6: Table 1 prints `+ 4ior`, the GEMMs it names cost `+ 2ior` (only dA's
    (X^T dY) B^T multiplies i, o and r; dB reuses X A^T). We price what we run.
    """
    dA_by, dB_by, dX_by = BACKWARD_FORMS[form]
    need_A, need_B, need_x = shape.a_trainable, shape.b_trainable, shape.x_needs_grad
    flops = 0
    if (need_A and dA_by == "z1") or (need_x and dX_by == "split"):
        flops += _gemm(T, R, O)  # Z1 = dY B
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
        if dX_by == "merged":
            flops += _gemm(O, I, R) + _gemm(T, I, O)
        else:
            flops += _gemm(T, I, O) + _gemm(T, I, R)
    return flops


def saved_bytes(shape: SiteShape, save_xa: bool) -> sympy.Expr:
    """What the op keeps for backward beyond parameters: X (T i), or X A^T (T r) when A is frozen.

    Dropout adds only its RNG state (a few KiB at most, counted as 0): the mask is replayed.
    """
    if save_xa:
        return T * R * shape.adapter_bytes
    if shape.a_trainable or shape.b_trainable:
        return T * I * shape.x_bytes
    return sympy.Integer(0)


def transient_bytes(forward: int, backward: int, shape: SiteShape) -> sympy.Expr:
    """The merged weight W + s B A (o x i) that forward 2 and the merged-dX backwards build.

    It is never saved (the backward op builds it again), so it lives only inside one op,
    while the unsharded W it is built from lives anyway. Under FSDP this is what keeps
    resharding intact (docs/distributed.md): at most one merged copy at a time, never
    between forward and backward.
    """
    merged = forward == 2 or (shape.x_needs_grad and BACKWARD_FORMS[backward][2] == "merged")
    return O * I * shape.adapter_bytes if merged else sympy.Integer(0)


def peft_saved_bytes(shape: SiteShape) -> sympy.Expr:
    """Autograd on PEFT's graph: X (or dropout(X) plus its bool mask) for dA, and X A^T for dB."""
    xa = T * R * shape.adapter_bytes if shape.b_trainable else 0
    if not shape.a_trainable:
        return xa
    if shape.dropout:
        return T * I * shape.adapter_bytes + T * I + xa
    return T * I * shape.x_bytes + xa


def velora_form(shape: SiteShape, sub_token: int) -> Form:
    """VeLoRA (seed 002) on forward 1 / backward 1 (A trainable): saves z_p = group(x) v (T x i/M)
    and X A^T (T x r, so dB stays exact) instead of X. Lossy in dA only; opt-in (docs/lossy.md).

    FLOPs: forward 1, plus the projection (2 T i) and X A^T kept; backward 1 without the X A^T
    rebuild, plus x_hat = z_p v^T (T i).
    """
    M = sympy.Integer(sub_token)
    saved = T * (I / M) * shape.adapter_bytes + (T * R * shape.adapter_bytes if shape.b_trainable else 0)
    flops = forward_flops(1, False) + 2 * T * I + backward_flops(1, shape, save_xa=True) + T * I
    return Form(1, 1, sympy.expand(flops), sympy.expand(saved), True, lossy=f"velora(M={sub_token})")


def price_form(form: Form, shape: SiteShape) -> PricedForm:
    sizes = {T: shape.tokens, I: shape.in_features, O: shape.out_features, R: shape.rank}

    def at(expr) -> sympy.Expr:
        return sympy.expand(sympy.sympify(expr).subs(sizes))

    return PricedForm(form, at(form.flops), at(form.saved_bytes), at(form.transient_bytes))


def candidate_forms(shape: SiteShape) -> list[Form]:
    """Every (forward, backward) pair, with why it is illegal where it is."""
    save_xa = not shape.a_trainable and shape.b_trainable
    forms = []
    for fwd in (1, 2):
        for bwd in BACKWARD_FORMS:
            why_not = ""
            if shape.dropout and fwd == 2:
                why_not = "dropout: W x and B A drop(x) read different inputs, no merged weight"
            elif shape.dropout and BACKWARD_FORMS[bwd][2] == "merged":
                why_not = "dropout: dX of the adapter passes the mask, no merged weight"
            elif shape.mixed_dtypes and (fwd == 2 or BACKWARD_FORMS[bwd][2] == "merged"):
                why_not = "base and adapter compute in different dtypes: W + s B A would change the rounding"
            flops = forward_flops(fwd, save_xa) + backward_flops(bwd, shape, save_xa)
            forms.append(Form(
                fwd, bwd, sympy.expand(flops), saved_bytes(shape, save_xa), not why_not, why_not,
                transient_bytes=transient_bytes(fwd, bwd, shape),
            ))
    return forms


def price(shape: SiteShape) -> list[PricedForm]:
    return [price_form(f, shape) for f in candidate_forms(shape)]


def cheaper(a: PricedForm, b: PricedForm, first: str, second: str, decide: Callable[[sympy.Basic], bool]) -> bool:
    """Whether `a` costs less than `b` by figure `first`, ties broken by `second`; `decide` may guard on T."""
    fa, fb = getattr(a, first), getattr(b, first)
    if decide(sympy.Lt(fa, fb)):
        return True
    if decide(sympy.Gt(fa, fb)):
        return False
    return decide(sympy.Lt(getattr(a, second), getattr(b, second)))


def choose_form(
    priced: list[PricedForm],
    *,
    objective: str = "saved_bytes",
    flop_budget: float = 0.1,
    decide: Callable[[sympy.Basic], bool] = bool,
    forced: Optional[tuple[int, int]] = None,
) -> tuple[PricedForm, str]:
    """Pick a legal form and say why.

    objective "saved_bytes": fewest saved bytes among forms within (1 + flop_budget) x the
    cheapest FLOPs, ties to fewer FLOPs. "flops": fewest FLOPs, ties to fewer bytes.
    `decide` evaluates a sympy relation (installing a shape guard when it is symbolic).
    """
    legal = [p for p in priced if p.form.legal]
    if forced is not None:
        match = [p for p in legal if (p.form.forward, p.form.backward) == forced]
        if match:
            return match[0], "forced by the force_form option"
        illegal = next((p for p in priced if (p.form.forward, p.form.backward) == forced), None)
        note = f"forced form f{forced[0]}/b{forced[1]} is illegal here ({illegal.form.why_not}); " if illegal else ""
    else:
        note = ""

    def better(a: PricedForm, b: PricedForm, first: str, second: str) -> bool:
        return cheaper(a, b, first, second, decide)

    cheapest = legal[0]
    for p in legal[1:]:
        if better(p, cheapest, "flops", "saved_bytes"):
            cheapest = p
    if objective == "flops":
        return cheapest, note + "fewest FLOPs"
    budget = sympy.Rational(str(1 + flop_budget)) * cheapest.flops
    pool = [p for p in legal if decide(sympy.Le(p.flops, budget))]
    best = pool[0]
    for p in pool[1:]:
        if better(p, best, "saved_bytes", "flops"):
            best = p
    why = f"fewest saved bytes within {flop_budget:.0%} of the cheapest FLOPs ({cheapest.form.name})"
    return best, note + why
