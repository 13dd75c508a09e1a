"""One Form type, one substitution of a site's sizes, one chooser, one crossover.

Formulas are sympy expressions in T (tokens = product of x's leading dims), i (in
features), o (out features), r (rank). `price` substitutes a site's sizes, which stay
symbolic under dynamic shapes; `choose_form` compares them through a `decide` callback
(fxlora.cost.guards.size_decider), so a choice that depends on T installs a guard and a
batch crossing the threshold recompiles into the other form.

Imports nothing from fxlora.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import sympy

T, I, O, R = sympy.symbols("T i o r", positive=True, integer=True)
ZERO = sympy.Integer(0)


@dataclass(frozen=True)
class Form:
    """One way to compute a site: its formulas in T, i, o, r and whether it may be used.

    lossy: "" for exact forms; a label (e.g. "velora(M=16)") for an opt-in lossy one, which
        wins wherever it is legal (the user asked for it), with `note` as the reason.
    traced: the form is the traced graph itself (choosing it leaves the site as it is).
    spec: what the kind's rewrite needs to build it (RunLoRA's forward/backward pair, a
        VeLoRA vector...); not part of the form's identity.
    """

    name: str
    flops: sympy.Expr
    saved_bytes: sympy.Expr
    legal: bool = True
    why_not: str = ""
    lossy: str = ""
    traced: bool = False
    transient_bytes: sympy.Expr = ZERO  # e.g. a merged W + s B A alive only while the op runs
    note: str = ""
    spec: Any = field(default=None, compare=False, hash=False)


@dataclass(frozen=True)
class PricedForm:
    """A form with a site's sizes substituted into its formulas."""

    form: Form
    flops: sympy.Expr
    saved_bytes: sympy.Expr
    transient_bytes: sympy.Expr = ZERO
    seconds: Optional[float] = None  # measured forward + backward at the size hints (fxlora.cost.timing)
    spread: Optional[float] = None  # (slowest - fastest round) / median of that measurement


def sizes(shape: Any) -> dict:
    """The substitution of a site's shape: every kind's shape has tokens/in/out/rank."""
    return {T: shape.tokens, I: shape.in_features, O: shape.out_features, R: shape.rank}


def at(expr: Any, shape: Any) -> sympy.Expr:
    """A formula evaluated at a site's sizes."""
    return sympy.expand(sympy.sympify(expr).subs(sizes(shape)))


def price(forms: list[Form], shape: Any) -> list[PricedForm]:
    return [PricedForm(f, at(f.flops, shape), at(f.saved_bytes, shape), at(f.transient_bytes, shape)) for f in forms]


def cheaper(a: PricedForm, b: PricedForm, first: str, second: str, decide: Callable[[sympy.Basic], bool]) -> bool:
    """Whether `a` costs less than `b` by figure `first`, ties broken by `second`; `decide` may guard on T."""
    fa, fb = getattr(a, first), getattr(b, first)
    if decide(sympy.Lt(fa, fb)):
        return True
    if decide(sympy.Gt(fa, fb)):
        return False
    return decide(sympy.Lt(getattr(a, second), getattr(b, second)))


def _least(pool: list[PricedForm], first: str, second: str, decide) -> PricedForm:
    best = pool[0]
    for p in pool[1:]:
        if cheaper(p, best, first, second, decide):
            best = p
    return best


