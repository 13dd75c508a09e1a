"""IA3's forms against "Activations are not cheap in LoRA, weights are", Table 1, row (IA)^3:
y = (W x + b) * l  ==  (diag(l) W) x + b * l, and against what each form's op really keeps."""

import pytest
import sympy
import torch

from fxlora.cost.core import I, O, T, price
from fxlora.kinds.base import LayerShape
from fxlora.kinds.ia3.forms import G, candidate_forms, peft_saved_bytes
from fxlora.ops.ia3 import ia3_linear
from tests.kinds.saved import saved_bytes

TOKENS, IN, OUT = 6, 12, 10


def _shape(kind, **kw):
    return LayerShape(kind, sympy.Integer(TOKENS), sympy.Integer(IN), sympy.Integer(OUT), sympy.Integer(0), 8, 8, **kw)


def _tensors(kind, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, IN, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(OUT, IN, dtype=torch.float64, generator=g)
    b = torch.randn(OUT, dtype=torch.float64, generator=g) if bias else None
    n = OUT if kind == "ia3_out" else IN
    l = torch.randn(n, dtype=torch.float64, generator=g).requires_grad_()
    return x, W, b, l


def _op(kind, form, x, W, b, l):
    return ia3_linear(x, W, b, l, kind == "ia3_in", form, torch.float64, torch.float64, torch.float64, False)[0]


@pytest.mark.parametrize("form", ["act", "recompute", "weight"])
def test_output_scaling_is_table_1_row(form):
    x, W, b, l = _tensors("ia3_out")
    table = x @ (torch.diag(l) @ W).T + b * l  # weight-based reformulation
    torch.testing.assert_close(_op("ia3_out", form, x, W, b, l), table, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((x @ W.T + b) * l, table, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["act", "weight"])
def test_input_scaling_is_table_1_row(form):
    x, W, b, l = _tensors("ia3_in")
    table = x @ (W @ torch.diag(l)).T + b
    torch.testing.assert_close(_op("ia3_in", form, x, W, b, l), table, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, forms", [("ia3_out", ["act", "recompute", "weight"]), ("ia3_in", ["act", "weight"])])
def test_saved_bytes_are_what_the_op_keeps(kind, forms):
    x, W, b, l = _tensors(kind)
    priced = {p.form.name: p for p in price(candidate_forms(_shape(kind)), _shape(kind))}
    assert sorted(priced) == sorted(forms)
    for form in forms:
        kept = saved_bytes(lambda: _op(kind, form, x, W, b, l), (W, b, l))
        assert kept == int(priced[form].saved_bytes), (kind, form)


def test_peft_keeps_h_for_output_scaling_and_x_for_input_scaling():
    assert peft_saved_bytes(_shape("ia3_out")) == T * O * 8
    assert sympy.simplify(peft_saved_bytes(_shape("ia3_in")).subs({T: TOKENS, I: IN}) - TOKENS * IN * 8) == 0


def test_flops_are_the_stated_gemm_counts():
    """The docstring's counts, in base-size GEMMs G = 2 T o i: act 2G, recompute and weight 3G (+ small terms)."""
    forms = {f.name: sympy.expand(f.flops) for f in candidate_forms(_shape("ia3_out"))}
    assert sympy.expand(forms["act"] - 2 * G) == 4 * T * O
    assert sympy.expand(forms["recompute"] - 3 * G) == 4 * T * O
    weight = sympy.expand(forms["weight"] - 3 * G)
    assert weight.coeff(T) == 0 or weight.coeff(T) == 2 * O  # o i terms and, with a bias, 2 T o
