"""VeRA's forms against "Activations are not cheap in LoRA, weights are", Table 1, row VeRA:
y = W x + b + lambda_b * B (lambda_d * A x)  ==  (W + diag(lambda_b) B diag(lambda_d) A) x + b,
and against what each form's op really keeps."""

import pytest
import sympy
import torch

from fxlora.cost.core import I, O, R, T, price
from fxlora.kinds.base import LayerShape
from fxlora.kinds.vera.forms import candidate_forms, peft_saved_bytes
from fxlora.ops.vera import vera_linear
from tests.kinds.saved import saved_bytes

TOKENS, IN, OUT, RANK = 6, 12, 10, 4


def _tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, IN, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(OUT, IN, dtype=torch.float64, generator=g)
    b = torch.randn(OUT, dtype=torch.float64, generator=g)
    A = torch.randn(RANK, IN, dtype=torch.float64, generator=g)
    B = torch.randn(OUT, RANK, dtype=torch.float64, generator=g)
    d = torch.randn(RANK, dtype=torch.float64, generator=g).requires_grad_()
    lb = torch.randn(OUT, dtype=torch.float64, generator=g).requires_grad_()
    return x, W, b, A, B, d, lb


def _shape():
    return LayerShape("vera", sympy.Integer(TOKENS), sympy.Integer(IN), sympy.Integer(OUT), sympy.Integer(RANK), 8, 8)


@pytest.mark.parametrize("form", ["act", "weight"])
def test_every_form_is_table_1_row(form):
    x, W, b, A, B, d, lb = _tensors()
    table = x @ (W + torch.diag(lb) @ B @ torch.diag(d) @ A).T + b
    y = vera_linear(x, W, b, A, B, d, lb, form, torch.float64, torch.float64, False)[0]
    torch.testing.assert_close(y, table, rtol=1e-12, atol=1e-12)


def test_saved_bytes_are_what_the_op_keeps():
    x, W, b, A, B, d, lb = _tensors()
    priced = {p.form.name: p for p in price(candidate_forms(_shape()), _shape())}
    for form in ("act", "weight"):
        kept = saved_bytes(lambda: vera_linear(x, W, b, A, B, d, lb, form, torch.float64, torch.float64, False),
                           (W, b, A, B, d, lb))
        assert kept == int(priced[form].saved_bytes), form


def test_peft_keeps_xa_and_the_up_projection():
    assert sympy.expand(peft_saved_bytes(_shape()) - (T * R * 8 + T * O * 8)) == 0


def test_weight_form_flops_do_not_grow_with_r_times_t():
    """The weight form touches T only through base-size GEMMs and the rank-r dlambda terms
    (docstring: 2G + 4 o i r + 2 T r (i + o)); the act form pays 2 T r (i + o) per pass."""
    forms = {f.name: sympy.expand(f.flops) for f in candidate_forms(_shape())}
    assert sympy.Poly(forms["weight"], T).degree() == 1 and sympy.Poly(forms["act"], T).degree() == 1
    assert forms["weight"].coeff(T).coeff(I).coeff(O) != 0  # the base GEMMs
    assert sympy.expand(forms["weight"] - forms["weight"].subs(T, 0)).has(R)