def choose_form(
    priced: list[PricedForm],
    *,
    objective: str = "saved_bytes",
    flop_budget: Optional[float] = None,
    saved_budget: Optional[float] = 0.1,
    decide: Callable[[sympy.Basic], bool] = bool,
    forced: Optional[tuple[str, str]] = None,
) -> tuple[PricedForm, str]:
    """Pick a legal form and say why.

    An opt-in lossy form that is legal wins. Else `forced` = (form name, option name) wins
    where it exists and is legal. Else objective "time": the fastest measured form among
    those saving at most (1 + saved_budget) x the fewest saved bytes (None: saved bytes buy
    nothing, as in a checkpointed region; forms without a measured time: as "saved_bytes"); "flops": fewest FLOPs, saved bytes break ties;
    "saved_bytes": fewest saved bytes, FLOPs break ties, among the forms within
    (1 + flop_budget) x the cheapest FLOPs when a kind prices with a budget (LoRA: every
    RunLoRA form saves about the same, so FLOPs must stay near the cheapest).
    """
    legal = [p for p in priced if p.form.legal]
    lossy = [p for p in legal if p.form.lossy]
    if lossy:
        return lossy[0], lossy[0].form.note or f"opted in: {lossy[0].form.lossy}"
    note = ""
    if forced is not None:
        name, option = forced
        hit = [p for p in legal if p.form.name == name]
        if hit:
            return hit[0], f"forced by the {option} option"
        illegal = next((p for p in priced if p.form.name == name), None)
        note = f"forced form {name} " + (f"is illegal here ({illegal.form.why_not}); " if illegal else "does not exist here; ")
    timed = [p for p in legal if p.seconds is not None]
    if objective == "time" and timed:
        if saved_budget is None:
            fastest = _least(timed, "seconds", "flops", decide)
            why = f"fastest measured ({fastest.seconds * 1e3:.3g} ms, forward twice + backward)"
        else:
            leanest = _least(timed, "saved_bytes", "seconds", decide)
            lean = sympy.Rational(str(1 + saved_budget)) * leanest.saved_bytes
            fastest = _least([p for p in timed if decide(sympy.Le(p.saved_bytes, lean))], "seconds", "saved_bytes", decide)
            why = (f"fastest measured ({fastest.seconds * 1e3:.3g} ms forward+backward) among forms "
                   f"within {saved_budget:.0%} of the fewest saved bytes")
        # The cost model's own choice stands unless the measured one beats it beyond the noise
        # measured alongside (the benchmark's rule, measuring.md): a busy moment decides nothing.
        modelled, _ = choose_form(priced, objective="flops" if saved_budget is None else "saved_bytes",
                                  flop_budget=flop_budget, saved_budget=saved_budget, decide=decide)
        if modelled is fastest or modelled.seconds is None:
            return fastest, note + why
        margin = 1 - fastest.seconds / modelled.seconds
        noise = max(fastest.spread or 0.0, modelled.spread or 0.0)
        if margin <= noise:
            timed_how = "forward twice + backward" if saved_budget is None else "forward+backward"
            return modelled, note + (f"the cost model's choice: the fastest measured ({timed_how}), {fastest.form.name}, "
                                     f"is {margin:.0%} faster, within noise ({noise:.0%} spread)")
        return fastest, note + f"{why}, {margin:.0%} faster than the cost model's {modelled.form.name} ({noise:.0%} spread)"
    if objective == "time":
        note += "no measured time for this kind: "
    cheapest = _least(legal, "flops", "saved_bytes", decide)
    if objective == "flops":
        return cheapest, note + "fewest FLOPs, saved bytes break ties"
    if flop_budget is None:
        return _least(legal, "saved_bytes", "flops", decide), note + "fewest saved bytes, FLOPs break ties"
    budget = sympy.Rational(str(1 + flop_budget)) * cheapest.flops
    pool = [p for p in legal if decide(sympy.Le(p.flops, budget))]
    why = f"fewest saved bytes within {flop_budget:.0%} of the cheapest FLOPs ({cheapest.form.name})"
    return _least(pool, "saved_bytes", "flops", decide), note + why


def crossover(forms: list[Form], shape: Any, a: str, b: str, figure: str = "flops") -> Optional[sympy.Expr]:
    """The token count T at which forms `a` and `b` cost the same `figure` (None where they never do)."""
    named = {f.name: f for f in forms}
    t = sympy.Symbol("t", positive=True)
    subs = {**{k: v for k, v in sizes(shape).items() if k is not T}, T: t}
    diff = sympy.expand(sympy.sympify(getattr(named[a], figure) - getattr(named[b], figure)).subs(subs))
    roots = [r for r in sympy.solve(sympy.Eq(diff, 0), t) if r.is_positive]
    return roots[0] if roots else None
