"""Symbolic cost of every form of an IA3 or VeRA site: FLOPs and bytes saved for backward.

Same symbols as fxlora/cost.py: T tokens, i in, o out, r VeRA's rank. G = 2 T o i is one
base-size GEMM. The forms and the weight-based rewrites they come from are seed 000,
Table 1 (rows (IA)^3 and VeRA); the ops are fxlora/ops/ia3.py and fxlora/ops/vera.py.

    ia3_out  y = (x W^T + b) * l
        act        saves h (T o);                 FLOPs ~ 2G + 4 T o
        recompute  saves x (T i), rebuilds h;     FLOPs ~ 3G + 4 T o
        weight     saves x, dl = rowsum(dW' * W); FLOPs ~ 3G + 4 o i (+ 2 T o with a bias)
    ia3_in   y = (x * l) W^T + b
        act        saves x;                        FLOPs ~ 2G + 4 T i
        weight     saves x, dl = colsum(dW' * W);  FLOPs ~ 3G + 4 o i
    vera     y = x W^T + b + lambda_b * B (lambda_d * A x)
        act        saves u = x A^T (T r);          FLOPs ~ 2G + 6 T r (i + o) - 2 T r i (no dx: fewer)
        weight     saves x, backward via dy^T(x A^T);  FLOPs ~ 2G + 4 o i r + 2 T r (i + o)

x is what several sites read at once (k and v share the normed hidden state): an x-saving
form is charged T i / n for n sites reading that x, since autograd keeps one storage.
`choose` with objective "saved_bytes" takes the fewest saved bytes and lets FLOPs only
break ties: every exact way around saving IA3's T x out product costs one base-size GEMM
(h rebuilt, or dW' = dy^T x), which a per-site FLOP budget would always refuse; the price
is shown in `explain`. Where saved bytes tie (ia3_out recompute vs weight; VeRA when x is
shared r-fold) the FLOP comparison depends on T, and `decide` guards it.

Imports nothing from fxlora but fxlora.cost (the symbols and PricedForm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import sympy

from fxlora.cost import I, O, PricedForm, R, T, cheaper

FORMS = {"ia3_out": ("act", "recompute", "weight"), "ia3_in": ("act", "weight"), "vera": ("act", "weight")}
G = 2 * T * O * I  # one base-size GEMM


@dataclass(frozen=True)
class ScalingShape:
    kind: str  # ia3_out, ia3_in, vera
    tokens: sympy.Expr
    in_features: sympy.Expr
    out_features: sympy.Expr
    rank: sympy.Expr  # VeRA's r; 0 for IA3
    x_bytes: int
    compute_bytes: int  # element size of W's matmul output
    shared_x: int = 1  # sites reading the same x
    x_needs_grad: bool = True
    has_bias: bool = False
    mixed_dtypes: bool = False  # the vectors scale in another dtype than W's matmul (bf16 autocast, fp32 l)
    train_d: bool = True  # VeRA: lambda_d trainable
    train_b: bool = True  # VeRA: lambda_b trainable
    x_rebuilt: bool = False  # x is a norm/pointwise output Inductor's partitioner may rebuild (rematerialize)


@dataclass(frozen=True)
class ScalingForm:
    name: str
    flops: sympy.Expr
    saved_bytes: sympy.Expr
    legal: bool
    why_not: str = ""


def _x_bytes(s: ScalingShape) -> sympy.Expr:
    """x once per group of sites reading it; nothing when the partitioner can rebuild it from
    tensors saved anyway (a norm's input and rstd, an MLP's gate and up: fxlora's rematerialize)."""
    return sympy.Integer(0) if s.x_rebuilt else T * I * s.x_bytes / s.shared_x


def _ia3_out(s: ScalingShape) -> list[ScalingForm]:
    dx = G if s.x_needs_grad else 0
    bias = 2 * T * O if s.has_bias else 0
    act = G + T * O + 3 * T * O + dx + (T * O if s.has_bias else 0)
    weight = (O * I + O) + G + O * I + dx + G + 2 * O * I + bias
    return [
        ScalingForm("act", act, T * O * s.compute_bytes, True),
        ScalingForm("recompute", act + G, _x_bytes(s), True),
        ScalingForm("weight", weight, _x_bytes(s), *_merge_legal(s)),
    ]


def _ia3_in(s: ScalingShape) -> list[ScalingForm]:
    dx = T * I if s.x_needs_grad else 0
    act = T * I + G + G + 2 * T * I + dx
    weight = O * I + G + G + 2 * O * I + ((O * I + G) if s.x_needs_grad else 0)
    return [
        ScalingForm("act", act, _x_bytes(s), True),
        ScalingForm("weight", weight, _x_bytes(s), *_merge_legal(s)),
    ]


def _vera(s: ScalingShape) -> list[ScalingForm]:
    train = s.train_d or s.train_b
    fwd_act = G + 2 * T * R * I + T * R + 2 * T * R * O + 2 * T * O
    bwd_act = (2 * T * R * O + 2 * T * O if s.train_b else 0) + 2 * T * O * R + (2 * T * R if s.train_d else 0)
    bwd_act += (G + T * R + 2 * T * R * I) if s.x_needs_grad else 0
    merged = 2 * O * R * I + O * R + R * I + O * I
    fwd_w = merged + G
    bwd_w = (2 * T * I * R + 2 * T * O * R + 3 * O * R * (int(s.train_d) + int(s.train_b)) if train else 0)
    bwd_w += (merged + G) if s.x_needs_grad else 0
    return [
        ScalingForm("act", fwd_act + bwd_act, T * R * s.compute_bytes, True),
        ScalingForm("weight", fwd_w + bwd_w, _x_bytes(s), *_merge_legal(s)),
    ]


def _merge_legal(s: ScalingShape) -> tuple[bool, str]:
    if s.mixed_dtypes:
        return False, "the vectors scale in another dtype than W's matmul: merging them into W would change the rounding"
    return True, ""


def candidate_forms(shape: ScalingShape) -> list[ScalingForm]:
    return {"ia3_out": _ia3_out, "ia3_in": _ia3_in, "vera": _vera}[shape.kind](shape)


def peft_saved_bytes(shape: ScalingShape) -> sympy.Expr:
    """Autograd on PEFT's graph: h for dl (ia3_out); x (ia3_in); x A^T and B(lambda_d x A^T) (vera)."""
    if shape.kind == "ia3_out":
        return T * O * shape.compute_bytes
    if shape.kind == "ia3_in":
        return _x_bytes(shape)
    return T * R * shape.compute_bytes + (T * O * shape.compute_bytes if shape.train_b else 0)


def sizes(shape: ScalingShape) -> dict:
    return {T: shape.tokens, I: shape.in_features, O: shape.out_features, R: shape.rank}


def price(shape: ScalingShape) -> list[PricedForm]:
    subs = sizes(shape)
    return [
        PricedForm(f, sympy.expand(sympy.sympify(f.flops).subs(subs)), sympy.expand(sympy.sympify(f.saved_bytes).subs(subs)))
        for f in candidate_forms(shape)
    ]


def choose(
    priced: list[PricedForm],
    *,
    objective: str = "saved_bytes",
    decide: Callable[[sympy.Basic], bool] = bool,
    forced: Optional[str] = None,
) -> tuple[PricedForm, str]:
    """A legal form and why: "saved_bytes" = fewest saved bytes, FLOPs break ties; "flops" = the reverse."""
    legal = [p for p in priced if p.form.legal]
    note = ""
    if forced is not None:
        hit = [p for p in legal if p.form.name == forced]
        if hit:
            return hit[0], "forced by the scaling_form option"
        illegal = next((p for p in priced if p.form.name == forced), None)
        note = f"forced form {forced} " + (f"is illegal here ({illegal.form.why_not}); " if illegal else "does not exist here; ")
    first, second = ("saved_bytes", "flops") if objective == "saved_bytes" else ("flops", "saved_bytes")

    def better(a: PricedForm, b: PricedForm) -> bool:
        return cheaper(a, b, first, second, decide)

    best = legal[0]
    for p in legal[1:]:
        if better(p, best):
            best = p
    why = "fewest saved bytes, FLOPs break ties" if objective == "saved_bytes" else "fewest FLOPs, saved bytes break ties"
    return best, note + why


def crossover(shape: ScalingShape, a: str, b: str, figure: str = "flops") -> Optional[sympy.Expr]:
    """The token count T at which forms a and b cost the same `figure` (None where they never do)."""
    forms = {f.name: f for f in candidate_forms(shape)}
    t = sympy.Symbol("t", real=True)
    subs = {**{k: v for k, v in sizes(shape).items() if k is not T}, T: t}
    diff = sympy.expand(sympy.sympify(getattr(forms[a], figure) - getattr(forms[b], figure)).subs(subs))
    roots = [r for r in sympy.solve(sympy.Eq(diff, 0), t) if r.is_positive]
    return roots[0] if roots else None
